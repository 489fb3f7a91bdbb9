//! `/apps/{app}/builds`: queue a build of an uploaded source, list and show builds, update
//! them (convox's build pod protocol), cancel them, and stream their logs.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::apps::{AppPath, load_app};
use crate::api::input::{Format, Input, Pretty, QueryParams};
use crate::api::streams::{self, StreamRequest, Style};
use crate::error::{ApiError, ApiResult};
use crate::events::Follow;
use crate::store::builds::{self, Build, BuildStatus, BuildUpdate, NewBuild};
use crate::store::events::Topic;

/// `POST /apps/{app}/builds`, with convox's field names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CreateBuild {
    url: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    git_sha: String,
    manifest: Option<String>,
    #[serde(default)]
    no_cache: bool,
    #[serde(default)]
    development: bool,
    #[serde(default)]
    external: bool,
    build_args: Option<String>,
    wildcard_domain: Option<String>,
}

/// `PUT /apps/{app}/builds/{id}`: what convox's build pod and `build --external` set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBuild {
    ended: Option<String>,
    started: Option<String>,
    entrypoint: Option<String>,
    logs: Option<String>,
    manifest: Option<String>,
    release: Option<String>,
    status: Option<BuildStatus>,
    reason: Option<String>,
}

/// `GET /apps/{app}/builds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListBuilds {
    limit: Option<i64>,
}

/// A build as convox shows it.
#[derive(Debug, Serialize)]
pub struct BuildView {
    id: crate::ids::BuildId,
    app: String,
    description: String,
    entrypoint: String,
    #[serde(rename = "git-sha")]
    git_sha: String,
    logs: String,
    manifest: String,
    process: String,
    release: crate::ids::ReleaseId,
    reason: String,
    repository: String,
    /// Images the build pushed, by service (Kubernetes runtime).
    images: std::collections::BTreeMap<String, String>,
    status: BuildStatus,
    started: DateTime<Utc>,
    ended: DateTime<Utc>,
}

impl From<Build> for BuildView {
    fn from(build: Build) -> Self {
        Self {
            logs: format!("/apps/{}/builds/{}/logs", build.app, build.id),
            id: build.id,
            app: build.app,
            description: build.description,
            entrypoint: build.entrypoint,
            git_sha: build.git_sha,
            manifest: build.manifest,
            process: build.process,
            release: build.release_id.unwrap_or_default(),
            reason: build.reason,
            repository: repository(&build.images),
            images: build.images.0,
            status: build.status,
            started: build.claim.started_at.unwrap_or_else(go_zero_time),
            ended: build.claim.ended_at.unwrap_or_else(go_zero_time),
        }
    }
}

/// convox's `repository`: where the build's images went (the part before the tag), when they
/// all went to one place.
fn repository(images: &std::collections::BTreeMap<String, String>) -> String {
    let mut repos = images
        .values()
        .filter_map(|image| image.rsplit_once(':').map(|(repo, _)| repo));
    let Some(first) = repos.next() else {
        return String::new();
    };
    if repos.all(|repo| repo == first) {
        first.to_owned()
    } else {
        String::new()
    }
}

/// `0001-01-01T00:00:00Z`, Go's zero time: Go clients cannot parse "" as a time.
pub fn go_zero_time() -> DateTime<Utc> {
    chrono::NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The build `id` of the app named `app` (already loaded), or 404.
async fn load_build(state: &AppState, app: &str, id: &str) -> ApiResult<Build> {
    builds::get(&state.pool, app, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("build", id.chars().take(40).collect()))
}

#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn create_build(
    State(state): State<AppState>,
    Path(app): Path<String>,
    Input(body): Input<CreateBuild>,
) -> ApiResult<Response> {
    let app = load_app(&state, &app).await?;
    if body.external {
        return Err(ApiError::BadRequest(
            "external builds are not supported by this rack".into(),
        ));
    }
    if body.development || body.build_args.is_some() || body.wildcard_domain.is_some() {
        tracing::debug!(app.name = %app.name, "ignoring development, build-args and wildcard-domain");
    }
    crate::disk::check_room(&state)?;
    let url = body
        .url
        .ok_or_else(|| ApiError::BadRequest("url is required: upload the source first".into()))?;
    let key = url.strip_prefix(&format!("object://{}/", app.name)).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "url must be an object of this app: object://{}/<key>",
            app.name
        ))
    })?;
    crate::objects::validate_key(key).map_err(ApiError::BadRequest)?;
    if crate::store::objects::get(&state.pool, &app.name, key).await?.is_none() {
        return Err(ApiError::NotFound("source object", key.to_owned()));
    }
    let manifest_path = body
        .manifest
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "convox.yml".to_owned());
    let id = crate::ids::BuildId::generate();
    let build = builds::insert(
        &state.pool,
        &NewBuild {
            id: &id,
            app: &app.name,
            description: &body.description,
            git_sha: &body.git_sha,
            source_url: &url,
            manifest_path: &manifest_path,
            no_cache: body.no_cache,
        },
    )
    .await?;
    state.bus.poke(crate::events::Wake::Jobs);
    tracing::info!(build.id = %id, app.name = %app.name, "queued build {id}");
    let location = format!("/apps/{}/builds/{id}", app.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Pretty(BuildView::from(build)),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_builds(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListBuilds>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<BuildView>>> {
    let limit = list_limit(query.limit)?;
    let builds = builds::list_for_app(&state.pool, &app.name, limit).await?;
    Ok(Pretty(builds.into_iter().map(BuildView::from).collect()))
}

/// A list's `limit`: 10 unless given, between 1 and 1000.
pub fn list_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(10),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 1000, got {n}"
        ))),
    }
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, build.id = %id))]
pub async fn show_build(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    // `GET …/builds/{id}.tgz` (convox's export) arrives here: the router matches whole segments.
    if let Some(id) = id.strip_suffix(".tgz") {
        return crate::api::build_transfer::export_build(&state, &app.name, id).await;
    }
    Ok(Pretty(BuildView::from(load_build(&state, &app.name, &id).await?)).into_response())
}

