//! The HTTP API. This file is the only place that wires paths to handlers and applies layers;
//! each resource module owns its handlers and DTOs. `route_table()` lists every route so a
//! test can hold `openapi.yaml` to it.

pub mod apps;
pub mod builds;
pub mod deployments;
pub mod idempotency;
pub mod input;
pub mod objects;
pub mod processes;
pub mod releases;
pub mod services;
pub mod streams;
pub mod system;
pub mod tokens;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
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
use crate::error::{ApiError, ErrorMessage};

/// Longest time a JSON request may take. Streams and uploads have no such limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest form or JSON body.
const MAX_JSON_BODY: usize = 4 * 1024 * 1024;

static REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// Every route, its handler and its kind. The only place paths are wired.
fn routes() -> Routes {
    use Method as M;
    Routes::default()
        .json(M::GET, "/system", system::show_system)
        .json(M::GET, "/auth", system::check_auth)
        .json(M::GET, "/apps", apps::list_apps)
        .json(M::POST, "/apps", apps::create_app)
        .json(M::GET, "/apps/{app}", apps::show_app)
        .json(M::PUT, "/apps/{app}", apps::update_app)
        .json(M::DELETE, "/apps/{app}", apps::delete_app)
        .json(M::GET, "/apps/{app}/objects", objects::list_objects)
        .upload(M::POST, "/apps/{app}/objects", objects::upload_object_anonymous)
        .upload(M::POST, "/apps/{app}/objects/", objects::upload_object_anonymous)
        .upload(M::POST, "/apps/{app}/objects/{*key}", objects::upload_object)
        .stream(M::GET, "/apps/{app}/objects/{*key}", objects::download_object)
        .json(M::HEAD, "/apps/{app}/objects/{*key}", objects::head_object)
        .json(M::DELETE, "/apps/{app}/objects/{*key}", objects::delete_object)
        .json(M::GET, "/apps/{app}/builds", builds::list_builds)
        .json(M::POST, "/apps/{app}/builds", builds::create_build)
        .json(M::GET, "/apps/{app}/builds/{id}", builds::show_build)
        .json(M::PUT, "/apps/{app}/builds/{id}", builds::update_build)
        .json(M::POST, "/apps/{app}/builds/{id}/cancel", builds::cancel_build)
        .stream(M::GET, "/apps/{app}/builds/{id}/logs", builds::stream_build_logs)
        .json(M::GET, "/apps/{app}/releases", releases::list_releases)
        .json(M::POST, "/apps/{app}/releases", releases::create_release)
        .json(M::GET, "/apps/{app}/releases/{id}", releases::show_release)
        .stream(M::POST, "/apps/{app}/releases/{id}/promote", releases::promote_release)
        .json(M::GET, "/apps/{app}/deployments", deployments::list_deployments)
        .json(M::GET, "/apps/{app}/deployments/{id}", deployments::show_deployment)
        .stream(
            M::GET,
            "/apps/{app}/deployments/{id}/events",
            deployments::stream_deployment_events,
        )
        .json(M::POST, "/apps/{app}/cancel", deployments::cancel_deployment)
        .json(M::GET, "/apps/{app}/processes", processes::list_processes)
        .json(M::GET, "/apps/{app}/processes/{id}", processes::show_process)
        .json(M::DELETE, "/apps/{app}/processes/{id}", processes::restart_process)
        .stream(M::GET, "/apps/{app}/logs", processes::stream_app_logs)
        .stream(
            M::GET,
            "/apps/{app}/services/{service}/logs",
            processes::stream_service_logs,
        )
        .json(M::GET, "/apps/{app}/budget", processes::show_budget)
        .json(M::GET, "/apps/{app}/services", services::list_services)
        .json(M::PUT, "/apps/{app}/services/{service}", services::scale_service)
        .json(
            M::POST,
            "/apps/{app}/services/{service}/restart",
            services::restart_service,
        )
        .json(M::GET, "/tokens", tokens::list_tokens)
        .json(M::POST, "/tokens", tokens::create_token)
        .json(M::DELETE, "/tokens/{id}", tokens::delete_token)
}

/// The API with its layers, ready to serve.
pub fn router(state: AppState) -> Router {
    let auth = middleware::from_fn_with_state(state.clone(), crate::auth::require_auth);
    let idempotency = middleware::from_fn_with_state(state.clone(), idempotency::idempotency);
    routes()
        .router
        // After routing (they need the matched path) and after authentication: the role
        // check first, then idempotency.
        .route_layer(idempotency)
        .route_layer(middleware::from_fn(crate::auth::require_role))
        .fallback(unknown_route)
        // Layers run outside-in from the last one added: request id, trace, error rendering, auth.
        .layer(auth)
        .layer(middleware::from_fn(render_errors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

/// Method and path of every route, for the OpenAPI coverage test.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().table
}

/// The router under construction and the list of what it holds.
#[derive(Default)]
struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    /// A request/response route: bounded in time and body size, panics turned into 500s.
    fn json<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
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
        self.add(method, path, route)
    }

    fn add(mut self, method: Method, path: &'static str, route: axum::routing::MethodRouter<AppState>) -> Self {
        self.router = self.router.route(path, route);
        self.table.push((method, path));
        self
    }

    /// A streaming response (downloads, log streams, a followed promote): no time limit; a
    /// request body, if any, is bounded like a JSON one.
    fn stream<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.streaming(
            method,
            path,
            handler,
            axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY),
        )
    }

    /// A streamed upload: no time limit and no body limit here; the handler enforces
    /// RACK_MAX_UPLOAD_BYTES while it streams (and answers 413 itself).
    fn upload<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.streaming(method, path, handler, axum::extract::DefaultBodyLimit::disable())
    }

    fn streaming<H, T>(
        self,
        method: Method,
        path: &'static str,
        handler: H,
        limit: axum::extract::DefaultBodyLimit,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let route = on(filter_of(&method), handler).layer::<_, Infallible>(limit);
        self.add(method, path, route)
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

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound("route", format!("{method} {}", uri.path()))
}

/// Renders every error response as the client asked: `{"error": "..."}` when `Accept` names
/// JSON, `<message>\n` as text otherwise (what the convox CLI reads). Errors that did not come
/// from an `ApiError` (405 from the router, 503 from the timeout) get a message here.
async fn render_errors(request: Request, next: Next) -> Response {
    let format = input::Format::of(request.headers());
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
