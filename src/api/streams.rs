//! Event streams over HTTP, one subscription rendered three ways: a websocket (convox framing:
//! text frames, one empty binary frame at the end), `text/event-stream` (ids, resumable with
//! `Last-Event-ID`, a final `end` event) or chunked `text/plain` lines ending `OK` or
//! `ERROR: <reason>`. A client that goes away cancels nothing but its own subscription.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, Stream, StreamExt};
use serde::Deserialize;

use crate::AppState;
use crate::api::input::QueryParams;
use crate::api::limits::StreamSlot;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::events::Wake;
use crate::events::{Follow, Item, format_line, outcome_line};
use crate::store::events::{Event, Outcome, Topic};
use futures_util::FutureExt;
use tokio::sync::broadcast;

/// The line that ends a stream when the server stops, so clients know to reconnect.
pub const SHUTTING_DOWN: &str = "rack: this server is shutting down; reconnect to resume";

/// The query of a stream request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Resume after this event id (as `Last-Event-ID` does).
    pub after: Option<i64>,
    /// Start each text line with its event id (`<id> <line>`), so a chunked-text client knows
    /// where to resume.
    #[serde(default)]
    pub ids: bool,
}

/// How lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// The message alone (build output, as convox prints it).
    Raw,
    /// `<RFC3339> <stream> <message>`.
    Prefixed,
}

/// What a client asked for. Extracted from a `GET` (a websocket upgrade, if it is one, the
/// headers and the query: a log's cursor, or a feed's filters), or made by a handler that
/// streams its answer.
#[derive(Debug)]
pub struct StreamRequest<Q = StreamQuery> {
    pub ws: Option<WebSocketUpgrade>,
    pub headers: HeaderMap,
    pub query: Q,
    /// Who opened it: the stream counts against their limit, and ends with their credential.
    pub principal: Option<Principal>,
}

impl<S, Q> FromRequestParts<S> for StreamRequest<Q>
where
    S: Send + Sync,
    Q: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ws = WebSocketUpgrade::from_request_parts(parts, state).await.ok();
        let QueryParams(query) = QueryParams::from_request_parts(parts, state).await?;
        Ok(Self {
            ws,
            headers: parts.headers.clone(),
            query,
            principal: parts.extensions.get::<Principal>().cloned(),
        })
    }
}

/// Answers `request` with the events of `topic`.
///
/// # Errors
/// 400 when the cursor is malformed.
pub fn respond(
    state: &AppState,
    topic: Topic,
    request: StreamRequest,
    style: Style,
    follow: Follow,
) -> ApiResult<Response> {
    respond_merged(state, topic, request, style, follow, None)
}

/// Lines from outside the event log (pod logs), merged into a stream as they come. They have
/// no event id (seq 0): resuming a stream resumes its events, not these.
pub type Extra = futures_util::stream::BoxStream<'static, Event>;

/// [`respond`], with `extra` lines merged in as they come: the stream ends once both have
/// ended; `extra` stops at shutdown too.
///
/// # Errors
/// 400 when the cursor is malformed.
pub fn respond_merged(
    state: &AppState,
    topic: Topic,
    request: StreamRequest,
    style: Style,
    follow: Follow,
    extra: Option<Extra>,
) -> ApiResult<Response> {
    let after = cursor(&request.headers, &request.query)?;
    let slot = state.streams.take(request.principal.as_ref())?;
    // An app's log never ends: the outcome of a build or deployment in it is an ordinary line.
    let style = Render {
        style,
        outcomes: !matches!(topic, Topic::App { .. }),
        ids: request.query.ids,
    };
    let events = state.bus.events(topic, after, follow);
    let items = match extra {
        None => events.boxed(),
        Some(extra) => {
            let extra = extra
                .map(|event| Ok(Item::Event(event)))
                .take_until(state.shutdown.clone().cancelled_owned());
            futures_util::stream::select(events, extra).boxed()
        }
    };
    Ok(deliver(state, request, items, slot, style))
}

