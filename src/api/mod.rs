//! The HTTP API. This file is the only place that wires paths to handlers and applies layers;
//! each resource module owns its handlers and DTOs. `route_table()` lists every route so a
//! test can hold `openapi.yaml` to it.

pub mod app_metrics;
pub mod apps;
pub mod audit;
pub mod backup;
pub mod build_transfer;
pub mod builds;
pub mod certificates;
pub mod dashboard;
pub mod deployments;
pub mod diff;
pub mod disk;
pub mod feed;
pub mod files;
pub mod idempotency;
pub mod input;
pub mod limits;
pub mod metric_history;
pub mod objects;
pub mod origin;
pub mod processes;
pub mod rack_resources;
pub mod rack_system;
pub mod registries;
pub mod releases;
pub mod resources;
pub mod run;
pub mod services;
pub mod streams;
pub mod system;
pub mod system_logs;
pub mod tokens;
pub mod webhooks;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::AppState;
use crate::auth::Role;
use crate::error::{ApiError, ErrorMessage};

/// Longest time a JSON request may take. Streams and uploads have no such limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest form or JSON body.
const MAX_JSON_BODY: usize = 4 * 1024 * 1024;

static REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// Every route: its method, path, who may call it (and whether it honours `Idempotency-Key`),
/// its kind and its handler. The only place paths are wired, and the only place their policy
/// is written.
fn routes() -> Routes {
    use Method as M;
    Routes::default()
        .json(M::GET, "/", READ, dashboard::root)
        .json(M::GET, "/system", READ, system::show_system)
        .json(M::PUT, "/system", ADMIN, rack_system::update_system)
        .json(M::GET, "/system/processes", READ, rack_system::list_system_processes)
        .json(M::GET, "/system/releases", READ, rack_system::list_system_releases)
        .json(M::GET, "/instances", READ, rack_system::list_instances)
        .stream(M::GET, "/system/logs", ADMIN.audited(), system_logs::stream_system_logs)
        .json(M::GET, "/auth", READ, system::check_auth)
        .json(M::GET, "/apps", READ, apps::list_apps)
        .json(M::POST, "/apps", ADMIN.idempotent(), apps::create_app)
        .json(M::GET, "/apps/{app}", READ, apps::show_app)
        .json(M::PUT, "/apps/{app}", ADMIN, apps::update_app)
        .json(M::DELETE, "/apps/{app}", ADMIN, apps::delete_app)
        .json(M::GET, "/apps/{app}/objects", READ, objects::list_objects)
        .upload(
            M::POST,
            "/apps/{app}/objects",
            DEPLOY.idempotent(),
            objects::upload_object_anonymous,
        )
        .upload(
            M::POST,
            "/apps/{app}/objects/",
            DEPLOY.idempotent(),
            objects::upload_object_anonymous,
        )
        .upload(
            M::POST,
            "/apps/{app}/objects/{*key}",
            DEPLOY.idempotent(),
            objects::upload_object,
        )
        .stream(M::GET, "/apps/{app}/objects/{*key}", READ, objects::download_object)
        .json(M::HEAD, "/apps/{app}/objects/{*key}", READ, objects::head_object)
        .json(M::DELETE, "/apps/{app}/objects/{*key}", DEPLOY, objects::delete_object)
        .json(M::GET, "/apps/{app}/builds", READ, builds::list_builds)
        .json(M::POST, "/apps/{app}/builds", DEPLOY.idempotent(), builds::create_build)
        // Streams: `{id}.tgz` is the build's archive (`convox builds export`).
        .stream(M::GET, "/apps/{app}/builds/{id}", READ, builds::show_build)
        .alias(M::GET, "/apps/{app}/builds/{id}.tgz", READ)
        .upload(
            M::POST,
            "/apps/{app}/builds/import",
            DEPLOY,
            build_transfer::import_build,
        )
        .json(M::PUT, "/apps/{app}/builds/{id}", DEPLOY, builds::update_build)
        .json(M::POST, "/apps/{app}/builds/{id}/cancel", DEPLOY, builds::cancel_build)
        .stream(
            M::GET,
            "/apps/{app}/builds/{id}/logs",
            READ.audited(),
            builds::stream_build_logs,
        )
        .json(M::GET, "/apps/{app}/releases", READ, releases::list_releases)
        .json(
            M::POST,
            "/apps/{app}/releases",
            DEPLOY.idempotent(),
            releases::create_release,
        )
        .json(M::GET, "/apps/{app}/releases/{id}", READ, releases::show_release)
        .json(
            M::GET,
            "/apps/{app}/releases/{id}/diff/{other}",
            READ,
            diff::diff_releases,
        )
        .stream(
            M::POST,
            "/apps/{app}/releases/{id}/promote",
            DEPLOY.idempotent(),
            releases::promote_release,
        )
        .json(M::GET, "/apps/{app}/deployments", READ, deployments::list_deployments)
        .json(
            M::GET,
            "/apps/{app}/deployments/{id}",
            READ,
            deployments::show_deployment,
        )
        .stream(
            M::GET,
            "/apps/{app}/deployments/{id}/events",
            READ.audited(),
            deployments::stream_deployment_events,
        )
        .json(M::POST, "/apps/{app}/cancel", DEPLOY, deployments::cancel_deployment)
        .json(M::GET, "/apps/{app}/processes", READ, processes::list_processes)
        .json(M::GET, "/apps/{app}/processes/{id}", READ, processes::show_process)
        .json(
            M::DELETE,
            "/apps/{app}/processes/{id}",
            DEPLOY,
            processes::restart_process,
        )
        .stream(
            M::GET,
            "/apps/{app}/processes/{id}/exec",
            DEPLOY.audited(),
            run::exec_process,
        )
        .json(
            M::POST,
            "/apps/{app}/services/{service}/processes",
            DEPLOY,
            run::run_process,
        )
        // `convox cp` (files in a process) and per-service metrics.
        .upload(M::POST, "/apps/{app}/processes/{id}/files", DEPLOY, files::upload_files)
        .stream(
            M::GET,
            "/apps/{app}/processes/{id}/files",
            DEPLOY.audited(),
            files::download_files,
        )
        .json(
            M::DELETE,
            "/apps/{app}/processes/{id}/files",
            DEPLOY,
            files::delete_files,
        )
        .json(M::GET, "/apps/{app}/metrics", READ, app_metrics::app_metrics)
        .json(
            M::GET,
            "/apps/{app}/services/{service}/metrics",
            READ,
            app_metrics::service_metrics,
        )
        .stream(M::GET, "/apps/{app}/logs", READ.audited(), processes::stream_app_logs)
        .stream(
            M::GET,
            "/apps/{app}/services/{service}/logs",
            READ.audited(),
            processes::stream_service_logs,
        )
        .json(M::GET, "/apps/{app}/budget", READ, processes::show_budget)
        .json(M::GET, "/apps/{app}/services", READ, services::list_services)
        .json(M::GET, "/apps/{app}/balancers", READ, services::list_balancers)
        .json(
            M::PUT,
            "/apps/{app}/services/{service}",
            DEPLOY,
            services::scale_service,
        )
        .json(
            M::POST,
            "/apps/{app}/services/{service}/restart",
            DEPLOY,
            services::restart_service,
        )
        .json(M::GET, "/apps/{app}/resources", READ, resources::list_resources)
        .json(M::GET, "/apps/{app}/resources/{name}", READ, resources::show_resource)
        .json(
            M::DELETE,
            "/apps/{app}/resources/{name}",
            DEPLOY,
            resources::delete_resource,
        )
        .stream(
            M::GET,
            "/apps/{app}/resources/{name}/data",
            DEPLOY.audited(),
            resources::export_resource,
        )
        .upload(
            M::PUT,
            "/apps/{app}/resources/{name}/data",
            DEPLOY,
            resources::import_resource,
        )
        .stream(
            M::GET,
            "/apps/{app}/resources/{name}/console",
            DEPLOY.audited(),
            resources::console_resource,
        )
        .stream(M::GET, "/proxy/{host}/{port}", DEPLOY.audited(), resources::proxy)
        .json(M::GET, "/resources", READ, rack_resources::list_rack_resources)
        .json(M::OPTIONS, "/resources", READ, rack_resources::list_rack_resource_types)
        .json(M::POST, "/resources", ADMIN, rack_resources::create_rack_resource)
        .json(M::GET, "/resources/{name}", READ, rack_resources::show_rack_resource)
        .json(M::PUT, "/resources/{name}", ADMIN, rack_resources::update_rack_resource)
        .json(
            M::DELETE,
            "/resources/{name}",
            ADMIN,
            rack_resources::delete_rack_resource,
        )
        .json(
            M::POST,
            "/resources/{name}/links",
            ADMIN,
            rack_resources::link_rack_resource,
        )
        .json(
            M::DELETE,
            "/resources/{name}/links/{app}",
            ADMIN,
            rack_resources::unlink_rack_resource,
        )
        .stream(M::GET, "/events", READ, feed::stream_feed)
        .stream(M::GET, "/apps/{app}/events", READ, feed::stream_app_feed)
        .json(M::GET, "/metrics", READ, system::show_metrics)
        .stream(M::GET, "/system/backup", ADMIN.audited(), backup::download_backup)
        .json(M::GET, "/system/usage", READ, disk::show_usage)
        .json(M::GET, "/audit", ADMIN, audit::list_audit)
        // Certificates (`convox certs`, `ssl`): keys sealed, never shown; in use, not deleted.
        .json(M::GET, "/certificates", READ, certificates::list_certificates)
        .json(M::POST, "/certificates", ADMIN, certificates::import_certificate)
        .json(
            M::POST,
            "/certificates/generate",
            ADMIN,
            certificates::generate_certificate,
        )
        .json(M::DELETE, "/certificates/{id}", ADMIN, certificates::delete_certificate)
        .json(
            M::POST,
            "/certificates/{id}/renew",
            ADMIN,
            certificates::renew_certificate,
        )
        .json(M::GET, "/apps/{app}/ssl", READ, certificates::list_ssl)
        .json(
            M::PUT,
            "/apps/{app}/ssl/{service}/{port}",
            ADMIN,
            certificates::apply_certificate,
        )
        .json(
            M::DELETE,
            "/apps/{app}/ssl/{service}/{port}",
            ADMIN,
            certificates::remove_certificate,
        )
        // Private registries (`convox registries`): the server may hold `/` (`host/path`).
        .json(M::GET, "/registries", ADMIN, registries::list_registries)
        .json(M::POST, "/registries", ADMIN, registries::add_registry)
        .json(M::DELETE, "/registries/{*server}", ADMIN, registries::remove_registry)
        .json(M::GET, "/tokens", ADMIN, tokens::list_tokens)
        .json(M::POST, "/tokens", ADMIN, tokens::create_token)
        .json(M::DELETE, "/tokens/{id}", ADMIN, tokens::delete_token)
        .json(M::GET, "/webhooks", ADMIN, webhooks::list_hooks)
        // Not idempotent: a replayed answer would keep the hook's secret in Postgres (as tokens).
        .json(M::POST, "/webhooks", ADMIN, webhooks::create_hook)
        .json(M::GET, "/webhooks/{id}", ADMIN, webhooks::show_hook)
        .json(M::DELETE, "/webhooks/{id}", ADMIN, webhooks::delete_hook)
        .json(M::GET, "/webhooks/{id}/deliveries", ADMIN, webhooks::list_deliveries)
        .json(
            M::POST,
            "/webhooks/{id}/deliveries/{delivery}/redeliver",
            ADMIN,
            webhooks::redeliver,
        )
}

