//! `BlipTextLMHeadModel`: the causal text decoder with its LM head, the part captioning and VQA
//! share (`text_decoder.*` in both checkpoints). It decodes against encoder states (the image
//! for captioning, the question for VQA) and drives the generation engine through
//! [`Decoding`], which implements the engine's [`Decoder`] trait.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::cache::DecoderCache;
use super::text::{LmHead, TextModel};
use crate::config::TextConfig;
use crate::generation::{Decoder, Join};

pub struct TextLmHeadModel {
    /// `bert`
    pub bert: TextModel,
    /// `cls.predictions`
    pub cls: LmHead,
}

impl TextLmHeadModel {
    /// Loads `bert.*` and `cls.predictions.*` under `vb` (`text_decoder` in the checkpoints).
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let bert = TextModel::new(cfg, vb.pp("bert"))?;
        let cls = LmHead::new(cfg, bert.word_embeddings(), vb.pp("cls.predictions"))?;
        Ok(Self { bert, cls })
    }

    /// Tied checkpoint names under `prefix` (`text_decoder`): see [`LmHead::ties`].
    pub(crate) fn ties(&self, prefix: &str) -> Vec<(String, String)> {
        let embeddings = format!("{prefix}.bert.embeddings.word_embeddings.weight");
        self.cls.ties(&format!("{prefix}.cls.predictions"), self.bert.word_embeddings(), &embeddings)
    }

    /// A cache for decoding against `encoder_states` [b, n, width]; `encoder_mask` [b, n]
    /// (1 = real, 0 = padding) hides padded positions.
    pub fn new_cache(&self, encoder_states: &Tensor, encoder_mask: Option<&Tensor>) -> Result<DecoderCache> {
        self.bert.new_cache(encoder_states, encoder_mask)
    }

    /// Teacher-forced pass: `input_ids` [b, t] continue the sequences in `cache`; returns the
    /// last hidden states [b, t, hidden] and the logits [b, t, vocab].
    pub fn forward(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<(Tensor, Tensor)> {
        let hidden = self.bert.forward_decoder(input_ids, cache)?;
        let logits = self.cls.forward(&hidden)?;
        Ok((hidden, logits))
    }

    /// Teacher-forced pass from an empty `cache` over a padded batch: logits [b, t, vocab], with
    /// `attention_mask` [b, t] hiding padded keys as transformers' decoder does.
    pub fn forward_masked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        let hidden = self.bert.forward_decoder_masked(input_ids, attention_mask, cache)?;
        self.cls.forward(&hidden)
    }

    /// One generation step: the next-token logits [b, vocab] (the LM head runs on the last
    /// position only).
    pub fn next_token_logits(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let hidden = self.bert.forward_decoder(input_ids, cache)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        self.cls.forward(&last)?.squeeze(1)
    }

    /// The decoder bound to a batch's cache, for [`crate::generation::generate`].
    pub fn decoding(&self, cache: DecoderCache) -> Decoding<'_> {
        Decoding { model: self, cache }
    }
}

/// A [`TextLmHeadModel`] in the middle of decoding one batch.
pub struct Decoding<'a> {
    model: &'a TextLmHeadModel,
    cache: DecoderCache,
}

impl Decoder for Decoding<'_> {
    fn next_logits(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        self.model.next_token_logits(input_ids, &mut self.cache)
    }

    fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
        self.cache.select_rows(rows)
    }
}

impl Join for Decoding<'_> {
    fn join(&mut self, other: Self) -> Result<()> {
        if !std::ptr::eq(self.model, other.model) {
            candle_core::bail!("only batches decoding with the same model can join");
        }
        self.cache.join(other.cache)
    }
}
