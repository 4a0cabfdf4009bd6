//! `blip classify`: zero-shot classification of images into given labels (ITC probabilities,
//! optionally the best labels reranked with the ITM head); print text or JSONL.

use std::io::Write;
use std::num::NonZeroUsize;
use std::process::ExitCode;

use blip::{ClassifyOptions, ImageSource, ImageTextMatcher, LabelScore};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format, ImageRunArgs};
use crate::sidecar::SidecarArgs;

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    image_size: common::ImageSizeArg,

    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = ImageTextMatcher::DEFAULT_MODEL)]
    model: String,

    /// The labels, separated by commas, e.g. "cat,dog,car".
    #[arg(long, short)]
    labels: String,

    /// Text each label is put into; `{}` marks the label.
    #[arg(long, default_value = ClassifyOptions::DEFAULT_TEMPLATE)]
    template: String,

    /// Rescore the most probable labels with the ITM head and put them first, by ITM
    /// probability (BlipForImageTextRetrieval checkpoints).
    #[arg(long)]
    rerank: bool,

    /// Labels rescored by --rerank.
    #[arg(long, default_value = "5", requires = "rerank")]
    rerank_top: NonZeroUsize,

    /// Labels printed per image, best first [default: all; in sidecar files, the best one].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    top: Option<u16>,

    #[command(flatten)]
    run: ImageRunArgs,

    #[command(flatten)]
    sidecar: SidecarArgs,
}

/// Classifies every readable image; unreadable ones are reported and make the exit code 1.
pub fn run(args: ClassifyArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    let labels: Vec<&str> = args.labels.split(',').map(str::trim).collect();
    let mut options = ClassifyOptions::default();
    options.template = args.template.clone();
    options.rerank = args.rerank.then_some(args.rerank_top);
    options.validate(&labels)?;
    let sidecars = args.sidecar.sidecars()?;
    let mut matcher = ImageTextMatcher::load_with_dtype(&args.model, &blip::Device::Cpu, dtype)?;
    matcher.validate_classify(&labels, &options)?;
    matcher.set_resize_backend(args.run.batch.resize.into());
    args.image_size.apply(&mut matcher)?;
    let shown = args.top.map_or(labels.len(), usize::from);
    // A sidecar file holds the best labels, comma-separated, as taggers write them.
    let tagged = args.top.map_or(1, usize::from);
    args.run.process_with_sidecars(
        "classified",
        sidecars.as_ref(),
        |scores: &Vec<LabelScore>| scores.iter().take(tagged).map(|s| s.label.as_str()).collect::<Vec<_>>().join(", "),
        |images| Ok(matcher.classify(images, &labels, &options)?),
        |out, format, image, scores| write_labels(out, format, image, &scores[..shown.min(scores.len())]),
    )
}

#[derive(Serialize)]
struct ClassifyRecord<'a> {
    image: String,
    labels: Vec<LabelRecord<'a>>,
}

#[derive(Serialize)]
struct LabelRecord<'a> {
    label: &'a str,
    probability: f32,
    itc: f32,
    /// Only for the labels reranked with the ITM head.
    #[serde(skip_serializing_if = "Option::is_none")]
    itm: Option<f32>,
}

/// Text: `path<TAB>label (0.712), label2 (0.201), ...`; JSONL: one record per image.
fn write_labels(
    out: &mut dyn Write,
    format: Format,
    image: &ImageSource,
    scores: &[LabelScore],
) -> std::io::Result<()> {
    match format {
        Format::Text => {
            // Reranked labels show the ITM probability that ordered them.
            let labels: Vec<String> = scores
                .iter()
                .map(|s| match s.itm {
                    Some(itm) => format!("{} ({:.3}, itm {itm:.3})", s.label, s.probability),
                    None => format!("{} ({:.3})", s.label, s.probability),
                })
                .collect();
            writeln!(out, "{image}\t{}", labels.join(", "))
        }
        Format::Jsonl => common::write_json_line(
            out,
            &ClassifyRecord {
                image: image.to_string(),
                labels: scores
                    .iter()
                    .map(|s| LabelRecord { label: &s.label, probability: s.probability, itc: s.itc, itm: s.itm })
                    .collect(),
            },
        ),
    }
}
