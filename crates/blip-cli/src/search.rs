//! `blip search`: the images of an index nearest to a text (or an image), optionally reranked
//! with the ITM head as BLIP's own retrieval does (ITC top-k, then ITM).

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blip::{ImageSource, ImageTextMatcher, UrlLimits};
use blip_index::{Hit, Index, ModelIdentity};
use clap::Args;
use serde::Serialize;

use crate::common::{self, Format};

#[derive(Args)]
pub struct SearchArgs {
    /// The index made by `blip index`.
    #[arg(long, value_name = "PATH")]
    db: PathBuf,

    /// What to look for, e.g. "a dog catching a frisbee".
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    query: Option<String>,

    /// Look for the images nearest to this one instead of a text.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,

    /// Results printed, best first.
    #[arg(long, default_value = "10")]
    top: NonZeroUsize,

    /// Rescore the nearest images with the ITM head and order them by ITM probability
    /// (BlipForImageTextRetrieval indexes; text queries).
    #[arg(long, conflicts_with = "image")]
    rerank: bool,

    /// Nearest images rescored by --rerank.
    #[arg(long, default_value = "50", requires = "rerank")]
    rerank_top: NonZeroUsize,

    /// Images decoded and rescored together by --rerank.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,

    /// Output: `text` (path, itc, [itm,] caption tab-separated) or `jsonl`.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Serialize)]
struct SearchRecord<'a> {
    image: &'a str,
    itc: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    itm: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    caption: Option<&'a str>,
}

/// Prints the nearest images; the model is the one the index was made with.
pub fn run(args: SearchArgs) -> anyhow::Result<ExitCode> {
    let index = Index::open_existing(&args.db)?;
    let recorded = index
        .model()?
        .with_context(|| format!("{}: the index is empty; add images with `blip index`", args.db.display()))?;
    let dtype = match recorded.dtype.as_str() {
        "bf16" => blip::DType::BF16,
        "f16" => blip::DType::F16,
        _ => blip::DType::F32,
    };
    let resize = if recorded.resize == "pil" { blip::ResizeBackend::Pil } else { blip::ResizeBackend::Torchvision };
    let mut matcher = ImageTextMatcher::load_with_dtype(&recorded.model, &blip::Device::Cpu, dtype)?;
    matcher.set_resize_backend(resize);
    // The checkpoint may have changed since indexing: its embeddings would not compare.
    index.bind_model(&ModelIdentity::of(&recorded.model, dtype, resize, &matcher)?)?;
    if args.rerank && !matcher.has_itm_head() {
        anyhow::bail!(
            "--rerank: {} has no ITM head (it is a BlipModel checkpoint); index with a BlipForImageTextRetrieval checkpoint such as {}",
            recorded.model,
            ImageTextMatcher::DEFAULT_MODEL
        );
    }

    let query = match (&args.query, &args.image) {
        (Some(text), _) => {
            blip::tasks::check_not_empty(blip::Param::Text, &[text.as_str()])?;
            matcher.embed_texts(&[text.as_str()])?
        }
        (None, Some(image)) => matcher.embed_images(&[ImageSource::parse(image).load(&UrlLimits::default())?])?,
        (None, None) => unreachable!("clap requires a query or --image"),
    };
    let query = query.flatten_all()?.to_vec1::<f32>()?;
    let wanted = if args.rerank { args.rerank_top.get().max(args.top.get()) } else { args.top.get() };
    let mut hits: Vec<(Hit, Option<f32>)> = index.search(&query, wanted)?.into_iter().map(|hit| (hit, None)).collect();
    if let (true, Some(text)) = (args.rerank, &args.query) {
        hits = rerank(&matcher, text, hits, args.batch_size.into())?;
    }
    hits.truncate(args.top.get());

    let mut out = std::io::stdout().lock();
    for (hit, itm) in &hits {
        let written = match args.format {
            Format::Text => {
                let itm = itm.map(|itm| format!("\t{itm:.4}")).unwrap_or_default();
                writeln!(out, "{}\t{:.4}{itm}\t{}", hit.path, hit.itc, hit.caption.as_deref().unwrap_or(""))
            }
            Format::Jsonl => common::write_json_line(
                &mut out,
                &SearchRecord { image: &hit.path, itc: hit.itc, itm: *itm, caption: hit.caption.as_deref() },
            ),
        };
        if !common::still_open(written)? {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The hits ordered by ITM probability of `text`, their images read again from their files;
/// an image that cannot be read any more is reported and left out.
fn rerank(
    matcher: &ImageTextMatcher,
    text: &str,
    hits: Vec<(Hit, Option<f32>)>,
    batch_size: usize,
) -> anyhow::Result<Vec<(Hit, Option<f32>)>> {
    let mut scored = Vec::with_capacity(hits.len());
    for chunk in hits.chunks(batch_size) {
        let mut images = Vec::with_capacity(chunk.len());
        let mut kept = Vec::with_capacity(chunk.len());
        for (hit, _) in chunk {
            match blip::load_image(hit.path.as_ref()) {
                Ok(image) => {
                    images.push(image);
                    kept.push(hit.clone());
                }
                Err(err) => eprintln!("warning: left out of --rerank: {err}"),
            }
        }
        if images.is_empty() {
            continue;
        }
        let scores = matcher.match_texts(&images, &[text])?;
        scored.extend(kept.into_iter().zip(scores).map(|(hit, score)| (hit, score[0].itm)));
    }
    // Stable: equal probabilities keep their ITC order.
    scored.sort_by(|a, b| b.1.unwrap_or(0.0).total_cmp(&a.1.unwrap_or(0.0)));
    Ok(scored)
}
