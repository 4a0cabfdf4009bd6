//! Image captioning with `BlipForConditionalGeneration` checkpoints, with or without a prompt.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use image::RgbImage;

use super::{GeneratedText, Task, TaskModel};
use crate::config::{Architecture, BlipConfig};
use crate::error::{Error, Result};
use crate::generation::{self, CachedDecoder, GenerationOptions};
use crate::models::captioning::CaptioningModel;

/// How to caption.
#[derive(Debug, Clone, Default)]
pub struct CaptionOptions {
    /// Text the caption continues (e.g. "a picture of"); it is part of the returned caption,
    /// as in transformers.
    pub prompt: Option<String>,
    pub generation: GenerationOptions,
}

/// One caption of an image: `tokens` hold bos 30522, the prompt, the new tokens and the final
/// [SEP] 102 when produced, as transformers' `generate` returns them.
pub type Caption = GeneratedText;

/// A loaded captioning checkpoint with its processors.
pub type Captioner = Task<CaptioningModel>;

impl TaskModel for CaptioningModel {
    const ACCEPTS: &'static [Architecture] = &[Architecture::ConditionalGeneration];
    const TASK: &'static str = "captioning";
    const EXAMPLE: &'static str = "Salesforce/blip-image-captioning-base";

    fn build(config: &BlipConfig, _: Architecture, weights: VarBuilder) -> candle_core::Result<Self> {
        CaptioningModel::new(config, weights)
    }
}

impl Captioner {
    /// The decoder's starting ids for these options, refused when prompt and new tokens cannot
    /// fit the model's positions. Call it to validate options before decoding any image.
    pub fn prefix(&self, options: &CaptionOptions) -> Result<Vec<u32>> {
        options.generation.validate().map_err(Error::InvalidInput)?;
        self.prefix_for(options.prompt.as_deref(), &options.generation)
    }

    fn prefix_for(&self, prompt: Option<&str>, generation: &GenerationOptions) -> Result<Vec<u32>> {
        let prefix = self.text_processor.caption_prefix(prompt)?;
        let positions = self.config.text_config.max_position_embeddings;
        let needed = prefix.len() + generation.max_new_tokens;
        if needed > positions {
            let room = positions.saturating_sub(prefix.len());
            return Err(Error::InvalidInput(if room == 0 {
                format!(
                    "the prompt is {} tokens long; the model has only {positions} positions: shorten the prompt",
                    prefix.len()
                )
            } else {
                format!(
                    "the prompt ({} tokens) plus max_new_tokens {} exceed the model's {positions} positions: shorten the prompt or set max_new_tokens to at most {room}",
                    prefix.len(),
                    generation.max_new_tokens
                )
            }));
        }
        Ok(prefix)
    }

    /// Captions decoded images (one batch): `num_return_sequences` captions per image, best
    /// first.
    pub fn caption(&self, images: &[RgbImage], options: &CaptionOptions) -> Result<Vec<Vec<Caption>>> {
        let pixel_values = self.image_processor.preprocess_batch(images, &self.device)?;
        self.caption_pixels(&pixel_values, options)
    }

    /// Captions preprocessed `pixel_values` [b, 3, H, W].
    pub fn caption_pixels(&self, pixel_values: &Tensor, options: &CaptionOptions) -> Result<Vec<Vec<Caption>>> {
        let prompts = vec![options.prompt.as_deref(); pixel_values.dim(0)?];
        self.caption_pixels_with_prompts(pixel_values, &prompts, &options.generation)
    }

    /// Captions image i continuing prompt i (or none).
    pub fn caption_with_prompts(
        &self,
        images: &[RgbImage],
        prompts: &[Option<&str>],
        generation: &GenerationOptions,
    ) -> Result<Vec<Vec<Caption>>> {
        let pixel_values = self.image_processor.preprocess_batch(images, &self.device)?;
        self.caption_pixels_with_prompts(&pixel_values, prompts, generation)
    }

    /// [`Self::caption_with_prompts`] on preprocessed `pixel_values`. Images whose prompts
    /// differ in length decode as separate batches, so every image gets what it gets alone
    /// (transformers pads such batches and shifts positions).
    pub fn caption_pixels_with_prompts(
        &self,
        pixel_values: &Tensor,
        prompts: &[Option<&str>],
        generation: &GenerationOptions,
    ) -> Result<Vec<Vec<Caption>>> {
        generation.validate().map_err(Error::InvalidInput)?;
        let rows = pixel_values.dim(0)?;
        if prompts.len() != rows {
            return Err(Error::InvalidInput(format!("{} prompts for {rows} images", prompts.len())));
        }
        let prefixes = prompts.iter().map(|p| self.prefix_for(*p, generation)).collect::<Result<Vec<_>>>()?;
        let image_embeds = self.model.encode_images(pixel_values)?;
        let mut captions: Vec<Vec<Caption>> = vec![vec![]; rows];
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
            let mut decoder =
                CachedDecoder { model: &self.model, cache: self.model.text_model.new_cache(&embeds, None)? };
            let group_prefixes: Vec<Vec<u32>> = group.iter().map(|&r| prefixes[r as usize].clone()).collect();
            let generated = generation::generate(
                &mut decoder,
                &group_prefixes,
                self.config.text_config.sep_token_id,
                generation,
                &self.device,
            )?;
            for (&row, sequences) in group.iter().zip(generated) {
                captions[row as usize] =
                    sequences.into_iter().map(|g| self.decode_generated(g)).collect::<Result<_>>()?;
            }
        }
        Ok(captions)
    }
}
