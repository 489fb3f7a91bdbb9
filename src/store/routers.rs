//! The local runtime's router ports, kept so an app keeps its address across restarts.

use sqlx::PgPool;

/// The port recorded for the router of `app`'s `service`.
pub async fn get(pool: &PgPool, app: &str, service: &str) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("select port from routers where app = $1 and service = $2")
        .bind(app)
        .bind(service)
        .fetch_optional(pool)
        .await
}

/// Records (or replaces) the port of `app`'s `service` router.
pub async fn set(pool: &PgPool, app: &str, service: &str, port: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into routers (app, service, port) values ($1, $2, $3)
         on conflict (app, service) do update set port = excluded.port",
    )
    .bind(app)
    .bind(service)
    .bind(port)
    .execute(pool)
    .await
    .map(drop)
}
