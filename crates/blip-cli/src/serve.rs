//! `blip serve`: serve BLIP checkpoints over HTTP (see the `blip-server` crate) until Ctrl-C or
//! SIGTERM. The server listens first and loads the models after (`/health` answers 503 until
//! they are ready); a model that fails to load stops it with the error.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use blip::Captioner;
use blip_server::{AppState, Config};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (0.0.0.0 to accept other machines).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to listen on; 0 takes any free one (printed on stderr as `listening on http://HOST:PORT`).
    #[arg(long, default_value_t = 8080)]
    port: u16,

    /// A checkpoint to serve: a Hub repo id or a local folder, named in requests by the id or the
    /// folder's name. Repeat to serve several; each serves what its architecture does.
    #[arg(long, short, default_value = Captioner::DEFAULT_MODEL)]
    model: Vec<String>,

    /// Requests a model's worker runs together at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_size: u64,

    /// Requests waiting per model before new ones get 429 Too Many Requests.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue: u64,

    /// Largest request body: bytes, or with a unit (KiB, MiB, GiB, KB, MB, GB).
    #[arg(long, default_value = "20MiB", value_parser = parse_size)]
    max_body_size: usize,

    /// Longest a request waits for its answer before 504 (e.g. 60s, 500ms, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    request_timeout: Duration,

    /// Requests but /health must carry `Authorization: Bearer KEY`.
    #[arg(long, env = "BLIP_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Accept images as http(s) URLs, which the server then fetches (any address it can reach:
    /// only where clients are trusted).
    #[arg(long)]
    allow_image_urls: bool,

    /// Log lines as text or as JSON objects.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `20MiB`, `512KB`, `1000`: a size in bytes.
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().map_err(|_| format!("{text:?} is not a size such as 20MiB"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" | "k" => 1000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?}: use KiB, MiB, GiB, KB, MB or GB")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("{text} is too large"))
}

/// `60s`, `500ms`, `2m`, or seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text}: {e}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration such as 60s: {e}"))
}

pub fn run(args: ServeArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    let config = Config {
        models: args.model,
        dtype,
        max_batch_size: args.max_batch_size as usize,
        max_queue: args.max_queue as usize,
        max_body_size: args.max_body_size,
        request_timeout: args.request_timeout,
        api_key: args.api_key.filter(|key| !key.is_empty()),
        allow_image_urls: args.allow_image_urls,
    };
    let state = AppState::new(config);
    let app = blip_server::router(state.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        eprintln!("listening on http://{address}");
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        let loader = state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(err) = loader.load_models() {
                let _ = failed_tx.send(err);
            } else {
                eprintln!("ready");
            }
        });
        // Stops on Ctrl-C or SIGTERM, or when a model fails to load (kept to report).
        let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = failure.clone();
        let stop = async move {
            tokio::select! {
                () = shutdown() => {},
                Ok(err) = failed_rx => *seen.lock().expect("not poisoned") = Some(err),
            }
        };
        axum::serve(listener, app).with_graceful_shutdown(stop).await.context("serving")?;
        let failed = failure.lock().expect("not poisoned").take();
        match failed {
            Some(err) => Err(anyhow::Error::new(err).context("loading the models")),
            None => Ok(()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    eprintln!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("20MiB"), Ok(20 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2 KB"), Ok(2000));
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
    }
}
