//! Tails: one reader per log per replica. A log (an app's events, the rack's feed) that has
//! local subscribers gets one task that reads each new batch from Postgres once, when the bus
//! announces it, and hands the batch to every subscriber through a broadcast channel. So a line
//! costs one query per replica, not one per subscriber; a subscriber goes to Postgres itself
//! only to catch up (on a resume, after falling behind, or when it joined between two batches).
//!
//! A batch covers every entry of its log in `(after, last]`: a subscriber that has considered
//! everything up to `seen` and gets a batch with `after > seen` knows it missed something and
//! catches up from Postgres. The broadcast never waits for a slow subscriber: one that falls
//! more than [`CAPACITY`] batches behind is told so (`Lagged`) and catches up by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

use super::Wake;

/// Batches a subscriber may be behind before it must catch up from Postgres.
const CAPACITY: usize = 256;

/// How many entries a tail (or a catching-up subscriber) reads at a time.
pub const PAGE: i64 = 500;

/// A tail that heard nothing for this long reads Postgres anyway: a safety net only (a lost
/// LISTEN connection already wakes every tail when it is re-established), so it is rare.
pub const POLL_EVERY: Duration = Duration::from_secs(30);

/// A read of a tail or a catch-up that timed out on a busy pool is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// How long a read of an event log is retried while the pool is busy and Postgres is up.
const BUSY_LIMIT: Duration = Duration::from_secs(60);

/// How long the probe of [`Reader::reachable`] may take to connect.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// How long a subscriber waits for its turn to catch up before it gives up (and its stream
/// ends with an error the client resumes from).
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// A subscriber that got nothing for this long yields [`super::Item::Idle`] (transports send
/// their heartbeats from it; it costs no read).
pub const IDLE_EVERY: Duration = Duration::from_secs(2);

/// A sequence in Postgres that a tail can follow.
#[async_trait::async_trait]
pub trait Log: Clone + Send + Sync + 'static {
    type Entry: Clone + Send + Sync + 'static;

    /// What identifies the log among its kind (an app's name).
    fn key(&self) -> String;
    /// Whether `wake` may mean new entries.
    fn concerns(&self, wake: &Wake) -> bool;
    /// The seq of the last committed entry.
    async fn horizon(&self, pool: &PgPool) -> Result<i64, sqlx::Error>;
    /// Up to `limit` entries after seq `after`, in order.
    async fn read(&self, pool: &PgPool, after: i64, limit: i64) -> Result<Vec<Self::Entry>, sqlx::Error>;
    /// The seq of `entry`.
    fn seq(entry: &Self::Entry) -> i64;
    /// When `entry` was written.
    fn at(entry: &Self::Entry) -> chrono::DateTime<chrono::Utc>;
}

/// Every entry of a log in `(after, last]`, in order.
#[derive(Debug)]
pub struct Batch<T> {
    pub after: i64,
    pub last: i64,
    pub entries: Vec<T>,
    /// The log could not be read (Postgres is away): subscribers end, saying so, rather than
    /// wait silently; their clients reconnect and resume.
    pub failed: Option<String>,
}

/// The running tails of one kind of log, by key: each one's broadcast.
type Running<T> = Arc<Mutex<HashMap<String, broadcast::Sender<Arc<Batch<T>>>>>>;

/// The tails of one kind of log on this replica.
pub struct Tails<L: Log> {
    wake: broadcast::Sender<Wake>,
    shutdown: CancellationToken,
    running: Running<L::Entry>,
    reader: Reader,
}

impl<L: Log> std::fmt::Debug for Tails<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let running = self.running.lock().map(|r| r.len()).unwrap_or_default();
        f.debug_struct("Tails")
            .field("running", &running)
            .finish_non_exhaustive()
    }
}

impl<L: Log> Tails<L> {
    /// Tails that read through `reader` (which counts each read of Postgres).
    pub fn new(reader: Reader, wake: broadcast::Sender<Wake>, shutdown: CancellationToken) -> Self {
        Self {
            wake,
            shutdown,
            running: Arc::default(),
            reader,
        }
    }

