//! `/tokens`: scoped API tokens for CI systems and dashboards (admin only). The secret is
//! shown once, when the token is created; only its SHA-256 is stored.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;
use crate::api::input::{Format, Input, Pretty};
use crate::auth::Role;
use crate::error::{ApiError, ApiResult};
use crate::store;

/// `POST /tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    name: String,
    role: String,
}

/// A token (its secret only in the answer to its creation).
#[derive(Debug, Serialize)]
pub struct TokenView {
    id: Uuid,
    name: String,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    created: DateTime<Utc>,
    last_used: Option<DateTime<Utc>>,
}

impl From<store::tokens::Token> for TokenView {
    fn from(t: store::tokens::Token) -> Self {
        Self {
            id: t.id,
            name: t.name,
            role: t.role,
            token: None,
            created: t.created_at,
            last_used: t.last_used_at,
        }
    }
}

#[tracing::instrument(skip_all)]
pub async fn create_token(State(state): State<AppState>, Input(body): Input<CreateToken>) -> ApiResult<Response> {
    let role: Role = body.role.parse().map_err(ApiError::BadRequest)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::BadRequest("name must be 1 to 100 characters".into()));
    }
    let (secret, hash) = crate::auth::new_token();
    let token = store::tokens::insert(&state.pool, Uuid::now_v7(), name, role, &hash).await?;
    tracing::info!(token.id = %token.id, role = role.as_str(), "created token {} ({})", token.id, token.name);
    let location = format!("/tokens/{}", token.id);
    let mut view = TokenView::from(token);
    view.token = Some(secret);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Pretty(view)).into_response())
}

#[tracing::instrument(skip_all)]
pub async fn list_tokens(State(state): State<AppState>) -> ApiResult<Pretty<Vec<TokenView>>> {
    Ok(Pretty(
        store::tokens::list(&state.pool)
            .await?
            .into_iter()
            .map(TokenView::from)
            .collect(),
    ))
}

#[tracing::instrument(skip_all)]
pub async fn delete_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    format: Format,
) -> ApiResult<Response> {
    let not_found = || ApiError::NotFound("token", id.chars().take(40).collect());
    let uuid: Uuid = id.parse().map_err(|_| not_found())?;
    if !store::tokens::delete(&state.pool, uuid).await? {
        return Err(not_found());
    }
    tracing::info!(token.id = %uuid, "revoked token {uuid}");
    Ok(format.ok(serde_json::json!({ "deleted": uuid })))
}
