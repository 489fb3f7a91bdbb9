//! Webhooks: a real receiver on 127.0.0.1 that fails, hangs past the timeout, then takes the
//! delivery; signatures checked as a receiver would; a rack killed mid-delivery; private
//! addresses refused without RACK_WEBHOOK_ALLOW_PRIVATE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, fresh_database, wait_for};
use crate::replicas::{Replica, create_app};

/// What the receiver does with the nth request (from 1) of a delivery id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// Never answers (until rack gives up on the connection).
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    answer: Answer,
    kind: String,
    timestamp: String,
    signature: String,
    body: Bytes,
}

/// A webhook receiver on 127.0.0.1.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    hung: Arc<tokio::sync::Notify>,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: fn(usize) -> Answer) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let hung = Arc::new(tokio::sync::Notify::new());
        let (log, notify) = (got.clone(), hung.clone());
        let handler = move |headers: HeaderMap, body: Bytes| {
            let (log, notify) = (log.clone(), notify.clone());
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let id = header("rack-webhook-id");
                let answer = {
                    let mut log = log.lock().unwrap();
                    let nth = log.iter().filter(|r| r.id == id).count() + 1;
                    let answer = script(nth);
                    log.push(Received {
                        id,
                        answer,
                        kind: header("rack-webhook-event"),
                        timestamp: header("rack-webhook-timestamp"),
                        signature: header("rack-webhook-signature"),
                        body,
                    });
                    answer
                };
                match answer {
                    Answer::Status(status) => (StatusCode::from_u16(status).unwrap(), "thanks"),
                    Answer::Hang => {
                        notify.notify_one();
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                }
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/hook", axum::routing::post(handler));
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self {
            addr,
            got,
            hung,
            _server: server,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The deliveries it took (answered 2xx), by id: how many times each.
    fn taken(&self) -> HashMap<String, usize> {
        let mut taken = HashMap::new();
        for r in self.received() {
            if matches!(r.answer, Answer::Status(s) if (200..300).contains(&s)) {
                *taken.entry(r.id).or_default() += 1;
            }
        }
        taken
    }
}

/// Checks a request as the README tells receivers to: HMAC-SHA256 of `<timestamp>.<body>`.
fn signed_by(secret: &str, r: &Received) -> bool {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(r.timestamp.as_bytes());
    mac.update(b".");
    mac.update(&r.body);
    let Some(hex) = r.signature.strip_prefix("v1=") else {
        return false;
    };
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    expected == hex
}

async fn create_hook(app: &TestApp, url: &str, events: &str) -> (String, String) {
    let response = app
        .json(Method::POST, "/webhooks")
        .json(&serde_json::json!({ "url": url, "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let hook: Value = response.json().await.unwrap();
    (
        hook["id"].as_str().unwrap().to_owned(),
        hook["secret"].as_str().unwrap().to_owned(),
    )
}

/// The hook's deliveries once `done` holds for all `count` of them.
async fn deliveries_when(
    app: &TestApp,
    hook: &str,
    count: usize,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    wait_for(60, what, || async {
        let list: Vec<Value> = app.get_json(&format!("/webhooks/{hook}/deliveries")).await;
        (list.len() == count && list.iter().all(&done)).then_some(list)
    })
    .await
}

fn fast_retries(config: &mut rack::config::Config) {
    config.webhooks.allow_private = true;
    config.webhooks.timeout = Duration::from_secs(1);
    config.webhooks.retry_base = Duration::from_millis(50);
    config.webhooks.retry_max = Duration::from_millis(200);
}

#[tokio::test]
async fn a_receiver_that_fails_then_times_out_then_succeeds_gets_each_event_once() {
    let app = TestApp::spawn_with(fast_retries).await;
    let receiver = Receiver::start(|nth| match nth {
        1 => Answer::Status(500),
        2 => Answer::Hang,
        _ => Answer::Status(204),
    })
    .await;
    let (hook, secret) = create_hook(&app, &receiver.url(), "app.created").await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    let shown: Value = app.get_json(&format!("/webhooks/{hook}")).await;
    assert!(shown.get("secret").is_none(), "the secret is shown once: {shown}");

    for name in ["one", "two", "three"] {
        assert_eq!(app.create_app(name).await.status(), 201);
    }
    let deliveries = deliveries_when(&app, &hook, 3, "three deliveries to be delivered", |d| {
        d["state"] == "delivered"
    })
    .await;

    // Exactly one accepted request per event, under the delivery's id.
    let taken = receiver.taken();
    assert_eq!(taken.len(), 3, "{taken:?}");
    assert!(taken.values().all(|n| *n == 1), "{taken:?}");
    let mut apps = Vec::new();
    for delivery in &deliveries {
        let id = delivery["id"].as_str().unwrap();
        assert_eq!(taken.get(id), Some(&1), "{delivery}");
        // Every attempt is in the log: refused, timed out, taken.
        let log = delivery["attempts_log"].as_array().unwrap();
        assert_eq!(log.len(), 3, "{delivery}");
        assert_eq!(log[0]["status"], 500, "{delivery}");
        assert!(log[0]["response"].as_str().unwrap().contains("thanks"), "{delivery}");
        assert!(log[1]["status"].is_null(), "{delivery}");
        assert!(log[1]["error"].as_str().unwrap().contains("timed out"), "{delivery}");
        assert_eq!(log[2]["status"], 204, "{delivery}");
        assert_eq!(delivery["attempts"], 3);
        apps.push(delivery["app"].as_str().unwrap().to_owned());
    }
    apps.sort();
    assert_eq!(apps, ["one", "three", "two"]);

    // Every request is signed with the hook's secret, and says what it carries.
    for r in receiver.received() {
        assert!(signed_by(&secret, &r), "a bad signature on {r:?}");
        assert!(!signed_by("whsec_other", &r));
        assert_eq!(r.kind, "app.created");
        let event: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(event["kind"], "app.created");
        assert!(event["id"].as_i64().unwrap() > 0, "{event}");
    }

    // A redelivery sends the same delivery (same id) once more.
    let first = deliveries[0]["id"].as_str().unwrap();
    let again = app
        .json(Method::POST, &format!("/webhooks/{hook}/deliveries/{first}/redeliver"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    wait_for(60, "the redelivery", || async {
        (receiver.taken().get(first) == Some(&2)).then_some(())
    })
    .await;

    // Deleted: no more deliveries, and its log goes with it.
    let deleted = app
        .json(Method::DELETE, &format!("/webhooks/{hook}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let gone = app
        .json(Method::GET, &format!("/webhooks/{hook}/deliveries"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_interrupted_by_kill_9_is_sent_again_by_the_next_server() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("RACK_WEBHOOK_ALLOW_PRIVATE", "1"),
        ("RACK_WEBHOOK_TIMEOUT", "5"),
        ("RACK_WEBHOOK_RETRY_BASE", "0.05"),
    ];
    // The first request of each delivery hangs: the server is killed while it waits.
    let receiver = Receiver::start(|nth| if nth == 1 { Answer::Hang } else { Answer::Status(200) }).await;
    let mut doomed = Replica::start(&database, data.path(), &env).await;
    let created = doomed
        .request(Method::POST, "/webhooks")
        .json(&serde_json::json!({ "url": receiver.url(), "events": "app." }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let hook: Value = created.json().await.unwrap();
    let (id, secret) = (hook["id"].as_str().unwrap(), hook["secret"].as_str().unwrap());
    let hung = receiver.hung.notified();
    create_app(&doomed, "survivor").await;
    tokio::time::timeout(Duration::from_secs(60), hung)
        .await
        .expect("the delivery reaches the receiver");
    doomed.kill_9().await;

    let next = Replica::start(&database, data.path(), &env).await;
    let deliveries = wait_for(60, "the delivery to be sent again", || async {
        let list: Value = next.json(&format!("/webhooks/{id}/deliveries")).await;
        let list = list.as_array()?.clone();
        (list.len() == 1 && list[0]["state"] == "delivered").then_some(list)
    })
    .await;
    let delivery = &deliveries[0];
    let log = delivery["attempts_log"].as_array().unwrap();
    assert_eq!(log.len(), 2, "{delivery}");
    assert!(
        log[0]["error"].as_str().unwrap().starts_with("interrupted"),
        "{delivery}"
    );
    assert_eq!(log[1]["status"], 200, "{delivery}");
    let taken = receiver.taken();
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken.get(delivery["id"].as_str().unwrap()), Some(&1));
    assert!(receiver.received().iter().all(|r| signed_by(secret, r)));
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let app = TestApp::spawn().await;
    for (url, says) in [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://10.0.0.1/hook", "private"),
        ("ftp://example.com/hook", "http or https"),
        ("hook", "http"),
    ] {
        let response = app
            .json(Method::POST, "/webhooks")
            .json(&serde_json::json!({ "url": url, "events": "build." }))
            .send()
            .await
            .unwrap();
        let expected = if url.starts_with("http") { 422 } else { 400 };
        assert_eq!(response.status(), expected, "{url}");
        let body: Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{url}: {error}");
    }
    let unknown = app
        .json(Method::POST, "/webhooks")
        .json(&serde_json::json!({ "url": "http://127.0.0.1:9/", "events": "bulid." }))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let database = app.database_url();
    app.stop().await;

    // A hook registered while allowed, to a name that resolves to loopback: a server that does
    // not allow it checks again at delivery (what a rebinding name would meet) and refuses.
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let allowing = TestApp::spawn_on(&database, fast_retries).await;
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let (hook, _) = create_hook(&allowing, &url, "app.created").await;
    allowing.stop().await;
    let strict = TestApp::spawn_on(&database, |config| {
        fast_retries(config);
        config.webhooks.allow_private = false;
    })
    .await;
    assert_eq!(strict.create_app("guarded").await.status(), 201);
    let deliveries = deliveries_when(&strict, &hook, 1, "a refused attempt", |d| {
        d["attempts_log"].as_array().is_some_and(|log| !log.is_empty())
    })
    .await;
    let error = deliveries[0]["attempts_log"][0]["error"].as_str().unwrap().to_owned();
    assert!(error.contains("loopback"), "{error}");
    assert!(error.contains("RACK_WEBHOOK_ALLOW_PRIVATE"), "{error}");
    assert!(receiver.received().is_empty());
    strict.stop().await;
}

#[tokio::test]
async fn a_hook_that_keeps_failing_is_disabled_with_an_event() {
    let app = TestApp::spawn_with(|config| {
        fast_retries(config);
        config.webhooks.disable_after = Duration::from_millis(500);
    })
    .await;
    let receiver = Receiver::start(|_| Answer::Status(503)).await;
    let (hook, _) = create_hook(&app, &receiver.url(), "app.").await;
    // A second hook hears about the first one's end.
    let watcher = Receiver::start(|_| Answer::Status(200)).await;
    let (_, _) = create_hook(&app, &watcher.url(), "webhook.disabled").await;
    assert_eq!(app.create_app("doomed").await.status(), 201);

    let shown: Value = wait_for(60, "the hook to be disabled", || async {
        let hook: Value = app.get_json(&format!("/webhooks/{hook}")).await;
        (hook["enabled"] == false).then_some(hook)
    })
    .await;
    let reason = shown["disabled_reason"].as_str().unwrap();
    assert!(reason.contains("503"), "{shown}");
    let deliveries: Vec<Value> = app.get_json(&format!("/webhooks/{hook}/deliveries")).await;
    assert!(deliveries.iter().all(|d| d["state"] == "failed"), "{deliveries:?}");
    assert!(deliveries[0]["attempts_log"].as_array().unwrap().len() >= 2);
    let heard = wait_for(60, "the webhook.disabled event", || async {
        watcher.received().into_iter().find(|r| r.kind == "webhook.disabled")
    })
    .await;
    let event: Value = serde_json::from_slice(&heard.body).unwrap();
    assert_eq!(event["data"]["webhook"], hook.as_str());
    assert_eq!(event["app"], "");
    // Nothing is delivered to a disabled hook, even on demand.
    let first = deliveries[0]["id"].as_str().unwrap();
    let again = app
        .json(Method::POST, &format!("/webhooks/{hook}/deliveries/{first}/redeliver"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    app.stop().await;
}
