//! Service counts set with `scale` (they override the manifest's).

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgPool};

/// Sets the count of `app`'s `service` (in the caller's transaction: it holds only if the
/// deployment that applies it starts).
pub async fn set(conn: &mut PgConnection, app: &str, service: &str, count: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into service_scales (app, service, count) values ($1, $2, $3)
         on conflict (app, service) do update set count = excluded.count, updated_at = now()",
    )
    .bind(app)
    .bind(service)
    .bind(count)
    .execute(conn)
    .await
    .map(drop)
}

/// The counts set for `app`'s services.
pub async fn for_app(pool: &PgPool, app: &str) -> Result<BTreeMap<String, i32>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as("select service, count from service_scales where app = $1")
        .bind(app)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}
