//! The HTTP client of the rack API used by the CLI commands: basic auth from the rack URL,
//! form-encoded requests, JSON answers, `{"error": ...}` turned into the error message. Over
//! https, the rack's certificate is trusted as `crate::tls::Verifier` says (system roots, a
//! pinned fingerprint, or the one saved on first use).

use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Url};
use serde::de::DeserializeOwned;

use super::exit::{AuthFailed, Unreachable};

/// Where the local rack listens unless told otherwise (`RACK_BIND`'s default).
const DEFAULT_URL: &str = "http://127.0.0.1:5443";

/// A client of one rack.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    password: Option<String>,
    /// How an https rack's certificate is checked (none for http).
    verifier: Option<Arc<crate::tls::Verifier>>,
}

/// A byte stream a websocket runs on: a socket, or a TLS session on one.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// A websocket to the rack.
pub type WebSocket = tokio_tungstenite::WebSocketStream<Box<dyn Duplex>>;

impl Client {
    /// A client for `rack_url` (`http://:PASSWORD@HOST:PORT`). Without one, the local rack at
    /// its default address, with the password its embedded default saved.
    ///
    /// # Errors
    /// When the URL is malformed.
    pub fn new(rack_url: Option<&str>) -> anyhow::Result<Self> {
        Self::connect(rack_url, None)
    }

