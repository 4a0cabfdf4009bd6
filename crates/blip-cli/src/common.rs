//! What the subcommands share: output format, resize and text-generation options, reading images
//! a chunk at a time with per-image failures, writing that ends quietly when the reader goes away,
//! and the progress bar.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use blip::tasks::GenerationDefaults;
use blip::RgbImage;
use blip::{GeneratedText, GenerationOptions, GenerationOverrides, ImageSource, Param, ResizeBackend, UrlLimits};
use clap::{Arg, Args, Command, ValueEnum};
use serde::Serialize;

use crate::sidecar::{self, Sidecars};

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

/// Batch size and resize, as every command that reads images takes them.
#[derive(Args)]
pub struct BatchArgs {
    /// Images processed together in one forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,

    /// Image resize: `torchvision` (transformers 5, default) or `pil` (transformers 4).
    #[arg(long, value_enum, default_value_t = Resize::Torchvision)]
    pub resize: Resize,
}

/// `--image-size`: another resolution than the checkpoint's.
#[derive(Args)]
pub struct ImageSizeArg {
    /// Resize images to N×N pixels (a multiple of 16) instead of the checkpoint's size, the
    /// vision position embeddings interpolated as transformers' `interpolate_pos_encoding=True`.
    #[arg(long, value_name = "N")]
    pub image_size: Option<usize>,
}

impl ImageSizeArg {
    /// Sets the resolution of `task` when asked.
    pub fn apply<M>(&self, task: &mut blip::Task<M>) -> Result<(), blip::Error> {
        match self.image_size {
            Some(size) => task.set_image_size(size),
            None => Ok(()),
        }
    }
}

/// The images and how to run over them, for the commands that print one record per image.
#[derive(Args)]
pub struct ImageRunArgs {
    #[command(flatten)]
    pub batch: BatchArgs,

    /// Output: `text` (tab-separated columns) or `jsonl` (one JSON object per record).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Images (JPEG, PNG, WebP, GIF, BMP, TIFF): files, folders (walked recursively), http(s)
    /// URLs, or `-` for a list of them on standard input, one per line.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

impl ImageRunArgs {
    /// Runs over the images `batch_size` at a time with [`for_each_image`], writing to stdout,
    /// and returns the exit code (see [`exit_code`]; `done` says what happens to an image,
    /// "captioned"). `write` gets the output format with each result.
    pub fn process<T>(
        &self,
        done: &str,
        process: impl FnMut(&[RgbImage]) -> anyhow::Result<Vec<T>>,
        write: impl FnMut(&mut dyn Write, Format, &ImageSource, T) -> std::io::Result<()>,
    ) -> anyhow::Result<ExitCode> {
        self.process_with_sidecars(done, None, |_: &T| String::new(), process, write)
    }

