//! `blip match`: score how well each text fits each image (ITM probability and ITC cosine);
//! print text or JSONL, one record per image-text pair.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blip::{GradCam, ImageSource, ImageTextMatcher, MatchScore, Param};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format, ImageRunArgs};
use crate::heatmap;

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

    /// Also write, per image-text pair, the image with a Grad-CAM heatmap of where the text
    /// matches (as the BLIP demo draws it) into this folder: `<n>-<image>-text<j>.png`.
    #[arg(long, value_name = "DIR")]
    gradcam: Option<PathBuf>,

    /// The ITM text encoder layer (0-based) whose cross-attention Grad-CAM weighs.
    #[arg(long, default_value_t = blip::tasks::gradcam::DEFAULT_GRADCAM_LAYER, requires = "gradcam")]
    gradcam_layer: usize,

    /// Also write a map per token of each text: `<n>-<image>-text<j>-<k>-<token>.png`.
    #[arg(long, requires = "gradcam")]
    gradcam_tokens: bool,

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
    let Some(dir) = &args.gradcam else {
        return args.run.process(
            "matched",
            |images| Ok(matcher.match_texts(images, &texts)?),
            |out, format, image, scores| write_scores(out, format, image, &texts, &scores),
        );
    };
    if !matcher.has_itm_head() {
        anyhow::bail!(
            "--gradcam needs the ITM head of an image-text retrieval checkpoint ({})",
            ImageTextMatcher::DEFAULT_MODEL
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let layers = matcher.config().text_config.num_hidden_layers;
    if args.gradcam_layer >= layers {
        anyhow::bail!("--gradcam-layer {}: the text encoder has layers 0 to {}", args.gradcam_layer, layers - 1);
    }
    let mut images_done = 0usize;
    let mut written = 0usize;
    let code = args.run.process(
        "matched",
        |images| {
            let scores = matcher.match_texts(images, &texts)?;
            let cams = matcher.gradcam(images, &texts, args.gradcam_layer)?;
            let drawn = images
                .iter()
                .zip(cams)
                .map(|(image, cams)| draw(image, &cams, args.gradcam_tokens))
                .collect::<Vec<_>>();
            Ok(scores.into_iter().zip(drawn).collect::<Vec<_>>())
        },
        |out, format, image, (scores, drawn)| {
            images_done += 1;
            let stem = image_stem(image);
            for (name, picture) in drawn {
                let path = dir.join(format!("{images_done}-{stem}-{name}.png"));
                picture.save(&path).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
                written += 1;
            }
            write_scores(out, format, image, &texts, &scores)
        },
    )?;
    eprintln!("wrote {written} Grad-CAM images to {}", dir.display());
    Ok(code)
}

/// The heatmaps of one image's texts (and their tokens, when asked), each with its file name's
/// end: `text<j>` or `text<j>-<k>-<token>`.
fn draw(image: &blip::RgbImage, cams: &[GradCam], tokens: bool) -> Vec<(String, blip::RgbImage)> {
    let mut drawn = Vec::new();
    for (j, cam) in cams.iter().enumerate() {
        drawn.push((format!("text{j}"), heatmap::overlay(image, &cam.map, cam.grid)));
        if tokens {
            for (k, (token, map)) in cam.tokens.iter().enumerate() {
                let token: String = token.chars().filter(|c| c.is_alphanumeric()).collect();
                drawn.push((format!("text{j}-{k}-{token}"), heatmap::overlay(image, map, cam.grid)));
            }
        }
    }
    drawn
}

/// The image's file stem (for a URL, its last path segment), for file names.
fn image_stem(image: &ImageSource) -> String {
    let name = image.to_string();
    let last = name.rsplit(['/', '\\']).next().unwrap_or(&name);
    let stem = last.rsplit_once('.').map_or(last, |(stem, _)| stem);
    let clean: String =
        stem.chars().map(|c| if c.is_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if clean.is_empty() {
        "image".into()
    } else {
        clean
    }
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
