//! `BlipForConditionalGeneration`: the vision model and the text decoder with its LM head.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::cache::DecoderCache;
use super::text::{LmHead, TextModel};
use super::vision::VisionModel;
use crate::config::BlipConfig;
use crate::generation::CausalLm;

pub struct CaptioningModel {
    pub vision_model: VisionModel,
    /// `text_decoder.bert`
    pub text_model: TextModel,
    /// `text_decoder.cls.predictions`
    pub lm_head: LmHead,
}

impl CaptioningModel {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let text_model = TextModel::new(&cfg.text_config, vb.pp("text_decoder.bert"))?;
        let lm_head =
            LmHead::new(&cfg.text_config, text_model.word_embeddings(), vb.pp("text_decoder.cls.predictions"))?;
        Ok(Self { vision_model: VisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?, text_model, lm_head })
    }

    /// pixel_values [b, 3, H, W] → image_embeds [b, 1 + patches, vision_hidden].
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(pixel_values)
    }

    /// Teacher-forced decoder pass: hidden states [b, t, hidden] and logits [b, t, vocab].
    pub fn decode(&self, input_ids: &Tensor, image_embeds: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut cache = self.text_model.new_cache(image_embeds, None)?;
        let hidden = self.text_model.forward_decoder(input_ids, &mut cache)?;
        let logits = self.lm_head.forward(&hidden)?;
        Ok((hidden, logits))
    }
}

/// One generation step: next-token logits [b, vocab] (the LM head runs on the last position only).
impl CausalLm for CaptioningModel {
    fn next_token_logits(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let hidden = self.text_model.forward_decoder(input_ids, cache)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        self.lm_head.forward(&last)?.squeeze(1)
    }
}
