//! Idempotency keys in Postgres: a claim per key within its scope (the credential and the
//! request path that sent it), then the stored first response.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// How long a key is remembered.
pub const RETENTION_HOURS: i32 = 24;

/// Where the request of a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum KeyState {
    /// Running now (its first response is not known yet).
    Pending,
    /// Answered: its response is stored.
    Done,
}

/// A stored key.
#[derive(Debug, Clone, FromRow)]
pub struct Record {
    /// Who sent it where: `<credential> <METHOD> <path>`.
    pub scope: String,
    pub key: String,
    pub request_hash: String,
    pub state: KeyState,
    pub status: Option<i32>,
    pub headers: Json<BTreeMap<String, String>>,
    pub body: Option<Vec<u8>>,
    pub deployment_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// Claims `key` within `scope` for a new request; returns `None` when claimed now, or the
/// existing record. Records older than the retention period are forgotten first.
pub async fn claim(pool: &PgPool, scope: &str, key: &str, request_hash: &str) -> Result<Option<Record>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("delete from idempotency_keys where key = $1 and created_at < now() - make_interval(hours => $2)")
        .bind(key)
        .bind(RETENTION_HOURS)
        .execute(&mut *tx)
        .await?;
    let inserted = sqlx::query(
        "insert into idempotency_keys (scope, key, request_hash) values ($1, $2, $3)
             on conflict (scope, key) do nothing",
    )
    .bind(scope)
    .bind(key)
    .bind(request_hash)
    .execute(&mut *tx)
    .await?;
    let existing = if inserted.rows_affected() == 1 {
        None
    } else {
        sqlx::query_as("select * from idempotency_keys where scope = $1 and key = $2")
            .bind(scope)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
    };
    tx.commit().await?;
    Ok(existing)
}

/// Stores the first response of `key` within `scope`.
pub async fn complete(
    pool: &PgPool,
    (scope, key): (&str, &str),
    status: u16,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    deployment: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update idempotency_keys set state = $6, status = $2, headers = $3, body = $4, deployment_id = $5
          where key = $1 and scope = $7",
    )
    .bind(key)
    .bind(i32::from(status))
    .bind(Json(headers))
    .bind(body)
    .bind(deployment)
    .bind(KeyState::Done)
    .bind(scope)
    .execute(pool)
    .await
    .map(drop)
}

/// Forgets `key` within `scope` (its request failed in a way a retry should redo).
pub async fn release(pool: &PgPool, scope: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from idempotency_keys where scope = $1 and key = $2 and state = $3")
        .bind(scope)
        .bind(key)
        .bind(KeyState::Pending)
        .execute(pool)
        .await
        .map(drop)
}
