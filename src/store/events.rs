//! The event log in Postgres: append (numbered per app, announced with NOTIFY) and read after
//! a cursor.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

pub use crate::deploy::Outcome;

/// The NOTIFY channel that announces new events; the payload is the app name.
pub const EVENTS_CHANNEL: &str = "rack_events";

/// An event row.
#[derive(Debug, Clone, FromRow)]
pub struct Event {
    pub app: String,
    pub seq: i64,
    pub build_id: Option<crate::ids::BuildId>,
    pub deployment_id: Option<Uuid>,
    pub at: DateTime<Utc>,
    pub stream: String,
    pub message: String,
    /// Set on the last event of a build or deployment.
    pub outcome: Option<Outcome>,
}

/// Which events a reader wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// One build's log.
    Build { app: String, build: String },
    /// One deployment's rollout log.
    Deployment { app: String, deployment: Uuid },
    /// Everything of an app, or only one service's output, or only lines containing `filter`.
    App {
        app: String,
        service: Option<String>,
        filter: Option<String>,
    },
}

impl Topic {
    /// The app the topic belongs to.
    pub fn app(&self) -> &str {
        match self {
            Self::Build { app, .. } | Self::Deployment { app, .. } | Self::App { app, .. } => app,
        }
    }

    /// Whether `event` belongs to the topic: what [`list_after`] selects, for events already
    /// read.
    pub fn contains(&self, event: &Event) -> bool {
        if event.app != self.app() {
            return false;
        }
        match self {
            Self::Build { build, .. } => event.build_id.as_deref() == Some(build.as_str()),
            Self::Deployment { deployment, .. } => event.deployment_id == Some(*deployment),
            Self::App { service, filter, .. } => {
                service.as_ref().is_none_or(|s| {
                    event
                        .stream
                        .strip_prefix("service/")
                        .and_then(|r| r.strip_prefix(s.as_str()))
                        .is_some_and(|r| r.starts_with('/'))
                }) && filter.as_ref().is_none_or(|f| event.message.contains(f.as_str()))
            }
        }
    }
}

/// Who an appended batch belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub app: &'a str,
    pub build: Option<&'a str>,
    pub deployment: Option<Uuid>,
}

/// Appends `lines` (stream, message) in order; `outcome`, when given, marks the last line as
/// the end of its build or deployment. Returns the seq of the last line (or of the app's last
/// event when `lines` is empty). Run it inside the transaction that makes the change the lines
/// describe, so both become visible together.
pub async fn append(
    conn: &mut PgConnection,
    owner: Owner<'_>,
    lines: &[(String, String)],
    outcome: Option<Outcome>,
) -> Result<i64, sqlx::Error> {
    let count = i64::try_from(lines.len()).unwrap_or(i64::MAX);
    // Taking the numbers from the app's row locks it until commit: writers of one app commit
    // in seq order, so a reader that saw seq N never later finds a new event below N.
    let last: i64 =
        sqlx::query_scalar("update apps set event_seq = event_seq + $2 where name = $1 returning event_seq")
            .bind(owner.app)
            .bind(count)
            .fetch_one(&mut *conn)
            .await?;
    if lines.is_empty() {
        return Ok(last);
    }
    let (streams, messages): (Vec<&str>, Vec<&str>) = lines.iter().map(|(s, m)| (s.as_str(), m.as_str())).unzip();
    sqlx::query(
        "insert into events (app, seq, build_id, deployment_id, stream, message, outcome)
         select $1, $2 - $3 + t.ord, $4, $5, t.stream, t.message,
                case when t.ord = $3 then $8 end
           from unnest($6::text[], $7::text[]) with ordinality as t(stream, message, ord)",
    )
    .bind(owner.app)
    .bind(last)
    .bind(count)
    .bind(owner.build)
    .bind(owner.deployment)
    .bind(&streams)
    .bind(&messages)
    .bind(outcome)
    .execute(&mut *conn)
    .await?;
    sqlx::query("select pg_notify($1, $2)")
        .bind(EVENTS_CHANNEL)
        .bind(owner.app)
        .execute(&mut *conn)
        .await?;
    Ok(last)
}

/// Up to `limit` events of `topic` after seq `after`, in order.
pub async fn list_after(pool: &PgPool, topic: &Topic, after: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let (build, deployment, stream_prefix, filter) = match topic {
        Topic::Build { build, .. } => (Some(build.as_str()), None, None, None),
        Topic::Deployment { deployment, .. } => (None, Some(*deployment), None, None),
        Topic::App { service, filter, .. } => (
            None,
            None,
            service.as_deref().map(crate::stream_names::service_prefix),
            filter.as_deref(),
        ),
    };
    sqlx::query_as(
        "select * from events
          where app = $1 and seq > $2
            and ($3::text is null or build_id = $3)
            and ($4::uuid is null or deployment_id = $4)
            and ($5::text is null or starts_with(stream, $5))
            and ($6::text is null or strpos(message, $6) > 0)
          order by seq
          limit $7",
    )
    .bind(topic.app())
    .bind(after)
    .bind(build)
    .bind(deployment)
    .bind(stream_prefix)
    .bind(filter)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The seq of the app's last committed event (0 for an app without events, or none).
pub async fn horizon(pool: &PgPool, app: &str) -> Result<i64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar("select event_seq from apps where name = $1")
        .bind(app)
        .fetch_optional(pool)
        .await?;
    Ok(seq.unwrap_or_default())
}

/// The seq of the app's last event older than `age` (a cursor that starts a stream `age` ago).
pub async fn seq_before(pool: &PgPool, app: &str, age: std::time::Duration) -> Result<i64, sqlx::Error> {
    // An interval holds whole microseconds (sqlx refuses to encode a finer duration).
    let age = std::time::Duration::from_micros(u64::try_from(age.as_micros()).unwrap_or(u64::MAX).min(i64::MAX as u64));
    sqlx::query_scalar("select coalesce(max(seq), 0) from events where app = $1 and at < now() - $2")
        .bind(app)
        .bind(age)
        .fetch_one(pool)
        .await
}
