//! rack's own log in Postgres (`rack_log`): every replica appends its lines (numbered in one
//! order, announced with NOTIFY), and `rack logs` on any replica reads them all after a cursor.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::store::events::Event;

/// The NOTIFY channel that announces new lines.
pub const RACK_LOG_CHANNEL: &str = "rack_log";

/// Lines older than this are pruned.
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// At most this many lines are kept.
pub const KEEP_LINES: i64 = 100_000;

/// A line to append.
#[derive(Debug, Clone)]
pub struct NewLine {
    pub at: DateTime<Utc>,
    pub level: String,
    /// Already masked of credentials (`rack_log::mask`).
    pub text: String,
}

#[derive(Debug, FromRow)]
struct Row {
    seq: i64,
    replica: Uuid,
    at: DateTime<Utc>,
    level: String,
    text: String,
}

/// The stream name of `replica`'s lines: `system/rack/` and its process id in `rack ps`.
pub fn stream_of(replica: Uuid) -> String {
    crate::stream_names::system("rack", crate::store::replicas::process_id(replica))
}

impl From<Row> for Event {
    fn from(row: Row) -> Self {
        Self {
            app: String::new(),
            seq: row.seq,
            build_id: None,
            deployment_id: None,
            at: row.at,
            stream: stream_of(row.replica),
            message: format!("{} {}", row.level, row.text),
            outcome: None,
        }
    }
}

/// Appends `replica`'s `lines` in order and announces them.
pub async fn append(pool: &PgPool, replica: Uuid, lines: &[NewLine]) -> Result<(), sqlx::Error> {
    if lines.is_empty() {
        return Ok(());
    }
    let count = i64::try_from(lines.len()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    let last: i64 = sqlx::query_scalar("update rack_log_seq set seq = seq + $1 returning seq")
        .bind(count)
        .fetch_one(&mut *tx)
        .await?;
    let ats: Vec<DateTime<Utc>> = lines.iter().map(|l| l.at).collect();
    let levels: Vec<&str> = lines.iter().map(|l| l.level.as_str()).collect();
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    sqlx::query(
        "insert into rack_log (seq, replica, at, level, text)
         select $1 - $2 + t.ord, $3, t.at, t.level, t.text
           from unnest($4::timestamptz[], $5::text[], $6::text[]) with ordinality as t(at, level, text, ord)",
    )
    .bind(last)
    .bind(count)
    .bind(replica)
    .bind(&ats)
    .bind(&levels)
    .bind(&texts)
    .execute(&mut *tx)
    .await?;
    sqlx::query("select pg_notify($1, '')")
        .bind(RACK_LOG_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Up to `limit` lines after seq `after` containing `filter`, in order.
pub async fn list_after(
    pool: &PgPool,
    after: i64,
    filter: Option<&str>,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "select seq, replica, at, level, text from rack_log
          where seq > $1 and ($2::text is null or strpos(text, $2) > 0)
          order by seq
          limit $3",
    )
    .bind(after)
    .bind(filter)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Event::from).collect())
}

/// The seq of the last line older than `age` (a cursor that starts a stream `age` ago).
pub async fn seq_before(pool: &PgPool, age: std::time::Duration) -> Result<i64, sqlx::Error> {
    let age = std::time::Duration::from_micros(u64::try_from(age.as_micros()).unwrap_or(u64::MAX).min(i64::MAX as u64));
    sqlx::query_scalar("select coalesce(max(seq), 0) from rack_log where at < now() - $1")
        .bind(age)
        .fetch_one(pool)
        .await
}

/// The seq `keep` lines before the last (a cursor that starts a stream with the newest lines).
pub async fn seq_of_last(pool: &PgPool, keep: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select greatest(seq - $1, 0) from rack_log_seq")
        .bind(keep)
        .fetch_one(pool)
        .await
}

/// Removes the lines past [`RETENTION`] or beyond the newest [`KEEP_LINES`]; how many.
pub async fn prune(pool: &PgPool) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "delete from rack_log
          where at < now() - $1 or seq <= (select seq from rack_log_seq) - $2",
    )
    .bind(RETENTION)
    .bind(KEEP_LINES)
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}
