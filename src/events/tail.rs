//! Tails: one reader per log per replica. A log (an app's events, the rack's feed) that has
//! local subscribers gets one task that reads each new batch from Postgres once, when the bus
//! announces it, and keeps it in the log's window: the recent batches, in memory, bounded by
//! count and bytes ([`WindowLimits`]). Subscribers take what they have not considered from the
//! window, so a line costs one query per replica, not one per subscriber; a subscriber goes to
//! Postgres itself only for what the window does not hold (its backlog, a resume from an old
//! cursor, or after falling behind the window).
//!
//! The window covers `(start, last]`: every entry of the log in that range is in it, in order,
//! and nothing else. The tail changes it only under its lock (it starts it at the log's
//! horizon, appends each batch it reads, drops the oldest over the limits) and then bumps a
//! version every subscriber watches. A subscriber compares its own `seen` with the window's
//! range each time it looks (level, not edge): `seen < start` sends it to Postgres, `seen <
//! last` gives it the batches past `seen`, else it waits for the version to change. Whatever the
//! interleaving of a subscriber's reads with the tail's, nothing committed after `seen` is
//! passed over: a tail that started (or restarted) past a subscriber's `seen` shows it as
//! `start`, which is the case the old broadcast could not tell (issue 23).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::Wake;

/// How many entries a tail (or a catching-up subscriber) reads at a time, and how many a
/// subscriber takes from the window at a time.
pub const PAGE: i64 = 500;

/// A tail that heard nothing for this long reads Postgres anyway: a safety net only (a lost
/// LISTEN connection already wakes every tail when it is re-established), so it is rare.
pub const POLL_EVERY: Duration = Duration::from_secs(30);

/// A read of a tail or a catch-up that timed out on a busy pool is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// How long a read of an event log is retried while the pool is busy and Postgres is up.
const BUSY_LIMIT: Duration = Duration::from_secs(60);

/// How long the probe of [`Reader::reachable`] may take to connect (generous: on a machine
/// whose CPUs are saturated, a new backend can take seconds to start).
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// How long a subscriber waits for its turn to catch up before it checks that Postgres is
/// still there (if not, its stream ends with an error the client resumes from).
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
    /// Roughly how many bytes `entry` holds in memory (what the window's byte limit counts).
    fn weight(entry: &Self::Entry) -> usize;
}

/// How much of its log a tail keeps in memory for subscribers that fell behind. A cursor older
/// than the window reads Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// The most batches (one read of the tail each).
    pub batches: usize,
    /// The most bytes of entries ([`Log::weight`]).
    pub bytes: usize,
}

impl Default for WindowLimits {
    fn default() -> Self {
        Self {
            batches: 4096,
            bytes: 8 << 20,
        }
    }
}

/// Every entry of a log in `(after, last]`, in order.
#[derive(Debug)]
pub struct Batch<T> {
    pub after: i64,
    pub last: i64,
    pub entries: Vec<T>,
    /// What the entries weigh ([`Log::weight`]).
    weight: usize,
}

/// What a tail has read of its log: see the module's documentation.
#[derive(Debug)]
struct Window<T> {
    /// Where the window begins; `None` until the tail has read the log's horizon.
    start: Option<i64>,
    /// Where it ends: the tail's cursor.
    last: i64,
    /// Covering `(start, last]` exactly: each batch's `after` is its predecessor's `last`.
    batches: VecDeque<Arc<Batch<T>>>,
    /// The sum of the batches' weights.
    bytes: usize,
    /// Reads of the log that failed for good, and the last one's reason: a subscriber that
    /// finds more than there were when it subscribed ends, saying why (its client resumes).
    failures: u64,
    failure: String,
    /// The tail stopped (the server is stopping, or the task ended): nothing more will come.
    stopped: bool,
}

/// One tail, shared by its task (the only writer of the window) and its subscribers.
#[derive(Debug)]
struct Shared<T> {
    window: Mutex<Window<T>>,
    /// Bumped after each change of the window. Each subscriber holds a receiver: their count
    /// is the tail's subscriber count.
    version: watch::Sender<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still consistent: every change
    // of it is a single step.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<T> Shared<T> {
    fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                start: None,
                last: 0,
                batches: VecDeque::new(),
                bytes: 0,
                failures: 0,
                failure: String::new(),
                stopped: false,
            }),
            version: watch::channel(()).0,
        }
    }

    /// Changes the window, then tells the subscribers (after the change: one that looked
    /// before it sees the new version, one that looks after it sees the change).
    fn change<R>(&self, change: impl FnOnce(&mut Window<T>) -> R) -> R {
        let changed = change(&mut lock(&self.window));
        self.version.send_modify(|()| {});
        changed
    }

    /// The tail's cursor, once it has one.
    fn cursor(&self) -> Option<i64> {
        let window = lock(&self.window);
        window.start.map(|_| window.last)
    }
}

