//! Scheduled backups (`RACK_BACKUP_SCHEDULE`): each one is written into the object store under
//! `_backups/`, the oldest beyond `RACK_BACKUP_KEEP` are deleted, and every backup (scheduled or
//! downloaded) is told in the feed (`system.backup`) and in `/metrics`. With several replicas,
//! the one that gets the scheduled backups' lock takes it; the others skip that time.

use chrono::{DateTime, Utc};
use futures_util::StreamExt;

use super::archive::{self, Options, Summary};
use crate::AppState;

/// Runs the schedule until the server stops.
pub async fn run(state: AppState) {
    let Some(schedule) = state.config.backup.schedule.clone() else {
        return;
    };
    let cron = match <croner::Cron as std::str::FromStr>::from_str(&schedule) {
        Ok(cron) => cron,
        Err(e) => {
            tracing::error!("RACK_BACKUP_SCHEDULE {schedule:?} cannot be read: {e}; no scheduled backups");
            return;
        }
    };
    loop {
        let now = Utc::now();
        let Ok(next) = cron.find_next_occurrence(&now, false) else {
            tracing::warn!("RACK_BACKUP_SCHEDULE {schedule:?} names no time to come; no scheduled backups");
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        take(&state, next).await;
    }
}

/// Takes the scheduled backup due `at`, then deletes the oldest beyond `RACK_BACKUP_KEEP`; a
/// failure is told in the feed, the metrics and the log.
pub async fn take(state: &AppState, at: DateTime<Utc>) {
    match to_store(state, at).await {
        Ok(Some(_)) => {
            if let Err(e) = prune(state).await {
                tracing::warn!(error = format!("{e:#}"), "deleting old backups");
            }
        }
        Ok(None) => tracing::info!("another server is taking this scheduled backup"),
        Err(e) => failed(state, "scheduled", &e).await,
    }
}

/// Takes one backup into the object store; `None` when another server is taking one.
///
/// # Errors
/// When any step fails (nothing is kept then).
pub async fn to_store(state: &AppState, at: DateTime<Utc>) -> anyhow::Result<Option<(String, Summary)>> {
    let Some(prepared) = archive::prepare(
        state,
        Options {
            images: true,
            resources: true,
        },
        true,
    )
    .await?
    else {
        return Ok(None);
    };
    let location = format!("{}/rack-{}.tar", super::STORE_PREFIX, at.format("%Y%m%dT%H%M%SZ"));
    let (body, writer) = archive::stream(state, prepared);
    let stored = state.objects.put_stream(&location, body.boxed(), u64::MAX, None).await;
    let summary = writer.await??;
    let stored = stored?;
    succeeded(state, "scheduled", Some(&location), summary.bytes.max(stored.size)).await;
    Ok(Some((location, summary)))
}

/// Deletes the oldest scheduled backups beyond the number to keep.
async fn prune(state: &AppState) -> anyhow::Result<()> {
    let mut kept: Vec<String> = state
        .objects
        .list(super::STORE_PREFIX)
        .await?
        .into_iter()
        .map(|(location, _)| location)
        .collect();
    // Named by time: the name order is the age order.
    kept.sort();
    let excess = kept.len().saturating_sub(state.config.backup.keep);
    for location in &kept[..excess] {
        state.objects.delete(location).await?;
        tracing::info!("deleted the old backup {location}");
    }
    Ok(())
}

/// Tells the feed and the metrics about a backup that completed.
pub async fn succeeded(state: &AppState, how: &str, location: Option<&str>, bytes: u64) {
    let now = Utc::now();
    state.metrics.backup_last_success.set(now.timestamp());
    state
        .metrics
        .backup_last_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    let message = match location {
        Some(location) => format!("Backup ({how}) of {bytes} bytes written to {location}"),
        None => format!("Backup ({how}) of {bytes} bytes downloaded"),
    };
    tracing::info!("{message}");
    let data = serde_json::json!({ "ok": true, "how": how, "bytes": bytes, "location": location });
    if let Err(e) = crate::store::backup::feed_system(&state.pool, "system.backup", &message, data).await {
        tracing::warn!(error = %e, "recording the backup in the feed");
    }
}

/// Tells the feed and the log about a backup that failed.
pub async fn failed(state: &AppState, how: &str, error: &anyhow::Error) {
    state.metrics.backup_failures.inc();
    let message = format!("Backup ({how}) failed: {error:#}");
    tracing::error!("{message}");
    let data = serde_json::json!({ "ok": false, "how": how, "error": format!("{error:#}") });
    if let Err(e) = crate::store::backup::feed_system(&state.pool, "system.backup", &message, data).await {
        tracing::warn!(error = %e, "recording the failed backup in the feed");
    }
}
