//! Request and response encodings. Requests come as forms (what the convox CLI sends) or JSON
//! (our own clients); responses are pretty JSON as convox writes it, and action endpoints
//! answer `ok` to text clients and the resource to JSON clients.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A request body decoded from `application/x-www-form-urlencoded` or `application/json`.
/// A request with no body decodes as an empty form, so optional fields may all be left out.
#[derive(Debug)]
pub struct Input<T>(pub T);

impl<T, S> FromRequest<S> for Input<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
            .unwrap_or_default();
        let body = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("the request body is too large".into())
            } else {
                ApiError::BadRequest(format!("could not read the request body: {}", rejection.body_text()))
            }
        })?;
        decode(&content_type, &body).map(Input)
    }
}

fn decode<T: DeserializeOwned>(content_type: &str, body: &[u8]) -> Result<T, ApiError> {
    let is_json = content_type == "application/json" || content_type.ends_with("+json");
    if is_json {
        let invalid = |e: serde_json::Error| ApiError::BadRequest(format!("invalid JSON body: {e}"));
        // Read with every object's keys checked: serde_json keeps the last of two equal keys,
        // so `{"role":"read","role":"admin"}` would mean what a filter that read the first did
        // not see.
        let Unique(mut value) = serde_json::from_slice(body).map_err(invalid)?;
        let serde_json::Value::Object(fields) = &mut value else {
            // serde would read an array into a struct, field by field: not what anyone means.
            return Err(ApiError::BadRequest("invalid JSON body: it must be an object".into()));
        };
        {
            // A form cannot say null, so JSON may not either: a field is given or left out
            // (and openapi.yaml says so).
            if let Some((name, _)) = fields.iter().find(|(_, v)| v.is_null()) {
                return Err(ApiError::BadRequest(format!(
                    "invalid JSON body: field `{name}` is null: leave it out instead"
                )));
            }
            // JSON Schema counts 5.0 as an integer; so do we.
            for field in fields.values_mut() {
                if let Some(integer) = field.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                    #[expect(clippy::cast_possible_truncation, reason = "integral and within i64")]
                    let integer = integer as i64;
                    *field = integer.into();
                }
            }
        }
        return serde_json::from_value(value).map_err(invalid);
    }
    let is_form = content_type == "application/x-www-form-urlencoded"
        // The convox CLI labels bodiless requests application/octet-stream.
        || (body.is_empty() && (content_type.is_empty() || content_type == "application/octet-stream"));
    if is_form {
        return serde_urlencoded::from_bytes(body).map_err(|e| ApiError::BadRequest(format!("invalid form body: {e}")));
    }
    Err(ApiError::UnsupportedMediaType(format!(
        "unsupported content type {:?}: send application/x-www-form-urlencoded or application/json",
        if content_type.is_empty() {
            "(none)"
        } else {
            content_type
        }
    )))
}

/// A JSON value whose objects have no key twice (a duplicate is an error naming it).
struct Unique(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                let shown: String = key.chars().take(100).collect();
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{shown}`: give each field once"
                )));
            }
            let Unique(value) = map.next_value()?;
            fields.insert(key, value);
        }
        Ok(fields.into())
    }
}

/// A query string decoded into `T`; errors say what is wrong in our error shape.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(QueryParams)
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
    }
}

/// The text of header `name`, trimmed; `None` when it is absent or empty. A value that is not
/// ASCII is refused rather than ignored: a client that sent it meant something.
///
/// # Errors
/// 400 naming the header.
pub fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest(format!("the {name} header must be ASCII text")))?
        .trim();
    Ok((!text.is_empty()).then_some(text))
}

/// Whether the client asked for JSON (`Accept` names `application/json`), as convox decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

impl Format {
    /// The format `headers` ask for.
    pub fn of(headers: &HeaderMap) -> Self {
        let json = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/json"));
        if json { Self::Json } else { Self::Text }
    }

    /// The answer to an action: `ok` for text clients, `value` for JSON clients.
    pub fn ok(self, value: impl Serialize) -> Response {
        match self {
            Self::Json => Pretty(value).into_response(),
            Self::Text => text("ok\n"),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Format {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::of(&parts.headers))
    }
}

/// A JSON response written as convox writes it: indented by two spaces, ending with a newline.
#[derive(Debug)]
pub struct Pretty<T>(pub T);

impl<T: Serialize> IntoResponse for Pretty<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec_pretty(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                (
                    [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
                    body,
                )
                    .into_response()
            }
            Err(e) => ApiError::Internal(anyhow::Error::new(e).context("encoding a response")).into_response(),
        }
    }
}

/// A `text/plain` response.
pub fn text(body: impl Into<String>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        body.into(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        name: String,
        lock: Option<bool>,
    }

    #[test]
    fn forms_and_json_decode_alike() {
        let form: Body = decode("application/x-www-form-urlencoded", b"name=a&lock=true").unwrap();
        let json: Body = decode("application/json", br#"{"name":"a","lock":true}"#).unwrap();
        assert_eq!(form, json);
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let missing = decode::<Body>("application/x-www-form-urlencoded", b"lock=true").unwrap_err();
        assert_eq!(missing.to_string(), "invalid form body: missing field `name`");
        let unknown = decode::<Body>("application/json", br#"{"name":"a","x":1}"#).unwrap_err();
        assert!(
            unknown.to_string().starts_with("invalid JSON body: unknown field `x`"),
            "{unknown}"
        );
        let null = decode::<Body>("application/json", br#"{"name":"a","lock":null}"#).unwrap_err();
        assert_eq!(
            null.to_string(),
            "invalid JSON body: field `lock` is null: leave it out instead"
        );
        let twice = decode::<Body>("application/json", br#"{"name":"a","name":"b"}"#).unwrap_err();
        assert!(
            twice
                .to_string()
                .starts_with("invalid JSON body: duplicate field `name`"),
            "{twice}"
        );
        let nested = decode::<serde_json::Value>("application/json", br#"{"a":{"b":1,"b":2}}"#).unwrap_err();
        assert!(nested.to_string().contains("duplicate field `b`"), "{nested}");
        let array = decode::<Body>("application/json", br#"["a", true]"#).unwrap_err();
        assert_eq!(array.to_string(), "invalid JSON body: it must be an object");
        let media = decode::<Body>("text/plain", b"name=a").unwrap_err();
        assert_eq!(media.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn integral_numbers_are_integers() {
        #[derive(serde::Deserialize)]
        struct Timeout {
            timeout: u64,
        }
        let body: Timeout = decode("application/json", br#"{"timeout": 214.0}"#).unwrap();
        assert_eq!(body.timeout, 214);
        assert!(decode::<Timeout>("application/json", br#"{"timeout": 2.5}"#).is_err());
    }

    #[test]
    fn an_empty_body_is_an_empty_form() {
        #[derive(serde::Deserialize)]
        struct Optional {
            #[expect(dead_code)]
            force: Option<bool>,
        }
        assert!(decode::<Optional>("application/octet-stream", b"").is_ok());
        assert!(decode::<Optional>("", b"").is_ok());
    }
}
