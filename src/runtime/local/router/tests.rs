//! The router against real backends on loopback: proxying, round robin, waiting for a backend,
//! failover, rollouts under traffic, streaming both ways and shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::LazyLock;
use std::sync::atomic::AtomicBool;

use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use super::*;

type BoxError = Box<dyn StdError + Send + Sync>;
type TestClient = Client<HttpConnector, Body>;

const WAIT: Duration = Duration::from_secs(10);
const BIG: usize = 20 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// An app instance. Dropping it kills it: the listener and every open connection close at
/// once, as when the process dies.
struct Backend {
    addr: SocketAddr,
    control: Arc<Control>,
    task: JoinHandle<()>,
}

/// What a test can make an instance do.
#[derive(Debug, Default)]
struct Control {
    /// Releases the rest of `/gated`.
    gate: Notify,
    /// Makes echo requests hang, counted in `held`, as on an instance about to die.
    hang: AtomicBool,
    held: AtomicUsize,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An instance answering `/big` (20 MB), `/gated` (one chunk, then the rest once the gate is
/// notified), `/upload` (checks a 20 MB body) and anything else with an echo of the request.
async fn backend(id: &'static str) -> Backend {
    let control = Arc::new(Control::default());
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = axum::Router::new()
        .route("/big", get(big))
        .route(
            "/gated",
            get({
                let control = Arc::clone(&control);
                move || gated(control)
            }),
        )
        .route("/upload", post(upload))
        .fallback({
            let control = Arc::clone(&control);
            move |req: Request| echo(id, control, req)
        });
    let task = tokio::spawn(async move {
        // Connections live in this task's set, so aborting the task drops them all.
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(routes.clone());
            connections
                .spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            while connections.try_join_next().is_some() {}
        }
    });
    Backend { addr, control, task }
}

async fn echo(id: &'static str, control: Arc<Control>, req: Request) -> Response {
    if control.hang.load(Ordering::SeqCst) {
        control.held.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut text = format!("{} {}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        text.push_str(&format!("{name}: {}\n", value.to_str().unwrap()));
    }
    text.push('\n');
    text.push_str(std::str::from_utf8(&body).unwrap());
    Response::builder()
        .header("x-backend", id)
        .header(header::CONNECTION, "x-backend-hop")
        .header("x-backend-hop", "1")
        .header("keep-alive", "timeout=5")
        .body(Body::from(text))
        .unwrap()
}

/// The `len` bytes at `offset` of the large bodies: a period of 251 shows any shifted,
/// dropped or repeated chunk. At most [`CHUNK`] long.
fn pattern(offset: usize, len: usize) -> Bytes {
    static PERIODIC: LazyLock<Bytes> = LazyLock::new(|| (0..CHUNK + 251).map(|i| (i % 251) as u8).collect());
    PERIODIC.slice(offset % 251..offset % 251 + len)
}

fn is_pattern(offset: usize, data: &[u8]) -> bool {
    data.chunks(CHUNK)
        .enumerate()
        .all(|(i, piece)| piece == pattern(offset + i * CHUNK, piece.len()))
}

fn big_chunks() -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    stream::iter(
        (0..BIG)
            .step_by(CHUNK)
            .map(|start| Ok(pattern(start, CHUNK.min(BIG - start)))),
    )
}

async fn big() -> Body {
    Body::from_stream(big_chunks())
}

async fn gated(control: Arc<Control>) -> Body {
    let first = stream::once(async { Ok::<_, Infallible>(Bytes::from_static(b"first,")) });
    let rest = stream::once(async move {
        control.gate.notified().await;
        Ok(Bytes::from_static(b"rest"))
    });
    Body::from_stream(first.chain(rest))
}

async fn upload(mut body: Body) -> String {
    let (mut len, mut intact) = (0, true);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            intact &= is_pattern(len, &data);
            len += data.len();
        }
    }
    format!("{len} {intact}")
}

async fn router(grace: Duration) -> (Router, CancellationToken) {
    let shutdown = CancellationToken::new();
    let router = Router::start_with_grace("myapp".into(), 0, shutdown.clone(), grace)
        .await
        .unwrap();
    (router, shutdown)
}

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get_req(router: &Router, path: &str) -> Request {
    Request::get(format!("http://{}{path}", router.local_addr()))
        .body(Body::empty())
        .unwrap()
}

/// Sends `req` and reads the whole response, each step under a timeout.
async fn call(client: &TestClient, req: Request) -> Result<(StatusCode, HeaderMap, Bytes), BoxError> {
    let response = tokio::time::timeout(WAIT, client.request(req)).await??;
    let (status, headers) = (response.status(), response.headers().clone());
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await??
        .to_bytes();
    Ok((status, headers, body))
}

