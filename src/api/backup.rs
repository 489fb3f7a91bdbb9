//! `GET /system/backup`: the whole rack as one consistent archive, streamed while the rack keeps
//! serving (see `crate::backup` for what is in it).

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;

use crate::AppState;
use crate::api::input::QueryParams;
use crate::backup::archive::{self, Options};
use crate::error::{ApiError, ApiResult};

/// The query of `GET /system/backup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupQuery {
    /// `false`: leave the built images out (smaller; container services are built again).
    images: Option<bool>,
    /// `false`: leave the resources' exports out (a restored rack starts its resources empty).
    resources: Option<bool>,
}

/// Response header: about how many bytes the archive will have (progress bars).
pub const ESTIMATE_HEADER: &str = "rack-backup-estimate";

#[tracing::instrument(skip_all)]
pub async fn download_backup(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<BackupQuery>,
) -> ApiResult<Response> {
    let options = Options {
        images: query.images.unwrap_or(true),
        resources: query.resources.unwrap_or(true),
    };
    let prepared = match archive::prepare(&state, options, false).await {
        Ok(Some(prepared)) => prepared,
        // Only scheduled backups take the lock that makes this `None`.
        Ok(None) => return Err(anyhow::anyhow!("the backup could not start").into()),
        Err(e) => {
            crate::backup::schedule::failed(&state, "download", &e).await;
            // A resource that cannot be exported is the operator's to fix: said to the client.
            if let Some(failed) = e.downcast_ref::<archive::ResourceExportFailed>() {
                return Err(ApiError::Conflict(failed.0.clone()));
            }
            return Err(e.into());
        }
    };
    let estimate = prepared.estimate;
    let (body, writer) = archive::stream(&state, prepared);
    let watcher = state.clone();
    tokio::spawn(async move {
        match writer.await {
            Ok(Ok(summary)) => crate::backup::schedule::succeeded(&watcher, "download", None, summary.bytes).await,
            Ok(Err(e)) => crate::backup::schedule::failed(&watcher, "download", &e).await,
            Err(e) => crate::backup::schedule::failed(&watcher, "download", &e.into()).await,
        }
    });
    let name = format!(
        "attachment; filename=\"{}-{}.tar\"",
        state.config.rack_name,
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (header::CONTENT_DISPOSITION, name),
            (header::HeaderName::from_static(ESTIMATE_HEADER), estimate.to_string()),
        ],
        Body::from_stream(body.boxed()),
    )
        .into_response())
}