#[tracing::instrument(skip_all, fields(app.name = %app, build.id = %id))]
pub async fn update_build(
    State(state): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Input(body): Input<UpdateBuild>,
) -> ApiResult<Pretty<BuildView>> {
    // Loaded here, not by `AppPath`: the body is read first, so its errors come before a 404.
    let app = load_app(&state, &app).await?;
    let build = load_build(&state, &app.name, &id).await?;
    let status = body.status;
    if let Some(release) = &body.release
        && crate::store::releases::get(&state.pool, &build.app, release)
            .await?
            .is_none()
    {
        return Err(ApiError::BadRequest(format!("release not found: {release}")));
    }
    let update = BuildUpdate {
        entrypoint: body.entrypoint,
        logs: body.logs,
        manifest: body.manifest,
        release_id: body.release,
        status,
        reason: body.reason,
        started_at: body.started.as_deref().map(|t| parse_time("started", t)).transpose()?,
        ended_at: body.ended.as_deref().map(|t| parse_time("ended", t)).transpose()?,
    };
    let build = builds::update(&state.pool, &build.app, &build.id, &update)
        .await?
        .ok_or_else(|| ApiError::NotFound("build", id.clone()))?;
    Ok(Pretty(build.into()))
}

/// A time as convox sends it (`20060102.150405.000000000`, UTC) or RFC 3339.
fn parse_time(field: &str, text: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y%m%d.%H%M%S.%f")
        .map(|t| t.and_utc())
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{field}: invalid time {text:?}: use RFC 3339 or 20060102.150405.000000000"
            ))
        })
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, build.id = %id))]
pub async fn cancel_build(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let mut tx = state.pool.begin().await?;
    let build = builds::request_cancel(&mut tx, &app.name, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound("build", id.clone()))?;
    match build.status {
        BuildStatus::Created => crate::jobs::builds::cancel_queued(&mut tx, &build).await?,
        BuildStatus::Running => {}
        status => {
            return Err(ApiError::Conflict(format!(
                "build {id} has already ended ({})",
                serde_json::to_value(status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
    }
    tx.commit().await?;
    tracing::info!(build.id = %id, app.name = %app.name, "cancel requested for build {id}");
    let build = load_build(&state, &app.name, &id).await?;
    Ok(format.ok(BuildView::from(build)))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name, build.id = %id))]
pub async fn stream_build_logs(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    request: StreamRequest,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let build = load_build(&state, &app.name, &id).await?;
    let topic = Topic::Build {
        app: build.app,
        build: build.id.to_string(),
    };
    streams::respond(&state, topic, request, Style::Raw, Follow::UntilEnd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_both_forms() {
        let convox = parse_time("ended", "20240102.030405.123456789").unwrap();
        assert_eq!(convox.to_rfc3339(), "2024-01-02T03:04:05.123456789+00:00");
        assert!(parse_time("ended", "2024-01-02T03:04:05Z").is_ok());
        assert_eq!(
            parse_time("ended", "yesterday").unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn zero_times_are_go_zero_times() {
        assert_eq!(serde_json::to_value(go_zero_time()).unwrap(), "0001-01-01T00:00:00Z");
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(list_limit(None).unwrap(), 10);
        assert!(list_limit(Some(0)).is_err());
        assert!(list_limit(Some(1001)).is_err());
    }
}