/// Who may call a route, and whether it honours `Idempotency-Key` (POSTs that create things:
/// a retry with the same key gets the first answer and starts nothing new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub role: Role,
    pub idempotent: bool,
    /// Whether each request is written to the audit log (every request that changes
    /// something is; streams say so with `audited()`).
    pub audited: bool,
}

impl Policy {
    const fn idempotent(self) -> Self {
        Self {
            idempotent: true,
            ..self
        }
    }

    const fn audited(self) -> Self {
        Self { audited: true, ..self }
    }
}

/// Reading: any credential.
const READ: Policy = Policy {
    role: Role::Read,
    idempotent: false,
    audited: false,
};
/// Shipping code: upload, build, release, promote, cancel, restart.
const DEPLOY: Policy = Policy {
    role: Role::Deploy,
    idempotent: false,
    audited: false,
};
/// Managing the rack: apps, tokens.
const ADMIN: Policy = Policy {
    role: Role::Admin,
    idempotent: false,
    audited: false,
};

/// One line of the route table.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    pub method: Method,
    pub path: &'static str,
    pub policy: Policy,
}

/// The API with its layers, ready to serve.
pub fn router(state: AppState) -> Router {
    let auth = middleware::from_fn_with_state(state.clone(), crate::auth::require_auth);
    let Routes { router, table } = routes();
    let policies: Policies = Arc::new(table.into_iter().map(|r| ((r.method, r.path), r.policy)).collect());
    router
        // After routing (it needs the matched path) and after authentication.
        .route_layer(middleware::from_fn_with_state((state.clone(), policies), guard))
        .fallback(unknown_route)
        // Layers run outside-in from the last one added: request id, trace, error rendering,
        // cross-site refusal (before a credential a browser attached is even looked at), auth.
        .layer(auth)
        .layer(middleware::from_fn(origin::refuse_cross_site))
        .layer(middleware::from_fn(render_errors))
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

/// The route table (method, path, policy of every route), for the tests that hold the
/// OpenAPI document and the role checks to it.
pub fn route_table() -> Vec<RouteInfo> {
    routes().table
}

/// Each route's policy, by method and path.
type Policies = Arc<HashMap<(Method, &'static str), Policy>>;

/// Applies a route's policy: a scoped credential's one allowed request, the caller's role, then
/// `Idempotency-Key` where the route honours it.
async fn guard(
    State((state, policies)): State<(AppState, Policies)>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let route = route.as_deref().unwrap_or_default();
    let lookup = |method: &Method| {
        policies
            .get(&(method.clone(), route))
            .or_else(|| policies.get(&(method.clone(), route.trim_end_matches('/'))))
            .copied()
    };
    // HEAD is answered by the GET route (unless it has its own).
    let policy = lookup(request.method())
        .or_else(|| {
            (request.method() == Method::HEAD)
                .then(|| lookup(&Method::GET))
                .flatten()
        })
        .unwrap_or(ADMIN);
    let audit = (policy.audited || !request.method().is_safe()).then(|| audit::Pending::of(&request, route));
    if let Err(refused) = crate::auth::check_role(&request, route, policy.role) {
        // What a credential tried and was refused is worth keeping too.
        let response = refused.into_response();
        if let Some(audit) = audit {
            audit.record(&state, &response);
        }
        return Ok(response);
    }
    let response = if policy.idempotent {
        idempotency::idempotency(&state, request, next).await?
    } else {
        next.run(request).await
    };
    if let Some(audit) = audit {
        audit.record(&state, &response);
    }
    Ok(response)
}

/// The router under construction and the table of what it holds.
#[derive(Default)]
struct Routes {
    router: Router<AppState>,
    table: Vec<RouteInfo>,
}

impl Routes {
    /// A request/response route: bounded in time and body size, panics turned into 500s.
    fn json<H, T>(self, method: Method, path: &'static str, policy: Policy, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let layers = tower::ServiceBuilder::new()
            .layer(CatchPanicLayer::custom(|_| {
                ApiError::Internal(anyhow::anyhow!("a request handler panicked")).into_response()
            }))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::SERVICE_UNAVAILABLE,
                REQUEST_TIMEOUT,
            ))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY));
        let route = on(filter_of(&method), handler).layer::<_, Infallible>(layers);
        self.add(method, path, policy, route)
    }

    /// A path served by another route's handler, listed in the table only: the router
    /// matches whole segments, so `{id}.tgz` arrives at the `{id}` route, whose policy applies.
    fn alias(mut self, method: Method, path: &'static str, policy: Policy) -> Self {
        self.table.push(RouteInfo { method, path, policy });
        self
    }

    fn add(
        mut self,
        method: Method,
        path: &'static str,
        policy: Policy,
        route: axum::routing::MethodRouter<AppState>,
    ) -> Self {
        self.router = self.router.route(path, route);
        self.table.push(RouteInfo { method, path, policy });
        self
    }

    /// A streaming response (downloads, log streams, a followed promote): no time limit; a
    /// request body, if any, is bounded like a JSON one.
    fn stream<H, T>(self, method: Method, path: &'static str, policy: Policy, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.streaming(
            (method, path, policy),
            handler,
            axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY),
        )
    }

    /// A streamed upload: no time limit and no body limit here; the handler enforces
    /// RACK_MAX_UPLOAD_BYTES while it streams (and answers 413 itself).
    fn upload<H, T>(self, method: Method, path: &'static str, policy: Policy, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.streaming(
            (method, path, policy),
            handler,
            axum::extract::DefaultBodyLimit::disable(),
        )
    }

    fn streaming<H, T>(
        self,
        (method, path, policy): (Method, &'static str, Policy),
        handler: H,
        limit: axum::extract::DefaultBodyLimit,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let route = on(filter_of(&method), handler).layer::<_, Infallible>(limit);
        self.add(method, path, policy, route)
    }
}

