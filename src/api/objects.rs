//! `/apps/{app}/objects`: streamed uploads (size-capped, SHA-256 checked), downloads, listing
//! and deletion of an app's objects.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::{AppPath, load_app};
use crate::api::input::{Format, Pretty, QueryParams};
use crate::error::{ApiError, ApiResult};
use crate::objects::{PutObjectError, hex, validate_key};
use crate::store;

/// The answer to an upload, as convox writes it (the field really is `Url`).
#[derive(Debug, Serialize)]
pub struct ObjectUrl {
    #[serde(rename = "Url")]
    url: String,
}

/// `GET /apps/{app}/objects`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListObjects {
    #[serde(default)]
    prefix: String,
}

/// The URL of an object, as builds refer to it.
pub fn object_url(app: &str, key: &str) -> String {
    format!("object://{app}/{key}")
}

fn checked_key(key: &str) -> ApiResult<String> {
    validate_key(key).map_err(ApiError::BadRequest)?;
    Ok(key.to_owned())
}

#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn upload_object(
    State(state): State<AppState>,
    Path((app, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Loaded here, not by `AppPath`: a bad key is a 400 before an unknown app is a 404.
    let key = checked_key(&key)?;
    let app = load_app(&state, &app).await?;
    store_upload(&state, &app.name, &key, &headers, body).await
}

/// `POST /apps/{app}/objects`: an upload with no key gets `tmp/<random>`, as in convox.
#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn upload_object_anonymous(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppPath(app): AppPath,
    body: Body,
) -> ApiResult<Response> {
    let key = format!("tmp/{}", crate::ids::random_token(30).to_lowercase());
    store_upload(&state, &app.name, &key, &headers, body).await
}

/// Stores `body` as `key` of the app named `app` (already loaded).
async fn store_upload(state: &AppState, app: &str, key: &str, headers: &HeaderMap, body: Body) -> ApiResult<Response> {
    let limit = state.config.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let expected = expected_digest(headers)?;
    let location = crate::objects::Objects::new_location(app);
    let stored = state
        .objects
        .put_stream(&location, idle_limited(body), limit, expected.as_deref())
        .await
        .map_err(|e| match e {
            PutObjectError::TooLarge { limit } => too_large(limit),
            // Well-formed, but not the body its digest announced.
            PutObjectError::DigestMismatch { .. } => ApiError::Unprocessable(e.to_string()),
            PutObjectError::Interrupted(_) => ApiError::BadRequest(e.to_string()),
            PutObjectError::Store(e) => ApiError::Internal(anyhow::Error::new(e).context("storing an upload")),
        })?;
    let size = i64::try_from(stored.size).unwrap_or(i64::MAX);
    match store::objects::replace(&state.pool, app, key, &location, size, &stored.sha256).await {
        Ok(previous) => {
            if let Some(previous) = previous {
                discard(state, &previous).await;
            }
        }
        Err(e) => {
            // No metadata, no object: do not leave bytes nobody can see.
            discard(state, &location).await;
            return Err(e.into());
        }
    }
    tracing::info!(app.name = %app, size = stored.size, "stored object {key} of {} ({} bytes)", app, stored.size);
    let mut response = Pretty(ObjectUrl {
        url: object_url(app, key),
    })
    .into_response();
    insert_digest_headers(response.headers_mut(), &stored.sha256);
    Ok(response)
}

/// Longest an upload may go without sending anything before it is given up as interrupted
/// (uploads have no overall time limit: a large one on a slow link takes long).
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The body's chunks, ending with an error when none comes for [`UPLOAD_IDLE`].
pub(crate) fn idle_limited(body: Body) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, String>> + Send {
    use futures_util::StreamExt;
    futures_util::stream::unfold(Some(body.into_data_stream()), |stream| async move {
        let mut stream = stream?;
        match tokio::time::timeout(UPLOAD_IDLE, stream.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
            Ok(Some(Err(e))) => Some((Err(e.to_string()), None)),
            Ok(None) => None,
            Err(_) => Some((Err(format!("no data for {}s", UPLOAD_IDLE.as_secs())), None)),
        }
    })
}