/// What a subscriber finds in its tail's window after its `seen` (see [`Follower::after`]).
#[derive(Debug)]
pub enum Found<T> {
    /// The batches past `seen`, oldest first (at least one).
    Batches(Vec<Arc<Batch<T>>>),
    /// The window begins past `seen`: what lies between is only in Postgres.
    Gap,
    /// Nothing past `seen` yet: wait for [`Follower::changed`].
    Nothing,
    /// A read of the log failed for good: the subscriber ends, saying why.
    Failed(String),
    /// The tail stopped.
    Stopped,
}

/// A subscriber's hold on its log's tail.
#[derive(Debug)]
pub struct Follower<T> {
    shared: Arc<Shared<T>>,
    version: watch::Receiver<()>,
    /// The tail's failures when this subscriber joined.
    failures: u64,
}

impl<T> Follower<T> {
    /// Whether the window holds everything after `seen` now.
    pub fn covers(&self, seen: i64) -> bool {
        lock(&self.shared.window).start.is_some_and(|start| start <= seen)
    }

    /// What the window holds after `seen`: batches holding at least `budget` entries when it
    /// has that many (so a subscriber far behind takes it a page at a time). Marks the current
    /// version seen first, so a change made after this look wakes [`Follower::changed`].
    pub fn after(&mut self, seen: i64, budget: usize) -> Found<T> {
        self.version.borrow_and_update();
        let window = lock(&self.shared.window);
        if window.failures > self.failures {
            return Found::Failed(window.failure.clone());
        }
        if window.stopped {
            return Found::Stopped;
        }
        let Some(start) = window.start else {
            return Found::Nothing;
        };
        if window.last <= seen {
            return Found::Nothing;
        }
        if seen < start {
            return Found::Gap;
        }
        let first = window.batches.partition_point(|b| b.last <= seen);
        let mut batches = Vec::new();
        let mut entries = 0;
        for batch in window.batches.range(first..) {
            batches.push(Arc::clone(batch));
            entries += batch.entries.len();
            if entries >= budget {
                break;
            }
        }
        Found::Batches(batches)
    }

    /// Waits until the window changed since the last [`Follower::after`].
    pub async fn changed(&mut self) {
        // The sender lives in `shared`, which this follower holds: it never closes.
        let _ = self.version.changed().await;
    }
}

/// The running tails of one kind of log, by key.
type Running<T> = Arc<Mutex<HashMap<String, Arc<Shared<T>>>>>;

/// The tails of one kind of log on this replica.
pub struct Tails<L: Log> {
    wake: broadcast::Sender<Wake>,
    shutdown: CancellationToken,
    running: Running<L::Entry>,
    reader: Reader,
    limits: WindowLimits,
}

