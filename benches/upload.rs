//! Upload benchmark: streams one file (1 GiB unless RACK_BENCH_BYTES says otherwise) to a real
//! `rack server` process and to a raw loopback HTTP sink that discards what it reads, side by
//! side, and prints both throughputs, their ratio, and the server's memory before and at peak.
//!
//! Run with `cargo bench --bench upload`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

const PASSWORD: &str = "bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bytes: u64 = std::env::var("RACK_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("upload.bin");
    write_file(&file, bytes)?;

    let sink = start_sink().await?;
    let (mut server, addr) = start_server(dir.path()).await?;
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    client
        .post(format!("{base}/apps"))
        .basic_auth("", Some(PASSWORD))
        .form(&[("name", "bench")])
        .send()
        .await?
        .error_for_status()?;

    let rss_before = memory(server.id(), "VmRSS:");
    let mut rows = Vec::new();
    for round in 0..2 {
        let raw = upload(&client, &format!("http://{sink}/sink"), &file, bytes).await?;
        let rack = upload(
            &client,
            &format!("{base}/apps/bench/objects/bench-{round}.bin"),
            &file,
            bytes,
        )
        .await?;
        rows.push((raw, rack));
    }
    let peak = memory(server.id(), "VmHWM:");
    let _ = server.kill();
    let _ = server.wait();

    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!("upload of {mib:.0} MiB over loopback (2 rounds)");
    for (n, (raw, rack)) in rows.iter().enumerate() {
        let raw_rate = mib / raw.as_secs_f64();
        let rack_rate = mib / rack.as_secs_f64();
        println!(
            "round {}: raw sink {raw_rate:8.1} MiB/s   rack {rack_rate:8.1} MiB/s   rack/raw {:.2}",
            n + 1,
            rack_rate / raw_rate
        );
    }
    println!(
        "rack server memory: {:.1} MiB before, {:.1} MiB peak (+{:.1} MiB)",
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(rss_before) as f64 / 1024.0
    );
    Ok(())
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

async fn upload(client: &reqwest::Client, url: &str, file: &std::path::Path, bytes: u64) -> anyhow::Result<Duration> {
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::open(file).await?,
        256 * 1024,
    ));
    let started = Instant::now();
    client
        .post(url)
        .basic_auth("", Some(PASSWORD))
        .header("content-type", "application/octet-stream")
        .header("content-length", bytes)
        .body(body)
        .send()
        .await?
        .error_for_status()?;
    Ok(started.elapsed())
}

/// The baseline: an HTTP server on loopback that reads every body and throws it away.
async fn start_sink() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/sink",
        axum::routing::post(|body: axum::body::Body| async move {
            let mut stream = body.into_data_stream();
            let mut total = 0usize;
            while let Some(Ok(chunk)) = stream.next().await {
                total += chunk.len();
            }
            total.to_string()
        })
        .layer(axum::extract::DefaultBodyLimit::disable()),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn start_server(data: &std::path::Path) -> anyhow::Result<(Child, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let server = Command::new(env!("CARGO_BIN_EXE_rack"))
        .arg("server")
        .env("RACK_BIND", addr.to_string())
        .env("RACK_DATA", data.join("rack"))
        .env("RACK_PASSWORD", PASSWORD)
        .env("RACK_MAX_UPLOAD_BYTES", (4u64 << 30).to_string())
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

/// A `/proc/<pid>/status` memory field, in KiB.
fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
