//! `/system` and `/auth`: what the convox CLI asks before anything else.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use serde::Serialize;

use crate::AppState;
use crate::api::input::{Format, Pretty};
use crate::auth::Principal;

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
pub async fn show_system(State(state): State<AppState>) -> Pretty<System> {
    Pretty(System {
        count: 1,
        domain: String::new(),
        name: state.config.rack_name.clone(),
        outputs: BTreeMap::new(),
        parameters: BTreeMap::new(),
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
