//! The rack-wide feed of typed events (`GET /events`, `GET /apps/{app}/events`) and the
//! Prometheus metrics: a whole build and deploy seen in order without a gap, on every
//! transport; resume after a disconnect; filters and credentials; a subscriber that never reads
//! does not slow a deployment down; `/metrics` parses and moves.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::deploys::{MANIFEST, SERVER, create_release, promote_follow};
use crate::helpers::{PASSWORD, TestApp, wait_for};

/// A client for streams: no overall time limit.
fn streaming() -> reqwest::Client {
    reqwest::Client::new()
}

/// Follows `path` as NDJSON (subscribed once this returns); sends each event (and notice) as
/// it comes.
async fn follow(app: &TestApp, path: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let response = streaming()
        .get(app.url(path))
        .basic_auth("rack", Some(PASSWORD))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if tx.send(serde_json::from_slice(&line).unwrap()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Receives events until one of `kind` for which `done` holds; returns them all.
async fn until(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let event = rx.recv().await.expect("the feed goes on");
            let stop = done(&event);
            seen.push(event);
            if stop {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; saw {:#?}", kinds(&seen)));
    seen
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap_or("?")).collect()
}

fn ids(events: &[Value]) -> Vec<i64> {
    events.iter().filter_map(|e| e["id"].as_i64()).collect()
}

/// What exists now, as NDJSON (`follow=false`).
async fn backlog(app: &TestApp, query: &str) -> Vec<Value> {
    let text = app.get_text(&format!("/events?follow=false&{query}")).await;
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Creates `name`, builds the fixture server; returns its release.
pub async fn built(app: &TestApp, name: &str) -> String {
    assert_eq!(app.create_app(name).await.status(), 201);
    let id = app
        .build_source(name, &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    build["release"].as_str().unwrap().to_owned()
}

fn finished(event: &Value) -> bool {
    event["kind"] == "deployment.finished"
}

#[tokio::test]
async fn a_build_and_deploy_arrive_typed_in_order_without_a_gap() {
    let app = TestApp::spawn().await;
    // Live from now: opened before anything happens.
    let mut live = follow(&app, "/events?app=shop").await;
    let mut app_path = follow(&app, "/apps/shop/events").await;
    let release = built(&app, "shop").await;
    promote_follow(&app, "shop", &release).await;
    let seen = until(&mut live, finished).await;
    let kinds = kinds(&seen);
    for (before, after) in [
        ("app.created", "build.created"),
        ("build.created", "build.started"),
        ("build.started", "build.succeeded"),
        ("release.created", "deployment.started"),
        ("build.succeeded", "deployment.started"),
        ("deployment.started", "deployment.state"),
        ("deployment.state", "deployment.line"),
        ("deployment.line", "app.updated"),
        ("app.updated", "deployment.finished"),
    ] {
        let first = kinds.iter().position(|k| *k == before);
        let second = kinds.iter().rposition(|k| *k == after);
        assert!(
            first.is_some() && second.is_some() && first < second,
            "{before} before {after}: {kinds:?}"
        );
    }
    assert!(kinds.contains(&"process.started"), "{kinds:?}");
    // Every event says what it concerns, and how to show it.
    for event in &seen {
        assert_eq!(event["app"], "shop", "{event}");
        assert!(
            event["at"].as_str().is_some() && event["message"].as_str().is_some(),
            "{event}"
        );
        let kind = event["kind"].as_str().unwrap();
        if kind.starts_with("build.") {
            assert!(event["build_id"].as_str().is_some(), "{event}");
        }
        if kind.starts_with("deployment.") {
            assert!(event["deployment_id"].as_str().is_some(), "{event}");
        }
        if kind.starts_with("process.") {
            assert!(event["process_id"].as_str().is_some(), "{event}");
        }
    }
    let states: Vec<(&str, &str)> = seen
        .iter()
        .filter(|e| e["kind"] == "deployment.state")
        .map(|e| (e["data"]["from"].as_str().unwrap(), e["data"]["to"].as_str().unwrap()))
        .collect();
    assert_eq!(states.first().map(|s| s.0), Some("pending"), "{states:?}");
    assert_eq!(states.last().map(|s| s.1), Some("running"), "{states:?}");
    for pair in states.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "each transition starts where the last ended: {states:?}"
        );
    }
    let end = seen.last().unwrap();
    assert_eq!(end["data"]["outcome"], "ok", "{end}");

    // No gap: the live stream holds exactly what the feed kept, in the same order.
    let live_ids = ids(&seen);
    assert!(live_ids.windows(2).all(|w| w[0] < w[1]), "{live_ids:?}");
    let kept = ids(&backlog(&app, "app=shop&after=0").await);
    assert_eq!(&kept[..live_ids.len()], &live_ids[..]);
    // And the app's own path says the same.
    assert_eq!(ids(&until(&mut app_path, finished).await), live_ids);
}

#[tokio::test]
async fn a_resumed_feed_loses_nothing_on_any_transport() {
    let app = TestApp::spawn().await;
    let release = built(&app, "resume").await;
    promote_follow(&app, "resume", &release).await;
    let all = ids(&backlog(&app, "app=resume&after=0").await);
    assert!(all.len() > 10, "{all:?}");

    // SSE: cut after five events, resumed with Last-Event-ID.
    let sse = |last: Option<i64>| {
        let mut request = streaming()
            .get(app.url("/events?app=resume&follow=false"))
            .basic_auth("rack", Some(PASSWORD))
            .header("accept", "text/event-stream");
        request = match last {
            Some(id) => request.header("last-event-id", id.to_string()),
            None => request.query(&[("after", "0")]),
        };
        request
    };
    let response = sse(None).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while text.matches("\n\n").count() < 5 {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(body);
    let parse = |text: &str| -> Vec<(i64, String, Value)> {
        text.split("\n\n")
            .filter_map(|block| {
                let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned);
                Some((
                    field("id: ")?.parse().ok()?,
                    field("event: ")?,
                    serde_json::from_str(&field("data: ")?).ok()?,
                ))
            })
            .collect()
    };
    let first = parse(&text);
    let (last, kind, data) = first.last().unwrap().clone();
    assert_eq!(data["kind"], kind, "the SSE event name is the kind");
    let rest = sse(Some(last)).send().await.unwrap().text().await.unwrap();
    let resumed: Vec<i64> = first
        .iter()
        .map(|e| e.0)
        .chain(parse(&rest).iter().map(|e| e.0))
        .collect();
    assert_eq!(resumed, all, "SSE resumed with Last-Event-ID");

    // Websocket: JSON text frames from `after`, then a close.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/apps/resume/events?follow=false&after={}", app.addr, all[3])
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Basic {}", basic()).parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let frames: Vec<Value> = socket
        .filter_map(|m| async move {
            match m {
                Ok(tokio_tungstenite::tungstenite::Message::Text(text)) => Some(serde_json::from_str(&text).unwrap()),
                _ => None,
            }
        })
        .collect()
        .await;
    assert_eq!(ids(&frames), all[4..], "websocket from after=");

    // NDJSON with `after`.
    assert_eq!(
        ids(&backlog(&app, &format!("app=resume&after={}", all[7])).await),
        all[8..]
    );
}

fn basic() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("rack:{PASSWORD}"))
}

#[tokio::test]
async fn filters_and_credentials_decide_what_a_reader_sees() {
    let app = TestApp::spawn().await;
    for name in ["mine", "theirs"] {
        assert_eq!(app.create_app(name).await.status(), 201);
        app.build_source(name, &[("convox.yml", MANIFEST), ("server.py", SERVER)])
            .await;
    }
    wait_for(60, "both builds end", || async {
        let events = backlog(&app, "after=0&kind=build.succeeded,build.failed").await;
        (events.len() == 2).then_some(())
    })
    .await;
    let builds = backlog(&app, "after=0&kind=build.").await;
    assert!(builds.iter().all(|e| e["kind"].as_str().unwrap().starts_with("build.")));
    assert_eq!(builds.iter().filter(|e| e["kind"] == "build.created").count(), 2);
    let apps = backlog(&app, "after=0&kind=app.,release.").await;
    let apps_kinds = kinds(&apps);
    assert!(
        apps_kinds
            .iter()
            .all(|k| k.starts_with("app.") || k.starts_with("release.")),
        "{apps_kinds:?}"
    );
    assert_eq!(
        apps_kinds.iter().filter(|k| **k == "app.created").count(),
        2,
        "{apps_kinds:?}"
    );
    assert_eq!(
        apps_kinds.iter().filter(|k| **k == "release.created").count(),
        2,
        "{apps_kinds:?}"
    );
    let mine = backlog(&app, "after=0&app=mine").await;
    assert!(!mine.is_empty() && mine.iter().all(|e| e["app"] == "mine"));

    // Bad filters say what is wrong.
    for (query, wanted) in [
        ("kind=deploy.", "no event kind starts with"),
        ("kind=", "kind names no event kind"),
        ("kind=,", "kind names no event kind"),
        ("app=Not_An_App", "invalid app name"),
        ("after=x", "invalid query string"),
        ("colour=red", "invalid query string"),
    ] {
        let response = app
            .request(Method::GET, &format!("/events?{query}"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 400, "{query}: {text}");
        assert!(text.contains(wanted), "{query}: {text}");
    }

    // A read token is enough; a token for some apps sees only theirs, wherever it asks.
    let token = |form: Vec<(&'static str, &'static str)>| {
        let request = app.json(Method::POST, "/tokens").form(&form);
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["token"].as_str().unwrap().to_owned()
        }
    };
    let scoped = token(vec![("name", "board"), ("role", "read"), ("apps", "mine")]).await;
    let get = |path: &str, secret: &str| app.client.get(app.url(path)).bearer_auth(secret).send();
    let text = get("/events?after=0&follow=false", &scoped)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let seen: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!seen.is_empty() && seen.iter().all(|e| e["app"] == "mine"), "{text}");
    assert_eq!(get("/events?app=theirs", &scoped).await.unwrap().status(), 403);
    assert_eq!(get("/apps/theirs/events", &scoped).await.unwrap().status(), 403);
    assert_eq!(get("/metrics", &scoped).await.unwrap().status(), 403);
    let reader = token(vec![("name", "grafana"), ("role", "read")]).await;
    assert_eq!(get("/metrics", &reader).await.unwrap().status(), 200);
    let response = streaming().get(app.url("/events")).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

/// Opens `count` subscribers that never read a byte: raw connections with the smallest
/// receive buffer, asking for the whole feed and the app's log.
async fn stuck_subscribers(app: &TestApp, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for i in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        let mut stream = socket.connect(app.addr).await.unwrap();
        let path = if i % 2 == 0 {
            "/events?after=0"
        } else {
            "/apps/slow/logs?since=0"
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Basic {}\r\naccept: text/event-stream\r\nsince: 0\r\n\r\n",
            app.addr,
            basic()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        held.push(stream);
    }
    held
}

#[tokio::test]
async fn subscribers_that_never_read_do_not_delay_a_deployment() {
    let app = TestApp::spawn().await;
    let first = built(&app, "slow").await;
    // Enough history that the stuck subscribers' sockets fill up and stay full.
    sqlx::query(
        "select rack_feed_append('slow', 'app.updated', null, null, null, null, repeat('x', 400) || n, '{}')
           from generate_series(1, 20000) as n",
    )
    .execute(&app.state.pool)
    .await
    .unwrap();
    let timed = |release: String| {
        let app = &app;
        async move {
            let started = Instant::now();
            let log = promote_follow(app, "slow", &release).await;
            assert!(log.ends_with("OK\n") || log.contains("Running"), "{log}");
            started.elapsed()
        }
    };
    let env = |value: &'static str| {
        let app = &app;
        async move {
            let release = create_release(app, "slow", &[("env", value)]).await;
            release["id"].as_str().unwrap().to_owned()
        }
    };
    let baseline = timed(first).await;
    let second = env("ROUND=2").await;
    let without = timed(second).await;
    let stuck = stuck_subscribers(&app, 20).await;
    // They read until their sockets are full, then stop: measure once the bus is quiet again.
    wait_for(60, "the stuck subscribers to fill their sockets", || {
        let bus = app.state.bus.clone();
        let before = bus.reads();
        async move {
            // A window with no read at all.
            tokio::time::sleep(Duration::from_millis(500)).await;
            (bus.reads() == before).then_some(())
        }
    })
    .await;
    // A subscriber that reads sees the deployment end while the others stay stuck.
    let mut reading = follow(&app, "/events?app=slow&kind=deployment.finished").await;
    let third = env("ROUND=3").await;
    let with = timed(third).await;
    until(&mut reading, finished).await;
    println!(
        "deployment: {:.2} s (first), {:.2} s without stuck subscribers, {:.2} s with 20",
        baseline.as_secs_f64(),
        without.as_secs_f64(),
        with.as_secs_f64()
    );
    assert!(
        with < without * 2 + Duration::from_secs(2),
        "with stuck subscribers {with:?} vs {without:?} without"
    );
    drop(stuck);
}

