//! `blip caption`: load a captioning checkpoint, caption images in batches, print text or JSONL.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use blip::{Caption, CaptionOptions, Captioner};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format, GenerationArgs, Resize};

#[derive(Args)]
#[command(mut_arg("num_return_sequences", |arg| arg
    .visible_alias("num-captions")
    .help("Captions per image, best first: the best beams (needs --num-beams at least as large) or independent samples (--do-sample)")))]
pub struct CaptionArgs {
    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = blip::DEFAULT_MODEL)]
    model: String,

    /// Text the caption starts with, e.g. "a picture of" (it is part of the output caption).
    #[arg(long)]
    prompt: Option<String>,

    /// Most new tokens to generate (the prompt not counted).
    #[arg(long, default_value_t = 20, help_heading = "Generation")]
    max_new_tokens: usize,

    /// Fewest new tokens before the caption may end.
    #[arg(long, default_value_t = 0, help_heading = "Generation")]
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

    #[command(flatten)]
    generation: GenerationArgs,
}

/// Captions every readable image; unreadable ones are reported and make the exit code 1.
pub fn run(args: CaptionArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    let options = CaptionOptions {
        prompt: args.prompt.clone(),
        generation: args.generation.options(args.max_new_tokens, args.min_new_tokens),
    };
    common::check_generation(&options.generation, "--num-captions")?;
    let several = options.generation.num_return_sequences > 1;
    let device = blip::Device::Cpu;
    let mut captioner = Captioner::load_with_dtype(&args.model, &device, dtype)?;
    captioner.set_resize_backend(args.resize.into());
    captioner.prefix(&options)?;

    let mut out = std::io::stdout().lock();
    let ended = common::for_each_image(
        &args.images,
        args.batch_size,
        args.format,
        &mut out,
        |images| Ok(captioner.caption(images, &options)?),
        |out, path, captions| write_captions(out, args.format, path, &captions, several),
    )?;
    Ok(common::exit_code(ended, args.images.len(), "captioned"))
}

#[derive(Serialize)]
struct CaptionRecord<'a> {
    image: String,
    #[serde(flatten)]
    caption: ScoredCaption<'a>,
}

#[derive(Serialize)]
struct CaptionsRecord<'a> {
    image: String,
    captions: Vec<ScoredCaption<'a>>,
}

#[derive(Serialize)]
struct ScoredCaption<'a> {
    caption: &'a str,
    tokens: &'a [u32],
    score: f32,
    log_prob: f32,
}

impl<'a> From<&'a Caption> for ScoredCaption<'a> {
    fn from(caption: &'a Caption) -> Self {
        Self { caption: &caption.text, tokens: &caption.tokens, score: caption.score, log_prob: caption.log_prob }
    }
}

/// Text: one `path<TAB>caption` line per caption, best first. JSONL: one record per image, with
/// its caption, or, when `several` are asked for, its `captions` best first.
fn write_captions(
    out: &mut dyn Write,
    format: Format,
    path: &Path,
    captions: &[Caption],
    several: bool,
) -> std::io::Result<()> {
    let image = path.display().to_string();
    match format {
        Format::Text => {
            for caption in captions {
                writeln!(out, "{image}\t{}", caption.text)?;
            }
            Ok(())
        }
        Format::Jsonl if several => common::write_json_line(
            out,
            &CaptionsRecord { image, captions: captions.iter().map(ScoredCaption::from).collect() },
        ),
        Format::Jsonl => {
            let caption = captions.first().ok_or_else(|| std::io::Error::other("no caption generated"))?;
            common::write_json_line(out, &CaptionRecord { image, caption: caption.into() })
        }
    }
}