/// Answers `request` with `lines` from outside the event log (rack's own log): ids (for
/// `?ids=true` and SSE) only on lines that have one, a heartbeat while idle, and a last line
/// when the server stops.
///
/// # Errors
/// 429 when the credential has too many streams open.
pub fn respond_lines(
    state: &AppState,
    request: StreamRequest,
    lines: futures_util::stream::BoxStream<'static, Event>,
    style: Style,
) -> ApiResult<Response> {
    let slot = state.streams.take(request.principal.as_ref())?;
    let render = Render {
        style,
        outcomes: false,
        ids: request.query.ids,
    };
    let shutdown = state.shutdown.clone();
    // A stopping server says so last; lines that simply ended (not following) end the stream.
    let stopping = futures_util::stream::once(async move { shutdown.is_cancelled().then_some(Ok(Item::ShuttingDown)) })
        .filter_map(std::future::ready);
    let lines = lines
        .map(|event| Ok(Item::Event(event)))
        .take_until(state.shutdown.clone().cancelled_owned())
        .chain(stopping)
        .map(Some)
        .chain(futures_util::stream::once(async { None }));
    let heartbeat = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Some((Some(Ok(Item::Idle)), ()))
    });
    // The lines first; the heartbeat only while they are idle, and it stops with them.
    let items =
        futures_util::stream::select_with_strategy(lines, heartbeat, |_: &mut ()| futures_util::stream::PollNext::Left)
            .take_while(|item| std::future::ready(item.is_some()))
            .filter_map(std::future::ready)
            .boxed();
    Ok(deliver(state, request, items, slot, render))
}

/// Ends `items` with the credential (revoked or expired) and counts it in the stream gauge,
/// then answers on the transport `request` asked for: a websocket, SSE, or chunked text.
fn deliver(
    state: &AppState,
    request: StreamRequest,
    items: futures_util::stream::BoxStream<'static, Result<Item, sqlx::Error>>,
    slot: StreamSlot,
    render: Render,
) -> Response {
    let items = guarded(
        items,
        credential_end(state, request.principal.as_ref()),
        (slot, state.metrics.stream("logs")),
    );
    if let Some(ws) = request.ws {
        return stream_socket(ws).on_upgrade(move |socket| websocket(socket, items, render));
    }
    let wants_sse = request
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        sse(items, render).into_response()
    } else {
        text(items, render)
    }
}

/// The settings of a websocket that streams events: its client sends nothing but control
/// frames, and a rack may hold thousands of them, so its buffers are small (the library's
/// default of 128 KiB each way cost 850 MiB for 10 000 subscribers in benches/suite.rs).
pub fn stream_socket(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// `items`, ended by `end` (the stream's credential was revoked or expired) with a last item
/// saying why; `slot` is held until the stream is over.
pub fn guarded<E: Send + 'static>(
    items: futures_util::stream::BoxStream<'static, Result<Item<E>, sqlx::Error>>,
    end: futures_util::future::BoxFuture<'static, String>,
    slot: (StreamSlot, crate::metrics::StreamGauge),
) -> futures_util::stream::BoxStream<'static, Result<Item<E>, sqlx::Error>> {
    futures_util::stream::unfold(Some((items, end, slot)), |state| async move {
        let (mut items, mut end, slot) = state?;
        tokio::select! {
            item = items.next() => item.map(|item| (item, Some((items, end, slot)))),
            reason = &mut end => Some((Ok(Item::Closed(reason)), None)),
        }
    })
    .boxed()
}

/// Resolves (with the reason) when the token of `principal` is revoked, on any replica, or
/// expires; never for the rack password.
pub fn credential_end(
    state: &AppState,
    principal: Option<&Principal>,
) -> futures_util::future::BoxFuture<'static, String> {
    let Some(id) = principal.and_then(|p| p.token) else {
        return std::future::pending().boxed();
    };
    let expires = principal.and_then(|p| p.expires);
    let mut wake = state.bus.subscribe();
    let pool = state.pool.clone();
    async move {
        let expiry = async {
            match expires.and_then(|at| (at - chrono::Utc::now()).to_std().ok()) {
                Some(left) => tokio::time::sleep(left).await,
                None if expires.is_some() => {}
                None => std::future::pending().await,
            }
        };
        let revoked = async {
            loop {
                match wake.recv().await {
                    Ok(Wake::Revoked(revoked)) if revoked == id => return,
                    // Notices may have been missed: ask the database.
                    Ok(Wake::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        if matches!(crate::store::tokens::is_valid(&pool, id).await, Ok(false)) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            () = expiry => "rack: the token of this stream expired".to_owned(),
            () = revoked => "rack: the token of this stream was revoked".to_owned(),
        }
    }
    .boxed()
}

fn cursor(headers: &HeaderMap, query: &StreamQuery) -> ApiResult<i64> {
    Ok(resume_point(headers, query.after)?.unwrap_or(0))
}

/// Where a client resumes: `after` (from the query) wins over `Last-Event-ID`, but a malformed
/// header is refused all the same; `None` when it gave neither.
///
/// # Errors
/// 400 when `Last-Event-ID` is not an event id.
pub fn resume_point(headers: &HeaderMap, after: Option<i64>) -> ApiResult<Option<i64>> {
    let header = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .map(|v| v.max(0))
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be an event id (a number)".into()))?,
        ),
    };
    Ok(after.map(|a| a.max(0)).or(header))
}

