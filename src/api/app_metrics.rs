//! `GET /apps/{app}/metrics` and `/apps/{app}/services/{service}/metrics` (convox `AppMetrics`,
//! `ServiceMetrics`): the runtime's per-period figures in convox's shape, a list of
//! `{name, values: [{time, avg, count, max, min, sum}]}`. Query as the convox SDK sends it:
//! `start`, `end` (`20060102.150405.000000000` in UTC, or RFC 3339), `period` (seconds) and
//! `metrics` (comma-separated names).
//!
//! The metrics: `requests` and `errors` (per period: `sum` the total, `count` the seconds
//! measured, `avg` per second, `min`/`max` the fewest/most in one second), `latency-p50`,
//! `latency-p95`, `latency-p99` (milliseconds; `count` the requests they are over), `memory`
//! (MiB over the instances: `count` the instances; the last period has the value now) and `cpu`
//! (cores busy, where the runtime knows it). Where rack routes the traffic itself, periods
//! older than its routers' memory come from the per-minute history (`metric_history`).

use axum::extract::{Path, State};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::apps::AppPath;
use super::input::{Pretty, QueryParams};
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::runtime::{MetricsWindow, Traffic};

/// Every metric, in the order answered.
/// (The first four in the order they were first answered, for clients that index them.)
pub const METRICS: [&str; 7] = [
    "requests",
    "errors",
    "latency-p95",
    "memory",
    "latency-p50",
    "latency-p99",
    "cpu",
];

/// The window when none is asked for: the last hour, by the minute.
const DEFAULT_SPAN_SECONDS: i64 = 3600;
const DEFAULT_PERIOD: u64 = 60;

#[derive(Debug, Deserialize)]
pub struct MetricsQuery {
    start: Option<String>,
    end: Option<String>,
    period: Option<u64>,
    metrics: Option<String>,
}

/// convox's `structs.Metric`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    pub name: String,
    pub values: Vec<MetricValue>,
}

/// convox's `structs.MetricValue`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricValue {
    pub time: DateTime<Utc>,
    pub avg: f64,
    pub count: f64,
    pub max: f64,
    pub min: f64,
    pub sum: f64,
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn app_metrics(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<MetricsQuery>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<Metric>>> {
    answer(&state, &app.name, None, &query).await
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, service = %service))]
pub async fn service_metrics(
    State(state): State<AppState>,
    Path((_, service)): Path<(String, String)>,
    QueryParams(query): QueryParams<MetricsQuery>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<Metric>>> {
    answer(&state, &app.name, Some(&service), &query).await
}

async fn answer(
    state: &AppState,
    app: &str,
    service: Option<&str>,
    query: &MetricsQuery,
) -> ApiResult<Pretty<Vec<Metric>>> {
    let names = wanted(query.metrics.as_deref())?;
    let window = window(query, Utc::now())?;
    let traffic = state
        .runtime
        .traffic(app, service, &window)
        .await
        .map_err(ApiError::runtime("reading the app's metrics"))?
        .unwrap_or_default();
    let traffic = match traffic.held_since {
        Some(held_since) => Traffic {
            periods: super::metric_history::merge(state, app, service, &window, traffic.periods, held_since).await?,
            ..traffic
        },
        None => traffic,
    };
    Ok(Pretty(shape(&traffic, &names, &window)))
}

fn wanted(metrics: Option<&str>) -> ApiResult<Vec<&'static str>> {
    let Some(asked) = metrics.filter(|m| !m.is_empty()) else {
        return Ok(METRICS.to_vec());
    };
    let asked: Vec<&str> = asked.split(',').map(str::trim).collect();
    if let Some(unknown) = asked.iter().find(|a| !METRICS.contains(a)) {
        return Err(ApiError::BadRequest(format!(
            "unknown metric {unknown:?}: the metrics are {}",
            METRICS.join(", ")
        )));
    }
    Ok(METRICS.into_iter().filter(|m| asked.contains(m)).collect())
}

