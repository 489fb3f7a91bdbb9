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
    /// The apps it may act on (`None`: every app).
    pub apps: Option<Vec<String>>,
    /// The address it was last used from.
    pub last_used_from: Option<String>,
}

/// The NOTIFY channel that announces a revoked token (the payload is its id): every replica
/// ends the streams it opened.
pub const REVOKED_CHANNEL: &str = "rack_tokens";

/// Stores a new token.
pub async fn insert(pool: &PgPool, new: &NewToken<'_>) -> Result<Token, sqlx::Error> {
    sqlx::query_as(
        "insert into tokens (id, name, role, hash, apps, expires_at) values ($1, $2, $3, $4, $5, $6) returning *",
    )
    .bind(new.id)
    .bind(new.name)
    .bind(new.role)
    .bind(new.hash)
    .bind(new.apps)
    .bind(new.expires_at)
    .fetch_one(pool)
    .await
}

/// What a new token holds.
#[derive(Debug)]
pub struct NewToken<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub role: crate::auth::Role,
    pub hash: &'a str,
    pub apps: Option<&'a [String]>,
    pub expires_at: Option<DateTime<Utc>>,
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

/// The unexpired token with this hash; its last use (when, from `client`) is recorded (at
/// most every ten seconds: a busy CI token must not turn each read into a write).
pub async fn use_by_hash(pool: &PgPool, hash: &str, client: &str) -> Result<Option<Token>, sqlx::Error> {
    let token: Option<Token> =
        sqlx::query_as("select * from tokens where hash = $1 and (expires_at is null or expires_at > now())")
            .bind(hash)
            .fetch_optional(pool)
            .await?;
    if let Some(token) = &token
        && (token.last_used_from.as_deref() != Some(client)
            || token
                .last_used_at
                .is_none_or(|at| Utc::now() - at > chrono::Duration::seconds(10)))
    {
        sqlx::query("update tokens set last_used_at = now(), last_used_from = $2 where id = $1")
            .bind(token.id)
            .bind(client)
            .execute(pool)
            .await?;
    }
    Ok(token)
}

/// All tokens made through the API (not the scoped ones rack makes for itself), oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Token>, sqlx::Error> {
    sqlx::query_as("select * from tokens where scope is null order by created_at")
        .fetch_all(pool)
        .await
}

/// Revokes a token made through the API and announces it (streams it opened end); returns
/// whether it existed.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("delete from tokens where id = $1 and scope is null")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if deleted {
        sqlx::query("select pg_notify($1, $2)")
            .bind(REVOKED_CHANNEL)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(deleted)
}

/// Revokes the scoped token named `name` (its job is done).
pub async fn delete_scoped(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from tokens where name = $1 and scope is not null")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// Whether the token `id` still exists and has not expired.
pub async fn is_valid(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from tokens where id = $1 and (expires_at is null or expires_at > now()))",
    )
    .bind(id)
    .fetch_one(pool)
    .await
}
