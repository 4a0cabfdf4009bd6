//! `BlipForConditionalGeneration`: the vision model and the text decoder with its LM head.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::text_decoder::TextLmHeadModel;
use super::vision::VisionModel;
use crate::config::BlipConfig;

pub struct CaptioningModel {
    pub vision_model: VisionModel,
    /// `text_decoder`
    pub text_decoder: TextLmHeadModel,
}

impl CaptioningModel {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            vision_model: VisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_decoder: TextLmHeadModel::new(&cfg.text_config, vb.pp("text_decoder"))?,
        })
    }

    /// pixel_values [b, 3, H, W] → image_embeds [b, 1 + patches, vision_hidden].
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(pixel_values)
    }

    /// Teacher-forced decoder pass over the images: hidden states [b, t, hidden] and logits
    /// [b, t, vocab].
    pub fn decode(&self, input_ids: &Tensor, image_embeds: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut cache = self.text_decoder.new_cache(image_embeds, None)?;
        self.text_decoder.forward(input_ids, &mut cache)
    }
}
