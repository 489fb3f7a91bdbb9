//! `GET /`: the dashboard page for browsers, the API's root for everything else. The page is
//! one HTML file with its script, built into the binary (no Node build step). It holds no data:
//! it asks for the rack password or a token (a `read` token is enough), keeps it in the tab's
//! session storage, and sends it with each request it makes, so it is served to anyone, and
//! every figure it shows comes from the authenticated API and the event feed.

use std::sync::LazyLock;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::Digest;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");

/// The page with its script in place, and the Content-Security-Policy that allows exactly that
/// script (by its digest) and requests to this origin only.
static RENDERED: LazyLock<(String, String)> = LazyLock::new(|| {
    let digest = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT.as_bytes()));
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; \
         img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    );
    (PAGE.replace("/*SCRIPT*/", SCRIPT), policy)
});

/// Whether `headers` ask for a page (a browser navigating) rather than for data.
pub fn wants_page(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    accept.contains("text/html") && !accept.trim_start().starts_with("application/json")
}

/// `GET /`.
///
/// # Errors
/// 401 for a request for data without credentials.
pub async fn root(
    State(state): State<AppState>,
    headers: HeaderMap,
    principal: Option<Extension<Principal>>,
) -> ApiResult<Response> {
    if wants_page(&headers) {
        let (page, policy) = &*RENDERED;
        let mut response = page.clone().into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
        headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
        if let Ok(policy) = HeaderValue::from_str(policy) {
            headers.insert(header::CONTENT_SECURITY_POLICY, policy);
        }
        return Ok(response);
    }
    if principal.is_none() {
        return Err(ApiError::Unauthorized("credentials required"));
    }
    Ok(axum::Json(serde_json::json!({
        "name": state.config.rack_name,
        "version": env!("CARGO_PKG_VERSION"),
        "dashboard": "/",
        "events": "/events",
        "metrics": "/metrics",
    }))
    .into_response())
}