fn filter_of(method: &Method) -> MethodFilter {
    MethodFilter::try_from(method.clone()).expect("routes use standard methods")
}

fn request_span(request: &Request<Body>) -> tracing::Span {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path(), MatchedPath::as_str);
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", http.method = %request.method(), http.route = %path, request.id = %id)
}

/// Counts each request in the metrics, by its route's template (never its path: ids would make
/// a series per request).
async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    // `{app}` is written `:app`: braces inside a label value trip up simple text-format parsers.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .replace("{*", "*")
        .replace('{', ":")
        .replace('}', "");
    let response = next.run(request).await;
    state
        .metrics
        .request(method.as_str(), &route, response.status().as_u16(), started.elapsed());
    response
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound("route", format!("{method} {}", uri.path()))
}

/// Whether a request comes from a browser: it sends `Sec-Fetch-*` headers (every current one
/// does), or asks for a page (`Accept` naming `text/html`, as every browser's navigation does).
fn looks_like_a_browser(headers: &axum::http::HeaderMap) -> bool {
    let fetch_metadata = headers.keys().any(|name| name.as_str().starts_with("sec-fetch-"));
    let wants_html = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    fetch_metadata || wants_html
}

/// Renders every error response as the client asked: `{"error": "..."}` when `Accept` names
/// JSON, `<message>\n` as text otherwise (what the convox CLI reads). Errors that did not come
/// from an `ApiError` (405 from the router, 503 from the timeout) get a message here.
async fn render_errors(request: Request, next: Next) -> Response {
    let format = input::Format::of(request.headers());
    // A browser is never challenged for basic auth: a challenge makes it ask for the password
    // in a dialog of its own and then cache it and attach it to every later request to the
    // rack, including forms other sites' pages submit. The dashboard has its sign-in form;
    // the CLIs (ours, convox's) and curl -u send their credential up front, unasked.
    let browser = looks_like_a_browser(request.headers());
    let response = next.run(request).await;
    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    let message = match response.extensions().get::<ErrorMessage>() {
        Some(ErrorMessage(message)) => message.clone(),
        None => match status {
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this path".to_owned(),
            StatusCode::SERVICE_UNAVAILABLE => "the request took too long".to_owned(),
            StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large".to_owned(),
            other => other.canonical_reason().unwrap_or("error").to_lowercase(),
        },
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body is never read, so this connection cannot carry another request:
        // say so, or a client that pools it sends its next request into a reset.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if browser {
        parts.headers.remove(header::WWW_AUTHENTICATE);
    }
    let body = match format {
        input::Format::Json => {
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let mut body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
            body.push(b'\n');
            Body::from(body)
        }
        input::Format::Text => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Body::from(format!("{message}\n"))
        }
    };
    Response::from_parts(parts, body)
}
