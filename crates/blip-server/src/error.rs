//! Every error as JSON `{"error": message, "error_type": kind}` with its HTTP status.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// A refused or failed request.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Short machine-readable kind: `invalid_json`, `invalid_base64`, `invalid_image`,
    /// `invalid_input`, `invalid_request`, `unauthorized`, `not_found`, `payload_too_large`, `unsupported_media_type`,
    /// `overloaded`, `timeout`, `loading`, `internal`.
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into() }
    }

    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 429: the queue is full; the client may retry after a second.
    pub fn overloaded() -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", "the server is at capacity; retry later")
    }
}

impl ApiError {
    /// A library error, options named by `name`: validation refusals and undecodable images
    /// are the client's (400), the rest internal.
    pub fn from_blip(err: blip::Error, name: &dyn Fn(blip::Param) -> String) -> Self {
        match &err {
            blip::Error::InvalidInput(invalid) => Self::bad_request("invalid_input", invalid.message(name)),
            blip::Error::Image { .. } => Self::bad_request("invalid_image", err.to_string()),
            _ => Self::internal(err.to_string()),
        }
    }
}

/// Library errors with transformers' names for the options (the JSON parameter names).
impl From<blip::Error> for ApiError {
    fn from(err: blip::Error) -> Self {
        Self::from_blip(err, &|p| p.name().into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "error_type": self.kind });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}