    /// [`Self::process`], also writing `text` of each result to the image's sidecar file when
    /// `sidecars` asks for them; the run ends with a summary of the files written.
    pub fn process_with_sidecars<T>(
        &self,
        done: &str,
        sidecars: Option<&Sidecars>,
        text: impl Fn(&T) -> String,
        process: impl FnMut(&[RgbImage]) -> anyhow::Result<Vec<T>>,
        mut write: impl FnMut(&mut dyn Write, Format, &ImageSource, T) -> std::io::Result<()>,
    ) -> anyhow::Result<ExitCode> {
        let format = self.format;
        let mut sources = image_sources(&self.images)?;
        let total = sources.len();
        let mut tally = sidecar::Tally::default();
        if let Some(sidecars) = sidecars {
            // Images whose file is there (without --overwrite), or that share a file with
            // another, are settled before any model work.
            let planned = sidecars.plan(sources);
            sources = planned.todo;
            tally.skipped = planned.skipped;
            tally.failed = planned.refused.len();
            for refusal in &planned.refused {
                eprintln!("error: {refusal}");
            }
        }
        // With files to write, a closed stdout only stops the printing.
        let mut out = UnlessClosed { inner: std::io::stdout().lock(), closed: false, forgive: sidecars.is_some() };
        let ended = for_each_image(&sources, self.batch.batch_size, format, &mut out, process, |out, source, t| {
            if let Some(sidecars) = sidecars {
                match sidecars.write(source, &text(&t)) {
                    Ok(()) => tally.written += 1,
                    Err(err) => {
                        tally.failed += 1;
                        eprintln!("error: {err}");
                    }
                }
            }
            write(out, format, source, t)
        })?;
        if let Some(sidecars) = sidecars {
            tally.failed += match ended {
                Ended::Finished { failures } => failures,
                Ended::PipeClosed => 0,
            };
            eprintln!("{}", tally.summary(sidecars));
            if tally.failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Ok(exit_code(ended, total, done))
    }
}

/// The images the arguments name (files, folders, URLs, `-` for standard input), refused when
/// there are none.
pub fn image_sources(args: &[String]) -> anyhow::Result<Vec<ImageSource>> {
    let sources = blip::processor::image::collect_sources(args, &mut std::io::stdin().lock())?;
    if sources.is_empty() {
        anyhow::bail!("no images found in {} (images are found in folders by their content)", args.join(", "));
    }
    Ok(sources)
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

impl From<EarlyStopping> for blip::EarlyStopping {
    fn from(early_stopping: EarlyStopping) -> Self {
        match early_stopping {
            EarlyStopping::False => Self::Heuristic,
            EarlyStopping::True => Self::Done,
            EarlyStopping::Never => Self::Never,
        }
    }
}

/// The options of transformers' `generate`, same names in kebab-case. Unset, each takes the
/// task's default (transformers', shown in the help), or with `--generation-config` the
/// checkpoint's `generation_config.json`.
#[derive(Args)]
#[command(next_help_heading = "Generation")]
pub struct GenerationArgs {
    /// Most new tokens to generate, the prompt not counted.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,

    /// Fewest new tokens before the text may end.
    #[arg(long)]
    pub min_new_tokens: Option<usize>,

    /// Beams of beam search; 1 is greedy search, or sampling with --do-sample.
    #[arg(long)]
    pub num_beams: Option<usize>,

    /// Beam search: a finished sequence scores sum(log p) / length ** this (> 0 favours longer ones).
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,

    /// Beam search: when to stop (transformers' early_stopping False, True or "never").
    #[arg(long, value_enum)]
    pub early_stopping: Option<EarlyStopping>,

    /// Sequences returned per input, best first: the best beams, or independent samples.
    #[arg(long)]
    pub num_return_sequences: Option<usize>,

    /// Sample each token from the model's distribution instead of taking the most likely one.
    #[arg(long)]
    pub do_sample: bool,

    /// Sampling: logits are divided by it (< 1 sharper, > 1 flatter).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,

    /// Sampling: only the k most likely tokens (0: all).
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Sampling: only the most likely tokens whose probabilities add up to p (nucleus sampling).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,

    /// Scores of tokens already in the sequence are penalized by this factor (1: none; BLIP's demo uses 1.1).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,

    /// No n-gram of this size may occur twice (0: no limit).
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,

    /// Sampling: seed of the random stream, for repeatable samples [default: a random one].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Start from the checkpoint's generation_config.json, which transformers' BLIP `generate` ignores.
    #[arg(long)]
    pub generation_config: bool,
}

impl GenerationArgs {
    /// The options given on the command line, as the library names them.
    pub fn overrides(&self) -> GenerationOverrides {
        let mut overrides = GenerationOverrides::default();
        overrides.max_new_tokens = self.max_new_tokens;
        overrides.min_new_tokens = self.min_new_tokens;
        overrides.num_beams = self.num_beams;
        overrides.length_penalty = self.length_penalty;
        overrides.early_stopping = self.early_stopping.map(Into::into);
        overrides.num_return_sequences = self.num_return_sequences;
        overrides.do_sample = self.do_sample.then_some(true);
        overrides.temperature = self.temperature;
        overrides.top_k = self.top_k;
        overrides.top_p = self.top_p;
        overrides.repetition_penalty = self.repetition_penalty;
        overrides.no_repeat_ngram_size = self.no_repeat_ngram_size;
        overrides.seed = self.seed;
        overrides
    }

    /// `defaults` with the options given on the command line.
    pub fn apply(&self, defaults: &GenerationOptions) -> GenerationOptions {
        self.overrides().apply(defaults)
    }

    /// The options given on the command line.
    pub fn given(&self) -> Vec<Param> {
        self.overrides().given()
    }

    /// Before anything is loaded: refuses what the given options get wrong among themselves
    /// (the library's check on transformers' defaults, kept when it involves only given
    /// options; the rest waits for the checkpoint's defaults).
    pub fn check_given(&self) -> Result<(), blip::Error> {
        let given = self.given();
        match self.apply(&GenerationOptions::default()).validate() {
            Err(refused) if refused.params().iter().all(|p| given.contains(p)) => Err(refused.into()),
            _ => Ok(()),
        }
    }

    /// The options to generate with: the given options over transformers' defaults (or, with
    /// --generation-config, the checkpoint's generation_config.json), checked by the library.
    /// Warns on stderr about a generation_config.json left unused, and about given options
    /// that have no effect with the others, as transformers does.
    pub fn resolve(&self, defaults: &GenerationDefaults, model: &str) -> Result<GenerationOptions, blip::Error> {
        let base = if self.generation_config {
            match defaults.saved()? {
                Some(saved) => saved,
                None => {
                    eprintln!("warning: {model} has no generation_config.json: --generation-config has no effect");
                    &defaults.transformers
                }
            }
        } else {
            if defaults.differs() {
                eprintln!(
                    "warning: {model}: generation_config.json is not applied, as in transformers' BLIP generate; add --generation-config to use it"
                );
            }
            &defaults.transformers
        };
        let options = self.apply(base);
        options.validate()?;
        let given = self.given();
        let ignored = options.ignored();
        let sampling = [Param::Temperature, Param::TopK, Param::TopP, Param::Seed];
        let (sampling, beams): (Vec<Param>, Vec<Param>) =
            ignored.into_iter().filter(|p| given.contains(p)).partition(|p| sampling.contains(p));
        warn_no_effect(&sampling, "without --do-sample");
        warn_no_effect(&beams, "without beam search (--num-beams 2 or more)");
        Ok(options)
    }
}

fn warn_no_effect(params: &[Param], condition: &str) {
    let flags: Vec<String> = params.iter().map(|&p| flag(p, "")).collect();
    match flags.as_slice() {
        [] => {}
        [one] => eprintln!("warning: {one} has no effect {condition}"),
        several => eprintln!("warning: {} have no effect {condition}", several.join(", ")),
    }
}

/// Generated texts of one image (captions or answers) as a record: text output has a
/// `path<TAB>text` line per text, best first; JSONL one record per image,
/// `{"image", ["question",] key, "tokens", "score", "log_prob"}`, or when `several` are asked
/// for `{"image", ["question",] key + "s": [{key, "tokens", "score", "log_prob"}, ...]}`.
pub struct GeneratedRecord<'a> {
    pub key: &'static str,
    pub question: Option<&'a str>,
    pub several: bool,
}

impl GeneratedRecord<'_> {
    pub fn write(
        &self,
        out: &mut dyn Write,
        format: Format,
        image: &ImageSource,
        texts: &[GeneratedText],
    ) -> std::io::Result<()> {
        let image = image.to_string();
        match format {
            Format::Text => {
                for text in texts {
                    writeln!(out, "{image}\t{}", text.text)?;
                }
                Ok(())
            }
            Format::Jsonl => {
                let mut record = serde_json::Map::new();
                record.insert("image".into(), image.into());
                if let Some(question) = self.question {
                    record.insert("question".into(), question.into());
                }
                let scored = |text: &GeneratedText| {
                    let mut fields = serde_json::Map::new();
                    fields.insert(self.key.into(), text.text.clone().into());
                    fields.insert("tokens".into(), text.tokens.clone().into());
                    fields.insert("score".into(), json_f32(text.score));
                    fields.insert("log_prob".into(), json_f32(text.log_prob));
                    fields
                };
                if self.several {
                    let all = texts.iter().map(|t| serde_json::Value::Object(scored(t))).collect();
                    record.insert(format!("{}s", self.key), serde_json::Value::Array(all));
                } else {
                    let first =
                        texts.first().ok_or_else(|| std::io::Error::other(format!("no {} generated", self.key)))?;
                    record.extend(scored(first));
                }
                write_json_line(out, &record)
            }
        }
    }
}

/// An f32 as serde writes an f32 field: its shortest decimal form (0.1, not 0.10000000149011612).
fn json_f32(x: f32) -> serde_json::Value {
    x.to_string().parse::<f64>().map_or(serde_json::Value::Null, serde_json::Value::from)
}

/// For `Command::mut_args`: appends to the help of every [`GenerationArgs`] flag the default it
/// takes, from the task's own `defaults`, so that the library's defaults are written once.
pub fn show_generation_defaults(defaults: GenerationOptions) -> impl FnMut(Arg) -> Arg {
    move |arg| {
        let early_stopping = match defaults.early_stopping {
            blip::EarlyStopping::Done => "true",
            blip::EarlyStopping::Never => "never",
            _ => "false",
        };
        let value = match arg.get_id().as_str() {
            "max_new_tokens" => defaults.max_new_tokens.to_string(),
            "min_new_tokens" => defaults.min_new_tokens.to_string(),
            "num_beams" => defaults.num_beams.to_string(),
            "length_penalty" => defaults.length_penalty.to_string(),
            "early_stopping" => early_stopping.to_string(),
            "num_return_sequences" => defaults.num_return_sequences.to_string(),
            "temperature" => defaults.temperature.to_string(),
            "top_k" => defaults.top_k.to_string(),
            "top_p" => defaults.top_p.to_string(),
            "repetition_penalty" => defaults.repetition_penalty.to_string(),
            "no_repeat_ngram_size" => defaults.no_repeat_ngram_size.to_string(),
            _ => return arg,
        };
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        arg.help(format!("{help} [default: {value}]"))
    }
}

/// For `Command::mut_args`: makes every [`GenerationArgs`] flag conflict with `other`, so clap
/// names the one given (a conflict with the whole group would list them all).
pub fn generation_conflicts_with(other: &'static str) -> impl FnMut(Arg) -> Arg {
    let generation = GenerationArgs::augment_args(Command::new("generation"));
    let ids: Vec<clap::Id> = generation.get_arguments().map(|arg| arg.get_id().clone()).collect();
    move |arg| if ids.contains(arg.get_id()) { arg.conflicts_with(other) } else { arg }
}

/// For `Command::mut_args`: makes every [`GenerationArgs`] flag require `other` (e.g. `--caption`).
pub fn generation_requires(other: &'static str) -> impl FnMut(Arg) -> Arg {
    let generation = GenerationArgs::augment_args(Command::new("generation"));
    let ids: Vec<clap::Id> = generation.get_arguments().map(|arg| arg.get_id().clone()).collect();
    move |arg| if ids.contains(arg.get_id()) { arg.requires(other) } else { arg }
}

/// The flag that sets a library option; `num_return_sequences` is the flag the command calls
/// it (`--num-captions`), empty for the default one.
pub fn flag(param: Param, num_return_sequences: &str) -> String {
    match param {
        Param::NumReturnSequences if !num_return_sequences.is_empty() => num_return_sequences.to_string(),
        Param::Label => "--labels".into(),
        // --answers names a file; what can be wrong is the answers in it.
        Param::Images | Param::Answers => param.name().to_string(),
        Param::Epochs => "--epochs".into(),
        Param::LearningRate => "--lr".into(),
        Param::GradientAccumulationSteps => "--grad-accum".into(),
        Param::EvalSteps => "--eval-every".into(),
        other => format!("--{}", other.name().replace('_', "-")),
    }
}

/// An error as the command line says it: the library's validation errors with its options
/// written as flags, and a hint at the command that uses a checkpoint of another kind.
pub fn describe(err: &anyhow::Error, num_return_sequences: &str) -> String {
    err.chain()
        .map(|cause| match cause.downcast_ref::<blip::Error>() {
            Some(blip::Error::InvalidInput(invalid)) => invalid.message(&|p| flag(p, num_return_sequences)),
            Some(wrong @ blip::Error::WrongArchitecture { found, .. }) => {
                format!("{wrong} (it is for {})", commands_for(*found))
            }
            _ => match cause.downcast_ref::<blip::InvalidInput>() {
                Some(invalid) => invalid.message(&|p| flag(p, num_return_sequences)),
                None => cause.to_string(),
            },
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// What a checkpoint's architecture is for, in this program's commands.
fn commands_for(architecture: blip::Architecture) -> &'static str {
    match architecture {
        blip::Architecture::ConditionalGeneration => "captioning: use it with `blip caption`",
        blip::Architecture::QuestionAnswering => "visual question answering: use it with `blip vqa`",
        blip::Architecture::ImageTextRetrieval => {
            "image-text matching: use it with `blip match`, `blip embed` or `blip classify`"
        }
        _ => "image and text features: use it with `blip embed`, `blip classify` or `blip match`",
    }
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
    images: &[ImageSource],
    batch_size: u16,
    format: Format,
    out: &mut dyn Write,
    mut process: impl FnMut(&[RgbImage]) -> anyhow::Result<Vec<T>>,
    mut write: impl FnMut(&mut dyn Write, &ImageSource, T) -> std::io::Result<()>,
) -> anyhow::Result<Ended> {
    let progress = progress_bar(images.len(), "images");
    let mut failures = 0usize;
    for chunk in images.chunks(batch_size as usize) {
        // Decode the chunk; failed images are reported in their place, the rest processed.
        let mut good = Vec::with_capacity(chunk.len());
        let failed: Vec<Option<blip::Error>> =
            chunk.iter().map(|source| source.load(&UrlLimits::default()).map(|image| good.push(image)).err()).collect();
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
fn write_failure(out: &mut dyn Write, format: Format, image: &ImageSource, err: &blip::Error) -> std::io::Result<()> {
    match format {
        Format::Text => Ok(()),
        Format::Jsonl => {
            let record = serde_json::json!({ "image": image.to_string(), "error": err.to_string() });
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

/// [`progress_bar`] with the rate, for long runs (indexing a collection).
pub fn rate_bar(total: usize, inputs: &str) -> indicatif::ProgressBar {
    let bar = progress_bar(total, inputs);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {inputs}, {{per_sec}}, {{elapsed}} elapsed, {{eta}} left"
        ))
        .expect("valid template"),
    );
    bar
}

/// Stdout that, when `forgive` is set, drops whatever is written after its reader has gone
/// instead of failing (a run with files to write carries on).
pub struct UnlessClosed<W> {
    pub inner: W,
    pub closed: bool,
    pub forgive: bool,
}

impl<W: Write> UnlessClosed<W> {
    fn forgiven<T>(&mut self, result: std::io::Result<T>, instead: T) -> std::io::Result<T> {
        match result {
            Err(err) if self.forgive && err.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(instead)
            }
            other => other,
        }
    }
}

impl<W: Write> Write for UnlessClosed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let result = self.inner.write(buf);
        self.forgiven(result, buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.inner.flush();
        self.forgiven(result, ())
    }
}
