//! The Kubernetes runtime's figures for `GET /apps/{app}/metrics`. rack routes nothing here, so
//! requests, failures (5xx) and latency percentiles come from the ingress controller's metrics
//! in Prometheus (`RACK_PROMETHEUS_URL`: ingress-nginx's `nginx_ingress_controller_requests` and
//! `..._request_duration_seconds` histogram, by namespace and service), one range query each,
//! evaluated at the end of every period that has ended: Prometheus keeps the history. Memory and
//! CPU are those of the running pods now, from the `metrics.k8s.io` API (metrics-server), when
//! the cluster serves it; otherwise there are none.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::KubeRuntime;
use super::prometheus::{Prometheus, QUERY_TIMEOUT};
use crate::runtime::{MetricsWindow, PeriodFigures, RuntimeError, Traffic};

impl KubeRuntime {
    pub(super) async fn kube_traffic(
        &self,
        app: &str,
        service: Option<&str>,
        window: &MetricsWindow,
    ) -> Result<Traffic, RuntimeError> {
        let namespace = self.namespace(app);
        let periods = match self.0.settings.config.prometheus_url.as_deref() {
            Some(base) => ingress_periods(base, &namespace, service, window, Utc::now())
                .await
                .map_err(|e| RuntimeError::Failed(format!("reading the ingress metrics from Prometheus: {e}")))?,
            None => Vec::new(),
        };
        let (memory, cpu) = self.pod_usage(&namespace, service).await;
        Ok(Traffic {
            periods,
            memory,
            cpu,
            held_since: None,
        })
    }

    /// Each running pod's memory (bytes) and CPU (cores) now, from `metrics.k8s.io`; none when
    /// the cluster does not serve that API (or cannot say).
    async fn pod_usage(&self, namespace: &str, service: Option<&str>) -> (Vec<u64>, Vec<f64>) {
        let selector = match service {
            Some(service) => format!("type=service,service={service}"),
            None => "type=service".to_owned(),
        };
        let path = format!(
            "/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods?labelSelector={}",
            urlencoding(&selector)
        );
        let Ok(request) = axum::http::Request::get(path).body(Vec::new()) else {
            return (Vec::new(), Vec::new());
        };
        match self.0.client.request::<serde_json::Value>(request).await {
            Ok(list) => usage(&list),
            Err(e) => {
                tracing::debug!(error = %e, "no pod metrics (metrics.k8s.io) in {namespace}");
                (Vec::new(), Vec::new())
            }
        }
    }
}

/// A label selector as a query value (its `=` and `,` escaped).
fn urlencoding(text: &str) -> String {
    text.replace('=', "%3D").replace(',', "%2C")
}

/// Per pod of a `PodMetricsList`: memory in bytes and CPU in cores, its containers summed.
#[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "bytes of memory")]
fn usage(list: &serde_json::Value) -> (Vec<u64>, Vec<f64>) {
    let mut memory = Vec::new();
    let mut cpu = Vec::new();
    for pod in list["items"].as_array().into_iter().flatten() {
        let containers = pod["containers"].as_array().into_iter().flatten();
        let (mut bytes, mut cores) = (0.0, 0.0);
        for container in containers {
            bytes += container["usage"]["memory"]
                .as_str()
                .map_or(0.0, super::nodes::quantity);
            cores += container["usage"]["cpu"].as_str().map_or(0.0, super::nodes::quantity);
        }
        memory.push(bytes.max(0.0) as u64);
        cpu.push(cores);
    }
    (memory, cpu)
}

/// The ingress controller's selector of the app's namespace (and service).
fn selector(namespace: &str, service: Option<&str>) -> String {
    let quoted = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    match service {
        Some(service) => format!("namespace=\"{}\",service=\"{}\"", quoted(namespace), quoted(service)),
        None => format!("namespace=\"{}\"", quoted(namespace)),
    }
}

/// The queries over one period of `period` seconds: requests, 5xx, then the 50th, 95th and
/// 99th latency percentiles (seconds).
fn queries(selector: &str, period: u64) -> [String; 5] {
    let quantile = |q: &str| {
        format!(
            "histogram_quantile({q}, sum by (le) (increase(nginx_ingress_controller_request_duration_seconds_bucket{{{selector}}}[{period}s])))"
        )
    };
    [
        format!("sum(increase(nginx_ingress_controller_requests{{{selector}}}[{period}s]))"),
        format!("sum(increase(nginx_ingress_controller_requests{{{selector},status=~\"5..\"}}[{period}s]))"),
        quantile("0.5"),
        quantile("0.95"),
        quantile("0.99"),
    ]
}

