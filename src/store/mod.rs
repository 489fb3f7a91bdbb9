//! The store: every SQL statement of rack lives in this module and nowhere else. Functions
//! take a pool or a connection, return rows as plain structs and errors as `sqlx::Error`.

pub mod app_uids;
pub mod apps;
pub mod audit;
pub mod backup;
pub mod builds;
pub mod certificates;
pub mod claim;
pub mod deployments;
pub mod events;
pub mod feed;
pub mod idempotency;
pub mod log_cursors;
pub mod metric_minutes;
pub mod objects;
pub mod rack_log;
pub mod rack_resources;
pub mod rack_system;
pub mod registries;
pub mod releases;
pub mod replicas;
pub mod resources;
pub mod routers;
pub mod scales;
pub mod stats;
pub mod timers;
pub mod tokens;
pub mod usage;
pub mod webhooks;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations in `migrations/`, run at startup and by the test harness.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Opens a pool of at most `max_connections` to the database. Acquiring a connection gives up
/// after 5 s, so a request made while Postgres is down fails fast with 503 instead of hanging.
///
/// # Errors
/// When the first connection cannot be made.
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before each use: it doubled the round trips of every request (GET
        // /apps/{app} went from 14 000 to ... req/s without it, benches/suite.rs). A connection
        // that died with Postgres fails its one query (a 503 the client retries) and is dropped.
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

/// A pool of one connection to the same database as `pool`, checked before each use, for a
/// connection that lives long and must come back by itself (the event bus's LISTEN): after
/// Postgres restarts, the shared pool may hold several dead connections (it does not check
/// them, above), and trying them one by one delayed every wake-up by seconds.
pub fn single(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(true)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Whether `error` may go away by itself (Postgres restarting, the pool exhausted, a lost
/// connection, a serialization conflict), so that trying again later makes sense. Anything
/// else (a constraint, text Postgres cannot hold) fails the same way every time.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P0x: shutting down or
            // starting; 40001/40P01: serialization failure, deadlock.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// Whether `error` is Postgres refusing text it cannot store (a NUL character, invalid
/// encoding): the same write would fail forever.
pub fn is_unstorable_text(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("22021" | "22P05")),
        sqlx::Error::Encode(e) => e.to_string().contains("nul"),
        _ => false,
    }
}

/// Runs the migrations that have not run yet. Several replicas may call this at once: sqlx
/// serialises them with an advisory lock.
///
/// # Errors
/// When a migration fails or the database holds a migration this binary does not know.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Creates `database` if it does not exist yet (used for the embedded cluster's `rack` database).
///
/// # Errors
/// When the statements fail.
pub async fn ensure_database(conn: &mut sqlx::PgConnection, database: &str) -> Result<(), sqlx::Error> {
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(database)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        // Identifiers cannot be bound as parameters; quote_ident makes them safe to splice.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "create database {}",
            quote_ident(database)
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Creates `database` as a copy of `template` (the test harness's fast fresh database).
///
/// # Errors
/// When the statement fails.
pub async fn create_database_from(
    conn: &mut sqlx::PgConnection,
    database: &str,
    template: &str,
) -> Result<(), sqlx::Error> {
    // Identifiers cannot be bound as parameters; quote_ident makes them safe to splice.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create database {} template {}",
        quote_ident(database),
        quote_ident(template)
    )))
    .execute(conn)
    .await
    .map(drop)
}

/// Quotes an SQL identifier (database names cannot be bound as parameters).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
