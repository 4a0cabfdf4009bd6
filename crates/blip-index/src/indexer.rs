//! Bringing an index up to date with files: unchanged files skipped (same size and
//! modification time, or same content), the rest decoded, embedded (and captioned) a batch at a
//! time, each batch committed as one transaction.

use blip::{CaptionOptions, Captioner, ImageSource, ImageTextMatcher, RgbImage, UrlLimits};

use crate::error::Result;
use crate::schema::ModelIdentity;
use crate::store::{ImageRecord, Index, Stored};

/// Embeds images into an [`Index`] with one model, optionally captioning them too.
pub struct Indexer<'a> {
    matcher: &'a ImageTextMatcher,
    model: ModelIdentity,
    captioner: Option<Captioning<'a>>,
}

/// The captioner of an [`Indexer`], with the Hub id or folder it was loaded from.
struct Captioning<'a> {
    captioner: &'a Captioner,
    options: &'a CaptionOptions,
    model: String,
}

/// How far a run has got, after each file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub handled: usize,
    pub total: usize,
    /// Why the file just handled could not be indexed.
    pub failure: Option<String>,
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Embedded (new or changed files).
    pub indexed: usize,
    /// Already in the index as they are.
    pub unchanged: usize,
    /// Could not be read or decoded (recorded with their error when they exist).
    pub failed: usize,
    /// Rows of vanished files deleted (`--prune`).
    pub pruned: usize,
}

/// A file read and decoded, waiting for its batch.
struct Pending {
    record: ImageRecord,
    image: RgbImage,
}

/// Work gathered for the next transaction.
#[derive(Default)]
struct Batch {
    pending: Vec<Pending>,
    failed: Vec<ImageRecord>,
    touched: Vec<(String, u64, i64)>,
}

/// Failures and touched files are written with the next batch, or on their own past this many.
const MAX_BOOKKEEPING: usize = 256;

impl<'a> Indexer<'a> {
    pub fn new(matcher: &'a ImageTextMatcher, model: ModelIdentity) -> Self {
        Self { matcher, model, captioner: None }
    }

    /// Also captions every image indexed, and every image already indexed without a caption,
    /// storing its best caption and score; `model` (the captioner's Hub id or folder) is
    /// recorded, and an index captioned by another is refused.
    pub fn with_captioner(mut self, captioner: &'a Captioner, options: &'a CaptionOptions, model: &str) -> Self {
        self.captioner = Some(Captioning { captioner, options, model: model.to_string() });
        self
    }

