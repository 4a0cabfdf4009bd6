//! The router and its shared state: the loaded captioner, the routes and the middleware
//! (API key, body limit, one log line per request).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::hf::{self, GeneratedText};

/// How the server runs, from its flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--model` as given: a Hub repo id or a local folder.
    pub model: String,
    pub dtype: blip::DType,
    /// Largest request body, in bytes.
    pub max_body_size: usize,
    /// Requests (but `/health`) must carry `Authorization: Bearer` this.
    pub api_key: Option<String>,
}

impl Config {
    /// The id requests name the model by: the Hub id, or a local folder's name.
    pub fn model_id(&self) -> String {
        let path = Path::new(&self.model);
        match path.file_name() {
            Some(name) if path.is_dir() => name.to_string_lossy().into_owned(),
            _ => self.model.clone(),
        }
    }
}

/// The model being served and what the routes need to know.
pub struct Served {
    pub captioner: blip::Captioner,
    pub config: Config,
    pub model_id: String,
}

pub(crate) type Shared = Arc<SharedState>;

pub(crate) struct SharedState {
    pub captioner: Arc<blip::Captioner>,
    pub config: Config,
    pub model_id: String,
}

/// The whole app: `/health`, `/info`, and the Inference API's image-to-text routes.
pub fn router(served: Served) -> Router {
    let state: Shared = Arc::new(SharedState {
        captioner: Arc::new(served.captioner),
        model_id: served.model_id,
        config: served.config,
    });
    let protected = Router::new()
        .route("/info", get(info))
        .route("/models/{*model_id}", post(image_to_text))
        .route("/pipeline/image-to-text/{*model_id}", post(image_to_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::auth::require_key));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn info(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "model": state.model_id,
        "location": state.config.model,
        "tasks": ["image-to-text"],
        "dtype": state.config.dtype.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "max_body_size": state.config.max_body_size,
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

/// Captions the request's image with its parameters over the captioner's defaults.
async fn image_to_text(
    State(state): State<Shared>,
    UrlPath(model_id): UrlPath<String>,
    body: Body,
) -> Result<Json<Vec<GeneratedText>>, ApiError> {
    if model_id != state.model_id && model_id != state.config.model {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("model {model_id} is not served here; this server serves {}", state.model_id),
        ));
    }
    let body = read_body(body, state.config.max_body_size).await?;
    let request = hf::parse(&body)?;
    let captioner = state.captioner.clone();
    let caption = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let mut options = captioner.default_options();
        request.parameters.apply(&mut options.generation);
        captioner.validate(&options)?;
        let image = blip::load_image_from_memory(&request.image, Path::new("the request's image"))?;
        let captions = captioner.caption(&[image], &options)?;
        captions
            .into_iter()
            .next()
            .and_then(|c| c.into_iter().next())
            .map(|c| c.text)
            .ok_or_else(|| ApiError::internal("no caption generated"))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the captioning task failed: {e}")))??;
    Ok(Json(vec![GeneratedText { generated_text: caption }]))
}

/// Beyond the limit, this much more of a body is read and dropped before the 413 goes out.
const DRAIN_LIMIT: usize = 64 << 20;

/// The request body, at most `limit` bytes. A body that is refused (too large, or by the
/// caller) is still read to its end (up to [`DRAIN_LIMIT`] more) so that the client, which may
/// still be sending, reads the error instead of a reset connection.
pub(crate) async fn read_body(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut data = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request("invalid_body", format!("cannot read the body: {e}")))?;
        if let Ok(chunk) = frame.into_data() {
            total += chunk.len();
            if total <= limit {
                data.extend_from_slice(&chunk);
            } else if total > limit.saturating_add(DRAIN_LIMIT) {
                break;
            }
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(data.into())
}

/// One line per request: method, path, status, latency.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let start = Instant::now();
    let response = next.run(request).await;
    let latency_ms = start.elapsed().as_secs_f64() * 1e3;
    tracing::info!("{method} {path} {} {latency_ms:.1}ms", response.status().as_u16());
    response
}
