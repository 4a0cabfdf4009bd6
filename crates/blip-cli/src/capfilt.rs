//! `blip capfilt`: the BLIP paper's dataset bootstrapping over a JSONL file of image-text
//! pairs: synthetic captions by nucleus sampling, every text filtered by the ITM head.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip::{CapFiltOptions, Captioner, ImageSource, ImageTextMatcher, UrlLimits};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::common::{self, GenerationArgs, Resize};

/// What `--num-return-sequences` is called here.
pub const CAPTIONS_PER_IMAGE: &str = "--captions-per-image";

#[derive(Args)]
#[command(
    mut_arg("num_return_sequences", |arg| arg.hide(true)),
    mut_arg("generation_config", |arg| arg.hide(true)),
    mut_arg("do_sample", |arg| arg.hide(true)),
)]
pub struct CapFiltArgs {
    /// JSONL of image-text pairs, `{"image": path, "text": "..."}` (paths relative to the file's
    /// folder), or `-` for standard input.
    #[arg(long, value_name = "FILE")]
    input: String,

    /// Synthetic captions sampled per image (0: only filter the web texts).
    #[arg(long, default_value_t = 3)]
    captions_per_image: usize,

    /// Texts whose ITM match probability is below this are dropped.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    threshold: f32,

    /// Captioning checkpoint that writes the synthetic captions.
    #[arg(long, default_value = Captioner::DEFAULT_MODEL)]
    caption_model: String,

    /// Retrieval checkpoint whose ITM head filters the texts.
    #[arg(long, default_value = ImageTextMatcher::DEFAULT_MODEL)]
    filter_model: String,

    /// Write the records here (appending: a rerun continues where the last one stopped)
    /// instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Images captioned and filtered together.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,

    /// Image resize: `torchvision` (transformers 5, default) or `pil` (transformers 4).
    #[arg(long, value_enum, default_value_t = Resize::Torchvision)]
    resize: Resize,

    #[command(flatten)]
    generation: GenerationArgs,
}

#[derive(Deserialize)]
struct Pair {
    image: String,
    text: String,
}

#[derive(Serialize)]
struct Record<'a> {
    image: &'a str,
    texts: Vec<TextRecord<'a>>,
}

#[derive(Serialize)]
struct TextRecord<'a> {
    text: &'a str,
    source: &'static str,
    itm: f32,
}

/// An image and its web texts, in the order the input first names it.
struct Item {
    image: String,
    texts: Vec<String>,
}

#[derive(Default)]
struct Counts {
    pairs: usize,
    bad_lines: usize,
    kept_web: usize,
    kept_synthetic: usize,
    dropped: usize,
    failed: usize,
    done_before: usize,
}

/// Captions and filters every image of the input not already in `--output`.
pub fn run(args: CapFiltArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    if args.generation.num_return_sequences.is_some() {
        anyhow::bail!("--num-return-sequences: CapFilt samples --captions-per-image captions per image");
    }
    if args.generation.generation_config {
        anyhow::bail!("--generation-config: CapFilt samples with BLIP's settings and the generation options given");
    }
    args.generation.check_given()?;
    let mut counts = Counts::default();
    let (mut items, root) = read_pairs(&args.input, &mut counts)?;

    let device = blip::Device::Cpu;
    let mut captioner = Captioner::load_with_dtype(&args.caption_model, &device, dtype)?;
    captioner.set_resize_backend(args.resize.into());
    let mut filter = ImageTextMatcher::load_with_dtype(&args.filter_model, &device, dtype)?;
    filter.set_resize_backend(args.resize.into());
    if !filter.has_itm_head() {
        anyhow::bail!(
            "--filter-model {}: a BlipModel checkpoint has no ITM head to filter with; use a BlipForImageTextRetrieval checkpoint such as {}",
            args.filter_model,
            ImageTextMatcher::DEFAULT_MODEL
        );
    }
    let mut options = CapFiltOptions::blip(&captioner);
    options.captions_per_image = args.captions_per_image;
    options.threshold = args.threshold;
    // BLIP's sampling settings, with the generation options given on top.
    options.caption.generation = args.generation.apply(&options.caption.generation);
    options.validate(&captioner, &filter)?;

    let out: Box<dyn Write> = match &args.output {
        Some(file) if same_file(file, Path::new(&args.input)) => {
            anyhow::bail!("--output {}: is the --input file; write the records to another file", file.display())
        }
        Some(file) => {
            let (writer, done) = resume(file)?;
            counts.done_before = done.len();
            items.retain(|item| !done.contains(&item.image));
            if !done.is_empty() {
                eprintln!("{}: {} images already done; continuing", file.display(), done.len());
            }
            writer
        }
        None => Box::new(std::io::stdout().lock()),
    };
    finish(&args, items, &root, out, (&captioner, &filter, &options), counts)
}

