//! What a runtime measured of an app's traffic and processes, for `GET /apps/{app}/metrics`
//! (convox `AppMetrics`, `ServiceMetrics`): per period, the requests its router served, the
//! failures (5xx and requests no instance answered), latency percentiles, and the memory (and
//! CPU, where known) its instances use. Also the latency histogram rack's routers keep, whose
//! buckets the per-minute history (`metric_minutes`) stores as they are.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Most periods one answer holds.
pub const MAX_METRIC_PERIODS: u64 = 10_000;

/// Latency buckets: four per power of two of microseconds (a bucket is at most 19 % wide), up
/// to about 2^27 µs (134 s); longer lands in the last.
pub const LATENCY_BUCKETS: usize = 104;

/// The periods asked for: `start + k * period` up to `end`.
#[derive(Debug, Clone, Copy)]
pub struct MetricsWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Seconds, at least 1.
    pub period: u64,
}

/// One period's traffic (every service asked for, summed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeriodFigures {
    /// When the period starts.
    pub at: DateTime<Utc>,
    /// Seconds of the period measured.
    pub seconds: u64,
    pub requests: u64,
    pub errors: u64,
    /// Fewest and most requests (and failures) in one of those seconds.
    pub requests_range: (u64, u64),
    pub errors_range: (u64, u64),
    /// Latency percentiles (50th, 95th, 99th; the upper edge of their histogram bucket for
    /// rack's router), when any request.
    pub p50: Option<Duration>,
    pub p95: Option<Duration>,
    pub p99: Option<Duration>,
    /// Bytes of memory the instances used together (at the largest sample of the period) and
    /// over how many instances, where known.
    pub memory: Option<(u64, u64)>,
    /// CPU the instances used together, in cores (1.0: one core busy), where known.
    pub cpu: Option<f64>,
}

/// An app's (or one service's) figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    /// The periods of the window the runtime holds figures for, oldest first.
    pub periods: Vec<PeriodFigures>,
    /// Bytes of memory each running instance uses now, where the runtime can tell.
    pub memory: Vec<u64>,
    /// Cores of CPU each running instance uses now, where the runtime can tell.
    pub cpu: Vec<f64>,
    /// Where the runtime keeps only recent figures (rack's own routers): the earliest time its
    /// periods cover; older periods come from rack's per-minute history. `None`: the runtime
    /// answered the whole window itself (Prometheus keeps its own history).
    pub held_since: Option<DateTime<Utc>>,
}

/// What one router served of one release in one minute (or the part of it not yet recorded),
/// added to `metric_minutes` by `jobs::metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficMinute {
    pub app: String,
    pub service: String,
    pub release: String,
    /// The minute's start.
    pub minute: DateTime<Utc>,
    pub seconds: u32,
    pub requests: u64,
    pub errors: u64,
    pub requests_range: (u64, u64),
    pub errors_range: (u64, u64),
    /// The latency histogram, [`LATENCY_BUCKETS`] counts.
    pub latency: Vec<u64>,
    /// Bytes of memory the release's instances use together now, and how many, where known.
    pub memory: Option<(u64, u64)>,
    /// Cores of CPU the release's instances use together now, where known.
    pub cpu: Option<f64>,
}

/// The bucket a latency falls in.
pub fn latency_bucket(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
    if us < 8 {
        return us as usize;
    }
    let power = 63 - us.leading_zeros() as usize; // at least 3
    let quarter = ((us >> (power - 2)) & 3) as usize;
    (4 * (power - 1) + quarter).min(LATENCY_BUCKETS - 1)
}

/// The longest latency bucket `bucket` holds.
pub fn latency_upper_edge(bucket: usize) -> Duration {
    if bucket < 8 {
        return Duration::from_micros(bucket as u64 + 1);
    }
    let power = bucket / 4 + 1;
    let quarter = (bucket % 4) as u64;
    Duration::from_micros((4 + quarter + 1) << (power - 2))
}

/// The `per_mille`/1000 quantile of a latency histogram (the upper edge of the bucket it falls
/// in), `None` when it is empty.
pub fn latency_quantile(histogram: &[u64], per_mille: u64) -> Option<Duration> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the quantile, rounded up (the 95th of 20 is the 19th).
    let rank = (u128::from(total) * u128::from(per_mille)).div_ceil(1000).max(1);
    let mut seen = 0u128;
    let bucket = histogram
        .iter()
        .position(|n| {
            seen += u128::from(*n);
            seen >= rank
        })
        .unwrap_or(LATENCY_BUCKETS - 1);
    Some(latency_upper_edge(bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_latencies() {
        for us in [1u64, 7, 8, 9, 15, 16, 100, 1_000, 2_500, 300_000, 5_000_000] {
            let d = Duration::from_micros(us);
            let bucket = latency_bucket(d);
            let upper = latency_upper_edge(bucket);
            assert!(upper > d, "{us}µs in bucket {bucket} up to {upper:?}");
            if us >= 8 {
                assert!(upper.as_secs_f64() <= d.as_secs_f64() * 1.26, "{us}µs: {upper:?}");
            }
            if bucket > 0 {
                assert!(
                    latency_upper_edge(bucket - 1) <= d,
                    "{us}µs: the bucket below reaches it"
                );
            }
        }
        assert_eq!(latency_bucket(Duration::from_secs(100_000)), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_histogram() {
        let mut histogram = vec![0u64; LATENCY_BUCKETS];
        let fast = latency_bucket(Duration::from_millis(1));
        let slow = latency_bucket(Duration::from_millis(300));
        histogram[fast] = 90;
        histogram[slow] = 10;
        assert_eq!(latency_quantile(&histogram, 500), Some(latency_upper_edge(fast)));
        assert_eq!(latency_quantile(&histogram, 900), Some(latency_upper_edge(fast)));
        assert_eq!(latency_quantile(&histogram, 950), Some(latency_upper_edge(slow)));
        assert_eq!(latency_quantile(&[0; LATENCY_BUCKETS], 950), None);
    }
}
