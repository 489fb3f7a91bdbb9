//! `GET /system/logs` (convox `rack logs`): rack's own log as a stream, with the options of an
//! app's log as headers (`Follow`, `Since`, `Filter`, `Prefix`). Admin only: it tells of every
//! app. A `rack server` reads it from Postgres, where every replica writes its lines
//! (`jobs::rack_log`): one stream carries them all, in order, resumable by line id. A server
//! embedded in another process serves that process's log from memory (`rack_log`).

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
    if state.config.shared_rack_log {
        return stream_stored(state, request).await;
    }
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

/// Every replica's lines from Postgres: after the client's cursor (`after`, `Last-Event-ID`),
/// else from `Since` ago, else the newest [`crate::rack_log::KEEP`]; then, following, each
/// new line as any replica writes it.
async fn stream_stored(state: AppState, request: StreamRequest) -> ApiResult<Response> {
    let options = crate::api::processes::log_options(&request.headers)?;
    let after = match streams::resume_point(&request.headers, request.query.after)? {
        Some(after) => after,
        None => match options.since {
            Some(since) => crate::store::rack_log::seq_before(&state.pool, since).await?,
            None => crate::store::rack_log::seq_of_last(&state.pool, KEEP_LINES).await?,
        },
    };
    let reader = Reader {
        pool: state.pool.clone(),
        wake: state.bus.subscribe(),
        filter: options.filter.clone(),
        follow: options.follow,
        after,
        pending: std::collections::VecDeque::new(),
    };
    let lines = futures_util::stream::unfold(reader, Reader::next).boxed();
    let style = if options.prefix { Style::Prefixed } else { Style::Raw };
    streams::respond_lines(&state, request, lines, style)
}

/// Lines a client is shown without a cursor or `Since`.
const KEEP_LINES: i64 = crate::rack_log::KEEP as i64;

/// Lines read per query.
const PAGE: i64 = 500;

/// One client's place in the stored log.
struct Reader {
    pool: sqlx::PgPool,
    /// Subscribed before the first read, so no line committed after it goes unnoticed.
    wake: tokio::sync::broadcast::Receiver<crate::events::Wake>,
    filter: Option<String>,
    follow: bool,
    after: i64,
    pending: std::collections::VecDeque<Event>,
}

impl Reader {
    async fn next(mut self) -> Option<(Event, Self)> {
        use crate::events::Wake;
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((line, self));
            }
            // A failed read ends the stream; the client resumes from the last id it got.
            let page = crate::store::rack_log::list_after(&self.pool, self.after, self.filter.as_deref(), PAGE)
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "reading rack's log"))
                .ok()?;
            if let Some(last) = page.last() {
                self.after = last.seq;
                self.pending.extend(page);
                continue;
            }
            if !self.follow {
                return None;
            }
            loop {
                match self.wake.recv().await {
                    Ok(Wake::RackLog | Wake::All) | Err(RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    }
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
