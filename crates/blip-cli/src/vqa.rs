//! `blip vqa`: ask one question about every image, answered freely (generated) or ranked from a
//! closed answer list; print text or JSONL.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip::{Checkpoint, ImageSource, Param, QuestionAnswerer, RankOptions, RankedAnswer};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format, GeneratedRecord, GenerationArgs, ImageRunArgs};
use crate::sidecar::SidecarArgs;

#[derive(Args)]
#[command(
    mut_arg("num_return_sequences", |arg| arg
        .help("Answers per image, best first: the best beams (needs --num-beams at least as large) or independent samples (--do-sample)")),
    mut_args(common::show_generation_defaults(QuestionAnswerer::default_generation())),
    mut_args(common::generation_conflicts_with("answers")),
)]
pub struct VqaArgs {
    #[command(flatten)]
    image_size: common::ImageSizeArg,

    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = QuestionAnswerer::DEFAULT_MODEL)]
    model: String,

    /// The question asked about every image, e.g. "how many dogs are there?".
    #[arg(long, short)]
    question: String,

    /// Rank the answers of this file (one per line) instead of generating one.
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,

    /// Ranked answers printed per image, best first.
    #[arg(long, requires = "answers", default_value_t = RankOptions::default().top)]
    top: usize,

    /// Answers scored in full: those whose first token is most likely.
    #[arg(long, requires = "answers", default_value_t = RankOptions::default().candidates)]
    candidates: usize,

    #[command(flatten)]
    run: ImageRunArgs,

    #[command(flatten)]
    sidecar: SidecarArgs,

    // How answers are generated; none of it goes with --answers.
    #[command(flatten)]
    generation: GenerationArgs,
}

/// Answers the question about every readable image; unreadable ones are reported and make the
/// exit code 1.
pub fn run(args: VqaArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    let question = args.question.as_str();
    blip::tasks::check_not_empty(Param::Question, &[question])?;
    args.generation.check_given()?;
    let sidecars = args.sidecar.sidecars()?;
    let ranking = match args.answers.as_deref() {
        Some(file) => {
            let options = RankOptions::new(args.candidates, args.top);
            options.validate()?;
            Some((read_answers(file)?, options))
        }
        None => None,
    };

    let checkpoint = Checkpoint::locate(&args.model)?;
    let job = match ranking {
        Some(ranking) => Job::Rank(ranking),
        None => {
            Job::Generate(args.generation.resolve(&QuestionAnswerer::generation_defaults(&checkpoint)?, &args.model)?)
        }
    };
    let mut answerer = QuestionAnswerer::from_checkpoint(&checkpoint, &blip::Device::Cpu, dtype)?;
    answerer.set_resize_backend(args.run.batch.resize.into());
    args.image_size.apply(&mut answerer)?;
    match job {
        Job::Generate(generation) => {
            let mut options = answerer.default_options();
            options.generation = generation;
            answerer.validate(&options)?;
            let record = GeneratedRecord {
                key: "answer",
                question: Some(question),
                several: options.generation.num_return_sequences > 1,
            };
            args.run.process_with_sidecars(
                "answered",
                sidecars.as_ref(),
                |answers: &Vec<blip::Answer>| answers.first().map(|best| best.text.clone()).unwrap_or_default(),
                |images| Ok(answerer.answer(images, &vec![question; images.len()], &options)?),
                |out, format, image, answers| record.write(out, format, image, &answers),
            )
        }
        Job::Rank(((file, answers), options)) => {
            let list = answerer.answer_list(&answers).with_context(|| format!("answers in {}", file.display()))?;
            args.run.process_with_sidecars(
                "answered",
                sidecars.as_ref(),
                |ranked: &Vec<RankedAnswer>| ranked.first().map(|best| best.answer.clone()).unwrap_or_default(),
                |images| Ok(answerer.rank(images, &vec![question; images.len()], &list, &options)?),
                |out, format, image, ranked| write_ranked(out, format, image, question, &ranked),
            )
        }
    }
}

/// What `blip vqa` does: generate answers with these options, or rank the answers of a file.
enum Job<'a> {
    Generate(blip::GenerationOptions),
    Rank(((&'a Path, Vec<String>), RankOptions)),
}

/// The answer list: one answer a line, trimmed, blank lines skipped.
fn read_answers(file: &Path) -> anyhow::Result<(&Path, Vec<String>)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read the answer list {}", file.display()))?;
    let answers: Vec<String> = text.lines().map(str::trim).filter(|line| !line.is_empty()).map(String::from).collect();
    blip::tasks::check_not_empty(Param::Answers, &answers)
        .with_context(|| format!("the answer list {} (one answer per line)", file.display()))?;
    Ok((file, answers))
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
    image: &ImageSource,
    question: &str,
    ranked: &[RankedAnswer],
) -> std::io::Result<()> {
    match format {
        Format::Text => {
            for answer in ranked {
                writeln!(out, "{image}\t{}\t{:.4}", answer.answer, answer.score)?;
            }
            Ok(())
        }
        Format::Jsonl => common::write_json_line(
            out,
            &RankedRecord {
                image: image.to_string(),
                question,
                answers: ranked.iter().map(|a| ScoredAnswer { answer: &a.answer, score: a.score }).collect(),
            },
        ),
    }
}
