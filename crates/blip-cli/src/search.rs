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
    let (dtype, resize) = (recorded.dtype()?, recorded.resize()?);
    let mut matcher = ImageTextMatcher::load_with_dtype(&recorded.model, &blip::Device::Cpu, dtype)?;
    matcher.set_resize_backend(resize);
    index.check_model(&ModelIdentity::of(&recorded.model, dtype, resize, &matcher)?)?;

    let query = match (&args.query, &args.image) {
        (Some(text), _) => {
            blip::tasks::check_not_empty(blip::Param::Text, &[text.as_str()])?;
            matcher.embed_texts(&[text.as_str()])?
        }
        (None, Some(image)) => matcher.embed_images(&[ImageSource::parse(image).load(&UrlLimits::default())?])?,
        (None, None) => anyhow::bail!("give a text to search for, or --image"),
    };
    let query = query.flatten_all()?.to_vec1::<f32>()?;
    let wanted = if args.rerank { args.rerank_top.get().max(args.top.get()) } else { args.top.get() };
    let hits = index.search(&query, wanted)?;
    let mut results: Vec<(Hit, Option<f32>)> = match (args.rerank, &args.query) {
        (true, Some(text)) => {
            let (reranked, failures) = blip_index::rerank(&matcher, text, hits, args.batch_size.into())?;
            for failure in failures {
                eprintln!("warning: left out of --rerank: {failure}");
            }
            reranked.into_iter().map(|r| (r.hit, Some(r.itm))).collect()
        }
        _ => hits.into_iter().map(|hit| (hit, None)).collect(),
    };
    results.truncate(args.top.get());

    let mut out = std::io::stdout().lock();
    for (hit, itm) in &results {
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