    /// The batches of `log` from now on (starting its tail if it has none).
    pub fn subscribe(&self, log: L) -> broadcast::Receiver<Arc<Batch<L::Entry>>> {
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = log.key();
        if let Some(sender) = running.get(&key) {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(CAPACITY);
        running.insert(key.clone(), sender.clone());
        // Subscribed before its first read: no wake-up between the two is lost.
        let wake = self.wake.subscribe();
        tokio::spawn(tail(
            log,
            key,
            self.reader.clone(),
            wake,
            sender,
            self.running.clone(),
            self.shutdown.clone(),
        ));
        receiver
    }

    /// How many logs this replica tails now.
    pub fn len(&self) -> usize {
        self.running.lock().map(|r| r.len()).unwrap_or_default()
    }

    /// Whether this replica tails nothing now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads `log` once per announcement and broadcasts each batch, until it has no subscriber
/// left (then it removes itself) or the server stops.
async fn tail<L: Log>(
    log: L,
    key: String,
    reader: Reader,
    mut wake: broadcast::Receiver<Wake>,
    sender: broadcast::Sender<Arc<Batch<L::Entry>>>,
    running: Running<L::Entry>,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        // Gone quiet: nobody listens any more.
        {
            let mut running = running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if sender.receiver_count() == 0 {
                running.remove(&key);
                return;
            }
        }
        // A failure ends every stream of the log.
        match reader.persist(|| read_once(&log, &reader, last, &sender)).await {
            Ok(l) => last = Some(l),
            Err(e) => {
                tracing::warn!(error = %e, log = %key, "reading new events for local subscribers");
                let at = last.unwrap_or_default();
                let _ = sender.send(Arc::new(Batch {
                    after: at,
                    last: at,
                    entries: Vec::new(),
                    failed: Some(e.to_string()),
                }));
            }
        }
        let deadline = tokio::time::sleep(POLL_EVERY);
        tokio::pin!(deadline);
        // Subscribers that left are noticed within IDLE_EVERY, without reading anything.
        let mut idle = tokio::time::interval(IDLE_EVERY);
        idle.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
                    return;
                }
                () = &mut deadline => break,
                _ = idle.tick() => {
                    let mut running = running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if sender.receiver_count() == 0 {
                        running.remove(&key);
                        return;
                    }
                }
                received = wake.recv() => match received {
                    Ok(w) if log.concerns(&w) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
        // Announcements that came in a burst are one read.
        while let Ok(w) = wake.try_recv() {
            let _ = w;
        }
    }
}

/// The tail's read: the log's horizon when it has none yet (it starts from there), else what
/// came after `last`, broadcast. Returns the new last seq.
async fn read_once<L: Log>(
    log: &L,
    reader: &Reader,
    last: Option<i64>,
    sender: &broadcast::Sender<Arc<Batch<L::Entry>>>,
) -> Result<i64, sqlx::Error> {
    match last {
        None => reader.horizon(log).await,
        Some(after) => read_new(log, reader, after, sender).await,
    }
}

/// Reads and broadcasts everything after `after`; returns the new last seq.
async fn read_new<L: Log>(
    log: &L,
    reader: &Reader,
    mut after: i64,
    sender: &broadcast::Sender<Arc<Batch<L::Entry>>>,
) -> Result<i64, sqlx::Error> {
    loop {
        let entries = reader.read(log, after, PAGE).await?;
        let Some(last) = entries.last().map(L::seq) else {
            return Ok(after);
        };
        let full = i64::try_from(entries.len()).unwrap_or(i64::MAX) >= PAGE;
        if let Some(newest) = entries.last() {
            let lag = (chrono::Utc::now() - L::at(newest))
                .num_microseconds()
                .unwrap_or_default();
            reader
                .lag_micros
                .store(u64::try_from(lag).unwrap_or_default(), Ordering::Relaxed);
        }
        // No subscriber is fine: the tail notices and stops.
        let _ = sender.send(Arc::new(Batch {
            after,
            last,
            entries,
            failed: None,
        }));
        after = last;
        if !full {
            return Ok(after);
        }
    }
}

/// Reads a log's entries, counting each query.
#[derive(Debug, Clone)]
pub struct Reader {
    pub pool: PgPool,
    pub reads: Arc<AtomicU64>,
    /// The lag of the newest batch a tail read: from the commit of its last entry to now.
    pub lag_micros: Arc<AtomicU64>,
    /// Subscribers catching up at once. Without a bound, a thousand streams that resume (or
    /// fall behind) together queue a thousand reads for the pool: the tails and the API then
    /// wait past the pool's acquire timeout, and a tail that fails ends every stream of its
    /// log. Bounded, catch-ups wait their turn here (up to [`CATCH_UP_WAIT`]) and leave the
    /// rest of the pool to the tails and requests.
    catch_ups: Arc<Semaphore>,
}

impl Reader {
    /// A reader of `pool`, letting catch-ups use at most half the connections that the bus's
    /// LISTEN (which keeps one of the pool's for itself) leaves.
    pub fn new(pool: PgPool) -> Self {
        let connections = usize::try_from(pool.options().get_max_connections()).unwrap_or(usize::MAX);
        Self {
            pool,
            reads: Arc::new(AtomicU64::new(0)),
            lag_micros: Arc::new(AtomicU64::new(0)),
            catch_ups: Arc::new(Semaphore::new((connections.saturating_sub(1) / 2).max(1))),
        }
    }

