//! Every error as JSON `{"error": message, "error_type": kind}` with its HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// A refused or failed request.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Short machine-readable kind: `invalid_json`, `invalid_base64`, `invalid_image`,
    /// `invalid_input`, `unauthorized`, `not_found`, `payload_too_large`, `internal`.
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
}

/// The library's errors: validation refusals (named with the JSON parameter names) and
/// undecodable images are the client's, the rest internal.
impl From<blip::Error> for ApiError {
    fn from(err: blip::Error) -> Self {
        match &err {
            blip::Error::InvalidInput(invalid) => {
                Self::bad_request("invalid_input", invalid.message(&|p| p.name().into()))
            }
            blip::Error::Image { .. } => Self::bad_request("invalid_image", err.to_string()),
            _ => Self::internal(err.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "error_type": self.kind });
        (self.status, Json(body)).into_response()
    }
}
