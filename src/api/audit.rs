//! The audit log: recorded for every state-changing request and every opening of a run, exec or
//! log stream (by the guard of `api::router`), and listed by `GET /audit` (admin) with filters
//! and cursor paging. Never a secret, an env value or a body: the method, the route and path,
//! the app and ids, the status, who (a token's name, or `password`) and from where.

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::AppState;
use crate::api::input::{Pretty, QueryParams};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::store::audit::{self, Entry, Filter};

/// What a request was, for its audit entry (taken before it runs).
#[derive(Debug)]
pub struct Pending {
    principal: Option<Principal>,
    method: String,
    route: String,
    path: String,
    request_id: String,
    client: String,
}

impl Pending {
    /// Notes what `request` to `route` is.
    pub fn of(request: &Request, route: &str) -> Self {
        Self {
            principal: request.extensions().get::<Principal>().cloned(),
            method: request.method().to_string(),
            route: route.to_owned(),
            path: request.uri().path().to_owned(),
            request_id: request
                .headers()
                .get("request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            client: crate::auth::client_address(request),
        }
    }

    /// Records the entry of the request, now that `response` answers it (in the background:
    /// the client does not wait for it).
    pub fn record(self, state: &AppState, response: &Response) {
        let (mut app, mut ids) = path_values(&self.route, &self.path);
        let location = response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
        if let Some(created) = location
            .and_then(|l| l.rsplit('/').next())
            .filter(|id| !id.is_empty() && !ids.iter().any(|i| i == id))
        {
            ids.push(created.to_owned());
        }
        // A created app is the app of its entry (`POST /apps` names none in its path).
        if app.is_none() {
            app = location
                .and_then(|l| l.strip_prefix("/apps/"))
                .map(|rest| rest.split('/').next().unwrap_or_default().to_owned());
        }
        let entry = Entry {
            id: Uuid::now_v7(),
            at: Utc::now(),
            actor: self
                .principal
                .as_ref()
                .map_or_else(|| "anonymous".to_owned(), |p| p.name.clone()),
            token_id: self.principal.as_ref().and_then(|p| p.token),
            method: self.method,
            route: self.route,
            path: self.path,
            app,
            ids,
            status: i32::from(response.status().as_u16()),
            request_id: self.request_id,
            client: self.client,
        };
        let pool = state.pool.clone();
        tokio::spawn(async move {
            if let Err(e) = audit::insert(&pool, &entry).await {
                tracing::warn!(error = %e, request.id = %entry.request_id, "recording the audit entry of {} {}", entry.method, entry.route);
            }
        });
    }
}

/// The app and the other path parameters of `path`, matched against `route`.
fn path_values(route: &str, path: &str) -> (Option<String>, Vec<String>) {
    let mut app = None;
    let mut ids = Vec::new();
    let mut segments = path.split('/');
    for pattern in route.split('/') {
        if pattern.starts_with("{*") {
            let rest: Vec<&str> = segments.by_ref().collect();
            ids.push(rest.join("/"));
            break;
        }
        let Some(segment) = segments.next() else { break };
        match pattern {
            "{app}" => app = Some(segment.to_owned()),
            p if p.starts_with('{') => ids.push(segment.to_owned()),
            _ => {}
        }
    }
    (app, ids)
}

/// `GET /audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListAudit {
    app: Option<String>,
    actor: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    /// The id of the last entry of the previous page.
    before: Option<Uuid>,
    limit: Option<i64>,
}

#[tracing::instrument(skip_all)]
pub async fn list_audit(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListAudit>,
) -> ApiResult<Pretty<Vec<Entry>>> {
    let limit = match query.limit {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and 1000, got {n}"
            )));
        }
    };
    let filter = Filter {
        app: query.app.as_deref(),
        actor: query.actor.as_deref(),
        since: query.since,
        until: query.until,
        before: query.before,
        limit,
    };
    Ok(Pretty(audit::list(&state.pool, &filter).await?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_values_name_the_app_and_the_ids() {
        assert_eq!(
            super::path_values("/apps/{app}/releases/{id}/promote", "/apps/web/releases/RABC/promote"),
            (Some("web".into()), vec!["RABC".into()])
        );
        assert_eq!(
            super::path_values("/apps/{app}/objects/{*key}", "/apps/web/objects/src/a.tgz"),
            (Some("web".into()), vec!["src/a.tgz".into()])
        );
        assert_eq!(
            super::path_values("/tokens/{id}", "/tokens/0193"),
            (None, vec!["0193".into()])
        );
    }
}
