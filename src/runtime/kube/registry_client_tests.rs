//! Tests of `registry_client.rs` against a registry on 127.0.0.1 that wants a Bearer token
//! (Docker Hub's, GHCR's, Harbor's login): every request without the token is answered 401 with
//! a `Bearer realm=...` challenge, and the realm gives a token only for the right user and
//! password. A build's image goes in (blob, then manifest) and out again, by digest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::registry_client::{Manifest, RegistryClient, digest_of};

const TOKEN: &str = "tok-3f9a";
const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

#[derive(Default)]
struct Registry {
    base: String,
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, (String, Vec<u8>)>,
    /// What the realm was asked: (scope, service), for each token given.
    tokens: Vec<(String, String)>,
    /// Requests that came without the token.
    challenged: usize,
}

type Shared = Arc<Mutex<Registry>>;

async fn serve(State(registry): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let query: HashMap<String, String> =
        serde_urlencoded::from_str(parts.uri.query().unwrap_or_default()).unwrap_or_default();
    let mut registry = registry.lock().unwrap();
    if path == "/token" {
        return token(&mut registry, &parts.headers, &query);
    }
    let bearer = format!("Bearer {TOKEN}");
    if parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
        registry.challenged += 1;
        let challenge = format!(
            "Bearer realm=\"{}/token\",service=\"test-registry\",scope=\"repository:shop:pull\"",
            registry.base
        );
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response();
    }
    let Some(rest) = path.strip_prefix("/v2/shop/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match (parts.method, rest.split_once('/')) {
        (Method::HEAD | Method::GET, Some(("blobs", digest))) => match registry.blobs.get(digest) {
            Some(blob) => blob.clone().into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        (Method::POST, Some(("blobs", "uploads/"))) => {
            let location = format!("{}/v2/shop/blobs/uploads/u1?state=x", registry.base);
            (StatusCode::ACCEPTED, [(header::LOCATION, location)]).into_response()
        }
        (Method::PUT, Some(("blobs", "uploads/u1"))) => {
            let digest = query.get("digest").cloned().unwrap_or_default();
            if digest_of(&body) != digest {
                return StatusCode::BAD_REQUEST.into_response();
            }
            registry.blobs.insert(digest, body.to_vec());
            StatusCode::CREATED.into_response()
        }
        (Method::PUT, Some(("manifests", tag))) => {
            let kind = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            registry.manifests.insert(tag.to_owned(), (kind, body.to_vec()));
            StatusCode::CREATED.into_response()
        }
        (Method::GET, Some(("manifests", tag))) => match registry.manifests.get(tag) {
            Some((kind, bytes)) => ([(header::CONTENT_TYPE, kind.clone())], bytes.clone()).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The realm: a token for `ci` / `s3cret` (basic auth), 401 otherwise.
fn token(registry: &mut Registry, headers: &HeaderMap, query: &HashMap<String, String>) -> Response {
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("ci:s3cret")
    );
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    registry.tokens.push((
        query.get("scope").cloned().unwrap_or_default(),
        query.get("service").cloned().unwrap_or_default(),
    ));
    axum::Json(serde_json::json!({ "token": TOKEN, "expires_in": 300 })).into_response()
}

async fn start() -> (String, Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let registry: Shared = Arc::new(Mutex::new(Registry {
        base: format!("http://{host}"),
        ..Registry::default()
    }));
    let app = axum::Router::new().fallback(serve).with_state(Arc::clone(&registry));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (host, registry)
}

#[tokio::test]
async fn a_bearer_registry_gets_an_image_in_and_out_with_a_token_from_its_realm() {
    let (host, registry) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    std::fs::write(&layer, b"the layer's bytes").unwrap();
    let layer_digest = digest_of(b"the layer's bytes");
    let manifest_bytes = format!("{{\"schemaVersion\":2,\"layers\":[{{\"digest\":\"{layer_digest}\"}}]}}").into_bytes();
    let manifest = Manifest {
        media_type: MEDIA_TYPE.to_owned(),
        digest: digest_of(&manifest_bytes),
        bytes: manifest_bytes,
    };

    let client = RegistryClient::new(&host, Some(("ci".to_owned(), "s3cret".to_owned()))).unwrap();
    client.push_blob("shop", &layer_digest, &layer).await.unwrap();
    client.put_manifest("shop", "web.BABC", &manifest).await.unwrap();
    let read = client.manifest("shop", "web.BABC").await.unwrap();
    assert_eq!(
        (read.digest.as_str(), read.media_type.as_str()),
        (manifest.digest.as_str(), MEDIA_TYPE)
    );
    let out = dir.path().join("out");
    assert_eq!(client.blob_to_file("shop", &layer_digest, &out).await.unwrap(), 17);
    assert_eq!(std::fs::read(&out).unwrap(), b"the layer's bytes");
    {
        let registry = registry.lock().unwrap();
        // One login: the first request was challenged, the token was kept for the others.
        assert_eq!(registry.challenged, 1);
        assert_eq!(
            registry.tokens,
            vec![("repository:shop:pull,push".to_owned(), "test-registry".to_owned())]
        );
        assert!(registry.manifests.contains_key("web.BABC"));
    }

    // Wrong credentials: the realm refuses, and the error says so.
    let wrong = RegistryClient::new(&host, Some(("ci".to_owned(), "nope".to_owned()))).unwrap();
    let error = wrong.manifest("shop", "web.BABC").await.unwrap_err();
    assert!(error.contains("/token refused a token: 401"), "{error}");
    // None at all: the realm refuses too (rack asks it without credentials).
    let anonymous = RegistryClient::new(&host, None).unwrap();
    let error = anonymous.manifest("shop", "web.BABC").await.unwrap_err();
    assert!(error.contains("refused a token"), "{error}");
}