/// Runs over the images a batch at a time, writing one record per image.
fn finish(
    args: &CapFiltArgs,
    items: Vec<Item>,
    root: &Path,
    mut out: Box<dyn Write>,
    (captioner, filter, options): (&Captioner, &ImageTextMatcher, &CapFiltOptions),
    mut counts: Counts,
) -> anyhow::Result<ExitCode> {
    let progress = common::rate_bar(items.len(), "images");
    'batches: for chunk in items.chunks(args.batch_size.into()) {
        let mut images = Vec::with_capacity(chunk.len());
        let mut good = Vec::with_capacity(chunk.len());
        for item in chunk {
            let source = match ImageSource::parse(&item.image) {
                ImageSource::File(path) => ImageSource::File(root.join(path)),
                url => url,
            };
            match source.load(&UrlLimits::default()) {
                Ok(image) => {
                    images.push(image);
                    good.push(item);
                }
                Err(err) => {
                    counts.failed += 1;
                    progress.suspend(|| eprintln!("error: {err}"));
                }
            }
        }
        if !images.is_empty() {
            let web: Vec<Vec<String>> = good.iter().map(|item| item.texts.clone()).collect();
            let filtered: Vec<blip::Result<blip::Filtered>> =
                match blip::capfilt(captioner, filter, &images, &web, options) {
                    Ok(filtered) => filtered.into_iter().map(Ok).collect(),
                    // A text the model cannot take fails its image alone: the batch again image by image.
                    Err(blip::Error::InvalidInput(_)) => images
                        .iter()
                        .zip(&web)
                        .map(|(image, web)| {
                            blip::capfilt(
                                captioner,
                                filter,
                                std::slice::from_ref(image),
                                std::slice::from_ref(web),
                                options,
                            )
                            .map(|mut one| one.remove(0))
                        })
                        .collect(),
                    Err(other) => return Err(other.into()),
                };
            let done: Vec<(&&Item, blip::Filtered)> = good
                .iter()
                .zip(filtered)
                .filter_map(|(item, filtered)| match filtered {
                    Ok(filtered) => Some((item, filtered)),
                    Err(err) => {
                        counts.failed += 1;
                        let reason = common::describe(&anyhow::Error::from(err), CAPTIONS_PER_IMAGE);
                        progress.suspend(|| eprintln!("error: {}: {reason}", item.image));
                        None
                    }
                })
                .collect();
            for (item, filtered) in &done {
                for kept in &filtered.kept {
                    match kept.source {
                        blip::TextSource::Web => counts.kept_web += 1,
                        blip::TextSource::Synthetic => counts.kept_synthetic += 1,
                    }
                }
                counts.dropped += filtered.dropped.len();
                let record = Record {
                    image: &item.image,
                    texts: filtered
                        .kept
                        .iter()
                        .map(|t| TextRecord { text: &t.text, source: t.source.name(), itm: t.itm })
                        .collect(),
                };
                if !common::still_open(common::write_json_line(&mut out, &record))? {
                    break 'batches;
                }
            }
            // A batch is on disk before the next starts: a rerun redoes at most one batch.
            if !common::still_open(out.flush())? {
                break;
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    eprintln!(
        "{} pairs in ({} bad lines); texts kept: {} ({} web, {} synthetic), dropped: {}; images failed: {}{}",
        counts.pairs,
        counts.bad_lines,
        counts.kept_web + counts.kept_synthetic,
        counts.kept_web,
        counts.kept_synthetic,
        counts.dropped,
        counts.failed,
        if counts.done_before > 0 { format!("; {} images done before", counts.done_before) } else { String::new() }
    );
    Ok(if counts.failed > 0 || counts.bad_lines > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The input's images with their web texts (an image named on several lines gathers their
/// texts), and the folder relative paths are read from. Lines that are not a pair are reported
/// with their number and left out.
fn read_pairs(input: &str, counts: &mut Counts) -> anyhow::Result<(Vec<Item>, PathBuf)> {
    let (reader, root): (Box<dyn BufRead>, PathBuf) = if input == "-" {
        (Box::new(std::io::stdin().lock()), PathBuf::new())
    } else {
        let file = std::fs::File::open(input).with_context(|| format!("cannot read --input {input}"))?;
        let root = Path::new(input).parent().map(Path::to_path_buf).unwrap_or_default();
        (Box::new(std::io::BufReader::new(file)), root)
    };
    let mut items: Vec<Item> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read --input {input}"))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Pair>(&line) {
            Ok(pair) if pair.text.trim().is_empty() => {
                counts.bad_lines += 1;
                eprintln!("error: {input}:{}: the text of {} is empty", number + 1, pair.image);
            }
            Ok(pair) => {
                counts.pairs += 1;
                let at = *position.entry(pair.image.clone()).or_insert_with(|| {
                    items.push(Item { image: pair.image.clone(), texts: vec![] });
                    items.len() - 1
                });
                items[at].texts.push(pair.text);
            }
            Err(err) => {
                counts.bad_lines += 1;
                eprintln!("error: {input}:{}: not a pair {{\"image\": path, \"text\": \"...\"}}: {err}", number + 1);
            }
        }
    }
    Ok((items, root))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(a), Ok(b)) if a == b)
}

/// Opens `file` to append to, after the last complete record (a line cut short by an
/// interrupted run is removed), and returns the images it already holds.
fn resume(file: &Path) -> anyhow::Result<(Box<dyn Write>, HashSet<String>)> {
    let mut done = HashSet::new();
    let mut complete = 0u64;
    if let Ok(existing) = std::fs::File::open(file) {
        let mut reader = std::io::BufReader::new(existing);
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line).with_context(|| format!("cannot read {}", file.display()))?;
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            let record: serde_json::Value = serde_json::from_str(&line).with_context(|| {
                format!("{}: not a file blip capfilt wrote (line {})", file.display(), done.len() + 1)
            })?;
            let image =
                record["image"].as_str().with_context(|| format!("{}: a record without an image", file.display()))?;
            done.insert(image.to_string());
            complete += read as u64;
        }
    }
    let mut writer = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    writer.set_len(complete).with_context(|| format!("cannot write {}", file.display()))?;
    writer.seek(std::io::SeekFrom::End(0))?;
    Ok((Box::new(std::io::BufWriter::new(writer)), done))
}
