//! `rack rack ...` (the rack itself: its process, versions, parameters and log, and its
//! rack-wide resources) and `rack instances`, as convox's `rack ...` and `instances`.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use futures_util::StreamExt;
use serde::Deserialize;

use super::{Client, output};

/// `rack rack ...`.
#[derive(Debug, Subcommand)]
pub enum RackCommand {
    /// List rack-wide resources, or create, show, update, link, unlink or delete one.
    Resources {
        #[command(subcommand)]
        command: Option<super::rack_resources::RackResourcesCommand>,
    },
    /// rack's own process (this replica); with --all, every app's processes too.
    Ps {
        #[arg(short, long)]
        all: bool,
    },
    /// The versions of rack that ran on this rack's database.
    Releases,
    /// The rack's parameters; `rack rack params set Key=Value ...` changes them (admin).
    Params {
        #[command(subcommand)]
        command: Option<ParamsCommand>,
    },
    /// rack's own log (admin), followed; --no-follow, --since 10m, --filter TEXT.
    Logs {
        #[arg(long)]
        no_follow: bool,
        /// How far back to start (a Go duration: 30s, 10m, 1h).
        #[arg(long)]
        since: Option<String>,
        /// Only lines containing this text.
        #[arg(long)]
        filter: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ParamsCommand {
    /// Set parameters: `Key=Value ...` (an empty value goes back to the environment's).
    Set {
        #[arg(required = true)]
        pairs: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
struct Process {
    id: String,
    app: String,
    name: String,
    status: String,
    release: String,
    started: String,
    command: String,
}

#[derive(Debug, Deserialize)]
struct Release {
    id: String,
    created: String,
}

#[derive(Debug, Deserialize)]
struct Instance {
    id: String,
    status: String,
    started: String,
    processes: u64,
    cpu: f64,
    #[serde(rename = "cpu-allocatable")]
    cpu_allocatable: f64,
    memory: f64,
    #[serde(rename = "memory-allocatable")]
    memory_allocatable: f64,
    #[serde(rename = "public-ip")]
    public_ip: String,
    #[serde(rename = "private-ip")]
    private_ip: String,
}

/// Runs `rack rack ...`.
pub async fn run(client: &Client, command: RackCommand) -> anyhow::Result<()> {
    match command {
        RackCommand::Resources { command } => super::rack_resources::run(client, command).await,
        RackCommand::Ps { all } => {
            let path = if all {
                "/system/processes?all=true"
            } else {
                "/system/processes"
            };
            let processes: serde_json::Value = client.get(path).await?;
            if output::json(&processes)? {
                return Ok(());
            }
            let processes: Vec<Process> = serde_json::from_value(processes)?;
            let rows: Vec<Vec<String>> = processes
                .into_iter()
                .map(|p| vec![p.id, p.app, p.name, p.status, p.release, p.started, p.command])
                .collect();
            let header = ["ID", "APP", "SERVICE", "STATUS", "RELEASE", "STARTED", "COMMAND"];
            print!("{}", output::table(&header, &rows));
            Ok(())
        }
        RackCommand::Releases => {
            let releases: serde_json::Value = client.get("/system/releases").await?;
            if output::json(&releases)? {
                return Ok(());
            }
            let releases: Vec<Release> = serde_json::from_value(releases)?;
            let rows: Vec<Vec<String>> = releases.into_iter().map(|r| vec![r.id, r.created]).collect();
            print!("{}", output::table(&["VERSION", "UPDATED"], &rows));
            Ok(())
        }
        RackCommand::Params { command: None } => {
            let system: serde_json::Value = client.get("/system").await?;
            let parameters = &system["parameters"];
            if output::json(parameters)? {
                return Ok(());
            }
            let parameters: std::collections::BTreeMap<String, String> = serde_json::from_value(parameters.clone())?;
            let rows: Vec<(&str, String)> = parameters.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            print!("{}", output::info(&rows));
            Ok(())
        }
        RackCommand::Params {
            command: Some(ParamsCommand::Set { pairs }),
        } => {
            let packed = super::rack_resources::parameters(&pairs)?;
            eprint!("Updating parameters... ");
            let _: serde_json::Value = client.put("/system", &[("parameters", packed.as_str())]).await?;
            eprintln!("OK");
            Ok(())
        }
        RackCommand::Logs {
            no_follow,
            since,
            filter,
        } => logs(client, no_follow, since, filter).await,
    }
}

async fn logs(client: &Client, no_follow: bool, since: Option<String>, filter: Option<String>) -> anyhow::Result<()> {
    let mut headers = vec![("prefix", "true".to_owned())];
    if no_follow {
        headers.push(("follow", "false".to_owned()));
    }
    headers.extend(since.map(|since| ("since", since)));
    headers.extend(filter.map(|filter| ("filter", filter)));
    let response = client.stream_with("/system/logs", &headers).await?;
    let mut body = response.bytes_stream();
    let mut stdout = std::io::stdout();
    while let Some(Ok(chunk)) = body.next().await {
        match stdout.write_all(&chunk).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing the log"),
        }
    }
    Ok(())
}

/// Runs `rack instances`.
pub async fn instances(client: &Client) -> anyhow::Result<()> {
    let instances: serde_json::Value = client.get("/instances").await?;
    if output::json(&instances)? {
        return Ok(());
    }
    let instances: Vec<Instance> = serde_json::from_value(instances)?;
    let percent = |used: f64, of: f64| {
        if of > 0.0 {
            format!("{:.0}%", used / of * 100.0)
        } else {
            String::new()
        }
    };
    let rows: Vec<Vec<String>> = instances
        .into_iter()
        .map(|i| {
            vec![
                i.id,
                i.status,
                i.started,
                i.processes.to_string(),
                percent(i.cpu, i.cpu_allocatable),
                percent(i.memory, i.memory_allocatable),
                i.public_ip,
                i.private_ip,
            ]
        })
        .collect();
    let header = ["ID", "STATUS", "STARTED", "PS", "CPU", "MEM", "PUBLIC", "PRIVATE"];
    print!("{}", output::table(&header, &rows));
    Ok(())
}
