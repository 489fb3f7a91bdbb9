//! The bus's tails and subscribers against a log kept in memory, where a test decides when each
//! read of the log returns: the interleavings that lose a line under load on a real Postgres
//! (a tail starting while a subscriber catches up, a subscriber far behind) are forced here,
//! the same way every run.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::PgPool;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use super::tail::{IDLE_EVERY, Log, Reader, Tails, WindowLimits};
use super::{Filter, Follow, Item, Subscription, Wake};

/// An entry of the in-memory log.
#[derive(Debug, Clone)]
struct Entry {
    seq: i64,
    text: String,
    at: chrono::DateTime<chrono::Utc>,
}

/// A log in memory. Its next horizon read can be held (see [`MemLog::hold_next_horizon`]):
/// the tail's first read is its horizon, so that is where a test parks a starting tail.
#[derive(Debug, Clone, Default)]
struct MemLog {
    inner: Arc<Mem>,
}

#[derive(Debug, Default)]
struct Mem {
    entries: Mutex<Vec<Entry>>,
    /// Taken by the next horizon read: it says it arrived, then waits for the release.
    hold: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

impl MemLog {
    /// Commits `text` as the next entry; returns its seq.
    fn push(&self, text: &str) -> i64 {
        let mut entries = self.inner.entries.lock().unwrap();
        let seq = entries.last().map_or(0, |e| e.seq) + 1;
        entries.push(Entry {
            seq,
            text: text.to_owned(),
            at: chrono::Utc::now(),
        });
        seq
    }

    /// Parks the next horizon read: the first receiver fires when it arrives; it reads the log
    /// once the returned sender fires (or is dropped).
    fn hold_next_horizon(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (arrived_tx, arrived_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.inner.hold.lock().unwrap() = Some((arrived_tx, release_rx));
        (arrived_rx, release_tx)
    }

    fn after(&self, after: i64, limit: i64) -> Vec<Entry> {
        let entries = self.inner.entries.lock().unwrap();
        entries
            .iter()
            .filter(|e| e.seq > after)
            .take(usize::try_from(limit).unwrap())
            .cloned()
            .collect()
    }
}

#[async_trait::async_trait]
impl Log for MemLog {
    type Entry = Entry;

    fn key(&self) -> String {
        "mem".to_owned()
    }

    fn concerns(&self, wake: &Wake) -> bool {
        matches!(wake, Wake::Events(app) if app == "mem") || matches!(wake, Wake::All)
    }

    async fn horizon(&self, _: &PgPool) -> Result<i64, sqlx::Error> {
        let hold = self.inner.hold.lock().unwrap().take();
        if let Some((arrived, release)) = hold {
            let _ = arrived.send(());
            let _ = release.await;
        }
        Ok(self.inner.entries.lock().unwrap().last().map_or(0, |e| e.seq))
    }

    async fn read(&self, _: &PgPool, after: i64, limit: i64) -> Result<Vec<Entry>, sqlx::Error> {
        Ok(self.after(after, limit))
    }

    fn seq(entry: &Entry) -> i64 {
        entry.seq
    }

    fn at(entry: &Entry) -> chrono::DateTime<chrono::Utc> {
        entry.at
    }

    fn weight(entry: &Entry) -> usize {
        std::mem::size_of::<Entry>() + entry.text.len()
    }
}

/// Every entry of the in-memory log; `end` ends the subscription (a terminal event).
#[derive(Debug, Clone)]
struct Everything(MemLog);

#[async_trait::async_trait]
impl Filter<MemLog> for Everything {
    fn matches(&self, _: &Entry) -> bool {
        true
    }

    fn ends(&self, entry: &Entry) -> bool {
        entry.text == "end"
    }

