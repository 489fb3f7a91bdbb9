//! Cross-site requests: a browser that holds a credential for the rack (HTTP basic auth it
//! cached) sends it with a form another site's page submits, so a write the user never meant
//! would be authenticated. Browsers say where a request comes from (`Origin`, and
//! `Sec-Fetch-Site` in current ones); a state-changing request (any method but GET, HEAD and
//! OPTIONS) or a websocket handshake (a GET, but it opens a channel that can act) that names
//! another origin is refused with 403 before its credential is looked at. CI systems, curl
//! and the CLIs' requests send neither header, and the convox CLI's websockets send the rack's
//! own origin, so they are unaffected; the dashboard's own page is the rack's origin, so its
//! requests pass.

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
    if acts(request.method(), request.headers())
        && let Err(refused) = check(request.headers())
    {
        // Worth an operator's attention: a page somewhere tried to act through a browser.
        tracing::warn!(
            client.address = %crate::auth::client_address(&request),
            "refused a cross-site {}: {refused}",
            request.method()
        );
        return Err(refused);
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
    if is_own(origin, headers) {
        return Ok(());
    }
    let shown: String = origin.chars().take(100).collect();
    Err(ApiError::Forbidden(format!(
        "refused a request from the page of another origin (Origin: {shown}): the rack accepts \
         changes from its own pages and from clients such as the CLI, not from other sites' pages"
    )))
}

/// Whether `origin` is the rack itself: its host and port are the `Host` the request was sent
/// to (or the `X-Forwarded-Host` a proxy in front says it received; neither can be set by a
/// page's form). The scheme is not compared: a TLS proxy in front may not say that it
/// received https, and the convox CLI sends its `RACK_URL`'s `scheme://host` as the Origin of
/// its websockets; one host and port cannot serve a page of its own over the other scheme.
fn is_own(origin: &str, headers: &HeaderMap) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        // `null` (a sandboxed page, a redirect) or garbage: not the rack.
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .filter_map(|value| value.split(',').next())
        .map(|host| host.trim().to_ascii_lowercase())
        .any(|host| {
            let bare = host
                .strip_suffix(":80")
                .or_else(|| host.strip_suffix(":443"))
                .unwrap_or(&host);
            host == authority || bare == authority
        })
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
            headers(&[host, ("origin", "http://127.0.0.1")]),
            headers(&[host, ("origin", "http://127.0.0.1:5443.evil.example")]),
            headers(&[host, ("origin", "ftp://127.0.0.1:5443")]),
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
        // The convox CLI's websockets behind a TLS proxy: `https://` + RACK_URL's host.
        let proxied = headers(&[("host", "rack.example.com"), ("origin", "https://Rack.example.com")]);
        assert!(check(&proxied).is_ok());
        let forwarded = headers(&[
            ("host", "127.0.0.1:5443"),
            ("x-forwarded-host", "rack.example.com"),
            ("origin", "https://rack.example.com"),
        ]);
        assert!(check(&forwarded).is_ok());
        let default_port = headers(&[("host", "rack.example.com:80"), ("origin", "http://rack.example.com")]);
        assert!(check(&default_port).is_ok());
        let explicit_port = headers(&[("host", "rack.example.com"), ("origin", "https://rack.example.com:443")]);
        assert!(check(&explicit_port).is_ok());
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
