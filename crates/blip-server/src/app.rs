//! The router and its shared state: the served models (loaded after the server starts
//! listening; `/health` answers 503 until then), the routes and the middleware (API key, one
//! log line and the metrics per request).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::images::{ImageSource, UrlPolicy};
use crate::metrics::Metrics;
use crate::models::{LoadOptions, ServedModel, Task};
use crate::scheduler::{Output, Resized, Slot, Work};
use crate::tasks;

/// How the server runs, from its flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--model` as given, each a Hub repo id or a local folder.
    pub models: Vec<String>,
    pub dtype: blip::DType,
    /// Jobs a model's worker runs together at most.
    pub max_batch_size: usize,
    /// Jobs waiting per model before requests are refused with 429.
    pub max_queue: usize,
    /// Largest request body, in bytes.
    pub max_body_size: usize,
    /// Longest a request may wait for its answer (504 after).
    pub request_timeout: Duration,
    /// Requests (but `/health`) must carry `Authorization: Bearer` this.
    pub api_key: Option<String>,
    /// Whether images may be given as http(s) URLs that the server fetches.
    pub allow_image_urls: bool,
}

impl Config {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { dtype: self.dtype, max_batch_size: self.max_batch_size, max_queue: self.max_queue }
    }

    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy { allowed: self.allow_image_urls, max_bytes: self.max_body_size, timeout: Duration::from_secs(10) }
    }
}

/// What every handler shares.
pub struct AppState {
    pub config: Config,
    /// Set once every model has loaded.
    models: OnceLock<Vec<ServedModel>>,
    pub metrics: Arc<Metrics>,
    next_request: AtomicU64,
    /// Images being decoded at once, at most one per core.
    decoding: tokio::sync::Semaphore,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(config: Config) -> Shared {
        Arc::new(AppState {
            config,
            models: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            next_request: AtomicU64::new(1),
            decoding: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
        })
    }

    /// Loads every `--model` (blocking), then opens the model routes.
    pub fn load_models(&self) -> blip::Result<()> {
        let options = self.config.load_options();
        let mut models: Vec<ServedModel> = Vec::new();
        for location in &self.config.models {
            let model = crate::models::load(location, &options, self.metrics.clone())?;
            if models.iter().any(|m| m.id == model.id) {
                let reason = format!("two models are named {}; serve folders with different names", model.id);
                return Err(blip::Error::Checkpoint { location: location.clone(), reason });
            }
            tracing::info!(model = model.id, tasks = ?model.tasks().iter().map(|t| t.name()).collect::<Vec<_>>(), "loaded");
            models.push(model);
        }
        let _ = self.models.set(models);
        Ok(())
    }

    /// The served models; 503 while they load.
    pub fn models(&self) -> Result<&[ServedModel], ApiError> {
        self.models
            .get()
            .map(Vec::as_slice)
            .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "loading", "the models are still loading"))
    }

    /// The model requests call `id` (its id or `--model` as given).
    pub fn model(&self, id: &str) -> Result<&ServedModel, ApiError> {
        let models = self.models()?;
        models.iter().find(|m| m.id == id || m.location == id).ok_or_else(|| {
            let served: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            ApiError::not_found(format!("model {id} is not served here; this server serves {}", served.join(", ")))
        })
    }

    /// The image `source` names, decoded and preprocessed for `model`.
    pub async fn pixels(&self, model: &ServedModel, source: ImageSource, field: &str) -> Result<Resized, ApiError> {
        let engine = model.engine.clone();
        let policy = self.config.url_policy();
        source.load(&policy, field, &self.decoding, move |image| Ok(engine.resize(image))).await
    }

    /// Queues `work` on `model` in the place `slot` holds and waits for its answer: 504 after
    /// the request timeout (the job is then dropped, or its generation stopped).
    pub async fn run(&self, model: &ServedModel, work: Work, slot: Slot) -> Result<(Output, usize), ApiError> {
        let answer = model.scheduler.submit(work, slot)?;
        match tokio::time::timeout(self.config.request_timeout, answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(ApiError::internal("the model's worker failed on this request")),
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no answer within the request timeout of {:?}", self.config.request_timeout),
            )),
        }
    }
}

/// The size of the batch a request's work ran in, for its log line.
#[derive(Debug, Clone, Copy)]
pub struct BatchSize(pub usize);

/// A JSON answer that records its batch size.
pub fn answered(body: impl serde::Serialize, batch: usize) -> Response {
    let mut response = Json(body).into_response();
    response.extensions_mut().insert(BatchSize(batch));
    response
}

