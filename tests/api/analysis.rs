//! Rollouts judged by their traffic on the local runtime: clients on 127.0.0.1 send requests
//! through the app's router while a release is promoted; a release that answers its health
//! check but fails real requests, or answers them slowly, is rolled back with the figures in
//! the rollout's log and the feed; a good one goes live; an app without traffic is not held up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::deploys::{create_release, promote_follow};
use crate::helpers::{TestApp, wait_for};

/// A web app whose answers to anything but `/health` fail (500) `FAIL_PERCENT` times in a
/// hundred (spread evenly), after `SLEEP_MS`; its health check always passes.
const SERVER: &str = r#"
import http.server, itertools, os, time
fail = int(os.environ.get("FAIL_PERCENT", "0"))
pause = int(os.environ.get("SLEEP_MS", "0")) / 1000
counter = itertools.count()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status = 200
        if self.path != "/health":
            n = next(counter)
            if pause:
                time.sleep(pause)
            # Spread evenly: 50 fails every other request.
            if (n + 1) * fail // 100 != n * fail // 100:
                status = 500
        body = f"{os.environ.get('RELEASE', '')} {status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// The analysis with a window long enough for a loaded machine and the default limits (5 %,
/// ratio 2, 20 requests).
const MANIFEST: &str = "services:\n  web:\n    command: python3 -u server.py\n    port: 3000\n    health: /health\n    deployment:\n      analysis:\n        window: 30\n";

/// Clients sending requests through a router until dropped; counts answers by body.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    answers: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(router: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let clients = (0..clients)
            .map(|_| {
                let (stop, sent, answers) = (stop.clone(), sent.clone(), answers.clone());
                let url = format!("http://{router}/");
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    while !stop.load(Ordering::SeqCst) {
                        let answer = match client.get(&url).timeout(Duration::from_secs(30)).send().await {
                            Ok(r) => r.text().await.unwrap_or_default().trim().to_owned(),
                            Err(_) => "failed".to_owned(),
                        };
                        sent.fetch_add(1, Ordering::SeqCst);
                        *answers.lock().unwrap().entry(answer).or_default() += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            answers,
            clients,
        }
    }

    /// Waits until `n` more requests were answered.
    async fn flowing(&self, n: usize) {
        let from = self.sent.load(Ordering::SeqCst);
        wait_for(60, "traffic through the router", || async {
            (self.sent.load(Ordering::SeqCst) >= from + n).then_some(())
        })
        .await;
    }

    /// Waits until `release` answered `n` more times (with `status`).
    async fn answered_by(&self, release: &str, status: u16, n: usize) {
        let key = format!("{release} {status}");
        let count = || self.answers.lock().unwrap().get(&key).copied().unwrap_or(0);
        let from = count();
        wait_for(60, &format!("{n} answers of {key}"), || async {
            (count() >= from + n).then_some(())
        })
        .await;
    }

    async fn stop(self) -> std::collections::BTreeMap<String, usize> {
        self.stop.store(true, Ordering::SeqCst);
        for client in self.clients {
            client.await.unwrap();
        }
        self.answers.lock().unwrap().clone()
    }
}

