//! `/webhooks` (admin only): register a URL for feed events, list and delete hooks, read a
//! hook's deliveries with every attempt, redeliver one. The secret that signs deliveries is
//! shown once, in the answer to the creation.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;
use crate::api::input::{Format, Input, Pretty, QueryParams};
use crate::error::{ApiError, ApiResult};
use crate::store::feed::KINDS;
use crate::store::webhooks::{self as store, Attempt, Delivery, Hook, Redelivery};

/// `POST /webhooks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateHook {
    /// Where deliveries are POSTed (http or https).
    url: String,
    /// Feed event kinds, or prefixes of them (`deployment.`), comma-separated.
    events: String,
    /// Only events of these apps, comma-separated (default: every app).
    apps: Option<String>,
}

/// A hook (its secret only in the answer to its creation).
#[derive(Debug, Serialize)]
pub struct HookView {
    id: Uuid,
    url: String,
    events: Vec<String>,
    /// null: every app.
    apps: Option<Vec<String>>,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    created: DateTime<Utc>,
    /// Since when every attempt failed (null: the last one succeeded, or none was made).
    failing_since: Option<DateTime<Utc>>,
    disabled: Option<DateTime<Utc>>,
    disabled_reason: Option<String>,
}

impl From<Hook> for HookView {
    fn from(h: Hook) -> Self {
        Self {
            id: h.id,
            url: h.url,
            events: h.events,
            apps: h.apps,
            enabled: h.enabled,
            secret: None,
            created: h.created_at,
            failing_since: h.failing_since,
            disabled: h.disabled_at,
            disabled_reason: h.disabled_reason,
        }
    }
}

/// A comma-separated list, trimmed; an empty item is a mistake, not "nothing".
fn list(field: &str, text: &str) -> ApiResult<Vec<String>> {
    text.split(',')
        .map(|item| {
            let item = item.trim();
            if item.is_empty() {
                let shown: String = text.chars().take(100).collect();
                Err(ApiError::BadRequest(format!(
                    "{field}: {shown:?} has an empty item: give a comma-separated list"
                )))
            } else {
                Ok(item.to_owned())
            }
        })
        .collect()
}

#[tracing::instrument(skip_all)]
pub async fn create_hook(State(state): State<AppState>, Input(body): Input<CreateHook>) -> ApiResult<Response> {
    let events = list("events", &body.events)?;
    if let Some(unknown) = events
        .iter()
        .find(|k| !KINDS.iter().any(|known| known.starts_with(k.as_str())))
    {
        let shown: String = unknown.chars().take(100).collect();
        return Err(ApiError::BadRequest(format!(
            "events: no event kind starts with {shown:?}; kinds are {}",
            KINDS.join(", ")
        )));
    }
    let apps = match body.apps.as_deref() {
        None => None,
        Some(text) => Some(
            list("apps", text)?
                .into_iter()
                .map(|app| {
                    crate::names::AppName::parse(&app)
                        .map(|name| name.to_string())
                        .map_err(|e| ApiError::BadRequest(format!("apps: {e}")))
                })
                .collect::<ApiResult<Vec<String>>>()?,
        ),
    };
    // Surrounding whitespace (a pasted URL's newline) is not part of it; inside, a control
    // character is a mistake.
    let url = body.url.trim_matches(|c: char| c.is_whitespace() || c.is_control());
    if url.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("url: it has control characters".into()));
    }
    let url = crate::webhooks::address::check_url(url, state.config.webhooks.allow_private)
        .await
        .map_err(|refusal| match refusal {
            crate::webhooks::address::Refusal::Invalid(why) => ApiError::BadRequest(why),
            crate::webhooks::address::Refusal::Unreachable(why) => ApiError::Unprocessable(why),
        })?;
    let secret = crate::webhooks::signature::new_secret();
    let new = store::NewHook {
        id: Uuid::now_v7(),
        url: url.as_str(),
        secret: &secret,
        events: &events,
        apps: apps.as_deref(),
    };
    let hook = store::insert(&state.pool, &new).await?;
    tracing::info!(webhook = %hook.id, "created webhook {} to {}", hook.id, crate::webhooks::redacted(&hook.url));
    let location = format!("/webhooks/{}", hook.id);
    let mut view = HookView::from(hook);
    view.secret = Some(secret);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Pretty(view)).into_response())
}