    async fn read(&self, _: &PgPool, after: i64, limit: i64) -> Result<Vec<Entry>, sqlx::Error> {
        Ok(self.0.after(after, limit))
    }
}

/// One replica's bus over a [`MemLog`]: its tails, the wake-ups the LISTEN connection would
/// send, and a reader counting the reads of the log.
struct Bus {
    log: MemLog,
    reader: Reader,
    tails: Tails<MemLog>,
    wake: broadcast::Sender<Wake>,
    shutdown: CancellationToken,
}

impl Bus {
    fn new() -> Self {
        Self::with_window(WindowLimits::default())
    }

    fn with_window(limits: WindowLimits) -> Self {
        // Never connected: the log lives in memory, the pool only sizes the catch-up turns.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .connect_lazy_with(sqlx::postgres::PgConnectOptions::new().host("127.0.0.1").port(1));
        let reader = Reader::new(pool);
        let (wake, _) = broadcast::channel(1024);
        let shutdown = CancellationToken::new();
        Self {
            log: MemLog::default(),
            tails: Tails::new(reader.clone(), wake.clone(), shutdown.clone(), limits),
            reader,
            wake,
            shutdown,
        }
    }

    fn subscribe(&self, after: i64) -> Subscription<MemLog, Everything> {
        Subscription::new(
            self.reader.clone(),
            &self.tails,
            self.shutdown.clone(),
            self.log.clone(),
            Everything(self.log.clone()),
            after,
            Follow::UntilEnd,
        )
    }

    /// Commits `count` lines in one transaction (one announcement); returns the last seq.
    fn write_many(&self, count: usize) -> i64 {
        let mut last = 0;
        for _ in 0..count {
            last = self.log.push("x");
        }
        let _ = self.wake.send(Wake::Events("mem".to_owned()));
        last
    }

    /// Commits `text` and announces it, as a writer's NOTIFY does.
    fn write(&self, text: &str) -> i64 {
        let seq = self.log.push(text);
        let _ = self.wake.send(Wake::Events("mem".to_owned()));
        seq
    }

    /// Waits until the log's tail has read where it starts (a subscriber started it).
    async fn started(&self) {
        let waiting = tokio::time::Instant::now();
        while !self.tails.started("mem") {
            assert!(waiting.elapsed() < Duration::from_secs(5), "the tail never started");
            tokio::task::yield_now().await;
        }
    }

