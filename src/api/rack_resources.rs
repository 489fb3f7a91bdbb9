//! Rack-wide resources on the convox wire (`convox rack resources ...`): `GET|POST /resources`,
//! `OPTIONS /resources` (the types and their options), `GET|PUT|DELETE /resources/{name}`,
//! `POST /resources/{name}/links` (form `app`) and `DELETE /resources/{name}/links/{app}`.
//! A rack-wide resource is a server like an app's resource (the same kinds, options and
//! credentials), created at once by the rack (not by a deployment) and owned by it: its writes
//! need the admin role, and only an admin sees its password. Linking it to an app lets that
//! app's services name it in their `resources:`; they get its variables on the next deployment.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::load_app;
use crate::api::input::{Input, Pretty};
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult};
use crate::resource::{Credentials, Definition, Kind, ResourceSpec};
use crate::runtime::RACK_OWNER;
use crate::store::rack_resources::{self as store, Deleted, NewRackResource, RackResource};

/// A rack-wide resource as convox shows it.
#[derive(Debug, Serialize)]
pub struct RackResourceView {
    pub name: String,
    /// Its options (`memory`, `version`, `storage`).
    pub parameters: BTreeMap<String, String>,
    /// `creating`, `running` or `failed`.
    pub status: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// How to reach it (the password masked below admin); empty while it is not running.
    pub url: String,
    /// The apps it is linked to (left out when none, as convox does).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<LinkedApp>,
}

/// An app a rack-wide resource is linked to.
#[derive(Debug, Serialize)]
pub struct LinkedApp {
    pub name: String,
}

/// A type of `OPTIONS /resources`.
#[derive(Debug, Serialize)]
pub struct ResourceType {
    pub name: &'static str,
    pub parameters: Vec<ResourceParameter>,
}

/// One option of a type.
#[derive(Debug, Serialize)]
pub struct ResourceParameter {
    pub default: &'static str,
    pub description: &'static str,
    pub name: &'static str,
}

/// `POST /resources` (the convox SDK's form).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateResource {
    kind: String,
    name: Option<String>,
    /// `key=value&...`, URL-encoded (how the convox SDK sends a map).
    parameters: Option<String>,
}

/// `PUT /resources/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateResource {
    parameters: Option<String>,
}

/// `POST /resources/{name}/links`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkResource {
    app: String,
}

/// What stands in for a password a credential may not see.
const MASK: &str = "********";

/// Length of a generated password (as an app resource's).
const PASSWORD_LEN: usize = 32;

/// What an option means, for `OPTIONS /resources`.
fn describe(key: &str) -> (&'static str, &'static str) {
    match key {
        "memory" => ("64", "memory budget of the server, in MB (16 to 65536)"),
        "storage" => ("", "storage, in GB (Kubernetes racks size the volume with it)"),
        "version" => ("", "server version (the local runtime runs this host's)"),
        _ => ("", ""),
    }
}

/// The runtime's spec of a stored rack-wide resource.
///
/// # Errors
/// When its stored type is unknown.
pub fn spec_of(row: &RackResource) -> ApiResult<ResourceSpec> {
    let kind: Kind = row
        .kind
        .parse()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("rack resource {}: {e}", row.name)))?;
    Ok(ResourceSpec {
        name: row.name.clone(),
        definition: Definition {
            kind,
            options: row.options.0.clone(),
            image: None,
        },
        credentials: Credentials {
            user: row.username.clone(),
            password: row.password.clone(),
            database: row.database.clone(),
        },
    })
}

async fn view(state: &AppState, row: &RackResource, reveal: bool) -> ApiResult<RackResourceView> {
    let spec = spec_of(row)?;
    let mut credentials = spec.credentials;
    if !reveal && !credentials.password.is_empty() {
        credentials.password = MASK.to_owned();
    }
    let kind = spec.definition.kind;
    let url = match state.runtime.resource_address(RACK_OWNER, &row.name, kind).await {
        Some((host, port)) => crate::resource::url(kind, &credentials, &host, port).replace("%2A", "*"),
        None => String::new(),
    };
    Ok(RackResourceView {
        name: row.name.clone(),
        parameters: row.options.0.clone(),
        status: row.status.clone(),
        kind: row.kind.clone(),
        url,
        apps: row.apps.iter().map(|name| LinkedApp { name: name.clone() }).collect(),
    })
}

fn is_admin(principal: Option<&Principal>) -> bool {
    principal.is_none_or(|p| p.role >= Role::Admin)
}

