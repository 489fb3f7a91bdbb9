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
    /// The apps it may act on, comma-separated (default: every app).
    apps: Option<String>,
    /// How long it lives: seconds, or a number with `m`, `h` or `d` (default: until revoked).
    expires_in: Option<String>,
}

/// A token (its secret only in the answer to its creation).
#[derive(Debug, Serialize)]
pub struct TokenView {
    id: Uuid,
    name: String,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// The apps it may act on (null: every app).
    apps: Option<Vec<String>>,
    expires: Option<DateTime<Utc>>,
    created: DateTime<Utc>,
    last_used: Option<DateTime<Utc>>,
    /// The address it was last used from.
    last_used_from: Option<String>,
}

impl From<store::tokens::Token> for TokenView {
    fn from(t: store::tokens::Token) -> Self {
        Self {
            id: t.id,
            name: t.name,
            role: t.role,
            token: None,
            apps: t.apps,
            expires: t.expires_at,
            created: t.created_at,
            last_used: t.last_used_at,
            last_used_from: t.last_used_from,
        }
    }
}

#[tracing::instrument(skip_all)]
pub async fn create_token(State(state): State<AppState>, Input(body): Input<CreateToken>) -> ApiResult<Response> {
    let role: Role = body.role.parse().map_err(ApiError::BadRequest)?;
    let name = body.name.trim();
    if name.is_empty() || body.name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "name must be 1 to 100 characters, not blank, without control characters".into(),
        ));
    }
    let apps = match body.apps.as_deref() {
        None => None,
        // Left out is every app; given, it must name some: an empty list (or an empty name in
        // it, `a,,b`) is a mistake (`--app ""` from an unset variable), never every app.
        Some(list) => Some(
            list.split(',')
                .map(|app| {
                    if app.trim().is_empty() {
                        let shown: String = list.chars().take(100).collect();
                        return Err(ApiError::BadRequest(format!(
                            "apps: {shown:?} has an empty app name: name the apps (comma-separated), or leave apps out for every app"
                        )));
                    }
                    crate::names::AppName::parse(app.trim())
                        .map(|name| name.to_string())
                        .map_err(|e| ApiError::BadRequest(format!("apps: {e}")))
                })
                .collect::<ApiResult<Vec<String>>>()?,
        ),
    };
    let expires_at = match body.expires_in.as_deref() {
        None => None,
        Some(text) => Some(Utc::now() + chrono::Duration::from_std(lifetime(text)?).unwrap_or(chrono::Duration::MAX)),
    };
    let (secret, hash) = crate::auth::new_token();
    let new = store::tokens::NewToken {
        id: Uuid::now_v7(),
        name,
        role,
        hash: &hash,
        apps: apps.as_deref(),
        expires_at,
    };
    let token = store::tokens::insert(&state.pool, &new).await?;
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

/// A token's lifetime: seconds, or a number with `m`, `h` or `d` (`30d`).
fn lifetime(text: &str) -> ApiResult<std::time::Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && scale > 0 && n <= 3650 * 86_400 / scale => Ok(std::time::Duration::from_secs(n * scale)),
        _ => Err(ApiError::BadRequest(format!(
            "expires_in must be a number of seconds, or of minutes, hours or days such as 90m, 12h or 30d (at most 10 years), got {text:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lifetimes_read_like_people_write_them() {
        assert_eq!(super::lifetime("30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(super::lifetime("90").unwrap().as_secs(), 90);
        assert_eq!(super::lifetime("12h").unwrap().as_secs(), 12 * 3600);
        for bad in ["", "0", "x", "5y", "-1d", "99999d"] {
            assert!(super::lifetime(bad).is_err(), "{bad}");
        }
    }
}
