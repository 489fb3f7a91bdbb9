//! `rack ps`: an app's processes, and `rack ps stop ID`, which restarts one (its supervisor
//! starts it again).

use clap::Subcommand;
use serde::Deserialize;

use super::{AppArg, Client, output};

/// `rack ps ...`.
#[derive(Debug, Subcommand)]
pub enum PsCommand {
    /// Stop a process; it is started again.
    Stop {
        id: String,
        #[command(flatten)]
        app: AppArg,
    },
}

#[derive(Debug, Deserialize)]
struct Process {
    id: String,
    /// The service.
    name: String,
    status: String,
    release: String,
    started: String,
    command: String,
}

/// Runs `rack ps ...`; `list_app` is the `-a` given before the subcommand.
pub async fn run(client: &Client, list_app: AppArg, command: Option<PsCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let app = list_app.resolve()?;
            let processes: serde_json::Value = client.get(&format!("/apps/{}/processes", client.segment(&app))).await?;
            if output::json(&processes)? {
                return Ok(());
            }
            let processes: Vec<Process> = serde_json::from_value(processes)?;
            let rows: Vec<Vec<String>> = processes
                .into_iter()
                .map(|p| vec![p.id, p.name, p.status, p.release, p.started, p.command])
                .collect();
            print!(
                "{}",
                output::table(&["ID", "SERVICE", "STATUS", "RELEASE", "STARTED", "COMMAND"], &rows)
            );
        }
        Some(PsCommand::Stop { id, app }) => {
            let app = app.or(&list_app).resolve()?;
            eprint!("Restarting {id}... ");
            client
                .delete(&format!(
                    "/apps/{}/processes/{}",
                    client.segment(&app),
                    client.segment(&id)
                ))
                .await?;
            eprintln!("OK");
        }
    }
    Ok(())
}