impl<L: Log> std::fmt::Debug for Tails<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tails")
            .field("running", &self.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<L: Log> Tails<L> {
    /// Tails that read through `reader` (which counts each read of Postgres) and keep windows
    /// within `limits`.
    pub fn new(
        reader: Reader,
        wake: broadcast::Sender<Wake>,
        shutdown: CancellationToken,
        limits: WindowLimits,
    ) -> Self {
        Self {
            wake,
            shutdown,
            running: Arc::default(),
            reader,
            limits,
        }
    }

    /// A hold on `log`'s tail (starting it if it has none).
    pub fn subscribe(&self, log: L) -> Follower<L::Entry> {
        // Under the lock a tail also removes itself with: a tail either counts this follower
        // before deciding it has none, or is gone from the map and a new one starts.
        let mut running = lock(&self.running);
        let key = log.key();
        let shared = match running.get(&key) {
            Some(shared) => Arc::clone(shared),
            None => {
                let shared = Arc::new(Shared::new());
                running.insert(key.clone(), Arc::clone(&shared));
                // Subscribed before its first read: no wake-up between the two is lost.
                let wake = self.wake.subscribe();
                tokio::spawn(tail(
                    log,
                    Tailing {
                        key,
                        shared: Arc::clone(&shared),
                        running: Arc::clone(&self.running),
                    },
                    self.reader.clone(),
                    wake,
                    self.shutdown.clone(),
                    self.limits,
                ));
                shared
            }
        };
        let version = shared.version.subscribe();
        let failures = lock(&shared.window).failures;
        Follower {
            shared,
            version,
            failures,
        }
    }

    /// Whether the tail of the log `key` has read where it starts.
    #[cfg(test)]
    pub(super) fn started(&self, key: &str) -> bool {
        lock(&self.running)
            .get(key)
            .is_some_and(|shared| shared.cursor().is_some())
    }

    /// How many logs this replica tails now.
    pub fn len(&self) -> usize {
        lock(&self.running).len()
    }

    /// Whether this replica tails nothing now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A running tail's place in its [`Tails`]; dropped when the task ends, however it ends (a
/// panic too): the tail leaves the map, so the next subscriber starts a new one, and its
/// followers learn it stopped instead of waiting on it forever.
struct Tailing<T> {
    key: String,
    shared: Arc<Shared<T>>,
    running: Running<T>,
}

impl<T> Tailing<T> {
    /// Leaves the map if nobody follows the tail any more (under the map's lock, which
    /// [`Tails::subscribe`] holds while it joins): whether it left.
    fn leave_if_unfollowed(&self) -> bool {
        let mut running = lock(&self.running);
        if self.shared.version.receiver_count() > 0 {
            return false;
        }
        running.remove(&self.key);
        true
    }
}

impl<T> Drop for Tailing<T> {
    fn drop(&mut self) {
        {
            let mut running = lock(&self.running);
            if running.get(&self.key).is_some_and(|s| Arc::ptr_eq(s, &self.shared)) {
                running.remove(&self.key);
            }
        }
        self.shared.change(|window| window.stopped = true);
    }
}

/// Reads `log` once per announcement into its window, until it has no subscriber left (then it
/// removes itself) or the server stops.
async fn tail<L: Log>(
    log: L,
    tailing: Tailing<L::Entry>,
    reader: Reader,
    mut wake: broadcast::Receiver<Wake>,
    shutdown: CancellationToken,
    limits: WindowLimits,
) {
    let shared = &tailing.shared;
    loop {
        // Gone quiet: nobody listens any more.
        if tailing.leave_if_unfollowed() {
            return;
        }
        // A failure ends every stream of the log (their clients resume).
        if let Err(e) = reader.persist(|| read_once(&log, &reader, shared, limits)).await {
            tracing::warn!(error = %e, log = %tailing.key, "reading new events for local subscribers");
            shared.change(|window| {
                window.failures += 1;
                window.failure = e.to_string();
            });
        }
        let deadline = tokio::time::sleep(POLL_EVERY);
        tokio::pin!(deadline);
        // Subscribers that left are noticed within IDLE_EVERY, without reading anything.
        let mut idle = tokio::time::interval(IDLE_EVERY);
        idle.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut deadline => break,
                _ = idle.tick() => {
                    if tailing.leave_if_unfollowed() {
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

/// The tail's read: the log's horizon when it has no cursor yet (the window starts there,
/// empty), else what came after its cursor, into the window. The cursor is the window's own
/// end, so a read tried again after a failure resumes where the last page it kept ended.
async fn read_once<L: Log>(
    log: &L,
    reader: &Reader,
    shared: &Shared<L::Entry>,
    limits: WindowLimits,
) -> Result<(), sqlx::Error> {
    let Some(mut after) = shared.cursor() else {
        let horizon = reader.horizon(log).await?;
        shared.change(|window| {
            window.start = Some(horizon);
            window.last = horizon;
        });
        return Ok(());
    };
    loop {
        let entries = reader.read(log, after, PAGE).await?;
        let Some(last) = entries.last().map(L::seq) else {
            return Ok(());
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
        let weight = entries.iter().map(L::weight).sum();
        let batch = Arc::new(Batch {
            after,
            last,
            entries,
            weight,
        });
        shared.change(|window| {
            window.last = last;
            window.bytes += batch.weight;
            window.batches.push_back(batch);
            // The oldest go first; the window may end up empty (a batch bigger than the
            // limit): it then begins at its end, and every subscriber behind reads Postgres.
            while window.batches.len() > limits.batches || window.bytes > limits.bytes {
                let Some(oldest) = window.batches.pop_front() else {
                    break;
                };
                window.bytes -= oldest.weight;
                window.start = Some(oldest.last);
            }
        });
        after = last;
        if !full {
            return Ok(());
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
        // A long wait means many subscribers ahead of us (a thousand reconnecting at once on a
        // busy machine) or Postgres away (each read ahead waits out the pool's timeout). Only
        // the second ends the stream, as a read of our own would: a queue is waited out.
        let _turn = loop {
            match tokio::time::timeout(CATCH_UP_WAIT, self.catch_ups.acquire()).await {
                Ok(turn) => break turn.map_err(|_| sqlx::Error::PoolClosed)?,
                Err(_) if self.reachable().await => {
                    tracing::debug!("a catch-up is still waiting for its turn; Postgres is up");
                }
                Err(_) => return Err(sqlx::Error::PoolTimedOut),
            }
        };
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
                    // A connection that died (Postgres restarted, its backend terminated) has
                    // left the pool with this failure, and the pool may hold more of them: try
                    // the next at once. Only a busy pool is worth waiting for.
                    if !connection_died(&e) {
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
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

/// Whether `error` says the connection it ran on is gone (and with it, out of the pool): its
/// socket failed, or the server terminated its backend (`57P01`, `57P02`: an administrator or
/// a crash of another backend).
fn connection_died(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(e) => matches!(e.code().as_deref(), Some("57P01" | "57P02")),
        _ => false,
    }
}