    /// A client for `rack_url` that, over https, accepts only a certificate with the SHA-256
    /// `fingerprint` when one is given (`RACK_FINGERPRINT`); without one, a certificate the
    /// system's roots vouch for, else the one saved in `known_racks` on the first connection.
    ///
    /// # Errors
    /// When the URL or the fingerprint is malformed.
    pub fn connect(rack_url: Option<&str>, fingerprint: Option<&str>) -> anyhow::Result<Self> {
        crate::tls::install_provider();
        let mut base = Url::parse(rack_url.unwrap_or(DEFAULT_URL))
            .context("RACK_URL must look like http://:PASSWORD@HOST:PORT")?;
        if !matches!(base.scheme(), "http" | "https") {
            bail!("RACK_URL must start with http:// or https://, got {}", base.scheme());
        }
        let password = match base.password() {
            Some(p) => Some(percent_decode(p)?),
            None if rack_url.is_none() => local_password(),
            None => None,
        };
        base.set_username("").ok();
        base.set_password(None).ok();
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("rack-cli/", env!("CARGO_PKG_VERSION")))
            // Rollout and log streams can be quiet for minutes: keepalives notice a dead peer.
            .tcp_keepalive(std::time::Duration::from_secs(30));
        let verifier = match base.scheme() {
            "https" => {
                let verifier = Arc::new(crate::tls::Verifier::new(trust(&base, fingerprint)?));
                http = http.tls_backend_preconfigured(verifier.client_config());
                Some(verifier)
            }
            _ => None,
        };
        Ok(Self {
            http: http.build()?,
            base,
            password,
            verifier,
        })
    }

    /// This client with `password` (a saved rack's credential) instead of the URL's.
    #[must_use]
    pub fn with_password(mut self, password: String) -> Self {
        self.password = Some(password);
        self
    }

    /// The rack's certificate refused, with why (a changed fingerprint), if that is what
    /// made a request fail.
    fn refusal(&self) -> Option<String> {
        self.verifier.as_ref()?.refusal()
    }

    /// Percent-encodes one path segment (an app name, an id) typed by the user.
    pub fn segment(&self, value: &str) -> String {
        url_segment(value)
    }

    fn request(&self, method: Method, path: &str) -> anyhow::Result<RequestBuilder> {
        let base = self.base.as_str().trim_end_matches('/');
        let url = Url::parse(&format!("{base}{path}")).with_context(|| format!("bad request path {path}"))?;
        let builder = self.http.request(method, url).header("accept", "application/json");
        Ok(match &self.password {
            Some(password) => builder.basic_auth("rack", Some(password)),
            None => builder,
        })
    }

    /// `GET path`, decoded from JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::GET, path)?).await
    }

    /// The SHA-256 the rack holds for the object at `path` (`HEAD`), `None` when it has none.
    ///
    /// # Errors
    /// When the rack cannot be reached or answers anything but 200 or 404.
    pub async fn object_digest(&self, path: &str) -> anyhow::Result<Option<String>> {
        let response = self.dispatch(self.request(Method::HEAD, path)?).await?;
        match response.status() {
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => Ok(response
                .headers()
                .get("x-checksum-sha256")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)),
            status => Err(api_error(status, &[])),
        }
    }

    /// `POST path` with a form body, decoded from JSON.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<T> {
        self.send(self.request(Method::POST, path)?.form(form)).await
    }

    /// `PUT path` with a form body, decoded from JSON.
    pub async fn put<T: DeserializeOwned>(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<T> {
        self.send(self.request(Method::PUT, path)?.form(form)).await
    }

    /// `OPTIONS path`, decoded from JSON.
    pub async fn options<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::OPTIONS, path)?).await
    }

    /// `DELETE path`, its answer decoded from JSON.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::DELETE, path)?).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self.send(self.request(Method::DELETE, path)?).await?;
        Ok(())
    }

    /// `POST path` with options as headers (as convox sends them) and no body, decoded from
    /// JSON.
    pub async fn post_headers<T: DeserializeOwned>(&self, path: &str, headers: &[(&str, String)]) -> anyhow::Result<T> {
        let mut request = self.request(Method::POST, path)?;
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.send(request).await
    }

    /// Opens the websocket at `path`, with `headers`.
    ///
    /// # Errors
    /// When the rack cannot be reached or refuses the upgrade (with its message).
    pub async fn websocket(&self, path: &str, headers: &[(&str, String)]) -> anyhow::Result<WebSocket> {
        use base64::Engine;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let base = self.base.as_str().trim_end_matches('/');
        let url = format!("{base}{path}").replacen("http", "ws", 1);
        let mut request = url.into_client_request().context("making the websocket request")?;
        let add =
            |request: &mut tokio_tungstenite::tungstenite::handshake::client::Request, name: &str, value: &str| {
                if let (Ok(name), Ok(value)) = (
                    name.parse::<tokio_tungstenite::tungstenite::http::HeaderName>(),
                    value.parse::<tokio_tungstenite::tungstenite::http::HeaderValue>(),
                ) {
                    request.headers_mut().insert(name, value);
                }
            };
        if let Some(password) = &self.password {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("rack:{password}"));
            add(&mut request, "authorization", &format!("Basic {token}"));
        }
        for (name, value) in headers {
            add(&mut request, name, value);
        }
        let stream = self.open_stream().await?;
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = reqwest::StatusCode::from_u16(response.status().as_u16()).unwrap_or_default();
                let body = response.body().clone().unwrap_or_default();
                Err(api_error(status, &body))
            }
            Err(e) => Err(anyhow::Error::new(Unreachable(format!(
                "could not reach the rack at {}: {e}",
                self.base
            )))),
        }
    }

    /// A connection to the rack for a websocket: TCP, with TLS on it for an https rack.
    async fn open_stream(&self) -> anyhow::Result<Box<dyn Duplex>> {
        let host = self.base.host_str().context("RACK_URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = self.base.port_or_known_default().unwrap_or(80);
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow::Error::new(Unreachable(format!("could not reach the rack at {}: {e}", self.base)))
        };
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        let Some(verifier) = &self.verifier else {
            return Ok(Box::new(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(host).context("RACK_URL's host is not a valid name")?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(verifier.client_config()));
        match connector.connect(name, tcp).await {
            Ok(tls) => Ok(Box::new(tls)),
            Err(e) => match verifier.refusal() {
                Some(refusal) => bail!("{refusal}"),
                None => Err(unreachable(&e)),
            },
        }
    }

    /// `POST path` with a raw body, decoded from JSON.
    pub async fn post_body<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        headers: &[(&str, String)],
    ) -> anyhow::Result<T> {
        let mut request = self
            .request(Method::POST, path)?
            .header("content-type", "application/octet-stream");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.send(request.body(body)).await
    }

    /// `PUT path` with a raw body, decoded from JSON.
    pub async fn put_body<T: DeserializeOwned>(&self, path: &str, body: reqwest::Body) -> anyhow::Result<T> {
        let request = self
            .request(Method::PUT, path)?
            .header("content-type", "application/octet-stream");
        self.send(request.body(body)).await
    }

    /// `GET path` as a stream of text (a log); fails on an error status.
    pub async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.stream_with(path, &[]).await
    }

    /// `GET path` with extra headers (convox's log options travel as headers) as a stream of
    /// text; fails on an error status.
    pub async fn stream_with(&self, path: &str, headers: &[(&str, String)]) -> anyhow::Result<reqwest::Response> {
        let mut request = self.request(Method::GET, path)?.header("accept", "text/plain");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.send_stream(request).await
    }

    /// `POST path` with a form body, answered by a stream of text (a promote with
    /// `follow=true`); fails on an error status, with the rack's message.
    pub async fn post_stream(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<reqwest::Response> {
        let request = self
            .request(Method::POST, path)?
            .header("accept", "text/plain")
            .form(form);
        self.send_stream(request).await
    }

    /// Sends `request`. A GET or HEAD answered 503 with `Retry-After` (Postgres restarting,
    /// every connection busy) is sent again when the rack says, up to [`RETRIES_OF_503`]
    /// times: reads are safe to repeat, and a blip of a few seconds should not fail a
    /// command. Anything else is sent once.
    async fn dispatch(&self, request: RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = request.build().context("building the request")?;
        if matches!(*request.method(), Method::GET | Method::HEAD) {
            for _ in 0..RETRIES_OF_503 {
                let Some(attempt) = request.try_clone() else { break };
                let response = self.execute(attempt).await?;
                match retry_after(&response) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => return Ok(response),
                }
            }
        }
        self.execute(request).await
    }

    async fn execute(&self, request: reqwest::Request) -> anyhow::Result<reqwest::Response> {
        self.http.execute(request).await.map_err(|e| match self.refusal() {
            Some(refusal) => anyhow::anyhow!("{refusal}"),
            None => anyhow::Error::new(Unreachable(format!(
                "could not reach the rack at {}: {}",
                self.base,
                root_cause(&e)
            ))),
        })
    }

    async fn send_stream(&self, request: RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = self.dispatch(request).await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(api_error(status, &body));
        }
        Ok(response)
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> anyhow::Result<T> {
        let response = self.dispatch(request).await?;
        let status = response.status();
        let body = response.bytes().await.context("reading the rack's answer")?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).with_context(|| format!("the rack answered {status} with unexpected content"))
    }
}

