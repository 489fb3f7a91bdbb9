//! A rollout's analysis from the ingress controller's request metrics, when `RACK_PROMETHEUS_URL`
//! names a Prometheus that scrapes ingress-nginx: each judged service with an Ingress is
//! compared with itself before the rollout.
//!
//! ingress-nginx labels its series by namespace, ingress, service and status, never by pod or
//! release, so the two releases cannot be told apart within one window. What is compared is
//! the service as a whole: its traffic since the first new pod became ready (the pod watch has
//! waited out the window, so every old pod is gone by then) against the same length of traffic
//! just before the rollout began (the first new pod was created), when only the old release
//! served it. The same verdict as the local runtime's ([`crate::deploy::analysis::judge`]) then
//! applies: too few requests skip, a 5xx rate above `max_error_rate` (and above the old one)
//! fails, and so does a p95 over `max_latency_ratio` times the old one.
//!
//! A Prometheus that cannot be reached, times out or answers an error skips this part with a
//! line that says so: the pod watch has judged the release already, and an outage of the
//! monitoring must neither roll back good releases nor hold rollouts. Every query is bounded
//! ([`QUERY_TIMEOUT`]).

use std::time::Duration;

use crate::deploy::analysis::{Figures, Names, Verdict, judge};
use crate::manifest::Analysis;

/// The longest a query may take, connecting included (Prometheus is asked to give up a little
/// earlier, so a slow evaluation answers with its error rather than not at all).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The ingress-nginx series of one service behind one Ingress.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The app's namespace.
    pub namespace: &'a str,
    pub ingress: &'a str,
    pub service: &'a str,
}

/// The three queries of a window of `range` seconds: requests, 5xx responses, p95 (seconds).
pub fn queries(target: &Target<'_>, range: u64) -> [String; 3] {
    let selector = format!(
        "namespace=\"{}\",ingress=\"{}\",service=\"{}\"",
        quoted(target.namespace),
        quoted(target.ingress),
        quoted(target.service)
    );
    [
        format!("sum(increase(nginx_ingress_controller_requests{{{selector}}}[{range}s]))"),
        format!("sum(increase(nginx_ingress_controller_requests{{{selector},status=~\"5..\"}}[{range}s]))"),
        format!(
            "histogram_quantile(0.95, sum by (le) (increase(nginx_ingress_controller_request_duration_seconds_bucket{{{selector}}}[{range}s])))"
        ),
    ]
}

