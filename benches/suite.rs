//! rack's benchmark suite (`scripts/bench`): every figure measured from outside, as a user sees
//! it, against a release build of a real `rack server` on its embedded default, each beside a
//! baseline run in the same invocation on the same machine. Prints one table: figure, rack,
//! baseline, ratio, target.
//!
//! - upload: 1 GiB to rack vs to a minimal loopback HTTP sink that writes the body to a file
//!   (and renames it at the end, as rack makes an object appear), and rack's RSS growth;
//! - fan-out: 1 000 and 10 000 subscribers (SSE, websocket and NDJSON feed mixed) while a
//!   deployment runs: the spread of delivery of its last line, Postgres reads per line, the
//!   server's RSS and CPU and the client's own CPU; and again under load ("fanout-load": two
//!   busy loops on the machine meanwhile, where issue 23 saw a lagging subscriber go back to
//!   Postgres for every line it missed: reads per line at most 1.5, p99 spread under 100 ms);
//! - lists: releases and builds at 100 vs 100 000 rows, and `GET /apps/{app}` vs `pgbench -S`
//!   on the same Postgres;
//! - deploy overhead: promote → first streamed line, and a whole `rack deploy` split in parts,
//!   then again with unchanged source (the upload is skipped);
//! - container deploy: a whole `rack deploy` of a one-instance Dockerfile app (a changed file,
//!   the default health check) with podman: target ≤ 1.5 s;
//! - many apps: 200 apps each deploying once, 4 at a time, and the API's p99 meanwhile;
//! - resource deploy: the first deploy (build + rollout) of an app linking a postgres resource
//!   vs the same app without it (target: the resource adds under 5 s), and the idle memory
//!   (proportional set size) of one postgres and one redis resource.
//!
//! - router: the local runtime's router throughput with the traffic analysis' recording on vs
//!   off (target: within 5 %), and vs nginx `proxy_pass` in front of the same app
//!   (`suite/router.rs`).
//!
//! Settings: RACK_BENCH_UPLOAD_BYTES (1 GiB), RACK_BENCH_FANOUT ("1000,10000"),
//! RACK_BENCH_ROWS (100000), RACK_BENCH_APPS (200), RACK_BENCH_ONLY (comma-separated sections).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};

#[path = "suite/router.rs"]
mod router;

const PASSWORD: &str = "bench";

/// One line of the table.
struct Row {
    figure: String,
    rack: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

fn row(figure: impl Into<String>, rack: impl Into<String>, baseline: impl Into<String>) -> Row {
    Row {
        figure: figure.into(),
        rack: rack.into(),
        baseline: baseline.into(),
        ratio: String::new(),
        target: String::new(),
        met: None,
    }
}

impl Row {
    fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = if ratio < 0.1 {
            format!("{ratio:.4}x")
        } else {
            format!("{ratio:.2}x")
        };
        self
    }

    fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wanted(section: &str) -> bool {
    match std::env::var("RACK_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == section),
        Err(_) => true,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rack::tls::install_provider();
    raise_fd_limit();
    let mut rows = Vec::new();
    let started = Instant::now();
    if wanted("upload") {
        rows.extend(upload().await.context("upload")?);
    }
    if wanted("fanout") {
        for n in std::env::var("RACK_BENCH_FANOUT")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .filter_map(|n| n.trim().parse::<usize>().ok())
        {
            rows.extend(fanout(n, false).await.with_context(|| format!("fan-out to {n}"))?);
        }
    }
    if wanted("fanout-load") {
        for n in std::env::var("RACK_BENCH_FANOUT")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .filter_map(|n| n.trim().parse::<usize>().ok())
        {
            rows.extend(
                fanout(n, true)
                    .await
                    .with_context(|| format!("fan-out to {n} under load"))?,
            );
        }
    }
    if wanted("lists") {
        rows.extend(lists().await.context("lists")?);
    }
    if wanted("deploy") {
        rows.extend(deploy_overhead().await.context("deploy overhead")?);
    }
    if wanted("container-deploy") {
        rows.extend(container_deploy().await.context("container deploy")?);
    }
    if wanted("apps") {
        rows.extend(many_apps().await.context("many apps")?);
    }
    if wanted("resource-deploy") {
        rows.extend(resource_deploy().await.context("resource deploy")?);
    }
    if wanted("router") {
        rows.extend(router::router_throughput().await.context("router throughput")?);
    }
    print_table(&rows);
    println!("({:.0} s in all)", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_table(rows: &[Row]) {
    let header = ["figure", "rack", "baseline", "ratio", "target"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let target = match r.met {
                Some(true) => format!("{} ✓", r.target),
                Some(false) => format!("{} ✗", r.target),
                None => r.target.clone(),
            };
            [
                r.figure.clone(),
                r.rack.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                target,
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cols: [&str; 5]| {
        let cols: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        println!("| {} |", cols.join(" | "));
    };
    println!();
    println!("date: {}", chrono::Utc::now().format("%Y-%m-%d"));
    line(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4]]);
    }
}

/// Lets the bench (and the server it starts) hold 10 000 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test.

/// A `rack server` (release build) on its embedded default, in a data directory of its own.
struct Server {
    child: Child,
    addr: SocketAddr,
    data: tempfile::TempDir,
    http: reqwest::Client,
}

impl Server {
    async fn start() -> anyhow::Result<Self> {
        let data = tempfile::Builder::new().prefix("rack-bench").tempdir()?;
        // The embedded cluster runs as `postgres` when rack is root: it must reach its directory.
        let _ = std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(env!("CARGO_BIN_EXE_rack"))
            .arg("server")
            .env("RACK_BIND", addr.to_string())
            .env("RACK_DATA", data.path().join("rack"))
            .env("RACK_PASSWORD", PASSWORD)
            .env("RACK_MAX_UPLOAD_BYTES", (4u64 << 30).to_string())
            .env("RACK_MAX_STREAMS_PER_CREDENTIAL", "0")
            .env("RACK_MAX_UNAUTHENTICATED_CONNECTIONS", "0")
            .env("RACK_AUTH_FAILURES", "0")
            .env("RACK_BUILD_WORKERS", "4")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
        let server = Self {
            child,
            addr,
            data,
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = server.get("/system").send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(server);
            }
            anyhow::ensure!(Instant::now() < deadline, "rack server did not start within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.url(path))
            .basic_auth("rack", Some(PASSWORD))
            .header("accept", "application/json")
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .basic_auth("rack", Some(PASSWORD))
            .header("accept", "application/json")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The database URL of the embedded cluster (over its private socket; root may use it).
    fn database_url(&self) -> String {
        format!(
            "postgres://postgres@localhost/rack?host={}",
            self.data.path().join("rack/postgres/run").display()
        )
    }

    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.get("/metrics").send().await?.error_for_status()?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    async fn create_app(&self, name: &str) -> anyhow::Result<()> {
        self.post("/apps")
            .form(&[("name", name)])
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Uploads `tarball` and builds it; returns the release.
    async fn build(&self, app: &str, tarball: &[u8]) -> anyhow::Result<String> {
        let key = format!("src/{}.tgz", uuid::Uuid::new_v4());
        self.post(&format!("/apps/{app}/objects/{key}"))
            .header("content-type", "application/octet-stream")
            .body(tarball.to_vec())
            .send()
            .await?
            .error_for_status()?;
        let build: serde_json::Value = self
            .post(&format!("/apps/{app}/builds"))
            .form(&[("url", format!("object://{app}/{key}"))])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = build["id"].as_str().context("a build id")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let build: serde_json::Value = self
                .get(&format!("/apps/{app}/builds/{id}"))
                .send()
                .await?
                .json()
                .await?;
            match build["status"].as_str() {
                Some("complete") => return Ok(build["release"].as_str().context("a release")?.to_owned()),
                Some("failed") => anyhow::bail!("build {id} failed: {}", build["reason"]),
                _ => {}
            }
            anyhow::ensure!(Instant::now() < deadline, "build {id} did not end");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new release of `app` with `env` (same build as its last).
    async fn release(&self, app: &str, env: &str) -> anyhow::Result<String> {
        let release: serde_json::Value = self
            .post(&format!("/apps/{app}/releases"))
            .form(&[("env", env)])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(release["id"].as_str().context("a release id")?.to_owned())
    }

    /// Promotes and follows the rollout to its end; returns the time to the first line and the
    /// whole time.
    async fn promote(&self, app: &str, release: &str) -> anyhow::Result<(Duration, Duration)> {
        let started = Instant::now();
        let response = self
            .http
            .post(self.url(&format!("/apps/{app}/releases/{release}/promote")))
            .basic_auth("rack", Some(PASSWORD))
            .form(&[("follow", "true")])
            .send()
            .await?
            .error_for_status()?;
        let mut body = response.bytes_stream();
        let mut first = None;
        let mut text = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if first.is_none() && !chunk.is_empty() {
                first = Some(started.elapsed());
            }
            text.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&text);
        anyhow::ensure!(text.ends_with("OK\n"), "the rollout of {release} failed:\n{text}");
        Ok((first.unwrap_or_default(), started.elapsed()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Server {
    /// Stops the server (once; dropping it does too).
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM: the server stops its embedded cluster and its processes.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A source tarball of one service that is healthy as soon as it starts.
fn quick_app() -> Vec<u8> {
    tarball(&[(
        "convox.yml",
        "services:\n  web:\n    command: sleep 100000\n    health:\n      grace: 0\n",
    )])
}

fn tarball(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, body.as_bytes())
            .expect("in memory");
    }
    builder.into_inner().and_then(|gz| gz.finish()).expect("in memory")
}

/// A `/proc/<pid>/status` memory field, in MiB.
fn memory_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of the server and every process under it (its Postgres, its app processes).
fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = cpu_seconds(&pid.to_string());
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            total += tree_cpu_seconds(child);
        }
    }
    total
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn ms(d: f64) -> String {
    format!("{:.1} ms", d * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// Upload.

async fn upload() -> anyhow::Result<Vec<Row>> {
    let bytes: u64 = env_or("RACK_BENCH_UPLOAD_BYTES", 1u64 << 30);
    let server = Server::start().await?;
    let file = server.data.path().join("upload.bin");
    write_file(&file, bytes)?;
    let sink_dir = server.data.path().join("sink");
    std::fs::create_dir_all(&sink_dir)?;
    let sink = start_sink(sink_dir).await?;
    server.create_app("bench").await?;
    let rss_before = memory_mib(server.pid(), "VmRSS:");
    let (mut raw, mut rack) = (Vec::new(), Vec::new());
    // Each upload starts with nothing waiting to be written back (`sync`): otherwise one pays
    // for the writeback of the one before (or of the build that just ran), and the figures
    // swing by 2x from run to run.
    for round in 0..5 {
        nix::unistd::sync();
        raw.push(send_file(&server.http, &format!("http://{sink}/sink/{round}"), &file, bytes).await?);
        let _ = std::fs::remove_file(server.data.path().join(format!("sink/{round}")));
        nix::unistd::sync();
        let url = server.url(&format!("/apps/bench/objects/bench-{round}.bin"));
        rack.push(send_file(&server.http, &url, &file, bytes).await?);
        server
            .http
            .delete(server.url(&format!("/apps/bench/objects/bench-{round}.bin")))
            .basic_auth("rack", Some(PASSWORD))
            .send()
            .await?;
    }
    let peak = memory_mib(server.pid(), "VmHWM:");
    let mib = bytes as f64 / (1024.0 * 1024.0);
    let raw = mib / percentile(&sorted(raw), 0.5);
    let rack = mib / percentile(&sorted(rack), 0.5);
    let growth = peak - rss_before;
    Ok(vec![
        row(
            format!("upload {mib:.0} MiB (MiB/s, median of 5)"),
            format!("{rack:.0}"),
            format!("{raw:.0} (sink to disk)"),
        )
        .ratio(rack / raw)
        .target("≥ 0.8x", rack / raw >= 0.8),
        row("upload: server RSS growth", format!("{growth:.1} MiB"), "").target("≤ 64 MiB", growth <= 64.0),
    ])
}

/// A file of `bytes` pseudo-random bytes (incompressible enough that nothing is shortcut).
fn write_file(path: &std::path::Path, bytes: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()
}

async fn send_file(client: &reqwest::Client, url: &str, file: &std::path::Path, bytes: u64) -> anyhow::Result<f64> {
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::open(file).await?,
        256 * 1024,
    ));
    let started = Instant::now();
    client
        .post(url)
        .basic_auth("rack", Some(PASSWORD))
        .header("content-type", "application/octet-stream")
        .header("content-length", bytes)
        .body(body)
        .send()
        .await?
        .error_for_status()?;
    Ok(started.elapsed().as_secs_f64())
}

/// The baseline: a loopback HTTP server that writes each body to a temporary file and renames
/// it into place, and nothing else (as nginx's `client_body_in_file_only`: no fsync; rack's
/// local object store does not fsync either).
async fn start_sink(dir: std::path::PathBuf) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let dir = Arc::new(dir);
    let app = axum::Router::new().route(
        "/sink/{name}",
        axum::routing::post(
            |axum::extract::Path(name): axum::extract::Path<String>,
             axum::extract::State(dir): axum::extract::State<Arc<std::path::PathBuf>>,
             body: axum::body::Body| async move {
                use tokio::io::AsyncWriteExt;
                let partial = dir.join(format!("{name}.partial"));
                // Large writes: one blocking write per MiB, not per network chunk.
                let file = tokio::fs::File::create(&partial).await.expect("a sink file");
                let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
                let mut stream = body.into_data_stream();
                let mut total = 0usize;
                while let Some(Ok(chunk)) = stream.next().await {
                    total += chunk.len();
                    file.write_all(&chunk).await.expect("writing the sink file");
                }
                file.flush().await.expect("flush");
                tokio::fs::rename(&partial, dir.join(name)).await.expect("rename");
                total.to_string()
            },
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(dir),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------------
// Fan-out.

/// When each subscriber got the deployment's last line, and how many lines it got.
#[derive(Default)]
struct Deliveries {
    at: Vec<Instant>,
    /// Lines of the app log, and feed events, delivered (summed over subscribers).
    log_lines: u64,
    feed_lines: u64,
}

/// Two threads spinning until dropped: the machine busy beside rack, as in issue 23.
struct BusyLoops {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start(count: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..count)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0_u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// `count` subscribers of a deployment's lines; with `load`, two busy loops run from before
/// they connect until the last line was delivered.
async fn fanout(count: usize, load: bool) -> anyhow::Result<Vec<Row>> {
    let server = Arc::new(Server::start().await?);
    let busy = load.then(|| BusyLoops::start(2));
    let count_label = if load {
        format!("{count} under load")
    } else {
        count.to_string()
    };
    server.create_app("fan").await?;
    let first = server.build("fan", &quick_app()).await?;
    server.promote("fan", &first).await?;
    let release = server.release("fan", "ROUND=2").await?;
    let last_line = format!("Release {release} is now active");

    let deliveries = Arc::new(std::sync::Mutex::new(Deliveries::default()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(count);
    // Followers arrive CONNECTING at a time, as a crowd does over seconds. All 10 000 in one
    // burst, on two cores shared with busy loops, left requests unread past the server's header
    // timeout (slow-client protection, 15 s), which then closed them: that measured the burst,
    // not the fan-out this bench is about.
    let connecting = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let mut tasks = Vec::new();
    for i in 0..count {
        let server = server.clone();
        let deliveries = deliveries.clone();
        let wanted = last_line.clone();
        let ready = Ready {
            tx: ready_tx.clone(),
            connecting: connecting.clone(),
        };
        tasks.push(tokio::spawn(async move {
            let result = match i % 3 {
                0 => sse(&server, &wanted, &deliveries, ready).await,
                1 => websocket(&server, &wanted, &deliveries, ready).await,
                _ => feed(&server, &deliveries, ready).await,
            };
            if let Err(e) = result {
                eprintln!("subscriber {i}: {e:#}");
            }
        }));
    }
    drop(ready_tx);
    let connect_deadline = Instant::now() + Duration::from_secs(300);
    for _ in 0..count {
        tokio::time::timeout_at(connect_deadline.into(), ready_rx.recv())
            .await
            .context("subscribers connecting")?;
    }
    let rss = memory_mib(server.pid(), "VmRSS:");
    let reads_before = server.metric("rack_event_bus_reads").await?;
    let server_cpu = tree_cpu_seconds(server.pid());
    let client_cpu = cpu_seconds("self");
    let started = Instant::now();
    server.promote("fan", &release).await?;
    // Everybody has it, or the stragglers never will.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = deliveries.lock().map(|d| d.at.len()).unwrap_or(0);
        if got >= count || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(busy);
    let server_cpu = tree_cpu_seconds(server.pid()) - server_cpu;
    let client_cpu = cpu_seconds("self") - client_cpu;
    let reads = server.metric("rack_event_bus_reads").await? - reads_before;
    let (at, log_lines, feed_lines) = {
        let d = deliveries.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        (d.at.clone(), d.log_lines, d.feed_lines)
    };
    for task in tasks {
        task.abort();
    }
    let delivered = at.len();
    let first = at.iter().min().copied();
    let spread = sorted(
        at.iter()
            .map(|t| first.map_or(0.0, |f| t.duration_since(f).as_secs_f64()))
            .collect(),
    );
    // Subscribers 0, 1 (mod 3) follow the app log, 2 the feed: the lines one of each saw are
    // what the replica had to read (each log once per batch, if all goes well).
    let log_subscribers = (count - count / 3) as f64;
    let feed_subscribers = (count / 3) as f64;
    let lines = log_lines as f64 / log_subscribers.max(1.0) + feed_lines as f64 / feed_subscribers.max(1.0);
    let reads_per_line = reads / lines.max(1.0);
    let (p50, p99) = (percentile(&spread, 0.5), percentile(&spread, 0.99));
    let spread_row = row(
        format!("fan-out {count_label}: delivery spread p50 / p99"),
        format!("{} / {}", ms(p50), ms(p99)),
        "",
    );
    let resources = row(
        format!("fan-out {count_label}: server RSS, CPU during the deploy"),
        format!("{rss:.0} MiB, {server_cpu:.2} s"),
        format!("client CPU {client_cpu:.2} s"),
    );
    let rows = vec![
        row(
            format!("fan-out {count_label}: last line delivered"),
            format!("{delivered}/{count}"),
            "",
        )
        .target("all", delivered == count),
        if count <= 1000 {
            spread_row.target("p99 < 100 ms", p99 < 0.1)
        } else {
            spread_row
        },
        row(
            format!("fan-out {count_label}: Postgres reads per line"),
            format!("{reads_per_line:.2} ({reads:.0} reads, {lines:.0} lines of 2 logs)"),
            format!("{count} (a read per subscriber)"),
        )
        .ratio(reads_per_line / count as f64)
        .target(
            if load {
                "≤ 1.5 per replica"
            } else {
                "≤ 1 per replica"
            },
            reads_per_line <= if load { 1.5 } else { 1.0 },
        ),
        if count > 1000 {
            resources.target("RSS < 512 MiB", rss < 512.0)
        } else {
            resources
        },
    ];
    println!("fan-out {count_label}: done in {elapsed:.1} s");
    Ok(rows)
}

/// How many followers connect at once in the fan-out rows.
const CONNECTING: usize = 256;

/// A follower's turn to connect, and how it tells the bench it is connected.
struct Ready {
    tx: tokio::sync::mpsc::Sender<()>,
    connecting: Arc<tokio::sync::Semaphore>,
}

impl Ready {
    /// Waits for a place among the followers connecting now.
    async fn turn(&self) -> anyhow::Result<tokio::sync::OwnedSemaphorePermit> {
        Ok(self.connecting.clone().acquire_owned().await?)
    }

    /// Says this follower is connected, and makes room for the next.
    async fn connected(&self, turn: tokio::sync::OwnedSemaphorePermit) -> anyhow::Result<()> {
        drop(turn);
        Ok(self.tx.send(()).await?)
    }
}

fn delivered(deliveries: &std::sync::Mutex<Deliveries>, feed: bool, last: bool) {
    if let Ok(mut d) = deliveries.lock() {
        if feed {
            d.feed_lines += 1;
        } else {
            d.log_lines += 1;
        }
        if last {
            d.at.push(Instant::now());
        }
    }
}

/// The app log over SSE, from now on.
async fn sse(
    server: &Server,
    wanted: &str,
    deliveries: &std::sync::Mutex<Deliveries>,
    ready: Ready,
) -> anyhow::Result<()> {
    let turn = ready.turn().await?;
    let response = reqwest::Client::new()
        .get(server.url("/apps/fan/logs"))
        .basic_auth("rack", Some(PASSWORD))
        .header("accept", "text/event-stream")
        .header("since", "1s")
        .send()
        .await?
        .error_for_status()?;
    ready.connected(turn).await?;
    each_line(response, |line| {
        if let Some(data) = line.strip_prefix(b"data: ") {
            delivered(deliveries, false, String::from_utf8_lossy(data).contains(wanted));
        }
    })
    .await
}

/// The app log over a websocket, from now on.
async fn websocket(
    server: &Server,
    wanted: &str,
    deliveries: &std::sync::Mutex<Deliveries>,
    ready: Ready,
) -> anyhow::Result<()> {
    let turn = ready.turn().await?;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/apps/fan/logs", server.addr).into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Basic {}", basic()).parse()?);
    request.headers_mut().insert("since", "1s".parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    ready.connected(turn).await?;
    let (mut sink, mut source) = socket.split();
    while let Some(message) = source.next().await {
        match message? {
            Message::Text(text) => {
                for line in text.lines() {
                    delivered(deliveries, false, line.contains(wanted));
                }
            }
            Message::Ping(data) => sink.send(Message::Pong(data)).await?,
            _ => {}
        }
    }
    Ok(())
}

/// The app's feed as NDJSON, from now on: the deployment's events, ending with `finished`.
async fn feed(server: &Server, deliveries: &std::sync::Mutex<Deliveries>, ready: Ready) -> anyhow::Result<()> {
    let turn = ready.turn().await?;
    let response = reqwest::Client::new()
        .get(server.url("/apps/fan/events?kind=deployment."))
        .basic_auth("rack", Some(PASSWORD))
        .send()
        .await?
        .error_for_status()?;
    ready.connected(turn).await?;
    each_line(response, |line| {
        // Events have an id; the stream's own notices (heartbeats) do not.
        if line.windows(5).any(|w| w == b"\"id\":") {
            let last = line.windows(27).any(|w| w == b"\"kind\":\"deployment.finished");
            delivered(deliveries, true, last);
        }
    })
    .await
}

/// Calls `each` with every line of `response`'s body as it arrives.
async fn each_line(response: reqwest::Response, mut each: impl FnMut(&[u8])) -> anyhow::Result<()> {
    let debug = std::env::var_os("RACK_BENCH_DEBUG").is_some();
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if debug {
                eprintln!("{}", String::from_utf8_lossy(&line).trim_end());
            }
            each(&line);
        }
    }
    Ok(())
}

fn basic() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("rack:{PASSWORD}"))
}

// ---------------------------------------------------------------------------------------------
// Lists.

async fn lists() -> anyhow::Result<Vec<Row>> {
    let rows_wanted: i64 = env_or("RACK_BENCH_ROWS", 100_000);
    let server = Server::start().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.database_url())
        .await
        .context("connecting to the embedded cluster (the bench must run as root or as rack's user)")?;
    for (app, count) in [("small", 100), ("large", rows_wanted)] {
        server.create_app(app).await?;
        // Rows as builds and releases leave them, made in one statement each.
        sqlx::query(
            "insert into builds (id, app, status, source_url, manifest, started_at, ended_at)
             select 'B' || substr(translate(md5($1 || i), '0123456789abcdef', 'ABCDEFGHIJKLMNOP'), 1, 10),
                    $1, 'complete', 'object://x/y', 'services: {}', now(), now()
               from generate_series(1, $2) as i",
        )
        .bind(app)
        .bind(count)
        .execute(&pool)
        .await?;
        sqlx::query(
            "insert into releases (id, app, build_id, manifest)
             select 'R' || substr(translate(md5($1 || i), '0123456789abcdef', 'ABCDEFGHIJKLMNOP'), 1, 10),
                    $1, 'B' || substr(translate(md5($1 || i), '0123456789abcdef', 'ABCDEFGHIJKLMNOP'), 1, 10),
                    'services: {}'
               from generate_series(1, $2) as i",
        )
        .bind(app)
        .bind(count)
        .execute(&pool)
        .await?;
    }
    sqlx::query("analyze").execute(&pool).await?;
    let mut out = Vec::new();
    for list in ["releases", "builds"] {
        let (mut small, mut large) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            // Warm-up.
            latency(&server, &format!("/apps/small/{list}?limit=20")).await?;
            latency(&server, &format!("/apps/large/{list}?limit=20")).await?;
        }
        for _ in 0..500 {
            small.push(latency(&server, &format!("/apps/small/{list}?limit=20")).await?);
            large.push(latency(&server, &format!("/apps/large/{list}?limit=20")).await?);
        }
        let (small, large) = (sorted(small), sorted(large));
        let ratio = percentile(&large, 0.5) / percentile(&small, 0.5);
        out.push(
            row(
                format!("GET {list}?limit=20 p50 / p99, {rows_wanted} rows"),
                format!("{} / {}", ms(percentile(&large, 0.5)), ms(percentile(&large, 0.99))),
                format!(
                    "{} / {} (100 rows)",
                    ms(percentile(&small, 0.5)),
                    ms(percentile(&small, 0.99))
                ),
            )
            .ratio(ratio)
            .target("≤ 1.2x", ratio <= 1.2),
        );
    }
    // Throughput: GET /apps/{app} against pgbench -S on the same cluster, 8 clients each.
    let rack_rps = throughput(&server, "/apps/small", 8, Duration::from_secs(10)).await?;
    let pgbench = pgbench(&server, &pool).await?;
    let ratio = rack_rps / pgbench;
    out.push(
        row(
            "GET /apps/{app} throughput, 8 clients",
            format!("{rack_rps:.0} req/s"),
            format!("{pgbench:.0} tps (pgbench -S)"),
        )
        .ratio(ratio)
        .target("≥ 0.5x", ratio >= 0.5),
    );
    Ok(out)
}

async fn latency(server: &Server, path: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    server.get(path).send().await?.error_for_status()?.bytes().await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Requests per second `clients` concurrent clients get from `path` in `time`.
async fn throughput(server: &Server, path: &str, clients: usize, time: Duration) -> anyhow::Result<f64> {
    let until = Instant::now() + time;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let request = server.get(path);
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < until {
                let Some(request) = request.try_clone() else { break };
                if request.send().await.and_then(|r| r.error_for_status()).is_ok() {
                    done += 1;
                }
            }
            done
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// `pgbench -S` (select-only), 8 clients for 10 s, on a database of its own in rack's cluster.
async fn pgbench(server: &Server, pool: &sqlx::PgPool) -> anyhow::Result<f64> {
    let _ = sqlx::query("create database pgbench").execute(pool).await;
    let bin = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| std::path::PathBuf::from(s.trim()))
        .filter(|p| p.join("pgbench").exists())
        .or_else(|| {
            std::fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .find(|p| p.join("pgbench").exists())
        })
        .context("pgbench not found")?;
    let host = server.data.path().join("rack/postgres/run");
    let run = |args: &[&str]| {
        Command::new(bin.join("pgbench"))
            .args(["-h", &host.display().to_string(), "-U", "postgres"])
            .args(args)
            .arg("pgbench")
            .output()
    };
    let init = run(&["-i", "-s", "1", "-q"])?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let out = run(&["-S", "-c", "8", "-j", "2", "-T", "10", "-n"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("pgbench's tps in:\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Deploy overhead.

async fn deploy_overhead() -> anyhow::Result<Vec<Row>> {
    let server = Server::start().await?;
    server.create_app("quick").await?;
    let first = server.build("quick", &quick_app()).await?;
    server.promote("quick", &first).await?;
    let mut firsts = Vec::new();
    for round in 0..7 {
        let release = server.release("quick", &format!("ROUND={round}")).await?;
        let (first_line, _) = server.promote("quick", &release).await?;
        firsts.push(first_line.as_secs_f64());
    }
    let firsts = sorted(firsts);
    let first_line = percentile(&firsts, 0.5);

    // `rack deploy` of a directory, then again unchanged.
    let dir = server.data.path().join("quick-src");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("convox.yml"),
        "services:\n  web:\n    command: sleep 100000\n    health:\n      grace: 0\n",
    )?;
    std::fs::write(dir.join("README"), "a quick app\n")?;
    let changed = rack_deploy(&server, "quick", &dir).await?;
    let unchanged = rack_deploy(&server, "quick", &dir).await?;
    let mut rows = vec![
        row("promote → first streamed line (median of 7)", ms(first_line), "").target("< 50 ms", first_line < 0.05),
    ];
    for (name, run) in [("rack deploy", &changed), ("rack deploy, unchanged source", &unchanged)] {
        rows.push(
            row(
                format!("{name}: total (rack's own share)"),
                ms(run.total),
                format!(
                    "package+upload {}, build {}, promote {}, rollout {}",
                    ms(run.upload),
                    ms(run.build),
                    ms(run.promote),
                    ms(run.rollout)
                ),
            )
            .target("< 300 ms", run.total < 0.3),
        );
    }
    Ok(rows)
}

struct DeployRun {
    total: f64,
    upload: f64,
    build: f64,
    promote: f64,
    rollout: f64,
}

/// Runs `rack deploy` and splits its time with the feed's timestamps.
async fn rack_deploy(server: &Server, app: &str, dir: &std::path::Path) -> anyhow::Result<DeployRun> {
    let horizon: Vec<serde_json::Value> = feed_events(server, "follow=false&after=0").await?;
    let after = horizon.last().and_then(|e| e["id"].as_i64()).unwrap_or(0);
    let started = chrono::Utc::now();
    let clock = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(["deploy", "--app", app, "."])
        .current_dir(dir)
        .env("RACK_URL", format!("http://:{PASSWORD}@{}", server.addr))
        .output()
        .await?;
    let total = clock.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "rack deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = feed_events(server, &format!("follow=false&after={after}&app={app}")).await?;
    let at = |kind: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind)
            .and_then(|e| e["at"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    let secs = |from: Option<chrono::DateTime<chrono::Utc>>, to: Option<chrono::DateTime<chrono::Utc>>| match (from, to)
    {
        (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1e6,
        _ => f64::NAN,
    };
    Ok(DeployRun {
        total,
        upload: secs(Some(started), at("build.created")),
        build: secs(at("build.created"), at("build.succeeded")),
        promote: secs(at("build.succeeded"), at("deployment.started")),
        rollout: secs(at("deployment.started"), at("deployment.finished")),
    })
}

async fn feed_events(server: &Server, query: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = server
        .get(&format!("/events?{query}"))
        .header("accept", "application/x-ndjson")
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

// ---------------------------------------------------------------------------------------------
// A container app's whole `rack deploy`.

/// The image the container app builds `FROM` (busybox, made once per machine as the tests and
/// benches/containers.rs make it).
const BUSYBOX_IMAGE: &str = "localhost/rack-test-busybox:1";

/// `rack deploy` of a one-instance Dockerfile app with the default health check (grace 5 s,
/// interval 5 s): the rollout waits only as long as the container takes to answer, as a new
/// instance is checked at once and then every 20 ms, 40 ms, … until it passes. The first
/// deploy builds the image; the figure is the next one, of a changed file (a new layer).
async fn container_deploy() -> anyhow::Result<Vec<Row>> {
    let server = Server::start().await?;
    let data = server.data.path().join("rack");
    let podman = rack::runtime::local::podman::Podman::detect(&data, "rack")?
        .ok_or_else(|| anyhow::anyhow!("podman is not installed: run scripts/install-deps"))?;
    if !podman.image_exists(BUSYBOX_IMAGE).await {
        let context = tempfile::tempdir()?;
        std::fs::copy("/bin/busybox", context.path().join("busybox"))?;
        std::fs::write(
            context.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        )?;
        podman
            .output(&[
                "build",
                "--network",
                "none",
                "--tag",
                BUSYBOX_IMAGE,
                &context.path().to_string_lossy(),
            ])
            .await
            .map_err(anyhow::Error::msg)?;
    }
    server.create_app("boxed").await?;
    let dir = server.data.path().join("boxed-src");
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(
        dir.join("convox.yml"),
        "services:\n  web:\n    build: .\n    port: 3000\n",
    )?;
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM {BUSYBOX_IMAGE}\nCOPY www /www\nCMD [\"httpd\", \"-f\", \"-p\", \"3000\", \"-h\", \"/www\"]\n"),
    )?;
    std::fs::write(dir.join("www/index.html"), "one\n")?;
    let result = async {
        rack_deploy(&server, "boxed", &dir).await?;
        std::fs::write(dir.join("www/index.html"), "two\n")?;
        rack_deploy(&server, "boxed", &dir).await
    }
    .await;
    // Containers outlive their server (a restarted rack adopts them): remove them, once it is
    // stopped (a running one would start again an instance whose container went, and may still
    // be stopping the previous release's in the background).
    let mut server = server;
    server.stop();
    let label = format!("label=rack.host={}", podman.host);
    if let Ok(out) = podman.std_command().args(["ps", "-aq", "--filter", &label]).output() {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = podman.std_command().args(["rm", "-f", "-t", "0"]).args(&ids).output();
        }
    }
    let run = result?;
    Ok(vec![
        row(
            "rack deploy of a container app (changed file, default health check)",
            ms(run.total),
            format!(
                "package+upload {}, build {}, promote {}, rollout {}",
                ms(run.upload),
                ms(run.build),
                ms(run.promote),
                ms(run.rollout)
            ),
        )
        .target("≤ 1.5 s", run.total <= 1.5),
    ])
}

// ---------------------------------------------------------------------------------------------
// Many apps.

async fn many_apps() -> anyhow::Result<Vec<Row>> {
    let count: usize = env_or("RACK_BENCH_APPS", 200);
    let server = Arc::new(Server::start().await?);
    server.create_app("probe").await?;
    // The API's latency while the deploys run, probed by one client throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(l) = latency(&server, "/apps/probe").await {
                    latencies.push(l);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies
        })
    };
    let idle = {
        let mut l = Vec::new();
        for _ in 0..200 {
            l.push(latency(&server, "/apps/probe").await?);
        }
        sorted(l)
    };
    let started = Instant::now();
    let source = Arc::new(quick_app());
    let failures = futures_util::stream::iter(0..count)
        .map(|i| {
            let server = server.clone();
            let source = source.clone();
            async move {
                let app = format!("app{i}");
                server.create_app(&app).await?;
                let release = server.build(&app, &source).await?;
                server.promote(&app, &release).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(4)
        .filter_map(|r| async move { r.err() })
        .collect::<Vec<_>>()
        .await;
    let total = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let busy = sorted(prober.await?);
    if let Some(e) = failures.first() {
        eprintln!("{} deploys failed, the first: {e:#}", failures.len());
    }
    Ok(vec![
        row(
            format!("{count} apps deployed, 4 at a time"),
            format!("{total:.1} s ({:.2} s per app)", total / count as f64),
            format!("{} failed", failures.len()),
        )
        .target("all deployed", failures.is_empty()),
        row(
            "GET /apps/{app} p50 / p99 during those deploys",
            format!("{} / {}", ms(percentile(&busy, 0.5)), ms(percentile(&busy, 0.99))),
            format!(
                "{} / {} (idle)",
                ms(percentile(&idle, 0.5)),
                ms(percentile(&idle, 0.99))
            ),
        )
        .ratio(percentile(&busy, 0.99) / percentile(&idle, 0.99)),
    ])
}

// ---------------------------------------------------------------------------------------------
// The first deploy of an app with a postgres resource, and the idle resources' memory.

/// First deploys (build + rollout, median of 3 apps each) of an app linking a postgres and of
/// the same app without it, side by side; then the idle memory of a postgres and a redis
/// resource (their process trees' PSS), after the deploy settled.
async fn resource_deploy() -> anyhow::Result<Vec<Row>> {
    const SERVICE: &str = "services:\n  web:\n    command: sleep 100000\n    health:\n      grace: 0\n";
    let linked = format!(
        "resources:\n  database:\n    type: postgres\n  cache:\n    type: redis\n{}    resources: [database, cache]\n",
        SERVICE
    );
    let server = Server::start().await?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..3 {
        for (name, manifest, times) in [
            (format!("plain{round}"), SERVICE.to_owned(), &mut without),
            (format!("linked{round}"), linked.clone(), &mut with),
        ] {
            server.create_app(&name).await?;
            let started = Instant::now();
            let release = server.build(&name, &tarball(&[("convox.yml", &manifest)])).await?;
            server.promote(&name, &release).await?;
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let (with, without) = (percentile(&sorted(with), 0.5), percentile(&sorted(without), 0.5));
    // Let the servers settle (checkpoints, background writers) before reading their memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resources = server.data.path().join("rack/resources/linked0");
    let pid_in = |file: std::path::PathBuf| -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("a pid in {}", file.display()))
    };
    let postgres = tree_pss_mib(pid_in(resources.join("database/data/postmaster.pid"))?);
    let redis = tree_pss_mib(pid_in(resources.join("cache/redis.pid"))?);
    // Resource servers outlive rack by design: deleting the apps stops them.
    for round in 0..3 {
        server
            .http
            .delete(server.url(&format!("/apps/linked{round}")))
            .basic_auth("rack", Some(PASSWORD))
            .send()
            .await?
            .error_for_status()?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..3).any(|round| {
        server
            .data
            .path()
            .join(format!("rack/resources/linked{round}"))
            .exists()
    }) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the apps' resources were not removed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let added = with - without;
    Ok(vec![
        row(
            "first deploy with a postgres + redis resource (median of 3)",
            format!("{with:.2} s"),
            format!("{without:.2} s without"),
        )
        .ratio(with / without)
        .target("adds < 5 s", added < 5.0),
        row("idle postgres resource, PSS", format!("{postgres:.1} MiB"), "").target("< 100 MiB", postgres < 100.0),
        row("idle redis resource, PSS", format!("{redis:.1} MiB"), ""),
    ])
}

/// The proportional set size of `pid` and every process under it, in MiB.
fn tree_pss_mib(pid: u32) -> f64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    own + children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .map(tree_pss_mib)
        .sum::<f64>()
}