/// How an https rack's certificate is trusted: the pinned fingerprint, else `known_racks`.
fn trust(base: &Url, fingerprint: Option<&str>) -> anyhow::Result<crate::tls::Trust> {
    if let Some(fingerprint) = fingerprint.filter(|f| !f.trim().is_empty()) {
        let pinned = crate::tls::parse_fingerprint(fingerprint).context("RACK_FINGERPRINT")?;
        return Ok(crate::tls::Trust::Pinned(pinned));
    }
    let Some(file) = crate::tls::known_racks_file() else {
        bail!(
            "neither HOME nor XDG_CONFIG_HOME is set, so rack cannot remember the rack's certificate: set RACK_FINGERPRINT to the fingerprint rack server printed"
        );
    };
    let host = base.host_str().context("RACK_URL has no host")?.to_lowercase();
    let port = base.port_or_known_default().unwrap_or(443);
    Ok(crate::tls::Trust::KnownRacks {
        file,
        rack: format!("{host}:{port}"),
    })
}

/// How many times a read answered 503 is sent again.
const RETRIES_OF_503: usize = 5;

/// How long a 503 with `Retry-After` (in seconds) asks to wait; at most 10 s, so a command
/// never sleeps for long on a rack's word.
fn retry_after(response: &reqwest::Response) -> Option<std::time::Duration> {
    if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let seconds: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::Duration::from_secs(seconds.min(10)))
}

/// A streamed text body read line by line, as its chunks arrive.
pub struct Lines {
    body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    pending: Vec<u8>,
    ended: bool,
}

