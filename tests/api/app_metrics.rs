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

#[tokio::test]
async fn a_router_a_release_stops_hands_its_last_seconds_to_the_history() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("retired").await.status(), 201);
    app.deploy_files("retired", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let info: Value = app.get_json("/apps/retired").await;
    let router = info["router"].as_str().unwrap().to_owned();
    let client = reqwest::Client::new();
    for _ in 0..12 {
        let response = client.get(format!("http://{router}/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // Straight away (no metrics request, which would write them first), a release without
    // `web` stops its router; what it served must still reach the history.
    let other = MANIFEST.replace("  web:", "  other:");
    app.deploy_files("retired", &[("convox.yml", other.as_str()), ("server.py", SERVER)])
        .await;
    let written: i64 = wait_for(60, "web's requests in the history", || async {
        rack::jobs::metrics::flush(&app.state).await;
        let n: Option<i64> = sqlx::query_scalar(
            "select sum(requests)::bigint from metric_minutes where app = 'retired' and service = 'web'",
        )
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        n.filter(|n| *n >= 12)
    })
    .await;
    assert_eq!(written, 12, "each request once");
}

/// A busy service (a spinning process beside its server) and an idle one.
const BUSY_MANIFEST: &str = "services:\n  busy:\n    command: sh -c 'python3 spin.py & exec python3 -u server.py'\n    port: 3000\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n  idle:\n    command: python3 -u server.py\n    port: 3000\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n";

/// The `cpu` of `service`'s metrics now (cores), once the runtime has two readings to tell.
async fn cpu_now(app: &TestApp, service: &str) -> Option<f64> {
    let response = app
        .convox(Method::GET, &format!("/apps/busyidle/services/{service}/metrics"))
        .query(&[("metrics", "cpu")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics: Vec<Value> = response.json().await.unwrap();
    assert_eq!(metrics[0]["name"], "cpu");
    metrics[0]["values"]
        .as_array()
        .unwrap()
        .last()
        .map(|v| v["sum"].as_f64().unwrap())
}

#[tokio::test]
async fn cpu_per_process_comes_from_its_cgroup_busy_above_zero_idle_near_zero() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("busyidle").await.status(), 201);
    app.deploy_files(
        "busyidle",
        &[
            ("convox.yml", BUSY_MANIFEST),
            ("server.py", SERVER),
            ("spin.py", "while True:\n    pass\n"),
        ],
    )
    .await;
    let cgroups =
        nix::unistd::geteuid().is_root() && std::path::Path::new("/sys/fs/cgroup/cpuacct/cgroup.procs").exists();
    if !cgroups {
        // Without cgroups (a normal user) the runtime cannot tell: no value rather than a 0.
        assert_eq!(cpu_now(&app, "busy").await, None);
        return;
    }
    // A spinning process uses most of a core even on a loaded machine; a tenth is a floor no
    // scheduler goes under for long.
    let busy = wait_for(60, "the busy service's CPU", || async {
        cpu_now(&app, "busy").await.filter(|cores| *cores > 0.1)
    })
    .await;
    assert!(busy <= 1.5, "one spinning process and an idle server: {busy} cores");
    let idle = wait_for(60, "the idle service's CPU", || async { cpu_now(&app, "idle").await }).await;
    assert!(idle < 0.05, "an idle server: {idle} cores");
    println!("cpu: busy {busy:.3} cores, idle {idle:.3} cores");
    // The history keeps it per minute (written every 10 s and on each metrics request).
    let recorded: f64 = wait_for(60, "the busy service's CPU in the history", || async {
        cpu_now(&app, "busy").await;
        let cpu: Option<f64> =
            sqlx::query_scalar("select max(cpu) from metric_minutes where app = 'busyidle' and service = 'busy'")
                .fetch_one(&app.state.pool)
                .await
                .unwrap();
        cpu.filter(|cores| *cores > 0.1)
    })
    .await;
    assert!(recorded <= 1.5, "{recorded} cores");
    // `ps` (convox's processes) says the same per process.
    let processes: Vec<Value> = app.get_json("/apps/busyidle/processes").await;
    let cpu_of = |service: &str| {
        processes
            .iter()
            .find(|p| p["name"] == service)
            .unwrap_or_else(|| panic!("no {service} in {processes:?}"))["cpu"]
            .as_f64()
            .unwrap()
    };
    assert!(cpu_of("busy") > 0.1, "{processes:?}");
    assert!(cpu_of("idle") < 0.05, "{processes:?}");
}

/// The totals of `path` over the window `start..end` in periods of `period` seconds.
async fn totals(
    app: &TestApp,
    path: &str,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
    period: u64,
) -> Vec<Value> {
    let response = app
        .convox(Method::GET, path)
        .query(&[
            ("start", start.format("%Y%m%d.%H%M%S.%f").to_string()),
            ("end", end.format("%Y%m%d.%H%M%S.%f").to_string()),
            ("period", period.to_string()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// One minute of `requests` (`errors` of them failed), all of them `latency` long.
fn minute(
    at: chrono::DateTime<chrono::Utc>,
    requests: i64,
    errors: i64,
    latency: std::time::Duration,
) -> rack::store::metric_minutes::Served {
    let mut histogram = vec![0; rack::runtime::LATENCY_BUCKETS];
    histogram[rack::runtime::latency_bucket(latency)] = requests;
    rack::store::metric_minutes::Served {
        app: "history".to_owned(),
        service: "web".to_owned(),
        release: "RPAST".to_owned(),
        minute: at,
        seconds: 60,
        requests,
        errors,
        requests_range: (0, requests),
        errors_range: (0, errors),
        latency: histogram,
        memory: Some((64 << 20, 1)),
        cpu: Some(0.5),
    }
}

#[tokio::test]
async fn history_answers_hours_back_from_the_minutes_every_replica_adds() {
    use chrono::{DurationRound, TimeDelta, Utc};
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("history").await.status(), 201);
    app.deploy_files("history", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let router = app.get_json::<Value>("/apps/history").await["router"]
        .as_str()
        .unwrap()
        .to_owned();
    // Minutes of two and one and a half hours ago, far older than a router's memory (256 s):
    // the first one written by two routers (two replicas), which add up.
    let now = Utc::now().duration_trunc(TimeDelta::minutes(1)).unwrap();
    let (two_hours, ninety) = (now - TimeDelta::hours(2), now - TimeDelta::minutes(90));
    let fast = std::time::Duration::from_millis(5);
    let slow = std::time::Duration::from_millis(400);
    let pool = &app.state.pool;
    rack::store::metric_minutes::add(pool, &[minute(two_hours, 100, 7, fast)])
        .await
        .unwrap();
    rack::store::metric_minutes::add(pool, &[minute(two_hours, 50, 3, fast), minute(ninety, 20, 0, slow)])
        .await
        .unwrap();
    // And traffic now, through the router: 30 requests, 6 failures.
    let client = reqwest::Client::new();
    for i in 0..30 {
        let path = if i % 5 == 0 { "/fail" } else { "/" };
        client.get(format!("http://{router}{path}")).send().await.unwrap();
    }
    // Three hours by the hour: the old minutes and the router's (written as the request is
    // answered, each second once).
    let (start, end) = (now - TimeDelta::hours(3), Utc::now() + TimeDelta::minutes(1));
    let metrics = wait_for(60, "the router's requests in the history", || async {
        let metrics = totals(&app, "/apps/history/metrics", start, end, 3600).await;
        (total(&metrics, "requests") >= 200.0).then_some(metrics)
    })
    .await;
    assert_eq!(total(&metrics, "requests"), 200.0, "{metrics:?}");
    assert_eq!(total(&metrics, "errors"), 16.0, "{metrics:?}");
    // Asked again (the router flushed again): nothing counted twice.
    let again = totals(&app, "/apps/history/services/web/metrics", start, end, 3600).await;
    assert_eq!(
        (total(&again, "requests"), total(&again, "errors")),
        (200.0, 16.0),
        "{again:?}"
    );
    let other = totals(&app, "/apps/history/services/worker/metrics", start, end, 3600).await;
    assert_eq!(total(&other, "requests"), 0.0);

    // By the minute: each old minute at its time, with its latency and memory.
    let by_minute = totals(
        &app,
        "/apps/history/metrics",
        two_hours,
        now - TimeDelta::minutes(60),
        60,
    )
    .await;
    let value_at = |name: &str, at: chrono::DateTime<Utc>| -> Value {
        let metric = by_minute.iter().find(|m| m["name"] == name).unwrap();
        metric["values"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| {
                v["time"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    == Some(at.into())
            })
            .unwrap_or_else(|| panic!("no {name} at {at} in {metric}"))
            .clone()
    };
    assert_eq!(value_at("requests", two_hours)["sum"], 150.0);
    assert_eq!(value_at("requests", two_hours)["count"], 60.0, "seconds measured");
    assert_eq!(value_at("errors", ninety)["sum"], 0.0);
    let p99_fast = value_at("latency-p99", two_hours)["max"].as_f64().unwrap();
    let p99_slow = value_at("latency-p99", ninety)["max"].as_f64().unwrap();
    assert!((5.0..6.5).contains(&p99_fast), "{p99_fast} ms");
    assert!((400.0..500.0).contains(&p99_slow), "{p99_slow} ms");
    assert_eq!(value_at("memory", ninety)["sum"], 64.0, "MiB");
    assert_eq!(value_at("cpu", ninety)["sum"], 0.5, "cores");

    // A second replica on the same database answers the same history: what this one's router
    // served reaches it through the rows, once.
    let replica = TestApp::spawn_on(&app.database_url(), |_| {}).await;
    let there = totals(&replica, "/apps/history/metrics", start, end, 3600).await;
    assert_eq!(
        (total(&there, "requests"), total(&there, "errors")),
        (200.0, 16.0),
        "{there:?}"
    );
    replica.stop().await;

    // Retention: a minute older than `metrics_retention_days` (7 by default) is pruned.
    let old = now - TimeDelta::days(8);
    rack::store::metric_minutes::add(pool, &[minute(old, 9, 0, fast)])
        .await
        .unwrap();
    rack::jobs::metrics::prune(&app.state).await;
    let kept = rack::store::metric_minutes::read(pool, "history", None, old - TimeDelta::days(1), end)
        .await
        .unwrap();
    assert!(kept.iter().all(|r| r.minute > old), "{kept:?}");
    assert_eq!(kept.iter().map(|r| r.requests).sum::<i64>(), 200);
}

/// A real `rack server` stopped with SIGTERM right after its router served some requests: its
/// last write to the history takes the router's present second too, so every request is there.
#[tokio::test]
async fn a_server_stopped_by_sigterm_writes_its_routers_last_second_to_the_history() {
    use crate::replicas::{Replica, create_app};
    let database = crate::helpers::fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let mut server = Replica::start(&database, data.path(), &[]).await;
    create_app(&server, "lastsecond").await;
    let id = server
        .build("lastsecond", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let release = server.wait_build("lastsecond", &id).await["release"]
        .as_str()
        .unwrap()
        .to_owned();
    let promoted = server
        .request(Method::POST, &format!("/apps/lastsecond/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    assert!(promoted.status().is_success(), "{}", promoted.status());
    let router = wait_for(90, "the app to run", || async {
        let app = server.json("/apps/lastsecond").await;
        (app["status"] == "running" && app["release"] == release.as_str())
            .then(|| app["router"].as_str().map(str::to_owned))
            .flatten()
    })
    .await;
    let client = reqwest::Client::new();
    for _ in 0..12 {
        let response = client.get(format!("http://{router}/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // At once: no flush has taken the present second yet.
    server.sigterm().await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&database)
        .await
        .unwrap();
    let written: Option<i64> = sqlx::query_scalar(
        "select sum(requests)::bigint from metric_minutes where app = 'lastsecond' and service = 'web'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(written, Some(12), "every request once");
}
