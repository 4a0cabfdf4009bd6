//! `blip caption`: load a captioning checkpoint, caption images in batches, print text or JSONL.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blip::processor::image::{load_image, ResizeBackend};
use blip::{CaptionOptions, Captioner};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct CaptionArgs {
    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = blip::DEFAULT_MODEL)]
    model: String,

    /// Text the caption starts with, e.g. "a picture of" (it is part of the output caption).
    #[arg(long)]
    prompt: Option<String>,

    /// Most new tokens to generate (the prompt not counted).
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,

    /// Fewest new tokens before the caption may end.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,

    /// Images captioned together in one forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,

    /// Output: `text` (path, a tab, the caption) or `jsonl` (one JSON object per image).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,

    /// Image resize: `torchvision` (transformers 5, default) or `pil` (transformers 4).
    #[arg(long, value_enum, default_value_t = Resize::Torchvision)]
    resize: Resize,

    /// Image files (JPEG, PNG, WebP, GIF, BMP, TIFF).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Jsonl,
}

#[derive(Clone, Copy, ValueEnum)]
enum Resize {
    Torchvision,
    Pil,
}

/// Captions every readable image; unreadable ones are reported and make the exit code 1.
pub fn run(args: CaptionArgs) -> anyhow::Result<ExitCode> {
    if args.min_new_tokens > args.max_new_tokens {
        anyhow::bail!(
            "--min-new-tokens {} is larger than --max-new-tokens {}",
            args.min_new_tokens,
            args.max_new_tokens
        );
    }
    let options = CaptionOptions {
        prompt: args.prompt.clone(),
        generation: blip::generation::GenerationOptions {
            max_new_tokens: args.max_new_tokens,
            min_new_tokens: args.min_new_tokens,
        },
    };
    let device = blip::Device::Cpu;
    let mut captioner = Captioner::load(&args.model, &device)?;
    captioner.set_resize_backend(match args.resize {
        Resize::Torchvision => ResizeBackend::Torchvision,
        Resize::Pil => ResizeBackend::Pil,
    });
    captioner.prefix(&options)?;

    let progress = progress_bar(args.images.len());
    let mut out = std::io::stdout().lock();
    let mut failures = 0usize;
    for chunk in args.images.chunks(args.batch_size as usize) {
        // Decode the chunk; failed images are reported in their place, the rest captioned.
        let mut good = Vec::with_capacity(chunk.len());
        let failed: Vec<Option<blip::Error>> =
            chunk.iter().map(|path| load_image(path).map(|image| good.push(image)).err()).collect();
        let mut captions = if good.is_empty() { vec![] } else { captioner.caption(&good, &options)? }.into_iter();
        for (path, failure) in chunk.iter().zip(&failed) {
            let written = match failure {
                None => {
                    let caption = captions.next().context("one caption per image")?;
                    write_caption(&mut out, args.format, path, &caption)
                }
                Some(err) => {
                    failures += 1;
                    progress.suspend(|| eprintln!("error: {err}"));
                    write_failure(&mut out, args.format, path, err)
                }
            };
            if let Err(err) = written {
                // A closed pipe (`blip caption ... | head`) ends the run quietly.
                if err.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(ExitCode::SUCCESS);
                }
                return Err(err).context("writing the output");
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if failures > 0 {
        eprintln!("error: {failures} of {} images could not be captioned", args.images.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn write_caption(
    out: &mut impl Write,
    format: Format,
    path: &std::path::Path,
    caption: &blip::Caption,
) -> std::io::Result<()> {
    match format {
        Format::Text => writeln!(out, "{}\t{}", path.display(), caption.text),
        Format::Jsonl => {
            let record = serde_json::json!({
                "image": path.display().to_string(),
                "caption": caption.text,
                "tokens": caption.tokens,
            });
            writeln!(out, "{record}")
        }
    }
}

/// In JSONL every image has its line, so consumers can pair lines with inputs; text output
/// leaves failures to stderr.
fn write_failure(
    out: &mut impl Write,
    format: Format,
    path: &std::path::Path,
    err: &blip::Error,
) -> std::io::Result<()> {
    match format {
        Format::Text => Ok(()),
        Format::Jsonl => {
            let record = serde_json::json!({ "image": path.display().to_string(), "error": err.to_string() });
            writeln!(out, "{record}")
        }
    }
}

fn progress_bar(total: usize) -> indicatif::ProgressBar {
    if total < 2 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images, {elapsed} elapsed, {eta} left")
            .expect("valid template"),
    );
    bar
}
