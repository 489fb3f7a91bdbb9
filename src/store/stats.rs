//! Figures about the whole rack that `GET /metrics` reads when scraped.

use sqlx::PgPool;

/// A queue of jobs waiting for a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Queue {
    /// `build` or `deployment`.
    pub kind: String,
    pub depth: i64,
    /// Seconds the oldest has waited (0 when none waits).
    pub oldest: f64,
}

/// The build and deployment queues.
pub async fn queues(pool: &PgPool) -> Result<Vec<Queue>, sqlx::Error> {
    sqlx::query_as(
        "select 'build' as kind, count(*) as depth,
                coalesce(extract(epoch from now() - min(created_at)), 0)::float8 as oldest
           from builds where status = 'created'
         union all
         select 'deployment', count(*), coalesce(extract(epoch from now() - min(created_at)), 0)::float8
           from deployments where state = 'pending'",
    )
    .fetch_all(pool)
    .await
}
