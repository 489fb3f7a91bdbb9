//! Cross-site requests: a browser that holds a credential for the rack (HTTP basic auth it
//! cached) sends it with a form another site's page submits, so a write the user never meant
//! would be authenticated. Browsers say where a request comes from (`Origin`, and
//! `Sec-Fetch-Site` in current ones); a state-changing request (any method but GET, HEAD and
//! OPTIONS) or a websocket handshake (a GET, but it opens a channel that can act) that names
//! another origin is refused with 403 before its credential is looked at. CLIs, CI systems
//! and curl send neither header, so they are unaffected; the dashboard's own page is the
//! rack's origin, so its requests pass.

use axum::extract::Request;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;

/// Refuses (403) a write or websocket handshake that a browser says comes from another site
/// or another origin.
///
/// # Errors
/// 403 saying which header named which origin.
pub async fn refuse_cross_site(request: Request, next: Next) -> Result<Response, ApiError> {
    if acts(request.method(), request.headers()) {
        check(request.headers())?;
    }
    Ok(next.run(request).await)
}

/// Whether a request can change something: a write, or the handshake of a websocket.
fn acts(method: &Method, headers: &HeaderMap) -> bool {
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("websocket"));
    !safe || upgrade
}

/// Checks what the browser said about where the request comes from.
fn check(headers: &HeaderMap) -> Result<(), ApiError> {
    // Sent by current browsers on every request: `same-origin` for the rack's own page,
    // `none` for what the user typed; `same-site` is another port or subdomain (another
    // origin all the same).
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        let site = site.trim().to_ascii_lowercase();
        if site == "cross-site" || site == "same-site" {
            return Err(ApiError::Forbidden(format!(
                "refused a request from another site (Sec-Fetch-Site: {site}): the rack accepts \
                 changes from its own pages and from clients such as the CLI, not from other sites' pages"
            )));
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default().trim();
    if own_origins(headers).iter().any(|own| own.eq_ignore_ascii_case(origin)) {
        return Ok(());
    }
    let shown: String = origin.chars().take(100).collect();
    Err(ApiError::Forbidden(format!(
        "refused a request from the page of another origin (Origin: {shown}): the rack accepts \
         changes from its own pages and from clients such as the CLI, not from other sites' pages"
    )))
}

/// The origins the rack's own pages have, as browsers write them: the scheme (`http`, or the
/// one a proxy in front says it received, `X-Forwarded-Proto`) and the `Host` the browser
/// asked for, with the scheme's default port left out. None without a `Host`.
fn own_origins(headers: &HeaderMap) -> Vec<String> {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    let host = host.trim();
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| v == "http" || v == "https")
        .unwrap_or_else(|| "http".to_owned());
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let mut origins = vec![format!("{scheme}://{host}")];
    if let Some(bare) = host.strip_suffix(default_port) {
        origins.push(format!("{scheme}://{bare}"));
    }
    origins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn only_the_racks_own_origin_may_write() {
        let host = ("host", "127.0.0.1:5443");
        assert!(check(&headers(&[host])).is_ok(), "a CLI sends neither header");
        assert!(check(&headers(&[host, ("origin", "http://127.0.0.1:5443")])).is_ok());
        assert!(check(&headers(&[host, ("sec-fetch-site", "same-origin")])).is_ok());
        assert!(check(&headers(&[host, ("sec-fetch-site", "none")])).is_ok());
        for refused in [
            headers(&[host, ("origin", "http://evil.example")]),
            headers(&[host, ("origin", "http://127.0.0.1:5444")]),
            headers(&[host, ("origin", "https://127.0.0.1:5443")]),
            headers(&[host, ("origin", "null")]),
            headers(&[("origin", "http://127.0.0.1:5443")]),
            headers(&[host, ("sec-fetch-site", "cross-site")]),
            headers(&[host, ("sec-fetch-site", "same-site")]),
            headers(&[
                host,
                ("sec-fetch-site", "same-site"),
                ("origin", "http://127.0.0.1:5443"),
            ]),
        ] {
            let error = check(&refused).unwrap_err();
            assert_eq!(error.status(), axum::http::StatusCode::FORBIDDEN, "{refused:?}");
        }
        let proxied = headers(&[
            ("host", "rack.example.com"),
            ("x-forwarded-proto", "https"),
            ("origin", "https://rack.example.com"),
        ]);
        assert!(check(&proxied).is_ok());
        let default_port = headers(&[("host", "rack.example.com:80"), ("origin", "http://rack.example.com")]);
        assert!(check(&default_port).is_ok());
    }

    #[test]
    fn writes_and_websocket_handshakes_are_checked() {
        assert!(!acts(&Method::GET, &HeaderMap::new()));
        assert!(!acts(&Method::HEAD, &HeaderMap::new()));
        assert!(!acts(&Method::OPTIONS, &HeaderMap::new()));
        assert!(acts(&Method::POST, &HeaderMap::new()));
        assert!(acts(&Method::DELETE, &HeaderMap::new()));
        assert!(acts(&Method::GET, &headers(&[("upgrade", "websocket")])));
    }
}