/// How one stream renders its events.
#[derive(Debug, Clone, Copy)]
struct Render {
    style: Style,
    /// Whether an event with an outcome ends the stream with `OK` / `ERROR: <reason>`.
    outcomes: bool,
    /// Whether text lines start with their event id.
    ids: bool,
}

fn line(event: &Event, render: Render) -> String {
    with_id(event, render, format_line(event, render.style == Style::Prefixed))
}

fn with_id(event: &Event, render: Render, text: String) -> String {
    if render.ids && event.seq > 0 {
        format!("{} {text}", event.seq)
    } else {
        text
    }
}

/// The lines of a text or websocket rendering of one item; `None` ends the stream. The
/// websocket (convox's framing) ends a successful topic with no line of its own: the empty
/// binary frame says it all.
fn text_of(item: Result<Item, sqlx::Error>, style: Render, say_ok: bool) -> Option<String> {
    match item {
        Ok(Item::Event(event)) if !style.outcomes => Some(line(&event, style)),
        // The websocket ends a successful topic silently: its empty binary frame says it all.
        Ok(Item::Event(event)) if event.outcome == Some(Outcome::Ok) && !say_ok => Some(String::new()),
        Ok(Item::Event(event)) => match outcome_line(&event) {
            Some(line) => Some(with_id(&event, style, line)),
            None => Some(line(&event, style)),
        },
        Ok(Item::Idle) => Some(String::new()),
        Ok(Item::ShuttingDown) => Some(format!("{SHUTTING_DOWN}\n")),
        Ok(Item::Closed(reason)) => Some(format!("{reason}\n")),
        Err(error) => {
            tracing::warn!(error = %error, "reading events for a stream");
            Some("ERROR: the event log is unavailable; reconnect to resume\n".to_owned())
        }
    }
}

fn text<S>(items: S, style: Render) -> Response
where
    S: Stream<Item = Result<Item, sqlx::Error>> + Send + 'static,
{
    let body = items.filter_map(move |item| async move {
        let text = text_of(item, style, true)?;
        (!text.is_empty()).then(|| Ok::<_, Infallible>(Bytes::from(text)))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Proxies must pass lines on as they come.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn sse<S>(items: S, style: Render) -> impl IntoResponse
where
    S: Stream<Item = Result<Item, sqlx::Error>> + Send + 'static,
{
    let events = items.filter_map(move |item| async move {
        let event = match item {
            Ok(Item::Event(event)) => match event.outcome.filter(|_| style.outcomes) {
                Some(outcome) => SseEvent::default()
                    .id(event.seq.to_string())
                    .event("end")
                    .json_data(serde_json::json!({ "outcome": outcome, "message": event.message }))
                    .unwrap_or_default(),
                None => {
                    let sse = SseEvent::default().data(line(&event, style).trim_end_matches('\n'));
                    // Lines from outside the event log have no id to resume from.
                    if event.seq > 0 {
                        sse.id(event.seq.to_string())
                    } else {
                        sse
                    }
                }
            },
            // KeepAlive sends comments while idle.
            Ok(Item::Idle) => return None,
            Ok(Item::ShuttingDown) => SseEvent::default().event("shutdown").data(SHUTTING_DOWN),
            Ok(Item::Closed(reason)) => SseEvent::default().event("closed").data(reason),
            Err(error) => {
                tracing::warn!(error = %error, "reading events for a stream");
                SseEvent::default()
                    .event("error")
                    .data("the event log is unavailable; reconnect to resume")
            }
        };
        Some(Ok::<_, Infallible>(event))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Writes the stream as convox does: text frames, then one empty binary frame. Pings keep idle
/// connections open through proxies; the reader half notices a client that left.
async fn websocket<S>(socket: WebSocket, items: S, style: Render)
where
    S: Stream<Item = Result<Item, sqlx::Error>> + Send + 'static,
{
    let (mut sink, mut source) = socket.split();
    // Reading also answers the client's pings (the library does it while we read).
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    });
    let mut items = std::pin::pin!(items);
    loop {
        let item = tokio::select! {
            _ = &mut reader => return,
            item = items.next() => item,
        };
        let Some(item) = item else { break };
        let Some(text) = text_of(item, style, false) else { break };
        let sent = if text.is_empty() {
            // Idle (or the silent end of a successful topic): a ping keeps proxies from
            // cutting the connection.
            sink.send(Message::Ping(Bytes::new())).await
        } else {
            sink.send(Message::Text(text.into())).await
        };
        if sent.is_err() {
            reader.abort();
            return;
        }
    }
    let _ = sink.send(Message::Binary(Bytes::new())).await;
    let _ = sink.close().await;
    reader.abort();
}