/// The samples of `/metrics`, parsed with a Prometheus text-format parser.
async fn scrape(app: &TestApp) -> Vec<prometheus_parse::Sample> {
    let response = app.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("the text format").samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_parse_and_move_after_a_deploy() {
    let app = TestApp::spawn().await;
    let before = scrape(&app).await;
    assert!(value(&before, "rack_deployments_total", &[("outcome", "ok")]) == 0.0);
    let release = built(&app, "counted").await;
    let _stream = follow(&app, "/events").await;
    promote_follow(&app, "counted", &release).await;
    // The worker counts right after it commits the end that the stream has just shown.
    let after = wait_for(10, "the deployment counted", || async {
        let samples = scrape(&app).await;
        (value(&samples, "rack_deployments_total", &[("outcome", "ok")]) == 1.0).then_some(samples)
    })
    .await;
    assert_eq!(
        value(&after, "rack_builds_total", &[("outcome", "ok")]),
        1.0,
        "{:?}",
        after
            .iter()
            .filter(|s| s.metric.starts_with("rack_build"))
            .collect::<Vec<_>>()
    );
    assert!(value(&after, "rack_build_duration_seconds_count", &[]) >= 1.0);
    assert!(value(&after, "rack_deployment_duration_seconds_count", &[]) >= 1.0);
    let promote = [("route", "/apps/:app/releases/:id/promote"), ("status", "200")];
    assert_eq!(
        value(&after, "rack_http_requests_total", &promote),
        1.0,
        "{:?}",
        after
            .iter()
            .filter(|s| s.metric == "rack_http_requests_total")
            .map(|s| format!("{:?}", s.labels))
            .collect::<Vec<_>>()
    );
    assert!(
        value(
            &after,
            "rack_http_request_duration_seconds_count",
            &[("route", "/apps/:app/builds")]
        ) >= 1.0
    );
    assert!(value(&after, "rack_streams_open", &[("kind", "feed")]) >= 1.0);
    assert_eq!(value(&after, "rack_queue_depth", &[("kind", "build")]), 0.0);
    assert!(value(&after, "rack_postgres_pool_connections", &[("state", "max")]) >= 1.0);
    assert!(value(&after, "rack_event_bus_reads", &[]) > value(&before, "rack_event_bus_reads", &[]));
    let names: HashMap<&str, ()> = after.iter().map(|s| (s.metric.as_str(), ())).collect();
    for name in [
        "rack_queue_oldest_age_seconds",
        "rack_event_bus_lag_seconds",
        "rack_event_bus_tails",
    ] {
        assert!(names.contains_key(name), "{name} missing");
    }
}

#[tokio::test]
async fn the_root_is_a_page_for_browsers_and_json_for_clients() {
    let app = TestApp::spawn().await;
    let page = streaming()
        .get(app.url("/"))
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        policy.contains("script-src 'sha256-") && policy.contains("connect-src 'self'"),
        "{policy}"
    );
    let html = page.text().await.unwrap();
    assert!(
        html.contains("id=\"login\"") && html.contains("/events"),
        "the page and its script"
    );
    let refused = streaming()
        .get(app.url("/"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let root: Value = app.get_json("/").await;
    assert_eq!(root["events"], "/events");
    // A script's failed request does not make the browser open its own password dialog.
    let scripted = streaming()
        .get(app.url("/apps"))
        .header("sec-fetch-mode", "cors")
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status(), 401);
    assert!(!scripted.headers().contains_key("www-authenticate"));
}

#[tokio::test]
async fn the_app_logs_settle_before_rack_closes_its_database() {
    use rack::runtime::AppLogs;
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("settled").await.status(), 201);
    // The app log's own pool, closed as rack's shutdown closes its own.
    let pool = sqlx::PgPool::connect(&app.database_url()).await.unwrap();
    let logs = rack::jobs::capabilities::PersistedLogs::new(pool.clone());
    let sink = logs.sink("settled");
    // A backlog, then the event: without the wait, it is still queued when the pool closes.
    for i in 0..1000 {
        sink.line("web:p-settle", format!("line {i}")).await;
    }
    let event = rack::runtime::ProcessEvent {
        app: "settled",
        service: "web",
        process: "p-settle",
        pid: 4242,
        exit: Some(0),
    };
    sink.process("web:p-settle", "exited 0".into(), event).await;
    tokio::time::timeout(Duration::from_secs(30), logs.settle())
        .await
        .expect("the writer stored its queue");
    pool.close().await;
    let feed = app.get_text("/events?after=0&follow=false&kind=process.exited").await;
    assert!(feed.contains("p-settle"), "{feed}");
    drop(sink);
}
