//! An app's resources (convox.yml `resources:`), on the convox wire: `GET
//! /apps/{app}/resources[/{name}]` (the password masked in the URL unless the credential may
//! deploy), `GET|PUT .../data` (export, import), `DELETE` (rack's `rack resources delete`),
//! and the proxy websocket `/proxy/{host}/{port}` that `convox resources proxy` opens: it
//! reaches only a resource the credential may see, anything else is 403 (and audited).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Extension;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::AppState;
use crate::api::apps::{AppPath, load_app};
use crate::api::input::{Format, Pretty};
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult};
use crate::resource::{Credentials, Kind};
use crate::runtime::ResourceEndpoint;
use crate::store::resources::{self as store, Resource};

/// A resource as convox shows it.
#[derive(Debug, Serialize)]
pub struct ResourceView {
    pub name: String,
    /// Its options (`version`, `storage`...).
    pub parameters: BTreeMap<String, String>,
    /// `creating`, `running`, `failed`, or `unlinked` (no longer declared by the release).
    pub status: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// How to reach it (its password masked for a read-only credential); empty while it is
    /// not running.
    pub url: String,
}

/// What stands in for a password a credential may not see.
const MASK: &str = "********";

fn kind_of(row: &Resource) -> ApiResult<Kind> {
    row.kind
        .parse()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("resource {}: {e}", row.name)))
}

fn credentials_of(row: &Resource) -> Credentials {
    Credentials {
        user: row.username.clone(),
        password: row.password.clone(),
        database: row.database.clone(),
    }
}

/// Where a resource is shown to be: where linked processes reach it (the local runtime: a port
/// on 127.0.0.1; Kubernetes: its Service's name).
async fn address(state: &AppState, row: &Resource, kind: Kind) -> Option<(String, u16)> {
    state.runtime.resource_address(&row.app, &row.name, kind).await
}

async fn view(state: &AppState, row: &Resource, reveal: bool) -> ApiResult<ResourceView> {
    let kind = kind_of(row)?;
    let mut credentials = credentials_of(row);
    if !reveal && !credentials.password.is_empty() {
        credentials.password = MASK.to_owned();
    }
    let url = match address(state, row, kind).await {
        Some((host, port)) => crate::resource::url(kind, &credentials, &host, port).replace("%2A", "*"),
        None => String::new(),
    };
    let parameters = row.definition.0["options"]
        .as_object()
        .map(|options| {
            options
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Ok(ResourceView {
        name: row.name.clone(),
        parameters,
        status: row.status.clone(),
        kind: row.kind.clone(),
        url,
    })
}

fn may_deploy(principal: Option<&Principal>) -> bool {
    principal.is_none_or(|p| p.role >= Role::Deploy)
}

async fn load(state: &AppState, app: &str, name: &str) -> ApiResult<Resource> {
    let app = load_app(state, app).await?;
    // Resource names are DNS labels: anything else names nothing (and never reaches SQL).
    let label = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    if name.is_empty() || name.len() > 63 || !name.bytes().all(label) {
        return Err(ApiError::NotFound("resource", name.to_owned()));
    }
    store::get(&state.pool, &app.name, name)
        .await?
        .ok_or_else(|| ApiError::NotFound("resource", name.to_owned()))
}

async fn endpoint(state: &AppState, row: &Resource) -> ApiResult<ResourceEndpoint> {
    state
        .runtime
        .resource_endpoint(&row.app, &row.name)
        .await
        .map_err(ApiError::runtime(format!("reaching resource {}", row.name)))
}

/// `GET /apps/{app}/resources`.
#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_resources(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<ResourceView>>> {
    let reveal = may_deploy(principal.as_deref());
    let mut views = Vec::new();
    for row in store::list(&state.pool, &app.name).await? {
        views.push(view(&state, &row, reveal).await?);
    }
    Ok(Pretty(views))
}

/// `GET /apps/{app}/resources/{name}`.
#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn show_resource(
    State(state): State<AppState>,
    Path((app, name)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
) -> ApiResult<Pretty<ResourceView>> {
    let row = load(&state, &app, &name).await?;
    Ok(Pretty(view(&state, &row, may_deploy(principal.as_deref())).await?))
}

/// `DELETE /apps/{app}/resources/{name}`: stops an unlinked resource and removes its data.
#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn delete_resource(
    State(state): State<AppState>,
    Path((app, name)): Path<(String, String)>,
    format: Format,
) -> ApiResult<Response> {
    let row = load(&state, &app, &name).await?;
    if row.status != "unlinked" {
        return Err(ApiError::Conflict(format!(
            "resource {name} is declared by the release {app} runs: remove it from convox.yml and deploy, \
             then delete it (export its data first: `rack resources export {name} -a {app}`)"
        )));
    }
    state
        .runtime
        .delete_resource(&row.app, &row.name)
        .await
        .map_err(ApiError::runtime(format!("deleting resource {name}")))?;
    store::delete(&state.pool, &row.app, &row.name).await?;
    Ok(format.ok(serde_json::json!({ "deleted": row.name })))
}

