//! API tokens in Postgres (hashes only).

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// A token row.
#[derive(Debug, Clone, FromRow)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    pub role: crate::auth::Role,
    pub hash: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// The one request a scoped token allows (`/apps/<app>/objects/<key>`, GET or HEAD).
    pub scope: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Stores a new token.
pub async fn insert(
    pool: &PgPool,
    id: Uuid,
    name: &str,
    role: crate::auth::Role,
    hash: &str,
) -> Result<Token, sqlx::Error> {
    sqlx::query_as("insert into tokens (id, name, role, hash) values ($1, $2, $3, $4) returning *")
        .bind(id)
        .bind(name)
        .bind(role)
        .bind(hash)
        .fetch_one(pool)
        .await
}

/// Stores a token that allows one request (`scope`) until `expires_at`, and forgets expired ones.
pub async fn insert_scoped(
    pool: &PgPool,
    id: Uuid,
    name: &str,
    scope: &str,
    hash: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("delete from tokens where expires_at < now()")
        .execute(pool)
        .await?;
    sqlx::query("insert into tokens (id, name, role, hash, scope, expires_at) values ($1, $2, 'read', $3, $4, $5)")
        .bind(id)
        .bind(name)
        .bind(hash)
        .bind(scope)
        .bind(expires_at)
        .execute(pool)
        .await?;
    Ok(())
}

/// The unexpired token with this hash, marked as used now.
pub async fn use_by_hash(pool: &PgPool, hash: &str) -> Result<Option<Token>, sqlx::Error> {
    sqlx::query_as(
        "update tokens set last_used_at = now()
          where hash = $1 and (expires_at is null or expires_at > now()) returning *",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await
}

/// All tokens made through the API (not the scoped ones rack makes for itself), oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Token>, sqlx::Error> {
    sqlx::query_as("select * from tokens where scope is null order by created_at")
        .fetch_all(pool)
        .await
}

/// Revokes a token made through the API; returns whether it existed.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("delete from tokens where id = $1 and scope is null")
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected()
        == 1)
}

/// Revokes the scoped token named `name` (its job is done).
pub async fn delete_scoped(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from tokens where name = $1 and scope is not null")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}
