//! Decoding state: self-attention keys/values grown one step at a time, and cross-attention
//! keys/values computed once from the image (they never change while decoding).

use candle_core::{Result, Tensor};

/// Keys and values of one attention layer, heads split: [b, heads, len, head_dim] each.
#[derive(Clone)]
pub struct KeyValue {
    pub key: Tensor,
    pub value: Tensor,
}

impl KeyValue {
    fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self { key: self.key.index_select(rows, 0)?, value: self.value.index_select(rows, 0)? })
    }
}

/// Everything a decoder step reuses from earlier steps, for a batch of sequences.
pub struct DecoderCache {
    /// Per layer: the self-attention keys/values of all positions seen so far.
    pub(crate) self_attention: Vec<Option<KeyValue>>,
    /// Per layer: cross-attention keys/values of the encoder states.
    pub(crate) cross_attention: Vec<KeyValue>,
    /// Additive bias [b, 1, 1, n] masking padded encoder positions, when there are any.
    pub(crate) cross_attention_bias: Option<Tensor>,
    /// Positions already decoded (the next token's absolute position).
    pub(crate) past_len: usize,
}

impl DecoderCache {
    /// Keeps only the given batch rows (e.g. sequences that have not finished), in that order.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let device = match self.cross_attention.first() {
            Some(kv) => kv.key.device().clone(),
            None => return Ok(()),
        };
        let rows = Tensor::new(rows, &device)?;
        for kv in self.self_attention.iter_mut().flatten() {
            *kv = kv.select_rows(&rows)?;
        }
        for kv in self.cross_attention.iter_mut() {
            *kv = kv.select_rows(&rows)?;
        }
        if let Some(bias) = &mut self.cross_attention_bias {
            *bias = bias.index_select(&rows, 0)?;
        }
        Ok(())
    }
}