/// An app running the first release of [`SERVER`] with traffic flowing through its router.
async fn app_under_traffic(app: &TestApp, name: &str) -> (String, Traffic) {
    assert_eq!(app.create_app(name).await.status(), 201);
    let (first, log) = app
        .deploy_files(name, &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    // The first release has nothing to be compared with.
    assert!(!log.contains("analysis"), "{log}");
    let info: Value = app.get_app(name).await.json().await.unwrap();
    let router = info["router"].as_str().unwrap().to_owned();
    let traffic = Traffic::start(&router, 4);
    traffic.answered_by(&first, 200, 50).await;
    (first, traffic)
}

async fn release_with(app: &TestApp, name: &str, env: &str) -> String {
    create_release(app, name, &[("env", env)]).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn active_release(app: &TestApp, name: &str) -> String {
    let info: Value = app.get_app(name).await.json().await.unwrap();
    info["release"].as_str().unwrap().to_owned()
}

/// The `deployment.analysis` events of `name` so far.
async fn analysis_events(app: &TestApp, name: &str) -> Vec<Value> {
    let text = app
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
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn analysis_line(log: &str) -> &str {
    let line = log
        .lines()
        .find(|l| l.contains(" system/local/web analysis"))
        .unwrap_or_else(|| panic!("no analysis line in:\n{log}"));
    // The figures, for whoever runs the test with --nocapture.
    eprintln!("{line}");
    line
}

#[tokio::test]
async fn a_release_failing_real_requests_is_rolled_back_with_its_figures() {
    let app = TestApp::spawn().await;
    let (first, traffic) = app_under_traffic(&app, "flaky").await;
    let bad = release_with(&app, "flaky", "FAIL_PERCENT=50").await;
    let log = promote_follow(&app, "flaky", &bad).await;
    let line = analysis_line(&log);
    assert!(
        line.contains(&format!("analysis: {bad} 5xx ")) && line.contains(&format!(" vs {first} ")),
        "{line}"
    );
    assert!(line.contains("(limit 5%): rolling back"), "{line}");
    assert!(log.contains("Status: Updating => Error"), "{log}");
    assert!(log.contains("Status: Rollback => Reverted"), "{log}");
    assert!(!log.ends_with("OK\n"), "{log}");
    assert_eq!(active_release(&app, "flaky").await, first);
    // Back on the first release only: it answers, and the bad one is gone.
    traffic.answered_by(&first, 200, 50).await;
    let events = analysis_events(&app, "flaky").await;
    let event = events.last().unwrap_or_else(|| panic!("no analysis event"));
    assert_eq!(event["data"]["verdict"], "failed", "{event}");
    assert_eq!(event["release_id"], bad.as_str(), "{event}");
    assert!(event["deployment_id"].as_str().is_some(), "{event}");
    let new = &event["data"]["new"];
    assert!(
        new["errors"].as_u64().unwrap() * 4 >= new["requests"].as_u64().unwrap(),
        "{event}"
    );
    assert!(new["requests"].as_u64().unwrap() >= 20, "{event}");
    let answers = traffic.stop().await;
    assert!(
        answers.get(&format!("{bad} 500")).copied().unwrap_or(0) > 0,
        "{answers:?}"
    );
}

#[tokio::test]
async fn a_good_release_under_the_same_traffic_goes_live_and_says_it_passed() {
    let app = TestApp::spawn().await;
    let (first, traffic) = app_under_traffic(&app, "steady").await;
    let good = release_with(&app, "steady", "FAIL_PERCENT=0").await;
    let log = promote_follow(&app, "steady", &good).await;
    let line = analysis_line(&log);
    assert!(line.contains(&format!("analysis passed: {good} 5xx 0.0%")), "{line}");
    assert!(line.contains(&format!(" vs {first} 0.0%")), "{line}");
    assert!(log.ends_with("OK\n"), "{log}");
    assert_eq!(active_release(&app, "steady").await, good);
    traffic.answered_by(&good, 200, 20).await;
    let events = analysis_events(&app, "steady").await;
    assert_eq!(events.last().unwrap()["data"]["verdict"], "passed", "{events:?}");
    let answers = traffic.stop().await;
    assert_eq!(answers.get("failed"), None, "{answers:?}");
}

#[tokio::test]
async fn a_slow_release_is_rolled_back_on_its_latency() {
    let app = TestApp::spawn().await;
    let (first, traffic) = app_under_traffic(&app, "sluggish").await;
    let slow = release_with(&app, "sluggish", "SLEEP_MS=600").await;
    let log = promote_follow(&app, "sluggish", &slow).await;
    let line = analysis_line(&log);
    assert!(
        line.contains(&format!("analysis: {slow} p95 ")) && line.contains("(ratio "),
        "{line}"
    );
    assert!(line.ends_with("limit 2): rolling back"), "{line}");
    assert!(log.contains("Status: Rollback => Reverted"), "{log}");
    assert_eq!(active_release(&app, "sluggish").await, first);
    let events = analysis_events(&app, "sluggish").await;
    let event = events.last().unwrap();
    assert_eq!(event["data"]["verdict"], "failed", "{event}");
    assert!(event["data"]["new"]["p95_ms"].as_f64().unwrap() >= 600.0, "{event}");
    traffic.stop().await;
}

#[tokio::test]
async fn an_app_without_traffic_skips_the_analysis_at_once() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("quiet").await.status(), 201);
    app.deploy_files("quiet", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let second = release_with(&app, "quiet", "FAIL_PERCENT=100").await;
    let started = Instant::now();
    let log = promote_follow(&app, "quiet", &second).await;
    // Well under the 30 s window, even on a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(25), "{:?}", started.elapsed());
    let line = analysis_line(&log);
    assert!(
        line.contains("analysis skipped: 0 requests in the last 30s (fewer than 20)"),
        "{line}"
    );
    assert!(log.ends_with("OK\n"), "{log}");
    let events = analysis_events(&app, "quiet").await;
    assert_eq!(events.last().unwrap()["data"]["verdict"], "skipped", "{events:?}");
}

#[tokio::test]
async fn analysis_false_turns_it_off() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("unjudged").await.status(), 201);
    let off = MANIFEST.replace("analysis:\n        window: 30", "analysis: false");
    app.deploy_files("unjudged", &[("convox.yml", &off), ("server.py", SERVER)])
        .await;
    let info: Value = app.get_app("unjudged").await.json().await.unwrap();
    let traffic = Traffic::start(info["router"].as_str().unwrap(), 2);
    traffic.flowing(50).await;
    let bad = release_with(&app, "unjudged", "FAIL_PERCENT=50").await;
    let log = promote_follow(&app, "unjudged", &bad).await;
    assert!(!log.contains("analysis"), "{log}");
    assert!(log.ends_with("OK\n"), "{log}");
    traffic.stop().await;
}
