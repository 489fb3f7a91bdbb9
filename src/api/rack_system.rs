//! The rack itself, as convox's `rack` commands see it: `PUT /system` (`rack params set`),
//! `GET /system/processes` (`rack ps`), `GET /system/releases` (`rack releases`) and
//! `GET /instances` (`instances`). `GET /system` itself is in `system`.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::Parameters;
use crate::api::input::{Format, Input, Pretty, QueryParams};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::runtime::{InstanceInfo, ProcessInfo};

/// `PUT /system`, with the fields convox's `SystemUpdateOptions` may send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSystem {
    parameters: Option<Parameters>,
    /// Accepted and ignored: rack has no parameter whose change needs forcing.
    #[serde(default)]
    force: bool,
    count: Option<String>,
    r#type: Option<String>,
    version: Option<String>,
}

/// Sets rack parameters (`rack params set Key=Value ...`): only those rack reads while it runs
/// (`rack_params::SETTINGS`); an empty value goes back to the environment's. Anything else is
/// 422 and nothing changes.
#[tracing::instrument(skip_all)]
pub async fn update_system(
    State(state): State<AppState>,
    format: Format,
    Input(body): Input<UpdateSystem>,
) -> ApiResult<Response> {
    let _ = body.force;
    if body.version.is_some() || body.r#type.is_some() || body.count.is_some() {
        return Err(ApiError::Unprocessable(
            "rack does not update or scale itself through its API: to change its version, replace \
             its binary and restart it (README, Running rack on a server); its capacity is its host \
             or cluster"
                .into(),
        ));
    }
    // A malformed pair is refused as an unknown name is: 422, naming it. None at all: nothing
    // to change.
    let parameters = body
        .parameters
        .map(Parameters::into_map)
        .transpose()
        .map_err(|e| match e {
            ApiError::BadRequest(message) => ApiError::Unprocessable(message),
            e => e,
        })?
        .unwrap_or_default();
    let mut changes = BTreeMap::new();
    for (name, value) in parameters {
        let Some(setting) = crate::rack_params::setting(&name) else {
            let settable: Vec<&str> = crate::rack_params::SETTINGS.iter().map(|s| s.name).collect();
            return Err(ApiError::Unprocessable(format!(
                "{name} is not a parameter rack can change while it runs (settable: {}); the rest of \
                 its configuration is its environment (README, Configuration)",
                settable.join(", ")
            )));
        };
        let value = if value.is_empty() {
            None
        } else {
            Some(setting.parse(&value).map_err(ApiError::Unprocessable)?.to_string())
        };
        changes.insert(name, value);
    }
    crate::store::rack_system::set_params(&state.pool, &changes).await?;
    tracing::info!(parameters = ?changes.keys().collect::<Vec<_>>(), "rack parameters changed");
    Ok(format.ok(crate::api::system::system(&state).await?))
}

/// `GET /system/processes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSystemProcesses {
    /// Also every app's processes.
    #[serde(default)]
    all: bool,
}

/// rack's own processes (every live replica sharing this database, oldest first), then with
/// `all=true` every app's processes the credential may see.
#[tracing::instrument(skip_all)]
pub async fn list_system_processes(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<ListSystemProcesses>,
) -> ApiResult<Pretty<Vec<ProcessInfo>>> {
    let mut replicas = crate::store::replicas::live(&state.pool, crate::jobs::replicas::stale_after(&state)).await?;
    // Before this server's first heartbeat lands (or when a slow database missed one), it still
    // answers, so it lists itself.
    if !replicas.iter().any(|r| r.id == state.replica) {
        replicas.push(crate::jobs::replicas::this(&state));
    }
    let mut processes: Vec<ProcessInfo> = replicas.iter().map(rack_process).collect();
    if query.all {
        processes.extend(app_processes(&state, &principal).await?);
    }
    Ok(Pretty(processes))
}

/// A rack server, as a process: its id names the replica (`rack-` and the start of its id).
fn rack_process(replica: &crate::store::replicas::Replica) -> ProcessInfo {
    ProcessInfo {
        id: crate::store::replicas::process_id(replica.id),
        app: String::new(),
        command: "rack server".to_owned(),
        cpu: 0.0,
        memory: 0.0,
        host: replica.host.clone(),
        image: String::new(),
        instance: String::new(),
        name: "rack".to_owned(),
        ports: vec![replica.port.to_string()],
        release: replica.version.clone(),
        started: replica.started_at,
        status: crate::runtime::ProcessStatus::Running,
        pid: u32::try_from(replica.pid).unwrap_or_default(),
        kind: crate::runtime::ProcessKind::Service,
    }
}

/// Every process of the apps `principal` may see, by app, then service, then id.
async fn app_processes(state: &AppState, principal: &Principal) -> ApiResult<Vec<ProcessInfo>> {
    let mut processes = Vec::new();
    for app in crate::store::apps::list(&state.pool).await? {
        if principal.apps.as_ref().is_some_and(|apps| !apps.contains(&app.name)) {
            continue;
        }
        let mut of_app = crate::api::processes::list(state, &app.name).await?;
        of_app.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        processes.extend(of_app);
    }
    Ok(processes)
}

/// A version of rack that ran on this database, as convox shows a rack's release.
#[derive(Debug, Serialize)]
pub struct SystemRelease {
    /// The version.
    id: String,
    app: String,
    build: String,
    env: String,
    manifest: String,
    description: String,
    /// When it last started.
    created: DateTime<Utc>,
}

/// `GET /system/releases`: the versions of rack that ran on this database, the most recently
/// started first.
#[tracing::instrument(skip_all)]
pub async fn list_system_releases(State(state): State<AppState>) -> ApiResult<Pretty<Vec<SystemRelease>>> {
    let versions = crate::store::rack_system::versions(&state.pool).await?;
    Ok(Pretty(
        versions
            .into_iter()
            .map(|v| SystemRelease {
                description: format!(
                    "rack {} (first started {})",
                    v.version,
                    v.first_started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                id: v.version,
                app: String::new(),
                build: String::new(),
                env: String::new(),
                manifest: String::new(),
                created: v.last_started_at,
            })
            .collect(),
    ))
}

/// `GET /instances`: this host on the local runtime, the cluster's nodes on Kubernetes, each
/// with the apps' processes on it (a credential limited to some apps: 403, as the machines are
/// the whole rack's).
#[tracing::instrument(skip_all)]
pub async fn list_instances(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Pretty<Vec<InstanceInfo>>> {
    if principal.apps.is_some() {
        return Err(ApiError::Forbidden(
            "this credential is limited to some apps; /instances shows the whole rack's machines".into(),
        ));
    }
    let mut instances = state
        .runtime
        .instances()
        .await
        .map_err(ApiError::runtime("listing the rack's instances"))?;
    let processes = app_processes(&state, &principal).await?;
    let single = instances.len() == 1;
    for instance in &mut instances {
        instance.processes = processes.iter().filter(|p| single || p.instance == instance.id).count();
    }
    Ok(Pretty(instances))
}
