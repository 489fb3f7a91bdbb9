//! The older part of `GET /apps/{app}/metrics` on runtimes where rack routes the traffic
//! itself: a router holds only its last minutes in memory, so periods before that (and every
//! period of a minute or more) are answered from the per-minute history all replicas write
//! (`metric_minutes`, `jobs::metrics`). A minute's row lands in the period its start falls in.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};

use crate::AppState;
use crate::error::ApiResult;
use crate::runtime::{LATENCY_BUCKETS, MetricsWindow, PeriodFigures, latency_quantile};
use crate::store::metric_minutes::MinuteRow;

/// The history's resolution, in seconds.
const MINUTE: u64 = 60;

/// `live` (periods from the routers' memory, which starts at `held_since`) completed with
/// the history: a period comes from memory when it is shorter than a minute and starts within
/// it, from the history otherwise.
pub async fn merge(
    state: &AppState,
    app: &str,
    service: Option<&str>,
    window: &MetricsWindow,
    live: Vec<PeriodFigures>,
    held_since: DateTime<Utc>,
) -> ApiResult<Vec<PeriodFigures>> {
    let from_live = |at: DateTime<Utc>| window.period < MINUTE && at >= held_since;
    if from_live(window.start) {
        return Ok(live);
    }
    // This server's seconds not yet written, so the current minute is whole.
    crate::jobs::metrics::flush(state).await;
    // The minute the window starts in counts too (its row starts before the window).
    let rows = crate::store::metric_minutes::read(
        &state.pool,
        app,
        service,
        window.start - TimeDelta::seconds(59),
        window.end,
    )
    .await?;
    let mut periods: Vec<PeriodFigures> = live.into_iter().filter(|p| from_live(p.at)).collect();
    periods.extend(history(&rows, window).into_iter().filter(|p| !from_live(p.at)));
    periods.sort_by_key(|p| p.at);
    Ok(periods)
}

/// One period's minutes, as they are summed.
#[derive(Default)]
struct Acc {
    requests: u64,
    errors: u64,
    latency: Vec<u64>,
    /// Per minute: seconds measured, per-second ranges, memory (bytes, instances), summed over
    /// the services and releases of that minute.
    minutes: BTreeMap<DateTime<Utc>, Minute>,
}

#[derive(Default, Clone, Copy)]
struct Minute {
    seconds: u64,
    requests_range: (u64, u64),
    errors_range: (u64, u64),
    memory: Option<(u64, u64)>,
    cpu: Option<f64>,
}

/// The periods of `window` that `rows` fall in.
fn history(rows: &[MinuteRow], window: &MetricsWindow) -> Vec<PeriodFigures> {
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut periods: BTreeMap<u64, Acc> = BTreeMap::new();
    for row in rows {
        let offset = u64::try_from((row.minute - window.start).num_seconds()).unwrap_or(0);
        let acc = periods.entry(offset / window.period).or_default();
        acc.requests += unsigned(row.requests);
        acc.errors += unsigned(row.errors);
        if acc.latency.is_empty() {
            acc.latency = vec![0; LATENCY_BUCKETS];
        }
        for (total, n) in acc.latency.iter_mut().zip(&row.latency) {
            *total += unsigned(*n);
        }
        let minute = acc.minutes.entry(row.minute).or_default();
        minute.seconds = minute.seconds.max(unsigned(row.seconds.into()));
        minute.requests_range.0 += unsigned(row.requests_min);
        minute.requests_range.1 += unsigned(row.requests_max);
        minute.errors_range.0 += unsigned(row.errors_min);
        minute.errors_range.1 += unsigned(row.errors_max);
        if let Some(cores) = row.cpu {
            minute.cpu = Some(minute.cpu.unwrap_or(0.0) + cores);
        }
        if let Some(bytes) = row.memory_bytes {
            let (total, count) = minute.memory.unwrap_or((0, 0));
            minute.memory = Some((
                total + unsigned(bytes),
                count + unsigned(row.instances.unwrap_or(0).into()),
            ));
        }
    }
    periods
        .into_iter()
        .map(|(k, acc)| {
            let minutes: Vec<Minute> = acc.minutes.values().copied().collect();
            let measured: Vec<&Minute> = minutes.iter().filter(|m| m.seconds > 0).collect();
            let range = |pick: fn(&Minute) -> (u64, u64)| {
                let lo = measured.iter().map(|m| pick(m).0).min().unwrap_or(0);
                let hi = measured.iter().map(|m| pick(m).1).max().unwrap_or(0);
                (lo, hi)
            };
            PeriodFigures {
                at: window.start + TimeDelta::seconds(i64::try_from(k * window.period).unwrap_or(i64::MAX)),
                seconds: minutes.iter().map(|m| m.seconds).sum(),
                requests: acc.requests,
                errors: acc.errors,
                requests_range: range(|m| m.requests_range),
                errors_range: range(|m| m.errors_range),
                p50: latency_quantile(&acc.latency, 500),
                p95: latency_quantile(&acc.latency, 950),
                p99: latency_quantile(&acc.latency, 990),
                memory: minutes.iter().filter_map(|m| m.memory).max_by_key(|(bytes, _)| *bytes),
                cpu: minutes.iter().filter_map(|m| m.cpu).reduce(f64::max),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(minute: DateTime<Utc>, service: &str, requests: i64, bucket: usize) -> MinuteRow {
        let mut latency = vec![0; LATENCY_BUCKETS];
        latency[bucket] = requests;
        MinuteRow {
            service: service.to_owned(),
            release: "R1".to_owned(),
            minute,
            seconds: 60,
            requests,
            errors: 1,
            requests_min: 0,
            requests_max: requests,
            errors_min: 0,
            errors_max: 1,
            latency,
            memory_bytes: Some(100),
            instances: Some(1),
            cpu: Some(0.25),
        }
    }

    #[test]
    fn minutes_land_in_their_periods_and_services_add_up() {
        let start = DateTime::parse_from_rfc3339("2026-01-02T03:00:00Z").unwrap().to_utc();
        let window = MetricsWindow {
            start,
            end: start + TimeDelta::hours(2),
            period: 3600,
        };
        let rows = vec![
            row(start, "web", 10, 40),
            row(start, "api", 30, 50),
            row(start + TimeDelta::minutes(59), "web", 5, 40),
            row(start + TimeDelta::minutes(61), "web", 7, 40),
        ];
        let periods = history(&rows, &window);
        assert_eq!(periods.len(), 2);
        assert_eq!(
            (periods[0].requests, periods[0].errors, periods[0].seconds),
            (45, 3, 120)
        );
        assert_eq!(periods[0].requests_range, (0, 40));
        assert_eq!(periods[0].memory, Some((200, 2)));
        // Two services' instances in one minute add up; the busiest minute is the period's.
        assert_eq!(periods[0].cpu, Some(0.5));
        assert_eq!(periods[0].p50, Some(crate::runtime::latency_upper_edge(50)));
        assert_eq!(periods[1].at, start + TimeDelta::hours(1));
        assert_eq!(periods[1].requests, 7);
    }
}
