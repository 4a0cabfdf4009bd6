//! `Authorization: Bearer KEY` when the server has a key, compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::app::Shared;
use crate::error::ApiError;

/// Lets a request through when no key is set, or it carries the key.
pub async fn require_key(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(key) = &state.config.api_key else { return next.run(request).await };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    // ct_eq on slices of different lengths is false (and leaks only the length).
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        next.run(request).await
    } else {
        // Read what the client is still sending, so that it gets the answer, not a reset.
        let _ = crate::app::read_body(request.into_body(), state.config.max_body_size).await;
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong Authorization: Bearer key")
                .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        response
    }
}
