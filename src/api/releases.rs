//! `/apps/{app}/releases`: list, show and create releases (build + env + manifest), and
//! promote one, which starts a deployment.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::{AppPath, load_app};
use crate::api::builds::list_limit;
use crate::api::deployments::DeploymentView;
use crate::api::input::{Format, Input, Pretty, QueryParams};
use crate::api::streams::{self, StreamQuery, StreamRequest, Style};
use crate::error::{ApiError, ApiResult};
use crate::events::Follow;
use crate::store::builds::BuildStatus;
use crate::store::events::Topic;
use crate::store::releases::{self, NewRelease, Release};

/// Longest a deployment may take unless the promote says otherwise (convox's k8s default is
/// 3000 s; the issue asks for 30 minutes).
pub const DEFAULT_TIMEOUT_SECS: u64 = 1800;

/// A release as convox shows it.
#[derive(Debug, Serialize)]
pub struct ReleaseView {
    id: crate::ids::ReleaseId,
    app: String,
    build: crate::ids::BuildId,
    env: String,
    manifest: String,
    description: String,
    created: DateTime<Utc>,
}

impl From<Release> for ReleaseView {
    fn from(r: Release) -> Self {
        Self {
            id: r.id,
            app: r.app,
            build: r.build_id.unwrap_or_default(),
            env: r.env,
            manifest: r.manifest,
            description: r.description,
            created: r.created_at,
        }
    }
}

/// Longest description a client may give a release (every list of releases repeats it).
const MAX_DESCRIPTION: usize = 1000;

/// `POST /apps/{app}/releases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CreateRelease {
    build: Option<String>,
    env: Option<String>,
    description: Option<String>,
    parent_release: Option<String>,
}

/// `POST /apps/{app}/releases/{id}/promote`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRelease {
    #[serde(default)]
    force: bool,
    /// Seconds the rollout may take before it is rolled back.
    timeout: Option<u64>,
    /// Answer with the rollout log itself, until the deployment ends.
    #[serde(default)]
    follow: bool,
    /// With `follow`, start each text line with its event id: a client that loses the
    /// connection resumes from the deployment's own stream after the last id it saw.
    #[serde(default)]
    ids: bool,
    /// Sent by the convox CLI; they have no meaning on this rack.
    development: Option<bool>,
    idle: Option<bool>,
    min: Option<i64>,
    max: Option<i64>,
}

/// `GET /apps/{app}/releases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListReleases {
    limit: Option<i64>,
}

async fn load_release(state: &AppState, app: &str, id: &str) -> ApiResult<Release> {
    releases::get(&state.pool, app, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("release", id.chars().take(40).collect()))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_releases(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListReleases>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<ReleaseView>>> {
    let list = releases::list_for_app(&state.pool, &app.name, list_limit(query.limit)?).await?;
    Ok(Pretty(list.into_iter().map(ReleaseView::from).collect()))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, release.id = %id))]
