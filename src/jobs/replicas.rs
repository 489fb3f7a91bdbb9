//! This server's heartbeat in `rack_replicas`, so that `rack ps` on any replica lists every
//! living one: refreshed three times per job lease (RACK_JOB_LEASE, the same patience as a
//! job's claim), removed when the server stops cleanly.

use std::time::Duration;

use chrono::Utc;

use crate::AppState;
use crate::store::replicas::{self, Replica};

/// How long a replica may stay silent before `rack ps` leaves it out.
pub fn stale_after(state: &AppState) -> Duration {
    state.config.job_lease
}

/// This server, as its row.
pub fn this(state: &AppState) -> Replica {
    let started_at = std::fs::metadata("/proc/self")
        .and_then(|m| m.modified())
        .map_or_else(|_| Utc::now(), chrono::DateTime::<Utc>::from);
    Replica {
        id: state.replica,
        host: state.config.bind.ip().to_string(),
        port: i32::from(state.config.bind.port()),
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        last_seen: Utc::now(),
    }
}

/// Beats until shutdown, then removes this server's row.
pub async fn heartbeat(state: AppState) {
    let me = this(&state);
    let stale = stale_after(&state);
    let every = (stale / 3).max(Duration::from_millis(500));
    loop {
        if let Err(e) = replicas::beat(&state.pool, &me, stale).await {
            tracing::warn!(error = %e, "recording this replica's heartbeat");
        }
        tokio::select! {
            () = state.shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if let Err(e) = replicas::remove(&state.pool, me.id).await {
        tracing::warn!(error = %e, "removing this replica's heartbeat");
    }
}
