//! Object metadata in Postgres: each key points at the blob that holds its bytes (see
//! `objects`); the row switches blobs in one transaction, so size, digest and bytes always
//! change together.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// An object row.
#[derive(Debug, Clone, FromRow)]
pub struct Object {
    pub app: String,
    pub key: String,
    pub size: i64,
    pub sha256: String,
    /// Where its bytes are in the object store.
    pub location: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Points `key` at the blob at `location`; returns the location of the blob it pointed at
/// before (now unreferenced: the caller deletes it), if any. Writers of one key take turns,
/// so the last to commit wins and every replaced blob is returned to exactly one of them.
pub async fn replace(
    pool: &PgPool,
    app: &str,
    key: &str,
    location: &str,
    size: i64,
    sha256: &str,
) -> Result<Option<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // A row lock cannot cover a key that has no row yet; a lock on the key itself can.
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))")
        .bind(app)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    let previous: Option<String> = sqlx::query_scalar("select location from objects where app = $1 and key = $2")
        .bind(app)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
    sqlx::query(
        "insert into objects (app, key, size, sha256, location) values ($1, $2, $3, $4, $5)
         on conflict (app, key) do update
            set size = excluded.size, sha256 = excluded.sha256, location = excluded.location,
                updated_at = now()",
    )
    .bind(app)
    .bind(key)
    .bind(size)
    .bind(sha256)
    .bind(location)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(previous)
}

/// One object.
pub async fn get(pool: &PgPool, app: &str, key: &str) -> Result<Option<Object>, sqlx::Error> {
    sqlx::query_as("select * from objects where app = $1 and key = $2")
        .bind(app)
        .bind(key)
        .fetch_optional(pool)
        .await
}

/// The keys of an app's objects that start with `prefix`, sorted.
pub async fn list_keys(pool: &PgPool, app: &str, prefix: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select key from objects where app = $1 and starts_with(key, $2) order by key")
        .bind(app)
        .bind(prefix)
        .fetch_all(pool)
        .await
}

/// Forgets an object; returns the location of its blob (None: there was no such object).
pub async fn delete(pool: &PgPool, app: &str, key: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("delete from objects where app = $1 and key = $2 returning location")
        .bind(app)
        .bind(key)
        .fetch_optional(pool)
        .await
}
