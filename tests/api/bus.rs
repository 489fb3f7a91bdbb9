//! The event bus carries the events: a thousand subscribers of one app's log cost one read of
//! Postgres per batch on their replica, not one each; a subscriber that never reads delays
//! nobody; and one that falls behind catches up without losing a line, from its tail's window
//! in memory (no read of Postgres).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;

use crate::helpers::{TestApp, wait_for};

/// Appends `lines` to `app`'s log as one batch (as a deployment or a process writes them),
/// on a connection of its own: the writer is another process, not a user of the server's
/// pool (which the fan-out test keeps at its smallest).
async fn append(app: &TestApp, name: &str, lines: &[String]) {
    let options = app.state.pool.connect_options();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    let owner = rack::store::events::Owner {
        app: name,
        build: None,
        deployment: None,
    };
    let lines: Vec<(String, String)> = lines.iter().map(|l| ("system/test".to_owned(), l.clone())).collect();
    rack::store::events::append(&mut tx, owner, &lines, None).await.unwrap();
    tx.commit().await.unwrap();
}

/// What `follow` sends when its stream ends (or never started): a follower that stops early
/// fails the test at once, saying why, instead of leaving it waiting for lines.
const ENDED: &str = "\u{0}ended";

/// Follows `app`'s log over SSE; sends each line's text as it comes, and [`ENDED`] with the
/// reason if the stream ends. Like a browser's `EventSource`, it connects again when told to
/// (503 with `Retry-After`: a thousand connecting at once on a busy machine may get that).
fn follow(
    app: &TestApp,
    name: &str,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
    counts: std::sync::Arc<Counts>,
) -> tokio::task::JoinHandle<()> {
    let request = app
        .request(Method::GET, &format!("/apps/{name}/logs"))
        .header("accept", "text/event-stream")
        .header("since", "0")
        // The stream lasts the test, past the harness client's 30 s for a whole request.
        .timeout(Duration::from_secs(600));
    tokio::spawn(async move {
        let mut sent = request.try_clone().unwrap().send().await;
        while let Ok(response) = &sent
            && response.status() == 503
            && let Some(after) = response.headers().get("retry-after")
        {
            let seconds: u64 = after.to_str().unwrap().parse().unwrap();
            counts.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            sent = request.try_clone().unwrap().send().await;
        }
        let response = match sent {
            Ok(response) if response.status() == 200 => {
                counts.connected.fetch_add(1, Ordering::Relaxed);
                response
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                let _ = lines.send(format!("{ENDED}: {status} {text}"));
                return;
            }
            Err(e) => {
                let _ = lines.send(format!("{ENDED}: {e}"));
                return;
            }
        };
        let mut body = response.bytes_stream();
        let mut pending = String::new();
        let mut last = String::new();
        let ended = loop {
            let chunk = match body.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => break format!("{e:?}"),
                None => break format!("the stream ended after {last:?}"),
            };
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                if let Some(data) = line.trim_end().strip_prefix("data: ") {
                    if lines.send(data.to_owned()).is_err() {
                        return;
                    }
                    data.clone_into(&mut last);
                }
            }
        };
        let _ = lines.send(format!("{ENDED}: {ended}"));
    })
}

/// What the followers of a test went through.
#[derive(Debug, Default)]
struct Counts {
    /// Streams that were answered 200.
    connected: AtomicUsize,
    /// Connects answered 503 (and tried again).
    refused: AtomicUsize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} streams connected, {} connects answered 503 and tried again",
            self.connected.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed)
        )
    }
}

