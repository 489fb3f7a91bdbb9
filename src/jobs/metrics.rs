//! The apps' per-minute traffic history: every [`FLUSH_EVERY`] this server adds what its own
//! routers served since the last time (each second once, `Runtime::drain_traffic`) to
//! `metric_minutes`, where the other replicas add theirs; and every hour it prunes the minutes
//! older than `metrics_retention_days` (a rack parameter, RACK_METRICS_RETENTION_DAYS).

use std::time::Duration;

use crate::AppState;
use crate::runtime::TrafficMinute;
use crate::store::metric_minutes::Served;

/// How often the routers' figures are written: the most a metrics answer from another replica
/// lags behind this one's traffic.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Writes what this server's routers served since the last call. A failed write is logged and
/// those seconds are lost to the history (the figures are samples; a request is not held up).
pub async fn flush(state: &AppState) {
    write(state, false).await;
}

/// Writes what the routers served, the present second too when `last` (at shutdown).
async fn write(state: &AppState, last: bool) {
    let minutes: Vec<Served> = state.runtime.drain_traffic(last).iter().map(served).collect();
    if minutes.is_empty() {
        return;
    }
    if let Err(e) = crate::store::metric_minutes::add(&state.pool, &minutes).await {
        tracing::warn!(error = %e, "recording {} minute(s) of the apps' traffic", minutes.len());
    }
}

/// A router's minute as its row takes it.
fn served(m: &TrafficMinute) -> Served {
    let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Served {
        app: m.app.clone(),
        service: m.service.clone(),
        release: m.release.clone(),
        minute: m.minute,
        seconds: i32::try_from(m.seconds).unwrap_or(60),
        requests: signed(m.requests),
        errors: signed(m.errors),
        requests_range: (signed(m.requests_range.0), signed(m.requests_range.1)),
        errors_range: (signed(m.errors_range.0), signed(m.errors_range.1)),
        latency: m.latency.iter().map(|n| signed(*n)).collect(),
        cpu: m.cpu,
        memory: m
            .memory
            .map(|(bytes, count)| (signed(bytes), i32::try_from(count).unwrap_or(i32::MAX))),
    }
}

/// Removes the minutes past their retention.
pub async fn prune(state: &AppState) {
    let retention =
        crate::rack_params::days(&state.pool, &state.config, &crate::rack_params::METRICS_RETENTION_DAYS).await;
    match crate::store::metric_minutes::prune(&state.pool, retention).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("pruned {n} minutes of traffic history past their retention"),
        Err(e) => tracing::warn!(error = %e, "pruning the traffic history"),
    }
}

/// Flushes and prunes until shutdown, then flushes once more, the routers' present second
/// included (the routers stop with the server: no later flush would take it).
pub async fn record(state: AppState) {
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        flush(&state).await;
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            prune(&state).await;
            last_prune = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = state.shutdown.cancelled() => break,
            () = tokio::time::sleep(FLUSH_EVERY) => {}
        }
    }
    write(&state, true).await;
}
