//! What a runtime measured of an app's traffic and processes, for `GET /apps/{app}/metrics`
//! (convox `AppMetrics`, `ServiceMetrics`): per period, the requests its router served, the
//! failures (5xx and requests no instance answered), the p95 latency, and the memory its
//! instances use now.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Most periods one answer holds.
pub const MAX_METRIC_PERIODS: u64 = 10_000;

/// The periods asked for: `start + k * period` up to `end`.
#[derive(Debug, Clone, Copy)]
pub struct MetricsWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Seconds, at least 1.
    pub period: u64,
}

/// One period's traffic (every service asked for, summed).
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodFigures {
    /// When the period starts.
    pub at: DateTime<Utc>,
    /// Seconds of the period the router still holds.
    pub seconds: u64,
    pub requests: u64,
    pub errors: u64,
    /// Fewest and most requests (and failures) in one of those seconds.
    pub requests_range: (u64, u64),
    pub errors_range: (u64, u64),
    /// The 95th percentile latency (the upper edge of its histogram bucket), when any request.
    pub p95: Option<Duration>,
}

/// An app's (or one service's) figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    /// The periods of the window the runtime still holds figures for, oldest first.
    pub periods: Vec<PeriodFigures>,
    /// Bytes of memory each running instance uses now, where the runtime can tell.
    pub memory: Vec<u64>,
}
