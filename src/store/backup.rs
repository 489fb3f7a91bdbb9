//! What a backup reads from the database beside `pg_dump`, in the same snapshot (the blobs and
//! builds the dumped rows refer to), and what a restore checks first (that the target is empty).

use std::collections::BTreeMap;

use sqlx::{FromRow, PgConnection, PgPool};

/// A blob the database refers to.
#[derive(Debug, Clone, FromRow)]
pub struct Blob {
    pub location: String,
    pub size: i64,
    pub sha256: String,
}

/// A build some release runs: its directory (the local runtime's process services) and images.
#[derive(Debug, Clone, FromRow)]
pub struct ReleasedBuild {
    pub app: String,
    pub id: String,
    pub images: sqlx::types::Json<BTreeMap<String, String>>,
}

/// Starts the read-only snapshot a backup is taken in and exports it for `pg_dump --snapshot`;
/// with `lock`, also takes the scheduled backups' lock for the transaction and returns `None`
/// when another server holds it.
///
/// # Errors
/// When the statements fail.
pub async fn export_snapshot(conn: &mut PgConnection, lock: bool) -> Result<Option<String>, sqlx::Error> {
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *conn)
        .await?;
    if lock {
        let got: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtextextended('rack.backup', 0))")
            .fetch_one(&mut *conn)
            .await?;
        if !got {
            return Ok(None);
        }
    }
    sqlx::query_scalar("select pg_export_snapshot()")
        .fetch_one(&mut *conn)
        .await
        .map(Some)
}

/// Every blob an object points at.
///
/// # Errors
/// When the query fails.
pub async fn blobs(conn: &mut PgConnection) -> Result<Vec<Blob>, sqlx::Error> {
    sqlx::query_as("select location, size, sha256 from objects order by location")
        .fetch_all(conn)
        .await
}

/// Every complete build that a release was made from.
///
/// # Errors
/// When the query fails.
pub async fn released_builds(conn: &mut PgConnection) -> Result<Vec<ReleasedBuild>, sqlx::Error> {
    sqlx::query_as(
        "select b.app, b.id, b.images from builds b
          where b.status = 'complete' and exists (select 1 from releases r where r.build_id = b.id)
          order by b.app, b.id",
    )
    .fetch_all(conn)
    .await
}

/// Every resource of every app, and every rack-wide resource, with its credentials and status
/// (in the backup's snapshot: the resources its dump holds).
///
/// # Errors
/// When the query fails.
pub async fn resources(
    conn: &mut PgConnection,
    rack_owner: &str,
) -> Result<Vec<super::resources::Resource>, sqlx::Error> {
    // The rack-wide resources come as resources of `rack_owner` (the runtime's `@rack`), which
    // is how the runtime reaches them; their options take a definition's shape.
    sqlx::query_as(
        "select app, name, kind, definition, username, password, database, status, created_at, updated_at \
         from resources \
         union all \
         select $1, name, kind, jsonb_build_object('options', options, 'image', null), username, password, \
                database, status, created_at, updated_at \
         from rack_resources \
         order by 1, 2",
    )
    .bind(rack_owner)
    .fetch_all(conn)
    .await
}

/// The tables of the database's `public` schema (none: a database a restore may fill).
///
/// # Errors
/// When the query fails.
pub async fn tables(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = 'public' order by 1",
    )
    .fetch_all(pool)
    .await
}

/// The newest migration applied, if any.
///
/// # Errors
/// When the query fails.
pub async fn migration(conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("select max(version) from _sqlx_migrations where success")
        .fetch_one(conn)
        .await
}

/// Appends a rack-wide event (`system.*`: no app, shown to credentials that see every app) to
/// the feed; returns its id.
///
/// # Errors
/// When the statement fails.
pub async fn feed_system(
    pool: &PgPool,
    kind: &str,
    message: &str,
    data: serde_json::Value,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select rack_feed_append('', $1, null, null, null, null, $2, $3)")
        .bind(kind)
        .bind(message)
        .bind(data)
        .fetch_one(pool)
        .await
}
