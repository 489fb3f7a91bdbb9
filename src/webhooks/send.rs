//! One attempt of a delivery: the event as JSON, POSTed with its id, timestamp and signature
//! headers, with a time limit; redirects are not followed (a redirect could lead to an
//! address the policy refuses) and no proxy is used.

use std::time::{Duration, Instant};

use super::address::{CheckedResolver, check_literal};
use super::signature::{self, sign};

/// How much of a receiver's answer is kept in the attempt log.
pub const RESPONSE_EXCERPT: usize = 1024;

/// What an attempt came to, as seen from rack.
#[derive(Debug, Clone)]
pub struct Attempted {
    /// The receiver's HTTP status (`None`: it did not answer).
    pub status: Option<u16>,
    /// Why there was no answer, or why the answer was not taken.
    pub error: Option<String>,
    pub latency: Duration,
    /// The beginning of the answer's body.
    pub response: String,
}

impl Attempted {
    /// The receiver took the delivery.
    pub fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// What is sent: to which URL, with which secret, what.
#[derive(Debug)]
pub struct Request<'a> {
    pub url: &'a str,
    pub secret: &'a str,
    pub delivery: uuid::Uuid,
    pub kind: &'a str,
    pub attempt: i32,
    pub body: &'a [u8],
}

/// The delivery client.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    allow_private: bool,
}

impl Sender {
    /// A client that checks every address it connects to.
    ///
    /// # Errors
    /// When the TLS stack cannot be set up.
    pub fn new(settings: &super::Settings) -> anyhow::Result<Self> {
        crate::tls::install_provider();
        let client = reqwest::Client::builder()
            .dns_resolver(CheckedResolver {
                allow_private: settings.allow_private,
            })
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("rack-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            allow_private: settings.allow_private,
        })
    }

    /// Sends one attempt.
    pub async fn send(&self, request: &Request<'_>) -> Attempted {
        let started = Instant::now();
        let refused = |error: String| Attempted {
            status: None,
            error: Some(error),
            latency: started.elapsed(),
            response: String::new(),
        };
        let url = match reqwest::Url::parse(request.url) {
            Ok(url) => url,
            Err(e) => return refused(format!("invalid URL: {e}")),
        };
        if let Err(e) = check_literal(&url, self.allow_private) {
            return refused(e);
        }
        let timestamp = chrono::Utc::now().timestamp();
        let sent = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(signature::ID_HEADER, request.delivery.to_string())
            .header(signature::TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                signature::SIGNATURE_HEADER,
                sign(request.secret, timestamp, request.body),
            )
            .header(signature::EVENT_HEADER, request.kind)
            .header(signature::ATTEMPT_HEADER, request.attempt.to_string())
            .body(request.body.to_vec())
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => return refused(describe(&e.without_url())),
        };
        let status = response.status().as_u16();
        let mut excerpt = Vec::new();
        let mut error = None;
        while excerpt.len() < RESPONSE_EXCERPT {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                Ok(None) => break,
                // The status is what counts; a body cut short is noted.
                Err(e) => {
                    error = Some(format!("reading the answer: {}", describe(&e.without_url())));
                    break;
                }
            }
        }
        excerpt.truncate(RESPONSE_EXCERPT);
        let mut response = String::from_utf8_lossy(&excerpt).into_owned();
        response.retain(|c| !c.is_control() || c == '\n' || c == '\t');
        if !(200..300).contains(&status) && error.is_none() {
            error = Some(format!("the receiver answered {status}"));
        }
        Attempted {
            status: Some(status),
            error,
            latency: started.elapsed(),
            response,
        }
    }
}

/// A reqwest error with its causes (the resolver's refusal is one of them), without the URL
/// (its query may hold a credential; the log of attempts and rack's own log show this text).
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out waiting for the receiver".into();
    }
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        let line = e.to_string();
        if !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
        source = e.source();
    }
    text
}