/// Refuses writes where the runtime cannot run rack-wide resources.
fn runs_here(state: &AppState) -> ApiResult<()> {
    if state.runtime.capabilities().runs_rack_resources {
        Ok(())
    } else {
        Err(ApiError::NotImplemented(format!(
            "rack-wide resources are supported on the local runtime only (this rack runs the {} \
             runtime): declare the resource in the app's convox.yml `resources:` instead",
            state.runtime.name()
        )))
    }
}

async fn load(state: &AppState, name: &str) -> ApiResult<RackResource> {
    let label = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    if name.is_empty() || name.len() > 63 || !name.bytes().all(label) {
        return Err(ApiError::NotFound("resource", name.to_owned()));
    }
    store::get(&state.pool, name)
        .await?
        .ok_or_else(|| ApiError::NotFound("resource", name.to_owned()))
}

/// The options of `parameters` (`key=value&...`) for `kind`, each checked as in convox.yml.
fn options(kind: Kind, parameters: Option<&str>) -> ApiResult<BTreeMap<String, String>> {
    let mut options = BTreeMap::new();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(parameters.unwrap_or_default())
        .map_err(|e| ApiError::BadRequest(format!("parameters: {e}")))?;
    for (key, value) in pairs {
        let allowed = crate::manifest::options_of(kind);
        if !allowed.contains(&key.as_str()) {
            return Err(ApiError::Unprocessable(format!(
                "unknown option {key:?} of a {kind} resource: it takes {}",
                allowed.join(", ")
            )));
        }
        let value = value.trim().to_owned();
        crate::manifest::check_option(&key, &value)
            .map_err(|why| ApiError::Unprocessable(format!("option {key}: {why}")))?;
        options.insert(key, value);
    }
    Ok(options)
}

/// Starts (or restarts) the server of `row`, recording whether it came up.
async fn ensure(state: &AppState, row: &RackResource, restart: bool) -> ApiResult<()> {
    let spec = spec_of(row)?;
    let result = state.runtime.ensure_rack_resource(&spec, restart).await;
    let status = if result.is_ok() { "running" } else { "failed" };
    store::set_status(&state.pool, &row.name, status).await?;
    result.map_err(|source| ApiError::Runtime {
        context: format!("starting rack resource {}", row.name),
        source,
    })
}

/// Brings every rack-wide resource back: at startup (the local runtime's servers do not outlive
/// a reboot) and after a restore, when each one is created anew and loads the backup's export
/// first. Records whether each came up; returns whether all did.
pub async fn ensure_all(state: &AppState) -> bool {
    if !state.runtime.capabilities().runs_rack_resources {
        return true;
    }
    let rows = match store::list(&state.pool).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "listing the rack-wide resources to bring back");
            return false;
        }
    };
    let mut all = true;
    for row in rows {
        if let Err(e) = ensure(state, &row, false).await {
            tracing::warn!(resource.name = %row.name, "bringing back rack-wide resource {}: {e}", row.name);
            all = false;
        }
    }
    all
}

/// `GET /resources`.
#[tracing::instrument(skip_all)]
pub async fn list_rack_resources(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> ApiResult<Pretty<Vec<RackResourceView>>> {
    let reveal = is_admin(principal.as_deref());
    let mut views = Vec::new();
    for row in store::list(&state.pool).await? {
        views.push(view(&state, &row, reveal).await?);
    }
    Ok(Pretty(views))
}

/// `GET /resources/{name}`.
#[tracing::instrument(skip_all)]
pub async fn show_rack_resource(
    State(state): State<AppState>,
    Path(name): Path<String>,
    principal: Option<Extension<Principal>>,
) -> ApiResult<Pretty<RackResourceView>> {
    let row = load(&state, &name).await?;
    Ok(Pretty(view(&state, &row, is_admin(principal.as_deref())).await?))
}

/// `OPTIONS /resources`: the types and their options.
#[tracing::instrument(skip_all)]
pub async fn list_rack_resource_types() -> Pretty<Vec<ResourceType>> {
    let mut types: Vec<ResourceType> = Kind::ALL
        .iter()
        .map(|kind| ResourceType {
            name: kind.as_str(),
            parameters: crate::manifest::options_of(*kind)
                .iter()
                .map(|key| {
                    let (default, description) = describe(key);
                    ResourceParameter {
                        default,
                        description,
                        name: key,
                    }
                })
                .collect(),
        })
        .collect();
    types.sort_by_key(|t| t.name);
    Pretty(types)
}

/// `POST /resources`: creates the resource and starts its server at once.
#[tracing::instrument(skip_all)]
pub async fn create_rack_resource(
    State(state): State<AppState>,
    Input(body): Input<CreateResource>,
) -> ApiResult<Pretty<RackResourceView>> {
    let kind: Kind = body
        .kind
        .trim()
        .parse()
        .map_err(|e: crate::resource::UnknownKind| ApiError::Unprocessable(e.to_string()))?;
    let options = options(kind, body.parameters.as_deref())?;
    let name = match body.name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.to_owned(),
        // convox names an unnamed one after its type.
        _ => format!("{kind}-{}", crate::ids::random_token(6).to_ascii_lowercase()),
    };
    let label_ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.len() <= crate::manifest::MAX_RESOURCE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if !label_ok {
        return Err(ApiError::Unprocessable(format!(
            "invalid resource name {name:?}: use lowercase letters, digits and '-', starting with a letter \
             (at most {})",
            crate::manifest::MAX_RESOURCE_NAME
        )));
    }
    runs_here(&state)?;
    let password = if kind.has_credentials() {
        crate::ids::random_token(PASSWORD_LEN)
    } else {
        String::new()
    };
    let (username, database) = match kind {
        Kind::Postgres | Kind::Postgis | Kind::Mysql | Kind::Mariadb => ("app", "app"),
        Kind::Redis => ("default", "0"),
        Kind::Memcached => ("", ""),
    };
    let new = NewRackResource {
        name: &name,
        kind: kind.as_str(),
        options: &options,
        username,
        password: &password,
        database,
    };
    if !store::create(&state.pool, &new).await? {
        return Err(ApiError::Conflict(format!("a rack resource named {name} exists")));
    }
    let row = load(&state, &name).await?;
    ensure(&state, &row, false).await?;
    let row = load(&state, &name).await?;
    Ok(Pretty(view(&state, &row, true).await?))
}

