//! Builds carried between racks: `GET /apps/{app}/builds/{id}.tgz` (`convox builds export`)
//! writes a build archive (see `build_archive`), `POST /apps/{app}/builds/import` (`convox
//! builds import`) takes one and records it as a new complete build with a new release, which
//! deploys without a build step.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::AppState;
use crate::api::builds::BuildView;
use crate::api::input::Pretty;
use crate::build_archive::{self, Metadata, read::ReadError};
use crate::error::{ApiError, ApiResult};
use crate::runtime::RuntimeError;
use crate::store::builds::{self, BuildStatus, ImportedBuild, NewBuild};

/// Refuses both routes where the runtime cannot carry builds.
fn transfers_here(state: &AppState) -> ApiResult<()> {
    if state.runtime.capabilities().transfers_builds {
        Ok(())
    } else {
        Err(ApiError::NotImplemented(format!(
            "build export and import are supported on the local and Kubernetes runtimes only (this rack runs the {} runtime)",
            state.runtime.name()
        )))
    }
}

/// A scratch directory in the data directory (on the disk the build goes to, not in /tmp).
fn scratch(state: &AppState, what: &str) -> ApiResult<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!(".{what}-"))
        .tempdir_in(&state.config.data_dir)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("making a scratch directory")))
}

/// The build's archive, streamed.
#[tracing::instrument(skip_all, fields(app.name = %app, build.id = %id))]
pub async fn export_build(state: &AppState, app: &str, id: &str) -> ApiResult<Response> {
    transfers_here(state)?;
    let build = builds::get(&state.pool, app, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("build", id.chars().take(40).collect()))?;
    if build.status != BuildStatus::Complete {
        return Err(ApiError::Conflict(format!(
            "build {id} is not complete: only a complete build can be exported"
        )));
    }
    let scratch = scratch(state, "build-export")?;
    let images: Vec<String> = build.images.values().cloned().collect();
    let exported = state
        .runtime
        .export_build(app, id, &images, scratch.path())
        .await
        .map_err(|e| match e {
            RuntimeError::Failed(message) => ApiError::Conflict(message),
            e => ApiError::runtime(format!("exporting build {id}"))(e),
        })?;
    let key = build.source_url.strip_prefix(&format!("object://{app}/"));
    let source = match key {
        Some(key) => crate::store::objects::get(&state.pool, app, key).await?,
        None => None,
    };
    let metadata = Metadata {
        format: build_archive::FORMAT.to_owned(),
        rack_version: env!("CARGO_PKG_VERSION").to_owned(),
        exported: chrono::Utc::now(),
        rack: state.config.rack_name.clone(),
        app: app.to_owned(),
        id: build.id.to_string(),
        description: build.description.clone(),
        git_sha: build.git_sha.clone(),
        manifest_path: build.manifest_path.clone(),
        images: build.images.0.clone(),
        started: build.claim.started_at,
        ended: build.claim.ended_at,
        entries: Vec::new(),
    };
    let prepared = build_archive::write::Prepared {
        scratch,
        metadata,
        manifest: build.manifest.clone(),
        source: source.map(|o| build_archive::write::Source {
            location: o.location,
            size: u64::try_from(o.size).unwrap_or(0),
            sha256: o.sha256,
        }),
        files: exported.files,
        images: exported.images,
    };
    tracing::info!(app.name = app, build.id = id, "exporting build {id} of {app}");
    let stream = build_archive::write::stream(state.objects.clone(), prepared);
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{id}.tgz\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn import_build(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: HeaderMap,
    crate::api::apps::AppPath(app): crate::api::apps::AppPath,
    body: Body,
) -> ApiResult<Response> {
    transfers_here(&state)?;
    crate::disk::check_room(&state)?;
    let limit = state.config.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(crate::api::objects::too_large(limit));
    }
    let scratch = scratch(&state, "build-import")?;
    let checked = receive(&state, body, scratch.path()).await?;
    let rack_linked: Vec<String> = crate::store::rack_resources::linked_to(&state.pool, &app.name)
        .await?
        .into_iter()
        .map(|r| r.name)
        .collect();
    crate::manifest::parse_linking(&checked.manifest, &rack_linked)
        .map_err(|e| ApiError::Unprocessable(format!("{}: {e}", build_archive::MANIFEST)))?;
    let metadata = &checked.metadata;
    let id = crate::ids::BuildId::generate();
    let release = crate::ids::ReleaseId::generate();
    let source_url = match checked.path(build_archive::SOURCE) {
        Some(path) => {
            let key = format!("imports/{id}.tgz");
            let sha256 = &checked.files[build_archive::SOURCE].1.sha256;
            store_source(&state, &app.name, &key, path, sha256).await?;
            crate::api::objects::object_url(&app.name, &key)
        }
        None => String::new(),
    };
    let files = checked
        .path(build_archive::FILES)
        .ok_or_else(|| ApiError::Unprocessable("the build archive has no files.tgz".into()))?;
    let images = state
        .runtime
        .import_build(
            &app.name,
            &id,
            files,
            checked.path(build_archive::IMAGES),
            &metadata.images,
        )
        .await
        .map_err(|e| match e {
            RuntimeError::Failed(message) => ApiError::Unprocessable(message),
            e => ApiError::runtime(format!("importing build {id}"))(e),
        });
    let images = match images {
        Ok(images) => images,
        Err(e) => {
            forget_source(&state, &app.name, &source_url).await;
            return Err(e);
        }
    };
    let line = format!(
        "Imported build {} of app {} of rack {} (exported {}): release {release}",
        metadata.id,
        metadata.app,
        metadata.rack,
        metadata.exported.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let imported = ImportedBuild {
        new: NewBuild {
            id: &id,
            app: &app.name,
            description: &metadata.description,
            git_sha: &metadata.git_sha,
            source_url: &source_url,
            manifest_path: &metadata.manifest_path,
            no_cache: false,
        },
        manifest: &checked.manifest,
        images: &images,
        started_at: metadata.started,
        ended_at: metadata.ended,
    };
    // The end a build's log has, after the line that says where the build came from.
    let lines = [
        (crate::runtime::BUILD_STREAM.to_owned(), line.clone()),
        (
            crate::runtime::BUILD_STREAM.to_owned(),
            format!("Build {id} complete: release {release}"),
        ),
    ];
    let build = match builds::insert_imported(&state.pool, &imported, &release, &lines).await {
        Ok(build) => build,
        Err(e) => {
            let _ = state.runtime.prune_builds(&app.name, std::slice::from_ref(&id)).await;
            forget_source(&state, &app.name, &source_url).await;
            return Err(e.into());
        }
    };
    tracing::info!(app.name = %app.name, build.id = %id, "{line}");
    let location = format!("/apps/{}/builds/{id}", app.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Pretty(BuildView::from(build)),
    )
        .into_response())
}

