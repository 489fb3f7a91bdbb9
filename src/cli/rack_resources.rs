//! `rack rack resources ...`: rack-wide resources (convox's `rack resources`), created at once
//! and linked to apps. Creating, updating, deleting, linking and unlinking need the admin role.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Deserialize;

use super::output;
use super::{AppArg, Client};

/// `rack rack resources ...`.
#[derive(Debug, Subcommand)]
pub enum RackResourcesCommand {
    /// Create one and start it: `rack rack resources create redis --name cache memory=64`.
    Create {
        /// Its type: postgres, postgis, mysql, mariadb, redis or memcached.
        kind: String,
        /// Options, as Option=Value (see `rack rack resources options TYPE`).
        options: Vec<String>,
        /// Its name (default: the type and six random letters).
        #[arg(short = 'n', long = "name")]
        name: Option<String>,
    },
    /// Show one (its password masked below admin).
    Info { name: String },
    /// Print one's URL.
    Url { name: String },
    /// Change options (the server restarts on them, keeping its data).
    Update {
        name: String,
        /// Options, as Option=Value.
        options: Vec<String>,
    },
    /// Stop one no app is linked to and remove its data.
    Delete { name: String },
    /// Link one to an app: its services may name it in their `resources:`.
    Link {
        name: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Unlink one from an app.
    Unlink {
        name: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// List the types.
    Types,
    /// List the options of a type.
    Options { kind: String },
}

#[derive(Debug, Deserialize)]
struct Resource {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    status: String,
    url: String,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
    #[serde(default)]
    apps: Vec<LinkedApp>,
}

#[derive(Debug, Deserialize)]
struct LinkedApp {
    name: String,
}

#[derive(Debug, Deserialize)]
struct ResourceType {
    name: String,
    parameters: Vec<Parameter>,
}

#[derive(Debug, Deserialize)]
struct Parameter {
    name: String,
    default: String,
    description: String,
}

/// `Option=Value` arguments as the convox SDK sends a map: one URL-encoded form value.
pub(super) fn parameters(options: &[String]) -> anyhow::Result<String> {
    let mut pairs = Vec::new();
    for option in options {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("Name=Value expected: {option}"))?;
        pairs.push((key, value));
    }
    Ok(serde_urlencoded::to_string(pairs)?)
}

/// Runs `rack rack resources ...`.
pub async fn run(client: &Client, command: Option<RackResourcesCommand>) -> anyhow::Result<()> {
    let path = |name: &str| format!("/resources/{}", client.segment(name));
    match command {
        None => {
            let resources: serde_json::Value = client.get("/resources").await?;
            if output::json(&resources)? {
                return Ok(());
            }
            let resources: Vec<Resource> = serde_json::from_value(resources)?;
            let rows: Vec<Vec<String>> = resources.into_iter().map(|r| vec![r.name, r.kind, r.status]).collect();
            print!("{}", output::table(&["NAME", "TYPE", "STATUS"], &rows));
        }
        Some(RackResourcesCommand::Create { kind, options, name }) => {
            let parameters = parameters(&options)?;
            let mut form = vec![("kind", kind.as_str()), ("parameters", parameters.as_str())];
            if let Some(name) = &name {
                form.push(("name", name));
            }
            eprint!("Creating resource... ");
            let r: Resource = client.post("/resources", &form).await?;
            eprintln!("OK");
            println!("{}", r.name);
        }
        Some(RackResourcesCommand::Info { name }) => {
            let r: serde_json::Value = client.get(&path(&name)).await?;
            if output::json(&r)? {
                return Ok(());
            }
            let r: Resource = serde_json::from_value(r)?;
            let options: Vec<String> = r.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let apps: Vec<String> = r.apps.into_iter().map(|a| a.name).collect();
            print!(
                "{}",
                output::info(&[
                    ("Name", r.name),
                    ("Type", r.kind),
                    ("Status", r.status),
                    ("Options", options.join(" ")),
                    ("URL", r.url),
                    ("Apps", apps.join(", ")),
                ])
            );
        }
        Some(RackResourcesCommand::Url { name }) => {
            let r: Resource = client.get(&path(&name)).await?;
            println!("{}", r.url);
        }
        Some(RackResourcesCommand::Update { name, options }) => {
            let parameters = parameters(&options)?;
            eprint!("Updating resource {name}... ");
            let _: Resource = client.put(&path(&name), &[("parameters", &parameters)]).await?;
            eprintln!("OK");
        }
        Some(RackResourcesCommand::Delete { name }) => {
            eprint!("Deleting resource {name}... ");
            client.delete(&path(&name)).await?;
            eprintln!("OK");
        }
        Some(RackResourcesCommand::Link { name, app }) => {
            let app = app.resolve()?;
            eprint!("Linking {name} to {app}... ");
            let _: Resource = client.post(&format!("{}/links", path(&name)), &[("app", &app)]).await?;
            eprintln!("OK");
        }
        Some(RackResourcesCommand::Unlink { name, app }) => {
            let app = app.resolve()?;
            eprint!("Unlinking {name} from {app}... ");
            let _: Resource = client
                .delete_json(&format!("{}/links/{}", path(&name), client.segment(&app)))
                .await?;
            eprintln!("OK");
        }
        Some(RackResourcesCommand::Types) => {
            let types: Vec<ResourceType> = client.options("/resources").await?;
            let rows: Vec<Vec<String>> = types.into_iter().map(|t| vec![t.name]).collect();
            print!("{}", output::table(&["TYPE"], &rows));
        }
        Some(RackResourcesCommand::Options { kind }) => {
            let types: Vec<ResourceType> = client.options("/resources").await?;
            let found = types
                .into_iter()
                .find(|t| t.name == kind)
                .ok_or_else(|| anyhow::anyhow!("no such resource type: {kind}"))?;
            let rows: Vec<Vec<String>> = found
                .parameters
                .into_iter()
                .map(|p| vec![p.name, p.default, p.description])
                .collect();
            print!("{}", output::table(&["NAME", "DEFAULT", "DESCRIPTION"], &rows));
        }
    }
    Ok(())
}
