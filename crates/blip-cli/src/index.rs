//! `blip index`: embed (and optionally caption) the images of folders into an SQLite index,
//! incrementally, for `blip search`.

use std::path::PathBuf;
use std::process::ExitCode;

use blip::{Captioner, Checkpoint, ImageTextMatcher};
use blip_index::{Index, Indexer, ModelIdentity};
use clap::Args;

use crate::common::{self, BatchArgs, GenerationArgs};

#[derive(Args)]
#[command(
    mut_args(common::show_generation_defaults(Captioner::default_generation())),
    mut_args(common::generation_requires("caption"))
)]
pub struct IndexArgs {
    /// The index: an SQLite database, made if missing.
    #[arg(long, value_name = "PATH")]
    db: PathBuf,

    /// Images: files, folders (walked recursively), or `-` for a list of them on standard input.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,

    /// Retrieval checkpoint whose ITC image embeddings are stored (one model per index).
    #[arg(long, short, default_value = ImageTextMatcher::DEFAULT_MODEL)]
    model: String,

    /// Also caption each image (its best caption and score are stored).
    #[arg(long)]
    caption: bool,

    /// Captioning checkpoint for --caption.
    #[arg(long, default_value = Captioner::DEFAULT_MODEL, requires = "caption")]
    caption_model: String,

    /// Delete the rows of files that no longer exist.
    #[arg(long)]
    prune: bool,

    #[command(flatten)]
    run: BatchArgs,

    #[command(flatten)]
    generation: GenerationArgs,
}

/// Indexes every file that is new or changed; unreadable ones are recorded with their error and
/// make the exit code 1.
pub fn run(args: IndexArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    args.generation.check_given()?;
    let sources = common::image_sources(&args.images)?;
    let device = blip::Device::Cpu;
    let resize = args.run.resize.into();
    let mut matcher = ImageTextMatcher::load_with_dtype(&args.model, &device, dtype)?;
    matcher.set_resize_backend(resize);
    let identity = ModelIdentity::of(&args.model, dtype, resize, &matcher)?;
    let mut index = Index::open(&args.db)?;
    // Before the captioner loads: a mismatch is refused at once.
    index.bind_model(&identity)?;

    let captioning = if args.caption {
        let checkpoint = Checkpoint::locate(&args.caption_model)?;
        let generation = args.generation.resolve(&Captioner::generation_defaults(&checkpoint)?, &args.caption_model)?;
        let mut captioner = Captioner::from_checkpoint(&checkpoint, &device, dtype)?;
        captioner.set_resize_backend(resize);
        let mut options = captioner.default_options();
        options.generation = generation;
        captioner.validate(&options)?;
        Some((captioner, options))
    } else {
        None
    };
    let mut indexer = Indexer::new(&matcher, identity);
    if let Some((captioner, options)) = &captioning {
        indexer = indexer.with_captioner(captioner, options, &args.caption_model);
    }

    let progress = common::rate_bar(sources.len(), "images");
    let mut summary = indexer.index(&mut index, &sources, args.run.batch_size.into(), &mut |p| {
        if let Some(failure) = &p.failure {
            progress.suspend(|| eprintln!("error: {failure}"));
        }
        progress.set_position(p.handled as u64)
    })?;
    progress.finish_and_clear();
    if args.prune {
        summary.pruned = index.prune()?;
    }
    let with_errors = index.failed()?;
    eprintln!(
        "{}: {} indexed, {} unchanged, {} failed{}; {} images in the index{}",
        args.db.display(),
        summary.indexed,
        summary.unchanged,
        summary.failed,
        if args.prune { format!(", {} pruned", summary.pruned) } else { String::new() },
        index.len()?,
        // Files that failed in an earlier run and have not changed since count as unchanged.
        if with_errors > 0 { format!(" ({with_errors} recorded with an error)") } else { String::new() }
    );
    Ok(if summary.failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
