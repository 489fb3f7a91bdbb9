//! Certificates (the public PEM, the sealed key, what the certificate names) and which app
//! services use them. The API and the runtimes open the key (see `secrets`), never this module.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// A certificate as stored.
#[derive(Debug, Clone, FromRow)]
pub struct Certificate {
    pub id: String,
    pub domain: String,
    pub domains: Vec<String>,
    pub expires_at: DateTime<Utc>,
    pub certificate_pem: String,
    pub key_sealed: Vec<u8>,
    pub generated: bool,
    pub created_at: DateTime<Utc>,
}

/// One service port served with a certificate.
#[derive(Debug, Clone, FromRow)]
pub struct Use {
    pub app: String,
    pub service: String,
    pub port: i32,
    pub certificate_id: String,
}

/// Keeps a new certificate.
pub async fn insert(pool: &PgPool, cert: &Certificate) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into certificates (id, domain, domains, expires_at, certificate_pem, key_sealed, generated)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&cert.id)
    .bind(&cert.domain)
    .bind(&cert.domains)
    .bind(cert.expires_at)
    .bind(&cert.certificate_pem)
    .bind(&cert.key_sealed)
    .bind(cert.generated)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every certificate, by id.
pub async fn list(pool: &PgPool) -> Result<Vec<Certificate>, sqlx::Error> {
    sqlx::query_as("select * from certificates order by id")
        .fetch_all(pool)
        .await
}

/// The certificate `id`, if there is one.
pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Certificate>, sqlx::Error> {
    sqlx::query_as("select * from certificates where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Why a certificate was not deleted.
#[derive(Debug)]
pub enum Delete {
    Deleted,
    NotFound,
    /// The `app/service:port`s that use it.
    InUse(Vec<String>),
}

/// Deletes `id` unless a service uses it. The check and the delete are one statement's work
/// under the foreign key (restrict), so a concurrent `ssl update` cannot slip between them.
pub async fn delete(pool: &PgPool, id: &str) -> Result<Delete, sqlx::Error> {
    let uses: Vec<String> = sqlx::query_scalar(
        "select app || '/' || service || ':' || port from certificate_uses
         where certificate_id = $1 order by 1",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    if !uses.is_empty() {
        return Ok(Delete::InUse(uses));
    }
    match sqlx::query("delete from certificates where id = $1")
        .bind(id)
        .execute(pool)
        .await
    {
        Ok(done) if done.rows_affected() > 0 => Ok(Delete::Deleted),
        Ok(_) => Ok(Delete::NotFound),
        // Put in use between the two statements: the foreign key refused the delete.
        Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
            Ok(Delete::InUse(vec!["a service (just now)".to_owned()]))
        }
        Err(e) => Err(e),
    }
}

/// Serves `app`'s `service` on `port` with `certificate_id` (replacing the one it had).
pub async fn set_use(
    pool: &PgPool,
    app: &str,
    service: &str,
    port: i32,
    certificate_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into certificate_uses (app, service, port, certificate_id) values ($1, $2, $3, $4)
         on conflict (app, service, port) do update
           set certificate_id = excluded.certificate_id, updated_at = now()",
    )
    .bind(app)
    .bind(service)
    .bind(port)
    .bind(certificate_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Stops `app`'s services other than `keep` using certificates (they are gone from its
/// manifest, or take no traffic any more); returns the services that did.
pub async fn remove_uses_except(pool: &PgPool, app: &str, keep: &[String]) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "delete from certificate_uses where app = $1 and not (service = any($2))
         returning service",
    )
    .bind(app)
    .bind(keep)
    .fetch_all(pool)
    .await
}

/// Forgets the certificate port `port` of `app`'s `service` was served with; whether it had one.
pub async fn remove_use(pool: &PgPool, app: &str, service: &str, port: i32) -> Result<bool, sqlx::Error> {
    let removed = sqlx::query("delete from certificate_uses where app = $1 and service = $2 and port = $3")
        .bind(app)
        .bind(service)
        .bind(port)
        .execute(pool)
        .await?;
    Ok(removed.rows_affected() > 0)
}

/// The certificates `app`'s services use, by service and port.
pub async fn uses_of_app(pool: &PgPool, app: &str) -> Result<Vec<Use>, sqlx::Error> {
    sqlx::query_as(
        "select app, service, port, certificate_id from certificate_uses where app = $1 order by service, port",
    )
    .bind(app)
    .fetch_all(pool)
    .await
}

/// Replaces a certificate's PEM, sealed key and expiry (a renewal); false when `id` is gone.
/// `created_at` moves too: a renewed certificate's validity is counted from it.
pub async fn renew(
    pool: &PgPool,
    id: &str,
    expires_at: DateTime<Utc>,
    certificate_pem: &str,
    key_sealed: &[u8],
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "update certificates set expires_at = $2, certificate_pem = $3, key_sealed = $4, created_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(expires_at)
    .bind(certificate_pem)
    .bind(key_sealed)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The service ports that use certificate `id`.
pub async fn uses_of_certificate(pool: &PgPool, id: &str) -> Result<Vec<Use>, sqlx::Error> {
    sqlx::query_as(
        "select app, service, port, certificate_id from certificate_uses where certificate_id = $1
         order by app, service, port",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}
