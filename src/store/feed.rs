//! The rack-wide feed of typed events (`migrations/0011_feed.sql`): written by triggers for
//! apps, builds, releases and deployments, and by [`append`] for what only rack's processes
//! know (a process started or exited); read after a cursor, filtered by app and kind.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// The NOTIFY channel that announces new feed events; the payload is the app name.
pub const FEED_CHANNEL: &str = "rack_feed";

/// Every kind of feed event.
pub const KINDS: [&str; 22] = [
    "app.created",
    "app.updated",
    "app.deleted",
    "build.created",
    "build.started",
    "build.succeeded",
    "build.failed",
    "build.cancelled",
    "release.created",
    "deployment.started",
    "deployment.state",
    "deployment.line",
    "deployment.finished",
    "deployment.analysis",
    "process.started",
    "process.exited",
    "resource.created",
    "resource.ready",
    "resource.failed",
    "system.backup",
    "system.disk",
    "webhook.disabled",
];

/// A feed event.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct FeedEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub app: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_id: Option<String>,
    pub message: String,
    pub data: sqlx::types::Json<serde_json::Value>,
}

/// Which feed events a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedFilter {
    /// Only these apps (`None`: every app).
    pub apps: Option<Vec<String>>,
    /// Only kinds that start with one of these (`kind=deployment.`), none: every kind.
    pub kinds: Vec<String>,
}

impl FeedFilter {
    /// Whether `event` is one the reader wants: what [`list_after`] selects.
    pub fn contains(&self, event: &FeedEvent) -> bool {
        self.apps.as_ref().is_none_or(|apps| apps.contains(&event.app))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| event.kind.starts_with(k.as_str())))
    }
}

pub use crate::process_note::ProcessNote;

/// Appends a runtime's event (of `deployment`, when a deployment's log carried it), in a
/// transaction of its own (the feed's counter is the last lock a transaction takes; see the
/// migration).
pub async fn append(pool: &PgPool, note: &ProcessNote, deployment: Option<uuid::Uuid>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select rack_feed_append($1, $2, null, $3, $4, $5, $6, $7)")
        .bind(&note.app)
        .bind(note.kind)
        .bind(&note.release)
        .bind(deployment)
        .bind(&note.process)
        .bind(&note.message)
        .bind(sqlx::types::Json(&note.data))
        .fetch_one(pool)
        .await
}

/// Up to `limit` events that `filter` wants after id `after`, in order.
pub async fn list_after(
    pool: &PgPool,
    filter: &FeedFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<FeedEvent>, sqlx::Error> {
    let kinds: Vec<String> = filter.kinds.iter().map(|k| format!("{}%", like_escape(k))).collect();
    sqlx::query_as(
        "select id, at, app, kind, build_id, release_id, deployment_id, process_id, message, data
           from feed
          where id > $1
            and ($2::text[] is null or app = any($2))
            and (cardinality($3::text[]) = 0 or kind like any($3))
          order by id
          limit $4",
    )
    .bind(after)
    .bind(filter.apps.as_deref())
    .bind(&kinds)
    .bind(limit)
    .fetch_all(pool)
    .await
}

fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// The id of the feed's last committed event.
pub async fn horizon(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select seq from feed_seq").fetch_one(pool).await
}

/// Deletes feed events older than `age`; returns how many.
pub async fn prune(pool: &PgPool, age: std::time::Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("delete from feed where at < now() - $1")
        .bind(age)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
