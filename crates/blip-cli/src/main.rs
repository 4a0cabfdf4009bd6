//! `blip`: BLIP captioning (and, as the project grows, every BLIP task) from the command line.

mod caption;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// BLIP vision-language models without Python: the same outputs as Hugging Face transformers.
#[derive(Parser)]
#[command(name = "blip", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption images, with or without a text prompt the caption continues.
    Caption(caption::CaptionArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Caption(args) => caption::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
