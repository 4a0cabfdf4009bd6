//! Image captioning with `BlipForConditionalGeneration` checkpoints, with or without a prompt.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, BlipConfig};
use crate::error::{Error, Result};
use crate::generation::{self, CachedDecoder, GenerationOptions};
use crate::models::captioning::CaptioningModel;
use crate::processor::image::{ImageProcessor, ResizeBackend};
use crate::processor::text::TextProcessor;

/// How to caption.
#[derive(Debug, Clone, Default)]
pub struct CaptionOptions {
    /// Text the caption continues (e.g. "a picture of"); it is part of the returned caption,
    /// as in transformers.
    pub prompt: Option<String>,
    pub generation: GenerationOptions,
}

/// One image's caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    /// The whole sequence transformers' `generate` returns: bos 30522, the prompt, the new
    /// tokens and the final [SEP] 102 when produced.
    pub tokens: Vec<u32>,
}

/// A loaded captioning checkpoint with its processors.
pub struct Captioner {
    model: CaptioningModel,
    config: BlipConfig,
    image_processor: ImageProcessor,
    text_processor: TextProcessor,
    device: Device,
}

impl Captioner {
    /// Loads a local folder or Hub repo id (see [`Checkpoint::locate`]).
    pub fn load(model: &str, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::locate(model)?, device)
    }

    pub fn from_checkpoint(checkpoint: &Checkpoint, device: &Device) -> Result<Self> {
        let loaded = super::load(
            checkpoint,
            &[Architecture::ConditionalGeneration],
            "captioning",
            "Salesforce/blip-image-captioning-base",
            device,
        )?;
        let model = CaptioningModel::new(&loaded.config, loaded.weights)
            .map_err(|e| super::weights_error(checkpoint, loaded.architecture, e))?;
        Ok(Self {
            model,
            config: loaded.config,
            image_processor: loaded.image_processor,
            text_processor: loaded.text_processor,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &CaptioningModel {
        &self.model
    }

    pub fn config(&self) -> &BlipConfig {
        &self.config
    }

    pub fn image_processor(&self) -> &ImageProcessor {
        &self.image_processor
    }

    pub fn text_processor(&self) -> &TextProcessor {
        &self.text_processor
    }

    /// Chooses the resize of transformers 5 (torchvision, default) or 4 (PIL).
    pub fn set_resize_backend(&mut self, backend: ResizeBackend) {
        self.image_processor.backend = backend;
    }

    /// The decoder's starting ids for these options, refused when prompt and new tokens cannot
    /// fit the model's positions. Call it to validate options before decoding any image.
    pub fn prefix(&self, options: &CaptionOptions) -> Result<Vec<u32>> {
        let prefix = self.text_processor.caption_prefix(options.prompt.as_deref())?;
        let positions = self.config.text_config.max_position_embeddings;
        let needed = prefix.len() + options.generation.max_new_tokens;
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
                    options.generation.max_new_tokens
                )
            }));
        }
        Ok(prefix)
    }

    /// Captions decoded images (one batch).
    pub fn caption(&self, images: &[RgbImage], options: &CaptionOptions) -> Result<Vec<Caption>> {
        let pixel_values = self.image_processor.preprocess_batch(images, &self.device)?;
        self.caption_pixels(&pixel_values, options)
    }

    /// Captions preprocessed `pixel_values` [b, 3, H, W].
    pub fn caption_pixels(&self, pixel_values: &Tensor, options: &CaptionOptions) -> Result<Vec<Caption>> {
        let prefix = self.prefix(options)?;
        let image_embeds = self.model.encode_images(pixel_values)?;
        let rows = image_embeds.dim(0)?;
        let mut decoder =
            CachedDecoder { model: &self.model, cache: self.model.text_model.new_cache(&image_embeds, None)? };
        let sequences = generation::greedy(
            &mut decoder,
            &vec![prefix; rows],
            self.config.text_config.sep_token_id,
            &options.generation,
            &self.device,
        )?;
        sequences.into_iter().map(|tokens| Ok(Caption { text: self.text_processor.decode(&tokens)?, tokens })).collect()
    }
}
