//! Resources of convox.yml (`migrations/0014_resources.sql`): one row per app and name, with
//! the credentials rack generated when a release first declared it, and its status. The feed's
//! `resource.*` events are written by triggers on this table (without the credentials).

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};

/// A resource as stored.
#[derive(Clone, FromRow)]
pub struct Resource {
    pub app: String,
    pub name: String,
    pub kind: String,
    /// `{"options": {...}, "image": ...}` of the release that declared it last.
    pub definition: Json<serde_json::Value>,
    pub username: String,
    pub password: String,
    pub database: String,
    /// `creating`, `running`, `failed` or `unlinked`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for Resource {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("app", &self.app)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A resource to create if `app` has none of that name yet.
#[derive(Clone)]
pub struct NewResource<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub definition: serde_json::Value,
    pub username: &'a str,
    pub password: &'a str,
    pub database: &'a str,
}

/// Creates the resources of `new` that `app` does not have yet (an existing one keeps its
/// credentials and data), then returns the rows of every name in `new`.
pub async fn ensure(pool: &PgPool, app: &str, new: &[NewResource<'_>]) -> Result<Vec<Resource>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    for resource in new {
        sqlx::query(
            "insert into resources (app, name, kind, definition, username, password, database)
             values ($1, $2, $3, $4, $5, $6, $7) on conflict (app, name) do nothing",
        )
        .bind(app)
        .bind(resource.name)
        .bind(resource.kind)
        .bind(Json(&resource.definition))
        .bind(resource.username)
        .bind(resource.password)
        .bind(resource.database)
        .execute(&mut *tx)
        .await?;
    }
    let names: Vec<&str> = new.iter().map(|r| r.name).collect();
    let rows = sqlx::query_as("select * from resources where app = $1 and name = any($2) order by name")
        .bind(app)
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Every resource of `app`, by name.
pub async fn list(pool: &PgPool, app: &str) -> Result<Vec<Resource>, sqlx::Error> {
    sqlx::query_as("select * from resources where app = $1 order by name")
        .bind(app)
        .fetch_all(pool)
        .await
}

/// Every resource of every app (the proxy looks for the one a client names).
pub async fn list_all(pool: &PgPool) -> Result<Vec<Resource>, sqlx::Error> {
    sqlx::query_as("select * from resources order by app, name")
        .fetch_all(pool)
        .await
}

/// One resource of `app`.
pub async fn get(pool: &PgPool, app: &str, name: &str) -> Result<Option<Resource>, sqlx::Error> {
    sqlx::query_as("select * from resources where app = $1 and name = $2")
        .bind(app)
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// After a release of `app` was applied: the resources it declares (`declared`: name and
/// definition) are running with that definition, every other one is unlinked.
pub async fn applied(pool: &PgPool, app: &str, declared: &[(String, serde_json::Value)]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for (name, definition) in declared {
        sqlx::query(
            "update resources set status = 'running', definition = $3, updated_at = now()
             where app = $1 and name = $2 and (status <> 'running' or definition <> $3)",
        )
        .bind(app)
        .bind(name)
        .bind(Json(definition))
        .execute(&mut *tx)
        .await?;
    }
    let names: Vec<&str> = declared.iter().map(|(name, _)| name.as_str()).collect();
    sqlx::query(
        "update resources set status = 'unlinked', updated_at = now()
         where app = $1 and not (name = any($2)) and status <> 'unlinked'",
    )
    .bind(app)
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// After a release of `app` failed to apply: those of `names` not yet seen running failed.
pub async fn failed(pool: &PgPool, app: &str, names: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update resources set status = 'failed', updated_at = now()
         where app = $1 and name = any($2) and status = 'creating'",
    )
    .bind(app)
    .bind(names)
    .execute(pool)
    .await
    .map(drop)
}

/// Forgets one resource of `app`; false if there was none.
pub async fn delete(pool: &PgPool, app: &str, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("delete from resources where app = $1 and name = $2")
        .bind(app)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
