//! Writes this server's own log (`rack_log`) to Postgres as it is written, so that `rack logs`
//! on any replica shows every replica's lines; prunes what is past its retention. Only when
//! the log is this process's alone (`Config::shared_rack_log`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::AppState;
use crate::rack_log::Line;
use crate::store::rack_log::{self, NewLine};

/// Largest batch written at once.
const BATCH: usize = 500;

/// Lines held while Postgres does not take them; the oldest go first beyond this.
const HOLD: usize = crate::rack_log::KEEP;

fn new_line(line: &Arc<Line>) -> NewLine {
    NewLine {
        at: line.at,
        level: line.level.to_owned(),
        text: line.text.clone(),
    }
}

/// Writes the lines logged since this process started, then each new one, until shutdown (and
/// what is pending then).
pub async fn persist(state: AppState) {
    let (recent, mut followers) = crate::rack_log::snapshot();
    let mut pending: Vec<NewLine> = recent.iter().map(new_line).collect();
    let mut pruned = tokio::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let stopping = state.shutdown.is_cancelled();
        while pending.len() < BATCH * 4 {
            match followers.try_recv() {
                Ok(line) => pending.push(new_line(&line)),
                Err(TryRecvError::Lagged(n)) => pending.push(lost(n)),
                Err(_) => break,
            }
        }
        let mut written = 0;
        for batch in pending.chunks(BATCH) {
            // Failures are logged below `info`, which this log does not keep: a line about a
            // failed write would only be one more line to write.
            if let Err(e) = rack_log::append(&state.pool, state.replica, batch).await {
                tracing::debug!(error = %e, "writing rack's log to Postgres");
                break;
            }
            written += batch.len();
        }
        pending.drain(..written);
        if pending.len() > HOLD {
            pending.drain(..pending.len() - HOLD);
        }
        if stopping {
            return;
        }
        if pruned.elapsed() >= Duration::from_secs(3600) {
            pruned = tokio::time::Instant::now();
            if let Err(e) = rack_log::prune(&state.pool).await {
                tracing::debug!(error = %e, "pruning rack's log");
            }
        }
        // Pending lines that did not get written: try again in a second.
        let retry = if pending.is_empty() {
            Duration::MAX
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            () = state.shutdown.cancelled() => {}
            () = tokio::time::sleep(retry.min(Duration::from_secs(86_400))) => {}
            received = followers.recv() => match received {
                Ok(line) => pending.push(new_line(&line)),
                Err(RecvError::Lagged(n)) => pending.push(lost(n)),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// The line that stands for `n` lines this writer fell behind on.
fn lost(n: u64) -> NewLine {
    NewLine {
        at: chrono::Utc::now(),
        level: "WARN".to_owned(),
        text: format!("rack::rack_log: {n} lines of this replica's log were lost (written faster than stored)"),
    }
}
