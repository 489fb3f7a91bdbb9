//! Job workers: every replica runs a few; they claim work from Postgres (`FOR UPDATE SKIP
//! LOCKED`), hold it with a lease they renew, and always bring it to a terminal state.

pub mod builds;
pub mod deploys;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use sqlx::PgPool;

use crate::events::{EventBus, Wake};
use crate::runtime::LogItem;
use crate::store::events::{self, Owner};

/// Workers that found nothing look again this often (a NOTIFY wakes them sooner).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Waits until there may be new work (a NOTIFY on the jobs channel, or the idle poll
/// interval). Returns false when the server is shutting down.
pub async fn wait_for_work(state: &crate::AppState, wake: &mut tokio::sync::broadcast::Receiver<Wake>) -> bool {
    let deadline = tokio::time::sleep(IDLE_POLL);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return false,
            () = &mut deadline => return true,
            received = wake.recv() => match received {
                Ok(Wake::Events(_)) => {}
                _ => return true,
            },
        }
    }
}

/// A job's claim, renewed in the background until dropped. `cancel` is raised when a cancel
/// of the job was requested, `lost` when the claim is gone (the job was deleted, or another
/// replica took it over after this one missed its renewals).
pub struct Lease {
    pub cancel: CancellationToken,
    pub lost: CancellationToken,
    _renewing: AbortOnDropHandle<()>,
}

/// One renewal of a claim: `Some(cancel requested)`, or `None` when the claim is gone.
pub type Renewal = futures_util::future::BoxFuture<'static, Result<Option<bool>, sqlx::Error>>;

impl Lease {
    /// Keeps the claim on `job` (named in logs) with `renew`.
    pub fn keep(
        state: &crate::AppState,
        job: String,
        renew: impl Fn(crate::AppState) -> Renewal + Send + 'static,
    ) -> Self {
        let (cancel, lost) = (CancellationToken::new(), CancellationToken::new());
        let renewing = tokio::spawn(renew_until_lost(
            state.clone(),
            job,
            renew,
            cancel.clone(),
            lost.clone(),
        ));
        Self {
            cancel,
            lost,
            _renewing: AbortOnDropHandle::new(renewing),
        }
    }
}

async fn renew_until_lost(
    state: crate::AppState,
    job: String,
    renew: impl Fn(crate::AppState) -> Renewal,
    cancel: CancellationToken,
    lost: CancellationToken,
) {
    let mut wake = state.bus.subscribe();
    loop {
        until_renewal(&state, &mut wake).await;
        match renew(state.clone()).await {
            Ok(Some(false)) => {}
            Ok(Some(true)) => cancel.cancel(),
            Ok(None) => {
                lost.cancel();
                return;
            }
            // Postgres is briefly away: keep working, the lease has slack for two misses.
            Err(e) => tracing::warn!(error = %e, "renewing the lease of {job}"),
        }
    }
}

/// Waits until a job holder should renew its lease: a third of the lease, or sooner when
/// something happened to jobs (a cancel request is announced that way, so it acts at once).
async fn until_renewal(state: &crate::AppState, wake: &mut tokio::sync::broadcast::Receiver<Wake>) {
    let deadline = tokio::time::sleep(state.config.job_lease / 3);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return,
            received = wake.recv() => match received {
                Ok(Wake::Events(_)) => {}
                _ => return,
            },
        }
    }
}

/// Persists a job's output lines as events, in batches (one transaction per batch, not per
/// line), until every sender is gone; answers flushes once what came before is stored.
/// Returns the number of lines written.
pub async fn persist_lines(pool: PgPool, bus: EventBus, owner: OwnedOwner, mut rx: mpsc::Receiver<LogItem>) -> u64 {
    let mut written = 0;
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.recv().await {
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                LogItem::Line(stream, message) => batch.push((storable(stream), storable(message))),
                // Stop the batch here: the flush is answered once it is stored.
                LogItem::Flush(ack) => {
                    acks.push(ack);
                    break;
                }
            }
            if batch.len() < 500 {
                next = rx.try_recv().ok();
            }
        }
        let lines = std::mem::take(&mut batch);
        if !lines.is_empty() {
            store_with_retry(&pool, &bus, &owner, &lines).await;
            written += lines.len() as u64;
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
    written
}

async fn store_with_retry(pool: &PgPool, bus: &EventBus, owner: &OwnedOwner, lines: &[(String, String)]) {
    let mut delay = Duration::from_millis(100);
    // Postgres may be briefly unavailable: keep the lines and retry rather than drop them.
    loop {
        match append(pool, bus, owner, lines).await {
            Ok(()) => return,
            Err(e) if crate::store::is_transient(&e) && delay < Duration::from_secs(30) => {
                tracing::warn!(error = %e, app.name = %owner.app, "writing job output; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, app.name = %owner.app, "dropping {} lines of job output", lines.len());
                return;
            }
        }
    }
}

/// Output as Postgres can store it: a NUL character (binary output) becomes U+FFFD.
fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}

async fn append(
    pool: &PgPool,
    bus: &EventBus,
    owner: &OwnedOwner,
    lines: &[(String, String)],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    events::append(&mut tx, owner.borrow(), lines, None).await?;
    tx.commit().await?;
    bus.poke(crate::events::Wake::Events(owner.app.clone()));
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
