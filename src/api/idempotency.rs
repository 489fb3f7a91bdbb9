//! `Idempotency-Key` on the POSTs that create things (apps, objects, builds, releases,
//! promotes): a retry with the same key and the same request within 24 hours gets the first
//! response again (same status, same ids) and starts nothing new; the same key with another
//! request is 422. A key belongs to the credential that sent it and the path it was sent to
//! (so to one app's route): the same key from another token, or to another app, is another
//! key, and no credential can claim a key another will use. Keys live in Postgres, so a retry
//! may reach any replica.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::{ApiError, ErrorMessage};
use crate::store::idempotency::{self, KeyState, Record};

/// Largest request body hashed (uploads are identified by their headers instead) and largest
/// response body stored.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Response headers kept for a replay.
const KEPT_HEADERS: &[&str] = &["content-type", "location", "x-checksum-sha256"];

/// Where the stored error message of a 4xx travels in the stored headers.
const ERROR_KEY: &str = "rack-error-message";

/// Marks a response that streamed a deployment's log (a followed promote): a replay streams
/// that log again rather than a stored body.
#[derive(Debug, Clone, Copy)]
pub struct StreamedDeployment(pub uuid::Uuid);

/// Runs `request` (to a route whose policy says it is idempotent) at most once per key.
pub async fn idempotency(state: &AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let key = request.headers().get("idempotency-key").cloned();
    let (Some(route), Some(key)) = (route, key) else {
        return Ok(next.run(request).await);
    };
    if request.method() != Method::POST {
        return Ok(next.run(request).await);
    }
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into()))?
        .to_owned();

    // Who sends it where: the credential (by id, never a secret) and the path, app included.
    let credential = match request.extensions().get::<crate::auth::Principal>() {
        Some(crate::auth::Principal { token: Some(id), .. }) => format!("token:{id}"),
        Some(_) => "password".to_owned(),
        None => "anonymous".to_owned(),
    };
    let scope = format!("{credential} {} {}", request.method(), request.uri().path());
    let (parts, body) = request.into_parts();
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str());
    hasher.update(parts.uri.to_string());
    let body = if route.starts_with("/apps/{app}/objects") {
        // An upload streams; it is identified by what its headers promise.
        for name in ["content-length", "content-digest", "x-checksum-sha256"] {
            hasher.update(name);
            hasher.update(parts.headers.get(name).map(HeaderValue::as_bytes).unwrap_or_default());
        }
        body
    } else {
        let bytes = axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|_| ApiError::PayloadTooLarge("the request body is too large".into()))?;
        hasher.update(
            parts
                .headers
                .get("content-type")
                .map(HeaderValue::as_bytes)
                .unwrap_or_default(),
        );
        hasher.update(&bytes);
        Body::from(bytes)
    };
    let hash = crate::objects::hex(&hasher.finalize());

    match idempotency::claim(&state.pool, &scope, &key, &hash).await? {
        Some(record) if record.request_hash != hash => Err(ApiError::Unprocessable(format!(
            "Idempotency-Key {key} was used for a different request in the last 24 hours: use a new key"
        ))),
        Some(record) if record.state != KeyState::Done => Err(ApiError::Conflict(format!(
            "a request with Idempotency-Key {key} is still in progress"
        ))),
        Some(record) => replay(state, record, &parts.headers, parts.extensions.get().cloned()),
        None => {
            let response = next.run(Request::from_parts(parts, body)).await;
            Ok(remember(state, (&scope, &key), response).await)
        }
    }
}

/// Stores the first response (or forgets the key when a retry should run the request again).
async fn remember(state: &AppState, (scope, key): (&str, &str), response: Response) -> Response {
    let forget = || async {
        if let Err(e) = idempotency::release(&state.pool, scope, key).await {
            tracing::warn!(error = %e, "forgetting an idempotency key");
        }
    };
    if response.status().is_server_error() {
        forget().await;
        return response;
    }
    let mut headers: BTreeMap<String, String> = KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            Some((
                (*name).to_owned(),
                response.headers().get(*name)?.to_str().ok()?.to_owned(),
            ))
        })
        .collect();
    if let Some(ErrorMessage(message)) = response.extensions().get::<ErrorMessage>() {
        headers.insert(ERROR_KEY.to_owned(), message.clone());
    }
    let status = response.status().as_u16();
    if let Some(StreamedDeployment(id)) = response.extensions().get::<StreamedDeployment>().copied() {
        if let Err(e) = idempotency::complete(&state.pool, (scope, key), status, &headers, &[], Some(id)).await {
            tracing::warn!(error = %e, "storing an idempotent response");
            forget().await;
        }
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        forget().await;
        return ApiError::Internal(anyhow::anyhow!("a response too large to remember")).into_response();
    };
    if let Err(e) = idempotency::complete(&state.pool, (scope, key), status, &headers, &bytes, None).await {
        tracing::warn!(error = %e, "storing an idempotent response");
        forget().await;
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn replay(
    state: &AppState,
    record: Record,
    request_headers: &HeaderMap,
    principal: Option<crate::auth::Principal>,
) -> Result<Response, ApiError> {
    let status = record
        .status
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok());
    let status = status.unwrap_or(StatusCode::OK);
    let mut response = match (record.deployment_id, record.headers.get("location")) {
        (Some(deployment), Some(location)) => {
            let app = location.split('/').nth(2).unwrap_or_default().to_owned();
            let topic = crate::store::events::Topic::Deployment { app, deployment };
            let request = super::streams::StreamRequest {
                ws: None,
                headers: request_headers.clone(),
                query: super::streams::StreamQuery::default(),
                principal,
            };
            super::streams::respond(
                state,
                topic,
                request,
                super::streams::Style::Prefixed,
                crate::events::Follow::UntilEnd,
            )?
        }
        _ => (status, record.body.unwrap_or_default()).into_response(),
    };
    for (name, value) in record.headers.iter() {
        if name == ERROR_KEY {
            response.extensions_mut().insert(ErrorMessage(value.clone()));
        } else if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            response.headers_mut().insert(name, value);
        }
    }
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
}
