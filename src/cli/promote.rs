//! Promoting a release, shared by `rack releases promote`, `releases rollback`,
//! `env set/unset --promote` and `rack deploy`: the rollout log streams back with the promote
//! itself (`follow=true`), and the app's release afterwards says whether it took.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use serde::Deserialize;

use super::Client;
use super::client::Lines;
use super::exit::RolledBack;

/// Longest the CLI waits for a rollout once it lost the stream (convox's cap).
const POLL_CAP: Duration = Duration::from_secs(60 * 60);

/// Failed reads in a row after which the rack is taken to be gone while polling (a restarting
/// server is back well within this).
const POLL_ERRORS: u32 = 30;

/// How a promote is followed.
#[derive(Debug, Clone, Args)]
pub struct PromoteFlags {
    /// Return once the promote is accepted, without following the rollout.
    #[arg(long, conflicts_with = "wait")]
    detach: bool,
    /// Follow the rollout until it ends (the default).
    #[arg(long)]
    wait: bool,
    /// Supersede a rollout in progress instead of failing because the app is updating.
    #[arg(long)]
    force: bool,
    /// Do not print what the promote changes (env keys, build, manifest) before promoting.
    #[arg(long, short)]
    quiet: bool,
}

/// An app, as far as a promote needs it.
#[derive(Debug, Deserialize)]
pub struct AppState {
    /// The active release.
    pub release: String,
    /// `running`, `updating`, `rollback`...
    pub status: String,
}

/// The app `app`.
///
/// # Errors
/// When the rack cannot be reached or the app does not exist.
pub async fn app_state(client: &Client, app: &str) -> anyhow::Result<AppState> {
    client.get(&format!("/apps/{}", client.segment(app))).await
}

/// Where rollout lines go: stdout, or stderr when stdout is kept for an id (`deploy --id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    /// Stdout, as convox prints it.
    Stdout,
    /// Stderr, when stdout carries only an id.
    Stderr,
}

/// How the rollout stream ended.
enum Outcome {
    Ok,
    Error(String),
    /// No last line: the connection broke or the server went away.
    Lost,
}

/// Promotes `release` of `app`, printing `Promoting R...` on stderr and the rollout log as it
/// arrives, then `OK` once the release is active.
///
/// # Errors
/// When the rack refuses the promote, when the rollout fails (with its reason), or when
/// another release is active afterwards ([`RolledBack`], with the rollout's reason, else
/// `rollback` as convox says).
pub async fn promote(
    client: &Client,
    app: &str,
    release: &str,
    flags: &PromoteFlags,
    log: LogTo,
) -> anyhow::Result<()> {
    let path = format!(
        "/apps/{}/releases/{}/promote",
        client.segment(app),
        client.segment(release)
    );
    let force = if flags.force { "true" } else { "false" };
    // With --json, stdout carries the command's one JSON document: the log goes to stderr.
    let log = if super::output::is_json() { LogTo::Stderr } else { log };
    if !flags.quiet {
        print_changes(client, app, release, log).await;
    }
    if flags.detach {
        eprint!("Promoting {release}... ");
        let _: serde_json::Value = client.post(&path, &[("force", force)]).await?;
        eprintln!("OK");
        return Ok(());
    }
    eprintln!("Promoting {release}...");
    let response = client
        .post_stream(&path, &[("follow", "true"), ("force", force)])
        .await?;
    let failure = match follow(response, log).await {
        Outcome::Ok => None,
        Outcome::Error(reason) => Some(reason),
        Outcome::Lost => {
            eprintln!("Lost the rollout log; waiting for the app to settle...");
            wait_running(client, app).await?;
            None
        }
    };
    // Whether another release is active afterwards decides between "rolled back" (exit 3)
    // and a plain failure; the rollout's own reason is the message when it gave one.
    let rolled_back = app_state(client, app).await?.release != release;
    match (failure, rolled_back) {
        (Some(reason), true) => Err(RolledBack(reason).into()),
        (None, true) => Err(RolledBack("rollback".into()).into()),
        (Some(reason), false) => bail!("{reason}"),
        (None, false) => {
            eprintln!("OK");
            Ok(())
        }
    }
}

