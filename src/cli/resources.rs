//! `rack resources ...`: an app's resources (convox.yml `resources:`), as `convox resources`
//! shows them, plus their data out and in, and the deletion of one the app no longer declares.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::Subcommand;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::output;
use super::{AppArg, Client};

/// `rack resources ...`.
#[derive(Debug, Subcommand)]
pub enum ResourcesCommand {
    /// Show one resource (its password masked unless the credential may deploy).
    Info {
        name: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Print one resource's URL.
    Url {
        name: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Write a resource's data (a plain-SQL dump, or a redis RDB) to a file or standard output.
    Export {
        name: String,
        #[command(flatten)]
        app: AppArg,
        /// The file to write (default: standard output).
        #[arg(short = 'f', long = "file")]
        file: Option<std::path::PathBuf>,
    },
    /// Load a plain-SQL dump (postgres, mysql) or an RDB (redis) into a resource, from a file or
    /// standard input.
    Import {
        name: String,
        #[command(flatten)]
        app: AppArg,
        /// The file to read (default: standard input).
        #[arg(short = 'f', long = "file")]
        file: Option<std::path::PathBuf>,
    },
    /// Stop a resource the app's release no longer declares and remove its data.
    Delete {
        name: String,
        #[command(flatten)]
        app: AppArg,
    },
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
}

/// Runs `rack resources ...`; `list_app` is the `-a` given before the subcommand.
pub async fn run(client: &Client, list_app: AppArg, command: Option<ResourcesCommand>) -> anyhow::Result<()> {
    let path = |app: &str, name: &str| format!("/apps/{}/resources/{}", client.segment(app), client.segment(name));
    match command {
        None => {
            let app = list_app.resolve()?;
            let resources: serde_json::Value = client.get(&format!("/apps/{}/resources", client.segment(&app))).await?;
            if output::json(&resources)? {
                return Ok(());
            }
            let resources: Vec<Resource> = serde_json::from_value(resources)?;
            let rows: Vec<Vec<String>> = resources.into_iter().map(|r| vec![r.name, r.kind, r.status]).collect();
            print!("{}", output::table(&["NAME", "TYPE", "STATUS"], &rows));
        }
        Some(ResourcesCommand::Info { name, app }) => {
            let app = app.or(&list_app).resolve()?;
            let r: serde_json::Value = client.get(&path(&app, &name)).await?;
            if output::json(&r)? {
                return Ok(());
            }
            let r: Resource = serde_json::from_value(r)?;
            let options: Vec<String> = r.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            print!(
                "{}",
                output::info(&[
                    ("Name", r.name),
                    ("Type", r.kind),
                    ("Status", r.status),
                    ("Options", options.join(" ")),
                    ("URL", r.url),
                ])
            );
        }
        Some(ResourcesCommand::Url { name, app }) => {
            let app = app.or(&list_app).resolve()?;
            let r: Resource = client.get(&path(&app, &name)).await?;
            println!("{}", r.url);
        }
        Some(ResourcesCommand::Export { name, app, file }) => {
            let app = app.or(&list_app).resolve()?;
            let response = client.stream(&format!("{}/data", path(&app, &name))).await?;
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match &file {
                Some(file) => Box::new(
                    tokio::fs::File::create(file)
                        .await
                        .with_context(|| format!("creating {}", file.display()))?,
                ),
                None => Box::new(tokio::io::stdout()),
            };
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                out.write_all(&chunk.context("reading the export")?).await?;
            }
            out.flush().await?;
            if file.is_some() {
                eprintln!("Exported {name}");
            }
        }
        Some(ResourcesCommand::Import { name, app, file }) => {
            let app = app.or(&list_app).resolve()?;
            let data = match &file {
                Some(file) => tokio::fs::read(file)
                    .await
                    .with_context(|| format!("reading {}", file.display()))?,
                None => {
                    let mut data = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut data).await?;
                    data
                }
            };
            eprint!("Importing into {name}... ");
            let _: serde_json::Value = client
                .put_body(&format!("{}/data", path(&app, &name)), data.into())
                .await?;
            eprintln!("OK");
        }
        Some(ResourcesCommand::Delete { name, app }) => {
            let app = app.or(&list_app).resolve()?;
            eprint!("Deleting resource {name}... ");
            client.delete(&path(&app, &name)).await?;
            eprintln!("OK");
        }
    }
    Ok(())
}
