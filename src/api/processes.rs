//! `/apps/{app}/processes`, `/apps/{app}/logs` and `/apps/{app}/budget`: what runs, what it
//! says, and the stub the convox CLI asks for after `ps`.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::AppState;
use crate::api::apps::AppPath;
use crate::api::input::{Format, Pretty, QueryParams};
use crate::api::streams::{self, StreamRequest, Style};
use crate::error::{ApiError, ApiResult};
use crate::events::Follow;
use crate::runtime::ProcessInfo;
use crate::store::events::Topic;

/// `GET /apps/{app}/processes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListProcesses {
    release: Option<String>,
    service: Option<String>,
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn list_processes(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListProcesses>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<Vec<ProcessInfo>>> {
    let mut processes = list(&state, &app.name).await?;
    processes.retain(|p| {
        query.release.as_ref().is_none_or(|r| &p.release == r) && query.service.as_ref().is_none_or(|s| &p.name == s)
    });
    processes.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    Ok(Pretty(processes))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn show_process(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<ProcessInfo>> {
    let process = list(&state, &app.name).await?.into_iter().find(|p| p.id == id);
    process.map(Pretty).ok_or_else(|| ApiError::NotFound("process", id))
}

/// `DELETE /apps/{app}/processes/{id}`: the process is killed and its supervisor starts it again.
#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn restart_process(
    State(state): State<AppState>,
    Path((_, id)): Path<(String, String)>,
    format: Format,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    state
        .runtime
        .restart_process(&app.name, &id)
        .await
        .map_err(ApiError::runtime(format!("restarting process {id}")))?;
    Ok(format.ok(serde_json::json!({ "restarted": id })))
}

/// The app's processes, as the runtime has them.
pub(crate) async fn list(state: &AppState, app: &str) -> ApiResult<Vec<ProcessInfo>> {
    state
        .runtime
        .processes(app)
        .await
        .map_err(ApiError::runtime(format!("listing the processes of {app}")))
}

/// convox's log options, sent as headers (its websocket client cannot send a query string).
#[derive(Debug)]
pub(crate) struct LogOptions {
    pub follow: bool,
    pub prefix: bool,
    pub since: Option<std::time::Duration>,
    pub filter: Option<String>,
}

pub(crate) fn log_options(headers: &HeaderMap) -> ApiResult<LogOptions> {
    let text = |name: &str| crate::api::input::header_text(headers, name);
    let flag = |name: &str, default: bool| -> ApiResult<bool> {
        // Present but empty is neither: say so rather than guess.
        let v = match text(name)? {
            None if headers.contains_key(name) => "",
            None => return Ok(default),
            Some(v) => v,
        };
        v.parse()
            .map_err(|_| ApiError::BadRequest(format!("{name} must be true or false, got {v:?}")))
    };
    let since = match text("since")? {
        None => Some(std::time::Duration::from_secs(120)),
        Some("0") | Some("0s") => None,
        Some(v) => Some(parse_duration(v).ok_or_else(|| {
            ApiError::BadRequest(format!("Since must be a duration such as 30s, 5m or 1h0m0s, got {v:?}"))
        })?)
        // Longer ago than any event: the whole log (and no interval Postgres cannot hold).
        .filter(|since| *since < MAX_SINCE),
    };
    Ok(LogOptions {
        follow: flag("follow", true)?,
        prefix: flag("prefix", false)?,
        since,
        filter: text("filter")?.map(str::to_owned),
    })
}

/// The longest `Since` honoured as given (100 years); a longer one means the whole log.
const MAX_SINCE: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// A Go duration: `1h2m3s`, `5m`, `30s`, `250ms`.
fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push('s');
            chars.next();
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        total += value
            * match unit.as_str() {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                _ => return None,
            };
    }
    if !number.is_empty() {
        return None;
    }
    // Saturates: 10^400 hours is "everything", not a panic.
    Some(std::time::Duration::try_from_secs_f64(total).unwrap_or(std::time::Duration::MAX))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn stream_app_logs(
    State(state): State<AppState>,
    request: StreamRequest,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    logs(state, app, None, request).await
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn stream_service_logs(
    State(state): State<AppState>,
    Path((_, service)): Path<(String, String)>,
    request: StreamRequest,
    AppPath(app): AppPath,
) -> ApiResult<Response> {
    logs(state, app, Some(service), request).await
}

async fn logs(
    state: AppState,
    app: crate::store::apps::App,
    service: Option<String>,
    mut request: StreamRequest,
) -> ApiResult<Response> {
    let options = log_options(&request.headers)?;
    // Without an explicit cursor, start `Since` ago.
    if request.query.after.is_none() && request.headers.get("last-event-id").is_none() {
        request.query.after = Some(match options.since {
            Some(since) => crate::store::events::seq_before(&state.pool, &app.name, since).await?,
            None => 0,
        });
    }
    let extra = state
        .runtime
        .process_logs(crate::runtime::ProcessLogs {
            app: app.name.clone(),
            service: service.clone(),
            since: options.since,
            follow: options.follow,
        })
        .map(|lines| {
            let (app, filter) = (app.name.clone(), options.filter.clone());
            lines
                .filter(move |line| {
                    std::future::ready(filter.as_ref().is_none_or(|f| line.message.contains(f.as_str())))
                })
                .map(move |line| crate::store::events::Event {
                    app: app.clone(),
                    seq: 0,
                    build_id: None,
                    deployment_id: None,
                    at: line.at,
                    stream: line.stream,
                    message: line.message,
                    outcome: None,
                })
                .boxed()
        });
    let topic = Topic::App {
        app: app.name,
        service,
        filter: options.filter,
    };
    let style = if options.prefix { Style::Prefixed } else { Style::Raw };
    let follow = if options.follow {
        Follow::UntilEnd
    } else {
        Follow::Backlog
    };
    streams::respond_merged(&state, topic, request, style, follow, extra)
}

/// `GET /apps/{app}/budget`: rack keeps no budgets; `convox ps` asks anyway.
pub async fn show_budget(AppPath(_): AppPath) -> ApiResult<Pretty<serde_json::Value>> {
    Ok(Pretty(serde_json::json!({ "config": null, "state": null })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("5s"), Some(std::time::Duration::from_secs(5)));
        assert_eq!(parse_duration("1h0m0s"), Some(std::time::Duration::from_secs(3600)));
        assert_eq!(parse_duration("2m30s"), Some(std::time::Duration::from_secs(150)));
        assert_eq!(parse_duration("250ms"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("."), None);
        let huge = format!("{}h", "9".repeat(400));
        assert_eq!(parse_duration(&huge), Some(std::time::Duration::MAX));
    }
}
