//! The rack's own settings (`rack_params`) and the versions of rack that ran on this database
//! (`rack_versions`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// The settings changed with `PUT /system`, by name.
pub async fn params(pool: &PgPool) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as("select name, value from rack_params")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// One setting changed with `PUT /system`, if it was.
pub async fn param(pool: &PgPool, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("select value from rack_params where name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Writes the settings in one transaction: `None` removes one (back to its default).
pub async fn set_params(pool: &PgPool, changes: &BTreeMap<String, Option<String>>) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for (name, value) in changes {
        match value {
            Some(value) => {
                sqlx::query(
                    "insert into rack_params (name, value) values ($1, $2)
                     on conflict (name) do update set value = excluded.value, updated_at = now()",
                )
                .bind(name)
                .bind(value)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("delete from rack_params where name = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await
}

/// A version of rack that ran here.
#[derive(Debug, Clone, FromRow)]
pub struct Version {
    pub version: String,
    pub first_started_at: DateTime<Utc>,
    pub last_started_at: DateTime<Utc>,
}

/// Records that `version` started now.
pub async fn record_start(pool: &PgPool, version: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into rack_versions (version) values ($1)
         on conflict (version) do update set last_started_at = now()",
    )
    .bind(version)
    .execute(pool)
    .await
    .map(drop)
}

/// The versions that ran here, the most recently started first.
pub async fn versions(pool: &PgPool) -> Result<Vec<Version>, sqlx::Error> {
    sqlx::query_as("select * from rack_versions order by last_started_at desc, version desc")
        .fetch_all(pool)
        .await
}
