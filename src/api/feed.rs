//! The rack-wide feed of typed events (`GET /events`, `GET /apps/{app}/events`) for
//! dashboards: NDJSON over chunked HTTP (the default), `text/event-stream` (`event:` = kind,
//! `id:`, JSON `data:`) or a websocket (JSON text frames). Resumable with `after` or
//! `Last-Event-ID`; without a cursor it starts with what happens next. Filtered by app and by
//! kind prefix. Idle streams get heartbeats; a slow reader only delays itself (the bus hands
//! it what it missed from Postgres when it comes back).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, Stream, StreamExt};
use serde::Deserialize;

use crate::AppState;
use crate::api::streams::{SHUTTING_DOWN, StreamRequest, credential_end, guarded, resume_point, stream_socket};
use crate::error::{ApiError, ApiResult};
use crate::events::{Follow, Item};
use crate::store::feed::{FeedEvent, FeedFilter, KINDS};

/// How long an idle feed waits before it sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// The query of a feed request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    /// Resume after this event id (as `Last-Event-ID` does); `0`: everything still kept.
    pub after: Option<i64>,
    /// Only these apps (comma-separated).
    pub app: Option<String>,
    /// Only kinds starting with one of these (comma-separated), e.g. `deployment.,build.failed`.
    pub kind: Option<String>,
    /// `false`: what exists now, then the stream ends (default `true`: follow forever).
    pub follow: Option<bool>,
}

/// A feed request: the query, the headers (cursor, `Accept`) and a websocket upgrade, if any.
pub type FeedRequest = StreamRequest<FeedQuery>;

#[tracing::instrument(skip_all)]
pub async fn stream_feed(State(state): State<AppState>, request: FeedRequest) -> ApiResult<Response> {
    let apps = split(request.query.app.as_deref());
    for app in &apps {
        crate::names::AppName::parse(app).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    // A credential limited to some apps sees only their events.
    let allowed = request.principal.as_ref().and_then(|p| p.apps.clone());
    let apps = match (apps.is_empty(), allowed) {
        (true, None) => None,
        (true, Some(allowed)) => Some(allowed.to_vec()),
        (false, allowed) => {
            if let Some(outside) = apps
                .iter()
                .find(|a| allowed.as_ref().is_some_and(|allowed| !allowed.contains(a)))
            {
                return Err(ApiError::Forbidden(format!(
                    "this credential may not read the events of app {outside}"
                )));
            }
            Some(apps)
        }
    };
    respond(&state, apps, request).await
}

#[tracing::instrument(skip_all, fields(app.name = %app))]
pub async fn stream_app_feed(
    State(state): State<AppState>,
    Path(app): Path<String>,
    request: FeedRequest,
) -> ApiResult<Response> {
    if request.query.app.is_some() {
        return Err(ApiError::BadRequest(
            "`app` is the path's app here; use GET /events?app=... for several apps".into(),
        ));
    }
    // A deleted app's events stay readable (its `app.deleted` among them) until they expire.
    let app = crate::api::apps::app_name(&app)?;
    respond(&state, Some(vec![app.as_str().to_owned()]), request).await
}

/// Comma-separated values, trimmed, empty ones dropped.
fn split(list: Option<&str>) -> Vec<String> {
    list.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn respond(state: &AppState, apps: Option<Vec<String>>, request: FeedRequest) -> ApiResult<Response> {
    let kinds = split(request.query.kind.as_deref());
    // `kind=` names nothing: a filter that was meant and got lost, not "every kind".
    if request.query.kind.is_some() && kinds.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "kind names no event kind; leave it out for every kind, or give some of {}",
            KINDS.join(", ")
        )));
    }
    if let Some(unknown) = kinds
        .iter()
        .find(|k| !KINDS.iter().any(|known| known.starts_with(k.as_str())))
    {
        return Err(ApiError::BadRequest(format!(
            "no event kind starts with {unknown:?}; kinds are {}",
            KINDS.join(", ")
        )));
    }
    let follow = if request.query.follow.unwrap_or(true) {
        Follow::UntilEnd
    } else {
        Follow::Backlog
    };
    let after = match resume_point(&request.headers, request.query.after)? {
        Some(after) => after,
        // No cursor: from now on (`after=0` asks for everything still kept).
        None => crate::store::feed::horizon(&state.pool).await?,
    };
    let slot = state.streams.take(request.principal.as_ref())?;
    let items = state.bus.feed(FeedFilter { apps, kinds }, after, follow).boxed();
    let items = guarded(
        items,
        credential_end(state, request.principal.as_ref()),
        (slot, state.metrics.stream("feed")),
    );
    if let Some(ws) = request.ws {
        return Ok(stream_socket(ws).on_upgrade(move |socket| websocket(socket, items)));
    }
    let accept = request
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if accept.contains("text/event-stream") {
        Ok(sse(items).into_response())
    } else {
        Ok(ndjson(items))
    }
}

