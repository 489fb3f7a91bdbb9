//! The Kubernetes analysis with `RACK_PROMETHEUS_URL`: a real Prometheus (Debian's package),
//! started here on 127.0.0.1, scrapes every second an exporter of this test that serves
//! ingress-nginx's request counters and latency histograms for the app's Ingress (and, as a
//! decoy, for another namespace's, failing). A release whose service serves 5xx during the
//! window is rolled back with the figures in the stream and the feed; a good one goes live.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::deploys::promote_follow;
use crate::helpers::{TestApp, wait_for};
use crate::kubeenv::{ProbeServer, admin_client};
use crate::kubernetes::{build_and_promote, complete_build, deployment_end, spawn_kube_then};

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Requests per second the exporter counts.
const RATE: f64 = 20.0;

fn manifest(port: u16) -> String {
    format!(
        "services:\n  web:\n    build: .\n    port: {port}\n    health:\n      grace: 1\n      interval: 1\n    deployment:\n      analysis:\n        window: 10\n        min_requests: 20\n"
    )
}

/// What the ingress controller has counted so far for the app's service.
struct Traffic {
    last: Instant,
    ok: f64,
    failed: f64,
    /// The share of requests answered 503 from now on.
    failing: f64,
}

impl Traffic {
    fn advance(&mut self) {
        let elapsed = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.failed += RATE * elapsed * self.failing;
        self.ok += RATE * elapsed * (1.0 - self.failing);
    }
}

/// The series of one service behind one Ingress with one status, as ingress-nginx writes them
/// (every request took 20 ms).
fn series(out: &mut String, namespace: &str, status: u16, count: f64) {
    let labels = format!(
        "canary=\"\",controller_class=\"k8s.io/ingress-nginx\",controller_namespace=\"ingress-nginx\",controller_pod=\"ingress-nginx-controller-7d9f\",host=\"web.app.rack.example.org\",ingress=\"web\",method=\"GET\",namespace=\"{namespace}\",path=\"/\",service=\"web\",status=\"{status}\""
    );
    out.push_str(&format!("nginx_ingress_controller_requests{{{labels}}} {count}\n"));
    for (le, n) in [
        ("0.005", 0.0),
        ("0.01", 0.0),
        ("0.025", count),
        ("0.05", count),
        ("+Inf", count),
    ] {
        out.push_str(&format!(
            "nginx_ingress_controller_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "nginx_ingress_controller_request_duration_seconds_sum{{{labels}}} {}\n",
        count * 0.02
    ));
    out.push_str(&format!(
        "nginx_ingress_controller_request_duration_seconds_count{{{labels}}} {count}\n"
    ));
}

/// An exporter on 127.0.0.1 serving the app's traffic (and a failing decoy's).
async fn exporter(namespace: String, traffic: Arc<Mutex<Traffic>>) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let started = Instant::now();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let mut buffer = [0u8; 8192];
            let _ = socket.read(&mut buffer).await;
            let (ok, failed) = {
                let mut traffic = traffic.lock().unwrap();
                traffic.advance();
                (traffic.ok, traffic.failed)
            };
            let mut body = String::from(
                "# TYPE nginx_ingress_controller_requests counter\n# TYPE nginx_ingress_controller_request_duration_seconds histogram\n",
            );
            series(&mut body, &namespace, 200, ok);
            series(&mut body, &namespace, 503, failed);
            // Another app's service of the same names, failing all along: never counted.
            series(&mut body, "rack-decoy", 500, RATE * started.elapsed().as_secs_f64());
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (port, task)
}

