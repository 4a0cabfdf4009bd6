//! `blip vqa`: ask one question about every image, answered freely (generated) or ranked from a
//! closed answer list; print text or JSONL.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip::{Answer, AnswerOptions, QuestionAnswerer, RankOptions, RankedAnswer};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format, GenerationArgs, ImageRunArgs};

#[derive(Args)]
#[command(
    mut_arg("num_return_sequences", |arg| arg
        .help("Answers per image, best first: the best beams (needs --num-beams at least as large) or independent samples (--do-sample)")),
    mut_args(common::generation_conflicts_with("answers")),
)]
pub struct VqaArgs {
    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = "Salesforce/blip-vqa-base")]
    model: String,

    /// The question asked about every image, e.g. "how many dogs are there?".
    #[arg(long, short)]
    question: String,

    /// Rank the answers of this file (one per line) instead of generating one.
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,

    /// Ranked answers printed per image, best first [default: 1].
    #[arg(long, requires = "answers", value_parser = clap::value_parser!(u16).range(1..))]
    top: Option<u16>,

    /// Answers scored in full: those whose first token is most likely [default: 128].
    #[arg(long, requires = "answers", value_parser = clap::value_parser!(u16).range(1..))]
    candidates: Option<u16>,

    /// Most new tokens of a generated answer.
    #[arg(long, default_value_t = 10, conflicts_with = "answers", help_heading = "Generation")]
    max_new_tokens: usize,

    /// Fewest new tokens before a generated answer may end.
    #[arg(long, default_value_t = 0, conflicts_with = "answers", help_heading = "Generation")]
    min_new_tokens: usize,

    #[command(flatten)]
    run: ImageRunArgs,

    /// Image files (JPEG, PNG, WebP, GIF, BMP, TIFF).
    #[arg(required = true)]
    images: Vec<PathBuf>,

    // How answers are generated; none of it goes with --answers.
    #[command(flatten)]
    generation: GenerationArgs,
}

/// Answers the question about every readable image; unreadable ones are reported and make the
/// exit code 1.
pub fn run(args: VqaArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    if args.question.trim().is_empty() {
        anyhow::bail!("--question is empty: ask something about the images");
    }
    let generation = args.generation.options(args.max_new_tokens, args.min_new_tokens);
    if args.answers.is_none() {
        common::check_generation(&generation, "--num-return-sequences")?;
    }
    let several = generation.num_return_sequences > 1;
    let answers = args.answers.as_deref().map(read_answers).transpose()?;

    let device = blip::Device::Cpu;
    let mut answerer = QuestionAnswerer::load_with_dtype(&args.model, &device, dtype)?;
    answerer.set_resize_backend(args.run.resize.into());
    let format = args.run.format;
    let question = args.question.as_str();
    let mut out = std::io::stdout().lock();
    let ended = match answers {
        None => {
            let options = AnswerOptions { generation };
            answerer.check_options(&options)?;
            common::for_each_image(
                &args.images,
                args.run.batch_size,
                format,
                &mut out,
                |images| Ok(answerer.answer(images, &vec![question; images.len()], &options)?),
                |out, path, answers| write_answers(out, format, path, question, &answers, several),
            )?
        }
        Some((file, answers)) => {
            let list = answerer.answer_list(&answers).with_context(|| format!("answers in {}", file.display()))?;
            let options = RankOptions {
                candidates: args.candidates.map_or(128, usize::from),
                top: args.top.map_or(1, usize::from),
            };
            common::for_each_image(
                &args.images,
                args.run.batch_size,
                format,
                &mut out,
                |images| Ok(answerer.rank(images, &vec![question; images.len()], &list, &options)?),
                |out, path, ranked| write_ranked(out, format, path, question, &ranked),
            )?
        }
    };
    Ok(common::exit_code(ended, args.images.len(), "answered"))
}

/// The answer list: one answer a line, trimmed, blank lines skipped.
fn read_answers(file: &Path) -> anyhow::Result<(&Path, Vec<String>)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read the answer list {}", file.display()))?;
    let answers: Vec<String> = text.lines().map(str::trim).filter(|line| !line.is_empty()).map(String::from).collect();
    if answers.is_empty() {
        anyhow::bail!("the answer list {} has no answers: put one answer on each line", file.display());
    }
    Ok((file, answers))
}

#[derive(Serialize)]
struct AnswerRecord<'a> {
    image: String,
    question: &'a str,
    #[serde(flatten)]
    answer: GeneratedAnswer<'a>,
}

#[derive(Serialize)]
struct AnswersRecord<'a> {
    image: String,
    question: &'a str,
    answers: Vec<GeneratedAnswer<'a>>,
}

#[derive(Serialize)]
struct GeneratedAnswer<'a> {
    answer: &'a str,
    tokens: &'a [u32],
    score: f32,
    log_prob: f32,
}

impl<'a> From<&'a Answer> for GeneratedAnswer<'a> {
    fn from(answer: &'a Answer) -> Self {
        Self { answer: &answer.text, tokens: &answer.tokens, score: answer.score, log_prob: answer.log_prob }
    }
}

/// Text: one `path<TAB>answer` line per answer, best first. JSONL: one record per image, with its
/// answer, or, when `several` are asked for, its `answers` best first.
fn write_answers(
    out: &mut dyn Write,
    format: Format,
    path: &Path,
    question: &str,
    answers: &[Answer],
    several: bool,
) -> std::io::Result<()> {
    let image = path.display().to_string();
    match format {
        Format::Text => {
            for answer in answers {
                writeln!(out, "{image}\t{}", answer.text)?;
            }
            Ok(())
        }
        Format::Jsonl if several => common::write_json_line(
            out,
            &AnswersRecord { image, question, answers: answers.iter().map(GeneratedAnswer::from).collect() },
        ),
        Format::Jsonl => {
            let answer = answers.first().ok_or_else(|| std::io::Error::other("no answer generated"))?;
            common::write_json_line(out, &AnswerRecord { image, question, answer: answer.into() })
        }
    }
}

#[derive(Serialize)]
struct RankedRecord<'a> {
    image: String,
    question: &'a str,
    answers: Vec<ScoredAnswer<'a>>,
}

#[derive(Serialize)]
struct ScoredAnswer<'a> {
    answer: &'a str,
    score: f32,
}

/// Text: one `path<TAB>answer<TAB>score` line per ranked answer, best first; JSONL: one record
/// per image with its answers best first.
fn write_ranked(
    out: &mut dyn Write,
    format: Format,
    path: &Path,
    question: &str,
    ranked: &[RankedAnswer],
) -> std::io::Result<()> {
    match format {
        Format::Text => {
            for answer in ranked {
                writeln!(out, "{}\t{}\t{:.4}", path.display(), answer.answer, answer.score)?;
            }
            Ok(())
        }
        Format::Jsonl => common::write_json_line(
            out,
            &RankedRecord {
                image: path.display().to_string(),
                question,
                answers: ranked.iter().map(|a| ScoredAnswer { answer: &a.answer, score: a.score }).collect(),
            },
        ),
    }
}
