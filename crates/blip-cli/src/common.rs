//! What the subcommands share: output format and resize options, reading images a chunk at a
//! time with per-image failures, writing that ends quietly when the reader goes away, and the
//! progress bar.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip::processor::image::{load_image, ResizeBackend};
use clap::{Args, ValueEnum};
use image::RgbImage;
use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Jsonl,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Resize {
    Torchvision,
    Pil,
}

impl From<Resize> for ResizeBackend {
    fn from(resize: Resize) -> Self {
        match resize {
            Resize::Torchvision => ResizeBackend::Torchvision,
            Resize::Pil => ResizeBackend::Pil,
        }
    }
}

/// Batch size, output format and resize, as every image command takes them.
#[derive(Args)]
pub struct ImageRunArgs {
    /// Images processed together in one forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,

    /// Output: `text` (tab-separated columns) or `jsonl` (one JSON object per record).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Image resize: `torchvision` (transformers 5, default) or `pil` (transformers 4).
    #[arg(long, value_enum, default_value_t = Resize::Torchvision)]
    pub resize: Resize,
}

/// How a run over the inputs ended.
pub enum Ended {
    /// Every input was processed; `failures` of them could not be read.
    Finished { failures: usize },
    /// The reader of stdout went away (`blip ... | head`): the run stopped quietly.
    PipeClosed,
}

/// Reads `images` `batch_size` at a time and hands each chunk's readable images to `process`,
/// which returns one result per image, in order; then `write` writes each image's result in
/// input order. An unreadable image is reported on stderr (and, in JSONL, as
/// `{"image", "error"}` in its place) and the others still processed.
pub fn for_each_image<T>(
    images: &[PathBuf],
    batch_size: u16,
    format: Format,
    out: &mut dyn Write,
    mut process: impl FnMut(&[RgbImage]) -> anyhow::Result<Vec<T>>,
    mut write: impl FnMut(&mut dyn Write, &Path, T) -> std::io::Result<()>,
) -> anyhow::Result<Ended> {
    let progress = progress_bar(images.len(), "images");
    let mut failures = 0usize;
    for chunk in images.chunks(batch_size as usize) {
        // Decode the chunk; failed images are reported in their place, the rest processed.
        let mut good = Vec::with_capacity(chunk.len());
        let failed: Vec<Option<blip::Error>> =
            chunk.iter().map(|path| load_image(path).map(|image| good.push(image)).err()).collect();
        let mut results = if good.is_empty() { vec![] } else { process(&good)? }.into_iter();
        for (path, failure) in chunk.iter().zip(&failed) {
            let written = match failure {
                None => {
                    let result = results.next().context("one result per image")?;
                    write(out, path, result)
                }
                Some(err) => {
                    failures += 1;
                    progress.suspend(|| eprintln!("error: {err}"));
                    write_failure(out, format, path, err)
                }
            };
            if !still_open(written)? {
                return Ok(Ended::PipeClosed);
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(Ended::Finished { failures })
}

/// The exit code of a run over `total` images; failures get a last line saying how many images
/// could not be `done` ("captioned", "answered", ...).
pub fn exit_code(ended: Ended, total: usize, done: &str) -> ExitCode {
    match ended {
        Ended::Finished { failures } if failures > 0 => {
            eprintln!("error: {failures} of {total} images could not be {done}");
            ExitCode::FAILURE
        }
        Ended::Finished { .. } | Ended::PipeClosed => ExitCode::SUCCESS,
    }
}

/// `Ok(true)` when written, `Ok(false)` when stdout's reader has gone (a closed pipe ends the
/// run quietly); any other write error is an error.
pub fn still_open(written: std::io::Result<()>) -> anyhow::Result<bool> {
    match written {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(err).context("writing the output"),
    }
}

/// One JSON object and a newline; fields in the order the record declares them.
pub fn write_json_line(out: &mut dyn Write, record: &impl Serialize) -> std::io::Result<()> {
    let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
    writeln!(out, "{line}")
}

/// In JSONL every image has its line, so consumers can pair lines with inputs; text output
/// leaves failures to stderr.
fn write_failure(out: &mut dyn Write, format: Format, path: &Path, err: &blip::Error) -> std::io::Result<()> {
    match format {
        Format::Text => Ok(()),
        Format::Jsonl => {
            let record = serde_json::json!({ "image": path.display().to_string(), "error": err.to_string() });
            writeln!(out, "{record}")
        }
    }
}

/// A bar on stderr for two or more inputs when stderr is a terminal; hidden otherwise.
pub fn progress_bar(total: usize, inputs: &str) -> indicatif::ProgressBar {
    if total < 2 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {inputs}, {{elapsed}} elapsed, {{eta}} left"
        ))
        .expect("valid template"),
    );
    bar
}
