//! API tokens in Postgres (hashes only).

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// A token row.
#[derive(Debug, Clone, FromRow)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub hash: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Stores a new token.
pub async fn insert(pool: &PgPool, id: Uuid, name: &str, role: &str, hash: &str) -> Result<Token, sqlx::Error> {
    sqlx::query_as("insert into tokens (id, name, role, hash) values ($1, $2, $3, $4) returning *")
        .bind(id)
        .bind(name)
        .bind(role)
        .bind(hash)
        .fetch_one(pool)
        .await
}

/// The token with this hash, marked as used now.
pub async fn use_by_hash(pool: &PgPool, hash: &str) -> Result<Option<Token>, sqlx::Error> {
    sqlx::query_as("update tokens set last_used_at = now() where hash = $1 returning *")
        .bind(hash)
        .fetch_optional(pool)
        .await
}

/// All tokens, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Token>, sqlx::Error> {
    sqlx::query_as("select * from tokens order by created_at")
        .fetch_all(pool)
        .await
}

/// Revokes a token; returns whether it existed.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("delete from tokens where id = $1")
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected()
        == 1)
}
