//! `/certificates` (admin to change, read to list) and `/apps/{app}/ssl`, as the convox CLI's
//! `certs`, `certs import`, `certs generate`, `certs delete`, `ssl` and `ssl update` call them.
//! The private key is sealed before it reaches the store (`secrets`) and never leaves the rack
//! again: answers show the id, the domains and the expiry; the audit log keeps the request
//! (method, path), never its body; rack's log names the certificate, never its key.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::AppPath;
use crate::api::input::{Format, Input, Pretty, QueryParams};
use crate::certificate::{self, Checked};
use crate::error::{ApiError, ApiResult};
use crate::store::certificates as store;

/// Longest PEM text accepted (certificate with chain, or key), in bytes.
const MAX_PEM: usize = 256 * 1024;

/// Default validity of `certs generate`, in days (convox's `--duration` may set it).
const DEFAULT_DAYS: i64 = 365;

/// A certificate as convox shows it (`structs.Certificate`): never its key.
#[derive(Debug, Serialize)]
pub struct CertificateView {
    id: String,
    domain: String,
    domains: Vec<String>,
    expiration: DateTime<Utc>,
    status: &'static str,
    /// Made by `certs generate` (self-signed); rack's addition.
    generated: bool,
}

impl From<store::Certificate> for CertificateView {
    fn from(c: store::Certificate) -> Self {
        Self {
            id: c.id,
            domain: c.domain,
            domains: c.domains,
            expiration: c.expires_at,
            status: if c.expires_at < Utc::now() { "Expired" } else { "Ready" },
            generated: c.generated,
        }
    }
}

/// `POST /certificates` (`convox certs import PUB KEY [--chain FILE]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportCertificate {
    #[serde(default)]
    r#pub: String,
    #[serde(default)]
    key: String,
    chain: Option<String>,
}

/// `POST /certificates/generate` (`convox certs generate DOMAIN...`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateCertificate {
    /// Comma-separated, as the convox SDK joins them.
    #[serde(default)]
    domains: String,
    /// Accepted from convox; a generated certificate is self-signed.
    issuer: Option<String>,
    /// How long it is valid, as Go durations read (`2160h`), or days (`90d`).
    duration: Option<String>,
}

/// `GET /certificates?generated=true`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    generated: Option<bool>,
}

/// `PUT /apps/{app}/ssl/{service}/{port}` (`convox ssl update SERVICE:PORT ID`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyCertificate {
    #[serde(default)]
    id: String,
}

/// Hands the certificate and its opened key to the runtime (local: the service's router serves
/// HTTPS with it); where it serves, if it does.
pub(crate) async fn serve(
    state: &AppState,
    app: &str,
    service: &str,
    cert: &store::Certificate,
) -> ApiResult<Option<String>> {
    let key = state
        .keyring
        .open(&crate::secrets::owner("certificate", &cert.id), &cert.key_sealed)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("opening certificate {}'s key: {e}", cert.id)))?;
    let key = String::from_utf8(key)
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("certificate {}'s key is not text", cert.id)))?;
    let addr = state
        .runtime
        .serve_certificate(app, service, &cert.certificate_pem, &key)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("serving {app}/{service} with {}: {e}", cert.id)))?;
    Ok(addr.map(|a| a.to_string()))
}

/// Serves every certificate `app`'s services use (after a deployment applied, or a restart
/// brought the app back: a router that is new, or restarted, serves HTTPS again). A service
/// that `release` no longer has, or that has no port any more, stops using its certificate
/// (the runtime removed what served it: on Kubernetes its Secret `rack-tls-<service>`), so a
/// service of that name added later starts without it. Failures are logged: the app's plain
/// HTTP is not held back by them.
pub async fn serve_app(state: &AppState, app: &str, release: Option<&crate::runtime::ReleaseSpec>) {
    if let Some(release) = release {
        let keep: Vec<String> = release
            .manifest
            .services
            .iter()
            .filter(|(_, s)| s.port.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        match store::remove_uses_except(&state.pool, app, &keep).await {
            Ok(gone) => {
                for service in gone {
                    tracing::info!(app.name = %app, "{app}/{service} no longer takes traffic: its certificate is no longer served");
                }
            }
            Err(e) => tracing::warn!(app.name = %app, error = %e, "removing the certificates of {app}'s services gone"),
        }
    }
    let uses = match store::uses_of_app(&state.pool, app).await {
        Ok(uses) => uses,
        Err(e) => {
            tracing::warn!(app.name = %app, error = %e, "reading the certificates of {app}");
            return;
        }
    };
    for u in uses {
        let cert = match store::get(&state.pool, &u.certificate_id).await {
            Ok(Some(cert)) => cert,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(app.name = %app, error = %e, "reading certificate {}", u.certificate_id);
                continue;
            }
        };
        if let Err(e) = serve(state, app, &u.service, &cert).await {
            tracing::warn!(app.name = %app, "serving {app}/{} over HTTPS: {e}", u.service);
        }
    }
}