/// Prometheus on 127.0.0.1, scraping `target` every second; killed (with its group) on drop.
struct PrometheusServer {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

async fn prometheus(target: u16) -> PrometheusServer {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ingress\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("starting prometheus");
    let url = format!("http://127.0.0.1:{port}");
    let server = PrometheusServer { child, url, _dir: dir };
    let up = format!("up{{job=\"ingress\",instance=\"127.0.0.1:{target}\"}}");
    wait_for(90, "prometheus to scrape the exporter", || async {
        (query(&server.url, &up).await == Some(1.0)).then_some(())
    })
    .await;
    server
}

/// The value of an instant query, if it has one.
async fn query(url: &str, query: &str) -> Option<f64> {
    let response = reqwest::Client::new()
        .get(format!("{url}/api/v1/query"))
        .query(&[("query", query)])
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// The deployment's whole log.
async fn deployment_log(app: &TestApp, location: &str) -> String {
    app.request(Method::GET, &format!("{location}/events"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The last `deployment.analysis` event of `release` from the ingress.
async fn ingress_event(app: &TestApp, name: &str, release: &str) -> Value {
    let events = app
        .request(
            Method::GET,
            &format!("/events?follow=false&after=0&app={name}&kind=deployment.analysis"),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|e| e["release_id"] == release && e["data"]["source"] == "ingress")
        .unwrap_or_else(|| panic!("no ingress analysis event of {release} in:\n{events}"))
}

/// Builds a release answering probes on a fresh probe server and promotes it (not followed).
async fn promote_next(app: &TestApp, name: &str) -> (String, String, ProbeServer) {
    let client = admin_client().await;
    let probe = ProbeServer::start().await;
    let (release, location) = build_and_promote(app, &client, name, &manifest(probe.port)).await;
    (release, location, probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_metrics_in_prometheus_roll_back_a_failing_release_and_pass_a_good_one() {
    if !std::path::Path::new(PROMETHEUS).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this test: {PROMETHEUS} is missing (scripts/install-deps installs Debian's prometheus)"
        );
        eprintln!("skipping: {PROMETHEUS} is missing (scripts/install-deps installs Debian's prometheus)");
        return;
    }
    let name = "kubeprom";
    let namespace = format!("rack-{name}");
    let traffic = Arc::new(Mutex::new(Traffic {
        last: Instant::now(),
        ok: 0.0,
        failed: 0.0,
        failing: 0.0,
    }));
    let (port, _exporter) = exporter(namespace.clone(), traffic.clone()).await;
    let server = prometheus(port).await;
    let url = server.url.clone();
    let app = spawn_kube_then(|kube| kube.prometheus_url = Some(url)).await;
    let client = admin_client().await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let first_probe = ProbeServer::start().await;
    let first = complete_build(&app, &client, name, &manifest(first_probe.port)).await;
    let first = first["release"].as_str().unwrap().to_owned();
    let log = promote_follow(&app, name, &first).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    // The window before the next rollout holds enough traffic.
    let requests = format!("sum(increase(nginx_ingress_controller_requests{{namespace=\"{namespace}\"}}[10s]))");
    wait_for(90, "prometheus to hold 10 s of the service's traffic", || async {
        query(&server.url, &requests).await.filter(|n| *n >= 100.0)
    })
    .await;

    // A good release: its service serves as before.
    let (good, location, _good_probe) = promote_next(&app, name).await;
    let end = deployment_end(&app, name).await;
    let log = deployment_log(&app, &location).await;
    assert_eq!(end["state"], "running", "{end}\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains(" system/k8s/web analysis at the ingress passed: "))
        .unwrap_or_else(|| panic!("no ingress analysis line in:\n{log}"));
    eprintln!("{line}");
    assert!(
        line.contains(&format!("passed: {good} 5xx 0.0% (")) && line.contains(&format!(" vs {first} 0.0%, p95 ")),
        "{line}"
    );
    let event = ingress_event(&app, name, &good).await;
    assert_eq!(event["data"]["verdict"], "passed", "{event}");
    assert!(event["data"]["new"]["requests"].as_u64().unwrap() >= 20, "{event}");
    assert_eq!(event["data"]["new"]["errors"], 0, "{event}");
    assert!(event["data"]["old"]["requests"].as_u64().unwrap() >= 20, "{event}");

    // A failing release: once the analysis watches its pods, most requests get 503.
    let (bad, location, _bad_probe) = promote_next(&app, name).await;
    wait_for(120, "the analysis to watch the new pods", || async {
        let log = app.app_log(name).await;
        log.contains(&format!("analysis: watching the new pods of {bad}"))
            .then_some(())
    })
    .await;
    {
        let mut traffic = traffic.lock().unwrap();
        traffic.advance();
        traffic.failing = 0.8;
    }
    let end = deployment_end(&app, name).await;
    let log = deployment_log(&app, &location).await;
    assert_eq!(end["state"], "reverted", "{end}\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains(" system/k8s/web analysis at the ingress: "))
        .unwrap_or_else(|| panic!("no ingress analysis line in:\n{log}"));
    eprintln!("{line}");
    assert!(
        line.contains(&format!("analysis at the ingress: {bad} 5xx "))
            && line.contains(&format!(" vs {good} 0.0% over "))
            && line.ends_with("(limit 5%): rolling back"),
        "{line}"
    );
    assert!(log.contains("Status: Rollback => Reverted"), "{log}");
    let info: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(info["release"], good);
    let event = ingress_event(&app, name, &bad).await;
    assert_eq!(event["data"]["verdict"], "failed", "{event}");
    assert_eq!(event["data"]["previous_release"], good, "{event}");
    assert!(event["data"]["new"]["error_rate"].as_f64().unwrap() > 5.0, "{event}");
    assert_eq!(event["data"]["old"]["errors"], 0, "{event}");
}

/// The values of metric `name` in a metrics answer.
fn values<'a>(metrics: &'a [Value], name: &str) -> &'a Vec<Value> {
    metrics
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {metrics:?}"))["values"]
        .as_array()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_metrics_come_from_the_ingress_metrics_in_prometheus() {
    if !std::path::Path::new(PROMETHEUS).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this test: {PROMETHEUS} is missing"
        );
        eprintln!("skipping: {PROMETHEUS} is missing (scripts/install-deps installs Debian's prometheus)");
        return;
    }
    rack::tls::install_provider();
    let name = "kubemetrics";
    // A quarter of the service's requests fail; the decoy namespace's all fail, and must not
    // count.
    let traffic = Arc::new(Mutex::new(Traffic {
        last: Instant::now(),
        ok: 0.0,
        failed: 0.0,
        failing: 0.25,
    }));
    let (port, _exporter) = exporter(format!("rack-{name}"), traffic).await;
    let server = prometheus(port).await;
    let url = server.url.clone();
    let app = spawn_kube_then(|kube| kube.prometheus_url = Some(url)).await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let start = chrono::Utc::now() - chrono::Duration::seconds(60);
    for path in [
        format!("/apps/{name}/metrics"),
        format!("/apps/{name}/services/web/metrics"),
    ] {
        // Periods of 10 s, each once it has ended and Prometheus holds it.
        let metrics: Vec<Value> = wait_for(120, "ended periods with the ingress' requests", || async {
            let response = app
                .convox(Method::GET, &path)
                .query(&[
                    ("start", start.format("%Y%m%d.%H%M%S.%f").to_string()),
                    (
                        "end",
                        (chrono::Utc::now() + chrono::Duration::seconds(60))
                            .format("%Y%m%d.%H%M%S.%f")
                            .to_string(),
                    ),
                    ("period", "10".to_owned()),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let metrics: Vec<Value> = response.json().await.unwrap();
            let busy = values(&metrics, "requests")
                .iter()
                .filter(|v| v["sum"].as_f64().unwrap() >= 100.0)
                .count();
            (busy >= 2).then_some(metrics)
        })
        .await;
        let requests = values(&metrics, "requests");
        let errors = values(&metrics, "errors");
        let sum = |vs: &Vec<Value>| vs.iter().map(|v| v["sum"].as_f64().unwrap()).sum::<f64>();
        let share = sum(errors) / sum(requests);
        assert!((0.15..0.35).contains(&share), "{path}: 5xx share {share}: {metrics:?}");
        let busy = requests.iter().find(|v| v["sum"].as_f64().unwrap() >= 100.0).unwrap();
        // 20 requests a second: per period of 10 s about 200, `avg` per second.
        assert!((10.0..30.0).contains(&busy["avg"].as_f64().unwrap()), "{busy}");
        assert_eq!(busy["count"], 10.0, "{busy}");
        // Every request took between 10 and 25 ms (the exporter's buckets): the percentiles
        // fall in there.
        for quantile in ["latency-p50", "latency-p95", "latency-p99"] {
            let latency = values(&metrics, quantile);
            assert!(!latency.is_empty(), "{path}: no {quantile}: {metrics:?}");
            for v in latency {
                let ms = v["max"].as_f64().unwrap();
                assert!((10.0..=25.0).contains(&ms), "{path}: {quantile} {ms} ms");
            }
        }
        // This cluster serves no metrics.k8s.io (no metrics-server): no memory, no CPU.
        assert!(values(&metrics, "memory").is_empty(), "{metrics:?}");
        assert!(values(&metrics, "cpu").is_empty(), "{metrics:?}");
    }
    // Another service of the app has no traffic at the ingress.
    let other: Vec<Value> = app.get_json(&format!("/apps/{name}/services/worker/metrics")).await;
    assert!(values(&other, "requests").iter().all(|v| v["sum"] == 0.0), "{other:?}");
}
