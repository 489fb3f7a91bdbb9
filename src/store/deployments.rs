//! Deployments in Postgres: one in progress per app (a unique partial index), claimed by a
//! worker with a lease, moved through the rollout states with one event per transition.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::store::events::{self, Owner};

/// The constraint a second concurrent deployment of an app violates.
pub const ONE_ACTIVE_PER_APP: &str = "deployments_one_active_per_app";

/// Where a deployment is (Convox's atom states, plus `superseded` for a deployment replaced by
/// a forced promote before it finished).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    Pending,
    Updating,
    Running,
    Deadline,
    Error,
    Cancelled,
    Rollback,
    Reverted,
    Failure,
    Superseded,
}

impl DeployState {
    /// Whether the deployment has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Running | Self::Reverted | Self::Failure | Self::Superseded)
    }

    /// The name in `Status: A => B` lines.
    pub fn title(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Updating => "Updating",
            Self::Running => "Running",
            Self::Deadline => "Deadline",
            Self::Error => "Error",
            Self::Cancelled => "Cancelled",
            Self::Rollback => "Rollback",
            Self::Reverted => "Reverted",
            Self::Failure => "Failure",
            Self::Superseded => "Superseded",
        }
    }

    /// The app status convox derives from it.
    pub fn app_status(self) -> &'static str {
        match self {
            Self::Pending | Self::Updating => "updating",
            Self::Running | Self::Reverted | Self::Failure | Self::Superseded => "running",
            Self::Deadline | Self::Error | Self::Cancelled | Self::Rollback => "rollback",
        }
    }
}

/// A deployment row.
#[derive(Debug, Clone, FromRow)]
pub struct Deployment {
    pub id: Uuid,
    pub app: String,
    pub release_id: String,
    pub previous_release_id: Option<String>,
    pub state: DeployState,
    pub reason: String,
    pub timeout_secs: i32,
    pub cancel_requested: bool,
    pub attempts: i32,
    pub lease_owner: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The states of a deployment in progress, as SQL (kept in step with the unique index).
macro_rules! active {
    () => {
        "('pending', 'updating', 'deadline', 'error', 'cancelled', 'rollback')"
    };
}

/// The stream name of deployment state lines for `runtime` (`system/<runtime>/atom/app`).
pub fn atom_stream(runtime: &str) -> String {
    format!("system/{runtime}/atom/app")
}

/// Inserts a pending deployment with its first line (`Status: <before> => Pending`) and wakes
/// the workers. A deployment already in progress violates [`ONE_ACTIVE_PER_APP`].
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    app: &str,
    release: &str,
    timeout: Duration,
    runtime: &str,
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
    let before = before.map_or("None", DeployState::title);
    let line = (atom_stream(runtime), format!("Status: {before} => Pending"));
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

/// Ends the app's deployment in progress, if any, as `superseded` by `by` (a forced promote).
/// Its worker notices at its next lease renewal and stops.
pub async fn supersede_active(
    conn: &mut PgConnection,
    app: &str,
    by: Uuid,
    runtime: &str,
) -> Result<Option<Deployment>, sqlx::Error> {
    let old: Option<Deployment> = sqlx::query_as(concat!(
        "select * from deployments where app = $1 and state in ",
        active!(),
        " for update"
    ))
    .bind(app)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(old) = old else { return Ok(None) };
    let reason = format!("superseded by deployment {by}");
    transition_locked(conn, &old, DeployState::Superseded, &reason, runtime).await?;
    Ok(Some(old))
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
    let deployment = sqlx::query_as(concat!(
        "update deployments set cancel_requested = true, updated_at = now() where app = $1 and state in ",
        active!(),
        " returning *"
    ))
    .bind(app)
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
pub async fn claim_next(pool: &PgPool, owner: Uuid, lease: Duration) -> Result<Option<Deployment>, sqlx::Error> {
    sqlx::query_as(concat!(
        "update deployments
            set lease_owner = $1, lease_expires_at = now() + $2, attempts = attempts + 1,
                started_at = coalesce(started_at, now()), updated_at = now()
          where id = (
                select id from deployments
                 where state in ",
        active!(),
        " and (lease_owner is null or lease_expires_at < now())
                 order by created_at
                 for update skip locked
                 limit 1)
         returning *"
    ))
    .bind(owner)
    .bind(lease)
    .fetch_optional(pool)
    .await
}

/// Extends `owner`'s lease. `None` when the lease is lost (ended, superseded, taken over),
/// else whether a cancel was requested.
pub async fn renew_lease(pool: &PgPool, id: Uuid, owner: Uuid, lease: Duration) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(concat!(
        "update deployments set lease_expires_at = now() + $3
          where id = $1 and lease_owner = $2 and state in ",
        active!(),
        "
         returning cancel_requested"
    ))
    .bind(id)
    .bind(owner)
    .bind(lease)
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

/// Moves a deployment held by `owner` to `to`, with its `Status: A => B` line. Reaching
/// `running` makes its release the app's release, in the same transaction. Returns false when
/// the deployment is no longer held by `owner` in an active state.
pub async fn transition(
    pool: &PgPool,
    id: Uuid,
    owner: Uuid,
    to: DeployState,
    reason: &str,
    runtime: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let current: Option<Deployment> = sqlx::query_as(concat!(
        "select * from deployments where id = $1 and lease_owner = $2 and state in ",
        active!(),
        " for update"
    ))
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else { return Ok(false) };
    if current.state != to {
        transition_locked(&mut tx, &current, to, reason, runtime).await?;
    }
    tx.commit().await?;
    Ok(true)
}

async fn transition_locked(
    conn: &mut PgConnection,
    current: &Deployment,
    to: DeployState,
    reason: &str,
    runtime: &str,
) -> Result<(), sqlx::Error> {
    let terminal = to.is_terminal();
    sqlx::query(
        "update deployments
            set state = $2, reason = case when $3 = '' then reason else $3 end, updated_at = now(),
                ended_at = case when $4 then now() end,
                lease_owner = case when $4 then null else lease_owner end,
                lease_expires_at = case when $4 then null else lease_expires_at end
          where id = $1",
    )
    .bind(current.id)
    .bind(to)
    .bind(reason)
    .bind(terminal)
    .execute(&mut *conn)
    .await?;
    if to == DeployState::Running {
        sqlx::query("update apps set release_id = $2, updated_at = now() where name = $1")
            .bind(&current.app)
            .bind(&current.release_id)
            .execute(&mut *conn)
            .await?;
    }
    let mut lines = vec![(
        atom_stream(runtime),
        format!("Status: {} => {}", current.state.title(), to.title()),
    )];
    let outcome = match to {
        DeployState::Running => Some("ok"),
        DeployState::Reverted | DeployState::Failure | DeployState::Superseded => {
            let why = if reason.is_empty() {
                current.reason.as_str()
            } else {
                reason
            };
            lines.push((atom_stream(runtime), why.to_owned()));
            Some("error")
        }
        _ => None,
    };
    if outcome == Some("ok") {
        lines.push((
            atom_stream(runtime),
            format!("Release {} is now active", current.release_id),
        ));
    }
    events::append(&mut *conn, owner(current), &lines, outcome).await?;
    Ok(())
}

/// The state of the app's newest deployment (what its status derives from).
pub async fn latest_state(pool: &PgPool, app: &str) -> Result<Option<DeployState>, sqlx::Error> {
    sqlx::query_scalar("select state from deployments where app = $1 order by created_at desc limit 1")
        .bind(app)
        .fetch_optional(pool)
        .await
}