/// One service port served with a certificate (`GET /apps/{app}/ssl`).
#[derive(Debug, Serialize)]
pub struct SslView {
    service: String,
    port: i32,
    certificate: String,
    domain: String,
    expiration: Option<DateTime<Utc>>,
    /// Where rack serves it over HTTPS on this host (local runtime), when it does.
    https: Option<String>,
}

fn too_long(name: &str, text: &str) -> ApiResult<()> {
    if text.len() > MAX_PEM {
        return Err(ApiError::BadRequest(format!(
            "{name}: it is longer than {MAX_PEM} bytes"
        )));
    }
    Ok(())
}

/// Seals the key, keeps the certificate, answers 201 with it.
async fn keep(state: &AppState, checked: Checked, generated: bool) -> ApiResult<Response> {
    let id = format!("cert-{}", crate::ids::random_token(10).to_lowercase());
    let key_sealed = state
        .keyring
        .seal(&crate::secrets::owner("certificate", &id), checked.key_pem.as_bytes())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("sealing the certificate's key: {e}")))?;
    let row = store::Certificate {
        id: id.clone(),
        domain: checked.domain,
        domains: checked.domains,
        expires_at: checked.expires_at,
        certificate_pem: checked.certificate_pem,
        key_sealed,
        generated,
        created_at: Utc::now(),
    };
    store::insert(&state.pool, &row).await?;
    tracing::info!(certificate = %id, "{} certificate {id} for {}", if generated { "generated" } else { "imported" }, row.domains.join(", "));
    let mut response = (StatusCode::CREATED, Pretty(CertificateView::from(row))).into_response();
    if let Ok(location) = HeaderValue::try_from(format!("/certificates/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[tracing::instrument(skip_all)]
pub async fn import_certificate(
    State(state): State<AppState>,
    Input(body): Input<ImportCertificate>,
) -> ApiResult<Response> {
    too_long("pub", &body.r#pub)?;
    too_long("key", &body.key)?;
    too_long("chain", body.chain.as_deref().unwrap_or_default())?;
    if body.r#pub.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "pub: it is empty: give the certificate's PEM".into(),
        ));
    }
    if body.key.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "key: it is empty: give the private key's PEM".into(),
        ));
    }
    let checked =
        certificate::check(&body.r#pub, &body.key, body.chain.as_deref()).map_err(|e| ApiError::BadRequest(e.0))?;
    keep(&state, checked, false).await
}

/// Days in a `--duration`: Go's `2160h` (hours, rounded up to days), or `90d`.
fn days(duration: Option<&str>) -> ApiResult<i64> {
    let Some(text) = duration.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_DAYS);
    };
    let bad = || ApiError::BadRequest(format!("duration: {text:?} is not a duration (e.g. 2160h or 90d)"));
    let (number, per_day) = if let Some(h) = text.strip_suffix('h') {
        (h, 24)
    } else if let Some(d) = text.strip_suffix('d') {
        (d, 1)
    } else {
        return Err(bad());
    };
    let n: i64 = number.parse().map_err(|_| bad())?;
    let days = (n + per_day - 1) / per_day;
    if !(1..=3650).contains(&days) {
        return Err(ApiError::BadRequest("duration: between 1 day and 10 years".into()));
    }
    Ok(days)
}