/// The window a query asks for, `now` filling what it leaves out.
fn window(query: &MetricsQuery, now: DateTime<Utc>) -> ApiResult<MetricsWindow> {
    let end = query.end.as_deref().map(|t| time("end", t)).transpose()?.unwrap_or(now);
    let start = query
        .start
        .as_deref()
        .map(|t| time("start", t))
        .transpose()?
        .unwrap_or(end - chrono::Duration::seconds(DEFAULT_SPAN_SECONDS));
    let period = query.period.unwrap_or(DEFAULT_PERIOD);
    if period == 0 {
        return Err(ApiError::BadRequest("period must be at least 1 second".into()));
    }
    if start >= end {
        return Err(ApiError::BadRequest("start must be before end".into()));
    }
    let span = u64::try_from((end - start).num_seconds()).unwrap_or(0);
    if span.div_ceil(period) > crate::runtime::MAX_METRIC_PERIODS {
        return Err(ApiError::BadRequest(format!(
            "that is more than {} periods: ask for a longer period or a shorter window",
            crate::runtime::MAX_METRIC_PERIODS
        )));
    }
    Ok(MetricsWindow { start, end, period })
}

/// A time as the convox SDK writes it (`20060102.150405.000000000`, UTC) or RFC 3339.
fn time(name: &str, text: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y%m%d.%H%M%S%.f") {
        return Ok(t.and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{name} must be a time as 20060102.150405.000000000 or RFC 3339, got {text:?}"
            ))
        })
}

#[expect(clippy::cast_precision_loss, reason = "counts and bytes far below 2^52")]
fn shape(traffic: &Traffic, names: &[&str], window: &MetricsWindow) -> Vec<Metric> {
    let count = |(min, max): (u64, u64), sum: u64, seconds: u64| MetricValue {
        time: DateTime::<Utc>::MIN_UTC,
        avg: sum as f64 / seconds.max(1) as f64,
        count: seconds as f64,
        max: max as f64,
        min: min as f64,
        sum: sum as f64,
    };
    names
        .iter()
        .map(|&name| {
            let values = match name {
                "requests" | "errors" => traffic
                    .periods
                    .iter()
                    .map(|p| {
                        let (range, sum) = if name == "requests" {
                            (p.requests_range, p.requests)
                        } else {
                            (p.errors_range, p.errors)
                        };
                        MetricValue {
                            time: p.at,
                            ..count(range, sum, p.seconds)
                        }
                    })
                    .collect(),
                "latency-p50" | "latency-p95" | "latency-p99" => traffic
                    .periods
                    .iter()
                    .filter_map(|p| {
                        let quantile = match name {
                            "latency-p50" => p.p50,
                            "latency-p95" => p.p95,
                            _ => p.p99,
                        };
                        let ms = quantile?.as_secs_f64() * 1000.0;
                        Some(MetricValue {
                            time: p.at,
                            avg: ms,
                            count: p.requests as f64,
                            max: ms,
                            min: ms,
                            sum: ms,
                        })
                    })
                    .collect(),
                "cpu" => cpu(traffic, window),
                _ => memory(traffic, window),
            };
            Metric {
                name: name.to_owned(),
                values,
            }
        })
        .collect()
}

/// The instances' memory per period (from the history, where kept), in MiB; the last period
/// has the value now, when the runtime can tell.
#[expect(clippy::cast_precision_loss, reason = "counts and bytes far below 2^52")]
fn memory(traffic: &Traffic, window: &MetricsWindow) -> Vec<MetricValue> {
    let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
    let mut values: Vec<MetricValue> = traffic
        .periods
        .iter()
        .filter_map(|p| {
            let (bytes, instances) = p.memory?;
            let each = mib(bytes) / instances.max(1) as f64;
            Some(MetricValue {
                time: p.at,
                avg: each,
                count: instances as f64,
                max: each,
                min: each,
                sum: mib(bytes),
            })
        })
        .collect();
    let now: Vec<f64> = traffic.memory.iter().map(|b| mib(*b)).collect();
    if now.is_empty() {
        return values;
    }
    let sum: f64 = now.iter().sum();
    let time = last_period(window);
    values.retain(|v| v.time != time);
    values.push(MetricValue {
        time,
        avg: sum / now.len() as f64,
        count: now.len() as f64,
        max: now.iter().copied().fold(f64::MIN, f64::max),
        min: now.iter().copied().fold(f64::MAX, f64::min),
        sum,
    });
    values
}