/// Prints what promoting `release` changes over the active one. Best effort: a diff that cannot
/// be had (no active release yet, an older server) does not keep the promote from running.
async fn print_changes(client: &Client, app: &str, release: &str, log: LogTo) {
    let Ok(active) = app_state(client, app).await.map(|a| a.release) else {
        return;
    };
    if active.is_empty() || active == release {
        return;
    }
    match super::diff::get::<super::diff::ReleaseDiff>(client, app, &active, release).await {
        Ok(diff) => {
            let text = super::diff::render(&diff);
            match log {
                LogTo::Stdout => print!("{text}"),
                LogTo::Stderr => eprint!("{text}"),
            }
        }
        Err(e) => eprintln!("(no diff of {active} and {release}: {e})"),
    }
}

/// Follows a deployment started some other way (a `scale`), printing its log on stdout (on
/// stderr with `--json`).
///
/// # Errors
/// When the rollout fails (with its reason) or the rack cannot be reached.
pub async fn follow_deployment(client: &Client, app: &str, deployment: &str) -> anyhow::Result<()> {
    let path = format!(
        "/apps/{}/deployments/{}/events",
        client.segment(app),
        client.segment(deployment)
    );
    let log = if super::output::is_json() {
        LogTo::Stderr
    } else {
        LogTo::Stdout
    };
    match follow(client.stream(&path).await?, log).await {
        Outcome::Ok => Ok(()),
        Outcome::Error(reason) => bail!("{reason}"),
        Outcome::Lost => wait_running(client, app).await,
    }
}

/// Prints the rollout log until its last line, which is kept back: `OK` means nothing to the
/// reader, and an `ERROR: ...` becomes the command's own error.
async fn follow(response: reqwest::Response, log: LogTo) -> Outcome {
    let mut lines = Lines::new(response);
    while let Some(line) = lines.next().await {
        match last_line(&line) {
            Some(outcome) => return outcome,
            None if log == LogTo::Stdout => print!("{line}"),
            None => eprint!("{line}"),
        }
    }
    Outcome::Lost
}

/// The outcome a rollout line announces, if it is the stream's last one. The server's own
/// notices that a stream was cut (`... reconnect to resume`) say nothing about the rollout.
fn last_line(line: &str) -> Option<Outcome> {
    let line = line.trim_end_matches('\n');
    if line.ends_with("reconnect to resume") {
        return Some(Outcome::Lost);
    }
    if line == "OK" {
        return Some(Outcome::Ok);
    }
    line.strip_prefix("ERROR: ")
        .map(|reason| Outcome::Error(reason.to_owned()))
}

/// Polls the app every second until it is `running` again (after a rollout or its rollback).
async fn wait_running(client: &Client, app: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + POLL_CAP;
    let mut errors = 0;
    loop {
        match app_state(client, app).await {
            Ok(state) if state.status == "running" => return Ok(()),
            Ok(_) => errors = 0,
            Err(e) => {
                errors += 1;
                if errors >= POLL_ERRORS {
                    return Err(e);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for the rollout to end");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outcome_ends_the_log() {
        assert!(matches!(last_line("OK\n"), Some(Outcome::Ok)));
        assert!(
            matches!(last_line("ERROR: health check failed\n"), Some(Outcome::Error(r)) if r == "health check failed")
        );
        assert!(matches!(
            last_line("ERROR: the event log is unavailable; reconnect to resume\n"),
            Some(Outcome::Lost)
        ));
        assert!(last_line("2024-01-01T00:00:00Z system/local/atom/app Status: Updating => Running\n").is_none());
        assert!(last_line("OK then\n").is_none());
    }
}
