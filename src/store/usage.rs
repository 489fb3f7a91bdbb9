//! What the database holds, by app and by kind, for `GET /system/usage`; and the deletions that
//! keep it bounded (app logs past their retention, orphaned blobs and images).

use std::collections::BTreeMap;

use sqlx::PgPool;

/// Bytes of uploaded sources (objects) per app.
///
/// # Errors
/// When the query fails.
pub async fn sources_by_app(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select app, coalesce(sum(size), 0)::bigint from objects group by app")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Bytes of logs (build, deployment and process lines) per app, as stored.
///
/// # Errors
/// When the query fails.
pub async fn logs_by_app(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select app, coalesce(sum(pg_column_size(e.*)), 0)::bigint from events e group by app")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Bytes the logs, the feed and the audit log take in the database (tables and indexes).
///
/// # Errors
/// When the query fails.
pub async fn log_tables(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "select (pg_total_relation_size('events') + pg_total_relation_size('feed')
                 + pg_total_relation_size('audit'))::bigint",
    )
    .fetch_one(pool)
    .await
}

/// The size of the whole database.
///
/// # Errors
/// When the query fails.
pub async fn database(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select pg_database_size(current_database())")
        .fetch_one(pool)
        .await
}

/// Every app's name.
///
/// # Errors
/// When the query fails.
pub async fn apps(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select name from apps order by name")
        .fetch_all(pool)
        .await
}

/// Deletes the process log lines (not builds' or deployments' logs) older than `age`; returns how
/// many. Streams that resume from an older id simply start at what is left.
///
/// # Errors
/// When the statement fails.
pub async fn prune_app_logs(pool: &PgPool, age: std::time::Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("delete from events where build_id is null and deployment_id is null and at < now() - $1")
        .bind(age)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Of `locations`, those no object points at.
///
/// # Errors
/// When the query fails.
pub async fn unreferenced_blobs(pool: &PgPool, locations: &[String]) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select l from unnest($1::text[]) as l where not exists (select 1 from objects o where o.location = l)",
    )
    .bind(locations)
    .fetch_all(pool)
    .await
}

/// Of `builds`, those that no longer exist (their app or the build was deleted).
///
/// # Errors
/// When the query fails.
pub async fn missing_builds(pool: &PgPool, builds: &[String]) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select b from unnest($1::text[]) as b where not exists (select 1 from builds x where x.id = b)")
        .bind(builds)
        .fetch_all(pool)
        .await
}
