//! One-off processes and exec, as the convox CLI drives them: `POST
//! /apps/{app}/services/{service}/processes` starts a process of a service's release (options
//! as headers: `Command`, `Release`, `Environment`), and the websocket
//! `/apps/{app}/processes/{pid}/exec` runs a command inside a running process: stdin as text
//! frames (an empty binary frame is its end), output as text frames, then the exit code marker
//! and an empty binary frame. Who started each is written to the app's log.

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::AppState;
use crate::api::apps::AppPath;
use crate::api::input::{Pretty, header_text};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::runtime::{ExecRequest, ExecSession, OneOff, ProcessInfo};

/// What precedes the exit code on the last line of an exec (the convox CLI looks for it).
pub const EXIT_MARKER: &str = "F1E49A85-0AD7-4AEF-A618-C249C6E6568D";

/// The stream of rack's notes about runs and execs in an app's log.
const NOTES: &str = crate::stream_names::RACK_RUN;

fn flag(headers: &HeaderMap, name: &str, default: bool) -> ApiResult<bool> {
    match header_text(headers, name)? {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("{name} must be true or false, got {v:?}"))),
    }
}

/// The `Command` header as an argument list (split as a shell would).
fn command(headers: &HeaderMap) -> ApiResult<Vec<String>> {
    let text = header_text(headers, "command")?
        .ok_or_else(|| ApiError::BadRequest("the Command header is required: what to run".into()))?;
    if text.contains('\0') {
        return Err(ApiError::BadRequest("the command contains a NUL character".into()));
    }
    let argv = shell_words::split(text)
        .map_err(|e| ApiError::BadRequest(format!("cannot split the command {text:?}: {e}")))?;
    if argv.is_empty() {
        return Err(ApiError::BadRequest("the command is empty".into()));
    }
    Ok(argv)
}

/// Writes a note in the app's log (who started what; never a secret).
async fn note(state: &AppState, app: &str, message: String) -> ApiResult<()> {
    let mut conn = state.pool.acquire().await?;
    let owner = crate::store::events::Owner {
        app,
        build: None,
        deployment: None,
    };
    crate::store::events::append(&mut conn, owner, &[(NOTES.to_owned(), message)], None).await?;
    Ok(())
}

/// `POST /apps/{app}/services/{service}/processes`: a one-off process of the service's release
/// (the app's current one unless `Release` names another), with the release's environment plus
/// `Environment` (`K=V&K2=V2`); not routed to, not counted in the scale; stopped after
/// RACK_RUN_TIMEOUT.
#[tracing::instrument(skip_all, fields(app.name = %app.name, service = %service))]
pub async fn run_process(
    State(state): State<AppState>,
    Path((_, service)): Path<(String, String)>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<ProcessInfo>> {
    let argv = command(&headers)?;
    let mut env = crate::env::Env::new();
    if let Some(text) = header_text(&headers, "environment")? {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("Environment must be K=V pairs joined with &: {e}")))?;
        env = crate::env::from_pairs(pairs).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    let release = match header_text(&headers, "release")? {
        Some(release) => crate::store::releases::get(&state.pool, &app.name, release)
            .await?
            .ok_or_else(|| ApiError::NotFound("release", release.chars().take(40).collect()))?
            .id
            .to_string(),
        None => app
            .release_id
            .as_ref()
            .map(ToString::to_string)
            .ok_or_else(|| ApiError::Conflict(format!("app {} has no release yet: deploy one first", app.name)))?,
    };
    let spec = crate::jobs::deploys::load_spec(&state, &app.name, &release).await?;
    if !spec.manifest.services.contains_key(&service) {
        return Err(ApiError::NotFound("service", service));
    }
    let display = shell_words::join(&argv);
    let timeout = crate::rack_params::seconds(&state.pool, &state.config, &crate::rack_params::RUN_TIMEOUT).await;
    let one_off = OneOff {
        service: service.clone(),
        command: argv,
        env,
        log: None,
        timeout,
    };
    let process = state
        .runtime
        .run(&spec, one_off)
        .await
        .map_err(ApiError::runtime(format!("could not run a process of {service}")))?;
    tracing::info!(app.name = %app.name, process.id = %process.id, who = %principal.name, "started process {}", process.id);
    note(
        &state,
        &app.name,
        format!(
            "{} started process {} of {service} (release {}): {display}",
            principal.name, process.id, spec.id
        ),
    )
    .await?;
    Ok(Pretty(process))
}

/// `GET /apps/{app}/processes/{pid}/exec` (a websocket): runs `Command` inside the process,
/// on a terminal of `Height` × `Width` unless `Tty: false`, with its input unless
/// `Disable-Stdin: true`.
#[tracing::instrument(skip_all, fields(app.name = %app.name, process.id = %id))]
pub async fn exec_process(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    let ws = ws.map_err(|_| {
        ApiError::BadRequest(
            "exec is a websocket: connect with Upgrade: websocket (the convox or rack CLI does)".into(),
        )
    })?;
    let argv = command(&headers)?;
    let tty = flag(&headers, "tty", true)?;
    let stdin = !flag(&headers, "disable-stdin", false)?;
    let size = |name: &str, default: u16| -> ApiResult<u16> {
        match header_text(&headers, name)? {
            None => Ok(default),
            Some(v) => v.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{name} must be a number of characters from 1 to 65535, got {v:?}"
                ))
            }),
        }
    };
    let tty = if tty {
        Some((size("height", 24)?, size("width", 80)?))
    } else {
        None
    };
    let request = ExecRequest {
        command: argv.clone(),
        tty,
        stdin,
    };
    let running = super::processes::list(&state, &app.name)
        .await?
        .into_iter()
        .any(|p| p.id == id);
    if !running {
        return Err(ApiError::NotFound("process", id));
    }
    let slot = state.streams.take(Some(&principal))?;
    let end = crate::api::streams::credential_end(&state, Some(&principal));
    let session = state.runtime.exec(&app.name, &id, request).await;
    let display = shell_words::join(&argv);
    note(
        &state,
        &app.name,
        format!("{} ran a command in process {id}: {display}", principal.name),
    )
    .await?;
    // Input is typed or piped: a frame above 1 MiB is not that, and closes the connection.
    Ok(ws
        .max_message_size(MAX_INPUT_FRAME)
        .max_frame_size(MAX_INPUT_FRAME)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            match session {
                Ok(session) => bridge(socket, session, end).await,
                Err(e) => refuse(socket, &e.to_string()).await,
            }
        })
        .into_response())
}