/// Deletes a blob no row points at any more (a failure only leaves an unreachable file).
async fn discard(state: &AppState, location: &str) {
    if let Err(e) = state.objects.delete(location).await {
        tracing::warn!(error = %e, "deleting the unreferenced blob {location}");
    }
}

pub(crate) fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the upload is larger than the limit of {limit} bytes (RACK_MAX_UPLOAD_BYTES)"
    ))
}

/// The SHA-256 the client announced, as lowercase hex: `Content-Digest: sha-256=:<base64>:`
/// (RFC 9530) or `X-Checksum-Sha256: <hex>`.
fn expected_digest(headers: &HeaderMap) -> ApiResult<Option<String>> {
    if let Some(value) = headers.get("content-digest") {
        let value = value.to_str().map_err(|_| bad_digest())?;
        let encoded = value
            .split(',')
            .filter_map(|item| item.trim().split_once('='))
            .find(|(algorithm, _)| algorithm.trim().eq_ignore_ascii_case("sha-256"))
            .map(|(_, v)| v.trim().trim_matches(':'))
            .ok_or_else(|| ApiError::BadRequest("Content-Digest has no sha-256 digest".into()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| bad_digest())?;
        if bytes.len() != 32 {
            return Err(bad_digest());
        }
        return Ok(Some(hex(&bytes)));
    }
    if let Some(value) = headers.get("x-checksum-sha256") {
        let value = value.to_str().map_err(|_| bad_digest())?.trim().to_ascii_lowercase();
        if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad_digest());
        }
        return Ok(Some(value));
    }
    Ok(None)
}

fn bad_digest() -> ApiError {
    ApiError::BadRequest(
        "malformed digest: send Content-Digest: sha-256=:<base64>: or X-Checksum-Sha256: <64 hex digits>".into(),
    )
}

fn insert_digest_headers(headers: &mut HeaderMap, sha256: &str) {
    if let Ok(value) = HeaderValue::from_str(sha256) {
        headers.insert("x-checksum-sha256", value);
    }
}

/// The object `key` of the app named `app` (already loaded): 400 for a bad key, else 404.
async fn load_object(state: &AppState, app: &str, key: &str) -> ApiResult<store::objects::Object> {
    let key = checked_key(key)?;
    store::objects::get(&state.pool, app, &key)
        .await?
        .ok_or(ApiError::NotFound("object", key))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn download_object(
    State(state): State<AppState>,
    Path((_, key)): Path<(String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let mut object = load_object(&state, &app.name, &key).await?;
    let mut opened = state.objects.get_stream(&object.location).await;
    if matches!(opened, Err(object_store::Error::NotFound { .. })) {
        // Replaced (and its old blob deleted) between reading the row and opening the blob:
        // the new one is the answer.
        object = load_object(&state, &app.name, &key).await?;
        opened = state.objects.get_stream(&object.location).await;
    }
    let stream = opened.map_err(|e| match e {
        object_store::Error::NotFound { .. } => ApiError::NotFound("object", object.key.clone()),
        e => ApiError::Internal(anyhow::Error::new(e).context("reading an object")),
    })?;
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(object.size));
    insert_digest_headers(headers, &object.sha256);
    Ok(response)
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn head_object(
    State(state): State<AppState>,
    Path((_, key)): Path<(String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let object = load_object(&state, &app.name, &key).await?;
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(object.size));
    insert_digest_headers(headers, &object.sha256);
    Ok(response)
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn delete_object(
    State(state): State<AppState>,
    Path((_, key)): Path<(String, String)>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let object = load_object(&state, &app.name, &key).await?;
    // Metadata first: once it is gone the object is invisible, whatever happens next.
    if let Some(location) = store::objects::delete(&state.pool, &object.app, &object.key).await? {
        discard(&state, &location).await;
    }
    Ok(format.ok(serde_json::json!({ "deleted": object_url(&object.app, &object.key) })))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_objects(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListObjects>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<String>>> {
    Ok(Pretty(
        store::objects::list_keys(&state.pool, &app.name, &query.prefix).await?,
    ))
}
