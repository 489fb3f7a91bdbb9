//! Tests of `prometheus.rs`: the queries, the reading of Prometheus' answers, the verdict on
//! the ingress figures, and a Prometheus that is down, hangs or errs (bounded, never hanging).

use std::time::{Duration, Instant};

use serde_json::json;

use super::analysis::Times;
use super::prometheus::{Prometheus, Target, decide, figures, queries, value, verdict};
use crate::deploy::analysis::{Figures, Names, Verdict};
use crate::manifest::Analysis;

const TARGET: Target<'static> = Target {
    namespace: "rack-shop",
    ingress: "web",
    service: "web",
};

const NAMES: Names<'static> = Names {
    new: "RNEW",
    old: "ROLD",
};

fn answer(value: &str) -> serde_json::Value {
    json!({ "status": "success", "data": { "resultType": "vector",
        "result": [{ "metric": {}, "value": [1_700_000_000.5, value] }] } })
}

#[test]
fn the_queries_select_the_service_behind_its_ingress() {
    let [requests, errors, p95] = queries(&TARGET, 30);
    assert_eq!(
        requests,
        r#"sum(increase(nginx_ingress_controller_requests{namespace="rack-shop",ingress="web",service="web"}[30s]))"#
    );
    assert_eq!(
        errors,
        r#"sum(increase(nginx_ingress_controller_requests{namespace="rack-shop",ingress="web",service="web",status=~"5.."}[30s]))"#
    );
    assert_eq!(
        p95,
        r#"histogram_quantile(0.95, sum by (le) (increase(nginx_ingress_controller_request_duration_seconds_bucket{namespace="rack-shop",ingress="web",service="web"}[30s])))"#
    );
    let odd = Target {
        namespace: "a\"b",
        ingress: "c\\d",
        service: "web",
    };
    assert!(queries(&odd, 1)[0].contains(r#"namespace="a\"b",ingress="c\\d""#));
}

#[test]
fn answers_are_read_as_a_value_nothing_or_an_error() {
    assert_eq!(value(&answer("12.5")), Ok(Some(12.5)));
    assert_eq!(value(&answer("NaN")), Ok(None), "a quantile of no requests");
    let empty = json!({ "status": "success", "data": { "resultType": "vector", "result": [] } });
    assert_eq!(value(&empty), Ok(None), "no series: no traffic");
    let bad = json!({ "status": "error", "errorType": "bad_data", "error": "parse error at char 5" });
    assert_eq!(value(&bad), Err("bad_data: parse error at char 5".to_owned()));
    assert!(value(&json!({ "status": "success" })).is_err());
    assert!(value(&answer("many")).is_err());
}

#[test]
fn extrapolated_counts_are_rounded_and_a_p95_needs_requests() {
    let f = figures(Some(199.6), Some(20.2), Some(0.0425));
    assert_eq!(f.requests, 200);
    assert_eq!(f.errors, 20);
    assert_eq!(f.p95, Some(Duration::from_secs_f64(0.0425)));
    assert_eq!(figures(None, None, Some(0.1)), Figures::default(), "no traffic");
    assert_eq!(
        figures(Some(3.0), Some(5.0), None).errors,
        3,
        "never more errors than requests"
    );
}

#[test]
fn the_ingress_verdict_uses_the_limits_of_the_manifest() {
    let s = Analysis {
        window: 10,
        min_requests: 20,
        ..Analysis::default()
    };
    let old = figures(Some(200.0), Some(0.0), Some(0.02));
    let Verdict::Failed(line) = verdict(&s, NAMES, &figures(Some(200.0), Some(100.0), Some(0.02)), &old, 10) else {
        panic!("not failed")
    };
    assert_eq!(
        line,
        "analysis at the ingress: RNEW 5xx 50.0% (100 of 200) vs ROLD 0.0% over 10s (limit 5%): rolling back"
    );
    let Verdict::Failed(line) = verdict(&s, NAMES, &figures(Some(200.0), Some(0.0), Some(0.4)), &old, 12) else {
        panic!("not failed")
    };
    assert_eq!(
        line,
        "analysis at the ingress: RNEW p95 400ms vs ROLD 20ms over 12s (ratio 8.0, limit 2): rolling back"
    );
    let Verdict::Passed(line) = verdict(&s, NAMES, &figures(Some(200.0), Some(2.0), Some(0.02)), &old, 10) else {
        panic!("not passed")
    };
    assert_eq!(
        line,
        "analysis at the ingress passed: RNEW 5xx 1.0% (2 of 200) vs ROLD 0.0%, p95 20ms vs 20ms over 10s"
    );
    let Verdict::Skipped(line) = verdict(&s, NAMES, &figures(Some(5.0), Some(5.0), Some(0.02)), &old, 10) else {
        panic!("not skipped")
    };
    assert_eq!(
        line,
        "analysis at the ingress skipped: RNEW served 5 requests in 10s (fewer than 20)"
    );
    // A range shorter than the window (clocks) still counts as the whole window.
    assert!(matches!(
        verdict(&s, NAMES, &figures(Some(100.0), Some(6.0), Some(0.02)), &old, 3),
        Verdict::Failed(_)
    ));
}

#[test]
fn a_prometheus_that_fails_skips_and_never_fails_the_rollout() {
    let s = Analysis::default();
    let error = Err("http://127.0.0.1:9/api/v1/query: no answer in time".to_owned());
    let Verdict::Skipped(line) = decide(&s, NAMES, &error) else {
        panic!("not skipped")
    };
    assert_eq!(
        line,
        "analysis at the ingress skipped: Prometheus failed (http://127.0.0.1:9/api/v1/query: no answer in time); the pods alone judged RNEW"
    );
    let bad = figures(Some(300.0), Some(150.0), Some(0.02));
    assert!(matches!(
        decide(&s, NAMES, &Ok((bad, Figures::default(), 30))),
        Verdict::Failed(_)
    ));
}

#[test]
fn the_new_window_runs_from_the_first_ready_pod_and_the_old_one_ends_at_the_rollout() {
    let times = Times {
        began: 1_000,
        ready: 1_012,
    };
    // The pod watch waited out the window: the new pods' whole traffic so far.
    assert_eq!(times.windows(1_042, 30), ((None, 30), (Some(1_000), 30)));
    // Taken over long after: everything since they took traffic.
    assert_eq!(times.windows(1_612, 30), ((None, 600), (Some(1_000), 30)));
    // Clocks that disagree never make a window shorter than the setting.
    assert_eq!(times.windows(1_000, 30), ((None, 30), (Some(1_000), 30)));
}

#[tokio::test]
async fn a_prometheus_that_is_down_hangs_or_errs_is_an_error_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    // Down: nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = Prometheus::new(&format!("http://127.0.0.1:{port}/"), timeout).unwrap();
    let error = down.figures(&TARGET, 30, None).await.unwrap_err();
    assert!(
        error.starts_with(&format!("http://127.0.0.1:{port}/api/v1/query: ")),
        "{error}"
    );

    // Hangs: accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        loop {
            let (socket, _) = silent.accept().await.unwrap();
            kept.push(socket);
        }
    });
    let hung = Prometheus::new(&format!("http://{address}"), timeout).unwrap();
    let started = Instant::now();
    let error = hung.figures(&TARGET, 30, None).await.unwrap_err();
    assert!(error.ends_with("no answer in time"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    held.abort();

    // Errs: an HTTP error with Prometheus' JSON, and one without.
    let errs = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = errs.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for body in [
            r#"{"status":"error","errorType":"bad_data","error":"invalid parameter"}"#,
            "overloaded",
        ] {
            let (mut socket, _) = errs.accept().await.unwrap();
            let mut buffer = [0u8; 4096];
            let _ = socket.read(&mut buffer).await.unwrap();
            let response = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
        }
    });
    let erring = Prometheus::new(&format!("http://{address}"), timeout).unwrap();
    let error = erring.query("up", Some(1_000)).await.unwrap_err();
    assert!(error.ends_with("bad_data: invalid parameter"), "{error}");
    let error = erring.query("up", None).await.unwrap_err();
    assert!(error.ends_with("HTTP 400 Bad Request"), "{error}");
    server.await.unwrap();
}
