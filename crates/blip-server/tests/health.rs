//! `/health` and the model routes while the models load: 503 with `Retry-After`, then 200 once
//! they are ready (the binary loads after it starts listening; this drives the same app).

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use blip_server::{router, AppState, Config};
use tower::ServiceExt;

fn config() -> Config {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../blip/tests/fixtures/models/tiny-caption-bin");
    Config {
        models: vec![model.display().to_string()],
        dtype: blip::DType::F32,
        max_batch_size: 4,
        max_queue: 8,
        max_body_size: 1 << 20,
        request_timeout: Duration::from_secs(30),
        api_key: None,
        allow_image_urls: false,
    }
}

async fn status_of(app: &axum::Router, method: &str, uri: &str) -> (StatusCode, Option<String>) {
    let request = Request::builder().method(method).uri(uri).body(Body::from("{}")).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (response.status(), retry)
}

#[tokio::test]
async fn health_is_503_until_the_models_are_loaded() {
    let state = AppState::new(config());
    let app = router(state.clone());
    let (status, retry) = status_of(&app, "GET", "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry.is_some(), "a client is told when to come back");
    let (status, _) = status_of(&app, "POST", "/models/tiny-caption-bin").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    tokio::task::spawn_blocking(move || state.load_models()).await.unwrap().unwrap();
    assert_eq!(status_of(&app, "GET", "/health").await.0, StatusCode::OK);
    // Loaded: the same request is now the model's to refuse (an empty JSON body is no image).
    let (status, _) = status_of(&app, "POST", "/models/tiny-caption-bin").await;
    assert_ne!(status, StatusCode::SERVICE_UNAVAILABLE);
}