#[tracing::instrument(skip_all)]
pub async fn generate_certificate(
    State(state): State<AppState>,
    Input(body): Input<GenerateCertificate>,
) -> ApiResult<Response> {
    // Bounded as openapi.yaml says, before any is read.
    if body.domains.len() > 8192 {
        return Err(ApiError::BadRequest("domains: longer than 8192 bytes".into()));
    }
    if body.issuer.as_deref().is_some_and(|i| i.len() > 1024) {
        return Err(ApiError::BadRequest("issuer: longer than 1024 bytes".into()));
    }
    if body.duration.as_deref().is_some_and(|d| d.len() > 64) {
        return Err(ApiError::BadRequest("duration: longer than 64 bytes".into()));
    }
    let domains: Vec<String> = body
        .domains
        .split(',')
        .map(|d| d.trim().to_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    let days = days(body.duration.as_deref())?;
    let checked = certificate::generate(&domains, days).map_err(|e| ApiError::BadRequest(e.0))?;
    keep(&state, checked, true).await
}

#[tracing::instrument(skip_all)]
pub async fn list_certificates(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Pretty<Vec<CertificateView>>> {
    let rows = store::list(&state.pool).await?;
    Ok(Pretty(
        rows.into_iter()
            .filter(|c| query.generated.is_none_or(|g| c.generated == g))
            .map(CertificateView::from)
            .collect(),
    ))
}

#[tracing::instrument(skip_all, fields(certificate = %id))]
pub async fn delete_certificate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    format: Format,
) -> ApiResult<Response> {
    match store::delete(&state.pool, &id).await? {
        store::Delete::Deleted => {
            tracing::info!(certificate = %id, "deleted certificate {id}");
            Ok(format.ok(serde_json::json!({ "id": id })))
        }
        store::Delete::NotFound => Err(ApiError::NotFound("certificate", id.chars().take(200).collect())),
        store::Delete::InUse(uses) => Err(ApiError::Conflict(format!(
            "certificate {id} is in use by {}: give those another certificate (convox ssl update) first",
            uses.join(", ")
        ))),
    }
}

/// The `{port}` of an ssl path: 1 to 65535.
fn port_number(text: &str) -> ApiResult<u16> {
    text.parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("port: {text:?} is not a port number")))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn apply_certificate(
    State(state): State<AppState>,
    Path((_, service, port)): Path<(String, String, String)>,
    format: Format,
    AppPath(app): AppPath,
    Input(body): Input<ApplyCertificate>,
) -> ApiResult<Response> {
    let port = port_number(&port)?;
    let id = body.id.trim();
    if body.id.len() > 1024 {
        return Err(ApiError::BadRequest("id: longer than 1024 bytes".into()));
    }
    if id.is_empty() {
        return Err(ApiError::BadRequest(
            "id: it is empty: give the certificate's id (convox certs)".into(),
        ));
    }
    let cert = store::get(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("certificate", id.chars().take(200).collect()))?;
    let spec = crate::api::services::current_spec(&state, &app).await?;
    let Some(svc) = spec.manifest.services.get(&service) else {
        return Err(ApiError::NotFound("service", service));
    };
    if svc.port.is_none() {
        return Err(ApiError::BadRequest(format!(
            "service {service} has no port: it takes no traffic to serve over HTTPS"
        )));
    }
    store::set_use(&state.pool, &app.name, &service, i32::from(port), &cert.id).await?;
    let https = serve(&state, &app.name, &service, &cert).await?;
    tracing::info!(app.name = %app.name, certificate = %cert.id, "{} {service}:{port} now serves certificate {}", app.name, cert.id);
    Ok(format.ok(serde_json::json!({ "service": service, "port": port, "certificate": cert.id, "https": https })))
}

/// `DELETE /apps/{app}/ssl/{service}/{port}` (`rack ssl unset SERVICE:PORT`, an extension of
/// rack's: convox has no way back): the port is no longer served with its certificate. The
/// service stops serving HTTPS, unless another of its ports still has a certificate, which it
/// then serves.
#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn remove_certificate(
    State(state): State<AppState>,
    Path((_, service, port)): Path<(String, String, String)>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let number = port_number(&port)?;
    if !store::remove_use(&state.pool, &app.name, &service, i32::from(number)).await? {
        return Err(ApiError::NotFound(
            "certificate",
            format!("on {service}:{number} (`rack ssl` lists the ports that have one)"),
        ));
    }
    let other = store::uses_of_app(&state.pool, &app.name)
        .await?
        .into_iter()
        .find(|u| u.service == service);
    let other = match other {
        Some(u) => store::get(&state.pool, &u.certificate_id).await?,
        None => None,
    };
    match &other {
        Some(cert) => {
            serve(&state, &app.name, &service, cert).await?;
        }
        None => state
            .runtime
            .unserve_certificate(&app.name, &service)
            .await
            .map_err(|e| {
                ApiError::Internal(anyhow::anyhow!("taking {}/{service}'s certificate away: {e}", app.name))
            })?,
    }
    tracing::info!(app.name = %app.name, "{} {service}:{number} no longer serves a certificate", app.name);
    Ok(format.ok(serde_json::json!({
        "service": service,
        "port": number,
        "https": state.runtime.https_addr(&app.name, &service).map(|a| a.to_string()),
    })))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_ssl(State(state): State<AppState>, AppPath(app): AppPath) -> ApiResult<Pretty<Vec<SslView>>> {
    let uses = store::uses_of_app(&state.pool, &app.name).await?;
    let mut out = Vec::with_capacity(uses.len());
    for u in uses {
        let cert = store::get(&state.pool, &u.certificate_id).await?;
        let https = state.runtime.https_addr(&app.name, &u.service).map(|a| a.to_string());
        out.push(SslView {
            https,
            service: u.service,
            port: u.port,
            certificate: u.certificate_id,
            domain: cert.as_ref().map(|c| c.domain.clone()).unwrap_or_default(),
            expiration: cert.map(|c| c.expires_at),
        });
    }
    Ok(Pretty(out))
}

