//! The chaos soak of the event streams: followers of one app's log on the three transports
//! (SSE, chunked text, websocket) spread over two replicas, while a writer writes and the soak
//! terminates every database connection (the LISTEN ones among them), restarts Postgres, holds
//! the servers' pools busy past their timeout, burns the CPUs, stalls some followers (they stop
//! reading, then read again) and sends every follower away long enough for the tails to stop.
//! Every follower must end up with every line, once each and in order, after the last write.
//! It prints one table: per transport, the followers, lines, streams, duplicates, gaps and the
//! worst delivery delay. CI runs it for 10 s with 30 followers; `scripts/soak` runs it longer
//! and bigger (`SOAK_SECONDS`, `SOAK_FOLLOWERS`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::Method;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{PASSWORD, TestApp, wait_for};

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

/// Milliseconds since the epoch: the writer stamps each line with it, a follower compares.
fn now_millis() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// How a follower reads the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// `text/event-stream`, resuming with `Last-Event-ID` as `EventSource` does.
    Sse,
    /// Chunked `text/plain` with `?ids=true`, resuming with `?after=`.
    Text,
    /// The websocket, with `?ids=true`, resuming with `?after=`.
    Socket,
}

impl Transport {
    const ALL: [Self; 3] = [Self::Sse, Self::Text, Self::Socket];

    fn name(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Text => "text",
            Self::Socket => "websocket",
        }
    }
}

/// What one follower of the soak went through.
#[derive(Debug, Default)]
struct Followed {
    /// The id of the last line it got.
    last: AtomicI64,
    /// Lines it got again (an id not above the last one).
    duplicates: AtomicU64,
    /// Lines it never got (skipped ids).
    gaps: AtomicU64,
    /// The first line out of order or repeated, if any: what to show when the soak fails.
    broken: std::sync::Mutex<Option<String>>,
    /// Lines it got.
    lines: AtomicU64,
    /// Streams it opened (each one a resume from `last`).
    connects: AtomicUsize,
    /// Connects answered otherwise than 200, or not at all (tried again).
    refused: AtomicUsize,
    /// The last such answer.
    refusal: std::sync::Mutex<String>,
    /// Whether it is reading a stream now (else waiting to connect, or connecting).
    streaming: AtomicBool,
    /// The longest from a line's write to its arrival, in ms, among lines written while this
    /// follower's stream was open (a catch-up after a reconnect is not a delivery delay), and
    /// when that line was written.
    worst: std::sync::Mutex<(u64, u64)>,
}

impl Followed {
    /// One line of the log arrived: checks it is the next, and measures its delay.
    fn got(&self, seq: i64, message: &str, opened: u64) {
        let last = self.last.load(Ordering::SeqCst);
        if seq <= last {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if seq > last + 1 {
            self.gaps
                .fetch_add(u64::try_from(seq - last - 1).unwrap_or(0), Ordering::Relaxed);
        }
        if seq != last + 1 {
            let mut broken = self.broken.lock().unwrap();
            broken.get_or_insert_with(|| format!("after line {last} came line {seq}"));
        }
        self.last.store(seq.max(last), Ordering::SeqCst);
        self.lines.fetch_add(1, Ordering::Relaxed);
        let written = message
            .rsplit_once(" @")
            .and_then(|(_, at)| at.trim().parse::<u64>().ok());
        if let Some(written) = written.filter(|&at| at >= opened) {
            let delay = now_millis().saturating_sub(written);
            let mut worst = self.worst.lock().unwrap();
            if delay > worst.0 {
                *worst = (delay, written);
            }
        }
    }
}

/// Where and how a follower connects.
struct Endpoint {
    transport: Transport,
    /// The HTTP request, less its cursor (SSE and text).
    request: Option<reqwest::RequestBuilder>,
    /// The server, for the websocket.
    addr: SocketAddr,
    path: String,
}

impl Endpoint {
    fn new(app: &TestApp, name: &str, transport: Transport) -> Self {
        let path = format!("/apps/{name}/logs");
        let request = match transport {
            Transport::Sse => Some(app.request(Method::GET, &path).header("accept", "text/event-stream")),
            Transport::Text => Some(
                app.request(Method::GET, &path)
                    .header("accept", "text/plain")
                    .query(&[("ids", "true")]),
            ),
            Transport::Socket => None,
        };
        Self {
            transport,
            request: request.map(|r| r.timeout(Duration::from_secs(3600))),
            addr: app.addr,
            path,
        }
    }

