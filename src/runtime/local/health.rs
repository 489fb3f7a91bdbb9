//! Health checks of the local runtime's instances: `GET health.path` must answer 2xx or 3xx
//! within the timeout. As Kubernetes' startup probes do, a new instance is checked as soon as
//! it starts, then after 20 ms, 40 ms, … (at most 500 ms, and never more than the interval)
//! until its first success; the interval applies after that. The grace period is the startup
//! allowance: failures within it do not count. After it, three failures in a row (counted once
//! per interval) before an instance was ever ready fail it (its rollout gives up on it); three
//! later make it unhealthy (it is taken out of its router and restarted). So an instance is in
//! its router as soon as it answers, and a slow starter still gets grace + 3 × interval.
//! Services without a port have nothing to ask: they are ready once they have run for their
//! grace period.

use std::sync::Arc;
use std::time::Duration;

use super::instance::{Health, Instance, RouteRefresh};
use crate::manifest::Service;
use crate::runtime::LogSink;

/// Consecutive failed checks that make an instance unhealthy.
const FAILURE_THRESHOLD: u32 = 3;

/// The pause after the first failed check of a new instance; it doubles after each failure
/// until [`STARTUP_BACKOFF_MAX`].
const STARTUP_BACKOFF_FIRST: Duration = Duration::from_millis(20);

/// The longest pause between checks of an instance that was never ready.
const STARTUP_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The pause before the next check of an instance that was never ready, after `previous`.
pub fn startup_backoff(previous: Option<Duration>, interval: Duration) -> Duration {
    previous
        .map_or(STARTUP_BACKOFF_FIRST, |p| p.saturating_mul(2))
        .min(STARTUP_BACKOFF_MAX)
        .min(interval)
}

/// A service's health check.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Whether there is an HTTP check at all (a port, and not disabled).
    pub http: bool,
    pub path: String,
    pub grace: Duration,
    pub interval: Duration,
    pub timeout: Duration,
}

impl HealthCheck {
    /// The check of `service`, from its manifest.
    pub fn of(service: &Service) -> Self {
        Self {
            http: service.port.is_some() && !service.health.disabled,
            path: service.health.path.clone(),
            grace: Duration::from_secs(u64::from(service.health.grace)),
            interval: Duration::from_secs(u64::from(service.health.interval.max(1))),
            timeout: Duration::from_secs(u64::from(service.health.timeout.max(1))),
        }
    }
}

/// Checks the instance's health until it has failed [`FAILURE_THRESHOLD`] checks in a row after
/// having been ready (then returns, so it is restarted). Before it is first ready, failures
/// past the threshold mark it failed (the rollout gives up on it).
pub async fn health_loop(
    client: &reqwest::Client,
    instance: &Arc<Instance>,
    check: &HealthCheck,
    log: &LogSink,
    refresh_routes: &RouteRefresh,
) {
    let started = tokio::time::Instant::now();
    if !check.http {
        // Nothing to ask: having run for its grace period is all the evidence there is.
        tokio::time::sleep(check.grace).await;
    }
    let mut failures = 0;
    let mut ever_ready = false;
    let mut backoff: Option<Duration> = None;
    // Failures count once per `interval`, however often we look: a slow starter gets
    // grace + threshold × interval, as Kubernetes would give it.
    let mut last_counted: Option<tokio::time::Instant> = None;
    loop {
        let result = if check.http {
            probe(client, instance.backend(), &check.path, check.timeout).await
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                failures = 0;
                last_counted = None;
                if *instance.health.borrow() != Health::Ready {
                    instance.health.send_replace(Health::Ready);
                    refresh_routes();
                }
                ever_ready = true;
            }
            Err(reason) => {
                let now = tokio::time::Instant::now();
                // Within the grace period a failure is the instance still starting.
                let counts = ever_ready || now.duration_since(started) >= check.grace;
                if counts && last_counted.is_none_or(|at| now.duration_since(at) >= check.interval) {
                    failures += 1;
                    last_counted = Some(now);
                }
                if failures >= FAILURE_THRESHOLD {
                    if !ever_ready {
                        instance.health.send_replace(Health::Failed(reason));
                    } else {
                        instance.health.send_replace(Health::Unhealthy);
                        refresh_routes();
                        log.line(
                            &crate::stream_names::system("local", &instance.id),
                            format!("Health check failed: {reason}"),
                        )
                        .await;
                        return;
                    }
                }
            }
        }
        // Until the first pass, look again soon (backing off) so rollouts move as fast as the
        // app starts; then every `interval`.
        let pause = if ever_ready {
            check.interval
        } else {
            let next = startup_backoff(backoff, check.interval);
            backoff = Some(next);
            next
        };
        tokio::time::sleep(pause).await;
    }
}

async fn probe(
    client: &reqwest::Client,
    backend: Option<super::router::Backend>,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let Some(backend) = backend else { return Ok(()) };
    let status = match &backend.network {
        // In the app's network: a connection made there, one request on it.
        Some(network) => tokio::time::timeout(timeout, probe_inside(network, backend.addr, path))
            .await
            .unwrap_or(Err(Failure::Timeout)),
        None => {
            let url = format!("http://{}{path}", backend.addr);
            match client.get(&url).timeout(timeout).send().await {
                Ok(response) => Ok(response.status()),
                Err(e) if e.is_timeout() => Err(Failure::Timeout),
                Err(_) => Err(Failure::Refused),
            }
        }
    };
    match status {
        Ok(status) if status.is_success() || status.is_redirection() => Ok(()),
        Ok(status) => Err(format!("GET {path} answered {status}")),
        Err(Failure::Timeout) => Err(format!("GET {path} timed out")),
        Err(Failure::Refused) => Err(format!("GET {path}: connection refused")),
    }
}

/// Why a check got no answer.
enum Failure {
    Timeout,
    Refused,
}

/// `GET path` from `addr` in `network`: the status of the answer.
async fn probe_inside(
    network: &super::app_network::AppNetwork,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<axum::http::StatusCode, Failure> {
    let stream = network.connect(addr).await.map_err(|_| Failure::Refused)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|_| Failure::Refused)?;
    // Ends once the answer is dropped (bounded, whatever the instance does).
    tokio::spawn(tokio::time::timeout(Duration::from_secs(60), connection));
    let request = axum::http::Request::get(path)
        .header(axum::http::header::HOST, addr.to_string())
        .body(axum::body::Body::empty())
        .map_err(|_| Failure::Refused)?;
    let response = sender.send_request(request).await.map_err(|_| Failure::Refused)?;
    Ok(response.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_instance_is_checked_often_then_less() {
        let interval = Duration::from_secs(5);
        let mut pauses = Vec::new();
        let mut previous = None;
        for _ in 0..8 {
            let next = startup_backoff(previous, interval);
            pauses.push(next.as_millis());
            previous = Some(next);
        }
        assert_eq!(pauses, [20, 40, 80, 160, 320, 500, 500, 500]);
        // Never less often than the interval.
        assert_eq!(
            startup_backoff(Some(Duration::from_millis(320)), Duration::from_millis(300)).as_millis(),
            300
        );
    }
}
