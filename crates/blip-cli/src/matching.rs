//! `blip match`: score how well each text fits each image (ITM probability and ITC cosine);
//! print text or JSONL, one record per image-text pair.

use std::io::Write;
use std::process::ExitCode;

use blip::{ImageSource, ImageTextMatcher, MatchScore, Param};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format, ImageRunArgs};

#[derive(Args)]
pub struct MatchArgs {
    #[command(flatten)]
    image_size: common::ImageSizeArg,

    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = ImageTextMatcher::DEFAULT_MODEL)]
    model: String,

    /// A text to score against every image; repeat for more texts.
    #[arg(long = "text", short, value_name = "TEXT", required = true)]
    texts: Vec<String>,

    #[command(flatten)]
    run: ImageRunArgs,
}

/// Scores every readable image against every text; unreadable images are reported and make the
/// exit code 1.
pub fn run(args: MatchArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    blip::tasks::check_not_empty(Param::Text, &args.texts)?;
    let device = blip::Device::Cpu;
    let mut matcher = ImageTextMatcher::load_with_dtype(&args.model, &device, dtype)?;
    matcher.set_resize_backend(args.run.batch.resize.into());
    args.image_size.apply(&mut matcher)?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    args.run.process(
        "matched",
        |images| Ok(matcher.match_texts(images, &texts)?),
        |out, format, image, scores| write_scores(out, format, image, &texts, &scores),
    )
}

#[derive(Serialize)]
struct MatchRecord<'a> {
    image: String,
    text: &'a str,
    /// `null` for checkpoints without an ITM head (BlipModel).
    itm: Option<f32>,
    itc: f32,
}

/// One line per text: `path<TAB>text<TAB>itm<TAB>itc` (itm `-` when the checkpoint has no ITM
/// head) or a JSONL record.
fn write_scores(
    out: &mut dyn Write,
    format: Format,
    image: &ImageSource,
    texts: &[&str],
    scores: &[MatchScore],
) -> std::io::Result<()> {
    for (text, score) in texts.iter().zip(scores) {
        match format {
            Format::Text => {
                let itm = score.itm.map_or_else(|| "-".to_string(), |itm| format!("{itm:.4}"));
                writeln!(out, "{image}\t{text}\t{itm}\t{:.4}", score.itc)?;
            }
            Format::Jsonl => common::write_json_line(
                out,
                &MatchRecord { image: image.to_string(), text, itm: score.itm, itc: score.itc },
            )?,
        }
    }
    Ok(())
}
