//! Private registries: server, user name and the sealed password (see `secrets`); the API and
//! the runtimes' capability open it, never this module.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// A registry as stored.
#[derive(Debug, Clone, FromRow)]
pub struct Registry {
    pub server: String,
    pub username: String,
    pub password_sealed: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Adds `server`, or replaces its credentials when it is there (as convox does); whether it
/// was new.
pub async fn upsert(pool: &PgPool, server: &str, username: &str, sealed: &[u8]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "insert into registries (server, username, password_sealed) values ($1, $2, $3)
         on conflict (server) do update
           set username = excluded.username, password_sealed = excluded.password_sealed, updated_at = now()
         returning (xmax = 0)",
    )
    .bind(server)
    .bind(username)
    .bind(sealed)
    .fetch_one(pool)
    .await
}

/// Every registry, by server.
pub async fn list(pool: &PgPool) -> Result<Vec<Registry>, sqlx::Error> {
    sqlx::query_as("select * from registries order by server")
        .fetch_all(pool)
        .await
}

/// Removes `server`; whether it was there.
pub async fn delete(pool: &PgPool, server: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("delete from registries where server = $1")
        .bind(server)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
