//! `/registries` (admin only), as the convox CLI's `registries`, `registries add` and
//! `registries remove` call it: private registries whose credentials image builds and pulls
//! use. The password is sealed before it reaches the store (`secrets`) and never leaves the
//! rack again: answers show the server and the user name only, and the audit log keeps the
//! request (method, path), never its body.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::input::{Format, Input, Pretty};
use crate::error::{ApiError, ApiResult};
use crate::store::registries as store;

/// Longest server, user name or password accepted, in characters.
const MAX_FIELD: usize = 1024;

/// `POST /registries` (a form, as the convox CLI sends it, or JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRegistry {
    /// The registry's host and port, as image names start: `registry.example.com`,
    /// `127.0.0.1:5000`.
    #[serde(default)]
    server: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// A registry as the API shows it: never its password.
#[derive(Debug, Serialize)]
pub struct RegistryView {
    server: String,
    username: String,
}

/// Checks one field: given, not too long, without control characters (and, for `server` and
/// `username`, without spaces).
fn field<'a>(name: &str, value: &'a str, what: &str, spaces: bool) -> ApiResult<&'a str> {
    if value.chars().count() > MAX_FIELD {
        return Err(ApiError::BadRequest(format!(
            "{name}: it is longer than {MAX_FIELD} characters"
        )));
    }
    let value = if spaces { value } else { value.trim() };
    if value.is_empty() {
        return Err(ApiError::BadRequest(format!("{name}: it is empty: give {what}")));
    }
    if value.chars().any(char::is_control) || (!spaces && value.chars().any(char::is_whitespace)) {
        return Err(ApiError::BadRequest(format!(
            "{name}: it has {}control characters",
            if spaces { "" } else { "spaces or " }
        )));
    }
    Ok(value)
}

#[tracing::instrument(skip_all)]
pub async fn add_registry(State(state): State<AppState>, Input(body): Input<AddRegistry>) -> ApiResult<Response> {
    let server = field(
        "server",
        &body.server,
        "the registry's host (and port), e.g. registry.example.com",
        false,
    )?;
    let username = field("username", &body.username, "the user name to log in with", false)?;
    if username.contains(':') {
        return Err(ApiError::BadRequest(
            "username: it has a `:`, which registries' basic auth cannot carry".into(),
        ));
    }
    let password = field(
        "password",
        &body.password,
        "the password (or token) to log in with",
        true,
    )?;
    let sealed = state
        .keyring
        .seal(&crate::secrets::owner("registry", server), password.as_bytes())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("sealing the registry's password: {e}")))?;
    let added = store::upsert(&state.pool, server, username, &sealed).await?;
    // The server and user only: the password is never logged.
    tracing::info!(registry = %server, "{} registry {server} (user {username})", if added { "added" } else { "updated" });
    let view = RegistryView {
        server: server.to_owned(),
        username: username.to_owned(),
    };
    let status = if added { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = (status, Pretty(view)).into_response();
    // The audit entry names the registry through it.
    if let Ok(location) = HeaderValue::try_from(format!("/registries/{server}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[tracing::instrument(skip_all)]
pub async fn list_registries(State(state): State<AppState>) -> ApiResult<Pretty<Vec<RegistryView>>> {
    let rows = store::list(&state.pool).await?;
    Ok(Pretty(
        rows.into_iter()
            .map(|r| RegistryView {
                server: r.server,
                username: r.username,
            })
            .collect(),
    ))
}

#[tracing::instrument(skip_all)]
pub async fn remove_registry(
    State(state): State<AppState>,
    Path(server): Path<String>,
    format: Format,
) -> ApiResult<Response> {
    if !store::delete(&state.pool, &server).await? {
        return Err(ApiError::NotFound("registry", server.chars().take(200).collect()));
    }
    tracing::info!(registry = %server, "removed registry {server}");
    Ok(format.ok(serde_json::json!({ "server": server })))
}