    /// Brings `index` up to date with `files`, `batch_size` images per forward pass and per
    /// transaction. Refuses an index made with another model before touching it. Errors of the
    /// model (not of a file) end the run; batches already committed stay.
    pub fn index(
        &self,
        index: &mut Index,
        files: &[ImageSource],
        batch_size: usize,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Summary> {
        index.bind_model(&self.model)?;
        if let Some(captioning) = &self.captioner {
            index.bind_caption_model(&captioning.model)?;
        }
        let batch_size = batch_size.max(1);
        let mut summary = Summary::default();
        let mut batch = Batch::default();
        for (handled, file) in files.iter().enumerate() {
            let failure = self.take(index, file, &mut batch, &mut summary)?;
            if batch.pending.len() >= batch_size || batch.failed.len() + batch.touched.len() >= MAX_BOOKKEEPING {
                self.flush(index, &mut batch, &mut summary)?;
            }
            progress(Progress { handled: handled + 1, total: files.len(), failure });
        }
        self.flush(index, &mut batch, &mut summary)?;
        Ok(summary)
    }

    /// Sorts one file into the batch: unchanged, touched (same content, new time), failed, or
    /// decoded and pending. Returns why the file failed, if it did.
    fn take(
        &self,
        index: &Index,
        file: &ImageSource,
        batch: &mut Batch,
        summary: &mut Summary,
    ) -> Result<Option<String>> {
        let fail = |summary: &mut Summary, what: String| {
            summary.failed += 1;
            Ok(Some(what))
        };
        let path = match file {
            ImageSource::File(path) => path,
            ImageSource::Url(url) => {
                return fail(summary, format!("{url}: only files can be indexed; download it first"));
            }
            // An entry of a folder that could not be listed: reported, no row.
            ImageSource::Unlisted { path, reason } => return fail(summary, format!("{}: {reason}", path.display())),
        };
        // One row per file, however it is named (`../photos`, a symbolic link, ...).
        let canonical = match std::fs::canonicalize(path) {
            Ok(canonical) => canonical,
            Err(e) => return fail(summary, format!("{}: cannot read image file: {e}", path.display())),
        };
        let Some(key) = canonical.to_str().map(str::to_string) else {
            return fail(summary, format!("{}: a path that is not UTF-8 cannot be stored", path.display()));
        };
        let metadata = match std::fs::metadata(&canonical) {
            Ok(metadata) => metadata,
            Err(e) => return fail(summary, format!("{}: cannot read image file: {e}", path.display())),
        };
        let size = metadata.len();
        let mtime_ns = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i64);
        let stored = index.stored(&key)?;
        // With a captioner, images indexed without a caption are taken again.
        let wants_caption = |s: &Stored| self.captioner.is_some() && !s.failed && !s.captioned;
        if stored.as_ref().is_some_and(|s| s.size == size && s.mtime_ns == mtime_ns && !wants_caption(s)) {
            summary.unchanged += 1;
            return Ok(None);
        }
        let mut record = ImageRecord {
            path: key.clone(),
            hash: None,
            size,
            mtime_ns,
            width: None,
            height: None,
            embedding: None,
            caption: None,
            caption_score: None,
            error: None,
        };
        let decoded = file.read(&UrlLimits::default()).and_then(|bytes| {
            record.hash = Some(blake3::hash(&bytes).to_hex().to_string());
            if stored.as_ref().is_some_and(|s| !s.failed && s.hash == record.hash && !wants_caption(s)) {
                return Ok(None);
            }
            blip::load_image_from_memory(&bytes, path).map(Some)
        });
        match decoded {
            Ok(None) => {
                summary.unchanged += 1;
                batch.touched.push((key, size, mtime_ns));
            }
            Ok(Some(image)) => {
                record.width = Some(image.width());
                record.height = Some(image.height());
                batch.pending.push(Pending { record, image });
            }
            Err(err) => {
                record.error = Some(err.to_string());
                batch.failed.push(record);
                return fail(summary, err.to_string());
            }
        }
        Ok(None)
    }

    /// Embeds (and captions) the pending images and commits the batch.
    fn flush(&self, index: &mut Index, batch: &mut Batch, summary: &mut Summary) -> Result<()> {
        let pending = std::mem::take(&mut batch.pending);
        let mut records: Vec<ImageRecord> = Vec::with_capacity(pending.len() + batch.failed.len());
        if !pending.is_empty() {
            let (pending, images): (Vec<ImageRecord>, Vec<RgbImage>) =
                pending.into_iter().map(|p| (p.record, p.image)).unzip();
            let embeddings = self.matcher.embed_images(&images)?.to_vec2::<f32>()?;
            let captions = match &self.captioner {
                Some(c) => Some(c.captioner.caption(&images, c.options)?),
                None => None,
            };
            for (i, (mut record, embedding)) in pending.into_iter().zip(embeddings).enumerate() {
                record.embedding = Some(embedding);
                if let Some(best) = captions.as_ref().and_then(|c| c[i].first()) {
                    record.caption = Some(best.text.clone());
                    record.caption_score = Some(best.score);
                }
                records.push(record);
            }
        }
        let indexed = records.len();
        records.append(&mut batch.failed);
        let touched = std::mem::take(&mut batch.touched);
        if !records.is_empty() || !touched.is_empty() {
            index.add(&records, &touched)?;
        }
        summary.indexed += indexed;
        Ok(())
    }
}

/// For the crash-safety test: with `BLIP_INDEX_TEST_ABORT_AT_COMMIT=N`, the process aborts
/// (as `kill -9` would stop it) just before its N-th commit, with that batch written but not
/// committed.
pub(crate) mod test_hook {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COMMITS: AtomicUsize = AtomicUsize::new(0);

    pub fn before_commit() {
        let Ok(at) = std::env::var("BLIP_INDEX_TEST_ABORT_AT_COMMIT") else { return };
        let n = COMMITS.fetch_add(1, Ordering::Relaxed) + 1;
        if at.parse() == Ok(n) {
            std::process::abort();
        }
    }
}