    /// Opens a stream resuming after `last`: its text as it comes, or why it was refused and
    /// how long the server asked to wait.
    async fn open(&self, last: i64) -> Result<BoxStream<'static, String>, (String, u64)> {
        if self.transport == Transport::Socket {
            let url = format!("ws://{}{}?ids=true&after={last}", self.addr, self.path);
            let mut request = url.into_client_request().unwrap();
            let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("convox:{PASSWORD}"));
            request
                .headers_mut()
                .insert("authorization", format!("Basic {auth}").parse().unwrap());
            let (socket, _) = tokio_tungstenite::connect_async(request)
                .await
                .map_err(|e| (e.to_string(), 0))?;
            // Text frames carry lines; an empty binary frame, a close or an error ends it.
            let frames = socket.take_while(|frame| {
                let more = matches!(frame, Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)));
                std::future::ready(more)
            });
            return Ok(frames
                .filter_map(|frame| async move {
                    match frame {
                        Ok(Message::Text(text)) => {
                            let mut text = text.to_string();
                            if !text.ends_with('\n') {
                                text.push('\n');
                            }
                            Some(text)
                        }
                        _ => None,
                    }
                })
                .boxed());
        }
        let request = self.request.as_ref().unwrap().try_clone().unwrap();
        let request = match self.transport {
            Transport::Sse => request.header("last-event-id", last.to_string()),
            _ => request.query(&[("after", last)]),
        };
        match request.send().await {
            Ok(response) if response.status() == 200 => Ok(response
                .bytes_stream()
                .take_while(|chunk| std::future::ready(chunk.is_ok()))
                .map(|chunk| String::from_utf8_lossy(&chunk.unwrap_or_default()).into_owned())
                .boxed()),
            // Refused (503 in an outage or while the pool is busy: after its Retry-After).
            Ok(response) => {
                let after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(0);
                Err((response.status().to_string(), after))
            }
            Err(e) => Err((e.to_string(), 0)),
        }
    }
}

/// One line of a stream, as a follower reads it.
enum Read {
    /// An event of the log: its id and text.
    Line(i64, String),
    /// The stream is over (SSE's `end`, `shutdown`, `error` or `closed` event).
    End,
    /// Nothing to act on (an SSE field still to complete, a comment, a line without an id).
    Nothing,
}

/// Reads the lines of one stream of one transport.
#[derive(Default)]
struct Reader {
    sse: bool,
    /// SSE: the id and data of the event being read.
    id: Option<i64>,
    data: String,
}

impl Reader {
    fn line(&mut self, line: &str) -> Read {
        if !self.sse {
            // `<id> <RFC3339> <stream> <message>`; lines without an id (an error, the
            // shutdown notice) come just before the stream ends.
            return match line.split_once(' ') {
                Some((id, rest)) => id
                    .parse::<i64>()
                    .ok()
                    .filter(|&id| id > 0)
                    .map_or(Read::Nothing, |id| Read::Line(id, rest.to_owned())),
                None => Read::Nothing,
            };
        }
        if let Some(value) = line.strip_prefix("id:") {
            self.id = value.trim().parse::<i64>().ok();
        } else if let Some(value) = line.strip_prefix("data:") {
            value.trim_start().clone_into(&mut self.data);
        } else if line.starts_with("event:") {
            return Read::End;
        } else if line.is_empty()
            && let Some(seq) = self.id.take()
        {
            return Read::Line(seq, std::mem::take(&mut self.data));
        }
        Read::Nothing
    }
}

