//! Image captioning with `BlipForConditionalGeneration` checkpoints, with or without a prompt.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::run::{GenerationRun, OnInputToken};
use super::{check_count, GeneratedText, Images, Task, TaskModel, DEFAULT_CAPTION_MODEL};
use crate::config::{Architecture, BlipConfig};
use crate::error::{InvalidInput, Param, Result};
use crate::generation::{Generation, GenerationOptions};
use crate::models::captioning::CaptioningModel;

/// The text captions continue.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum Prompt {
    /// Unconditional captions.
    #[default]
    None,
    /// Every image's caption continues this text (e.g. "a picture of").
    Same(String),
    /// Image i's caption continues prompt i (or none).
    PerImage(Vec<Option<String>>),
}

impl Prompt {
    /// Prompt of image `i` of `images`.
    fn for_image(&self, i: usize) -> Option<&str> {
        match self {
            Prompt::None => None,
            Prompt::Same(prompt) => Some(prompt),
            Prompt::PerImage(prompts) => prompts.get(i).and_then(|p| p.as_deref()),
        }
    }
}

/// How to caption: get them from [`Captioner::default_options`] (transformers' generation
/// defaults) and change fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CaptionOptions {
    /// Text the caption continues; it is part of the returned caption, as in transformers.
    pub prompt: Prompt,
    pub generation: GenerationOptions,
}

impl From<Option<String>> for Prompt {
    fn from(prompt: Option<String>) -> Self {
        prompt.map_or(Prompt::None, Prompt::Same)
    }
}

impl From<&str> for Prompt {
    fn from(prompt: &str) -> Self {
        Prompt::Same(prompt.to_string())
    }
}

impl CaptionOptions {
    pub fn new(prompt: impl Into<Prompt>, generation: GenerationOptions) -> Self {
        Self { prompt: prompt.into(), generation }
    }

    /// These options with every caption continuing `prompt`.
    pub fn with_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.prompt = Prompt::Same(prompt.into());
        self
    }
}

/// One caption of an image: `tokens` hold bos 30522, the prompt, the new tokens and the final
/// [SEP] 102 when produced, as transformers' `generate` returns them.
pub type Caption = GeneratedText;

/// A loaded captioning checkpoint with its processors.
pub type Captioner = Task<CaptioningModel>;

impl TaskModel for CaptioningModel {
    const ACCEPTS: &'static [Architecture] = &[Architecture::ConditionalGeneration];
    const TASK: &'static str = "captioning";
    const DEFAULT_MODEL: &'static str = DEFAULT_CAPTION_MODEL;

    fn build(config: &BlipConfig, _: Architecture, weights: VarBuilder) -> candle_core::Result<Self> {
        CaptioningModel::new(config, weights)
    }
}

impl Captioner {
    /// transformers' `generate` defaults for BLIP captioning (greedy, 20 new tokens), no
    /// prompt; a checkpoint's `generation_config.json` is in [`Task::generation`].
    pub fn default_options(&self) -> CaptionOptions {
        CaptionOptions { prompt: Prompt::None, generation: self.generation.transformers.clone() }
    }

    /// Refuses contradictory options and prompts that cannot fit the model's positions with
    /// `max_new_tokens` more, before any image is decoded.
    pub fn validate(&self, options: &CaptionOptions) -> Result<()> {
        options.generation.validate()?;
        match &options.prompt {
            Prompt::None => self.prefix(None, &options.generation).map(drop),
            Prompt::Same(prompt) => self.prefix(Some(prompt), &options.generation).map(drop),
            Prompt::PerImage(prompts) => {
                prompts.iter().try_for_each(|p| self.prefix(p.as_deref(), &options.generation).map(drop))
            }
        }
    }

    /// The decoder's starting ids for a prompt, refused when prompt and new tokens cannot fit
    /// the model's positions.
    fn prefix(&self, prompt: Option<&str>, generation: &GenerationOptions) -> Result<Vec<u32>> {
        let prefix = self.text_processor.caption_prefix(prompt)?;
        let positions = self.config.text_config.max_position_embeddings;
        if prefix.len() + generation.max_new_tokens > positions {
            return Err(InvalidInput::PromptTooLong {
                prompt_tokens: prefix.len(),
                max_new_tokens: generation.max_new_tokens,
                positions,
            }
            .into());
        }
        Ok(prefix)
    }

    /// Captions images (one batch): `num_return_sequences` captions per image, best first.
    /// Images whose prompts differ in length read their prompts as separate batches, then decode
    /// as one, each row from its own positions, so every image gets what it gets alone
    /// (transformers pads such batches and shifts positions).
    pub fn caption<'a>(&self, images: impl Into<Images<'a>>, options: &CaptionOptions) -> Result<Vec<Vec<Caption>>> {
        self.caption_streaming(images, options, &mut |_, _, _| ())
    }

    /// [`caption`](Self::caption), telling `on_token` (image, sequence, token) for each token
    /// of greedy search and sampling as it is chosen (beam search tells nothing until its end).
    pub fn caption_streaming<'a>(
        &self,
        images: impl Into<Images<'a>>,
        options: &CaptionOptions,
        on_token: &mut OnInputToken<'_>,
    ) -> Result<Vec<Vec<Caption>>> {
        self.start_captions(images, options)?.run(on_token)
    }

    /// Runs the vision tower on the images and starts decoding their captions, to be stepped
    /// by the caller ([`GenerationRun::step`]).
    pub fn start_captions<'a>(
        &self,
        images: impl Into<Images<'a>>,
        options: &CaptionOptions,
    ) -> Result<GenerationRun<'_>> {
        let images = images.into();
        let rows = images.len()?;
        options.generation.validate()?;
        if let Prompt::PerImage(prompts) = &options.prompt {
            check_count(Param::Prompt, prompts.len(), rows)?;
        }
        let prefixes = (0..rows)
            .map(|i| self.prefix(options.prompt.for_image(i), &options.generation))
            .collect::<Result<Vec<_>>>()?;
        let pixel_values = self.pixel_values(images)?;
        let image_embeds = self.model.encode_images(&pixel_values)?;
        let mut run = GenerationRun::new(&self.text_processor, rows);
        let mut lengths: Vec<usize> = prefixes.iter().map(Vec::len).collect();
        lengths.sort_unstable();
        lengths.dedup();
        for length in lengths {
            let group: Vec<u32> = (0..rows as u32).filter(|&r| prefixes[r as usize].len() == length).collect();
            let embeds = if group.len() == rows {
                image_embeds.clone()
            } else {
                image_embeds.index_select(&Tensor::new(group.as_slice(), &self.device)?, 0)?
            };
            let decoder = &self.model.text_decoder;
            let decoding = decoder.decoding(decoder.new_cache(&embeds, None)?);
            let group_prefixes: Vec<Vec<u32>> = group.iter().map(|&r| prefixes[r as usize].clone()).collect();
            let generation = Generation::start(
                decoding,
                &group_prefixes,
                self.config.text_config.sep_token_id,
                &options.generation,
                &self.device,
            )?;
            run.push(group.iter().map(|&r| r as usize).collect(), generation);
        }
        Ok(run)
    }
}
