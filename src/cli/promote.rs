//! Promoting a release, shared by `rack releases promote`, `releases rollback`,
//! `env set/unset --promote` and `rack deploy`: the rollout log streams back with the promote
//! itself (`follow=true`), and the app's release afterwards says whether it took. The log's
//! lines carry their event ids, so when the connection breaks (the replica serving it stops,
//! a proxy drops it) the CLI picks the log up where it was from the deployment's own stream,
//! on whichever replica answers, with no line lost or shown twice.

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

/// How long the CLI keeps trying to resume a broken rollout log before it falls back to
/// polling the app: long enough for a load balancer to notice a replica is gone.
const RESUME_FOR: Duration = Duration::from_secs(30);

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
        .post_stream(&path, &[("follow", "true"), ("ids", "true"), ("force", force)])
        .await?;
    // The deployment's own stream, where the log resumes if this connection breaks.
    let events = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .filter(|l| l.starts_with('/'))
        .map(|l| format!("{l}/events"));
    let failure = match follow(client, response, log, events).await {
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
    let first = client.stream(&format!("{path}?ids=true")).await?;
    match follow(client, first, log, Some(path)).await {
        Outcome::Ok => Ok(()),
        Outcome::Error(reason) => bail!("{reason}"),
        Outcome::Lost => wait_running(client, app).await,
    }
}

/// Prints the rollout log until its last line, which is kept back: `OK` means nothing to the
/// reader, and an `ERROR: ...` becomes the command's own error. Lines come as `<id> <line>`;
/// when the body ends without a last line and `events` names the deployment's stream, the log
/// resumes there after the last id printed.
async fn follow(client: &Client, mut response: reqwest::Response, log: LogTo, events: Option<String>) -> Outcome {
    let mut after: Option<i64> = None;
    loop {
        let mut lines = Lines::new(response);
        while let Some(line) = lines.next().await {
            let (id, line) = split_id(&line);
            match last_line(line) {
                Some(Outcome::Lost) => break,
                Some(outcome) => return outcome,
                None if log == LogTo::Stdout => print!("{line}"),
                None => eprint!("{line}"),
            }
            after = id.or(after);
        }
        let Some(events) = &events else {
            return Outcome::Lost;
        };
        match resume(client, events, after).await {
            Some(next) => response = next,
            None => return Outcome::Lost,
        }
    }
}

/// A line's event id and the line without it (`<id> <line>`); lines without one (notices,
/// lines from outside the event log) come back whole.
fn split_id(line: &str) -> (Option<i64>, &str) {
    match line.split_once(' ') {
        Some((id, rest)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => match id.parse() {
            Ok(id) => (Some(id), rest),
            Err(_) => (None, line),
        },
        _ => (None, line),
    }
}

/// Opens the deployment's stream `events` after event `after`, trying for [`RESUME_FOR`]
/// (the replica that served the log may be going away while another takes over).
async fn resume(client: &Client, events: &str, after: Option<i64>) -> Option<reqwest::Response> {
    let path = match after {
        Some(id) => format!("{events}?ids=true&after={id}"),
        None => format!("{events}?ids=true"),
    };
    eprintln!("(the rollout log was cut off; resuming it)");
    let deadline = tokio::time::Instant::now() + RESUME_FOR;
    loop {
        match client.stream(&path).await {
            Ok(response) => return Some(response),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(_) => return None,
        }
    }
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

    #[test]
    fn ids_are_split_off_lines_that_have_one() {
        assert_eq!(split_id("42 OK\n"), (Some(42), "OK\n"));
        assert_eq!(
            split_id("7 2024-01-01T00:00:00Z system/k8s/web Scaled up\n"),
            (Some(7), "2024-01-01T00:00:00Z system/k8s/web Scaled up\n")
        );
        let notice = "rack: this server is shutting down; reconnect to resume\n";
        assert_eq!(split_id(notice), (None, notice));
        assert_eq!(
            split_id("2024-01-01T00:00:00Z x y\n"),
            (None, "2024-01-01T00:00:00Z x y\n")
        );
        assert_eq!(split_id("99999999999999999999 x\n"), (None, "99999999999999999999 x\n"));
    }
}