/// The periods of `window` that have ended by `now`, from the Prometheus at `base`.
async fn ingress_periods(
    base: &str,
    namespace: &str,
    service: Option<&str>,
    window: &MetricsWindow,
    now: DateTime<Utc>,
) -> Result<Vec<PeriodFigures>, String> {
    let period = window.period;
    // A period longer than any time can name has not ended (and must not overflow).
    let Some(step) = i64::try_from(period).ok().and_then(TimeDelta::try_seconds) else {
        return Ok(Vec::new());
    };
    // Evaluated at each period's end: the first's, up to the last that has ended.
    let last_end = window.end.min(now);
    let Some(first_end) = window.start.checked_add_signed(step).filter(|end| *end <= last_end) else {
        return Ok(Vec::new());
    };
    let ended = (last_end - first_end).num_seconds() / step.num_seconds().max(1);
    let last_end = first_end + TimeDelta::seconds(ended * step.num_seconds());
    let prometheus = Prometheus::new(base, QUERY_TIMEOUT)?;
    let [requests, errors, p50, p95, p99] = queries(&selector(namespace, service), period);
    let (start, end) = (first_end.timestamp(), last_end.timestamp());
    let requests = prometheus.query_range(&requests, start, end, period).await?;
    let errors = prometheus.query_range(&errors, start, end, period).await?;
    let p50 = prometheus.query_range(&p50, start, end, period).await?;
    let p95 = prometheus.query_range(&p95, start, end, period).await?;
    let p99 = prometheus.query_range(&p99, start, end, period).await?;
    Ok(periods(window.period, &requests, &errors, [&p50, &p95, &p99]))
}

/// The periods the answers make (each value stamped with its period's end).
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counts of requests"
)]
#[expect(clippy::cast_precision_loss, reason = "seconds far below 2^52")]
fn periods(
    period: u64,
    requests: &[(i64, f64)],
    errors: &[(i64, f64)],
    latency: [&[(i64, f64)]; 3],
) -> Vec<PeriodFigures> {
    let at = |t: &[(i64, f64)], end: i64| t.iter().find(|(time, _)| *time == end).map(|(_, v)| *v);
    let count = |v: f64| v.max(0.0).round() as u64;
    let step = i64::try_from(period).unwrap_or(i64::MAX);
    requests
        .iter()
        .filter_map(|&(end, total)| {
            let requests = count(total);
            let errors = at(errors, end).map_or(0, count).min(requests);
            let start = DateTime::from_timestamp(end - step, 0)?;
            let quantile = |i: usize| {
                at(latency[i], end)
                    .filter(|s| *s >= 0.0 && requests > 0)
                    .map(Duration::from_secs_f64)
            };
            // Prometheus gives totals per period, not per second: the range is the average.
            let per_second = |n: u64| (n as f64 / period as f64).round() as u64;
            Some(PeriodFigures {
                at: start,
                seconds: period,
                requests,
                errors,
                requests_range: (per_second(requests), per_second(requests)),
                errors_range: (per_second(errors), per_second(errors)),
                p50: quantile(0),
                p95: quantile(1),
                p99: quantile(2),
                memory: None,
                cpu: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_answers_become_periods() {
        let periods = periods(
            60,
            &[(1_800_000_060, 120.4), (1_800_000_120, 0.0)],
            &[(1_800_000_060, 12.0)],
            [&[(1_800_000_060, 0.01)], &[(1_800_000_060, 0.02)], &[]],
        );
        assert_eq!(periods.len(), 2);
        let first = &periods[0];
        assert_eq!(first.at.timestamp(), 1_800_000_000);
        assert_eq!((first.requests, first.errors, first.requests_range), (120, 12, (2, 2)));
        assert_eq!(first.p95, Some(Duration::from_millis(20)));
        assert_eq!(first.p99, None);
        assert_eq!((periods[1].requests, periods[1].p50), (0, None));
        // A period too long to have ended asks Prometheus nothing (and does not overflow).
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let window = MetricsWindow {
            start,
            end: start + TimeDelta::hours(1),
            period: 1_045_191_905_853_492_864,
        };
        let none = futures_util::FutureExt::now_or_never(ingress_periods(
            "http://127.0.0.1:9",
            "rack-a",
            None,
            &window,
            start + TimeDelta::hours(2),
        ));
        assert_eq!(none.map(Result::unwrap), Some(Vec::new()));
        let (memory, cpu) = usage(&serde_json::json!({"items": [
            {"containers": [{"usage": {"cpu": "250m", "memory": "64Mi"}}, {"usage": {"cpu": "0", "memory": "1Mi"}}]}
        ]}));
        assert_eq!((memory, cpu), (vec![65 << 20], vec![0.25]));
        assert_eq!(selector("rack-a", Some("web")), "namespace=\"rack-a\",service=\"web\"");
    }
}
