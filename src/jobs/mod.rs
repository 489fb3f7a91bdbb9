//! Job workers: every replica runs a few; they claim work from Postgres (`FOR UPDATE SKIP
//! LOCKED`), hold it with a lease they renew, and always bring it to a terminal state.

pub mod builds;
pub mod capabilities;
pub mod deploys;
pub mod metrics;
pub mod rack_log;
pub mod replicas;
pub mod resources;
pub mod timers;
pub mod webhooks;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use sqlx::PgPool;

use crate::events::Wake;
use std::sync::atomic::Ordering;

use crate::runtime::{LogItem, LogReceiver};
use crate::store::events::{self, Owner};

/// Workers that found nothing look again this often (a NOTIFY wakes them sooner).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// What every worker runs until shutdown: claim a job with `claim` and run it to its end with
/// `run`; when there is none (or the claim failed), wait for work.
pub async fn claim_loop<Job, Claimed, Ran>(
    state: crate::AppState,
    kind: &'static str,
    claim: impl Fn(crate::AppState) -> Claimed,
    run: impl Fn(crate::AppState, Job) -> Ran,
) where
    Claimed: std::future::Future<Output = Result<Option<Job>, sqlx::Error>>,
    Ran: std::future::Future<Output = ()>,
{
    let mut wake = state.bus.subscribe();
    loop {
        if state.shutdown.is_cancelled() {
            return;
        }
        match claim(state.clone()).await {
            Ok(Some(job)) => {
                run(state.clone(), job).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "claiming a {kind}"),
        }
        if !wait_for_work(&state, &mut wake).await {
            return;
        }
    }
}

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
                Ok(Wake::Events(_) | Wake::Feed | Wake::RackLog) => {}
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
                Ok(Wake::Events(_) | Wake::Feed | Wake::RackLog) => {}
                _ => return,
            },
        }
    }
}

/// The stream of rack's own notes in an app's log.
pub const LOG_NOTES_STREAM: &str = crate::stream_names::RACK_LOG;

/// Persists a job's output lines as events, in batches (one transaction per batch, not per
/// line), until every sender is gone; answers flushes once what came before is stored. For a
/// lossy sink, says how many lines were dropped as soon as a write succeeds again. Returns the
/// number of lines written.
pub async fn persist_lines(pool: PgPool, owner: OwnedOwner, receiver: LogReceiver) -> u64 {
    let LogReceiver { mut rx, dropped } = receiver;
    let mut written = 0;
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.recv().await {
        let mut acks = Vec::new();
        let mut note = None;
        let mut cursor = None;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                LogItem::Line(stream, message) => batch.push((storable(stream), storable(message))),
                // Stop the batch here: the feed event follows the lines before it.
                LogItem::Process(stream, message, process) => {
                    batch.push((storable(stream), storable(message)));
                    note = Some(process);
                    break;
                }
                // Stop the batch here: the flush is answered once it is stored.
                LogItem::Flush(ack) => {
                    acks.push(ack);
                    break;
                }
                // Stop the batch here: the copy's position is stored with its lines.
                LogItem::Copied(copied) => {
                    let stream = storable(copied.stream);
                    batch.extend(copied.lines.into_iter().map(|line| (stream.clone(), storable(line))));
                    cursor = Some((copied.process, copied.position));
                    break;
                }
            }
            if batch.len() < 500 {
                next = rx.try_recv().ok();
            }
        }
        let mut lines = std::mem::take(&mut batch);
        if let Some(dropped) = &dropped {
            let missed = dropped.swap(0, Ordering::Relaxed);
            if missed > 0 {
                let note = format!("rack: {missed} lines of output were dropped while the log could not keep up");
                lines.insert(0, (LOG_NOTES_STREAM.to_owned(), note));
            }
        }
        if !lines.is_empty() || cursor.is_some() {
            let stored = store_with_retry(&pool, &owner, &lines, dropped.is_some(), cursor.as_ref()).await;
            if stored {
                written += lines.len() as u64;
            } else if let Some(dropped) = &dropped {
                dropped.fetch_add(lines.len() as u64, Ordering::Relaxed);
            }
        }
        if let Some(note) = note
            && let Err(e) = crate::store::feed::append(&pool, &note, owner.deployment).await
        {
            tracing::warn!(error = %e, app = %note.app, "recording a process event in the feed");
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
    written
}

/// Stores `lines`, retrying while Postgres is briefly away (about 30 s; for a lossy log, until
/// it is back: its writer never waits on this, and what it sends meanwhile is counted).
/// Returns whether they were stored.
async fn store_with_retry(
    pool: &PgPool,
    owner: &OwnedOwner,
    lines: &[(String, String)],
    patient: bool,
    cursor: Option<&(String, Option<String>)>,
) -> bool {
    let mut delay = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    loop {
        match append(pool, owner, lines, cursor).await {
            Ok(()) => return true,
            Err(e) if crate::store::is_transient(&e) && (patient || waited < Duration::from_secs(30)) => {
                tracing::warn!(error = %e, app.name = %owner.app, "writing job output; retrying");
                tokio::time::sleep(delay).await;
                waited += delay;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(error = %e, app.name = %owner.app, "dropping {} lines of job output", lines.len());
                return false;
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

/// Stores `lines`, and the position of the copy they came from (`cursor`: the process, and its
/// position or `None` to forget it) in the same transaction.
async fn append(
    pool: &PgPool,
    owner: &OwnedOwner,
    lines: &[(String, String)],
    cursor: Option<&(String, Option<String>)>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !lines.is_empty() {
        events::append(&mut tx, owner.borrow(), lines, None).await?;
    }
    if let Some((process, position)) = cursor {
        crate::store::log_cursors::set(&mut tx, &owner.app, process, position.as_deref()).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// An owned [`Owner`].
#[derive(Debug, Clone)]
pub struct OwnedOwner {
    pub app: String,
    pub build: Option<crate::ids::BuildId>,
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

/// Forgets audit entries and feed events past their retention (RACK_AUDIT_RETENTION_DAYS,
/// RACK_FEED_RETENTION_DAYS), once an hour, until the server stops (every replica does it;
/// deleting twice is harmless).
pub async fn prune_audit(state: crate::AppState) {
    use crate::rack_params::{AUDIT_RETENTION_DAYS, FEED_RETENTION_DAYS, days};
    loop {
        // `rack params set` may have changed them since the last round.
        let audit_retention = days(&state.pool, &state.config, &AUDIT_RETENTION_DAYS).await;
        let feed_retention = days(&state.pool, &state.config, &FEED_RETENTION_DAYS).await;
        match crate::store::audit::prune(&state.pool, audit_retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("pruned {n} audit entries past their retention"),
            Err(e) => tracing::warn!(error = %e, "pruning the audit log"),
        }
        match crate::store::feed::prune(&state.pool, feed_retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("pruned {n} feed events past their retention"),
            Err(e) => tracing::warn!(error = %e, "pruning the event feed"),
        }
        // Delivery logs live as long as the events they carried.
        if let Err(e) = crate::store::webhooks::prune(&state.pool, feed_retention).await {
            tracing::warn!(error = %e, "pruning webhook deliveries");
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
