//! The per-app router of the local runtime: a listener on 127.0.0.1 that proxies HTTP/1.1 to the
//! app's healthy instances, round robin. A rolling deploy swaps the backend set, and a request that
//! meets an instance that just went away moves to another one, so no request fails. Each response
//! is counted for the release of the instance that served it (`tally`), which a rollout's traffic
//! analysis reads.

mod rollup;
mod tally;
mod tls;
pub use tls::certified_key;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

mod backend;
pub use backend::Backend;
use backend::Connector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use tally::Tally;
pub use tally::{SLOTS, Sum};

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
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

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
    backends: watch::Sender<Arc<[Route]>>,
    /// The app's network, where its sandboxed instances are (shared with the connector).
    network: Arc<std::sync::Mutex<Option<Arc<super::app_network::AppNetwork>>>>,
    next: AtomicUsize,
    client: Client<Connector, Body>,
    stop: CancellationToken,
    grace: Duration,
    /// Where the tallies' seconds count from.
    epoch: std::time::Instant,
    /// Each release's tally, with the last second it was routed to (kept while an analysis may
    /// still read it).
    tallies: Mutex<HashMap<String, (Arc<Tally>, u64)>>,
    recording: AtomicBool,
    /// The first second not yet handed to the per-minute history (`rollup`).
    drained: Mutex<u64>,
    /// The HTTPS listener, once the service has a certificate (`tls`).
    tls: Mutex<Option<tls::Front>>,
}

/// A backend and the tally of its release.
#[derive(Debug, Clone)]
struct Route {
    backend: Backend,
    tally: Arc<Tally>,
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

        let mut host = HttpConnector::new();
        host.set_connect_timeout(Some(CONNECT_TIMEOUT));
        host.set_nodelay(true);
        let network = Arc::default();
        let connector = Connector {
            host,
            network: Arc::clone(&network),
            timeout: CONNECT_TIMEOUT,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);

