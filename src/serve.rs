//! The HTTP listener: accepts connections and serves the API on each with hyper, under the
//! limits a server facing the internet needs. A client gets [`Limits::header_timeout`] to send
//! each request's headers (a slow-loris client is cut off, with a 408 when it had started a
//! request), an idle keep-alive connection is closed after the same time (responses still
//! being written, streams included, are never cut), headers over [`Limits::max_header_bytes`]
//! or more than [`MAX_HEADERS`] headers get 431, and an address may hold at most
//! [`Limits::max_unauthenticated`] connections that have not yet made an authenticated
//! request (a newer one closes the oldest: see [`Unauthenticated::take`]). A request that cannot be parsed is answered, then what the client
//! still sends is read and dropped for a moment ([`linger`]) before the connection closes, so
//! the client reads the answer instead of a reset. With TLS (`crate::tls`), the handshake
//! comes first and must end within the header timeout too. On shutdown, accepting stops, idle
//! connections close and requests in flight finish.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long requests in flight get to finish once the server is stopping (streams end by
/// themselves: they watch the shutdown token).
const DRAIN: Duration = Duration::from_secs(30);

/// Most headers a request may have (hyper's default, written here so that it is a documented
/// limit): more get 431.
pub const MAX_HEADERS: usize = 100;

/// How long a connection whose request could not be parsed keeps reading what the client
/// still sends, at most; and how long without anything arriving ends that sooner.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_IDLE: Duration = Duration::from_millis(500);

/// Most bytes read (and dropped) while lingering.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// The listener's limits (settings of `rack server`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's headers; also how long an idle keep-alive connection stays.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Most connections one address may hold before authenticating (0: no limit).
    pub max_unauthenticated: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(15),
            max_header_bytes: 64 * 1024,
            max_unauthenticated: 256,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains. With `tls`, every
/// connection is HTTPS.
///
/// # Errors
/// Never today; accept errors (too many open files) are logged and retried.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<crate::tls::Tls>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) + 4096)
        .max_header_size(limits.max_header_bytes)
        .max_headers(MAX_HEADERS);
    let book = Arc::new(Unauthenticated::default());
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: wait for connections to close rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Responses go out in several writes (head, chunks): Nagle plus a delayed ACK would
        // hold each one back for 40 ms.
        let _ = stream.set_nodelay(true);
        let connection = Connection::open(&book, peer, limits.max_unauthenticated);
        let service = {
            let connection = connection.clone();
            router.clone().map_request(move |mut request: Request<Incoming>| {
                // A new request head has arrived: what follows (its body) is not idle chatter.
                connection.0.idle_bytes.store(0, Ordering::Relaxed);
                let extensions = request.extensions_mut();
                extensions.insert(ConnectInfo(peer));
                extensions.insert(connection.clone());
                request.map(Body::new)
            })
        };
        let service = TowerToHyperService::new(service.map_response({
            let connection = connection.clone();
            move |response: axum::response::Response| {
                let connection = connection.clone();
                response.map(move |body| Body::new(EndsIdle { body, connection }))
            }
        }));
        let shutdown = shutdown.clone();
        let timeout = limits.header_timeout;
        let http = http.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            // The connection counts against its address's limit from here, handshake included.
            let evicted = connection.0.evicted.clone();
            let opened = tokio::select! {
                opened = Transport::open(stream, tls.as_ref(), timeout) => opened,
                () = evicted.cancelled() => None,
            };
            let Some(stream) = opened else {
                return;
            };
            let io = Io {
                stream: stream.clone(),
                connection: connection.clone(),
            };
            let conn = http.serve_connection(TokioIo::new(io), service).with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                // A newer connection from its address took its place: it goes, unanswered
                // (it never sent a credential that worked).
                () = evicted.cancelled() => return,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(DRAIN, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            match ended {
                Err(e) if e.is_timeout() && connection.0.idle_bytes.load(Ordering::Relaxed) > 0 => {
                    // It had started a request and did not finish its headers in time. (An idle
                    // keep-alive connection is closed silently: a 408 there could race with a
                    // request the client is sending at that moment.)
                    let message = format!("the request headers did not arrive within {}s\n", timeout.as_secs());
                    write_raw(&stream, "408 Request Timeout", &[], &message).await;
                }
                // hyper answered (431 for too many or too large headers, 400) and stopped
                // reading, with the rest of the request maybe still on its way. (Over TLS the
                // session closes with its own alert instead.)
                Err(e) if e.is_parse() => {
                    if let Transport::Plain(stream) = &stream {
                        linger(stream).await;
                    }
                }
                _ => {}
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN + Duration::from_secs(5), tracker.wait()).await;
    Ok(())
}

