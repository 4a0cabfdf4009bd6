//! `BlipForQuestionAnswering`: the vision model, a text encoder that reads the question while
//! cross-attending to the image, and a text decoder that writes the answer while cross-attending
//! to the question states.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::text::TextModel;
use super::text_decoder::TextLmHeadModel;
use super::vision::VisionModel;
use crate::config::BlipConfig;

pub struct QuestionAnsweringModel {
    pub vision_model: VisionModel,
    /// `text_encoder`
    pub text_encoder: TextModel,
    /// `text_decoder`
    pub text_decoder: TextLmHeadModel,
}

impl QuestionAnsweringModel {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            vision_model: VisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_encoder: TextModel::new(&cfg.text_config, vb.pp("text_encoder"))?,
            text_decoder: TextLmHeadModel::new(&cfg.text_config, vb.pp("text_decoder"))?,
        })
    }

    /// question ids [b, t] and mask [b, t] with image_embeds [b, n, vision_hidden] → question
    /// states [b, t, hidden].
    pub fn encode_questions(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image_embeds: &Tensor,
    ) -> Result<Tensor> {
        self.text_encoder.forward_encoder(input_ids, attention_mask, Some(image_embeds))
    }
}
