//! Health checks of the local runtime's instances: after the grace period, `GET health.path`
//! must answer 2xx or 3xx within the timeout. Three failures in a row before an instance was
//! ever ready fail it (its rollout gives up on it); three later make it unhealthy (it is taken
//! out of its router and restarted). Services without a port are ready once they have run for
//! their grace period.

use std::sync::Arc;
use std::time::Duration;

use super::instance::{Health, Instance, RouteRefresh};
use crate::manifest::Service;
use crate::runtime::LogSink;

/// Consecutive failed checks that make an instance unhealthy.
const FAILURE_THRESHOLD: u32 = 3;

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
    tokio::time::sleep(check.grace).await;
    let mut failures = 0;
    let mut ever_ready = false;
    // Failures count once per `interval`, however often we look: a slow starter gets
    // grace + threshold × interval, as Kubernetes would give it.
    let mut last_counted: Option<tokio::time::Instant> = None;
    loop {
        let result = if check.http {
            probe(client, instance.port(), &check.path, check.timeout).await
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
                if last_counted.is_none_or(|at| now.duration_since(at) >= check.interval) {
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
        // Until the first pass, look often so rollouts move fast; then every `interval`.
        let pause = if ever_ready {
            check.interval
        } else {
            check.interval.min(Duration::from_millis(250))
        };
        tokio::time::sleep(pause).await;
    }
}

async fn probe(client: &reqwest::Client, port: Option<u16>, path: &str, timeout: Duration) -> Result<(), String> {
    let Some(port) = port else { return Ok(()) };
    let url = format!("http://127.0.0.1:{port}{path}");
    match client.get(&url).timeout(timeout).send().await {
        Ok(response) if response.status().is_success() || response.status().is_redirection() => Ok(()),
        Ok(response) => Err(format!("GET {path} answered {}", response.status())),
        Err(e) if e.is_timeout() => Err(format!("GET {path} timed out")),
        Err(_) => Err(format!("GET {path}: connection refused")),
    }
}
