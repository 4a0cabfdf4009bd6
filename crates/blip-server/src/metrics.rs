//! `GET /metrics` in Prometheus' text format: requests by route and status, latency, queue
//! depth, batch sizes, images and tokens processed.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
}

/// The server's metrics, in their own registry (no process-wide state).
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RouteStatus, Counter>,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    queue_depth: Family<Model, Gauge>,
    batch_size: Family<Model, Histogram, fn() -> Histogram>,
    images: Family<Model, Counter>,
    tokens: Family<Model, Counter>,
    cancelled: Family<Model, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            registry: Mutex::new(Registry::with_prefix("blip")),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            batch_size: Family::new_with_constructor(batch_histogram),
            images: Family::default(),
            tokens: Family::default(),
            cancelled: Family::default(),
        };
        {
            let mut registry = metrics.registry.lock().expect("not poisoned");
            registry.register("requests", "Requests answered, by route and status", metrics.requests.clone());
            registry.register("request_duration_seconds", "Time to answer a request", metrics.latency.clone());
            registry.register("queue_depth", "Jobs waiting for a model's worker", metrics.queue_depth.clone());
            registry.register(
                "batch_size",
                "Jobs a model's worker ran together: in one call, or decoding together when jobs joined",
                metrics.batch_size.clone(),
            );
            registry.register("images", "Images through a model's vision tower", metrics.images.clone());
            registry.register("generated_tokens", "Tokens in generated sequences", metrics.tokens.clone());
            registry.register(
                "cancelled_jobs",
                "Jobs dropped because their client left: queued, or stopped while generating",
                metrics.cancelled.clone(),
            );
        }
        metrics
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        self.requests.get_or_create(&RouteStatus { route: route.into(), status }).inc();
        self.latency.get_or_create(&Route { route: route.into() }).observe(seconds);
    }

    pub fn batch(&self, model: &str, size: usize) {
        self.batch_size.get_or_create(&Model { model: model.into() }).observe(size as f64);
    }

    pub fn images(&self, model: &str, count: usize) {
        self.images.get_or_create(&Model { model: model.into() }).inc_by(count as u64);
    }

    pub fn tokens(&self, model: &str, count: usize) {
        self.tokens.get_or_create(&Model { model: model.into() }).inc_by(count as u64);
    }

    pub fn cancelled(&self, model: &str, count: usize) {
        if count > 0 {
            self.cancelled.get_or_create(&Model { model: model.into() }).inc_by(count as u64);
        }
    }

    /// The metrics as Prometheus text, queue depths read now.
    pub fn render(&self, queue_depths: &[(String, usize)]) -> String {
        for (model, depth) in queue_depths {
            self.queue_depth.get_or_create(&Model { model: model.clone() }).set(*depth as i64);
        }
        let mut text = String::new();
        let registry = self.registry.lock().expect("not poisoned");
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String");
        text
    }
}