pub async fn show_release(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<ReleaseView>> {
    Ok(Pretty(load_release(&state, &app.name, &id).await?.into()))
}

/// Creates a release as convox's k8s provider does: what is not given comes from the parent
/// (`parent-release`, else the latest release); a given build also brings its manifest and
/// description; a changed env describes itself (`env add:K change:K remove:K`).
#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn create_release(
    State(state): State<AppState>,
    Path(app): Path<String>,
    Input(body): Input<CreateRelease>,
) -> ApiResult<Response> {
    if let Some(description) = &body.description
        && description.chars().count() > MAX_DESCRIPTION
    {
        return Err(ApiError::Unprocessable(format!(
            "description is {} characters: at most {MAX_DESCRIPTION}",
            description.chars().count()
        )));
    }
    let app = load_app(&state, &app).await?;
    // One transaction, one snapshot: the parent, the build and the new release agree.
    let mut tx = state.pool.begin().await?;
    let parent = match &body.parent_release {
        Some(id) => Some(
            releases::get(&mut *tx, &app.name, id)
                .await?
                .ok_or_else(|| ApiError::NotFound("parent release", id.chars().take(40).collect()))?,
        ),
        None => releases::latest(&mut tx, &app.name).await?,
    };
    let build = match &body.build {
        Some(id) => {
            let build = crate::store::builds::get(&mut *tx, &app.name, id)
                .await?
                .ok_or_else(|| ApiError::NotFound("build", id.chars().take(40).collect()))?;
            if build.status != BuildStatus::Complete {
                return Err(ApiError::Conflict(format!("build {id} is not complete")));
            }
            Some(build)
        }
        None => None,
    };
    let old_env = crate::env::parse(parent.as_ref().map_or("", |p| p.env.as_str())).unwrap_or_default();
    let env = match &body.env {
        Some(text) => {
            let env = crate::env::parse(text).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            crate::env::check_size(&env).map_err(ApiError::Unprocessable)?;
            env
        }
        None => old_env.clone(),
    };
    let build_id = build
        .as_ref()
        .map(|b| b.id.clone())
        .or_else(|| parent.as_ref().and_then(|p| p.build_id.clone()));
    let manifest = match (&build, &parent) {
        (Some(b), _) => b.manifest.clone(),
        (None, Some(p)) => p.manifest.clone(),
        (None, None) => String::new(),
    };
    let description = body.description.clone().unwrap_or_else(|| {
        let change = crate::env::describe_change(&old_env, &env);
        if !change.is_empty() {
            change
        } else {
            build.as_ref().map(|b| b.description.clone()).unwrap_or_default()
        }
    });
    let id = crate::ids::ReleaseId::generate();
    let release = releases::insert(
        &mut tx,
        &NewRelease {
            id: &id,
            app: &app.name,
            build_id: build_id.as_deref(),
            env: &crate::env::format(&env),
            manifest: &manifest,
            description: &description,
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(release.id = %id, app.name = %app.name, "created release {id}");
    let location = format!("/apps/{}/releases/{id}", app.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Pretty(ReleaseView::from(release)),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(app.name = %app, release.id = %id))]
pub async fn promote_release(
    State(state): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    format: Format,
    principal: Option<axum::Extension<crate::auth::Principal>>,
    Input(body): Input<PromoteRelease>,
) -> ApiResult<Response> {
    let app = load_app(&state, &app).await?;
    let release = load_release(&state, &app.name, &id).await?;
    let _ = (body.development, body.idle, body.min, body.max);
    if release.manifest.trim().is_empty() || release.build_id.is_none() {
        return Err(ApiError::Conflict(
            "can not promote a release with an empty manifest".into(),
        ));
    }
    if let Some(active) = &app.release_id
        && let Some(active) = releases::get(&state.pool, &app.name, active).await?
        && release.position < active.position
    {
        return Err(ApiError::Conflict(
            "can not promote an older release, try rollback".into(),
        ));
    }
    let timeout = body.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(1..=86_400).contains(&timeout) {
        return Err(ApiError::BadRequest(format!(
            "timeout must be between 1 and 86400 seconds, got {timeout}"
        )));
    }
    let deployment =
        crate::jobs::deploys::start_deployment(&state, &app.name, &release.id, body.force, timeout).await?;
    let id = deployment.id;
    tracing::info!(deployment.id = %id, app.name = %app.name, "promoting release {} of {}", release.id, app.name);

    let location = format!("/apps/{}/deployments/{id}", app.name);
    let mut response = if body.follow {
        let topic = Topic::Deployment {
            app: app.name.clone(),
            deployment: id,
        };
        let request = StreamRequest {
            ws: None,
            headers,
            query: StreamQuery {
                ids: body.ids,
                ..StreamQuery::default()
            },
            principal: principal.map(|p| p.0),
        };
        let mut response = streams::respond(&state, topic, request, Style::Prefixed, Follow::UntilEnd)?;
        response
            .extensions_mut()
            .insert(crate::api::idempotency::StreamedDeployment(id));
        response
    } else {
        match format {
            Format::Json => (StatusCode::CREATED, Pretty(DeploymentView::from(deployment))).into_response(),
            Format::Text => format.ok(()),
        }
    };
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}
