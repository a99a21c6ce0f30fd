//! The one error type of the HTTP API and its single mapping to status codes.
//! Body: `{"error": {"code": "...", "message": "...", ...details}}`.

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::sm::{ErrorCode, Rejection};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidArgument, message)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.details.insert(key.to_string(), value.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code)
    }
}

/// The exhaustive code -> HTTP status map.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound | ErrorCode::LeaseNotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict | ErrorCode::LockHeld | ErrorCode::Timeout | ErrorCode::Deadlock => {
            StatusCode::CONFLICT
        }
        ErrorCode::Fenced | ErrorCode::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::NoLeader | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        let mut e = ApiError::new(r.code, r.message);
        if let Some(v) = r.current_version {
            e = e.with("current_version", v);
        }
        if let Some(t) = r.current_token {
            e = e.with("current_token", t);
        }
        if !r.cycle.is_empty() {
            e = e.with("cycle", serde_json::to_value(&r.cycle).unwrap_or_default());
        }
        e
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body is larger than 1 MiB",
            );
        }
        ApiError::invalid(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details.clone();
        body.insert("code".into(), json!(self.code.as_str()));
        body.insert("message".into(), json!(self.message));
        let mut resp = (self.status(), axum::Json(json!({ "error": body }))).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}
