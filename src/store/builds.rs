//! Builds in Postgres: the build queue (claim, lease, finish) and the build records.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::ids::{BuildId, ReleaseId};

/// The NOTIFY channel that wakes job workers.
pub const JOBS_CHANNEL: &str = "rack_jobs";

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, Serialize, serde::Deserialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Created,
    Running,
    Complete,
    Failed,
}

impl BuildStatus {
    /// Whether the build has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed)
    }
}

/// A build row.
#[derive(Debug, Clone, FromRow)]
pub struct Build {
    pub id: BuildId,
    pub app: String,
    pub position: i64,
    pub status: BuildStatus,
    pub description: String,
    pub git_sha: String,
    pub source_url: String,
    pub manifest_path: String,
    pub manifest: String,
    pub no_cache: bool,
    pub entrypoint: String,
    pub process: String,
    pub release_id: Option<ReleaseId>,
    pub reason: String,
    /// Images the build pushed, by service (Kubernetes runtime).
    pub images: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    pub logs: String,
    /// What it records of the workers that run it.
    #[sqlx(flatten)]
    pub claim: crate::store::claim::Claim,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a new build holds.
#[derive(Debug, Clone)]
pub struct NewBuild<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub description: &'a str,
    pub git_sha: &'a str,
    pub source_url: &'a str,
    pub manifest_path: &'a str,
    pub no_cache: bool,
}

/// Queues a build and wakes the workers.
#[tracing::instrument(skip_all, fields(app.name = %new.app, build.id = %new.id))]
pub async fn insert(pool: &PgPool, new: &NewBuild<'_>) -> Result<Build, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let build = sqlx::query_as(
        "insert into builds (id, app, description, git_sha, source_url, manifest_path, no_cache)
         values ($1, $2, $3, $4, $5, $6, $7) returning *",
    )
    .bind(new.id)
    .bind(new.app)
    .bind(new.description)
    .bind(new.git_sha)
    .bind(new.source_url)
    .bind(new.manifest_path)
    .bind(new.no_cache)
    .fetch_one(&mut *tx)
    .await?;
    notify_jobs(&mut tx).await?;
    tx.commit().await?;
    Ok(build)
}

async fn notify_jobs(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, 'build')")
        .bind(JOBS_CHANNEL)
        .execute(conn)
        .await
        .map(drop)
}

/// One build of an app.
pub async fn get<'e>(db: impl sqlx::PgExecutor<'e>, app: &str, id: &str) -> Result<Option<Build>, sqlx::Error> {
    sqlx::query_as("select * from builds where app = $1 and id = $2")
        .bind(app)
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The app's newest builds, newest first.
pub async fn list_for_app(pool: &PgPool, app: &str, limit: i64) -> Result<Vec<Build>, sqlx::Error> {
    sqlx::query_as("select * from builds where app = $1 order by position desc limit $2")
        .bind(app)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Claims the oldest waiting build, or a running one whose holder's lease has expired, for
/// `owner` until `lease` from now. Concurrent claimers never get the same build.
#[tracing::instrument(skip_all)]
pub async fn claim_next(pool: &PgPool, owner: Uuid, lease: Duration) -> Result<Option<Build>, sqlx::Error> {
    sqlx::query_as(
        "update builds
            set status = 'running', lease_owner = $1, lease_expires_at = now() + $2,
                attempts = attempts + 1, started_at = coalesce(started_at, now()), updated_at = now()
          where id = (
                select id from builds
                 where status = 'created' or (status = 'running' and lease_expires_at < now())
                 order by position
                 for update skip locked
                 limit 1)
         returning *",
    )
    .bind(owner)
    .bind(lease)
    .fetch_optional(pool)
    .await
}

/// Extends `owner`'s lease on a running build. Returns `None` when the lease is lost (the
/// build ended or another replica took it over), else whether a cancel was requested.
pub async fn renew_lease(pool: &PgPool, id: &str, owner: Uuid, lease: Duration) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "update builds set lease_expires_at = now() + $3
          where id = $1 and lease_owner = $2 and status = 'running'
         returning cancel_requested",
    )
    .bind(id)
    .bind(owner)
    .bind(lease)
    .fetch_optional(pool)
    .await
}

/// Returns a running build to the queue (its holder is shutting down), as if never claimed.
#[tracing::instrument(skip_all, fields(build.id = %id))]
pub async fn hand_back(pool: &PgPool, id: &str, owner: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "update builds
            set status = 'created', lease_owner = null, lease_expires_at = null,
                attempts = greatest(attempts - 1, 0), updated_at = now()
          where id = $1 and lease_owner = $2 and status = 'running'",
    )
    .bind(id)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    notify_jobs(&mut tx).await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// How a build ended.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub status: BuildStatus,
    pub reason: &'a str,
    pub manifest: Option<&'a str>,
    pub release_id: Option<&'a str>,
    pub images: Option<&'a std::collections::BTreeMap<String, String>>,
}

impl<'a> Finish<'a> {
    /// A build's failure with its reason.
    pub fn failed(reason: &'a str) -> Self {
        Self {
            status: BuildStatus::Failed,
            reason,
            manifest: None,
            release_id: None,
            images: None,
        }
    }
}