/// Follows the log as its endpoint says: resumes after its stream ends (an error, a restart)
/// or it was refused; leaves now and then of its own accord, and all at once when `away` says
/// so (long enough for the tail to stop); if `stalls`, stops reading now and then for seconds
/// while its stream stays open, until `calm` (the end of the chaos: then it catches up).
fn soak_follower(
    endpoint: Endpoint,
    followed: Arc<Followed>,
    mut away: tokio::sync::watch::Receiver<u64>,
    stop: tokio_util::sync::CancellationToken,
    seed: u64,
    stalls: Option<tokio_util::sync::CancellationToken>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        while !stop.is_cancelled() {
            if away.has_changed().unwrap_or(false) {
                away.borrow_and_update();
                // Everybody leaves: the tail stops within 2 s.
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            let opened = now_millis();
            let mut chunks = match endpoint.open(followed.last.load(Ordering::SeqCst)).await {
                Ok(chunks) => chunks,
                Err((why, after)) => {
                    followed.refused.fetch_add(1, Ordering::Relaxed);
                    *followed.refusal.lock().unwrap() = why;
                    // Spread as a herd of clients spreads.
                    tokio::time::sleep(Duration::from_secs(after) + dice.millis(100, 1000)).await;
                    continue;
                }
            };
            followed.connects.fetch_add(1, Ordering::Relaxed);
            followed.streaming.store(true, Ordering::SeqCst);
            let mut reader = Reader {
                sse: endpoint.transport == Transport::Sse,
                ..Reader::default()
            };
            let mut pending = String::new();
            // Leaves of its own accord after this many lines.
            let mut leave_after = dice.below(400);
            'stream: loop {
                if stalls.as_ref().is_some_and(|calm| !calm.is_cancelled()) && dice.below(40) == 0 {
                    // Reads nothing for a while, its stream open: the server must neither
                    // block others on it nor lose its lines.
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(dice.millis(500, 5000)) => {}
                    }
                }
                let chunk = tokio::select! {
                    () = stop.cancelled() => return,
                    _ = away.changed() => break 'stream,
                    chunk = chunks.next() => chunk,
                };
                let Some(chunk) = chunk else { break 'stream };
                pending.push_str(&chunk);
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    match reader.line(line.trim_end_matches(['\n', '\r'])) {
                        Read::Line(seq, message) => {
                            followed.got(seq, &message, opened);
                            if leave_after == 0 {
                                break 'stream;
                            }
                            leave_after -= 1;
                        }
                        Read::End => break 'stream,
                        Read::Nothing => {}
                    }
                }
            }
            followed.streaming.store(false, Ordering::SeqCst);
        }
    })
}

/// Writes batches of 1 to 4 lines, each stamped with the time it was written, to `name`'s log
/// on a connection of its own until `stop`, reconnecting after any failure (an outage, its
/// backend terminated).
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
                let at = now_millis();
                let lines: Vec<(String, String)> = (0..count)
                    .map(|n| ("system/soak".to_owned(), format!("line {written}.{n} @{at}")))
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

