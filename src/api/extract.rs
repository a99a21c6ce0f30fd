//! A JSON extractor whose rejections are [`ApiError`]s with stable codes.

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // An empty body means "no fields": every body field is optional or has a default.
        let has_body = req
            .headers()
            .get("content-length")
            .is_none_or(|v| v.as_bytes() != b"0");
        if !has_body {
            return serde_json::from_str("{}")
                .map(ApiJson)
                .map_err(|e| ApiError::invalid(format!("request body required: {e}")));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        crate::sm::ErrorCode::PayloadTooLarge,
                        "request body is larger than 1 MiB",
                    )
                } else {
                    ApiError::invalid(e.body_text())
                }
            })?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return serde_json::from_str("{}")
                .map(ApiJson)
                .map_err(|e| ApiError::invalid(format!("request body required: {e}")));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// A query-string extractor whose rejections are `invalid_argument` errors.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded_from_str(q).map(ApiQuery)
    }
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{q}")
            .parse()
            .map_err(|_| ApiError::invalid("bad query string"))?,
    )
    .map(|axum::extract::Query(v)| v)
    .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text())))
}