/// Ends a build held by `owner` (or by nobody, when `owner` is `None`). Returns false when the
/// build is not running under that owner any more.
#[tracing::instrument(skip_all, fields(build.id = %id))]
pub async fn finish(
    conn: &mut PgConnection,
    id: &str,
    owner: Option<Uuid>,
    finish: &Finish<'_>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "update builds
            set status = $3, reason = $4, manifest = coalesce($5, manifest), release_id = coalesce($6, release_id),
                images = coalesce($7, images),
                ended_at = now(), lease_owner = null, lease_expires_at = null, updated_at = now()
          where id = $1 and status in ('created', 'running') and lease_owner is not distinct from $2",
    )
    .bind(id)
    .bind(owner)
    .bind(finish.status)
    .bind(finish.reason)
    .bind(finish.manifest)
    .bind(finish.release_id)
    .bind(finish.images.map(sqlx::types::Json))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks a running build for cancellation (its worker stops it); a build that has not started
/// is locked and returned so the caller can end it at once. Returns the build as it was.
pub async fn request_cancel(conn: &mut PgConnection, app: &str, id: &str) -> Result<Option<Build>, sqlx::Error> {
    let build: Option<Build> = sqlx::query_as("select * from builds where app = $1 and id = $2 for update")
        .bind(app)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(build) = &build
        && build.status == BuildStatus::Running
    {
        sqlx::query("update builds set cancel_requested = true, updated_at = now() where id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        notify_jobs(&mut *conn).await?;
    }
    Ok(build)
}

/// Fields a client may set on a build (`PUT /apps/{app}/builds/{id}`, as convox's build pod
/// and `build --external` do). `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct BuildUpdate {
    pub entrypoint: Option<String>,
    pub logs: Option<String>,
    pub manifest: Option<String>,
    pub release_id: Option<String>,
    pub status: Option<BuildStatus>,
    pub reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// Applies a client's update to a build.
pub async fn update(pool: &PgPool, app: &str, id: &str, update: &BuildUpdate) -> Result<Option<Build>, sqlx::Error> {
    sqlx::query_as(
        "update builds
            set entrypoint = coalesce($3, entrypoint), logs = coalesce($4, logs),
                manifest = coalesce($5, manifest), release_id = coalesce($6, release_id),
                status = coalesce($7, status), reason = coalesce($8, reason),
                started_at = coalesce($9, started_at), ended_at = coalesce($10, ended_at),
                updated_at = now()
          where app = $1 and id = $2
         returning *",
    )
    .bind(app)
    .bind(id)
    .bind(&update.entrypoint)
    .bind(&update.logs)
    .bind(&update.manifest)
    .bind(&update.release_id)
    .bind(update.status)
    .bind(&update.reason)
    .bind(update.started_at)
    .bind(update.ended_at)
    .fetch_optional(pool)
    .await
}

/// The ended builds of an app whose sources may go: all but the newest `keep_last`, and but
/// those of the app's release and of any deployment in progress (what a rollback runs). Only
/// ended builds are listed, so a build that starts meanwhile is never among them.
pub async fn prunable_ids(pool: &PgPool, app: &str, keep_last: i64) -> Result<Vec<BuildId>, sqlx::Error> {
    sqlx::query_scalar(
        "select id from builds
          where app = $1 and status in ('complete', 'failed')
            and id not in (select id from builds where app = $1 order by position desc limit $2)
            and id not in (
                select r.build_id from releases r
                 where r.app = $1 and r.build_id is not null and r.id in (
                       select release_id from apps where name = $1 and release_id is not null
                       union select release_id from deployments where app = $1 and ended_at is null
                       union select previous_release_id from deployments
                              where app = $1 and ended_at is null and previous_release_id is not null))",
    )
    .bind(app)
    .bind(keep_last)
    .fetch_all(pool)
    .await
}

/// A build brought from another rack (`POST /apps/{app}/builds/import`): complete from the
/// start, never queued.
#[derive(Debug, Clone)]
pub struct ImportedBuild<'a> {
    pub new: NewBuild<'a>,
    pub manifest: &'a str,
    pub images: &'a std::collections::BTreeMap<String, String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// Records an imported build and its release (the build, the env of the app's latest release,
/// the manifest), with its log (`lines`, the last one its end), in one transaction.
#[tracing::instrument(skip_all, fields(app.name = %imported.new.app, build.id = %imported.new.id))]
pub async fn insert_imported(
    pool: &PgPool,
    imported: &ImportedBuild<'_>,
    release_id: &str,
    lines: &[(String, String)],
) -> Result<Build, sqlx::Error> {
    let new = &imported.new;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into builds (id, app, status, description, git_sha, source_url, manifest_path, manifest,
                             images, started_at, ended_at)
         values ($1, $2, 'complete', $3, $4, $5, $6, $7, $8, coalesce($9, now()), coalesce($10, now()))",
    )
    .bind(new.id)
    .bind(new.app)
    .bind(new.description)
    .bind(new.git_sha)
    .bind(new.source_url)
    .bind(new.manifest_path)
    .bind(imported.manifest)
    .bind(sqlx::types::Json(imported.images))
    .bind(imported.started_at)
    .bind(imported.ended_at)
    .execute(&mut *tx)
    .await?;
    let parent = crate::store::releases::latest(&mut tx, new.app).await?;
    crate::store::releases::insert(
        &mut tx,
        &crate::store::releases::NewRelease {
            id: release_id,
            app: new.app,
            build_id: Some(new.id),
            env: parent.as_ref().map_or("", |p| p.env.as_str()),
            manifest: imported.manifest,
            description: new.description,
        },
    )
    .await?;
    let build = sqlx::query_as("update builds set release_id = $2, updated_at = now() where id = $1 returning *")
        .bind(new.id)
        .bind(release_id)
        .fetch_one(&mut *tx)
        .await?;
    crate::store::events::append(
        &mut tx,
        crate::store::events::Owner {
            app: new.app,
            build: Some(new.id),
            deployment: None,
        },
        lines,
        Some(crate::store::events::Outcome::Ok),
    )
    .await?;
    tx.commit().await?;
    Ok(build)
}
