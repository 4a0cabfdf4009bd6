//! CapFilt, the BLIP paper's dataset bootstrapping: a captioner writes synthetic captions for
//! each image by nucleus sampling, and a filter (the ITM head) keeps the texts, web and
//! synthetic, that match their image.

use image::RgbImage;

use super::caption::{CaptionOptions, Captioner};
use super::matching::ImageTextMatcher;
use crate::config::Architecture;
use crate::error::{InvalidInput, Param, Result};

/// How CapFilt captions and filters: start from [`CapFiltOptions::blip`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CapFiltOptions {
    /// Synthetic captions sampled per image (0: only filter the web texts).
    pub captions_per_image: usize,
    /// Texts whose ITM match probability is below this are dropped.
    pub threshold: f32,
    /// The captioner's prompt and generation options; `num_return_sequences` is set from
    /// `captions_per_image`.
    pub caption: CaptionOptions,
}

/// Where a text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextSource {
    /// Given with the image (the web alt text).
    Web,
    /// Written by the captioner.
    Synthetic,
}

impl TextSource {
    pub fn name(self) -> &'static str {
        match self {
            TextSource::Web => "web",
            TextSource::Synthetic => "synthetic",
        }
    }
}

/// A text of an image with its ITM match probability.
#[derive(Debug, Clone, PartialEq)]
pub struct FilteredText {
    pub text: String,
    pub source: TextSource,
    pub itm: f32,
}

/// An image's texts, split by the filter; each list in input order, web texts first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filtered {
    pub kept: Vec<FilteredText>,
    pub dropped: Vec<FilteredText>,
}

impl CapFiltOptions {
    /// The prompt BLIP's captioner continues; it is removed from the synthetic captions, as
    /// BLIP's `generate` removes it.
    pub const PROMPT: &'static str = "a picture of ";

    /// BLIP's settings: `a picture of ` prompt, nucleus sampling with top-p 0.9 and repetition
    /// penalty 1.1 (BLIP's `generate(sample=True)`; top-k stays transformers' 50, which that code
    /// inherits), the lengths of BLIP's caption config (`max_length` 20 and `min_length` 5,
    /// prompt included: 16 and 1 new tokens), 3 captions per image, threshold 0.5.
    pub fn blip(captioner: &Captioner) -> Self {
        let mut caption = captioner.default_options().with_prompt(Self::PROMPT);
        let generation = &mut caption.generation;
        generation.do_sample = true;
        generation.top_p = 0.9;
        generation.top_k = 50;
        generation.repetition_penalty = 1.1;
        generation.max_new_tokens = 16;
        generation.min_new_tokens = 1;
        generation.num_beams = 1;
        Self { captions_per_image: 3, threshold: 0.5, caption }
    }

    /// Refuses a threshold outside [0, 1], a filter without an ITM head and generation options
    /// that contradict each other, before any image is decoded.
    pub fn validate(&self, captioner: &Captioner, filter: &ImageTextMatcher) -> Result<()> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(InvalidInput::OutOfRange {
                param: Param::Threshold,
                value: self.threshold.to_string(),
                accepted: "a probability from 0 to 1",
            }
            .into());
        }
        if !filter.has_itm_head() {
            return Err(InvalidInput::NeedsArchitecture {
                param: Param::Threshold,
                needs: Architecture::ImageTextRetrieval,
                found: filter.architecture(),
            }
            .into());
        }
        if self.captions_per_image > 0 {
            captioner.validate(&self.sampling())?;
        }
        Ok(())
    }

    fn sampling(&self) -> CaptionOptions {
        let mut options = self.caption.clone();
        options.generation.num_return_sequences = self.captions_per_image.max(1);
        options
    }
}

/// Captions `images` and filters each image's `web_texts` and synthetic captions with the
/// ITM head of `filter` (one batch).
pub fn capfilt(
    captioner: &Captioner,
    filter: &ImageTextMatcher,
    images: &[RgbImage],
    web_texts: &[Vec<String>],
    options: &CapFiltOptions,
) -> Result<Vec<Filtered>> {
    options.validate(captioner, filter)?;
    super::check_count(Param::Text, web_texts.len(), images.len())?;
    let synthetic: Vec<Vec<String>> = if options.captions_per_image > 0 {
        let prompt = CapFiltOptions::PROMPT.trim_end();
        let strip = |text: &str| text.strip_prefix(prompt).unwrap_or(text).trim().to_string();
        captioner
            .caption(images, &options.sampling())?
            .into_iter()
            // A caption that is nothing but the prompt says nothing: left out.
            .map(|captions| captions.iter().map(|c| strip(&c.text)).filter(|c| !c.is_empty()).collect())
            .collect()
    } else {
        vec![vec![]; images.len()]
    };
    let texts: Vec<Vec<(&str, TextSource)>> = web_texts
        .iter()
        .zip(&synthetic)
        .map(|(web, synthetic)| {
            let web = web.iter().map(|t| (t.as_str(), TextSource::Web));
            web.chain(synthetic.iter().map(|t| (t.as_str(), TextSource::Synthetic))).collect()
        })
        .collect();
    let pairs: Vec<Vec<&str>> = texts.iter().map(|texts| texts.iter().map(|(t, _)| *t).collect()).collect();
    let scores = filter.match_pairs(images, &pairs)?;
    Ok(texts
        .iter()
        .zip(scores)
        .map(|(texts, scores)| {
            let mut filtered = Filtered::default();
            for (&(text, source), score) in texts.iter().zip(scores) {
                let itm = score.itm.unwrap_or(0.0);
                let text = FilteredText { text: text.to_string(), source, itm };
                if itm >= options.threshold {
                    filtered.kept.push(text);
                } else {
                    filtered.dropped.push(text);
                }
            }
            filtered
        })
        .collect())
}