/// Polls `condition` until it holds, failing the test after [`WAIT`].
async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let wait = async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn refuses_connections(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn proxies_method_path_query_headers_and_body() {
    let instance = backend("a").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![instance.addr]);

    let req = Request::post(format!("http://{}/echo/path?x=1&y=two", router.local_addr()))
        .header(header::HOST, "example.test")
        .header("x-custom", "abc")
        .header(header::CONNECTION, "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9v")
        .header(header::TE, "trailers")
        .header("x-forwarded-for", "10.0.0.1")
        .body(Body::from("hello body"))
        .unwrap();
    let (status, headers, body) = call(&client(), req).await.unwrap();

    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-backend"], "a");
    for hop in ["x-backend-hop", "keep-alive", "connection"] {
        assert!(headers.get(hop).is_none(), "response kept {hop}");
    }
    let text = String::from_utf8(body.to_vec()).unwrap();
    let (head, body) = text.split_once("\n\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("POST /echo/path?x=1&y=two"));
    let seen: HashMap<&str, &str> = lines.map(|line| line.split_once(": ").unwrap()).collect();
    assert_eq!(seen["host"], "example.test");
    assert_eq!(seen["x-custom"], "abc");
    assert_eq!(seen["content-length"], "10");
    assert_eq!(seen["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "example.test");
    for hop in ["connection", "x-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(!seen.contains_key(hop), "request kept {hop}");
    }
    assert_eq!(body, "hello body");
}

#[tokio::test]
async fn round_robin_alternates_between_backends() {
    let (a, b) = (backend("a").await, backend("b").await);
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![a.addr, b.addr]);
    assert_eq!(router.backends(), vec![a.addr, b.addr]);

    let client = client();
    let mut answered = HashMap::new();
    for _ in 0..10 {
        let (status, headers, _) = call(&client, get_req(&router, "/")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        *answered
            .entry(headers["x-backend"].to_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(answered, HashMap::from([("a".to_owned(), 5), ("b".to_owned(), 5)]));
}

#[tokio::test]
async fn request_waits_for_a_backend_to_appear() {
    let instance = backend("late").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    let request = tokio::spawn(call_owned(get_req(&router, "/")));

    // The request subscribes to the backend set while it waits.
    let inner = Arc::clone(&router.inner);
    until("the request to wait", async || inner.backends.receiver_count() > 0).await;
    router.set_backends(vec![instance.addr]);

    let (status, headers, _) = request.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-backend"], "late");
}

async fn call_owned(req: Request) -> Result<(StatusCode, HeaderMap, Bytes), BoxError> {
    call(&client(), req).await
}

#[tokio::test]
async fn no_backend_within_the_grace_is_503() {
    let grace = Duration::from_millis(200);
    let (router, _shutdown) = router(grace).await;
    let started = Instant::now();

    let (status, headers, body) = call(&client(), get_req(&router, "/")).await.unwrap();

    assert!(started.elapsed() >= grace);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(body, "no healthy instances of myapp\n");
}

#[tokio::test]
async fn backend_refusing_connections_is_skipped_and_alone_is_502() {
    let dead = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let live = backend("live").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![dead, live.addr]);

    let client = client();
    for _ in 0..6 {
        let (status, headers, _) = call(&client, get_req(&router, "/")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "live");
    }

    router.set_backends(vec![dead]);
    let post = Request::post(format!("http://{}/", router.local_addr()))
        .body(Body::from("data"))
        .unwrap();
    for req in [get_req(&router, "/"), post] {
        let (status, headers, body) = call(&client, req).await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(body, "bad gateway: myapp\n");
    }
}

#[derive(Debug, Default)]
struct Tally {
    total: usize,
    failures: Vec<String>,
    old_after_swap: usize,
    new: usize,
}

/// Waits until the clients of the rollout test have sent `n` requests.
async fn reach(counted: &mut watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(WAIT, counted.wait_for(|sent| *sent >= n))
        .await
        .expect("traffic stalled")
        .expect("clients gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_under_continuous_traffic_fails_no_request() {
    let old = [backend("old-1").await, backend("old-2").await];
    let new = [backend("new-1").await, backend("new-2").await];
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(old.iter().map(|b| b.addr));

    let swapped = Arc::new(AtomicBool::new(false));
    let done = CancellationToken::new();
    let (count, mut counted) = watch::channel(0_usize);
    let mut clients = JoinSet::new();
    for _ in 0..2 {
        let (swapped, done, count, url) = (swapped.clone(), done.clone(), count.clone(), router.local_addr());
        clients.spawn(async move {
            let client = client();
            let mut tally = Tally::default();
            while !done.is_cancelled() {
                // Read before sending: a request that starts after the swap must not reach
                // an old instance.
                let after_swap = swapped.load(Ordering::SeqCst);
                let req = Request::get(format!("http://{url}/")).body(Body::empty()).unwrap();
                match call(&client, req).await {
                    Ok((status, headers, _)) if status.is_success() => {
                        let id = headers["x-backend"].to_str().unwrap();
                        tally.old_after_swap += usize::from(after_swap && id.starts_with("old"));
                        tally.new += usize::from(id.starts_with("new"));
                    }
                    Ok((status, _, body)) => tally.failures.push(format!("{status} {body:?}")),
                    Err(err) => tally.failures.push(error_chain(&*err)),
                }
                tally.total += 1;
                count.send_modify(|n| *n += 1);
            }
            tally
        });
    }

    // Steady traffic on the old release.
    reach(&mut counted, 200).await;

    // old-1 dies while still listed (stopped just before the router heard of it): its
    // connections are refused or reset, and requests move to old-2.
    let [old1, old2] = old;
    drop(old1);
    let at = *counted.borrow();
    reach(&mut counted, at + 100).await;

    // old-2 holds requests when the set switches to the new release and is then killed
    // mid-request: the held requests come back reset and are retried on a new instance.
    old2.control.hang.store(true, Ordering::SeqCst);
    until("old-2 to hold a request", async || {
        old2.control.held.load(Ordering::SeqCst) > 0
    })
    .await;
    router.set_backends(new.iter().map(|b| b.addr));
    swapped.store(true, Ordering::SeqCst);
    drop(old2);
    let at = *counted.borrow();
    reach(&mut counted, at + 300).await;
    done.cancel();

    let tallies = clients.join_all().await;
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(tallies.iter().map(|t| t.old_after_swap).sum::<usize>(), 0);
    assert!(tallies.iter().map(|t| t.total).sum::<usize>() >= 600);
    // Of the 300 requests counted after the kill, at most one per client was answered by
    // old-2 before it started holding requests.
    assert!(tallies.iter().map(|t| t.new).sum::<usize>() >= 298);
}

#[tokio::test]
async fn large_response_streams_through_intact() {
    let instance = backend("a").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![instance.addr]);

    let response = client().request(get_req(&router, "/big")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut len = 0;
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(is_pattern(len, &data), "corrupt at {len}");
            len += data.len();
        }
    }
    assert_eq!(len, BIG);
}

#[tokio::test]
async fn large_upload_streams_through_intact() {
    let instance = backend("a").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![instance.addr]);

    let req = Request::post(format!("http://{}/upload", router.local_addr()))
        .body(Body::from_stream(big_chunks()))
        .unwrap();
    let (status, _, body) = call(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("{BIG} true"));
}

/// Reads the first chunk of `/gated`, which only arrives if nothing buffers the response.
async fn start_gated(router: &Router) -> hyper::body::Incoming {
    let response = tokio::time::timeout(WAIT, client().request(get_req(router, "/gated")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first,");
    body
}

#[tokio::test]
async fn response_streams_before_the_backend_finishes() {
    let instance = backend("a").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![instance.addr]);

    let body = start_gated(&router).await;
    instance.control.gate.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "rest");
}

#[tokio::test]
async fn stop_refuses_new_connections_and_finishes_requests_in_flight() {
    let instance = backend("a").await;
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    router.set_backends(vec![instance.addr]);
    let body = start_gated(&router).await;

    router.stop();
    let addr = router.local_addr();
    until("the router to stop accepting", async || refuses_connections(addr).await).await;
    instance.control.gate.notify_one();

    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "rest");
}

#[tokio::test]
async fn stop_answers_requests_waiting_for_a_backend_at_once() {
    let (router, _shutdown) = router(NO_BACKEND_GRACE).await;
    let started = Instant::now();
    let request = tokio::spawn(call_owned(get_req(&router, "/")));
    let inner = Arc::clone(&router.inner);
    until("the request to wait", async || inner.backends.receiver_count() > 0).await;

    router.stop();
    let (status, _, body) = request.await.unwrap().unwrap();
    assert!(started.elapsed() < NO_BACKEND_GRACE);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no healthy instances of myapp\n");
}

#[tokio::test]
async fn cancelling_shutdown_stops_the_router() {
    let (router, shutdown) = router(NO_BACKEND_GRACE).await;
    assert!(!refuses_connections(router.local_addr()).await);

    shutdown.cancel();
    let addr = router.local_addr();
    until("the router to stop accepting", async || refuses_connections(addr).await).await;
}
