//! The per-app router of the local runtime: a listener on 127.0.0.1 that proxies HTTP/1.1 to the
//! app's healthy instances, round robin. A rolling deploy swaps the backend set, and a request that
//! meets an instance that just went away moves to another one, so no request fails.

use std::error::Error as StdError;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a request waits for an instance to appear when the app has none, before a 503.
pub const NO_BACKEND_GRACE: Duration = Duration::from_secs(5);

/// How long connecting to an instance may take before it counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// Shorter than the keep-alive timeout of common app servers (2 s and up), so the pool never
// reuses a connection the instance is closing at that moment: that request could fail after it
// was sent. Steady traffic still reuses connections, and a new one on loopback is cheap.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A running router for one app. Cloning gives another handle to the same router; dropping every
/// handle does not stop it (call [`Router::stop`] or cancel the shutdown token).
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    app: String,
    local_addr: SocketAddr,
    // A watch channel is an `RwLock<Arc<..>>` that can also wake the requests waiting for the
    // set to become non-empty.
    backends: watch::Sender<Arc<[SocketAddr]>>,
    next: AtomicUsize,
    client: Client<HttpConnector, Body>,
    stop: CancellationToken,
    grace: Duration,
}

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("no healthy instances")]
    NoBackends,
    #[error("request to {backend} failed")]
    Upstream {
        backend: SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("could not build the request to {backend}")]
    BuildRequest {
        backend: SocketAddr,
        #[source]
        source: axum::http::Error,
    },
}

impl Router {
    /// Binds `127.0.0.1:port` (port 0 picks a free one) and serves until `shutdown` is cancelled
    /// or [`Router::stop`] is called. It starts with no backends.
    ///
    /// # Errors
    ///
    /// When the port cannot be bound (typically: it is taken).
    pub async fn start(app: String, port: u16, shutdown: CancellationToken) -> std::io::Result<Router> {
        Self::start_with_grace(app, port, shutdown, NO_BACKEND_GRACE).await
    }

    async fn start_with_grace(
        app: String,
        port: u16,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> std::io::Result<Router> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let local_addr = listener.local_addr()?;

        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);

        let inner = Arc::new(Inner {
            app,
            local_addr,
            backends: watch::Sender::new(Arc::from(Vec::new())),
            next: AtomicUsize::new(0),
            client,
            stop: shutdown.child_token(),
            grace,
        });
        let service = axum::Router::new()
            .fallback(proxy)
            .with_state(Arc::clone(&inner))
            .into_make_service_with_connect_info::<SocketAddr>();
        // Graceful shutdown stops accepting and lets each open connection finish the request it
        // is serving, which is what a stopping router owes its clients.
        // No Nagle on the client side either: a response's head and body go out as separate
        // writes, and a delayed ACK would hold the body back for 40 ms.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, service).with_graceful_shutdown(inner.stop.clone().cancelled_owned());
        let span = tracing::info_span!("router", app.name = %inner.app);
        let app = inner.app.clone();
        tokio::spawn(
            async move {
                if let Err(err) = serve.await {
                    tracing::warn!(error = %err, "router for {app} failed");
                }
                tracing::info!("router for {app} stopped");
            }
            .instrument(span),
        );
        tracing::info!(app.name = %inner.app, router.addr = %local_addr, "router for {} listening on {local_addr}", inner.app);
        Ok(Router { inner })
    }

    /// The address the router listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Replaces the set of healthy backends atomically (e.g. `127.0.0.1:41234`). New requests go
    /// to the new set only; requests already in flight to a removed backend finish.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        tracing::debug!(app.name = %self.inner.app, backends = ?backends, "router for {} now targets {} instance(s)", self.inner.app, backends.len());
        self.inner.backends.send_replace(Arc::from(backends));
    }

    /// The current set of backends.
    pub fn backends(&self) -> Vec<SocketAddr> {
        self.inner.backends.borrow().to_vec()
    }

    /// Stops accepting connections; requests in flight finish.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }
}

async fn proxy(State(inner): State<Arc<Inner>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    // CONNECT asks for a tunnel, which an app router has no business opening.
    if req.method() == Method::CONNECT {
        return (StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n").into_response();
    }
    match inner.forward(peer, req).await {
        Ok(response) => response,
        Err(ProxyError::NoBackends) => {
            tracing::warn!(app.name = %inner.app, "no healthy instances of {} for a request", inner.app);
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy instances of {}\n", inner.app),
            )
        }
        Err(err) => {
            tracing::warn!(app.name = %inner.app, error = %error_chain(&err), "bad gateway for {}", inner.app);
            text_response(StatusCode::BAD_GATEWAY, format!("bad gateway: {}\n", inner.app))
        }
    }
}

