//! Apps in Postgres.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};

use crate::names::AppName;

/// An app row.
#[derive(Debug, Clone, FromRow)]
pub struct App {
    pub name: String,
    pub generation: String,
    pub locked: bool,
    pub parameters: Json<BTreeMap<String, String>>,
    /// The release the app runs (switched when a deployment reaches Running).
    pub release_id: Option<crate::ids::ReleaseId>,
    /// The state of the app's newest deployment, which its status derives from.
    #[sqlx(default)]
    pub deployment_state: Option<crate::deploy::DeployState>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Joins an app (`a`) with the state of its newest deployment (`d.state`).
macro_rules! latest_deployment {
    () => {
        "left join lateral (select state from deployments where app = a.name order by created_at desc limit 1) d on true"
    };
}

impl App {
    /// Convox's app status, derived from the newest deployment.
    pub fn status(&self) -> &'static str {
        self.deployment_state.map_or("running", |s| s.app_status())
    }
}

/// Names of apps that have a release, with it (to bring their processes back at startup).
pub async fn list_released(pool: &PgPool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("select name, release_id from apps where release_id is not null order by name")
        .fetch_all(pool)
        .await
}

/// What [`delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    Locked,
    NotFound,
}

/// Inserts a new app. A taken name violates `apps_pkey`.
#[tracing::instrument(skip_all, fields(app.name = %name))]
pub async fn insert(pool: &PgPool, name: &AppName, generation: &str) -> Result<App, sqlx::Error> {
    sqlx::query_as("insert into apps (name, generation) values ($1, $2) returning *")
        .bind(name.as_str())
        .bind(generation)
        .fetch_one(pool)
        .await
}

/// All apps, sorted by name.
pub async fn list(pool: &PgPool) -> Result<Vec<App>, sqlx::Error> {
    sqlx::query_as(concat!(
        "select a.*, d.state as deployment_state from apps a ",
        latest_deployment!(),
        " order by a.name"
    ))
    .fetch_all(pool)
    .await
}

/// One app by name.
pub async fn get(pool: &PgPool, name: &AppName) -> Result<Option<App>, sqlx::Error> {
    sqlx::query_as(concat!(
        "select a.*, d.state as deployment_state from apps a ",
        latest_deployment!(),
        " where a.name = $1"
    ))
    .bind(name.as_str())
    .fetch_optional(pool)
    .await
}

/// Sets `locked` when given, and merges `parameters` into the app's: a key with an empty value
/// is removed. Returns the updated app, or `None` when there is no such app.
pub async fn update(
    pool: &PgPool,
    name: &AppName,
    locked: Option<bool>,
    parameters: &BTreeMap<String, String>,
) -> Result<Option<App>, sqlx::Error> {
    // Empty values become JSON nulls, which jsonb_strip_nulls then drops from the merge.
    let patch: serde_json::Map<String, serde_json::Value> = parameters
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                if v.is_empty() {
                    serde_json::Value::Null
                } else {
                    v.clone().into()
                },
            )
        })
        .collect();
    sqlx::query_as(
        "update apps
            set locked = coalesce($2, locked),
                parameters = jsonb_strip_nulls(parameters || $3),
                updated_at = now()
          where name = $1
         returning *",
    )
    .bind(name.as_str())
    .bind(locked)
    .bind(Json(patch))
    .fetch_optional(pool)
    .await
}

/// Deletes an app (and, through foreign keys, everything that belongs to it) unless it is locked.
pub async fn delete(pool: &PgPool, name: &AppName) -> Result<DeleteOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: Option<bool> = sqlx::query_scalar("select locked from apps where name = $1 for update")
        .bind(name.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    let outcome = match locked {
        None => DeleteOutcome::NotFound,
        Some(true) => DeleteOutcome::Locked,
        Some(false) => {
            sqlx::query("delete from apps where name = $1")
                .bind(name.as_str())
                .execute(&mut *tx)
                .await?;
            DeleteOutcome::Deleted
        }
    };
    tx.commit().await?;
    Ok(outcome)
}