/// Reads the uploaded archive into `scratch` and checks it: at most `RACK_MAX_UPLOAD_BYTES`
/// as sent, and at most that plus `RACK_MAX_SOURCE_BYTES` decompressed.
async fn receive(state: &AppState, body: Body, scratch: &std::path::Path) -> ApiResult<build_archive::read::Checked> {
    let limit = state.config.max_upload_bytes;
    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = over.clone();
    let mut received = 0u64;
    let body = crate::api::objects::idle_limited(body).map(move |chunk| {
        let chunk = chunk?;
        received += chunk.len() as u64;
        if received > limit {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err("the upload is over the size limit".to_owned());
        }
        Ok(chunk)
    });
    let unpacked_limit = state.config.source_limits.max_bytes.saturating_add(limit);
    let handle = tokio::runtime::Handle::current();
    let dir = scratch.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let reader = crate::backup::archive::Blocking::new(body, handle);
        build_archive::read::read(std::io::BufReader::new(reader), &dir, unpacked_limit)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("reading a build archive")))?;
    if over.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(crate::api::objects::too_large(limit));
    }
    read.map_err(|e| match e {
        ReadError::Refused(message) => ApiError::Unprocessable(message),
        ReadError::TooLarge(_) => ApiError::PayloadTooLarge(e.to_string()),
        ReadError::Io(e) => ApiError::Internal(anyhow::Error::new(e).context("writing a build archive's entries")),
    })
}

/// Stores the archive's source as the object `key` of `app`.
async fn store_source(state: &AppState, app: &str, key: &str, path: &std::path::Path, sha256: &str) -> ApiResult<()> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("opening the imported source")))?;
    let location = crate::objects::Objects::new_location(app);
    let stream = tokio_util::io::ReaderStream::new(file);
    let stored = state
        .objects
        .put_stream(&location, stream, u64::MAX, Some(sha256))
        .await
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("storing the imported source")))?;
    let size = i64::try_from(stored.size).unwrap_or(i64::MAX);
    match crate::store::objects::replace(&state.pool, app, key, &location, size, &stored.sha256).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = state.objects.delete(&location).await;
            Err(e.into())
        }
    }
}

/// Removes the source an import stored before it failed.
async fn forget_source(state: &AppState, app: &str, url: &str) {
    let Some(key) = url.strip_prefix(&format!("object://{app}/")) else {
        return;
    };
    if let Ok(Some(location)) = crate::store::objects::delete(&state.pool, app, key).await {
        let _ = state.objects.delete(&location).await;
    }
}
