//! `blip embed`: unit-norm image or text embeddings, written as one tensor to a safetensors file
//! and/or printed as JSONL.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip::{ImageTextMatcher, Param};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::common::{self, BatchArgs, Ended, Format, UnlessClosed};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    image_size: common::ImageSizeArg,

    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = ImageTextMatcher::DEFAULT_MODEL)]
    model: String,

    #[command(flatten)]
    inputs: Inputs,

    /// Write the embeddings to this safetensors file (tensor `image_embeds` or `text_embeds`).
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,

    /// Also (or, without --out, only) print one JSON object per input on stdout.
    #[arg(long, value_enum)]
    format: Option<EmbedFormat>,

    #[command(flatten)]
    run: BatchArgs,
}

/// Images or texts, not both.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct Inputs {
    /// Images to embed (JPEG, PNG, WebP, GIF, BMP, TIFF): files, folders (walked recursively),
    /// http(s) URLs, or `-` for a list of them on standard input.
    #[arg(long = "image", num_args = 1.., value_name = "IMAGE")]
    images: Vec<String>,

    /// Texts to embed.
    #[arg(long = "text", num_args = 1.., value_name = "TEXT")]
    texts: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmbedFormat {
    Jsonl,
}

/// Embeds every readable image (or every text); unreadable images are reported, left out of the
/// tensor and make the exit code 1.
pub fn run(args: EmbedArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    if args.out.is_none() && args.format.is_none() {
        anyhow::bail!("nowhere to put the embeddings: give --out FILE or --format jsonl");
    }
    if !args.inputs.texts.is_empty() {
        blip::tasks::check_not_empty(Param::Text, &args.inputs.texts)?;
    }
    let device = blip::Device::Cpu;
    let mut matcher = ImageTextMatcher::load_with_dtype(&args.model, &device, dtype)?;
    matcher.set_resize_backend(args.run.resize.into());
    args.image_size.apply(&mut matcher)?;

    let jsonl = args.format.is_some();
    // With a file to write, a closed stdout only stops the printing: the file is still written whole.
    let mut out = UnlessClosed { inner: std::io::stdout().lock(), closed: false, forgive: args.out.is_some() };
    let mut embedded = Embedded::default();
    let mut total = args.inputs.texts.len();
    let (kind, ended) = if args.inputs.images.is_empty() {
        ("text", embed_texts(&matcher, &args.inputs.texts, args.run.batch_size, jsonl, &mut out, &mut embedded)?)
    } else {
        let sources = common::image_sources(&args.inputs.images)?;
        total = sources.len();
        let ended = common::for_each_image(
            &sources,
            args.run.batch_size,
            // Without JSONL nothing goes to stdout, failures included (as in text output).
            if jsonl { Format::Jsonl } else { Format::Text },
            &mut out,
            |images| Ok(matcher.embed_images(images)?.to_vec2::<f32>()?),
            |out, source, row| {
                let image = source.to_string();
                let written = if jsonl {
                    common::write_json_line(out, &ImageRecord { image: &image, embedding: &row })
                } else {
                    Ok(())
                };
                embedded.push(image, row);
                written
            },
        )?;
        ("image", ended)
    };
    let Ended::Finished { failures } = ended else { return Ok(ExitCode::SUCCESS) };
    if let Some(file) = &args.out {
        if embedded.inputs.is_empty() {
            anyhow::bail!("no image could be embedded; {} not written", file.display());
        }
        embedded.save(file, kind, &args.model, matcher.embedding_dim())?;
    }
    Ok(common::exit_code(Ended::Finished { failures }, total, "embedded"))
}

/// Texts `batch_size` at a time, printed and collected in input order.
fn embed_texts(
    matcher: &ImageTextMatcher,
    texts: &[String],
    batch_size: u16,
    jsonl: bool,
    out: &mut dyn Write,
    embedded: &mut Embedded,
) -> anyhow::Result<Ended> {
    let progress = common::progress_bar(texts.len(), "texts");
    for chunk in texts.chunks(batch_size as usize) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let rows = matcher.embed_texts(&refs)?.to_vec2::<f32>()?;
        for (text, row) in chunk.iter().zip(rows) {
            let written =
                if jsonl { common::write_json_line(out, &TextRecord { text, embedding: &row }) } else { Ok(()) };
            embedded.push(text.clone(), row);
            if !common::still_open(written)? {
                return Ok(Ended::PipeClosed);
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(Ended::Finished { failures: 0 })
}

#[derive(Serialize)]
struct ImageRecord<'a> {
    image: &'a str,
    embedding: &'a [f32],
}

#[derive(Serialize)]
struct TextRecord<'a> {
    text: &'a str,
    embedding: &'a [f32],
}

/// The rows embedded so far and the inputs they came from, in input order.
#[derive(Default)]
struct Embedded {
    inputs: Vec<String>,
    data: Vec<f32>,
}

impl Embedded {
    fn push(&mut self, input: String, row: Vec<f32>) {
        self.inputs.push(input);
        self.data.extend(row);
    }

    /// One f32 tensor `{kind}_embeds` [n, dim], with the model, the kind and the inputs (a JSON
    /// array, in row order) as metadata.
    fn save(&self, file: &Path, kind: &str, model: &str, dim: usize) -> anyhow::Result<()> {
        let bytes: Vec<u8> = self.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let tensor =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![self.inputs.len(), dim], &bytes)
                .context("embeddings of unequal widths")?;
        let metadata = HashMap::from([
            ("model".to_string(), model.to_string()),
            ("kind".to_string(), kind.to_string()),
            ("inputs".to_string(), serde_json::to_string(&self.inputs)?),
        ]);
        // Bytes then `fs::write` rather than `serialize_to_file`, whose temporary file would
        // leave the output readable by its owner only.
        let bytes = safetensors::serialize([(format!("{kind}_embeds"), tensor)], Some(metadata))?;
        std::fs::write(file, bytes).with_context(|| format!("cannot write {}", file.display()))
    }
}