/// A label value inside double quotes (Kubernetes names hold neither, but nothing is assumed).
fn quoted(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The single value of an instant query's answer: `None` when no series matched (no traffic)
/// or the value is not a number (a quantile of nothing is NaN).
///
/// # Errors
/// Prometheus' error, or an answer of another shape.
pub fn value(body: &serde_json::Value) -> Result<Option<f64>, String> {
    if body["status"] != "success" {
        return Err(format!(
            "{}: {}",
            body["errorType"].as_str().unwrap_or("error"),
            body["error"].as_str().unwrap_or("an answer without status success")
        ));
    }
    let Some(result) = body["data"]["result"].as_array() else {
        return Err("an answer without data.result".to_owned());
    };
    let Some(first) = result.first() else { return Ok(None) };
    let text = first["value"][1]
        .as_str()
        .ok_or_else(|| "a sample without a value".to_owned())?;
    let number: f64 = text.parse().map_err(|_| format!("a sample value {text:?}"))?;
    Ok(number.is_finite().then_some(number))
}

/// The values of a range query's answer (its first series), by Unix time.
///
/// # Errors
/// Prometheus' error, or an answer of another shape.
pub fn range_values(body: &serde_json::Value) -> Result<Vec<(i64, f64)>, String> {
    if body["status"] != "success" {
        return Err(format!(
            "{}: {}",
            body["errorType"].as_str().unwrap_or("error"),
            body["error"].as_str().unwrap_or("an answer without status success")
        ));
    }
    let Some(result) = body["data"]["result"].as_array() else {
        return Err("an answer without data.result".to_owned());
    };
    let Some(first) = result.first() else {
        return Ok(Vec::new());
    };
    let Some(values) = first["values"].as_array() else {
        return Err("a series without values".to_owned());
    };
    let mut out = Vec::new();
    for pair in values {
        let at = pair[0].as_f64().ok_or_else(|| "a sample without a time".to_owned())?;
        let text = pair[1].as_str().ok_or_else(|| "a sample without a value".to_owned())?;
        let number: f64 = text.parse().map_err(|_| format!("a sample value {text:?}"))?;
        if number.is_finite() {
            #[expect(clippy::cast_possible_truncation, reason = "Unix seconds")]
            out.push((at.round() as i64, number));
        }
    }
    Ok(out)
}

/// The figures of the three answers (`increase` extrapolates, so counts are rounded).
pub fn figures(requests: Option<f64>, errors: Option<f64>, p95: Option<f64>) -> Figures {
    let count = |v: Option<f64>| v.map_or(0, |v| v.max(0.0).round() as u64);
    let requests = count(requests);
    Figures {
        requests,
        errors: count(errors).min(requests),
        p95: p95.filter(|s| *s >= 0.0 && requests > 0).map(Duration::from_secs_f64),
    }
}

/// The verdict on the service's traffic: `new` over `range` seconds since the new pods took it,
/// `old` over the window before the rollout (the window has ended: never "watching"). The line
/// says where the figures come from ("analysis at the ingress").
pub fn verdict(settings: &Analysis, names: Names<'_>, new: &Figures, old: &Figures, range: u64) -> Verdict {
    let elapsed = Duration::from_secs(range.max(u64::from(settings.window)));
    let relabel = |line: String| line.replacen("analysis", "analysis at the ingress", 1);
    match judge(settings, names, new, old, elapsed) {
        Verdict::Passed(line) => Verdict::Passed(relabel(line)),
        Verdict::Failed(line) => Verdict::Failed(relabel(line)),
        Verdict::Skipped(line) => Verdict::Skipped(relabel(line)),
        Verdict::Watching => Verdict::Skipped(format!(
            "analysis at the ingress skipped: no verdict on {} requests",
            new.requests
        )),
    }
}

/// The verdict on what Prometheus answered: the figures (new, old, the new one's range), or why
/// it could not give them, which skips (the pods have been judged; the rollout goes on).
pub fn decide(settings: &Analysis, names: Names<'_>, answer: &Result<(Figures, Figures, u64), String>) -> Verdict {
    match answer {
        Ok((new, old, range)) => verdict(settings, names, new, old, *range),
        Err(error) => Verdict::Skipped(format!(
            "analysis at the ingress skipped: Prometheus failed ({error}); the pods alone judged {}",
            names.new
        )),
    }
}

/// A client of one Prometheus.
#[derive(Debug, Clone)]
pub struct Prometheus {
    client: reqwest::Client,
    /// Without a trailing slash.
    base: String,
    timeout: Duration,
}

impl Prometheus {
    /// A client of the Prometheus at `base` whose each query gives up after `timeout`.
    ///
    /// # Errors
    /// When the TLS stack cannot be set up.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, String> {
        crate::tls::install_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("rack/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the HTTP client: {e}"))?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// One instant query, evaluated at `at` (Unix seconds; none: now).
    ///
    /// # Errors
    /// Unreachable, timed out, an HTTP error or Prometheus' own error, as a sentence.
    pub async fn query(&self, query: &str, at: Option<i64>) -> Result<Option<f64>, String> {
        let mut params = vec![
            ("query", query.to_owned()),
            // Prometheus stops evaluating before rack stops waiting.
            ("timeout", format!("{}ms", self.timeout.as_millis() * 4 / 5)),
        ];
        if let Some(at) = at {
            params.push(("time", at.to_string()));
        }
        let (url, body) = self.get("query", &params).await?;
        value(&body).map_err(|e| format!("{url}: {e}"))
    }

    /// Prometheus's answer to `GET /api/v1/<api>?<params>`, with the URL asked (for messages).
    async fn get(&self, api: &str, params: &[(&str, String)]) -> Result<(String, serde_json::Value), String> {
        let url = format!("{}/api/v1/{api}", self.base);
        let response = self
            .client
            .get(&url)
            .query(params)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", describe(&e)))?;
        let status = response.status();
        // Prometheus answers its errors (a bad query: 400, a timeout: 503) as JSON too.
        let body: serde_json::Value = match response.json().await {
            Ok(body) => body,
            Err(_) if !status.is_success() => return Err(format!("{url}: HTTP {status}")),
            Err(e) => return Err(format!("{url}: {}", describe(&e))),
        };
        Ok((url, body))
    }

    /// A range query (`/api/v1/query_range`) evaluated at `start`, `start + step`, ... up to
    /// `end` (Unix seconds): the values of its first series (rack's queries sum to one), by
    /// time; a time whose value is not a number is left out.
    ///
    /// # Errors
    /// As [`Prometheus::query`].
    pub async fn query_range(&self, query: &str, start: i64, end: i64, step: u64) -> Result<Vec<(i64, f64)>, String> {
        let params = [
            ("query", query.to_owned()),
            ("start", start.to_string()),
            ("end", end.to_string()),
            ("step", format!("{step}s")),
            ("timeout", format!("{}ms", self.timeout.as_millis() * 4 / 5)),
        ];
        let (url, body) = self.get("query_range", &params).await?;
        range_values(&body).map_err(|e| format!("{url}: {e}"))
    }

    /// What `target` served in the `range` seconds up to `at` (none: now).
    ///
    /// # Errors
    /// As [`Prometheus::query`].
    pub async fn figures(&self, target: &Target<'_>, range: u64, at: Option<i64>) -> Result<Figures, String> {
        let [requests, errors, p95] = queries(target, range.max(1));
        let requests = self.query(&requests, at).await?;
        let errors = self.query(&errors, at).await?;
        let p95 = self.query(&p95, at).await?;
        Ok(figures(requests, errors, p95))
    }
}

/// A reqwest error with its causes (its own text omits them: "error sending request").
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "no answer in time".to_owned();
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
