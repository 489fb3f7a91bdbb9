//! Object metadata in Postgres (the bytes are in the object store).

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// An object row.
#[derive(Debug, Clone, FromRow)]
pub struct Object {
    pub app: String,
    pub key: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Records an object (replacing the metadata of an earlier one with the same key).
pub async fn upsert(pool: &PgPool, app: &str, key: &str, size: i64, sha256: &str) -> Result<Object, sqlx::Error> {
    sqlx::query_as(
        "insert into objects (app, key, size, sha256) values ($1, $2, $3, $4)
         on conflict (app, key) do update
            set size = excluded.size, sha256 = excluded.sha256, updated_at = now()
         returning *",
    )
    .bind(app)
    .bind(key)
    .bind(size)
    .bind(sha256)
    .fetch_one(pool)
    .await
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

/// Forgets an object; returns whether it existed.
pub async fn delete(pool: &PgPool, app: &str, key: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("delete from objects where app = $1 and key = $2")
        .bind(app)
        .bind(key)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
