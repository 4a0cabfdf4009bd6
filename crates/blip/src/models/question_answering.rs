//! `BlipForQuestionAnswering`: the vision model, a text encoder that reads the question while
//! cross-attending to the image, and a text decoder that writes the answer while cross-attending
//! to the question states.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::cache::DecoderCache;
use super::text::{LmHead, TextModel};
use super::vision::VisionModel;
use crate::config::BlipConfig;
use crate::generation::CausalLm;

pub struct QuestionAnsweringModel {
    pub vision_model: VisionModel,
    /// `text_encoder`
    pub text_encoder: TextModel,
    /// `text_decoder.bert`
    pub text_decoder: TextModel,
    /// `text_decoder.cls.predictions`
    pub lm_head: LmHead,
}

impl QuestionAnsweringModel {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let text_decoder = TextModel::new(&cfg.text_config, vb.pp("text_decoder.bert"))?;
        let lm_head =
            LmHead::new(&cfg.text_config, text_decoder.word_embeddings(), vb.pp("text_decoder.cls.predictions"))?;
        Ok(Self {
            vision_model: VisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_encoder: TextModel::new(&cfg.text_config, vb.pp("text_encoder"))?,
            text_decoder,
            lm_head,
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

    /// A decoding cache over question states, with their padding masked.
    pub fn new_cache(&self, question_states: &Tensor, question_mask: Option<&Tensor>) -> Result<DecoderCache> {
        self.text_decoder.new_cache(question_states, question_mask)
    }

    /// Feeds `input_ids` [b, t]; returns logits [b, t, vocab] of every position.
    pub fn decode(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let hidden = self.text_decoder.forward_decoder(input_ids, cache)?;
        self.lm_head.forward(&hidden)
    }
}

/// One generation step: next-token logits [b, vocab] (the LM head runs on the last position only).
impl CausalLm for QuestionAnsweringModel {
    fn next_token_logits(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let hidden = self.text_decoder.forward_decoder(input_ids, cache)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        self.lm_head.forward(&last)?.squeeze(1)
    }
}
