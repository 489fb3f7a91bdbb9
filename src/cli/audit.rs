//! `rack audit`: who changed what (admin), newest first.

use clap::Args;
use serde::Deserialize;

use super::{Client, output};

/// `rack audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this app's entries.
    #[arg(long, short = 'a')]
    app: Option<String>,
    /// Only this actor's (`password`, or `token NAME`).
    #[arg(long)]
    actor: Option<String>,
    /// Only entries younger than this: seconds, or 90m, 12h, 30d.
    #[arg(long)]
    since: Option<String>,
    /// How many entries (at most 1000).
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(Debug, Deserialize)]
struct Entry {
    at: String,
    actor: String,
    method: String,
    path: String,
    status: i32,
    client: String,
}

/// Runs `rack audit`.
pub async fn run(client: &Client, args: AuditArgs) -> anyhow::Result<()> {
    let mut query = vec![("limit", args.limit.to_string())];
    if let Some(app) = args.app {
        query.push(("app", app));
    }
    if let Some(actor) = args.actor {
        query.push(("actor", actor));
    }
    if let Some(since) = args.since {
        let age = humantime_seconds(&since)?;
        query.push((
            "since",
            (chrono::Utc::now() - chrono::Duration::seconds(age)).to_rfc3339(),
        ));
    }
    let path = format!("/audit?{}", serde_urlencoded::to_string(&query)?);
    let entries: serde_json::Value = client.get(&path).await?;
    if output::json(&entries)? {
        return Ok(());
    }
    let entries: Vec<Entry> = serde_json::from_value(entries)?;
    let rows: Vec<Vec<String>> = entries
        .into_iter()
        .map(|e| vec![e.at, e.actor, e.method, e.path, e.status.to_string(), e.client])
        .collect();
    print!(
        "{}",
        output::table(&["WHEN", "WHO", "METHOD", "PATH", "STATUS", "FROM"], &rows)
    );
    Ok(())
}

/// `90`, `90m`, `12h`, `30d` in seconds.
fn humantime_seconds(text: &str) -> anyhow::Result<i64> {
    let (number, scale) = match text.chars().last() {
        Some('m') => (&text[..text.len() - 1], 60),
        Some('h') => (&text[..text.len() - 1], 3600),
        Some('d') => (&text[..text.len() - 1], 86_400),
        Some('s') => (&text[..text.len() - 1], 1),
        _ => (text, 1),
    };
    let number: i64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("--since takes a duration such as 90m, 12h or 30d, got {text:?}"))?;
    Ok(number * scale)
}
