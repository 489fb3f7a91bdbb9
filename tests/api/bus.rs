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
    let connecting = std::sync::Arc::clone(&counts.connecting);
    let request = app
        .request(Method::GET, &format!("/apps/{name}/logs"))
        .header("accept", "text/event-stream")
        .header("since", "0")
        // The stream lasts the test, past the harness client's 30 s for a whole request.
        .timeout(Duration::from_secs(600));
    tokio::spawn(async move {
        let turn = connecting.acquire_owned().await.unwrap();
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
                let _ = lines.send(format!("{ENDED}: {}", chain(&e)));
                return;
            }
        };
        drop(turn);
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

/// `error` and its causes: reqwest's own text ("error sending request") says nothing of why.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// How many followers connect at once: a crowd arrives over seconds, not in one instant.
/// A thousand requests in one burst, in a test process whose runtime also serves them, on two
/// cores the rest of the suite keeps busy, waited past the server's header timeout (15 s,
/// slow-client protection) and were closed, which says nothing about the fan-out under test.
const CONNECTING: usize = 100;

/// What the followers of a test went through.
#[derive(Debug)]
struct Counts {
    /// Turns to connect (see [`CONNECTING`]).
    connecting: std::sync::Arc<tokio::sync::Semaphore>,
    /// Streams that were answered 200.
    connected: AtomicUsize,
    /// Connects answered 503 (and tried again).
    refused: AtomicUsize,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            connecting: std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTING)),
            connected: AtomicUsize::default(),
            refused: AtomicUsize::default(),
        }
    }
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

    // The server's pool (the bus's LISTEN has a connection of its own), held by the test.
    let held = app.state.pool.acquire().await.unwrap();
    assert_eq!(app.state.pool.size(), 1, "the pool is the held connection");
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

/// Every backend of the server terminated (as `pg_terminate_backend` or a Postgres restart
/// does), the LISTEN one and the pool's idle ones among them, again and again while lines are
/// written: the bus listens again at once, and the line written last reaches a follower in well
/// under the tails' 30 s poll. (The old code listened again through the shared pool, which
/// handed it its dead connections one a second, and asked the old listener whether it was back,
/// which kept a dead connection or choked on a notification that came during its query.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listen_connection_listens_again_at_once() {
    let app = TestApp::spawn_with(|config| config.db_connections = 20).await;
    app.create_app("relisten").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = follow(&app, "relisten", tx, std::sync::Arc::default());
    append(&app, "relisten", &["before".to_owned()]).await;
    let first = tokio::time::timeout(Duration::from_secs(30), next_line(&mut rx)).await;
    assert_eq!(first.expect("the first line"), "before");
    let options = app.state.pool.connect_options();
    let writing = tokio_util::sync::CancellationToken::new();
    // Writes a line every few ms (so notifications keep coming), reconnecting when terminated.
    let writer = {
        let (options, writing) = (options.clone(), writing.clone());
        tokio::spawn(async move {
            let owner = rack::store::events::Owner {
                app: "relisten",
                build: None,
                deployment: None,
            };
            let mut n = 0;
            while !writing.is_cancelled() {
                let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options).await else {
                    continue;
                };
                while !writing.is_cancelled() {
                    let line = [("system/test".to_owned(), format!("during {n}"))];
                    let written = async {
                        let mut tx = sqlx::Connection::begin(&mut conn).await?;
                        rack::store::events::append(&mut tx, owner, &line, None).await?;
                        tx.commit().await
                    };
                    if written.await.is_err() {
                        break;
                    }
                    n += 1;
                    // Pacing of the writes, not synchronisation.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    for round in 0..3 {
        // The pool full of idle connections, as on a busy server.
        let held: Vec<_> = futures_util::future::join_all((0..15).map(|_| app.state.pool.acquire())).await;
        drop(held);
        sqlx::query(
            "select pg_terminate_backend(pid) from pg_stat_activity
              where datname = current_database() and pid <> pg_backend_pid()",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        // Pacing between blows: the bus listens again while notifications flow.
        tokio::time::sleep(Duration::from_millis(1500 + 200 * round)).await;
    }
    writing.cancel();
    writer.await.unwrap();
    append(&app, "relisten", &["last".to_owned()]).await;
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if next_line(&mut rx).await == "last" {
                break;
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the last line did not come within 10 s (the tails poll every 30 s)"
    );
    follower.abort();
}
