//! Containers benchmark: a real `rack server` (embedded default) builds a Dockerfile app with
//! podman, then (1) promotes new releases of the cached image and times promote → first
//! healthy container, and (2) sends the same requests through the app's router and straight to
//! the container's published port, side by side.
//!
//! Run with `cargo bench --bench containers` (as root, with podman installed:
//! `scripts/install-deps`). `RACK_BENCH_ROUNDS` promotes (default 5), `RACK_BENCH_REQUESTS`
//! requests per side (default 2000).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

const PASSWORD: &str = "bench";
const BASE: &str = "localhost/rack-test-busybox:1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rack::tls::install_provider();
    let rounds: usize = env_or("RACK_BENCH_ROUNDS", 5);
    let requests: usize = env_or("RACK_BENCH_REQUESTS", 2000);
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let data = dir.path().join("rack");
    std::fs::create_dir(&data)?;
    base_image(&data).await?;
    let (mut server, addr) = start_server(&data).await?;
    let result = run(addr, rounds, requests).await;
    let _ = server.kill();
    let _ = server.wait();
    remove_containers(&data);
    result
}

async fn run(addr: SocketAddr, rounds: usize, requests: usize) -> anyhow::Result<()> {
    let rack = Rack::new(addr);
    rack.post("/apps", &[("name", "bench")]).await?;
    let source = dir_tarball()?;
    rack.upload("/apps/bench/objects/src.tgz", source).await?;
    let build = rack
        .post("/apps/bench/builds", &[("url", "object://bench/src.tgz")])
        .await?;
    let id = build["id"].as_str().unwrap_or_default().to_owned();
    let build = loop {
        let build = rack.get(&format!("/apps/bench/builds/{id}")).await?;
        if matches!(build["status"].as_str(), Some("complete" | "failed")) {
            break build;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    anyhow::ensure!(build["status"] == "complete", "the build failed: {build}");
    let mut release = build["release"].as_str().unwrap_or_default().to_owned();

    println!("promote → first healthy container (cached image, {rounds} rounds)");
    let mut firsts = Vec::new();
    for round in 0..rounds {
        if round > 0 {
            // A new release of the same image: new containers, nothing to build or pull.
            let next = rack
                .post("/apps/bench/releases", &[("env", &format!("ROUND={round}"))])
                .await?;
            release = next["id"].as_str().unwrap_or_default().to_owned();
        }
        let (first, total) = rack.promote(&release).await?;
        println!(
            "  round {}: first healthy {:6.0} ms   rollout {:6.0} ms",
            round + 1,
            first.as_secs_f64() * 1000.0,
            total.as_secs_f64() * 1000.0
        );
        firsts.push(first);
    }
    firsts.sort();
    println!(
        "  median first healthy: {:.0} ms",
        firsts[firsts.len() / 2].as_secs_f64() * 1000.0
    );

    let app = rack.get("/apps/bench").await?;
    let router = app["router"].as_str().unwrap_or_default().to_owned();
    let processes = rack.get("/apps/bench/processes").await?;
    let port = processes[0]["ports"][0].as_str().unwrap_or_default().to_owned();
    let direct = format!("127.0.0.1:{port}");
    println!("GET / x {requests}, one at a time: through the router vs straight to the container");
    let client = reqwest::Client::new();
    // Warm both paths (connection pools), then measure them in turn.
    measure(&client, &router, 50).await?;
    measure(&client, &direct, 50).await?;
    let via_router = measure(&client, &router, requests).await?;
    let straight = measure(&client, &direct, requests).await?;
    for (name, stats) in [("router", &via_router), ("direct", &straight)] {
        println!(
            "  {name:7} p50 {:6.2} ms   p99 {:6.2} ms   {:7.0} req/s",
            stats.p50 * 1000.0,
            stats.p99 * 1000.0,
            stats.rate
        );
    }
    println!(
        "  router/direct: p50 {:.2}x, throughput {:.2}x",
        via_router.p50 / straight.p50,
        via_router.rate / straight.rate
    );
    Ok(())
}

struct Stats {
    p50: f64,
    p99: f64,
    rate: f64,
}

async fn measure(client: &reqwest::Client, addr: &str, n: usize) -> anyhow::Result<Stats> {
    let mut times = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let response = client.get(format!("http://{addr}/")).send().await?;
        anyhow::ensure!(response.status().is_success(), "GET answered {}", response.status());
        response.bytes().await?;
        times.push(t.elapsed().as_secs_f64());
    }
    let total = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    Ok(Stats {
        p50: times[n / 2],
        p99: times[(n * 99 / 100).min(n - 1)],
        rate: n as f64 / total,
    })
}

/// The benchmark's API client.
struct Rack {
    base: String,
    client: reqwest::Client,
}

impl Rack {
    fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .client
            .get(format!("{}{path}", self.base))
            .basic_auth("", Some(PASSWORD))
            .header("accept", "application/json")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<Value> {
        Ok(self
            .client
            .post(format!("{}{path}", self.base))
            .basic_auth("", Some(PASSWORD))
            .header("accept", "application/json")
            .form(form)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn upload(&self, path: &str, body: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .post(format!("{}{path}", self.base))
            .basic_auth("", Some(PASSWORD))
            .body(body)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Promotes `release` following its log; returns the time to the first healthy instance
    /// and to the end of the rollout.
    async fn promote(&self, release: &str) -> anyhow::Result<(Duration, Duration)> {
        let started = Instant::now();
        let response = self
            .client
            .post(format!("{}/apps/bench/releases/{release}/promote", self.base))
            .basic_auth("", Some(PASSWORD))
            .form(&[("follow", "true")])
            .send()
            .await?
            .error_for_status()?;
        let mut body = response.bytes_stream();
        let (mut text, mut first) = (String::new(), None);
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk?));
            if first.is_none() && text.contains("Health check passed") {
                first = Some(started.elapsed());
            }
        }
        anyhow::ensure!(text.ends_with("OK\n"), "the rollout failed:\n{text}");
        Ok((first.unwrap_or_default(), started.elapsed()))
    }
}

/// A convox app: busybox httpd serving a file on port 3000.
fn dir_tarball() -> anyhow::Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let files = [
        ("convox.yml", "services:\n  web:\n    build: .\n    port: 3000\n    health:\n      path: /\n      grace: 0\n      interval: 1\n".to_owned()),
        (
            "Dockerfile",
            format!("FROM {BASE}\nCOPY www /www\nCMD [\"httpd\", \"-f\", \"-p\", \"3000\", \"-h\", \"/www\"]\n"),
        ),
        ("www/index.html", "hello\n".to_owned()),
    ];
    for (path, content) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap_or(dir.path()))?;
        std::fs::write(path, content)?;
    }
    let mut out = Vec::new();
    rack::archive::pack_tgz(dir.path(), &mut out)?;
    Ok(out)
}

/// The base image the app builds `FROM` (made once per machine, as the tests make it).
async fn base_image(data: &std::path::Path) -> anyhow::Result<()> {
    let podman = rack::runtime::local::podman::Podman::detect(data, "rack")?
        .ok_or_else(|| anyhow::anyhow!("podman is not installed: run scripts/install-deps"))?;
    if podman.image_exists(BASE).await {
        return Ok(());
    }
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
            BASE,
            &context.path().to_string_lossy(),
        ])
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

fn remove_containers(data: &std::path::Path) {
    let Ok(Some(podman)) = rack::runtime::local::podman::Podman::detect(data, "rack") else {
        return;
    };
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
}

async fn start_server(data: &std::path::Path) -> anyhow::Result<(Child, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let server = Command::new(env!("CARGO_BIN_EXE_rack"))
        .arg("server")
        .env("RACK_BIND", addr.to_string())
        .env("RACK_DATA", data)
        .env("RACK_PASSWORD", PASSWORD)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("http://{addr}/system"))
            .basic_auth("", Some(PASSWORD))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok((server, addr));
        }
        anyhow::ensure!(Instant::now() < deadline, "rack server did not start within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