/// `PUT /resources/{name}`: new options; the server restarts on them.
#[tracing::instrument(skip_all)]
pub async fn update_rack_resource(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Input(body): Input<UpdateResource>,
) -> ApiResult<Pretty<RackResourceView>> {
    let row = load(&state, &name).await?;
    let kind = spec_of(&row)?.definition.kind;
    let mut options = row.options.0.clone();
    options.extend(self::options(kind, body.parameters.as_deref())?);
    runs_here(&state)?;
    store::set_options(&state.pool, &name, &options).await?;
    let row = load(&state, &name).await?;
    ensure(&state, &row, true).await?;
    let row = load(&state, &name).await?;
    Ok(Pretty(view(&state, &row, true).await?))
}

/// `DELETE /resources/{name}`: stops it and removes its data; refused (409) while an app is
/// linked to it.
#[tracing::instrument(skip_all)]
pub async fn delete_rack_resource(
    State(state): State<AppState>,
    Path(name): Path<String>,
    format: crate::api::input::Format,
) -> ApiResult<axum::response::Response> {
    load(&state, &name).await?;
    match store::delete_unlinked(&state.pool, &name).await? {
        Deleted::Missing => return Err(ApiError::NotFound("resource", name)),
        Deleted::Linked(apps) => {
            return Err(ApiError::Conflict(format!(
                "rack resource {name} is linked to {}: unlink it first (`rack rack resources unlink {name} -a APP`)",
                apps.join(", ")
            )));
        }
        Deleted::Gone => {}
    }
    if state.runtime.capabilities().runs_rack_resources {
        state
            .runtime
            .delete_resource(RACK_OWNER, &name)
            .await
            .map_err(|source| ApiError::Runtime {
                context: format!("deleting rack resource {name}"),
                source,
            })?;
    }
    Ok(format.ok(serde_json::json!({ "deleted": name })))
}

/// `POST /resources/{name}/links` (form `app`): the app's services may name it in their
/// `resources:` from its next build and deployment.
#[tracing::instrument(skip_all)]
pub async fn link_rack_resource(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Input(body): Input<LinkResource>,
) -> ApiResult<Pretty<RackResourceView>> {
    let row = load(&state, &name).await?;
    let app = load_app(&state, body.app.trim()).await?;
    store::link(&state.pool, &row.name, &app.name).await?;
    let row = load(&state, &name).await?;
    Ok(Pretty(view(&state, &row, true).await?))
}

/// `DELETE /resources/{name}/links/{app}`: its services lose it from the next deployment (one
/// that still names it fails, saying so).
#[tracing::instrument(skip_all)]
pub async fn unlink_rack_resource(
    State(state): State<AppState>,
    Path((name, app)): Path<(String, String)>,
) -> ApiResult<Pretty<RackResourceView>> {
    let row = load(&state, &name).await?;
    let app = load_app(&state, &app).await?;
    if !store::unlink(&state.pool, &row.name, &app.name).await? {
        return Err(ApiError::NotFound("link", format!("{name} to {}", app.name)));
    }
    let row = load(&state, &name).await?;
    Ok(Pretty(view(&state, &row, true).await?))
}