#[tracing::instrument(skip_all)]
pub async fn list_hooks(State(state): State<AppState>) -> ApiResult<Pretty<Vec<HookView>>> {
    Ok(Pretty(
        store::list(&state.pool)
            .await?
            .into_iter()
            .map(HookView::from)
            .collect(),
    ))
}

fn hook_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::NotFound("webhook", id.chars().take(40).collect()))
}

#[tracing::instrument(skip_all)]
pub async fn show_hook(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Pretty<HookView>> {
    let uuid = hook_id(&id)?;
    let hook = store::get(&state.pool, uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound("webhook", uuid.to_string()))?;
    Ok(Pretty(hook.into()))
}

#[tracing::instrument(skip_all)]
pub async fn delete_hook(State(state): State<AppState>, Path(id): Path<String>, format: Format) -> ApiResult<Response> {
    let uuid = hook_id(&id)?;
    if !store::delete(&state.pool, uuid).await? {
        return Err(ApiError::NotFound("webhook", uuid.to_string()));
    }
    tracing::info!(webhook = %uuid, "deleted webhook {uuid}");
    Ok(format.ok(serde_json::json!({ "deleted": uuid })))
}

/// `GET /webhooks/{id}/deliveries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// At most this many (default 50, at most 500).
    limit: Option<i64>,
    /// Only deliveries older than this one (the last of the previous page).
    before: Option<Uuid>,
}

/// A delivery with its attempts.
#[derive(Debug, Serialize)]
pub struct DeliveryView {
    #[serde(flatten)]
    delivery: Delivery,
    attempts_log: Vec<Attempt>,
}

#[tracing::instrument(skip_all)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<DeliveriesQuery>,
) -> ApiResult<Pretty<Vec<DeliveryView>>> {
    let uuid = hook_id(&id)?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".into()));
    }
    if store::get(&state.pool, uuid).await?.is_none() {
        return Err(ApiError::NotFound("webhook", uuid.to_string()));
    }
    let deliveries = store::deliveries(&state.pool, uuid, query.before, limit).await?;
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let mut attempts = store::attempts(&state.pool, &ids).await?;
    Ok(Pretty(
        deliveries
            .into_iter()
            .map(|delivery| {
                let (mine, rest): (Vec<Attempt>, Vec<Attempt>) =
                    attempts.drain(..).partition(|a| a.delivery_id == delivery.id);
                attempts = rest;
                DeliveryView {
                    delivery,
                    attempts_log: mine,
                }
            })
            .collect(),
    ))
}

#[tracing::instrument(skip_all)]
pub async fn redeliver(
    State(state): State<AppState>,
    Path((id, delivery)): Path<(String, String)>,
) -> ApiResult<Response> {
    let uuid = hook_id(&id)?;
    let not_found = || ApiError::NotFound("delivery", delivery.chars().take(40).collect());
    let delivery_id: Uuid = delivery.parse().map_err(|_| not_found())?;
    match store::redeliver(&state.pool, uuid, delivery_id).await? {
        Redelivery::Queued(delivery) => {
            tracing::info!(webhook = %uuid, delivery = %delivery_id, "redelivery of {delivery_id} queued");
            Ok((StatusCode::ACCEPTED, Pretty(delivery)).into_response())
        }
        Redelivery::NoHook => Err(ApiError::NotFound("webhook", uuid.to_string())),
        Redelivery::NoDelivery => Err(not_found()),
        Redelivery::Disabled => Err(ApiError::Conflict(
            "the webhook is disabled; create it again to receive deliveries".into(),
        )),
        Redelivery::InFlight => Err(ApiError::Conflict(
            "an attempt of this delivery is in flight; ask again once it is recorded".into(),
        )),
    }
}
