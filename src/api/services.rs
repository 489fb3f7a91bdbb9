//! `/apps/{app}/services`: the services of the app's release and where each is reached,
//! `scale` (a count that holds for every later deployment too, applied by a deployment of the
//! current release, so it takes the app's deploy lock and rolls back if it fails), `restart`;
//! and `/apps/{app}/balancers`.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::{AppPath, load_app};
use crate::api::deployments::DeploymentView;
use crate::api::input::{Format, Input, Pretty};
use crate::api::releases::DEFAULT_TIMEOUT_SECS;
use crate::error::{ApiError, ApiResult};
use crate::jobs::deploys::{start_deployment_in, woke};

/// A service port, as convox shows it.
#[derive(Debug, Serialize)]
pub struct ServicePort {
    /// The port clients connect to (the router's, or the ingress's 80 or 443).
    balancer: u16,
    certificate: String,
    /// The port the process listens on (its `PORT` is chosen per process by the local runtime).
    container: u16,
}

/// A service, as convox shows it.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    name: String,
    count: u32,
    cpu: u32,
    memory: u32,
    /// Where clients reach it: the router's address, or its main host name.
    domain: String,
    /// Every host name that reaches it (its `domain:` names too); rack's addition.
    domains: Vec<String>,
    ports: Vec<ServicePort>,
}

/// `PUT /apps/{app}/services/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateService {
    count: Option<u32>,
    /// Accepted from convox; the local runtime does not limit resources.
    cpu: Option<u32>,
    memory: Option<u32>,
}

/// The app's release as the runtime runs it (with `scale` counts), or 409 when it has none.
pub(crate) async fn current_spec(
    state: &AppState,
    app: &crate::store::apps::App,
) -> ApiResult<crate::runtime::ReleaseSpec> {
    let release = app
        .release_id
        .as_deref()
        .ok_or_else(|| ApiError::Conflict(format!("app {} has no release yet: deploy one first", app.name)))?;
    Ok(crate::jobs::deploys::load_spec(state, &app.name, release).await?)
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_services(
    State(state): State<AppState>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<ServiceView>>> {
    if app.release_id.is_none() {
        return Ok(Pretty(Vec::new()));
    }
    let spec = current_spec(&state, &app).await?;
    // `convox ssl` reads each port's certificate (the one `ssl update` gave the service).
    let certificates = crate::store::certificates::uses_of_app(&state.pool, &app.name).await?;
    let services = spec
        .manifest
        .services
        .iter()
        .map(|(name, s)| {
            let route = state.runtime.service_route(&app.name, name, s, &spec.env);
            ServiceView {
                name: name.clone(),
                count: s.scale.count_min,
                cpu: s.scale.cpu.unwrap_or(0),
                memory: s.scale.memory.unwrap_or(0),
                domain: route
                    .as_ref()
                    .and_then(|r| r.hosts.first().cloned())
                    .unwrap_or_default(),
                ports: match (&route, s.port) {
                    (Some(route), Some(port)) => vec![ServicePort {
                        balancer: route.port,
                        certificate: certificates
                            .iter()
                            .find(|u| &u.service == name)
                            .map(|u| u.certificate_id.clone())
                            .unwrap_or_default(),
                        container: port,
                    }],
                    _ => Vec::new(),
                },
                domains: route.map(|r| r.hosts).unwrap_or_default(),
            }
        })
        .collect();
    Ok(Pretty(services))
}

#[tracing::instrument(skip_all, fields(app.name = %app, service = %service))]
pub async fn scale_service(
    State(state): State<AppState>,
    Path((app, service)): Path<(String, String)>,
    format: Format,
    Input(body): Input<UpdateService>,
) -> ApiResult<Response> {
    let app = load_app(&state, &app).await?;
    let spec = current_spec(&state, &app).await?;
    if !spec.manifest.services.contains_key(&service) {
        return Err(ApiError::NotFound("service", service));
    }
    let _ = (body.cpu, body.memory);
    let Some(count) = body.count else {
        return Ok(format.ok(serde_json::json!({})));
    };
    if count > crate::manifest::MAX_SCALE_COUNT {
        return Err(ApiError::BadRequest(format!(
            "count must be between 0 and {}, got {count}",
            crate::manifest::MAX_SCALE_COUNT
        )));
    }
    let release = spec.id;
    // The count and the deployment that applies it go together: when another deployment is in
    // progress, the 409 leaves the count as it was.
    let mut tx = state.pool.begin().await?;
    let count_value = i32::try_from(count).unwrap_or(i32::MAX);
    crate::store::scales::set(&mut tx, &app.name, &service, count_value).await?;
    let deployment = start_deployment_in(&state, &mut tx, &app.name, &release, false, DEFAULT_TIMEOUT_SECS).await?;
    tx.commit().await?;
    woke(&state);
    tracing::info!(app.name = %app.name, service = %service, count, "scaling {service} of {} to {count}", app.name);
    let location = format!("/apps/{}/deployments/{}", app.name, deployment.id);
    let mut response = match format {
        Format::Json => (StatusCode::ACCEPTED, Pretty(DeploymentView::from(deployment))).into_response(),
        Format::Text => format.ok(()),
    };
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, service = %service))]
pub async fn restart_service(
    State(state): State<AppState>,
    Path((_, service)): Path<(String, String)>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let processes = super::processes::list(&state, &app.name).await?;
    let ids: Vec<String> = processes
        .into_iter()
        .filter(|p| p.name == service)
        .map(|p| p.id)
        .collect();
    if ids.is_empty() {
        return Err(ApiError::NotFound("service", service));
    }
    for id in &ids {
        match state.runtime.restart_process(&app.name, id).await {
            // Ended since the listing: nothing to restart.
            Ok(()) | Err(crate::runtime::RuntimeError::NoProcess(_)) => {}
            Err(e) => return Err(ApiError::runtime(format!("restarting process {id}"))(e)),
        }
    }
    Ok(format.ok(serde_json::json!({ "restarted": ids })))
}

/// `GET /apps/{app}/balancers`: the app's balancers (convox.yml `balancers:`) as they run, with
/// the address the cluster gave each.
#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_balancers(
    State(state): State<AppState>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<crate::runtime::BalancerInfo>>> {
    let balancers = state
        .runtime
        .balancers(&app.name)
        .await
        .map_err(ApiError::runtime(format!("listing the balancers of {}", app.name)))?;
    Ok(Pretty(balancers))
}
