//! Deployments in Postgres: one in progress per app (a unique partial index), claimed by a
//! worker with a lease, moved through the states of `deploy::machine` with its log lines in the
//! same transaction. A transition is recorded only if the deployment is still where it starts.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::deploy::{DeployState, Snapshot, Transition};
use crate::ids::ReleaseId;
use crate::store::events::{self, Owner};

/// The constraint a second concurrent deployment of an app violates.
pub const ONE_ACTIVE_PER_APP: &str = "deployments_one_active_per_app";

/// A deployment row.
#[derive(Debug, Clone, FromRow)]
pub struct Deployment {
    pub id: Uuid,
    pub app: String,
    pub release_id: ReleaseId,
    pub previous_release_id: Option<ReleaseId>,
    pub state: DeployState,
    pub reason: String,
    pub timeout_secs: i32,
    /// What it records of the workers that run it.
    #[sqlx(flatten)]
    pub claim: crate::store::claim::Claim,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Deployment {
    /// What the state machine needs of it.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            state: self.state,
            reason: &self.reason,
            release: &self.release_id,
            release_phase: false,
        }
    }
}

/// The states of a deployment in progress, to bind as `any($n)` (the one list, in
/// `DeployState::ACTIVE`).
fn active() -> Vec<&'static str> {
    DeployState::ACTIVE.iter().map(|s| s.as_str()).collect()
}

/// Inserts a pending deployment with its first line (`Status: <before> => Pending`, on
/// `stream`) and wakes the workers. A deployment already in progress violates [`ONE_ACTIVE_PER_APP`].
#[tracing::instrument(skip_all, fields(app.name = %app, release.id = %release))]
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    app: &str,
    release: &str,
    timeout: Duration,
    stream: &str,
) -> Result<Deployment, sqlx::Error> {
    let before: Option<DeployState> =
        sqlx::query_scalar("select state from deployments where app = $1 order by created_at desc limit 1")
            .bind(app)
            .fetch_optional(&mut *conn)
            .await?;
    let deployment: Deployment = sqlx::query_as(
        "insert into deployments (id, app, release_id, previous_release_id, timeout_secs)
         values ($1, $2, $3, (select release_id from apps where name = $2), $4)
         returning *",
    )
    .bind(id)
    .bind(app)
    .bind(release)
    .bind(i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX))
    .fetch_one(&mut *conn)
    .await?;
    let line = (stream.to_owned(), crate::deploy::machine::created_line(before));
    events::append(&mut *conn, owner(&deployment), &[line], None).await?;
    sqlx::query("select pg_notify($1, 'deploy')")
        .bind(crate::store::builds::JOBS_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(deployment)
}

fn owner(deployment: &Deployment) -> Owner<'_> {
    Owner {
        app: &deployment.app,
        build: None,
        deployment: Some(deployment.id),
    }
}

/// The app's deployment in progress, if any, locked until the end of the transaction (a forced
/// promote supersedes it).
pub async fn lock_active(conn: &mut PgConnection, app: &str) -> Result<Option<Deployment>, sqlx::Error> {
    sqlx::query_as("select * from deployments where app = $1 and state = any($2) for update")
        .bind(app)
        .bind(active())
        .fetch_optional(&mut *conn)
        .await
}

/// One deployment of an app.
pub async fn get(pool: &PgPool, app: &str, id: Uuid) -> Result<Option<Deployment>, sqlx::Error> {
    sqlx::query_as("select * from deployments where app = $1 and id = $2")
        .bind(app)
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The app's deployments, newest first.
pub async fn list_for_app(pool: &PgPool, app: &str, limit: i64) -> Result<Vec<Deployment>, sqlx::Error> {
    sqlx::query_as("select * from deployments where app = $1 order by created_at desc limit $2")
        .bind(app)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Marks the app's deployment in progress for cancellation and wakes the workers (its holder
/// acts at once); returns it (None: nothing runs).
pub async fn request_cancel(pool: &PgPool, app: &str) -> Result<Option<Deployment>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let deployment = sqlx::query_as(
        "update deployments set cancel_requested = true, updated_at = now()
          where app = $1 and state = any($2) returning *",
    )
    .bind(app)
    .bind(active())
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query("select pg_notify($1, 'cancel')")
        .bind(crate::store::builds::JOBS_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(deployment)
}

/// Claims the oldest deployment waiting for a worker: never claimed, or whose holder's lease
/// expired (it died); the claimer resumes it from its state.
#[tracing::instrument(skip_all)]
pub async fn claim_next(pool: &PgPool, owner: Uuid, lease: Duration) -> Result<Option<Deployment>, sqlx::Error> {
    sqlx::query_as(
        "update deployments
            set lease_owner = $1, lease_expires_at = now() + $2, attempts = attempts + 1,
                started_at = coalesce(started_at, now()), updated_at = now()
          where id = (
                select id from deployments
                 where state = any($3) and (lease_owner is null or lease_expires_at < now())
                 order by created_at
                 for update skip locked
                 limit 1)
         returning *",
    )
    .bind(owner)
    .bind(lease)
    .bind(active())
    .fetch_optional(pool)
    .await
}

/// Extends `owner`'s lease. `None` when the lease is lost (ended, superseded, taken over),
/// else whether a cancel was requested.
pub async fn renew_lease(pool: &PgPool, id: Uuid, owner: Uuid, lease: Duration) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "update deployments set lease_expires_at = now() + $3
          where id = $1 and lease_owner = $2 and state = any($4)
         returning cancel_requested",
    )
    .bind(id)
    .bind(owner)
    .bind(lease)
    .bind(active())
    .fetch_optional(pool)
    .await
}

