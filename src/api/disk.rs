//! `GET /system/usage`: the disk the rack uses, by kind and by app (see `crate::disk`).

use axum::Extension;
use axum::extract::State;

use crate::AppState;
use crate::api::input::Pretty;
use crate::auth::Principal;
use crate::disk::Usage;
use crate::error::{ApiError, ApiResult};

#[tracing::instrument(skip_all)]
pub async fn show_usage(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Pretty<Usage>> {
    if principal.apps.is_some() {
        return Err(ApiError::Forbidden(
            "this credential is limited to some apps; /system/usage shows the whole rack's disk".into(),
        ));
    }
    Ok(Pretty(crate::disk::usage(&state).await?))
}