impl Lines {
    /// The lines of `response`'s body.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            pending: Vec::new(),
            ended: false,
        }
    }

    /// The next line with its `\n` (the last one may lack it), or `None` once the body has
    /// ended. A broken connection ends the body too: callers that must tell the two apart
    /// look for the stream's own last line (`OK`, `ERROR: ...`).
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if self.ended {
                if self.pending.is_empty() {
                    return None;
                }
                let rest = std::mem::take(&mut self.pending);
                return Some(String::from_utf8_lossy(&rest).into_owned());
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.pending.extend_from_slice(&chunk),
                Some(Err(_)) | None => self.ended = true,
            }
        }
    }
}

/// An error answer as the command's error: a 401 is [`AuthFailed`] (its own exit code).
fn api_error(status: reqwest::StatusCode, body: &[u8]) -> anyhow::Error {
    let message = error_message(status, body);
    if status == reqwest::StatusCode::UNAUTHORIZED {
        anyhow::Error::new(AuthFailed(message))
    } else {
        anyhow::anyhow!(message)
    }
}

/// The message of an error answer: `{"error": ...}`, else the trimmed text, else the status.
fn error_message(status: reqwest::StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    if let Ok(ErrorBody { error }) = serde_json::from_slice(body) {
        return error;
    }
    let text = String::from_utf8_lossy(body).trim().to_owned();
    if text.is_empty() {
        format!("response status {}", status.as_u16())
    } else {
        text
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The password the local embedded rack saved, if this user can read it.
fn local_password() -> Option<String> {
    let data_dir = std::env::var_os("RACK_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(crate::config::default_data_dir);
    let text = std::fs::read_to_string(data_dir.join("password")).ok()?;
    Some(text.trim().to_owned())
}

/// `text` with its `%XX` escapes decoded (a password in a URL).
pub(super) fn percent_decode(text: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])?;
            out.push(u8::from_str_radix(hex, 16).context("bad percent-encoding in RACK_URL")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

fn url_segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_comes_from_the_url() {
        let client = Client::new(Some("http://convox:p%40ss@127.0.0.1:5443")).unwrap();
        assert_eq!(client.password.as_deref(), Some("p@ss"));
        assert_eq!(client.base.as_str(), "http://127.0.0.1:5443/");
        assert!(Client::new(Some("ftp://x")).is_err());
    }

    #[test]
    fn errors_read_json_then_text_then_status() {
        let status = reqwest::StatusCode::NOT_FOUND;
        assert_eq!(
            error_message(status, br#"{"error":"app not found: x"}"#),
            "app not found: x"
        );
        assert_eq!(error_message(status, b"app not found: x\n"), "app not found: x");
        assert_eq!(error_message(status, b""), "response status 404");
    }

    /// A rack that answers 503 with `Retry-After: 0` `busy` times, then 200; counts requests.
    /// The 200 carries `Retry-After` too: only a 503 is a reason to send again.
    async fn busy_rack(busy: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&seen);
        let answer = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < busy {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "0")],
                        "the database is unavailable, try again shortly\n",
                    )
                } else {
                    (axum::http::StatusCode::OK, [("retry-after", "0")], "{}")
                }
            }
        };
        let router = axum::Router::new().route("/x", axum::routing::get(answer.clone()).post(answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://:pw@{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (url, seen)
    }

    #[tokio::test]
    async fn reads_answered_503_are_sent_again_and_writes_are_not() {
        use std::sync::atomic::Ordering;
        let (url, seen) = busy_rack(2).await;
        let client = Client::new(Some(&url)).unwrap();
        let _: serde_json::Value = client.get("/x").await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 3, "two 503s, then the answer");

        let (url, seen) = busy_rack(1).await;
        let client = Client::new(Some(&url)).unwrap();
        let error = client.post::<serde_json::Value>("/x", &[]).await.unwrap_err();
        assert_eq!(error.to_string(), "the database is unavailable, try again shortly");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "a POST is sent once");

        // A rack that stays busy: the command gives up with its message.
        let (url, seen) = busy_rack(usize::MAX).await;
        let client = Client::new(Some(&url)).unwrap();
        let error = client.get::<serde_json::Value>("/x").await.unwrap_err();
        assert_eq!(error.to_string(), "the database is unavailable, try again shortly");
        assert_eq!(seen.load(Ordering::SeqCst), RETRIES_OF_503 + 1);
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(url_segment("my-app"), "my-app");
        assert_eq!(url_segment("a/b c"), "a%2Fb%20c");
    }
}