/// Spins every CPU until `until`: the soak's busy loops.
fn burn_cpus(until: std::time::Instant) {
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    for _ in 0..cpus {
        std::thread::spawn(move || {
            let mut x = 0_u64;
            while std::time::Instant::now() < until {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        });
    }
}

/// The soak (see the module's header). Done when every follower has the last line; what it
/// looks for is a follower that stops getting lines (a stall: 10 s without a line to anybody
/// behind; the tails' safety-net poll is 30 s, so a lost wake-up shows), or a line out of
/// order, repeated or skipped.
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
    let configure = |config: &mut rack::config::Config| {
        // The server's default pool (the harness's is smaller).
        config.db_connections = 20;
        config.max_streams_per_credential = usize::try_from(4 * followers).unwrap();
        config.listener.max_unauthenticated = 0;
    };
    let replicas = [
        TestApp::spawn_on(&url, configure).await,
        TestApp::spawn_on(&url, configure).await,
    ];
    replicas[0].create_app("soak").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let (away_tx, away) = tokio::sync::watch::channel(0_u64);
    // Follower n: replica n % 2, transport (n / 2) % 3, stalling if n % 10 == 9.
    let plan: Vec<(usize, Transport, bool)> = (0..followers)
        .map(|n| {
            let n = usize::try_from(n).unwrap();
            (n % 2, Transport::ALL[(n / 2) % 3], n % 10 == 9)
        })
        .collect();
    let tracks: Vec<Arc<Followed>> = plan.iter().map(|_| Arc::default()).collect();
    // Cancelled when the chaos ends: the writer stops, stalling followers stop stalling.
    let writing = tokio_util::sync::CancellationToken::new();
    let tasks: Vec<_> = plan
        .iter()
        .zip(&tracks)
        .zip(0..)
        .map(|((&(replica, transport, stalls), track), seed)| {
            let endpoint = Endpoint::new(&replicas[replica], "soak", transport);
            let stalls = stalls.then(|| writing.clone());
            soak_follower(endpoint, Arc::clone(track), away.clone(), stop.clone(), seed, stalls)
        })
        .collect();
    let writer = soak_writer(url.clone(), "soak", writing.clone());

    const BLOWS: u64 = 5;
    let mut dice = Dice(11);
    let began = now_millis();
    // What happened when (ms after the start), for the record.
    let mut chaos: Vec<String> = Vec::new();
    let mut blows = 0_u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while tokio::time::Instant::now() < deadline || blows < BLOWS {
        // Pacing between blows, not synchronisation.
        tokio::time::sleep(dice.millis(300, 1200)).await;
        // Each blow once first (a short CI run gets them all), then at random.
        let blow = if blows < BLOWS { blows } else { dice.below(BLOWS) };
        blows += 1;
        let at = now_millis() - began;
        let mut push = |what: &str| chaos.push(format!("{what} at {at} ms"));
        match blow {
            0 => {
                // Every connection to the database but this one: the servers' pools and their
                // LISTEN connections (reconnected, they wake every tail), the writer's.
                push("terminated connections");
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
                // Both servers' pools held past their acquire timeout.
                push("busy pools");
                let mut held = Vec::new();
                for replica in &replicas {
                    for _ in 0..replica.state.pool.options().get_max_connections() {
                        if let Ok(Ok(conn)) =
                            tokio::time::timeout(Duration::from_secs(1), replica.state.pool.acquire()).await
                        {
                            held.push(conn);
                        }
                    }
                }
                tokio::time::sleep(dice.millis(1000, 6000)).await;
                drop(held);
            }
            2 => {
                push("a Postgres restart");
                let running = cluster.take().unwrap();
                tokio::task::spawn_blocking(move || running.stop())
                    .await
                    .unwrap()
                    .unwrap();
                tokio::time::sleep(dice.millis(200, 1500)).await;
                cluster = Some(start(root.clone()).await);
            }
            3 => {
                push("busy CPUs");
                let burning = dice.millis(1000, 4000);
                burn_cpus(std::time::Instant::now() + burning);
                tokio::time::sleep(burning).await;
            }
            _ => {
                push("every follower away");
                away_tx.send_modify(|n| *n += 1);
            }
        }
    }
    writing.cancel();
    let batches = writer.await.unwrap();
    // What was committed, whatever the writer knew of its last commit.
    let last = wait_for(60, "Postgres after the soak", || async {
        rack::store::events::horizon(&replicas[0].state.pool, "soak").await.ok()
    })
    .await;
    // A slow machine only makes catching up take longer, up to ten minutes.
    let total = || -> i64 { tracks.iter().map(|t| t.last.load(Ordering::SeqCst)).sum() };
    let waiting = tokio::time::Instant::now();
    let (mut progress, mut moved) = (total(), tokio::time::Instant::now());
    let caught_up = loop {
        if tracks.iter().all(|t| t.last.load(Ordering::SeqCst) >= last) {
            break Ok(waiting.elapsed());
        }
        if moved.elapsed() > Duration::from_secs(10) || waiting.elapsed() > Duration::from_secs(600) {
            break Err(waiting.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if total() != progress {
            (progress, moved) = (total(), tokio::time::Instant::now());
        }
    };
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }

    eprintln!(
        "soak: {seconds} s, 2 replicas, {batches} batches ({last} lines), chaos: {chaos:?}, \
         caught up {caught_up:?} after the last write"
    );
    eprintln!(
        "{:<10} {:>9} {:>7} {:>10} {:>8} {:>8} {:>10} {:>5} {:>14} {:>14}",
        "transport",
        "followers",
        "stalled",
        "lines",
        "streams",
        "refused",
        "duplicates",
        "gaps",
        "worst delay",
        "(stalled)"
    );
    eprintln!("(worst delay: from a line's write to its arrival, @ when it was written, ms after the start)");
    for transport in Transport::ALL {
        let rows: Vec<_> = plan
            .iter()
            .zip(&tracks)
            .filter(|((_, t, _), _)| *t == transport)
            .collect();
        let sum = |f: &dyn Fn(&Followed) -> u64| rows.iter().map(|(_, t)| f(t)).sum::<u64>();
        let worst = |stalled: bool| {
            rows.iter()
                .filter(|((_, _, s), _)| *s == stalled)
                .map(|(_, t)| *t.worst.lock().unwrap())
                .max()
                .map_or_else(String::new, |(delay, at)| {
                    format!("{delay}ms@{}", at.saturating_sub(began))
                })
        };
        eprintln!(
            "{:<10} {:>9} {:>7} {:>10} {:>8} {:>8} {:>10} {:>5} {:>14} {:>14}",
            transport.name(),
            rows.len(),
            rows.iter().filter(|((_, _, s), _)| *s).count(),
            sum(&|t| t.lines.load(Ordering::Relaxed)),
            sum(&|t| t.connects.load(Ordering::Relaxed) as u64),
            sum(&|t| t.refused.load(Ordering::Relaxed) as u64),
            sum(&|t| t.duplicates.load(Ordering::Relaxed)),
            sum(&|t| t.gaps.load(Ordering::Relaxed)),
            worst(false),
            worst(true),
        );
    }
    let mut refusals: Vec<String> = tracks.iter().map(|t| t.refusal.lock().unwrap().clone()).collect();
    refusals.sort();
    refusals.dedup();
    eprintln!("soak: refusals seen: {refusals:?}");

    for ((n, (replica, transport, _)), track) in plan.iter().enumerate().zip(&tracks) {
        assert_eq!(
            *track.broken.lock().unwrap(),
            None,
            "follower {n} ({} on replica {replica})",
            transport.name()
        );
    }
    let stuck: Vec<_> = plan
        .iter()
        .zip(&tracks)
        .filter(|(_, t)| t.last.load(Ordering::SeqCst) < last)
        .map(|((replica, transport, _), t)| {
            let state = if t.streaming.load(Ordering::SeqCst) {
                "streaming"
            } else {
                "connecting"
            };
            format!(
                "{} on replica {replica} at {} ({state})",
                transport.name(),
                t.last.load(Ordering::SeqCst)
            )
        })
        .collect();
    assert!(
        caught_up.is_ok(),
        "{} of {followers} followers short of line {last} after {caught_up:?} (10 s without a line): {stuck:?}",
        stuck.len()
    );
}
