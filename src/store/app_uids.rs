//! The uid offset of each app's sandboxed processes (local runtime, see `app_accounts`).

use sqlx::PgPool;

/// The uid offset of `app`, allocated (the next after the highest given) on first use.
pub async fn get_or_allocate(pool: &PgPool, app: &str) -> Result<i32, sqlx::Error> {
    // Two apps allocating at once may pick the same offset: the loser's insert does nothing
    // and it tries again with the next one.
    loop {
        if let Some(offset) = sqlx::query_scalar("select uid_offset from app_uids where app = $1")
            .bind(app)
            .fetch_optional(pool)
            .await?
        {
            return Ok(offset);
        }
        sqlx::query(
            "insert into app_uids (app, uid_offset)
             select $1, coalesce(max(uid_offset) + 1, 0) from app_uids
             on conflict do nothing",
        )
        .bind(app)
        .execute(pool)
        .await?;
    }
}
