//! Job workers: every replica runs a few; they claim work from Postgres (`FOR UPDATE SKIP
//! LOCKED`), hold it with a lease they renew, and always bring it to a terminal state.

pub mod builds;

use std::time::Duration;

use tokio::sync::mpsc;

use crate::AppState;
use crate::store::events::{self, Owner};

/// Persists a job's output lines as events, in batches (one transaction per batch, not per
/// line), until every sender is gone. Returns the number of lines written.
pub async fn persist_lines(state: AppState, owner: OwnedOwner, mut rx: mpsc::Receiver<(String, String)>) -> u64 {
    let mut written = 0;
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 500 {
            match rx.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        let lines = std::mem::take(&mut batch);
        let mut delay = Duration::from_millis(100);
        // Postgres may be briefly unavailable: keep the lines and retry rather than drop them.
        loop {
            match append(&state, &owner, &lines).await {
                Ok(()) => break,
                Err(e) if delay < Duration::from_secs(30) => {
                    tracing::warn!(error = %e, app.name = %owner.app, "writing job output; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, app.name = %owner.app, "dropping {} lines of job output", lines.len());
                    break;
                }
            }
        }
        written += lines.len() as u64;
    }
    written
}

async fn append(state: &AppState, owner: &OwnedOwner, lines: &[(String, String)]) -> Result<(), sqlx::Error> {
    let mut tx = state.pool.begin().await?;
    events::append(&mut tx, owner.borrow(), lines, None).await?;
    tx.commit().await?;
    state.bus.poke(crate::events::Wake::Events(owner.app.clone()));
    Ok(())
}

/// An owned [`Owner`].
#[derive(Debug, Clone)]
pub struct OwnedOwner {
    pub app: String,
    pub build: Option<String>,
    pub deployment: Option<uuid::Uuid>,
}

impl OwnedOwner {
    /// Borrows it for the store.
    pub fn borrow(&self) -> Owner<'_> {
        Owner {
            app: &self.app,
            build: self.build.as_deref(),
            deployment: self.deployment,
        }
    }
}
