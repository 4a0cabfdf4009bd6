//! What the subcommands share: output format, resize and text-generation options, reading images
//! a chunk at a time with per-image failures, writing that ends quietly when the reader goes away,
//! and the progress bar.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip::generation::GenerationOptions;
use blip::processor::image::{load_image, ResizeBackend};
use clap::{Arg, Args, Command, ValueEnum};
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

/// `--dtype`: what the weight matrices are held in.
#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl From<Dtype> for blip::DType {
    fn from(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => blip::DType::F32,
            Dtype::Bf16 => blip::DType::BF16,
            Dtype::F16 => blip::DType::F16,
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

/// When beam search stops: transformers' `early_stopping` False, True or "never".
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EarlyStopping {
    /// Stop when the best running beam can no longer beat the worst finished one.
    False,
    /// Stop as soon as `--num-beams` sequences are finished.
    True,
    /// With a positive length penalty, let running beams grow to the maximum length first.
    Never,
}

impl From<EarlyStopping> for blip::generation::EarlyStopping {
    fn from(early_stopping: EarlyStopping) -> Self {
        match early_stopping {
            EarlyStopping::False => Self::Heuristic,
            EarlyStopping::True => Self::Done,
            EarlyStopping::Never => Self::Never,
        }
    }
}

/// The options of transformers' `generate` (same names, kebab-case, same defaults) but the
/// lengths, which every generating command declares with its own default.
#[derive(Args)]
#[command(next_help_heading = "Generation")]
pub struct GenerationArgs {
    /// Beams of beam search; 1 is greedy search, or sampling with --do-sample.
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,

    /// Beam search: a finished sequence scores sum(log p) / length ** this (> 0 favours longer ones).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub length_penalty: f32,

    /// Beam search: when to stop (transformers' early_stopping False, True or "never").
    #[arg(long, value_enum, default_value_t = EarlyStopping::False)]
    pub early_stopping: EarlyStopping,

    /// Sequences returned per input, best first: the best beams, or independent samples.
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,

    /// Sample each token from the model's distribution instead of taking the most likely one.
    #[arg(long)]
    pub do_sample: bool,

    /// Sampling: logits are divided by it (< 1 sharper, > 1 flatter).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,

    /// Sampling: only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,

    /// Sampling: only the most likely tokens whose probabilities add up to p (nucleus sampling).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,

    /// Scores of tokens already in the sequence are penalized by this factor (1: none; BLIP's demo uses 1.1).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,

    /// No n-gram of this size may occur twice (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram_size: usize,

    /// Sampling: seed of the random stream, for repeatable samples [default: a random one].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl GenerationArgs {
    /// The library's options with these lengths.
    pub fn options(&self, max_new_tokens: usize, min_new_tokens: usize) -> GenerationOptions {
        GenerationOptions {
            max_new_tokens,
            min_new_tokens,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping.into(),
            num_return_sequences: self.num_return_sequences,
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            seed: self.seed,
        }
    }
}

/// For `Command::mut_args`: makes every [`GenerationArgs`] flag conflict with `other`, so clap
/// names the one given (a conflict with the whole group would list them all).
pub fn generation_conflicts_with(other: &'static str) -> impl FnMut(Arg) -> Arg {
    let generation = GenerationArgs::augment_args(Command::new("generation"));
    let ids: Vec<clap::Id> = generation.get_arguments().map(|arg| arg.get_id().clone()).collect();
    move |arg| if ids.contains(arg.get_id()) { arg.conflicts_with(other) } else { arg }
}

/// Refuses contradictory or out-of-range generation options with the library's message, its
/// option names written as the flags that set them; `num_return_sequences` is the flag the
/// command calls it (`--num-captions`, `--num-return-sequences`). Then warns on stderr about
/// options that have no effect with these others, as transformers does.
pub fn check_generation(options: &GenerationOptions, num_return_sequences: &str) -> anyhow::Result<()> {
    if options.do_sample && options.num_beams > 1 {
        anyhow::bail!(
            "--do-sample samples with one beam, not --num-beams {}: beam-search multinomial sampling is not supported",
            options.num_beams
        );
    }
    if let Err(message) = options.validate() {
        anyhow::bail!("{}", flag_names(&message, num_return_sequences));
    }
    let defaults = GenerationOptions::default();
    if !options.do_sample {
        let ignored: Vec<&str> = [
            ("--temperature", options.temperature != defaults.temperature),
            ("--top-k", options.top_k != defaults.top_k),
            ("--top-p", options.top_p != defaults.top_p),
            ("--seed", options.seed.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        warn_no_effect(&ignored, "without --do-sample");
    }
    if options.num_beams == 1 {
        let ignored: Vec<&str> = [
            ("--length-penalty", options.length_penalty != defaults.length_penalty),
            ("--early-stopping", options.early_stopping != defaults.early_stopping),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        warn_no_effect(&ignored, "without beam search (--num-beams 2 or more)");
    }
    Ok(())
}

fn warn_no_effect(flags: &[&str], condition: &str) {
    match flags {
        [] => {}
        [flag] => eprintln!("warning: {flag} has no effect {condition}"),
        _ => eprintln!("warning: {} have no effect {condition}", flags.join(", ")),
    }
}

/// `message` with every whole word that names a [`GenerationOptions`] field replaced by its flag.
fn flag_names(message: &str, num_return_sequences: &str) -> String {
    const FIELDS: [&str; 13] = [
        "max_new_tokens",
        "min_new_tokens",
        "num_beams",
        "length_penalty",
        "early_stopping",
        "num_return_sequences",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "seed",
    ];
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut named = String::with_capacity(message.len() + 16);
    let mut rest = message;
    while let Some(start) = rest.find(is_word) {
        named.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_word(c)).unwrap_or(tail.len());
        let word = &tail[..end];
        // A flag already written (`--top-p`) stays as it is.
        let after_dashes = named.ends_with("--");
        match word {
            "num_return_sequences" if !after_dashes => named.push_str(num_return_sequences),
            _ if !after_dashes && FIELDS.contains(&word) => {
                named.push_str("--");
                named.push_str(&word.replace('_', "-"));
            }
            _ => named.push_str(word),
        }
        rest = &tail[end..];
    }
    named.push_str(rest);
    named
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

#[cfg(test)]
mod tests {
    use super::flag_names;

    #[test]
    fn option_names_become_flags() {
        assert_eq!(
            flag_names("num_return_sequences 4 is larger than num_beams 2: beam search", "--num-captions"),
            "--num-captions 4 is larger than --num-beams 2: beam search"
        );
        assert_eq!(flag_names("top_p must be in (0, 1], not 1.5", "-"), "--top-p must be in (0, 1], not 1.5");
        assert_eq!(
            flag_names("temperature must be a positive number, not 0", "-"),
            "--temperature must be a positive number, not 0"
        );
        assert_eq!(flag_names("the top_pp and --top_p stay", "-"), "the top_pp and --top_p stay");
    }
}