/// `GET /apps/{app}/resources/{name}/data`: a plain-SQL dump (postgres) or an RDB (redis).
#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn export_resource(
    State(state): State<AppState>,
    Path((app, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let row = load(&state, &app, &name).await?;
    let kind = kind_of(&row)?;
    let credentials = credentials_of(&row);
    // Dumped next to its server where the runtime does that; else by this host's tools.
    let dumped = state
        .runtime
        .dump_resource(&row.app, &row.name, kind, &credentials)
        .await
        .map_err(ApiError::runtime(format!("dumping resource {}", row.name)))?;
    let body = match dumped {
        Some(stream) => axum::body::Body::from_stream(stream),
        None => crate::resource_data::export(kind, &credentials, endpoint(&state, &row).await?).await?,
    };
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

/// `PUT /apps/{app}/resources/{name}/data`: loads a plain-SQL dump (postgres, postgis, mysql,
/// mariadb) or an RDB file (redis: the runtime restarts redis on it).
#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn import_resource(
    State(state): State<AppState>,
    Path((app, name)): Path<(String, String)>,
    format: Format,
    body: Body,
) -> ApiResult<Response> {
    let row = load(&state, &app, &name).await?;
    let kind = kind_of(&row)?;
    if kind == Kind::Redis {
        import_rdb(&state, &row, body).await?;
        return Ok(format.ok(serde_json::json!({ "imported": row.name })));
    }
    let endpoint = endpoint(&state, &row).await?;
    crate::resource_data::import(kind, &credentials_of(&row), endpoint, body).await?;
    Ok(format.ok(serde_json::json!({ "imported": row.name })))
}

/// Loads an uploaded RDB file into redis resource `row`: refused (422) where the runtime cannot
/// restart redis on a file, or when the upload is not an RDB file; then the runtime replaces the
/// data under the resource's lock (its old data comes back on any failure).
async fn import_rdb(state: &AppState, row: &Resource, body: Body) -> ApiResult<()> {
    if !state.runtime.capabilities().restores_redis {
        return Err(ApiError::Unprocessable(format!(
            "import into redis resources is not supported by the {} runtime: load the data \
             with `rack resources proxy {}` and a redis client",
            state.runtime.name(),
            row.name
        )));
    }
    // In the data directory: the upload may be large, and it lands next to the resource's data.
    let rdb = crate::resource_data::spool_rdb(&state.config.data_dir, body, state.config.max_upload_bytes).await?;
    let options = row.definition.0["options"]
        .as_object()
        .map(|options| {
            options
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let spec = crate::resource::ResourceSpec {
        name: row.name.clone(),
        definition: crate::resource::Definition {
            kind: Kind::Redis,
            options,
            image: None,
        },
        credentials: credentials_of(row),
    };
    state
        .runtime
        .restore_redis(&row.app, &spec, rdb.path())
        .await
        .map_err(|source| ApiError::Runtime {
            context: format!("importing into resource {}", row.name),
            source,
        })
}

/// `/apps/{app}/resources/{name}/console` (websocket): `psql` or `redis-cli` on a terminal
/// (`Height` × `Width`), its input and output as frames; it ends when the client leaves or the
/// console exits.
#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn console_resource(
    State(state): State<AppState>,
    Path((app, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let size = |header: &str, default: u16| -> ApiResult<u16> {
        match crate::api::input::header_text(&headers, header)? {
            None => Ok(default),
            Some(text) => text
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::BadRequest(format!("{header} must be a number from 1 to 65535"))),
        }
    };
    let rows = size("height", 24)?;
    let cols = size("width", 80)?;
    let row = load(&state, &app, &name).await?;
    let kind = kind_of(&row)?;
    let endpoint = endpoint(&state, &row).await?;
    let session = crate::resource_data::console(kind, &credentials_of(&row), endpoint.addr, (rows, cols))?;
    Ok(ws
        .on_upgrade(move |socket| async move {
            let _guard = endpoint.guard;
            console_bridge(socket, session).await;
        })
        .into_response())
}

/// Copies between the websocket and a console until it exits or the client leaves (which
/// kills it: the session is dropped).
async fn console_bridge(socket: WebSocket, session: crate::runtime::ExecSession) {
    let (mut sink, mut source) = socket.split();
    let crate::runtime::ExecSession { mut output, stdin, .. } = session;
    let input = async move {
        let mut stdin = stdin;
        while let Some(Ok(message)) = source.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Text(text) => axum::body::Bytes::from(text),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if let Some(writer) = stdin.as_mut()
                && (writer.write_all(&data).await.is_err() || writer.flush().await.is_err())
            {
                break;
            }
        }
    };
    let output = async {
        while let Some(chunk) = output.next().await {
            if sink.send(Message::Binary(chunk)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    };
    tokio::select! {
        () = input => {},
        () = output => {},
    }
}

/// `/proxy/{host}/{port}` (websocket): the bytes of one TCP connection to a resource the
/// credential may see (an app's; a rack-wide one for an admin), whose URL names `host` and
/// `port`.
#[tracing::instrument(skip_all)]
pub async fn proxy(
    State(state): State<AppState>,
    Path((host, port)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let refused = || ApiError::Forbidden(format!("{host}:{port} is not a resource this credential may reach"));
    let port: u16 = port.parse().map_err(|_| refused())?;
    let mut target = None;
    for row in store::list_all(&state.pool).await? {
        if principal.as_deref().is_some_and(|p| !p.may_use(&row.app)) {
            continue;
        }
        let kind = kind_of(&row)?;
        if address(&state, &row, kind).await == Some((host.clone(), port)) {
            target = Some(row);
            break;
        }
    }
    // A rack-wide resource (`convox rack resources proxy`): an admin's only.
    if target.is_none() && principal.as_deref().is_none_or(|p| p.role >= Role::Admin) {
        for row in crate::store::rack_resources::list(&state.pool).await? {
            let spec = super::rack_resources::spec_of(&row)?;
            let owner = crate::runtime::RACK_OWNER;
            let kind = spec.definition.kind;
            if state.runtime.resource_address(owner, &row.name, kind).await == Some((host.clone(), port)) {
                target = Some(Resource {
                    app: owner.to_owned(),
                    name: row.name,
                    kind: row.kind,
                    definition: sqlx::types::Json(serde_json::Value::Null),
                    username: row.username,
                    password: row.password,
                    database: row.database,
                    status: row.status,
                    created_at: row.created_at,
                    updated_at: row.updated_at,
                });
                break;
            }
        }
    }
    let row = target.ok_or_else(refused)?;
    let endpoint = endpoint(&state, &row).await?;
    let stream = tokio::net::TcpStream::connect(endpoint.addr)
        .await
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context(format!("connecting to {}", row.name))))?;
    Ok(ws
        .on_upgrade(move |socket| async move {
            let _guard = endpoint.guard;
            bridge(socket, stream, endpoint.addr).await;
        })
        .into_response())
}

/// Copies between the websocket and the TCP connection until either side ends.
async fn bridge(socket: WebSocket, stream: tokio::net::TcpStream, addr: SocketAddr) {
    let (mut sink, mut source) = socket.split();
    let (mut reader, mut writer) = stream.into_split();
    let upstream = async {
        while let Some(Ok(message)) = source.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Text(text) => axum::body::Bytes::from(text),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if writer.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = axum::body::Bytes::copy_from_slice(&buffer[..n]);
                    if sink.send(Message::Binary(chunk)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    tokio::select! {
        () = upstream => {},
        () = downstream => {},
    }
    tracing::debug!("proxy to {addr} closed");
}