/// The instances' CPU per period (cores, from the history, where kept: the busiest minute's);
/// the last period has the value now, when the runtime can tell.
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn cpu(traffic: &Traffic, window: &MetricsWindow) -> Vec<MetricValue> {
    let mut values: Vec<MetricValue> = traffic
        .periods
        .iter()
        .filter_map(|p| {
            let cores = p.cpu?;
            // The history keeps the instances' count with their memory.
            let instances = p.memory.map_or(1, |(_, n)| n.max(1)) as f64;
            Some(MetricValue {
                time: p.at,
                avg: cores / instances,
                count: instances,
                max: cores / instances,
                min: cores / instances,
                sum: cores,
            })
        })
        .collect();
    if traffic.cpu.is_empty() {
        return values;
    }
    let sum: f64 = traffic.cpu.iter().sum();
    let time = last_period(window);
    values.retain(|v| v.time != time);
    values.push(MetricValue {
        time,
        avg: sum / traffic.cpu.len() as f64,
        count: traffic.cpu.len() as f64,
        max: traffic.cpu.iter().copied().fold(f64::MIN, f64::max),
        min: traffic.cpu.iter().copied().fold(f64::MAX, f64::min),
        sum,
    });
    values
}

/// When the window's last period starts.
fn last_period(window: &MetricsWindow) -> DateTime<Utc> {
    let span = u64::try_from((window.end - window.start).num_seconds())
        .unwrap_or(0)
        .max(1);
    let last = (span - 1) / window.period * window.period;
    window.start + chrono::Duration::seconds(i64::try_from(last).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_time_format_and_rfc3339_parse() {
        let t = time("start", "20260102.030405.000000000").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert_eq!(time("end", "2026-01-02T03:04:05Z").unwrap(), t);
        assert!(time("end", "yesterday").is_err());
    }

    #[test]
    fn periods_become_convox_values() {
        let start = time("start", "20260102.030400.000000000").unwrap();
        let window = MetricsWindow {
            start,
            end: start + chrono::Duration::seconds(120),
            period: 60,
        };
        let traffic = Traffic {
            periods: vec![crate::runtime::PeriodFigures {
                at: start,
                seconds: 10,
                requests: 30,
                errors: 3,
                requests_range: (1, 7),
                errors_range: (0, 2),
                p95: Some(std::time::Duration::from_millis(4)),
                ..crate::runtime::PeriodFigures::default()
            }],
            memory: vec![2 << 20, 4 << 20],
            cpu: vec![0.5],
            held_since: None,
        };
        let metrics = shape(&traffic, &METRICS, &window);
        let requests = &metrics[0].values[0];
        assert_eq!(
            (requests.sum, requests.count, requests.avg, requests.min, requests.max),
            (30.0, 10.0, 3.0, 1.0, 7.0)
        );
        assert_eq!(metrics[1].values[0].sum, 3.0);
        assert_eq!(metrics[6].values[0].sum, 0.5, "cpu now");
        assert_eq!(metrics[2].values[0].max, 4.0);
        let memory = &metrics[3].values[0];
        assert_eq!(
            (memory.sum, memory.count, memory.time),
            (6.0, 2.0, start + chrono::Duration::seconds(60))
        );
        assert!(wanted(Some("requests,bogus")).is_err());
        assert_eq!(wanted(Some("errors,requests")).unwrap(), vec!["requests", "errors"]);
    }
}