/// The whole app.
pub fn router(state: Shared) -> Router {
    let protected = Router::new()
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::openapi::document))
        .route("/models/{*model_id}", post(default_task))
        .route("/pipeline/{task}/{*model_id}", post(pipeline))
        .route("/v1/chat/completions", post(crate::openai::chat_completions))
        .route("/v1/models", get(crate::openai::list_models))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::auth::require_key));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

#[utoipa::path(get, path = "/health", responses((status = 200, description = "Models loaded"), (status = 503, description = "Models loading", body = crate::openapi::ErrorBody)))]
pub(crate) async fn health(State(state): State<Shared>) -> Response {
    match state.models() {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(err) => err.into_response(),
    }
}

#[utoipa::path(get, path = "/info", responses((status = 200, description = "Models, tasks, dtype, version, limits")))]
pub(crate) async fn info(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let models: Vec<Value> = state
        .models()?
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "location": m.location,
                "architecture": m.architecture().class_name(),
                "tasks": m.tasks().iter().map(|t| t.name()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let config = &state.config;
    Ok(Json(json!({
        "models": models,
        "dtype": config.dtype.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "max_batch_size": config.max_batch_size,
        "max_queue": config.max_queue,
        "max_body_size": config.max_body_size,
        "request_timeout_seconds": config.request_timeout.as_secs_f64(),
        "allow_image_urls": config.allow_image_urls,
    })))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<Shared>) -> Response {
    let depths: Vec<(String, usize)> = match state.models() {
        Ok(models) => models.iter().map(|m| (m.id.clone(), m.scheduler.waiting())).collect(),
        Err(_) => vec![],
    };
    let text = state.metrics.render(&depths);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

/// `POST /models/{id}`: the model's default task.
#[utoipa::path(post, path = "/models/{model_id}", params(("model_id" = String, Path, description = "Hub id or folder name")),
    request_body = crate::openapi::PipelineRequest,
    responses((status = 200, body = crate::openapi::PipelineResponse), (status = "4XX", body = crate::openapi::ErrorBody)))]
pub(crate) async fn default_task(
    State(state): State<Shared>,
    UrlPath(model_id): UrlPath<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let model = state.model(&model_id)?;
    let task = model.tasks()[0];
    let (slot, body) = reserve(model, body).await?;
    let body = read_body(body, state.config.max_body_size).await?;
    tasks::run(&state, model, task, body, slot).await
}

/// `POST /pipeline/{task}/{id}`: any task the model serves.
#[utoipa::path(post, path = "/pipeline/{task}/{model_id}",
    params(("task" = String, Path, description = "image-to-text, visual-question-answering, zero-shot-image-classification, image-feature-extraction, feature-extraction or image-text-matching"),
           ("model_id" = String, Path, description = "Hub id or folder name")),
    request_body = crate::openapi::PipelineRequest,
    responses((status = 200, body = crate::openapi::PipelineResponse), (status = "4XX", body = crate::openapi::ErrorBody)))]
pub(crate) async fn pipeline(
    State(state): State<Shared>,
    UrlPath((task_name, model_id)): UrlPath<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let task = Task::from_name(&task_name).ok_or_else(|| {
        let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
        ApiError::not_found(format!("unknown task {task_name}; tasks: {}", names.join(", ")))
    })?;
    let model = state.model(&model_id)?;
    if !model.tasks().contains(&task) {
        let tasks: Vec<&str> = model.tasks().iter().map(|t| t.name()).collect();
        return Err(ApiError::not_found(format!(
            "model {} does not serve {task_name}; it serves {}",
            model.id,
            tasks.join(", ")
        )));
    }
    let (slot, body) = reserve(model, body).await?;
    let body = read_body(body, state.config.max_body_size).await?;
    tasks::run(&state, model, task, body, slot).await
}

/// A place in `model`'s queue for a request whose body is not read yet; when there is none, the
/// body is read and dropped (so that the client gets the 429, not a reset) and 429 answers.
async fn reserve(model: &ServedModel, body: Body) -> Result<(Slot, Body), ApiError> {
    match model.scheduler.reserve() {
        Ok(slot) => Ok((slot, body)),
        Err(_) => {
            let _ = read_body(body, 0).await;
            Err(ApiError::overloaded())
        }
    }
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

/// One line per request (id, method, route, status, latency, batch size) and its metrics.
async fn log_request(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let id = state.next_request.fetch_add(1, Ordering::Relaxed);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_owned();
    let start = Instant::now();
    let mut response = next.run(request).await;
    let seconds = start.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    let batch = response.extensions().get::<BatchSize>().map(|b| b.0);
    state.metrics.request(&route, status, seconds);
    if let Ok(value) = axum::http::HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    tracing::info!(
        id,
        method = %method,
        path,
        status,
        latency_ms = (seconds * 1e4).round() / 10.0,
        batch_size = batch,
        "request"
    );
    response
}
