//! `ApiError`, the one error type at the HTTP edge. Each variant has a status; 4xx messages
//! say what to fix, 5xx messages say nothing internal and their detail is logged once, here.
//! The body is shaped (JSON or text, by `Accept`) by `api::render_errors`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The message of an error response, attached to it so `api::render_errors` can render it in
/// the format the client asked for.
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: `<kind> not found: <name>` (the text the convox CLI matches).
    #[error("{0} not found: {1}")]
    NotFound(&'static str, String),
    /// 400: the request is malformed or invalid.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no or wrong credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: the credentials do not allow this, or the resource is in a state that forbids it.
    #[error("{0}")]
    Forbidden(String),
    /// 409: conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than allowed.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is in a format this route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: too many of something (failed logins, open streams); try again after
    /// `retry_after` seconds.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
    /// 422: well-formed but not acceptable.
    #[error("{0}")]
    Unprocessable(String),
    /// 501: this rack's runtime does not do this (the message says where it is supported).
    #[error("{0}")]
    NotImplemented(String),
    /// 507: the disk is too full for this (a build).
    #[error("{0}")]
    InsufficientStorage(String),
    /// 502: the runtime (the Kubernetes API) refused or failed what was asked of it.
    #[error("{context}: {source}")]
    Runtime {
        context: String,
        #[source]
        source: crate::runtime::RuntimeError,
    },
    /// 503: Postgres cannot be reached right now.
    #[error("the database is unavailable, try again shortly")]
    Unavailable(#[source] sqlx::Error),
    /// 500: a database error that is not the client's fault.
    #[error("internal server error")]
    Db(#[source] sqlx::Error),
    /// 500: anything else that is not the client's fault.
    #[error("internal server error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(..) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Runtime { .. } => StatusCode::BAD_GATEWAY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ApiError {
    /// The one mapping of a runtime failure while doing `context`: a process it does not have
    /// is 404, too many running 429, anything else 502.
    pub fn runtime(context: impl Into<String>) -> impl FnOnce(crate::runtime::RuntimeError) -> Self {
        use crate::runtime::RuntimeError;
        move |source| match source {
            RuntimeError::NoProcess(id) => Self::NotFound("process", id),
            RuntimeError::Busy(message) => Self::TooManyRequests {
                message,
                retry_after: 5,
            },
            source => Self::Runtime {
                context: context.into(),
                source,
            },
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if crate::store::is_unstorable_text(&error) {
            // Text Postgres cannot hold (a NUL character) that a field check did not catch.
            return Self::BadRequest("the request contains a NUL character, which rack cannot store: remove it".into());
        }
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => Self::Unavailable(error),
            error => Self::Db(error),
        }
    }
}

impl From<crate::jobs::deploys::LoadSpecError> for ApiError {
    /// A release that cannot run is the state of the app (409); Postgres failing is not.
    fn from(error: crate::jobs::deploys::LoadSpecError) -> Self {
        use crate::jobs::deploys::LoadSpecError;
        match error {
            LoadSpecError::Store { source, .. } => source.into(),
            LoadSpecError::Gone(ref release)
            | LoadSpecError::NoBuild(ref release)
            | LoadSpecError::Invalid { ref release, .. } => {
                Self::Conflict(format!("release {release} cannot run: {error}"))
            }
        }
    }
}

impl From<crate::jobs::deploys::StartError> for ApiError {
    /// Another deployment in progress is the state of the app (409); Postgres failing is not.
    fn from(error: crate::jobs::deploys::StartError) -> Self {
        use crate::jobs::deploys::StartError;
        match error {
            StartError::Busy => Self::Conflict(error.to_string()),
            StartError::Store(source) => source.into(),
        }
    }
}

impl From<crate::resource_data::DataError> for ApiError {
    fn from(error: crate::resource_data::DataError) -> Self {
        use crate::resource_data::DataError;
        match error {
            DataError::Upload(message) => Self::BadRequest(message),
            DataError::Refused(message) => Self::Unprocessable(message),
            DataError::Failed(source) => Self::Internal(source),
            DataError::TooLarge(limit) => Self::PayloadTooLarge(DataError::TooLarge(limit).to_string()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        Self::Internal(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Db(source) | Self::Unavailable(source) => {
                tracing::error!(error = %source, "request failed: {}", self);
            }
            Self::Internal(source) => tracing::error!(error = format!("{source:#}"), "request failed"),
            Self::Runtime { source, .. } => {
                tracing::warn!(error = %source, "request failed in the runtime: {}", self);
            }
            _ => {}
        }
        let message = self.to_string();
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        let retry_after = match &self {
            Self::TooManyRequests { retry_after, .. } => Some(*retry_after),
            // Postgres away or every connection busy: either passes, so say when to come back
            // (a client that honours it spreads a herd of reconnects instead of failing).
            Self::Unavailable(_) => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rack\""),
            );
        }
        response.extensions_mut().insert(ErrorMessage(message));
        response
    }
}

/// A `Result` whose error is an [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_variant() {
        assert_eq!(ApiError::NotFound("app", "x".into()).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ApiError::from(sqlx::Error::PoolTimedOut).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::from(sqlx::Error::RowNotFound).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn runtime_failures_map_once() {
        use crate::runtime::RuntimeError;
        let map = |e: RuntimeError| ApiError::runtime("doing it")(e);
        let missing = map(RuntimeError::NoProcess("web-1".into()));
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(missing.to_string(), "process not found: web-1");
        assert_eq!(
            map(RuntimeError::Busy("wait".into())).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        let failed = map(RuntimeError::Failed("no room".into()));
        assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(failed.to_string(), "doing it: no room");
    }

    #[test]
    fn internal_errors_say_nothing_internal() {
        let error = ApiError::from(anyhow::anyhow!("secret detail"));
        assert_eq!(error.to_string(), "internal server error");
        assert_eq!(
            ApiError::NotFound("app", "web".into()).to_string(),
            "app not found: web"
        );
    }
}
