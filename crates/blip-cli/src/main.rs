//! `blip`: BLIP captioning, visual question answering, image-text matching, embeddings and
//! zero-shot classification from the command line.

mod capfilt;
mod caption;
mod classify;
mod common;
mod embed;
mod finetune;
mod heatmap;
mod index;
mod matching;
mod search;
mod serve;
mod sidecar;
mod vqa;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// BLIP vision-language models without Python: the same outputs as Hugging Face transformers.
#[derive(Parser)]
#[command(name = "blip", version, about, long_about = None)]
struct Cli {
    /// CPU threads for the model's computations [default: all cores].
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,

    /// Precision the weights are held in: bf16 and f16 halve the model's memory (sums stay f32).
    #[arg(long, global = true, value_enum, default_value_t = common::Dtype::F32)]
    dtype: common::Dtype,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption images, with or without a text prompt the caption continues.
    Caption(caption::CaptionArgs),
    /// Answer a question about images: a generated answer, or the best of a list of answers.
    Vqa(vqa::VqaArgs),
    /// Score how well texts fit images (ITM probability and ITC cosine similarity).
    #[command(name = "match")]
    Match(matching::MatchArgs),
    /// Embed images or texts (unit-norm, in the space they share) into a safetensors file or JSONL.
    Embed(embed::EmbedArgs),
    /// Classify images zero-shot into given labels.
    Classify(classify::ClassifyArgs),
    /// Index the images of folders (ITC embeddings, optionally captions) into an SQLite database.
    Index(index::IndexArgs),
    /// Search an index by text or by image, optionally reranked with the ITM head.
    Search(search::SearchArgs),
    /// CapFilt, the BLIP paper's dataset bootstrapping: caption images, keep the texts the ITM head matches.
    Capfilt(capfilt::CapFiltArgs),
    /// Fine-tune a captioning or VQA checkpoint on a JSONL file of examples.
    Finetune(finetune::FinetuneArgs),
    /// Serve models over HTTP: the Hugging Face Inference API's and OpenAI's chat completions formats.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let mut command = Cli::command();
    if std::env::args().skip(1).any(|arg| arg == "--version" || arg == "-V") {
        // which kernels and libraries run here (this loads oneDNN, so only when asked)
        let version = format!("{}\n{}", env!("CARGO_PKG_VERSION"), blip::compute_paths());
        command = command.version(&*Box::leak(version.into_boxed_str()));
    }
    let matches = command.get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if matches!(cli.command, Command::Serve(_)) {
        few_heap_arenas();
    }
    if let Some(threads) = cli.threads {
        // candle's kernels and rayon's pool both size themselves from this variable; set before
        // either starts a thread.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // Warnings on stderr by default (and a line per request when serving); RUST_LOG=debug shows
    // the library's timing spans too.
    let default_level = if matches!(cli.command, Command::Serve(_)) { "warn,blip_server=info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    match &cli.command {
        // A server's log: timestamps, and JSON objects for log collectors when asked.
        Command::Serve(args) if args.log_format == serve::LogFormat::Json => {
            tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init()
        }
        Command::Serve(_) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init(),
        _ => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .without_time()
            .with_target(false)
            .init(),
    }
    let dtype = cli.dtype.into();
    let num_return_sequences = match cli.command {
        Command::Caption(_) => caption::NUM_CAPTIONS,
        Command::Capfilt(_) => capfilt::CAPTIONS_PER_IMAGE,
        _ => "",
    };
    let outcome = match cli.command {
        // The server's model work runs on tokio's blocking threads, each its own caller.
        Command::Serve(args) => serve::run(args, dtype),
        // On a worker of rayon's pool, so that the model's small parallel steps (a decoding step
        // has hundreds) run inline and share out their work, instead of each waking a worker from
        // this thread and sleeping until it is done.
        command => rayon::join(|| run(command, dtype), || ()).0,
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", common::describe(&err, num_return_sequences));
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
fn run(command: Command, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    match command {
        Command::Caption(args) => caption::run(args, dtype),
        Command::Vqa(args) => vqa::run(args, dtype),
        Command::Match(args) => matching::run(args, dtype),
        Command::Embed(args) => embed::run(args, dtype),
        Command::Classify(args) => classify::run(args, dtype),
        Command::Index(args) => index::run(args, dtype),
        Command::Search(args) => search::run(args),
        Command::Capfilt(args) => capfilt::run(args, dtype),
        Command::Finetune(args) => finetune::run(args, dtype),
        Command::Serve(args) => serve::run(args, dtype),
    }
}

/// glibc hands large blocks (activations of a few MB and up) straight back to the system when
/// freed, so every layer's new tensors would be fresh pages the kernel must fault in and zero.
/// Freed blocks stay in the heap for reuse instead, without raising peak memory (the same sizes
/// recur every layer).
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator thresholds; called first thing, before any thread.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per core), and what a
/// thread frees stays in its arena (see keep_freed_memory): a server's many threads (HTTP,
/// decoding, the model's) would each keep their peak. Two arenas, as `MALLOC_ARENA_MAX=2` gives
/// (which, when set, decides instead).
fn few_heap_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: as in keep_freed_memory; no thread has started yet.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks (argument ids named in conflicts, aliases, groups), which
    /// otherwise run only in debug builds.
    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
