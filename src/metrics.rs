//! Prometheus metrics (`GET /metrics`, text format): what this replica served (requests by
//! route and status, with latency), what its workers finished (builds and deployments by
//! outcome, with durations), and, read when scraped, the rack's queues, open streams, event
//! bus lag and Postgres pool use. Names follow Prometheus conventions, prefixed `rack_`.
//! Counters are this replica's; sum them across replicas.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets (seconds) of the request latency histogram.
const REQUEST_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Buckets (seconds) of build and deployment durations.
const JOB_BUCKETS: [f64; 10] = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

/// This replica's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    builds: IntCounterVec,
    build_seconds: Histogram,
    deployments: IntCounterVec,
    deployment_seconds: Histogram,
    streams: IntGaugeVec,
    /// Refreshed when scraped.
    pub queue_depth: IntGaugeVec,
    pub queue_oldest: prometheus::GaugeVec,
    pub pool_connections: IntGaugeVec,
    pub bus_lag: prometheus::Gauge,
    pub bus_reads: IntGauge,
    pub bus_tails: IntGauge,
    /// Unix time of the last backup that completed (0: none since this replica started).
    pub backup_last_success: IntGauge,
    /// Size of that backup.
    pub backup_last_bytes: IntGauge,
    pub backup_failures: prometheus::IntCounter,
    /// Free bytes of the data directory's filesystem, refreshed when scraped.
    pub disk_free_bytes: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered in a registry of its own (a process may run several servers:
    /// the tests do).
    ///
    /// # Panics
    /// Never: the names below are valid and distinct.
    #[expect(clippy::expect_used, reason = "static metric definitions")]
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let requests = counter(
            "rack_http_requests_total",
            "HTTP requests answered, by method, route (the path template) and status.",
            &["method", "route", "status"],
        );
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "rack_http_request_duration_seconds",
                "Time to the response's head (a stream's is when it starts), by method and route.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["method", "route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_seconds.clone()))
            .expect("unique metric");
        let builds = counter(
            "rack_builds_total",
            "Builds this replica finished, by outcome (ok, failed, cancelled).",
            &["outcome"],
        );
        let build_seconds = histogram(
            "rack_build_duration_seconds",
            "Time from a build's start to its end.",
            &JOB_BUCKETS,
        );
        let deployments = counter(
            "rack_deployments_total",
            "Deployments this replica finished, by outcome (ok, reverted, failed, superseded).",
            &["outcome"],
        );
        let deployment_seconds = histogram(
            "rack_deployment_duration_seconds",
            "Time from a deployment's start to its end.",
            &JOB_BUCKETS,
        );
        let streams = gauge(
            "rack_streams_open",
            "Streams open on this replica, by kind (logs: build, deployment and app logs; feed: the event feed).",
            &["kind"],
        );
        let queue_depth = gauge(
            "rack_queue_depth",
            "Jobs waiting for a worker, by kind (build, deployment).",
            &["kind"],
        );
        let queue_oldest = prometheus::GaugeVec::new(
            Opts::new(
                "rack_queue_oldest_age_seconds",
                "Age of the oldest job waiting for a worker, by kind (0: none waits).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_oldest.clone()))
            .expect("unique metric");
        let pool_connections = gauge(
            "rack_postgres_pool_connections",
            "Connections of this replica's Postgres pool, by state (idle, in_use) and the pool's max.",
            &["state"],
        );
        let bus_lag = prometheus::Gauge::new(
            "rack_event_bus_lag_seconds",
            "Time from an event's commit to its batch reaching this replica's subscribers (the latest batch).",
        )
        .expect("valid metric");
        registry.register(Box::new(bus_lag.clone())).expect("unique metric");
        let bus_reads = IntGauge::new(
            "rack_event_bus_reads",
            "Reads of the event log this replica made for its subscribers since it started (a counter).",
        )
        .expect("valid metric");
        registry.register(Box::new(bus_reads.clone())).expect("unique metric");
        let bus_tails = IntGauge::new(
            "rack_event_bus_tails",
            "Logs this replica tails for local subscribers (each read once per batch).",
        )
        .expect("valid metric");
        registry.register(Box::new(bus_tails.clone())).expect("unique metric");
        let int_gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let backup_last_success = int_gauge(
            "rack_backup_last_success_timestamp_seconds",
            "Unix time of the last backup (scheduled or downloaded) this replica completed.",
        );
        let backup_last_bytes = int_gauge("rack_backup_last_size_bytes", "Size of that backup.");
        let backup_failures = prometheus::IntCounter::new(
            "rack_backup_failures_total",
            "Backups this replica started that failed.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(backup_failures.clone()))
            .expect("unique metric");
        let disk_free_bytes = int_gauge(
            "rack_disk_free_bytes",
            "Free bytes of the filesystem that holds the data directory.",
        );
        Self {
            registry,
            requests,
            request_seconds,
            builds,
            build_seconds,
            deployments,
            deployment_seconds,
            streams,
            queue_depth,
            queue_oldest,
            pool_connections,
            bus_lag,
            bus_reads,
            bus_tails,
            backup_last_success,
            backup_last_bytes,
            backup_failures,
            disk_free_bytes,
        }
    }

    /// Counts a request answered with `status` after `elapsed`.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[method, route, status.to_string().as_str()])
            .inc();
        self.request_seconds
            .with_label_values(&[method, route])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a build that ended with `outcome` after running `took` (when known).
    pub fn build(&self, outcome: &str, took: Option<Duration>) {
        self.builds.with_label_values(&[outcome]).inc();
        if let Some(took) = took {
            self.build_seconds.observe(took.as_secs_f64());
        }
    }

    /// Counts a deployment that ended in `state` after running `took` (when known); a state
    /// that is not an end counts nothing.
    pub fn deployment(&self, state: crate::deploy::DeployState, took: Option<Duration>) {
        let Some(outcome) = deployment_outcome(state) else {
            return;
        };
        self.deployments.with_label_values(&[outcome]).inc();
        if let Some(took) = took {
            self.deployment_seconds.observe(took.as_secs_f64());
        }
    }

    /// Counts an open stream of `kind` until the guard is dropped.
    pub fn stream(&self, kind: &'static str) -> StreamGauge {
        let gauge = self.streams.with_label_values(&[kind]);
        gauge.inc();
        StreamGauge(gauge)
    }

    /// Everything, in the text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// An open stream, counted in `rack_streams_open` while it lives.
#[derive(Debug)]
pub struct StreamGauge(IntGauge);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The time since `start`, if it is in the past.
pub fn since(start: Option<chrono::DateTime<chrono::Utc>>) -> Option<Duration> {
    start.and_then(|s| (chrono::Utc::now() - s).to_std().ok())
}

/// The `outcome` label of a deployment that ended in `state` (`None`: it has not ended).
/// Exhaustive, so a new state must say how it is counted.
pub fn deployment_outcome(state: crate::deploy::DeployState) -> Option<&'static str> {
    use crate::deploy::DeployState::{
        Cancelled, Deadline, Error, Failure, Pending, Releasing, Reverted, Rollback, Running, Superseded, Updating,
    };
    match state {
        Running => Some("ok"),
        Reverted => Some("reverted"),
        Superseded => Some("superseded"),
        Failure => Some("failed"),
        Pending | Releasing | Updating | Deadline | Error | Cancelled | Rollback => None,
    }
}

#[cfg(test)]
mod deployment_outcomes {
    #[test]
    fn every_end_and_only_an_end_has_an_outcome() {
        for state in crate::deploy::DeployState::ALL {
            assert_eq!(
                super::deployment_outcome(state).is_some(),
                state.is_terminal(),
                "{state:?}"
            );
        }
    }
}
