//! `GET /system/logs` (convox `rack logs`): rack's own log (`rack_log`) as a stream, with the
//! options of an app's log as headers (`Follow`, `Since`, `Filter`, `Prefix`). Admin only: it
//! tells of every app.

use axum::extract::State;
use axum::response::Response;
use futures_util::StreamExt;

use crate::AppState;
use crate::api::streams::{self, StreamRequest, Style};
use crate::error::ApiResult;
use crate::store::events::Event;

/// The stream name of rack's own lines (`<time> <stream> <message>` with `Prefix: true`).
pub const STREAM: &str = "system/rack";

#[tracing::instrument(skip_all)]
pub async fn stream_system_logs(State(state): State<AppState>, request: StreamRequest) -> ApiResult<Response> {
    let options = crate::api::processes::log_options(&request.headers)?;
    let since = options
        .since
        .and_then(|since| chrono::Duration::from_std(since).ok())
        .map(|since| chrono::Utc::now() - since);
    let filter = options.filter.clone();
    let keep = move |line: &crate::rack_log::Line| {
        since.is_none_or(|since| line.at >= since) && filter.as_deref().is_none_or(|filter| line.text.contains(filter))
    };
    let (recent, followers) = crate::rack_log::snapshot();
    let past: Vec<Event> = recent
        .iter()
        .filter(|line| keep(line))
        .map(|line| event(line))
        .collect();
    let past = futures_util::stream::iter(past);
    let lines = if options.follow {
        let live = futures_util::stream::unfold((followers, keep), |(mut followers, keep)| async move {
            loop {
                match followers.recv().await {
                    Ok(line) if keep(&line) => return Some((event(&line), (followers, keep))),
                    // Filtered out, or fell behind: go on with what comes next.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        past.chain(live).boxed()
    } else {
        past.boxed()
    };
    let style = if options.prefix { Style::Prefixed } else { Style::Raw };
    streams::respond_lines(&state, request, lines, style)
}

fn event(line: &crate::rack_log::Line) -> Event {
    Event {
        app: String::new(),
        seq: 0,
        build_id: None,
        deployment_id: None,
        at: line.at,
        stream: STREAM.to_owned(),
        message: format!("{} {}", line.level, line.text),
        outcome: None,
    }
}