        let inner = Arc::new(Inner {
            app,
            local_addr,
            backends: watch::Sender::new(Arc::from(Vec::new())),
            network,
            next: AtomicUsize::new(0),
            client,
            stop: shutdown.child_token(),
            grace,
            epoch: std::time::Instant::now(),
            tallies: Mutex::new(HashMap::new()),
            recording: AtomicBool::new(true),
            drained: Mutex::new(0),
            tls: Mutex::new(None),
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

    /// Replaces the set of healthy backends atomically (e.g. `127.0.0.1:41234`, in the app's
    /// network or the host's), of no release in particular. New requests go to the new set
    /// only; requests already in flight to a removed backend finish.
    pub fn set_backends<B: Into<Backend>>(&self, backends: impl IntoIterator<Item = B>) {
        self.set_routes(backends.into_iter().map(|b| (b, String::new())));
    }

    /// Replaces the set of healthy backends atomically, each with the release it runs (whose
    /// tally counts its responses).
    pub fn set_routes<B: Into<Backend>>(&self, routes: impl IntoIterator<Item = (B, String)>) {
        let now = self.second();
        let routes: Vec<Route> = {
            let mut tallies = self
                .inner
                .tallies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let routes = routes
                .into_iter()
                .map(|(backend, release)| {
                    let entry = tallies.entry(release).or_default();
                    entry.1 = now;
                    Route {
                        backend: backend.into(),
                        tally: Arc::clone(&entry.0),
                    }
                })
                .collect();
            // A release routed to within the ring's span may still be read by an analysis.
            tallies.retain(|_, (_, last)| *last + tally::SLOTS as u64 > now);
            routes
        };
        tracing::debug!(app.name = %self.inner.app, backends = ?routes.iter().map(|r| r.backend.addr).collect::<Vec<_>>(), "router for {} now targets {} instance(s)", self.inner.app, routes.len());
        // Kept when the set has none in it: a request in flight may still connect there.
        if let Some(network) = routes.iter().find_map(|r| r.backend.network.clone()) {
            *self
                .inner
                .network
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(network);
        }
        self.inner.backends.send_replace(Arc::from(routes));
    }

    /// The addresses of the current set of backends.
    pub fn backends(&self) -> Vec<SocketAddr> {
        self.inner.backends.borrow().iter().map(|r| r.backend.addr).collect()
    }

    /// The second (since the router started) the tallies are in now.
    pub fn second(&self) -> u64 {
        self.inner.epoch.elapsed().as_secs()
    }

    /// What the releases `releases` accepts served in the seconds `from..=to`.
    pub fn sum(&self, releases: impl Fn(&str) -> bool, from: u64, to: u64) -> Sum {
        let mut sum = Sum::default();
        let tallies = self
            .inner
            .tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (release, (tally, _)) in tallies.iter() {
            if releases(release) {
                tally.add_to(&mut sum, from, to);
            }
        }
        sum
    }

    /// Adds what every release served in the seconds `from..=to` to `sum` (the app's metrics).
    pub fn add_to(&self, sum: &mut Sum, from: u64, to: u64) {
        let tallies = self
            .inner
            .tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (tally, _) in tallies.values() {
            tally.add_to(sum, from, to);
        }
    }

    /// Turns the recording of responses on (the default) or off (to measure what it costs).
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::Relaxed);
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
    let recording = inner.recording.load(Ordering::Relaxed);
    let started = recording.then(std::time::Instant::now);
    let mut served_by = None;
    let result = inner.forward(peer, req, &mut served_by).await;
    if let (Some(started), Some(tally)) = (started, served_by) {
        let now = std::time::Instant::now();
        let error = match &result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        tally.record(now.duration_since(inner.epoch).as_secs(), now - started, error);
    }
    match result {
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
    /// Proxies `req`; `served_by` is left with the tally of the last instance tried.
    async fn forward(
        &self,
        peer: SocketAddr,
        req: Request,
        served_by: &mut Option<Arc<Tally>>,
    ) -> Result<Response, ProxyError> {
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
        // The HTTPS listener marks its requests: the app learns the scheme its client used.
        let https = parts.extensions.get::<tls::Https>().is_some();
        add_forwarded(&mut headers, peer, host, https);
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
            let Some(Route { backend, tally }) = self.pick(&tried, deadline).await else {
                return Err(last_error.unwrap_or(ProxyError::NoBackends));
            };
            *served_by = Some(tally);
            tried.push(backend.clone());
            let attempt_body = body.take().unwrap_or_else(Body::empty);
            let request = upstream_request(&parts.method, path, &headers, &backend, attempt_body)?;
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
                    let err = ProxyError::Upstream {
                        backend: backend.addr,
                        source,
                    };
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
    async fn pick(&self, tried: &[Backend], deadline: Instant) -> Option<Route> {
        let set = self.wait_for_backends(deadline).await?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..set.len())
            .map(|i| &set[start.wrapping_add(i) % set.len()])
            .find(|route| !tried.contains(&route.backend))
            .cloned()
    }

    async fn wait_for_backends(&self, deadline: Instant) -> Option<Arc<[Route]>> {
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
    backend: &Backend,
    body: Body,
) -> Result<Request, ProxyError> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(backend.authority())
        .path_and_query(path)
        .build()
        .map_err(|source| ProxyError::BuildRequest {
            backend: backend.addr,
            source,
        })?;
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    // The client speaks HTTP/1.1 to instances whatever the downstream version was.
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers.clone();
    // A request without a Host (HTTP/1.0) names the instance, never the URI's stand-in name.
    if !request.headers().contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(&backend.addr.to_string())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    Ok(request)
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 §7.6.1):
/// the fixed list, `Proxy-*`, and whatever `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Per request, both ways: nothing is allocated unless a `Connection` or `Proxy-*` header
    // names something beyond the fixed list (rare).
    let named =
        headers.contains_key(header::CONNECTION) || headers.keys().any(|name| name.as_str().starts_with("proxy-"));
    if named {
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
        for name in remove {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<HeaderValue>, https: bool) {
    // Append to what an earlier proxy recorded, as nginx's `$proxy_add_x_forwarded_for` does.
    // Values before ours came from the client and are not to be trusted.
    let client = peer.ip().to_string();
    let value = if headers.contains_key(&X_FORWARDED_FOR) {
        let mut chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        chain.push(&client);
        HeaderValue::from_str(&chain.join(", "))
    } else {
        // The usual case, one allocation fewer.
        HeaderValue::try_from(client)
    };
    if let Ok(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
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
mod tests;
