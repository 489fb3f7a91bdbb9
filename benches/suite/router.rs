//! The local runtime's router under load: its throughput with the traffic analysis' recording
//! on and off (target: within 5 %), and against nginx `proxy_pass` in front of the same app
//! (Debian's nginx, run on 127.0.0.1 with a config of its own; target: at least 0.9x). The app
//! is a minimal HTTP server in this process; the clients keep their connections alive.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rack::runtime::local::router::Router;
use tokio_util::sync::CancellationToken;

use super::{Row, row};

/// Concurrent clients, each with its own kept-alive connection.
const CLIENTS: usize = 32;
/// One measurement's length; each is taken three times, interleaved, and the median kept.
const ROUND: Duration = Duration::from_secs(4);

pub async fn router_throughput() -> anyhow::Result<Vec<Row>> {
    let app = start_app().await?;
    let shutdown = CancellationToken::new();
    let (router, thread) = start_router(shutdown.clone()).await?;
    router.set_routes(vec![(app, "RBENCH".to_owned())]);
    let nginx = Nginx::start(app)?;
    let (mut on, mut off, mut proxied) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        router.set_recording(false);
        off.push(load(router.local_addr()).await?);
        router.set_recording(true);
        on.push(load(router.local_addr()).await?);
        if let Some(nginx) = &nginx {
            proxied.push(load(nginx.addr).await?);
        }
    }
    shutdown.cancel();
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the router's thread panicked"))?;
    let (on, off) = (median(on), median(off));
    let per_sec = |n: f64| format!("{n:.0} req/s");
    let mut rows = vec![
        row(
            "router throughput: analysis recording on vs off",
            per_sec(on),
            per_sec(off),
        )
        .ratio(on / off)
        .target("≥ 0.95x", on / off >= 0.95),
    ];
    rows.push(match nginx {
        Some(_) => {
            let nginx = median(proxied);
            row(
                "router throughput (recording on) vs nginx proxy_pass",
                per_sec(on),
                per_sec(nginx),
            )
            .ratio(on / nginx)
            .target("≥ 0.9x", on / nginx >= 0.9)
        }
        None => row("router vs nginx proxy_pass", per_sec(on), "nginx not installed"),
    });
    Ok(rows)
}

/// The router on a thread and runtime of its own, as nginx runs in its one worker process. On
/// the bench's runtime it would share two threads with the clients and the app while nginx had a
/// third, which on a machine loaded by others is a larger share of the CPU for nginx (the ratio
/// measured so fell with the load: 0.60x at load 5-9, about 0.88x at load 2-4).
async fn start_router(shutdown: CancellationToken) -> anyhow::Result<(Router, std::thread::JoinHandle<()>)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                let _ = tx.send(Err(err));
                return;
            }
        };
        runtime.block_on(async move {
            let _ = tx.send(Router::start("bench".to_owned(), 0, shutdown.clone()).await);
            shutdown.cancelled().await;
        });
    });
    let router = rx.await?.context("starting the router")?;
    Ok((router, thread))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The app: answers `ok` to anything.
async fn start_app() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async { "ok\n" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Requests per second through `addr` over one round.
async fn load(addr: SocketAddr) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + ROUND;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build_http();
                let uri: axum::http::Uri = format!("http://{addr}/").parse()?;
                while Instant::now() < deadline {
                    let response = client.get(uri.clone()).await?;
                    anyhow::ensure!(response.status().is_success(), "{}", response.status());
                    response.into_body().collect().await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for client in clients {
        client.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// nginx proxying to the app, from Debian's package; `None` when it is not installed. It does
/// what rack's router does per request, no less: HTTP/1.1 to upstream over kept-alive
/// connections, the client's Host passed on, and the X-Forwarded-For/-Proto/-Host headers set.
struct Nginx {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(app: SocketAddr) -> anyhow::Result<Option<Self>> {
        let Some(binary) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.path().display();
        let config = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream app {{ server {app}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
    }}
  }}
}}
"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(Self { addr, child, _dir: dir }))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
