//! `blip caption`: load a captioning checkpoint, caption images in batches, print text or JSONL.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use blip::{CaptionOptions, Captioner};
use clap::Args;

use crate::common::{self, Format, Resize};

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
    captioner.set_resize_backend(args.resize.into());
    captioner.prefix(&options)?;

    let mut out = std::io::stdout().lock();
    let ended = common::for_each_image(
        &args.images,
        args.batch_size,
        args.format,
        &mut out,
        |images| Ok(captioner.caption(images, &options)?),
        |out, path, caption| write_caption(out, args.format, path, &caption),
    )?;
    Ok(common::exit_code(ended, args.images.len(), "captioned"))
}

fn write_caption(
    out: &mut dyn Write,
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