impl Inner {
    async fn forward(&self, peer: SocketAddr, req: Request) -> Result<Response, ProxyError> {
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        let host = headers.get(header::HOST).cloned().or_else(|| {
            // HTTP/2 clients carry the host in the URI rather than a Host header.
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        strip_hop_by_hop(&mut headers);
        // Our own server already answered any `Expect: 100-continue`; the body is on its way.
        headers.remove(header::EXPECT);
        add_forwarded(&mut headers, peer, host);
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());

        // Only a body known to be empty can be sent again, so only such a request may move on to
        // another instance; a streamed body is consumed by the first attempt.
        let replayable = body.is_end_stream() || body.size_hint().exact() == Some(0);
        let idempotent = is_idempotent(&parts.method);
        let mut body = Some(body);
        let deadline = Instant::now() + self.grace;
        let mut tried = Vec::new();
        let mut last_error = None;
        loop {
            let Some(backend) = self.pick(&tried, deadline).await else {
                return Err(last_error.unwrap_or(ProxyError::NoBackends));
            };
            tried.push(backend);
            let attempt_body = body.take().unwrap_or_else(Body::empty);
            let request = upstream_request(&parts.method, path, &headers, backend, attempt_body)?;
            match self.client.request(request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Ok(Response::from_parts(parts, Body::new(body)));
                }
                Err(source) => {
                    // A failed connect sent nothing, so any method may go elsewhere. A failure
                    // after sending (the instance died mid-request) may have had an effect, so
                    // only idempotent methods are repeated (RFC 9110 §9.2.2).
                    let retry = replayable && (source.is_connect() || idempotent);
                    let err = ProxyError::Upstream { backend, source };
                    if !retry {
                        return Err(err);
                    }
                    tracing::debug!(app.name = %self.app, error = %error_chain(&err), "retrying a request to {} on another instance", self.app);
                    last_error = Some(err);
                }
            }
        }
    }

    /// The next backend round robin that this request has not tried yet, waiting until `deadline`
    /// for the set to become non-empty. `None` when there is none to try.
    async fn pick(&self, tried: &[SocketAddr], deadline: Instant) -> Option<SocketAddr> {
        let set = self.wait_for_backends(deadline).await?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..set.len())
            .map(|i| set[start.wrapping_add(i) % set.len()])
            .find(|backend| !tried.contains(backend))
    }

    async fn wait_for_backends(&self, deadline: Instant) -> Option<Arc<[SocketAddr]>> {
        let current = Arc::clone(&self.backends.borrow());
        if !current.is_empty() {
            return Some(current);
        }
        // `wait_for` checks the current value first, so a set published between the borrow above
        // and this subscription is not missed.
        let mut rx = self.backends.subscribe();
        let appeared = async move {
            rx.wait_for(|set| !set.is_empty())
                .await
                .ok()
                .map(|set| Arc::clone(&set))
        };
        tokio::select! {
            biased;
            set = tokio::time::timeout_at(deadline, appeared) => set.ok().flatten(),
            // A stopping router answers at once rather than holding its shutdown for the grace.
            () = self.stop.cancelled() => None,
        }
    }
}

fn upstream_request(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    backend: SocketAddr,
    body: Body,
) -> Result<Request, ProxyError> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(backend.to_string())
        .path_and_query(path)
        .build()
        .map_err(|source| ProxyError::BuildRequest { backend, source })?;
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    // The client speaks HTTP/1.1 to instances whatever the downstream version was.
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers.clone();
    Ok(request)
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 §7.6.1):
/// the fixed list, `Proxy-*`, and whatever `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut remove: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    remove.extend(
        headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned(),
    );
    remove.extend([
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]);
    for name in remove {
        headers.remove(name);
    }
}

fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<HeaderValue>) {
    // Append to what an earlier proxy recorded, as nginx's `$proxy_add_x_forwarded_for` does.
    // Values before ours came from the client and are not to be trusted.
    let mut chain: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let client = peer.ip().to_string();
    chain.push(&client);
    if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn text_response(status: StatusCode, message: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

/// `outer: cause: root cause`, since hyper's top-level messages ("client error (Connect)") say
/// little on their own.
fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
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
        router.set_backends(old.iter().map(|b| b.addr).collect());

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
        router.set_backends(new.iter().map(|b| b.addr).collect());
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
}