type Items = futures_util::stream::BoxStream<'static, Result<Item<FeedEvent>, sqlx::Error>>;

/// What a feed says besides events: a heartbeat, why it ended. Same shape as an event's
/// `kind` and `message`, so a reader can switch on `kind` alone.
fn notice(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "kind": kind, "at": chrono::Utc::now(), "message": message })
}

/// The JSON of one item; `None` for an idle tick that needs no heartbeat yet.
fn json_of(item: Result<Item<FeedEvent>, sqlx::Error>, last_write: &mut Instant) -> Option<(String, bool)> {
    let (json, ends) = match item {
        Ok(Item::Event(event)) => (serde_json::to_value(&event).unwrap_or_default(), false),
        Ok(Item::Idle) if last_write.elapsed() < HEARTBEAT => return None,
        Ok(Item::Idle) => (notice("heartbeat", ""), false),
        Ok(Item::ShuttingDown) => (notice("shutdown", SHUTTING_DOWN), true),
        Ok(Item::Closed(reason)) => (notice("closed", &reason), true),
        Err(error) => {
            tracing::warn!(error = %error, "reading the feed");
            (
                notice("error", "the event log is unavailable; reconnect to resume"),
                true,
            )
        }
    };
    *last_write = Instant::now();
    Some((json.to_string(), ends))
}

fn ndjson(items: Items) -> Response {
    let mut last_write = Instant::now();
    let body = items.filter_map(move |item| {
        let line = json_of(item, &mut last_write).map(|(json, _)| Ok::<_, Infallible>(Bytes::from(json + "\n")));
        std::future::ready(line)
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    // Proxies must pass lines on as they come.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn sse(items: Items) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let events = items.filter_map(|item| {
        let event = match item {
            Ok(Item::Event(event)) => Some(
                SseEvent::default()
                    .id(event.id.to_string())
                    .event(event.kind.clone())
                    .json_data(&event)
                    .unwrap_or_default(),
            ),
            // KeepAlive sends comments while idle.
            Ok(Item::Idle) => None,
            Ok(Item::ShuttingDown) => Some(SseEvent::default().event("shutdown").data(SHUTTING_DOWN)),
            Ok(Item::Closed(reason)) => Some(SseEvent::default().event("closed").data(reason)),
            Err(error) => {
                tracing::warn!(error = %error, "reading the feed");
                Some(
                    SseEvent::default()
                        .event("error")
                        .data("the event log is unavailable; reconnect to resume"),
                )
            }
        };
        std::future::ready(event.map(Ok))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(HEARTBEAT))
}

/// JSON text frames; pings while idle; a close frame at the end. The reader half notices a
/// client that left.
async fn websocket(socket: WebSocket, mut items: Items) {
    let (mut sink, mut source) = socket.split();
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    });
    let mut last_write = Instant::now();
    loop {
        let item = tokio::select! {
            _ = &mut reader => return,
            item = items.next() => item,
        };
        let Some(item) = item else { break };
        let idle = matches!(item, Ok(Item::Idle));
        let sent = match json_of(item, &mut last_write) {
            None => continue,
            // A ping, not a JSON heartbeat: the websocket has its own.
            Some(_) if idle => sink.send(Message::Ping(Bytes::new())).await,
            Some((json, ends)) => {
                let sent = sink.send(Message::Text(json.into())).await;
                if ends {
                    break;
                }
                sent
            }
        };
        if sent.is_err() {
            reader.abort();
            return;
        }
    }
    let _ = sink.close().await;
    reader.abort();
}