    fn reads(&self) -> u64 {
        self.reader.reads.load(Ordering::Relaxed)
    }
}

/// The next entry `sub` yields (heartbeats skipped), or a failure naming `what` if none comes
/// within a few heartbeats: a line committed after a subscriber's cursor must reach it within a
/// bounded time, with no later line needed to push it out.
async fn next_entry(sub: &mut Subscription<MemLog, Everything>, what: &str) -> Entry {
    let waited = tokio::time::timeout(3 * IDLE_EVERY + Duration::from_secs(1), async {
        loop {
            match sub.next().await {
                Some(Ok(Item::Event(entry))) => return entry,
                Some(Ok(Item::Idle)) => {}
                other => panic!("the subscription ended waiting for {what}: {other:?}"),
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("the subscriber never got {what}"))
}

/// Issue 23's lost line: a subscriber that caught up before its log's tail read its starting
/// point, while a line was committed between the two. The tail started past the line and never
/// broadcast it; the subscriber, its backlog read, waited for a batch that never came (until a
/// later line arrived). Here the tail's first read is parked until the subscriber has caught up
/// and the line is committed and announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_committed_while_the_tail_starts_reaches_a_subscriber_that_already_caught_up() {
    let bus = Bus::new();
    bus.write("before");
    let (arrived, release) = bus.log.hold_next_horizon();
    let mut sub = bus.subscribe(0);
    // The subscription reads nothing until polled: the read that arrives is the new tail's.
    tokio::time::timeout(Duration::from_secs(5), arrived)
        .await
        .expect("the tail to start")
        .unwrap();
    assert_eq!(next_entry(&mut sub, "its backlog").await.text, "before");
    bus.write("after");
    release.send(()).unwrap();
    assert_eq!(
        next_entry(&mut sub, "the line committed while its tail started")
            .await
            .seq,
        2
    );
}

/// Writes `count` lines numbered from `from`, each its own batch of the tail (`witness`, a
/// subscriber that keeps up, has it before the next is written).
async fn write_batches(bus: &Bus, witness: &mut Subscription<MemLog, Everything>, from: usize, count: usize) {
    for n in from..from + count {
        let seq = bus.write(&n.to_string());
        assert_eq!(next_entry(witness, &format!("line {n}")).await.seq, seq);
    }
}

/// Reads `count` lines numbered from `from` off `sub`: each once, in order.
async fn expect_lines(sub: &mut Subscription<MemLog, Everything>, from: usize, count: usize) {
    for n in from..from + count {
        assert_eq!(next_entry(sub, &format!("line {n}")).await.text, n.to_string());
    }
}

/// Issue 23's cost: a subscriber that fell behind by more batches than the old broadcast held
/// (256) catches up from the tail's window, without reading the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_catches_up_from_the_window_without_reading_the_log() {
    let bus = Bus::new();
    let mut witness = bus.subscribe(0);
    // A tail that starts after a line was written sends its subscribers to the log for it (the
    // case of the first test): here it starts first.
    bus.started().await;
    let reads = bus.reads();
    let mut lagging = bus.subscribe(0);
    write_batches(&bus, &mut witness, 0, 1).await;
    expect_lines(&mut lagging, 0, 1).await;
    write_batches(&bus, &mut witness, 1, 600).await;
    // Only the tail read the log: once per batch (and, rarely, once more when a wake-up came
    // during a read).
    let tail_reads = bus.reads() - reads;
    assert!((601..=700).contains(&tail_reads), "{tail_reads} reads for 601 batches");
    let reads = bus.reads();
    expect_lines(&mut lagging, 1, 600).await;
    assert_eq!(bus.reads(), reads, "the lagging subscriber read the log");
    // A resume from a cursor the window holds reads nothing either.
    let mut resumed = bus.subscribe(300);
    expect_lines(&mut resumed, 300, 301).await;
    assert_eq!(bus.reads(), reads, "the resumed subscriber read the log");
}

/// A subscriber that fell out of a small window catches up from the log, then from the window
/// again: every line once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_the_window_reads_the_log_and_loses_nothing() {
    let bus = Bus::with_window(WindowLimits {
        batches: 4,
        bytes: usize::MAX,
    });
    let mut witness = bus.subscribe(0);
    let mut lagging = bus.subscribe(0);
    write_batches(&bus, &mut witness, 0, 1).await;
    expect_lines(&mut lagging, 0, 1).await;
    write_batches(&bus, &mut witness, 1, 20).await;
    let reads = bus.reads();
    expect_lines(&mut lagging, 1, 20).await;
    assert!(bus.reads() > reads, "the lines it missed are only in the log");
    write_batches(&bus, &mut witness, 21, 3).await;
    expect_lines(&mut lagging, 21, 3).await;
    // The byte limit alone drops batches too.
    let bus = Bus::with_window(WindowLimits {
        batches: usize::MAX,
        bytes: 1,
    });
    let mut witness = bus.subscribe(0);
    let mut lagging = bus.subscribe(0);
    write_batches(&bus, &mut witness, 0, 5).await;
    expect_lines(&mut lagging, 0, 5).await;
}

/// A tail stops once its last subscriber left; a subscriber that comes back later with its
/// cursor starts a new tail (which begins at the log's horizon) and gets what was written in
/// between from the log, then the new lines from the window: every line once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_that_stopped_and_started_again_loses_nothing() {
    let bus = Bus::new();
    let mut first = bus.subscribe(0);
    write_batches(&bus, &mut first, 0, 3).await;
    drop(first);
    let stopping = tokio::time::Instant::now();
    while !bus.tails.is_empty() {
        assert!(stopping.elapsed() < 3 * IDLE_EVERY, "the tail never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.write("3");
    let mut witness = bus.subscribe(4);
    let mut back = bus.subscribe(3);
    write_batches(&bus, &mut witness, 4, 3).await;
    expect_lines(&mut back, 3, 4).await;
}

/// A small deterministic generator (xorshift64*): the schedules below are the same every run.
struct Schedule(u64);

impl Schedule {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33;
        usize::try_from(x).unwrap() % n
    }
}

/// One subscriber of the random schedules: where it started, what it got last.
struct Follower {
    sub: Subscription<MemLog, Everything>,
    cursor: i64,
    got: i64,
}

impl Follower {
    /// Takes what `sub` yields for a moment (or until it is idle, or has `until`), checking
    /// each entry is the next one of the log.
    async fn take_a_little(&mut self, wait: Duration, until: i64) {
        while self.got < until
            && let Ok(item) = tokio::time::timeout(wait, self.sub.next()).await
        {
            match item {
                Some(Ok(Item::Event(entry))) => {
                    assert_eq!(entry.seq, self.got + 1, "from cursor {}: lost or repeated", self.cursor);
                    self.got = entry.seq;
                }
                Some(Ok(Item::Idle)) => return,
                other => panic!("a subscription ended: {other:?}"),
            }
        }
    }
}

/// Random schedules of writers (single lines and transactions of several), subscribers joining
/// at random cursors (in the window, before it, ahead of the tail), reading now and then or
/// not at all (lagging past small windows, by count or bytes), leaving, a tail's first read or
/// a catch-up's held while lines are written: each subscriber gets every line after its
/// cursor, once, in order, without a later line to push it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schedules_lose_and_repeat_nothing() {
    for seed in 1..=60_u64 {
        let mut rng = Schedule(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let limits = WindowLimits {
            batches: 1 + rng.below(8),
            bytes: if rng.below(2) == 0 {
                usize::MAX
            } else {
                100 * (1 + rng.below(10))
            },
        };
        let bus = Bus::with_window(limits);
        let mut last = 0;
        for _ in 0..rng.below(4) {
            last = bus.write_many(1 + rng.below(3));
        }
        let mut followers: Vec<Follower> = Vec::new();
        let mut held: Option<oneshot::Sender<()>> = None;
        for _ in 0..120 {
            match rng.below(10) {
                0..=2 => last = bus.write_many(1 + rng.below(4)),
                3 | 4 => {
                    let cursor = i64::try_from(rng.below(usize::try_from(last).unwrap() + 2)).unwrap();
                    followers.push(Follower {
                        sub: bus.subscribe(cursor),
                        cursor,
                        got: cursor,
                    });
                }
                5..=7 if !followers.is_empty() => {
                    let n = rng.below(followers.len());
                    followers[n].take_a_little(Duration::from_millis(1), i64::MAX).await;
                }
                8 if followers.len() > 1 => {
                    let n = rng.below(followers.len());
                    followers.swap_remove(n);
                }
                9 => match held.take() {
                    Some(release) => drop(release),
                    None => held = Some(bus.log.hold_next_horizon().1),
                },
                _ => {}
            }
        }
        drop(held);
        // All read at once, as their connections do: one left unpolled in the middle of a
        // catch-up would keep its turn from the others (the test's doing: a connection polls
        // its stream until the next item).
        let drains = followers.iter_mut().map(|follower| async move {
            let waiting = tokio::time::Instant::now();
            while follower.got < last {
                assert!(
                    waiting.elapsed() < 3 * IDLE_EVERY,
                    "seed {seed} ({limits:?}): from cursor {} got up to {} of {last}",
                    follower.cursor,
                    follower.got
                );
                follower.take_a_little(IDLE_EVERY, last).await;
            }
        });
        futures_util::future::join_all(drains).await;
    }
}
