//! Rack-wide resources (`migrations/0016_rack_resources.sql`): one row per name, with the
//! credentials rack generated, its options and status, and the apps it is linked to.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};

/// A rack-wide resource as stored.
#[derive(Clone, FromRow)]
pub struct RackResource {
    pub name: String,
    pub kind: String,
    /// Its options, by key.
    pub options: Json<std::collections::BTreeMap<String, String>>,
    pub username: String,
    pub password: String,
    pub database: String,
    /// `creating`, `running` or `failed`.
    pub status: String,
    /// The apps it is linked to, by name.
    pub apps: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for RackResource {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RackResource")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A rack-wide resource to create.
pub struct NewRackResource<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub options: &'a std::collections::BTreeMap<String, String>,
    pub username: &'a str,
    pub password: &'a str,
    pub database: &'a str,
}

/// The columns of [`RackResource`] (with its linked apps), then `$rest`: one static string.
macro_rules! select {
    ($rest:literal) => {
        concat!(
            "select r.*, array(select l.app from rack_resource_links l where l.resource = r.name order by l.app) \
             as apps from rack_resources r ",
            $rest
        )
    };
}

/// Creates a rack-wide resource (status `creating`); false if one of that name exists.
pub async fn create(pool: &PgPool, new: &NewRackResource<'_>) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "insert into rack_resources (name, kind, options, username, password, database)
         values ($1, $2, $3, $4, $5, $6) on conflict (name) do nothing",
    )
    .bind(new.name)
    .bind(new.kind)
    .bind(Json(new.options))
    .bind(new.username)
    .bind(new.password)
    .bind(new.database)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Every rack-wide resource, by name.
pub async fn list(pool: &PgPool) -> Result<Vec<RackResource>, sqlx::Error> {
    sqlx::query_as(select!("order by r.name")).fetch_all(pool).await
}

/// One rack-wide resource.
pub async fn get(pool: &PgPool, name: &str) -> Result<Option<RackResource>, sqlx::Error> {
    sqlx::query_as(select!("where r.name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// The rack-wide resources linked to `app`, by name.
pub async fn linked_to(pool: &PgPool, app: &str) -> Result<Vec<RackResource>, sqlx::Error> {
    sqlx::query_as(select!(
        "where exists (select 1 from rack_resource_links l where l.resource = r.name and l.app = $1)
         order by r.name"
    ))
    .bind(app)
    .fetch_all(pool)
    .await
}

/// Sets the status of `name`.
pub async fn set_status(pool: &PgPool, name: &str, status: &str) -> Result<(), sqlx::Error> {
    sqlx::query("update rack_resources set status = $2, updated_at = now() where name = $1")
        .bind(name)
        .bind(status)
        .execute(pool)
        .await
        .map(drop)
}

/// Sets the options of `name`.
pub async fn set_options(
    pool: &PgPool,
    name: &str,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<(), sqlx::Error> {
    sqlx::query("update rack_resources set options = $2, updated_at = now() where name = $1")
        .bind(name)
        .bind(Json(options))
        .execute(pool)
        .await
        .map(drop)
}

/// Links `name` to `app` (already linked: nothing changes).
pub async fn link(pool: &PgPool, name: &str, app: &str) -> Result<(), sqlx::Error> {
    sqlx::query("insert into rack_resource_links (resource, app) values ($1, $2) on conflict do nothing")
        .bind(name)
        .bind(app)
        .execute(pool)
        .await
        .map(drop)
}

/// Unlinks `name` from `app`; false if it was not linked.
pub async fn unlink(pool: &PgPool, name: &str, app: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("delete from rack_resource_links where resource = $1 and app = $2")
        .bind(name)
        .bind(app)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// What [`delete_unlinked`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    Gone,
    /// There was no such resource.
    Missing,
    /// It is kept: these apps are linked to it.
    Linked(Vec<String>),
}

/// Forgets `name` unless an app is linked to it. Its row is locked first, so a link made at
/// the same time (whose foreign key locks the row too) waits, then fails.
pub async fn delete_unlinked(pool: &PgPool, name: &str) -> Result<Deleted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let found: Option<String> = sqlx::query_scalar("select name from rack_resources where name = $1 for update")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    if found.is_none() {
        return Ok(Deleted::Missing);
    }
    let apps: Vec<String> = sqlx::query_scalar("select app from rack_resource_links where resource = $1 order by app")
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
    if !apps.is_empty() {
        return Ok(Deleted::Linked(apps));
    }
    sqlx::query("delete from rack_resources where name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Deleted::Gone)
}
