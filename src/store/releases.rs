//! Releases in Postgres: immutable build + env + manifest.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool};

use crate::ids::{BuildId, ReleaseId};

/// A release row.
#[derive(Debug, Clone, FromRow)]
pub struct Release {
    pub id: ReleaseId,
    pub app: String,
    pub position: i64,
    pub build_id: Option<BuildId>,
    pub env: String,
    pub manifest: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

/// What a new release holds.
#[derive(Debug, Clone)]
pub struct NewRelease<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub build_id: Option<&'a str>,
    pub env: &'a str,
    pub manifest: &'a str,
    pub description: &'a str,
}

/// Inserts a release.
#[tracing::instrument(skip_all, fields(app.name = %new.app, release.id = %new.id))]
pub async fn insert(conn: &mut PgConnection, new: &NewRelease<'_>) -> Result<Release, sqlx::Error> {
    sqlx::query_as(
        "insert into releases (id, app, build_id, env, manifest, description)
         values ($1, $2, $3, $4, $5, $6) returning *",
    )
    .bind(new.id)
    .bind(new.app)
    .bind(new.build_id)
    .bind(new.env)
    .bind(new.manifest)
    .bind(new.description)
    .fetch_one(conn)
    .await
}

/// The app's newest release.
pub async fn latest(conn: &mut PgConnection, app: &str) -> Result<Option<Release>, sqlx::Error> {
    sqlx::query_as("select * from releases where app = $1 order by position desc limit 1")
        .bind(app)
        .fetch_optional(conn)
        .await
}

/// One release of an app.
pub async fn get<'e>(db: impl sqlx::PgExecutor<'e>, app: &str, id: &str) -> Result<Option<Release>, sqlx::Error> {
    sqlx::query_as("select * from releases where app = $1 and id = $2")
        .bind(app)
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The app's newest releases, newest first.
pub async fn list_for_app(pool: &PgPool, app: &str, limit: i64) -> Result<Vec<Release>, sqlx::Error> {
    sqlx::query_as("select * from releases where app = $1 order by position desc limit $2")
        .bind(app)
        .bind(limit)
        .fetch_all(pool)
        .await
}