/// Gives the deployment back to the queue (its holder is shutting down).
pub async fn hand_back(pool: &PgPool, id: Uuid, owner: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "update deployments set lease_owner = null, lease_expires_at = null, attempts = greatest(attempts - 1, 0)
          where id = $1 and lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records `transition` of `deployment`, held by `owner`: its new state and reason, its log
/// lines on `stream` (and outcome), and, when it says so, the app's new release, in one
/// transaction.
/// Returns false (recording nothing) when the deployment is no longer held by `owner` in the
/// state the transition starts from: another worker or a forced promote moved it meanwhile.
#[tracing::instrument(skip_all, fields(deployment.id = %deployment.id, app.name = %deployment.app, to = transition.to.as_str()))]
pub async fn record(
    pool: &PgPool,
    deployment: &Deployment,
    owner: Uuid,
    transition: &Transition,
    stream: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let recorded = record_in(&mut tx, deployment, Some(owner), transition, stream).await?;
    tx.commit().await?;
    Ok(recorded)
}

/// [`record`] in the caller's transaction, held by `holder` (`None`: whoever holds it, as a
/// forced promote superseding it).
pub async fn record_in(
    conn: &mut PgConnection,
    deployment: &Deployment,
    holder: Option<Uuid>,
    transition: &Transition,
    stream: &str,
) -> Result<bool, sqlx::Error> {
    let terminal = transition.to.is_terminal();
    let moved = sqlx::query(
        "update deployments
            set state = $3, reason = coalesce($4, reason), updated_at = now(),
                ended_at = case when $5 then now() end,
                lease_owner = case when $5 then null else lease_owner end,
                lease_expires_at = case when $5 then null else lease_expires_at end
          where id = $1 and state = $2 and ($6::uuid is null or lease_owner = $6)",
    )
    .bind(deployment.id)
    .bind(transition.from)
    .bind(transition.to)
    .bind(transition.reason.as_deref())
    .bind(terminal)
    .bind(holder)
    .execute(&mut *conn)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(false);
    }
    if transition.activates_release {
        sqlx::query("update apps set release_id = $2, updated_at = now() where name = $1")
            .bind(&deployment.app)
            .bind(&deployment.release_id)
            .execute(&mut *conn)
            .await?;
    }
    let lines: Vec<(String, String)> = transition
        .lines
        .iter()
        .map(|line| (stream.to_owned(), line.clone()))
        .collect();
    events::append(&mut *conn, owner(deployment), &lines, transition.outcome).await?;
    Ok(true)
}

/// The state of the app's newest deployment (what its status derives from).
pub async fn latest_state(pool: &PgPool, app: &str) -> Result<Option<DeployState>, sqlx::Error> {
    sqlx::query_scalar("select state from deployments where app = $1 order by created_at desc limit 1")
        .bind(app)
        .fetch_optional(pool)
        .await
}

/// The predicate of the one-per-app index, as Postgres prints it (a test holds it to
/// `DeployState::ACTIVE`: a migration cannot change, the enum can).
pub async fn active_index_predicate(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "select pg_get_expr(i.indpred, i.indrelid) from pg_index i
           join pg_class c on c.oid = i.indexrelid where c.relname = $1",
    )
    .bind(ONE_ACTIVE_PER_APP)
    .fetch_one(pool)
    .await
}