/// Reads and drops what the client still sends, until it stops (or [`LINGER`] or
/// [`LINGER_BYTES`] is reached). Closing a socket with unread data makes the kernel reset the
/// connection, and a client still sending its request then fails on its write without ever
/// reading the answer already written for it.
async fn linger(stream: &TcpStream) {
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut buffer = vec![0; 64 * 1024];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let until = deadline.min(tokio::time::Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(until, stream.readable()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        match stream.try_read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Writes a whole response on a connection hyper no longer serves (best effort: a full socket
/// buffer just loses it).
async fn write_raw(stream: &Transport, status: &str, headers: &[(&str, &str)], message: &str) {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        message.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(message);
    match stream {
        Transport::Plain(stream) => {
            let _ = stream.try_write(text.as_bytes());
        }
        Transport::Tls(stream) => stream.write_last(text.as_bytes()).await,
    }
}

/// A connection's byte stream: the socket itself, or a TLS session on it.
#[derive(Clone)]
enum Transport {
    Plain(Arc<TcpStream>),
    Tls(crate::tls::Shared),
}

impl Transport {
    /// The connection as served: with `tls`, once its handshake has ended within `timeout`
    /// (a client that handshakes slowly, or not at all, is dropped like a slow-loris one).
    async fn open(stream: TcpStream, tls: Option<&crate::tls::Tls>, timeout: Duration) -> Option<Self> {
        let Some(tls) = tls else {
            return Some(Self::Plain(Arc::new(stream)));
        };
        match tokio::time::timeout(timeout, tls.accept(stream)).await {
            Ok(Ok(stream)) => Some(Self::Tls(stream)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("a TLS handshake did not end within {}s", timeout.as_secs());
                None
            }
        }
    }
}

/// Connections per address that have not authenticated yet, oldest first, each with what
/// closes it.
#[derive(Debug, Default)]
struct Unauthenticated {
    queues: Mutex<HashMap<IpAddr, VecDeque<(u64, CancellationToken)>>>,
    next: AtomicU64,
}

impl Unauthenticated {
    /// Counts a new connection from `ip`; when the address already holds `limit`, its oldest
    /// unauthenticated connection is closed to make room. Refusing the newcomer instead would
    /// let anyone on the address (an app process on 127.0.0.1) hold every slot and shut the
    /// admin's own clients out; this way the address still holds at most `limit`, and a client
    /// that authenticates at once always gets through.
    fn take(&self, ip: IpAddr, limit: usize) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut queues = self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let queue = queues.entry(ip).or_default();
        while limit > 0 && queue.len() >= limit {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.cancel();
            }
        }
        queue.push_back((id, token.clone()));
        (id, token)
    }

    fn release(&self, ip: IpAddr, id: u64) {
        let mut queues = self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(queue) = queues.get_mut(&ip) {
            queue.retain(|(held, _)| *held != id);
            if queue.is_empty() {
                queues.remove(&ip);
            }
        }
    }
}

/// One client connection, in every request's extensions: who is on the other end, and
/// whether it has authenticated yet.
#[derive(Debug, Clone)]
pub struct Connection(Arc<ConnectionState>);

#[derive(Debug)]
struct ConnectionState {
    peer: SocketAddr,
    authenticated: AtomicBool,
    book: Arc<Unauthenticated>,
    /// Its place among its address's unauthenticated connections.
    id: u64,
    /// Cancelled when a newer connection of its address takes its place before it
    /// authenticated.
    evicted: CancellationToken,
    /// Bytes read since the last response ended (a request head in progress).
    idle_bytes: AtomicU64,
}

impl Connection {
    fn open(book: &Arc<Unauthenticated>, peer: SocketAddr, limit: usize) -> Self {
        let (id, evicted) = book.take(peer.ip(), limit);
        Self(Arc::new(ConnectionState {
            peer,
            authenticated: AtomicBool::new(false),
            book: book.clone(),
            id,
            evicted,
            idle_bytes: AtomicU64::new(0),
        }))
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.0.peer
    }

    /// Records that a request on this connection authenticated: it no longer counts against
    /// its address's limit.
    pub fn authenticated(&self) {
        if !self.0.authenticated.swap(true, Ordering::SeqCst) {
            self.0.book.release(self.0.peer.ip(), self.0.id);
        }
    }
}

impl Drop for ConnectionState {
    fn drop(&mut self) {
        if !*self.authenticated.get_mut() {
            self.book.release(self.peer.ip(), self.id);
        }
    }
}

/// A response body that marks the connection idle once it has been sent (or dropped).
struct EndsIdle {
    body: Body,
    connection: Connection,
}

impl Drop for EndsIdle {
    fn drop(&mut self) {
        self.connection.0.idle_bytes.store(0, Ordering::Relaxed);
    }
}

impl http_body::Body for EndsIdle {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

/// The socket as hyper reads and writes it, shared with the connection's task (which may
/// answer 408 once hyper has given up on it), counting what arrives while idle.
struct Io {
    stream: Transport,
    connection: Connection,
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Io { stream, connection } = self.get_mut();
        let stream = match stream {
            Transport::Plain(stream) => stream,
            Transport::Tls(tls) => {
                let before = buf.filled().len();
                ready!(Pin::new(tls).poll_read(cx, buf))?;
                let n = buf.filled().len() - before;
                connection.0.idle_bytes.fetch_add(n as u64, Ordering::Relaxed);
                return Poll::Ready(Ok(()));
            }
        };
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match stream.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    connection.0.idle_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let stream = match &mut self.stream {
            Transport::Plain(stream) => stream,
            Transport::Tls(tls) => return Pin::new(tls).poll_write(cx, data),
        };
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Transport::Plain(_) => Poll::Ready(Ok(())),
            // rustls holds written data until flushed.
            Transport::Tls(tls) => Pin::new(tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            // The socket closes when the last handle on it goes, right after the connection ends.
            Transport::Plain(_) => Poll::Ready(Ok(())),
            Transport::Tls(tls) => Pin::new(tls).poll_shutdown(cx),
        }
    }
}
