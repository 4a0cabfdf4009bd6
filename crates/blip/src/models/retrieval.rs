//! `BlipForImageTextRetrieval`: image-text matching (ITM, a binary head on the text encoder
//! cross-attending to the image) and contrastive similarity (ITC, cosine of projected class
//! tokens of the two unimodal encoders).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::Linear;

use super::linear;
use super::text::TextModel;
use super::vision::VisionModel;
use crate::config::BlipConfig;

pub struct RetrievalModel {
    pub vision_model: VisionModel,
    /// `text_encoder` (no pooler)
    pub text_encoder: TextModel,
    pub vision_proj: Linear,
    pub text_proj: Linear,
    pub itm_head: Linear,
}

impl RetrievalModel {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let (v, t, e) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.image_text_hidden_size);
        Ok(Self {
            vision_model: VisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_encoder: TextModel::new(&cfg.text_config, vb.pp("text_encoder"))?,
            vision_proj: linear(v, e, vb.pp("vision_proj"))?,
            text_proj: linear(t, e, vb.pp("text_proj"))?,
            itm_head: linear(t, 2, vb.pp("itm_head"))?,
        })
    }

    /// image_embeds (vision last_hidden_state) [b, n, v] → unit ITC embeddings [b, e].
    pub fn image_itc_embeds(&self, image_embeds: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.vision_proj.forward(&first_token(image_embeds)?)?)
    }

    /// Text alone through the encoder → unit ITC embeddings [b, e].
    pub fn text_itc_embeds(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let states = self.text_encoder.forward_encoder(input_ids, attention_mask, None)?;
        l2_normalize(&self.text_proj.forward(&first_token(&states)?)?)
    }

    /// ITM logits [b, 2] of text row i against image row i (index 1: "match").
    pub fn itm_logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image_embeds: &Tensor,
    ) -> Result<Tensor> {
        let states = self.text_encoder.forward_encoder(input_ids, attention_mask, Some(image_embeds))?;
        self.itm_head.forward(&first_token(&states)?)
    }
}

/// [b, t, d] → [b, d] at position 0 (the class token).
pub(crate) fn first_token(xs: &Tensor) -> Result<Tensor> {
    xs.narrow(1, 0, 1)?.squeeze(1)
}

/// Rows divided by their L2 norm (`torch.nn.functional.normalize`, eps 1e-12).
pub(crate) fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    xs.broadcast_div(&norm)
}
