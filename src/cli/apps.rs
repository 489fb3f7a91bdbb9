//! `rack apps ...`.

use clap::Subcommand;
use serde::Deserialize;

use super::output;
use super::{AppArg, Client};

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Create an app.
    Create { name: String },
    /// Show an app.
    Info { name: String },
    /// Delete an app and everything it holds.
    Delete { name: String },
    /// Protect an app from deletion.
    Lock { name: String },
    /// Allow an app to be deleted again.
    Unlock { name: String },
    /// Stop an app's rollout in progress; it rolls back to the release that was active.
    Cancel {
        /// The app (default: --app, .convox/app, else the current directory's name).
        name: Option<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Show an app's parameters (stored with the app; rack acts on none of them).
    Params {
        #[command(subcommand)]
        command: Option<ParamsCommand>,
        #[command(flatten)]
        app: AppArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ParamsCommand {
    /// Set parameters: `Key=Value ...` (an empty value removes the key).
    Set {
        #[arg(required = true)]
        pairs: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
}

#[derive(Debug, Deserialize)]
struct App {
    name: String,
    status: String,
    release: String,
    generation: String,
    locked: bool,
    router: String,
    #[serde(default)]
    parameters: std::collections::BTreeMap<String, String>,
}

pub async fn run(client: &Client, command: Option<AppsCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let apps: serde_json::Value = client.get("/apps").await?;
            if output::json(&apps)? {
                return Ok(());
            }
            let apps: Vec<App> = serde_json::from_value(apps)?;
            let rows: Vec<Vec<String>> = apps.into_iter().map(|a| vec![a.name, a.status, a.release]).collect();
            print!("{}", output::table(&["APP", "STATUS", "RELEASE"], &rows));
        }
        Some(AppsCommand::Create { name }) => {
            eprint!("Creating {name}... ");
            let app: serde_json::Value = client.post("/apps", &[("name", name.as_str())]).await?;
            eprintln!("OK");
            output::json(&app)?;
        }
        Some(AppsCommand::Info { name }) => {
            let app: serde_json::Value = client.get(&format!("/apps/{}", client.segment(&name))).await?;
            if output::json(&app)? {
                return Ok(());
            }
            let app: App = serde_json::from_value(app)?;
            print!(
                "{}",
                output::info(&[
                    ("Name", app.name),
                    ("Status", app.status),
                    ("Generation", app.generation),
                    ("Locked", app.locked.to_string()),
                    ("Release", app.release),
                    ("Router", app.router),
                ])
            );
        }
        Some(AppsCommand::Delete { name }) => {
            eprint!("Deleting {name}... ");
            client.delete(&format!("/apps/{}", client.segment(&name))).await?;
            eprintln!("OK");
        }
        Some(AppsCommand::Lock { name }) => lock(client, &name, true).await?,
        Some(AppsCommand::Unlock { name }) => lock(client, &name, false).await?,
        Some(AppsCommand::Cancel { name, app }) => {
            let name = match name {
                Some(name) => name,
                None => app.resolve()?,
            };
            eprint!("Cancelling deployment of {name}... ");
            let _: serde_json::Value = client
                .post(&format!("/apps/{}/cancel", client.segment(&name)), &[])
                .await?;
            eprintln!("OK");
        }
        Some(AppsCommand::Params { command: None, app }) => {
            let name = app.resolve()?;
            let shown: serde_json::Value = client.get(&format!("/apps/{}", client.segment(&name))).await?;
            if output::json(&shown["parameters"])? {
                return Ok(());
            }
            let shown: App = serde_json::from_value(shown)?;
            let rows: Vec<(&str, String)> = shown.parameters.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            print!("{}", output::info(&rows));
        }
        Some(AppsCommand::Params {
            command: Some(ParamsCommand::Set { pairs, app }),
            app: outer,
        }) => {
            let name = app.or(&outer).resolve()?;
            let mut parameters = Vec::new();
            for pair in &pairs {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("Key=Value expected: {pair}"))?;
                parameters.push((key, value));
            }
            let packed = serde_urlencoded::to_string(&parameters)?;
            eprint!("Updating parameters of {name}... ");
            let _: serde_json::Value = client
                .put(
                    &format!("/apps/{}", client.segment(&name)),
                    &[("parameters", packed.as_str())],
                )
                .await?;
            eprintln!("OK");
        }
    }
    Ok(())
}

async fn lock(client: &Client, name: &str, locked: bool) -> anyhow::Result<()> {
    eprint!("{} {name}... ", if locked { "Locking" } else { "Unlocking" });
    let _: App = client
        .put(
            &format!("/apps/{}", client.segment(name)),
            &[("lock", if locked { "true" } else { "false" })],
        )
        .await?;
    eprintln!("OK");
    Ok(())
}
