//! `/system` and `/auth`: what the convox CLI asks before anything else.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::AppState;
use crate::api::input::{Format, Pretty};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};

/// The version reported to clients. The convox CLI compares it as a string with v2 date
/// versions and takes legacy code paths for anything that sorts below them, so it starts
/// with `3`.
pub const SYSTEM_VERSION: &str = "3.0.0";

/// The rack, as convox shows it.
#[derive(Debug, Serialize)]
pub struct System {
    count: u32,
    domain: String,
    name: String,
    outputs: BTreeMap<String, String>,
    parameters: BTreeMap<String, String>,
    provider: &'static str,
    #[serde(rename = "rack-domain")]
    rack_domain: String,
    #[serde(rename = "router-internal")]
    router_internal: String,
    region: String,
    status: &'static str,
    r#type: String,
    version: &'static str,
    /// The version of the rack server itself.
    #[serde(rename = "rack-version")]
    rack_version: &'static str,
}

#[tracing::instrument(skip_all)]
pub async fn show_system(State(state): State<AppState>) -> ApiResult<Pretty<System>> {
    Ok(Pretty(system(&state).await?))
}

/// The rack now, its parameters with their current values.
pub async fn system(state: &AppState) -> ApiResult<System> {
    let overrides = crate::store::rack_system::params(&state.pool).await?;
    Ok(System {
        count: 1,
        domain: String::new(),
        name: state.config.rack_name.clone(),
        outputs: BTreeMap::new(),
        parameters: crate::rack_params::effective(&state.config, &overrides),
        provider: state.config.runtime.name(),
        rack_domain: String::new(),
        router_internal: String::new(),
        region: String::new(),
        status: "running",
        r#type: String::new(),
        version: SYSTEM_VERSION,
        rack_version: env!("CARGO_PKG_VERSION"),
    })
}

/// `GET /auth`: answers `ok` when the credentials are valid (the auth layer has checked them).
#[tracing::instrument(skip_all)]
pub async fn check_auth(Extension(principal): Extension<Principal>, format: Format) -> Response {
    format.ok(serde_json::json!({ "role": principal.role.as_str() }))
}

/// `GET /metrics`: Prometheus text format. Any credential that sees the whole rack (a `read`
/// token at least; not one limited to some apps: the figures are the rack's).
#[tracing::instrument(skip_all)]
pub async fn show_metrics(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Response> {
    if principal.apps.is_some() {
        return Err(ApiError::Forbidden(
            "this credential is limited to some apps; /metrics shows the whole rack's figures".into(),
        ));
    }
    let metrics = &state.metrics;
    for queue in crate::store::stats::queues(&state.pool).await? {
        metrics
            .queue_depth
            .with_label_values(&[queue.kind.as_str()])
            .set(queue.depth);
        metrics
            .queue_oldest
            .with_label_values(&[queue.kind.as_str()])
            .set(queue.oldest);
    }
    let size = i64::from(state.pool.size());
    let idle = i64::try_from(state.pool.num_idle()).unwrap_or(i64::MAX);
    metrics.pool_connections.with_label_values(&["idle"]).set(idle);
    metrics.pool_connections.with_label_values(&["in_use"]).set(size - idle);
    metrics
        .pool_connections
        .with_label_values(&["max"])
        .set(i64::from(state.pool.options().get_max_connections()));
    metrics
        .bus_reads
        .set(i64::try_from(state.bus.reads()).unwrap_or(i64::MAX));
    metrics
        .bus_tails
        .set(i64::try_from(state.bus.tails()).unwrap_or(i64::MAX));
    metrics.bus_lag.set(state.bus.lag().as_secs_f64());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response())
}
