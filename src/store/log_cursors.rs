//! Where the copy of each kept process's output into its app's log stopped (local runtime, see
//! `runtime::local::kept`), written with the lines it copied.

use sqlx::{PgConnection, PgPool};

/// Records `position` for `process` of `app` (`None`: forgets it), in the caller's transaction.
pub async fn set(conn: &mut PgConnection, app: &str, process: &str, position: Option<&str>) -> Result<(), sqlx::Error> {
    match position {
        Some(position) => {
            sqlx::query(
                "insert into log_cursors (app, process, position) values ($1, $2, $3)
                 on conflict (app, process) do update set position = excluded.position",
            )
            .bind(app)
            .bind(process)
            .bind(position)
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("delete from log_cursors where app = $1 and process = $2")
                .bind(app)
                .bind(process)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// The position recorded for `process` of `app`.
pub async fn get(pool: &PgPool, app: &str, process: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("select position from log_cursors where app = $1 and process = $2")
        .bind(app)
        .bind(process)
        .fetch_optional(pool)
        .await
}
