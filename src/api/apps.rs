//! `/apps`: create, list, show, update (lock, parameters) and delete apps.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::input::{Format, Input, Pretty};
use crate::error::{ApiError, ApiResult};
use crate::names::AppName;
use crate::store::{self, apps::DeleteOutcome};

/// `POST /apps`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    name: String,
    generation: Option<String>,
    /// Sent by some convox CLIs; apps are created at once here, so it has no use.
    #[serde(default, rename = "timeout")]
    _timeout: Option<Scalar>,
}

/// Any one value (a form field, or a JSON string, number or boolean), read and ignored.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(#[expect(dead_code, reason = "ignored")] bool),
    Number(#[expect(dead_code, reason = "ignored")] f64),
    Text(#[expect(dead_code, reason = "ignored")] String),
}

/// `PUT /apps/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateApp {
    lock: Option<bool>,
    parameters: Option<Parameters>,
}

/// App parameters: an object in JSON, or (as convox sends them) `k=v&k2=v2` packed in one
/// form field.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Parameters {
    Packed(String),
    Map(BTreeMap<String, String>),
}

impl Parameters {
    pub(crate) fn into_map(self) -> ApiResult<BTreeMap<String, String>> {
        let map = match self {
            Self::Map(map) => map,
            Self::Packed(text) => serde_urlencoded::from_str(&text)
                .map_err(|e| ApiError::BadRequest(format!("invalid parameters {text:?}: {e}")))?,
        };
        for (key, value) in &map {
            let valid_key = !key.is_empty()
                && key.len() <= 128
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !valid_key {
                return Err(ApiError::BadRequest(format!(
                    "invalid parameter name {key:?}: use letters, digits, '_', '-' and '.', at most 128"
                )));
            }
            if value.len() > 4096 {
                return Err(ApiError::BadRequest(format!(
                    "parameter {key} is longer than 4096 bytes"
                )));
            }
        }
        Ok(map)
    }
}

/// An app as convox shows it.
#[derive(Debug, Serialize)]
pub struct AppView {
    generation: String,
    locked: bool,
    name: String,
    release: crate::ids::ReleaseId,
    router: String,
    status: &'static str,
    parameters: BTreeMap<String, String>,
}

impl AppView {
    /// The view of `app`, with its router (where its traffic arrives) from the runtime.
    pub fn new(state: &AppState, app: store::apps::App) -> Self {
        Self {
            status: app.status(),
            router: state.runtime.app_router(&app.name),
            generation: app.generation,
            locked: app.locked,
            release: app.release_id.unwrap_or_default(),
            name: app.name,
            parameters: app.parameters.0,
        }
    }
}

/// Parses the `{name}` of a path. A malformed name names no app, so it is a 404 like any
/// other unknown app (the convox CLI looks for that text).
pub fn app_name(name: &str) -> ApiResult<AppName> {
    AppName::parse(name).map_err(|_| ApiError::NotFound("app", name.chars().take(80).collect()))
}

/// Loads an app or answers `app not found: <name>`.
pub async fn load_app(state: &AppState, name: &str) -> ApiResult<store::apps::App> {
    let name = app_name(name)?;
    store::apps::get(&state.pool, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound("app", name.to_string()))
}

/// The app a route's `{app}` names, loaded: 404 when there is none, 400 for a name that
/// cannot be one. Written last among a handler's parameters, so the app is looked up after the
/// other parts of the request were checked, as `load_app` at the top of the handler did.
#[derive(Debug)]
pub struct AppPath(pub store::apps::App);

impl axum::extract::FromRequestParts<AppState> for AppPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let name = params
            .iter()
            .find_map(|(key, value)| (key == "app").then_some(value))
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("AppPath on a route without {{app}}")))?;
        Ok(Self(load_app(state, name).await?))
    }
}

#[tracing::instrument(skip_all)]
pub async fn list_apps(
    State(state): State<AppState>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
) -> ApiResult<Pretty<Vec<AppView>>> {
    let apps = store::apps::list(&state.pool).await?;
    // A token limited to some apps sees only those.
    let visible = |app: &store::apps::App| principal.as_ref().is_none_or(|p| p.may_use(&app.name));
    Ok(Pretty(
        apps.into_iter()
            .filter(visible)
            .map(|app| AppView::new(&state, app))
            .collect(),
    ))
}

#[tracing::instrument(skip_all, fields(app.name = %body.name))]
pub async fn create_app(State(state): State<AppState>, Input(body): Input<CreateApp>) -> ApiResult<Response> {
    let name = AppName::parse_new(&body.name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let generation = body.generation.unwrap_or_else(|| "3".to_owned());
    if generation != "3" {
        return Err(ApiError::BadRequest(format!(
            "generation {generation:?} is not supported: rack runs generation 3 apps"
        )));
    }
    let app = store::apps::insert(&state.pool, &name, &generation)
        .await
        .map_err(|e| {
            if is_constraint(&e, "apps_pkey") {
                ApiError::Conflict(format!("app already exists: {name}"))
            } else {
                e.into()
            }
        })?;
    if let Err(source) = state.runtime.create_app(name.as_str()).await {
        // An app the runtime cannot host is not created at all.
        store::apps::delete(&state.pool, &name).await?;
        return Err(ApiError::runtime(format!("could not create app {name}"))(source));
    }
    tracing::info!(app.name = %name, "created app {name}");
    let location = format!("/apps/{name}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Pretty(AppView::new(&state, app)),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(app.name = %name))]
pub async fn show_app(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Pretty<AppView>> {
    Ok(Pretty(AppView::new(&state, load_app(&state, &name).await?)))
}

#[tracing::instrument(skip_all, fields(app.name = %name))]
pub async fn update_app(
    State(state): State<AppState>,
    Path(name): Path<String>,
    format: Format,
    Input(body): Input<UpdateApp>,
) -> ApiResult<Response> {
    let name = app_name(&name)?;
    let parameters = body
        .parameters
        .map(Parameters::into_map)
        .transpose()?
        .unwrap_or_default();
    store::apps::update(&state.pool, &name, body.lock, &parameters)
        .await?
        .ok_or_else(|| ApiError::NotFound("app", name.to_string()))?;
    let app = load_app(&state, name.as_str()).await?;
    Ok(format.ok(AppView::new(&state, app)))
}

#[tracing::instrument(skip_all, fields(app.name = %name))]
pub async fn delete_app(
    State(state): State<AppState>,
    Path(name): Path<String>,
    format: Format,
) -> ApiResult<Response> {
    let name = app_name(&name)?;
    match store::apps::delete(&state.pool, &name).await? {
        DeleteOutcome::Deleted => {
            // The rows are gone (and with them any deployment); now its processes and files.
            if let Err(e) = state.runtime.delete_app(name.as_str()).await {
                // The app is gone; what the runtime could not remove is logged for the operator.
                tracing::warn!(error = %e, app.name = %name, "removing what {name} ran");
            }
            if let Err(e) = state.objects.delete_app(name.as_str()).await {
                tracing::warn!(error = %e, app.name = %name, "deleting the objects of {name}");
            }
            tracing::info!(app.name = %name, "deleted app {name}");
            Ok(format.ok(serde_json::json!({ "deleted": name })))
        }
        DeleteOutcome::Locked => Err(ApiError::Conflict(format!("app is locked: {name}"))),
        DeleteOutcome::NotFound => Err(ApiError::NotFound("app", name.to_string())),
    }
}

/// Whether `error` is a violation of the constraint named `name` (constraints are named in the
/// migrations so this stays exact).
pub fn is_constraint(error: &sqlx::Error, name: &str) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.constraint())
        .is_some_and(|c| c == name)
}
