//! The rack servers sharing this database (`rack_replicas`), for `rack ps`: each one's row is
//! refreshed by its heartbeat (`jobs::replicas`), and one not refreshed within the lease is left
//! out (it died without removing itself).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// One server.
#[derive(Debug, Clone, FromRow)]
pub struct Replica {
    pub id: Uuid,
    /// The address it listens on.
    pub host: String,
    pub port: i32,
    pub pid: i32,
    /// rack's version it runs.
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// A replica's process id in `rack ps` (and its log's stream name): `rack-` and the last 12
/// hex digits of its id (random; the first ones of a v7 id are its start time, which two
/// replicas started together share).
pub fn process_id(id: Uuid) -> String {
    let id = id.simple().to_string();
    format!("rack-{}", &id[id.len() - 12..])
}

/// Writes (or refreshes) `replica`'s row with `last_seen` now, and removes the rows of replicas
/// silent for longer than `stale` (so the table holds only the living and the recently dead).
pub async fn beat(pool: &PgPool, replica: &Replica, stale: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into rack_replicas (id, host, port, pid, version, started_at)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (id) do update set last_seen = now()",
    )
    .bind(replica.id)
    .bind(&replica.host)
    .bind(replica.port)
    .bind(replica.pid)
    .bind(&replica.version)
    .bind(replica.started_at)
    .execute(pool)
    .await?;
    sqlx::query("delete from rack_replicas where last_seen < now() - make_interval(secs => $1)")
        .bind(stale.as_secs_f64() * 10.0)
        .execute(pool)
        .await
        .map(drop)
}

/// The replicas seen within `stale`, oldest first.
pub async fn live(pool: &PgPool, stale: Duration) -> Result<Vec<Replica>, sqlx::Error> {
    sqlx::query_as(
        "select * from rack_replicas where last_seen >= now() - make_interval(secs => $1)
         order by started_at, id",
    )
    .bind(stale.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Removes `id`'s row (it stops).
pub async fn remove(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("delete from rack_replicas where id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(drop)
}
