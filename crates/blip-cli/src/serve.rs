//! `blip serve`: load a captioning model, then serve it over HTTP (see the `blip-server` crate)
//! until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use blip::Captioner;
use blip_server::{Config, Served};
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to listen on; 0 takes any free one (printed on stderr as `listening on http://HOST:PORT`).
    #[arg(long, default_value_t = 8080)]
    port: u16,

    /// Captioning checkpoint: a Hub repo id or a local folder (requests name it by the id, or the folder's name).
    #[arg(long, short, default_value = Captioner::DEFAULT_MODEL)]
    model: String,

    /// Largest request body, in bytes (20 MiB by default).
    #[arg(long, default_value_t = 20 << 20)]
    max_body_size: usize,

    /// Requests but /health must carry `Authorization: Bearer KEY`.
    #[arg(long, env = "BLIP_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

pub fn run(args: ServeArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    let captioner = Captioner::load_with_dtype(&args.model, &blip::Device::Cpu, dtype)?;
    let config = Config {
        model: args.model,
        dtype,
        max_body_size: args.max_body_size,
        api_key: args.api_key.filter(|key| !key.is_empty()),
    };
    let model_id = config.model_id();
    let app = blip_server::router(Served { captioner, config, model_id });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        eprintln!("listening on http://{address}");
        axum::serve(listener, app).with_graceful_shutdown(shutdown()).await.context("serving")
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
