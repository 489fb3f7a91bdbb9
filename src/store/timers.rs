//! Runs of the timers rack schedules itself: one row per scheduled time, claimed by the first
//! replica to get there (see `jobs::timers`).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// The session lock the scheduling replica holds ("racktimr").
const SCHEDULER_LOCK: i64 = 0x7261_636b_7469_6d72;

/// Takes the scheduler's lock for the session of `conn` (a connection kept for it): true when
/// this session has it now. Postgres lets it go when the session ends (the replica died, or
/// Postgres restarted), and another replica's next try gets it.
pub async fn try_lead(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select pg_try_advisory_lock($1)")
        .bind(SCHEDULER_LOCK)
        .fetch_one(conn)
        .await
}

/// Whether the session of `conn` still holds the scheduler's lock.
pub async fn still_leading(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()
                        and granted and ((classid::bigint << 32) | objid::bigint) = $1)",
    )
    .bind(SCHEDULER_LOCK)
    .fetch_one(conn)
    .await
}

/// How long runs are remembered.
const KEPT_DAYS: i32 = 7;

/// The last run of `app`'s `timer`: when it was due and its process, if one started.
pub async fn last(
    pool: &PgPool,
    app: &str,
    timer: &str,
) -> Result<Option<(DateTime<Utc>, Option<String>)>, sqlx::Error> {
    sqlx::query_as("select due_at, process from timer_runs where app = $1 and timer = $2 order by due_at desc limit 1")
        .bind(app)
        .bind(timer)
        .fetch_optional(pool)
        .await
}

/// Claims the run of `app`'s `timer` due at `due`: true for the one caller that gets it. Runs
/// older than a week are forgotten on the way.
pub async fn claim(
    pool: &PgPool,
    app: &str,
    timer: &str,
    due: DateTime<Utc>,
    release: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query("delete from timer_runs where app = $1 and timer = $2 and due_at < now() - make_interval(days => $3)")
        .bind(app)
        .bind(timer)
        .bind(KEPT_DAYS)
        .execute(pool)
        .await?;
    let claimed = sqlx::query(
        "insert into timer_runs (app, timer, due_at, release_id) values ($1, $2, $3, $4)
         on conflict (app, timer, due_at) do nothing",
    )
    .bind(app)
    .bind(timer)
    .bind(due)
    .bind(release)
    .execute(pool)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Records how the claimed run went: its process, or why there is none.
pub async fn record(
    pool: &PgPool,
    app: &str,
    timer: &str,
    due: DateTime<Utc>,
    outcome: Result<&str, &str>,
) -> Result<(), sqlx::Error> {
    let (process, skipped) = match outcome {
        Ok(process) => (Some(process), None),
        Err(reason) => (None, Some(reason)),
    };
    sqlx::query("update timer_runs set process = $4, skipped = $5 where app = $1 and timer = $2 and due_at = $3")
        .bind(app)
        .bind(timer)
        .bind(due)
        .bind(process)
        .bind(skipped)
        .execute(pool)
        .await
        .map(drop)
}