/// The next line a follower sent; fails the test if it was a follower ending.
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    let line = rx.recv().await.unwrap();
    assert!(!line.starts_with(ENDED), "a follower stopped early: {line}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_cost_one_read_per_batch() {
    const SUBSCRIBERS: usize = 1000;
    const BATCHES: usize = 20;
    let app = TestApp::spawn_with(|config| {
        config.max_streams_per_credential = 2 * SUBSCRIBERS;
        config.listener.max_unauthenticated = 0;
    })
    .await;
    app.create_app("fan").await;
    append(&app, "fan", &["before".to_owned()]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let counts = std::sync::Arc::<Counts>::default();
    let tasks: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| follow(&app, "fan", tx.clone(), std::sync::Arc::clone(&counts)))
        .collect();
    // Everybody has caught up once a line written now reached everybody.
    append(&app, "fan", &["ready".to_owned()]).await;
    let mut ready = 0;
    // Generous: the whole suite runs beside it on two cores.
    tokio::time::timeout(Duration::from_secs(240), async {
        while ready < SUBSCRIBERS {
            if next_line(&mut rx).await == "ready" {
                ready += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{ready} of {SUBSCRIBERS} subscribers caught up; {counts}"));
    eprintln!("{counts}");
    assert_eq!(app.state.bus.tails(), 1, "one tail for the app on this replica");

    let reads = app.state.bus.reads();
    let started = std::time::Instant::now();
    for batch in 0..BATCHES {
        append(&app, "fan", &[format!("line {batch}a"), format!("line {batch}b")]).await;
    }
    let mut got = 0;
    tokio::time::timeout(Duration::from_secs(240), async {
        while got < SUBSCRIBERS * BATCHES * 2 {
            if next_line(&mut rx).await.starts_with("line ") {
                got += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {got} of {} lines arrived", SUBSCRIBERS * BATCHES * 2));
    let used = app.state.bus.reads() - reads;
    eprintln!(
        "fan-out {SUBSCRIBERS}: {used} reads of Postgres for {} lines ({:.2} per line)",
        BATCHES * 2,
        used as f64 / (BATCHES * 2) as f64
    );
    // One read per announced batch (bursts coalesce into fewer), plus the tail's safety poll
    // every two seconds.
    let polls = started.elapsed().as_secs() / 2 + 1;
    assert!(
        used <= BATCHES as u64 + polls,
        "{used} reads of Postgres for {BATCHES} batches to {SUBSCRIBERS} subscribers"
    );
    for task in tasks {
        task.abort();
    }
    // The tail stops once nobody follows the log.
    wait_for(10, "the tail to stop", || async {
        (app.state.bus.tails() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_delays_nobody_and_one_that_lags_loses_nothing() {
    let app = TestApp::spawn().await;
    app.create_app("slow").await;
    // A stream nobody reads: its socket buffers fill, then its subscription stops being polled.
    let stuck = app
        .request(Method::GET, "/apps/slow/logs")
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(stuck.status(), 200);
    // A reader that keeps up, and one that reads only at the end.
    let (fast_tx, mut fast_rx) = tokio::sync::mpsc::unbounded_channel();
    let fast = follow(&app, "slow", fast_tx, std::sync::Arc::default());
    let late = app
        .request(Method::GET, "/apps/slow/logs")
        .header("accept", "text/plain")
        .header("since", "0")
        .send()
        .await
        .unwrap();
    let big = "x".repeat(1000);
    let total = 3000;
    let started = std::time::Instant::now();
    for chunk in 0..total / 100 {
        let lines: Vec<String> = (0..100).map(|i| format!("{} {big}", chunk * 100 + i)).collect();
        append(&app, "slow", &lines).await;
    }
    let mut next = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while next < total {
            let line = fast_rx.recv().await.unwrap();
            let n: usize = line.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(n, next, "lines out of order or lost");
            next += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the reader that keeps up got {next} of {total} lines"));
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    // The late reader gets every line, in order, though it fell far behind the broadcast.
    let mut body = late.bytes_stream();
    let mut text = String::new();
    let mut seen = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen < total {
            text.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                let n: usize = line.split(' ').next().unwrap().parse().unwrap();
                assert_eq!(n, seen, "the late reader lost or repeated a line");
                seen += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the late reader got {seen} of {total} lines"));
    drop(stuck);
    fast.abort();
}

/// A pool that stays busy past its acquire timeout while Postgres is up (every connection
/// held): the tail's read times out, finds Postgres reachable, and tries again until a
/// connection is free; the stream stays open and gets the line. (Ending every stream there was
/// the old behaviour; an outage still ends them, `outage.rs`.)
#[tokio::test]
async fn a_stream_rides_out_a_pool_that_stays_busy() {
    let app = TestApp::spawn_with(|config| config.db_connections = 2).await;
    app.create_app("busy").await;
    append(&app, "busy", &["before".to_owned()]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = follow(&app, "busy", tx, std::sync::Arc::default());
    let first = tokio::time::timeout(Duration::from_secs(30), next_line(&mut rx)).await;
    assert_eq!(first.expect("the backlog"), "before");

    // Every connection of the server's pool, held by the test: the one the bus's LISTEN
    // leaves.
    let held = app.state.pool.acquire().await.unwrap();
    assert_eq!(app.state.pool.size(), 2, "the LISTEN connection and the held one");
    let reads = app.state.bus.reads();
    append(&app, "busy", &["while busy".to_owned()]).await;
    // The tail tried, waited out the pool's 5 s, and tried again.
    wait_for(30, "the tail to read again after a timed-out read", || async {
        (app.state.bus.reads() >= reads + 2).then_some(())
    })
    .await;
    drop(held);
    let line = tokio::time::timeout(Duration::from_secs(30), next_line(&mut rx)).await;
    assert_eq!(line.expect("the line written while the pool was busy"), "while busy");
    follower.abort();
}

/// The next event of a subscription, its heartbeats skipped; fails the test if it ends or
/// nothing comes within 30 s.
async fn next_event<S>(sub: &mut S, what: &str) -> String
where
    S: futures_util::Stream<Item = Result<rack::events::Item, sqlx::Error>> + Unpin,
{
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match sub.next().await {
                Some(Ok(rack::events::Item::Event(event))) => return event.message,
                Some(Ok(rack::events::Item::Idle)) => {}
                other => panic!("the subscription ended waiting for {what}: {other:?}"),
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("{what} never came"))
}

/// Issue 23's cost: a subscriber that falls behind by more batches than the old broadcast held
/// (256, after which it read Postgres) catches up from its tail's window: not one read of
/// Postgres more than the tail's own.
#[tokio::test]
async fn a_subscriber_that_falls_behind_catches_up_from_memory() {
    const BATCHES: usize = 300;
    let app = TestApp::spawn().await;
    app.create_app("lag").await;
    append(&app, "lag", &["before".to_owned()]).await;
    let topic = rack::store::events::Topic::App {
        app: "lag".to_owned(),
        service: None,
        filter: None,
    };
    let bus = &app.state.bus;
    let mut keeping_up = bus.events(topic.clone(), 0, rack::events::Follow::UntilEnd);
    let mut lagging = bus.events(topic, 0, rack::events::Follow::UntilEnd);
    assert_eq!(next_event(&mut keeping_up, "the backlog").await, "before");
    assert_eq!(next_event(&mut lagging, "the backlog").await, "before");
    // A line written after their backlog reads reaches them only once the tail has started
    // (from its window, or from Postgres if it started past them): from then on the window
    // covers both.
    append(&app, "lag", &["ready".to_owned()]).await;
    assert_eq!(next_event(&mut keeping_up, "ready").await, "ready");
    assert_eq!(next_event(&mut lagging, "ready").await, "ready");
    let reads = bus.reads();
    for n in 0..BATCHES {
        append(&app, "lag", &[format!("line {n}")]).await;
        // Each its own batch: the tail has read it before the next is written.
        assert_eq!(next_event(&mut keeping_up, "a line").await, format!("line {n}"));
    }
    let tail_reads = bus.reads() - reads;
    assert!(
        tail_reads <= BATCHES as u64 + 2,
        "{tail_reads} reads of Postgres for {BATCHES} batches"
    );
    let reads = bus.reads();
    for n in 0..BATCHES {
        assert_eq!(next_event(&mut lagging, "a line").await, format!("line {n}"));
    }
    assert_eq!(bus.reads(), reads, "the lagging subscriber read Postgres");
}

/// A small deterministic generator (xorshift64*), for the soak's choices.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// What one follower of the soak went through.
#[derive(Debug, Default)]
struct Followed {
    /// The id of the last line it got.
    last: std::sync::atomic::AtomicI64,
    /// The first line out of order or repeated, if any.
    broken: std::sync::Mutex<Option<String>>,
    /// Streams it opened (each one a resume from `last`).
    connects: AtomicUsize,
    /// Connects answered otherwise than 200, or not at all (tried again).
    refused: AtomicUsize,
    /// The last such answer.
    refusal: std::sync::Mutex<String>,
    /// Whether it is reading a stream now (else waiting to connect, or connecting).
    streaming: std::sync::atomic::AtomicBool,
}

/// Follows `name`'s log over SSE as `EventSource` does: resumes with `Last-Event-ID` after
/// its stream ends (an error, a restart) or it was refused; leaves now and then of its own
/// accord, and all at once when `away` says so (long enough for the tail to stop). Checks each
/// line is the next of the log.
fn soak_follower(
    app: &TestApp,
    name: &str,
    followed: std::sync::Arc<Followed>,
    away: tokio::sync::watch::Receiver<u64>,
    stop: tokio_util::sync::CancellationToken,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let request = app
        .request(Method::GET, &format!("/apps/{name}/logs"))
        .header("accept", "text/event-stream")
        .timeout(Duration::from_secs(3600));
    tokio::spawn(async move {
        let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut away = away;
        while !stop.is_cancelled() {
            if away.has_changed().unwrap_or(false) {
                away.borrow_and_update();
                // Everybody leaves: the tail stops within 2 s.
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            let last = followed.last.load(Ordering::SeqCst);
            let sent = request
                .try_clone()
                .unwrap()
                .header("last-event-id", last.to_string())
                .send()
                .await;
            let response = match sent {
                Ok(response) if response.status() == 200 => response,
                // Refused (503 in an outage or while the pool is busy: after its Retry-After,
                // spread as a herd of clients spreads), or no answer: try again.
                other => {
                    followed.refused.fetch_add(1, Ordering::Relaxed);
                    let after = match &other {
                        Ok(response) => response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                            .unwrap_or(0),
                        Err(_) => 0,
                    };
                    *followed.refusal.lock().unwrap() = match other {
                        Ok(response) => response.status().to_string(),
                        Err(e) => format!("{e}"),
                    };
                    tokio::time::sleep(Duration::from_secs(after) + dice.millis(100, 1000)).await;
                    continue;
                }
            };
            followed.connects.fetch_add(1, Ordering::Relaxed);
            followed.streaming.store(true, Ordering::SeqCst);
            let mut body = response.bytes_stream();
            let mut pending = String::new();
            let mut id = None;
            // Leaves of its own accord after this many lines.
            let mut leave_after = dice.below(400);
            'stream: loop {
                let chunk = tokio::select! {
                    () = stop.cancelled() => return,
                    _ = away.changed() => break 'stream,
                    chunk = body.next() => chunk,
                };
                let Some(Ok(chunk)) = chunk else { break 'stream };
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    let line = line.trim_end();
                    if let Some(value) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                        id = value.trim().parse::<i64>().ok();
                    } else if line.starts_with("event:") {
                        // `end`, `shutdown`, `error`, `closed`: the stream is over.
                        break 'stream;
                    } else if line.is_empty() {
                        let Some(seq) = id.take() else { continue };
                        let last = followed.last.load(Ordering::SeqCst);
                        if seq != last + 1 {
                            let mut broken = followed.broken.lock().unwrap();
                            broken.get_or_insert_with(|| format!("after line {last} came line {seq}"));
                        }
                        followed.last.store(seq.max(last), Ordering::SeqCst);
                        if leave_after == 0 {
                            break 'stream;
                        }
                        leave_after -= 1;
                    }
                }
            }
            followed.streaming.store(false, Ordering::SeqCst);
        }
    })
}

/// Writes batches of 1 to 4 lines to `name`'s log on a connection of its own until `stop`,
/// reconnecting after any failure (an outage, its backend terminated).
fn soak_writer(url: String, name: &str, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<u64> {
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut dice = Dice(7);
        let mut written = 0_u64;
        while !stop.is_cancelled() {
            let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.is_cancelled() {
                let count = 1 + dice.below(4);
                let lines: Vec<(String, String)> = (0..count)
                    .map(|n| ("system/soak".to_owned(), format!("line {written}.{n}")))
                    .collect();
                let owner = rack::store::events::Owner {
                    app: &name,
                    build: None,
                    deployment: None,
                };
                let done = async {
                    let mut tx = sqlx::Connection::begin(&mut conn).await?;
                    rack::store::events::append(&mut tx, owner, &lines, None).await?;
                    tx.commit().await
                }
                .await;
                if done.is_err() {
                    break;
                }
                written += 1;
                tokio::time::sleep(dice.millis(2, 20)).await;
            }
        }
        written
    })
}

/// The chaos soak: followers of one log on a rack whose Postgres is restarted, whose
/// connections (the LISTEN one among them) are terminated, whose pool is held busy past its
/// timeout, and whose followers come and go (all of them at once sometimes, long enough for the
/// tail to stop and start again), while a writer writes. Every follower must end up with every
/// line, each once and in order (streams that end resume with `Last-Event-ID`), after the last
/// one is written, without a stall (30 s without a line to any follower behind). `SOAK_SECONDS` (default 10) and `SOAK_FOLLOWERS` (default 30) make it
/// longer and bigger: `scripts/soak`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_every_follower_gets_every_line_once_in_order() {
    let setting =
        |name: &str, default: u64| -> u64 { std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default) };
    let seconds = setting("SOAK_SECONDS", 10);
    let followers = setting("SOAK_FOLLOWERS", 30);
    let dir = crate::helpers::reachable_tempdir();
    let root = dir.path().join("pg");
    let start = |root: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || rack::postgres::Cluster::start(&root, rack::postgres::Durability::Durable))
            .await
            .unwrap()
            .unwrap()
    };
    let cluster = start(root.clone()).await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&cluster.connect_options("postgres"))
        .await
        .unwrap();
    rack::store::ensure_database(&mut conn, "rack").await.unwrap();
    drop(conn);
    let url = cluster.url("rack");
    let mut cluster = Some(cluster);
    let app = TestApp::spawn_on(&url, |config| {
        // The server's default pool (the harness's is smaller).
        config.db_connections = 20;
        config.max_streams_per_credential = usize::try_from(4 * followers).unwrap();
        config.listener.max_unauthenticated = 0;
    })
    .await;
    app.create_app("soak").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let (away_tx, away) = tokio::sync::watch::channel(0_u64);
    let tracks: Vec<std::sync::Arc<Followed>> = (0..followers).map(|_| std::sync::Arc::default()).collect();
    let tasks: Vec<_> = tracks
        .iter()
        .zip(0..)
        .map(|(track, seed)| {
            soak_follower(
                &app,
                "soak",
                std::sync::Arc::clone(track),
                away.clone(),
                stop.clone(),
                seed,
            )
        })
        .collect();
    let writing = tokio_util::sync::CancellationToken::new();
    let writer = soak_writer(url.clone(), "soak", writing.clone());

    let mut dice = Dice(11);
    let mut chaos = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while tokio::time::Instant::now() < deadline {
        // Pacing between blows, not synchronisation.
        tokio::time::sleep(dice.millis(300, 1200)).await;
        // Each blow once first (a short CI run gets them all), then at random.
        let blow = if chaos.len() < 4 {
            chaos.len() as u64
        } else {
            dice.below(4)
        };
        match blow {
            0 => {
                // Every connection to the database but this one: the server's pool and its
                // LISTEN connection (reconnected, it wakes every tail), the writer's.
                chaos.push("terminated connections");
                if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
                    let _ = sqlx::query(
                        "select pg_terminate_backend(pid) from pg_stat_activity
                          where datname = current_database() and pid <> pg_backend_pid()",
                    )
                    .execute(&mut conn)
                    .await;
                }
            }
            1 => {
                // The server's pool held past its acquire timeout.
                chaos.push("a busy pool");
                let mut held = Vec::new();
                for _ in 0..app.state.pool.options().get_max_connections() {
                    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(1), app.state.pool.acquire()).await {
                        held.push(conn);
                    }
                }
                tokio::time::sleep(dice.millis(1000, 6000)).await;
                drop(held);
            }
            2 => {
                chaos.push("a Postgres restart");
                let running = cluster.take().unwrap();
                tokio::task::spawn_blocking(move || running.stop())
                    .await
                    .unwrap()
                    .unwrap();
                tokio::time::sleep(dice.millis(200, 1500)).await;
                cluster = Some(start(root.clone()).await);
            }
            _ => {
                chaos.push("every follower away");
                away_tx.send_modify(|n| *n += 1);
            }
        }
    }
    writing.cancel();
    let batches = writer.await.unwrap();
    // What was committed, whatever the writer knew of its last commit.
    let last = wait_for(60, "Postgres after the soak", || async {
        rack::store::events::horizon(&app.state.pool, "soak").await.ok()
    })
    .await;
    // Done when every follower has the last line. A follower that stops getting lines is what
    // this looks for (a stall: 30 s without a line to anybody behind); a slow machine only makes
    // it take longer, up to ten minutes.
    let total = || -> i64 { tracks.iter().map(|t| t.last.load(Ordering::SeqCst)).sum() };
    let waiting = tokio::time::Instant::now();
    let (mut progress, mut moved) = (total(), tokio::time::Instant::now());
    let caught_up = loop {
        if tracks.iter().all(|t| t.last.load(Ordering::SeqCst) >= last) {
            break Ok(waiting.elapsed());
        }
        if moved.elapsed() > Duration::from_secs(30) || waiting.elapsed() > Duration::from_secs(600) {
            break Err(waiting.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if total() != progress {
            (progress, moved) = (total(), tokio::time::Instant::now());
        }
    };
    let connects: usize = tracks.iter().map(|t| t.connects.load(Ordering::Relaxed)).sum();
    let refused: usize = tracks.iter().map(|t| t.refused.load(Ordering::Relaxed)).sum();
    let mut refusals: Vec<String> = tracks.iter().map(|t| t.refusal.lock().unwrap().clone()).collect();
    refusals.sort();
    refusals.dedup();
    eprintln!(
        "soak: {seconds} s, {followers} followers, {batches} batches ({last} lines), {connects} streams, \
         {refused} connects refused ({refusals:?}), chaos: {chaos:?}"
    );
    for (n, track) in tracks.iter().enumerate() {
        assert_eq!(*track.broken.lock().unwrap(), None, "follower {n}");
    }
    let stuck: Vec<_> = tracks
        .iter()
        .filter(|t| t.last.load(Ordering::SeqCst) < last)
        .map(|t| {
            let state = if t.streaming.load(Ordering::SeqCst) {
                "streaming"
            } else {
                "connecting"
            };
            format!("at {} ({state})", t.last.load(Ordering::SeqCst))
        })
        .collect();
    assert!(
        caught_up.is_ok(),
        "{} of {followers} followers short of line {last} after {caught_up:?} (30 s without a line): {stuck:?}",
        stuck.len()
    );
    eprintln!(
        "soak: every follower had every line {:?} after the last write",
        caught_up.unwrap_or_default()
    );
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
}
