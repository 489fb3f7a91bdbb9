//! `convox cp` (and `rack cp`): files into, out of and removed from a running process, at
//! `/apps/{app}/processes/{id}/files`. Everything goes through the runtime's `exec`, so it
//! happens inside the process's own filesystem view (its sandbox, its container, its pod) as its
//! user: a path can only ever name something that process sees. An upload is spooled (at most
//! RACK_MAX_CP_BYTES, else 413), checked and rewritten by `archive::cp` (no `..`, no symlink out,
//! no special files: 400), then handed to `tar -x` in the process as a length-delimited stream
//! (`head -c N`), which needs no half-closed standard input (Kubernetes before 1.29 has none).

use std::io::{Seek, Write};

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::apps::AppPath;
use super::input::{Format, Pretty, QueryParams};
use crate::AppState;
use crate::archive::cp::{CopyError, components, rewrite};
use crate::error::{ApiError, ApiResult};
use crate::runtime::{ExecRequest, ExecSession};

/// Extraction in the process: the first argument is the byte count to read, the rest are tar
/// flags the caller allowed.
const EXTRACT: &str = r#"n="$1"; shift; head -c "$n" | tar -x -f - -C / "$@""#;

/// Packing in the process: 3 when the path does not exist (told apart before any byte is sent).
const PACK: &str = r#"cd / || exit 2; [ -e "$1" ] || [ -L "$1" ] || exit 3; exec tar -c -f - -- "$1" 2>/dev/null"#;

/// Most bytes of a failed command's output kept for its error message.
const MESSAGE_BYTES: usize = 4096;

#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    /// convox `--tar-extra`: comma-separated tar flags, of an allowed few.
    #[serde(rename = "tar-extra")]
    tar_extra: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct DownloadQuery {
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct DeleteQuery {
    files: Option<String>,
}

/// What an upload wrote.
#[derive(Debug, Serialize)]
pub struct Copied {
    pub entries: u64,
    pub bytes: u64,
}

/// `POST /apps/{app}/processes/{id}/files`: a tar (entries named by absolute paths in the
/// process) unpacked under the process's `/`.
#[tracing::instrument(skip_all, fields(app.name = %app.name, process = %id))]
pub async fn upload_files(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    QueryParams(query): QueryParams<UploadQuery>,
    headers: HeaderMap,
    AppPath(app): AppPath,
    body: Body,
) -> ApiResult<Pretty<Copied>> {
    let limit = state.config.max_cp_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The tar around the content: headers and padding, a little over the content itself.
    let raw_limit = limit.saturating_add(limit / 8).saturating_add(1 << 20);
    if declared.is_some_and(|n| n > raw_limit) {
        return Err(too_large(limit));
    }
    running(&state, &app.name, &id).await?;
    let flags = tar_flags(query.tar_extra.as_deref())?;
    let mut spool = tempfile::tempfile().map_err(internal("making a spool file"))?;
    let mut received: u64 = 0;
    let mut chunks = Box::pin(super::objects::idle_limited(body));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(ApiError::BadRequest)?;
        received += chunk.len() as u64;
        if received > raw_limit {
            return Err(too_large(limit));
        }
        spool.write_all(&chunk).map_err(internal("spooling the upload"))?;
    }
    spool.rewind().map_err(internal("spooling the upload"))?;
    let (checked, stats) = tokio::task::spawn_blocking(move || -> Result<_, CopyError> {
        let mut checked = tempfile::tempfile().map_err(CopyError::Io)?;
        let stats = rewrite(std::io::BufReader::new(spool), &mut checked, limit)?;
        Ok((checked, stats))
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::Error::new(e)))?
    .map_err(|e| match e {
        CopyError::TooLarge(limit) => too_large(limit),
        CopyError::Io(e) => ApiError::Internal(anyhow::Error::new(e).context("checking an upload")),
        refused => ApiError::BadRequest(refused.to_string()),
    })?;
    let size = checked.metadata().map_err(internal("spooling the upload"))?.len();
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        EXTRACT.to_owned(),
        "sh".to_owned(),
        size.to_string(),
    ];
    argv.extend(flags);
    let mut session = exec(&state, &app.name, &id, argv, true).await?;
    let mut stdin = session
        .stdin
        .take()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the process's command has no input")))?;
    let mut checked = checked;
    checked.rewind().map_err(internal("reading the checked upload"))?;
    let mut file = tokio::fs::File::from_std(checked);
    // Output is read beside the input: a command that fills its pipe must not block the copy.
    let output = tokio::spawn(collect(session.output));
    let copied = tokio::io::copy(&mut file, &mut stdin).await;
    let _ = stdin.flush().await;
    // Standard input stays open until the command ends: `head -c` stops on its own, and on a
    // Kubernetes API server before 1.29 closing it closes the whole exec, exit code included.
    let code = session.exit.await;
    drop(stdin);
    let message = output.await.unwrap_or_default();
    if let Err(e) = copied
        && code == 0
    {
        return Err(ApiError::Internal(
            anyhow::Error::new(e).context("copying into the process"),
        ));
    }
    if code != 0 {
        return Err(ApiError::Unprocessable(format!(
            "unpacking in process {id} failed (exit {code}): {}",
            message.trim()
        )));
    }
    tracing::info!(app.name = %app.name, "copied {} entries ({} bytes) into process {id}", stats.entries, stats.bytes);
    Ok(Pretty(Copied {
        entries: stats.entries,
        bytes: stats.bytes,
    }))
}

