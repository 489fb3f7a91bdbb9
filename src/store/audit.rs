//! The audit log in Postgres: who changed what, and who opened which run, exec or log stream.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// One entry.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Entry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    /// `password`, or `token <name>`.
    pub actor: String,
    pub token_id: Option<Uuid>,
    pub method: String,
    pub route: String,
    pub path: String,
    pub app: Option<String>,
    pub ids: Vec<String>,
    pub status: i32,
    pub request_id: String,
    pub client: String,
}

/// Records `entry`.
pub async fn insert(pool: &PgPool, entry: &Entry) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into audit (id, at, actor, token_id, method, route, path, app, ids, status, request_id, client)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(entry.id)
    .bind(entry.at)
    .bind(&entry.actor)
    .bind(entry.token_id)
    .bind(&entry.method)
    .bind(&entry.route)
    .bind(&entry.path)
    .bind(&entry.app)
    .bind(&entry.ids)
    .bind(entry.status)
    .bind(&entry.request_id)
    .bind(&entry.client)
    .execute(pool)
    .await
    .map(drop)
}

/// Which entries to list.
#[derive(Debug, Default)]
pub struct Filter<'a> {
    pub app: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only entries older than this one (the cursor of the next page).
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// Entries matching `filter`, newest first.
pub async fn list(pool: &PgPool, filter: &Filter<'_>) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "select * from audit
          where ($1::text is null or app = $1)
            and ($2::text is null or actor = $2)
            and ($3::timestamptz is null or at >= $3)
            and ($4::timestamptz is null or at < $4)
            and ($5::uuid is null or id < $5)
          order by id desc
          limit $6",
    )
    .bind(filter.app)
    .bind(filter.actor)
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.before)
    .bind(filter.limit)
    .fetch_all(pool)
    .await
}

/// Forgets entries older than `age`; returns how many.
pub async fn prune(pool: &PgPool, age: std::time::Duration) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("delete from audit where at < now() - $1")
        .bind(age)
        .execute(pool)
        .await?
        .rows_affected())
}