/// Says why the command could not run, with a non-zero exit code, and closes.
async fn refuse(mut socket: WebSocket, why: &str) {
    let _ = socket.send(Message::Text(format!("ERROR: {why}\n").into())).await;
    let _ = socket.send(Message::Text(format!("{EXIT_MARKER}:1\n").into())).await;
    let _ = socket.send(Message::Binary(axum::body::Bytes::new())).await;
    let _ = socket.close().await;
}

/// Largest websocket frame (and message) a client may send to an exec.
const MAX_INPUT_FRAME: usize = 1 << 20;

/// Connects a websocket to a running command until it ends (or the client leaves, or its
/// credential ends with `end`: either kills it).
async fn bridge(socket: WebSocket, session: ExecSession, mut end: futures_util::future::BoxFuture<'static, String>) {
    let (mut sink, mut source) = socket.split();
    let ExecSession {
        mut output,
        stdin,
        exit,
    } = session;
    let mut input = tokio::spawn(async move {
        let mut stdin = stdin;
        while let Some(Ok(message)) = source.next().await {
            let data = match message {
                Message::Text(text) => axum::body::Bytes::from(text),
                // The end of the client's input.
                Message::Binary(data) if data.is_empty() => {
                    if let Some(mut writer) = stdin.take() {
                        let _ = writer.shutdown().await;
                    }
                    continue;
                }
                Message::Binary(data) => data,
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if let Some(writer) = stdin.as_mut()
                && (writer.write_all(&data).await.is_err() || writer.flush().await.is_err())
            {
                stdin = None;
            }
        }
    });
    let (mut text, mut exit, mut drained) = (Utf8Carry::default(), exit, false);
    // The client leaving (or its credential ending) kills the command by dropping the session,
    // also once the command has closed its output but not yet ended.
    let code = loop {
        tokio::select! {
            chunk = output.next(), if !drained => match chunk {
                Some(chunk) => {
                    let piece = text.push(&chunk);
                    if !piece.is_empty() && sink.send(Message::Text(piece.into())).await.is_err() {
                        input.abort();
                        return;
                    }
                }
                None => {
                    drained = true;
                    let rest = text.finish();
                    if !rest.is_empty() {
                        let _ = sink.send(Message::Text(rest.into())).await;
                    }
                }
            },
            // Only once all its output is sent: the exit code comes last.
            code = &mut exit, if drained => break code,
            _ = &mut input => return,
            reason = &mut end => {
                let _ = sink.send(Message::Text(format!("{reason}\n").into())).await;
                let _ = sink.send(Message::Text(format!("{EXIT_MARKER}:1\n").into())).await;
                let _ = sink.send(Message::Binary(axum::body::Bytes::new())).await;
                input.abort();
                return;
            }
        }
    };
    // Its own frame: the CLI reads the code from what follows the marker, and nothing else.
    let _ = sink.send(Message::Text(format!("{EXIT_MARKER}:{code}\n").into())).await;
    let _ = sink.send(Message::Binary(axum::body::Bytes::new())).await;
    let _ = sink.close().await;
    input.abort();
}

/// Turns output bytes into text frames without splitting a character across two of them.
#[derive(Debug, Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    /// The text of what has arrived, keeping an incomplete character for later.
    fn push(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.0) {
            Ok(_) => 0,
            // An incomplete sequence at the end (at most 3 bytes) waits for the rest.
            Err(e) if e.error_len().is_none() => self.0.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let tail = self.0.split_off(self.0.len() - keep);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = tail;
        text
    }

    fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.0)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_chunks_stay_whole() {
        let mut carry = Utf8Carry::default();
        let e_acute = "é".as_bytes();
        assert_eq!(carry.push(&[b'a', e_acute[0]]), "a");
        assert_eq!(carry.push(&[e_acute[1], b'b']), "éb");
        assert_eq!(carry.push(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(carry.push(&[e_acute[0]]), "");
        assert_eq!(carry.finish(), "\u{fffd}");
    }

    #[test]
    fn commands_split_as_a_shell_would() {
        let mut headers = HeaderMap::new();
        headers.insert("command", "sh -c 'echo \"a b\"; exit 3'".parse().unwrap());
        assert_eq!(command(&headers).unwrap(), ["sh", "-c", "echo \"a b\"; exit 3"]);
        headers.insert("command", "echo 'unterminated".parse().unwrap());
        assert!(command(&headers).is_err());
        headers.remove("command");
        assert!(command(&headers).is_err());
    }
}
