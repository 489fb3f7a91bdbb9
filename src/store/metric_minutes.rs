//! The apps' per-minute traffic history (`metric_minutes`): what rack's routers served, added
//! by `jobs::metrics` from every replica, read back by `GET /apps/{app}/metrics` for periods
//! older than a router holds in memory, and pruned past `metrics_retention_days`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// One stored minute of one service's release.
#[derive(Debug, Clone, FromRow)]
pub struct MinuteRow {
    pub service: String,
    pub release: String,
    pub minute: DateTime<Utc>,
    pub seconds: i32,
    pub requests: i64,
    pub errors: i64,
    pub requests_min: i64,
    pub requests_max: i64,
    pub errors_min: i64,
    pub errors_max: i64,
    pub latency: Vec<i64>,
    pub memory_bytes: Option<i64>,
    pub instances: Option<i32>,
    pub cpu: Option<f64>,
}

/// What one router served of one release in (part of) one minute, to add to its row.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub app: String,
    pub service: String,
    pub release: String,
    pub minute: DateTime<Utc>,
    pub seconds: i32,
    pub requests: i64,
    pub errors: i64,
    /// Fewest and most in one second.
    pub requests_range: (i64, i64),
    pub errors_range: (i64, i64),
    /// The latency histogram's buckets.
    pub latency: Vec<i64>,
    /// Bytes of memory of the release's instances together, and how many, when known.
    pub memory: Option<(i64, i32)>,
    /// Cores of CPU the release's instances use together, when known.
    pub cpu: Option<f64>,
}

/// Adds `minutes` to their rows (creating them): counts and latency buckets are summed, the
/// per-second ranges widened, the memory and CPU samples kept when they are the largest yet. Minutes of an
/// app deleted meanwhile are dropped. One statement each, no transaction: two replicas adding to
/// the same rows never wait on each other's locks in opposite orders.
pub async fn add(pool: &PgPool, minutes: &[Served]) -> Result<(), sqlx::Error> {
    for m in minutes {
        let (memory, instances) = m.memory.unzip();
        sqlx::query(
            "insert into metric_minutes (app, service, release, minute, seconds, requests, errors,
                 requests_min, requests_max, errors_min, errors_max, latency, memory_bytes, instances,
                 cpu)
             select $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15
             where exists (select 1 from apps where name = $1)
             on conflict (app, service, release, minute) do update set
                 seconds = least(60, metric_minutes.seconds + excluded.seconds),
                 requests = metric_minutes.requests + excluded.requests,
                 errors = metric_minutes.errors + excluded.errors,
                 requests_min = case when excluded.seconds = 0 then metric_minutes.requests_min
                     when metric_minutes.seconds = 0 then excluded.requests_min
                     else least(metric_minutes.requests_min, excluded.requests_min) end,
                 requests_max = greatest(metric_minutes.requests_max, excluded.requests_max),
                 errors_min = case when excluded.seconds = 0 then metric_minutes.errors_min
                     when metric_minutes.seconds = 0 then excluded.errors_min
                     else least(metric_minutes.errors_min, excluded.errors_min) end,
                 errors_max = greatest(metric_minutes.errors_max, excluded.errors_max),
                 latency = (select array_agg(coalesce(a, 0) + coalesce(b, 0) order by n)
                     from unnest(metric_minutes.latency, excluded.latency) with ordinality as t(a, b, n)),
                 memory_bytes = greatest(metric_minutes.memory_bytes, excluded.memory_bytes),
                 instances = case when excluded.memory_bytes >= coalesce(metric_minutes.memory_bytes, 0)
                     then excluded.instances else metric_minutes.instances end,
                 cpu = greatest(metric_minutes.cpu, excluded.cpu)",
        )
        .bind(&m.app)
        .bind(&m.service)
        .bind(&m.release)
        .bind(m.minute)
        .bind(m.seconds)
        .bind(m.requests)
        .bind(m.errors)
        .bind(m.requests_range.0)
        .bind(m.requests_range.1)
        .bind(m.errors_range.0)
        .bind(m.errors_range.1)
        .bind(&m.latency)
        .bind(memory)
        .bind(instances)
        .bind(m.cpu)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The rows of `app` (or of its `service`) whose minute starts in `from..to`, oldest first.
pub async fn read(
    pool: &PgPool,
    app: &str,
    service: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<MinuteRow>, sqlx::Error> {
    sqlx::query_as(
        "select service, release, minute, seconds, requests, errors, requests_min, requests_max,
             errors_min, errors_max, latency, memory_bytes, instances, cpu
         from metric_minutes
         where app = $1 and ($2::text is null or service = $2) and minute >= $3 and minute < $4
         order by minute, service, release",
    )
    .bind(app)
    .bind(service)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
}

/// Removes the minutes older than `retention`; returns how many.
pub async fn prune(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    sqlx::query("delete from metric_minutes where minute < now() - make_interval(secs => $1)")
        .bind(retention.as_secs_f64())
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