/// Re-issues generated certificate `cert` for the same domains and as long a validity, under
/// the same id, and serves it again wherever it is used.
async fn reissue(state: &AppState, cert: &store::Certificate) -> ApiResult<()> {
    let days = (cert.expires_at - cert.created_at).num_days().clamp(1, 3650);
    let fresh = certificate::generate(&cert.domains, days).map_err(|e| ApiError::BadRequest(e.0))?;
    let key_sealed = state
        .keyring
        .seal(
            &crate::secrets::owner("certificate", &cert.id),
            fresh.key_pem.as_bytes(),
        )
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("sealing the certificate's key: {e}")))?;
    if !store::renew(
        &state.pool,
        &cert.id,
        fresh.expires_at,
        &fresh.certificate_pem,
        &key_sealed,
    )
    .await?
    {
        return Err(ApiError::NotFound("certificate", cert.id.clone()));
    }
    let renewed = store::get(&state.pool, &cert.id)
        .await?
        .ok_or_else(|| ApiError::NotFound("certificate", cert.id.clone()))?;
    for u in store::uses_of_certificate(&state.pool, &cert.id).await? {
        serve(state, &u.app, &u.service, &renewed).await?;
    }
    tracing::info!(certificate = %cert.id, "renewed certificate {} until {}", cert.id, renewed.expires_at);
    Ok(())
}

/// `POST /certificates/{id}/renew`. The convox CLI's `certs renew --app APP` sends the app's
/// name as the id: then every generated certificate the app's services use is renewed. A
/// certificate id renews that one. Only generated (self-signed) certificates can be: rack
/// cannot re-issue an imported one (409: import its successor, then `ssl update`).
#[tracing::instrument(skip_all, fields(certificate = %id))]
pub async fn renew_certificate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    format: Format,
) -> ApiResult<Response> {
    let imported = |c: &store::Certificate| {
        ApiError::Conflict(format!(
            "certificate {} was imported: rack cannot renew it; import its successor (convox certs import) and give it to the services (convox ssl update)",
            c.id
        ))
    };
    if let Some(cert) = store::get(&state.pool, &id).await? {
        if !cert.generated {
            return Err(imported(&cert));
        }
        reissue(&state, &cert).await?;
        return Ok(format.ok(serde_json::json!({ "renewed": [cert.id] })));
    }
    let short: String = id.chars().take(200).collect();
    let Ok(name) = crate::names::AppName::parse(&id) else {
        return Err(ApiError::NotFound("certificate", short));
    };
    if crate::store::apps::get(&state.pool, &name).await?.is_none() {
        return Err(ApiError::NotFound("certificate or app", short));
    }
    let mut ids: Vec<String> = store::uses_of_app(&state.pool, &id)
        .await?
        .into_iter()
        .map(|u| u.certificate_id)
        .collect();
    ids.sort();
    ids.dedup();
    let mut renewed = Vec::new();
    for cid in ids {
        let Some(cert) = store::get(&state.pool, &cid).await? else {
            continue;
        };
        if cert.generated {
            reissue(&state, &cert).await?;
            renewed.push(cert.id);
        }
    }
    if renewed.is_empty() {
        return Err(ApiError::Conflict(format!(
            "app {id} serves no generated certificate: rack renews only those (certs generate); import an imported certificate's successor instead"
        )));
    }
    Ok(format.ok(serde_json::json!({ "renewed": renewed })))
}
