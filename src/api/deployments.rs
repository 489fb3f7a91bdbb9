//! `/apps/{app}/deployments` and `/apps/{app}/cancel`: the rollouts started by promotes, their
//! state and their live log.

use axum::extract::{Path, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;
use crate::api::apps::AppPath;
use crate::api::builds::list_limit;
use crate::api::input::{Format, Pretty, QueryParams};
use crate::api::streams::{self, StreamRequest, Style};
use crate::deploy::{DeployState, Outcome};
use crate::error::{ApiError, ApiResult};
use crate::events::Follow;
use crate::store::deployments::{self, Deployment};
use crate::store::events::Topic;

/// A deployment.
#[derive(Debug, Serialize)]
pub struct DeploymentView {
    id: Uuid,
    app: String,
    release: crate::ids::ReleaseId,
    previous: Option<crate::ids::ReleaseId>,
    state: DeployState,
    /// `ok` once Running, `error` once Reverted, Failure or Superseded, null before.
    outcome: Option<Outcome>,
    reason: String,
    timeout: i32,
    created: DateTime<Utc>,
    started: Option<DateTime<Utc>>,
    ended: Option<DateTime<Utc>>,
}

impl From<Deployment> for DeploymentView {
    fn from(d: Deployment) -> Self {
        let outcome = d.state.is_terminal().then_some(if d.state == DeployState::Running {
            Outcome::Ok
        } else {
            Outcome::Error
        });
        Self {
            id: d.id,
            app: d.app,
            release: d.release_id,
            previous: d.previous_release_id,
            state: d.state,
            outcome,
            reason: d.reason,
            timeout: d.timeout_secs,
            created: d.created_at,
            started: d.claim.started_at,
            ended: d.claim.ended_at,
        }
    }
}

/// `GET /apps/{app}/deployments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDeployments {
    limit: Option<i64>,
}

fn deployment_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::NotFound("deployment", id.chars().take(40).collect()))
}

/// The deployment `id` of the app named `app` (already loaded), or 404.
async fn load_deployment(state: &AppState, app: &str, id: &str) -> ApiResult<Deployment> {
    deployments::get(&state.pool, app, deployment_id(id)?)
        .await?
        .ok_or_else(|| ApiError::NotFound("deployment", id.to_owned()))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_deployments(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListDeployments>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<DeploymentView>>> {
    let list = deployments::list_for_app(&state.pool, &app.name, list_limit(query.limit)?).await?;
    Ok(Pretty(list.into_iter().map(DeploymentView::from).collect()))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, deployment.id = %id))]
pub async fn show_deployment(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<DeploymentView>> {
    Ok(Pretty(load_deployment(&state, &app.name, &id).await?.into()))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, deployment.id = %id))]
pub async fn stream_deployment_events(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    request: StreamRequest,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let deployment = load_deployment(&state, &app.name, &id).await?;
    let topic = Topic::Deployment {
        app: deployment.app,
        deployment: deployment.id,
    };
    streams::respond(&state, topic, request, Style::Prefixed, Follow::UntilEnd)
}

/// `POST /apps/{app}/cancel`: the running deployment stops and rolls back.
#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn cancel_deployment(
    State(state): State<AppState>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let deployment = deployments::request_cancel(&state.pool, &app.name)
        .await?
        .ok_or_else(|| ApiError::Forbidden("app is not updating".into()))?;
    tracing::info!(deployment.id = %deployment.id, app.name = %app.name, "cancel requested for deployment {}", deployment.id);
    Ok(format.ok(DeploymentView::from(deployment)))
}
