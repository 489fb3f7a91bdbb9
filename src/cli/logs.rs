//! `rack logs`: an app's (or one service's) log, copied to stdout as it arrives, with convox's
//! options sent as headers.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;

use super::{AppArg, Client};

/// `rack logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    app: AppArg,
    /// Print what has been logged so far and stop, instead of following.
    #[arg(long)]
    no_follow: bool,
    /// Start this long ago, as a duration such as 30s, 5m or 1h (the rack's default is 2m).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Only lines containing this text.
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Only this service's lines.
    #[arg(short = 's', long, value_name = "SERVICE")]
    service: Option<String>,
}

/// Copies the log to stdout until the rack ends it (at once with `--no-follow`).
///
/// # Errors
/// When the rack refuses the request or stdout is closed.
pub async fn run(client: &Client, args: LogsArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let path = match &args.service {
        Some(service) => format!(
            "/apps/{}/services/{}/logs",
            client.segment(&app),
            client.segment(service)
        ),
        None => format!("/apps/{}/logs", client.segment(&app)),
    };
    let mut headers = vec![("prefix", "true".to_owned())];
    if args.no_follow {
        headers.push(("follow", "false".to_owned()));
    }
    if let Some(since) = args.since {
        headers.push(("since", since));
    }
    if let Some(filter) = args.filter {
        headers.push(("filter", filter));
    }
    let response = client.stream_with(&path, &headers).await?;
    let mut body = response.bytes_stream();
    let mut stdout = std::io::stdout();
    // Chunks are written as they come (not line by line) so nothing waits for a newline.
    while let Some(Ok(chunk)) = body.next().await {
        match stdout.write_all(&chunk).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // A reader that went away (`rack logs | head`) is no error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing the log"),
        }
    }
    Ok(())
}