    /// The log's horizon, then up to `limit` of the entries `filter` wants after `after`: a
    /// subscriber's catch-up, taking its turn among the others.
    pub async fn catch_up<L: Log, F: super::Filter<L>>(
        &self,
        log: &L,
        filter: &F,
        after: i64,
        limit: i64,
    ) -> Result<(i64, Vec<L::Entry>), sqlx::Error> {
        // Waiting long means Postgres is away (each read ahead of us waits out the pool's
        // timeout): give up as a read of our own would.
        let _turn = tokio::time::timeout(CATCH_UP_WAIT, self.catch_ups.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        // A failure ends the subscriber's stream.
        self.persist(|| async {
            let horizon = self.horizon(log).await?;
            let entries = self.read_filtered(filter, after, limit).await?;
            Ok((horizon, entries))
        })
        .await
    }

    /// Runs `read` until it succeeds, fails for good, or fails while Postgres cannot be
    /// reached. A read that timed out waiting for a busy pool (a thousand clients connecting
    /// at once) is tried again every [`RETRY_AFTER`] for up to [`BUSY_LIMIT`], as long as a
    /// fresh connection to Postgres can be made: the streams it serves ride out the burst. In
    /// an outage the probe fails at once and the error goes to the streams, which end saying
    /// so (clients resume when Postgres is back).
    async fn persist<T, R: Future<Output = Result<T, sqlx::Error>>>(
        &self,
        mut read: impl FnMut() -> R,
    ) -> Result<T, sqlx::Error> {
        let started = tokio::time::Instant::now();
        loop {
            match read().await {
                // A closed pool (the server stopping) stays closed.
                Err(e)
                    if crate::store::is_transient(&e)
                        && !matches!(e, sqlx::Error::PoolClosed)
                        && started.elapsed() < BUSY_LIMIT
                        && self.reachable().await =>
                {
                    tracing::debug!(error = %e, "reading an event log while Postgres is busy; trying again");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                done => return done,
            }
        }
    }

    /// Whether Postgres takes a new connection now (outside the pool, which may be full).
    async fn reachable(&self) -> bool {
        let options = self.pool.connect_options();
        let connecting = <sqlx::PgConnection as sqlx::Connection>::connect_with(&*options);
        match tokio::time::timeout(PROBE_WAIT, connecting).await {
            Ok(Ok(conn)) => {
                let _ = sqlx::Connection::close(conn).await;
                true
            }
            _ => false,
        }
    }

    /// The log's last committed seq.
    pub async fn horizon<L: Log>(&self, log: &L) -> Result<i64, sqlx::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        log.horizon(&self.pool).await
    }

    /// Up to `limit` entries of the log after `after`.
    pub async fn read<L: Log>(&self, log: &L, after: i64, limit: i64) -> Result<Vec<L::Entry>, sqlx::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        log.read(&self.pool, after, limit).await
    }

    /// Up to `limit` of the entries `filter` wants after `after`.
    pub async fn read_filtered<L: Log, F: super::Filter<L>>(
        &self,
        filter: &F,
        after: i64,
        limit: i64,
    ) -> Result<Vec<L::Entry>, sqlx::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        filter.read(&self.pool, after, limit).await
    }
}
