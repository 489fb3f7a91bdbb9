//! Metrics per app and service (convox `AppMetrics`, `ServiceMetrics`): traffic sent through
//! the router to a process app, read back with the convox SDK's query (`start`, `end` in its
//! time format, `period`, `metrics`) in its shape, the counts and failures exactly as sent.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, wait_for};

/// Answers 500 on `/fail`, 200 elsewhere.
const SERVER: &str = r#"import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(500 if self.path.startswith("/fail") else 200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

const MANIFEST: &str = "services:\n  web:\n    command: python3 -u server.py\n    port: 3000\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n";

/// The sum of the `sum` of every value of metric `name`.
fn total(metrics: &[Value], name: &str) -> f64 {
    metrics
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {metrics:?}"))["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["sum"].as_f64().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_count_the_requests_and_errors_sent_through_the_router() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("measured").await.status(), 201);
    app.deploy_files("measured", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let info: Value = app.get_json("/apps/measured").await;
    let router = info["router"].as_str().unwrap().to_owned();
    // The window starts now: the rollout's own checks do not pass through the router.
    let start = chrono::Utc::now() - chrono::Duration::seconds(3);
    let client = reqwest::Client::new();
    for i in 0..30 {
        let path = if i % 5 == 0 { "/fail" } else { "/" };
        let status = client
            .get(format!("http://{router}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), if path == "/fail" { 500 } else { 200 });
    }
    let query = |end: chrono::DateTime<chrono::Utc>| {
        vec![
            ("start", start.format("%Y%m%d.%H%M%S.%f").to_string()),
            ("end", end.format("%Y%m%d.%H%M%S.%f").to_string()),
            ("period", "10".to_owned()),
        ]
    };
    for path in ["/apps/measured/metrics", "/apps/measured/services/web/metrics"] {
        // The router counts a response once it has been sent: wait for the last one.
        let metrics: Vec<Value> = wait_for(30, "the requests to be counted", || async {
            let response = app
                .convox(Method::GET, path)
                .query(&query(chrono::Utc::now() + chrono::Duration::seconds(1)))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let metrics: Vec<Value> = response.json().await.unwrap();
            (total(&metrics, "requests") >= 30.0).then_some(metrics)
        })
        .await;
        assert_eq!(total(&metrics, "requests"), 30.0, "{path}: {metrics:?}");
        assert_eq!(total(&metrics, "errors"), 6.0, "{path}: {metrics:?}");
        let names: Vec<&str> = metrics.iter().map(|m| m["name"].as_str().unwrap()).collect();
        assert_eq!(&names[..3], ["requests", "errors", "latency-p95"]);
        let latency = &metrics[2]["values"][0];
        assert!(latency["max"].as_f64().unwrap() > 0.0, "{latency}");
        // Memory comes from the instances' cgroups, which rack sets as root on cgroup v1.
        let cgroups =
            nix::unistd::geteuid().is_root() && std::path::Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists();
        if cgroups {
            let memory = &metrics[3]["values"][0];
            assert!(memory["sum"].as_f64().unwrap() > 0.0, "{path}: {memory}");
            assert_eq!(memory["count"], 1.0, "{path}: one instance");
        }
        for value in metrics[0]["values"].as_array().unwrap() {
            for field in ["time", "avg", "count", "max", "min", "sum"] {
                assert!(value.get(field).is_some(), "{field} missing in {value}");
            }
        }
    }
    // Only the metrics asked for; another service has none; a bad name is a 400.
    let only: Vec<Value> = app
        .convox(Method::GET, "/apps/measured/metrics")
        .query(&[("metrics", "errors")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["name"], "errors");
    let other: Vec<Value> = app.get_json("/apps/measured/services/worker/metrics").await;
    assert_eq!(total(&other, "requests"), 0.0);
    let bad = app
        .convox(Method::GET, "/apps/measured/metrics")
        .query(&[("metrics", "bogus")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
