//! `BlipModel`: CLIP-style image and text features (512-d projections of the pooled outputs)
//! and their scaled cosine similarities.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::Linear;

use super::retrieval::l2_normalize;
use super::text::{TextModel, TextPooler};
use super::vision::VisionModel;
use crate::config::BlipConfig;

pub struct ContrastiveModel {
    pub vision_model: VisionModel,
    pub text_model: TextModel,
    /// `text_model.pooler`
    pub text_pooler: TextPooler,
    pub visual_projection: Linear,
    pub text_projection: Linear,
    /// `exp(logit_scale)`, the learned inverse temperature.
    pub logit_scale: f32,
    /// `logit_scale` as stored (its logarithm), a scalar tensor: what training updates.
    pub logit_scale_param: Tensor,
}

impl ContrastiveModel {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let (v, t, p) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.projection_dim);
        let logit_scale_param = vb.to_dtype(candle_core::DType::F32).get((), "logit_scale")?;
        let logit_scale = logit_scale_param.to_scalar::<f32>()?;
        Ok(Self {
            vision_model: VisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_model: TextModel::new(&cfg.text_config, vb.pp("text_model"))?,
            text_pooler: TextPooler::new(&cfg.text_config, vb.pp("text_model.pooler"))?,
            visual_projection: Linear::new(vb.get((p, v), "visual_projection.weight")?, None)?,
            text_projection: Linear::new(vb.get((p, t), "text_projection.weight")?, None)?,
            logit_scale: logit_scale.exp(),
            logit_scale_param,
        })
    }

    /// `get_image_features`: image_embeds (vision last_hidden_state) → projected pooled [b, p].
    pub fn image_features(&self, image_embeds: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(&self.vision_model.pool(image_embeds)?)
    }

    /// `get_text_features`: projected pooled text [b, p].
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let states = self.text_model.forward_encoder(input_ids, attention_mask, None)?;
        self.text_projection.forward(&self.text_pooler.forward(&states)?)
    }

    /// Unit-norm image features, as `BlipModel.forward` returns `image_embeds`.
    pub fn image_embeds(&self, image_embeds: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.image_features(image_embeds)?)
    }

    /// Unit-norm text features (`text_embeds`).
    pub fn text_embeds(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        l2_normalize(&self.text_features(input_ids, attention_mask)?)
    }
}