/// `GET /apps/{app}/processes/{id}/files?file=/path`: a tar of the file or directory, entries
/// named by its path without the leading `/` (as `tar` in the process writes them).
#[tracing::instrument(skip_all, fields(app.name = %app.name, process = %id))]
pub async fn download_files(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    QueryParams(query): QueryParams<DownloadQuery>,
    Extension(principal): Extension<crate::auth::Principal>,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let limit = state.config.max_cp_bytes;
    // The process first: a path is only judged for a process that exists.
    running(&state, &app.name, &id).await?;
    let file = query
        .file
        .filter(|f| !f.is_empty())
        .ok_or_else(|| ApiError::BadRequest("file is required: the absolute path to copy".into()))?;
    let relative = process_path(&file)?;
    let slot = state.streams.take(Some(&principal))?;
    let argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        PACK.to_owned(),
        "sh".to_owned(),
        relative,
    ];
    let ExecSession { mut output, exit, .. } = exec(&state, &app.name, &id, argv, false).await?;
    // The first bytes decide the status: none at all and the command failed is an error.
    let Some(first) = output.next().await else {
        return Err(match exit.await {
            3 => ApiError::NotFound("file", file),
            code => ApiError::Unprocessable(format!("packing {file} in process {id} failed (exit {code})")),
        });
    };
    let mut sent: u64 = 0;
    let cap = limit.saturating_add(limit / 8).saturating_add(1 << 20);
    // Once the output ends, the exit code: a `tar` that failed part-way ends the body with an
    // error, so the client sees a broken transfer rather than a short archive.
    let ending = futures_util::stream::once(async move {
        let _slot = slot;
        match exit.await {
            0 => None,
            code => Some(Err(std::io::Error::other(format!(
                "tar in the process exited with {code}"
            )))),
        }
    })
    .filter_map(std::future::ready);
    let chunks = futures_util::stream::once(async move { first }).chain(output);
    let body = chunks.map(move |chunk| {
        sent += chunk.len() as u64;
        if sent > cap {
            return Err(std::io::Error::other(format!(
                "{file} is larger than the limit of {limit} bytes (RACK_MAX_CP_BYTES)"
            )));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let body = body.chain(ending);
    let mut response = Body::from_stream(body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    Ok(response)
}

/// `DELETE /apps/{app}/processes/{id}/files?files=/a,/b`: removes files in the process.
#[tracing::instrument(skip_all, fields(app.name = %app.name, process = %id))]
pub async fn delete_files(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    QueryParams(query): QueryParams<DeleteQuery>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    running(&state, &app.name, &id).await?;
    let files: Vec<&str> = query
        .files
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|f| !f.is_empty())
        .collect();
    if files.is_empty() {
        return Err(ApiError::BadRequest(
            "files is required: comma-separated absolute paths".into(),
        ));
    }
    let count = files.len();
    let mut argv = vec!["rm".to_owned(), "-f".to_owned(), "--".to_owned()];
    for file in files {
        argv.push(format!("/{}", process_path(file)?));
    }
    let session = exec(&state, &app.name, &id, argv, false).await?;
    let message = collect(session.output).await;
    match session.exit.await {
        0 => Ok(format.ok(serde_json::json!({ "deleted": count }))),
        code => Err(ApiError::Unprocessable(format!(
            "removing files in process {id} failed (exit {code}): {}",
            message.trim()
        ))),
    }
}

/// A path in the process, absolute and without `..`, as relative to `/`.
fn process_path(path: &str) -> ApiResult<String> {
    if !path.starts_with('/') {
        return Err(ApiError::BadRequest(format!(
            "{path:?} is not an absolute path: paths in processes start with /"
        )));
    }
    let parts = components(path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if parts.is_empty() {
        return Err(ApiError::BadRequest("/ itself cannot be copied or removed".into()));
    }
    Ok(parts.join("/"))
}

/// The tar flags of `--tar-extra` that may be passed on (the ones convox allows).
fn tar_flags(extra: Option<&str>) -> ApiResult<Vec<String>> {
    let Some(extra) = extra.filter(|e| !e.is_empty()) else {
        return Ok(Vec::new());
    };
    extra
        .split(',')
        .map(|flag| {
            let strip = flag
                .strip_prefix("--strip-components=")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if strip || matches!(flag, "--no-same-owner" | "--no-same-permissions") {
                Ok(flag.to_owned())
            } else {
                Err(ApiError::BadRequest(format!("unsupported tar flag: {flag}")))
            }
        })
        .collect()
}

/// 404 unless `id` is a process of `app` that runs.
async fn running(state: &AppState, app: &str, id: &str) -> ApiResult<()> {
    let found = super::processes::list(state, app)
        .await?
        .into_iter()
        .any(|p| p.id == id);
    if found {
        Ok(())
    } else {
        Err(ApiError::NotFound("process", id.to_owned()))
    }
}

async fn exec(state: &AppState, app: &str, id: &str, command: Vec<String>, stdin: bool) -> ApiResult<ExecSession> {
    state
        .runtime
        .exec(
            app,
            id,
            ExecRequest {
                command,
                tty: None,
                stdin,
            },
        )
        .await
        .map_err(ApiError::runtime(format!("running tar in process {id}")))
}

/// The first [`MESSAGE_BYTES`] of a command's output, as text (the rest is read and dropped).
async fn collect(mut output: futures_util::stream::BoxStream<'static, bytes::Bytes>) -> String {
    let mut kept = Vec::new();
    while let Some(chunk) = output.next().await {
        let room = MESSAGE_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the files are larger than the limit of {limit} bytes (RACK_MAX_CP_BYTES)"
    ))
}

fn internal(context: &'static str) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| ApiError::Internal(anyhow::Error::new(e).context(context))
}
