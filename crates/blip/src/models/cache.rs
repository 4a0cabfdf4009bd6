//! Decoding state: self-attention keys/values grown one step at a time, and what the
//! cross-attention attends to (the encoder states, or their keys/values), fixed while decoding.

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
    /// What the cross-attention attends to.
    pub(crate) cross_attention: CrossAttention,
    /// Additive bias [b, 1, 1, n] masking padded encoder positions, when there are any.
    pub(crate) cross_attention_bias: Option<Tensor>,
    /// Positions already decoded (the next token's absolute position).
    pub(crate) past_len: usize,
}

/// The encoder side of the decoder's cross-attention, fixed while decoding.
pub(crate) enum CrossAttention {
    /// The encoder states [b, n, width], for all layers: on the CPU each step attends to them
    /// directly (see `models::attention_to_states`), 1.8 MB per image instead of 42 MB of keys
    /// and values.
    States(Tensor),
    /// Per layer, the keys/values of the encoder states, computed once (other devices).
    KeyValues(Vec<KeyValue>),
}

impl DecoderCache {
    /// Keeps only the given batch rows (e.g. sequences that have not finished), in that order.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let device = match &self.cross_attention {
            CrossAttention::States(states) => states.device().clone(),
            CrossAttention::KeyValues(kvs) => match kvs.first() {
                Some(kv) => kv.key.device().clone(),
                None => return Ok(()),
            },
        };
        let rows = Tensor::new(rows, &device)?;
        for kv in self.self_attention.iter_mut().flatten() {
            *kv = kv.select_rows(&rows)?;
        }
        match &mut self.cross_attention {
            CrossAttention::States(states) => *states = states.index_select(&rows, 0)?,
            CrossAttention::KeyValues(kvs) => {
                for kv in kvs.iter_mut() {
                    *kv = kv.select_rows(&rows)?;
                }
            }
        }
        if let Some(bias) = &mut self.cross_attention_bias {
            *bias = bias.index_select(&rows, 0)?;
        }
        Ok(())
    }
}
