//! Decoding state: self-attention keys/values grown one step at a time, and what the
//! cross-attention attends to (the encoder states, or their keys/values), fixed while decoding.
//! Batches decoding from different positions join into one (continuous batching): each row's
//! keys are left-padded to the longest row's, the padding masked out.

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::amx::states::PairedStates;

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
    /// Positions in the self-attention cache (padding included): the next token's absolute
    /// position, less the row's padding.
    pub(crate) past_len: usize,
    /// Per row, the cache positions before its first token (left padding, masked out), from
    /// joining rows that had decoded fewer tokens; the fewest is always 0.
    pub(crate) padding: Vec<usize>,
}

/// The encoder side of the decoder's cross-attention, fixed while decoding.
pub(crate) enum CrossAttention {
    /// The encoder states [b, n, width], for all layers: on the CPU each step attends to them
    /// directly (see `models::attention_to_states`), 1.8 MB per image instead of 42 MB of keys
    /// and values.
    States(EncoderStates),
    /// Per layer, the keys/values of the encoder states, computed once (other devices).
    KeyValues(Vec<KeyValue>),
}

/// Encoder states [b, n, width] for the CPU's cross-attention, with their bf16 pairs for AMX
/// tiles, made by the first step that takes them (a bf16 model multiplying in bf16 on a CPU with
/// AMX) and kept for every later step and layer.
pub(crate) struct EncoderStates {
    pub(crate) states: Tensor,
    pub(crate) paired: OnceLock<PairedStates>,
}

impl EncoderStates {
    pub(crate) fn new(states: Tensor) -> Self {
        Self { states, paired: OnceLock::new() }
    }
}

impl DecoderCache {
    /// Keeps only the given batch rows (e.g. sequences that have not finished), in that order.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let Some(device) = self.device() else { return Ok(()) };
        self.padding = rows.iter().map(|&r| self.padding[r as usize]).collect();
        let rows = Tensor::new(rows, &device)?;
        for kv in self.self_attention.iter_mut().flatten() {
            *kv = kv.select_rows(&rows)?;
        }
        match &mut self.cross_attention {
            CrossAttention::States(states) => *states = EncoderStates::new(states.states.index_select(&rows, 0)?),
            CrossAttention::KeyValues(kvs) => {
                for kv in kvs.iter_mut() {
                    *kv = kv.select_rows(&rows)?;
                }
            }
        }
        if let Some(bias) = &mut self.cross_attention_bias {
            *bias = bias.index_select(&rows, 0)?;
        }
        self.trim_padding()
    }

    fn device(&self) -> Option<Device> {
        match &self.cross_attention {
            CrossAttention::States(states) => Some(states.states.device().clone()),
            CrossAttention::KeyValues(kvs) => kvs.first().map(|kv| kv.key.device().clone()),
        }
    }

    /// Whether some row's keys are padded.
    pub(crate) fn is_padded(&self) -> bool {
        self.padding.iter().any(|&p| p > 0)
    }

    /// Drops the padding every row has (the rows that needed none have left).
    fn trim_padding(&mut self) -> Result<()> {
        let trim = self.padding.iter().copied().min().unwrap_or(0);
        if trim == 0 {
            return Ok(());
        }
        let len = self.past_len - trim;
        for kv in self.self_attention.iter_mut().flatten() {
            kv.key = kv.key.narrow(2, trim, len)?.contiguous()?;
            kv.value = kv.value.narrow(2, trim, len)?.contiguous()?;
        }
        self.padding.iter_mut().for_each(|p| *p -= trim);
        self.past_len = len;
        Ok(())
    }

    /// Appends `other`'s rows (decoding against the same model, from any position): the
    /// shorter side's keys and values are left-padded, and encoder sides of different lengths
    /// right-padded, the padding masked out.
    pub(crate) fn join(&mut self, other: DecoderCache) -> Result<()> {
        let (rows, other_rows) = (self.padding.len(), other.padding.len());
        let device = self.device().or_else(|| other.device()).unwrap_or(Device::Cpu);
        let len = self.past_len.max(other.past_len);
        for (mine, theirs) in self.self_attention.iter_mut().zip(other.self_attention) {
            let Some(like) = mine.as_ref().or(theirs.as_ref()).cloned() else { continue };
            let mine_padded = pad_keys(mine.take(), rows, len - self.past_len, &like)?;
            let theirs_padded = pad_keys(theirs, other_rows, len - other.past_len, &like)?;
            *mine = Some(KeyValue {
                key: Tensor::cat(&[&mine_padded.key, &theirs_padded.key], 0)?,
                value: Tensor::cat(&[&mine_padded.value, &theirs_padded.value], 0)?,
            });
        }
        self.padding.iter_mut().for_each(|p| *p += len - self.past_len);
        self.padding.extend(other.padding.iter().map(|p| p + len - other.past_len));
        self.past_len = len;

        let (n, other_n) = (encoder_len(&self.cross_attention)?, encoder_len(&other.cross_attention)?);
        let width = n.max(other_n);
        self.cross_attention_bias = match (self.cross_attention_bias.take(), other.cross_attention_bias) {
            (None, None) if n == other_n => None,
            (mine, theirs) => {
                let mine = padded_bias(mine, rows, n, width, &device)?;
                let theirs = padded_bias(theirs, other_rows, other_n, width, &device)?;
                Some(Tensor::cat(&[mine, theirs], 0)?)
            }
        };
        self.cross_attention = match (
            std::mem::replace(&mut self.cross_attention, CrossAttention::KeyValues(vec![])),
            other.cross_attention,
        ) {
            (CrossAttention::States(mine), CrossAttention::States(theirs)) => {
                let (mine, theirs) = (pad_end(&mine.states, 1, width)?, pad_end(&theirs.states, 1, width)?);
                CrossAttention::States(EncoderStates::new(Tensor::cat(&[mine, theirs], 0)?))
            }
            (CrossAttention::KeyValues(mine), CrossAttention::KeyValues(theirs)) => CrossAttention::KeyValues(
                mine.iter()
                    .zip(&theirs)
                    .map(|(a, b)| {
                        Ok(KeyValue {
                            key: Tensor::cat(&[pad_end(&a.key, 2, width)?, pad_end(&b.key, 2, width)?], 0)?,
                            value: Tensor::cat(&[pad_end(&a.value, 2, width)?, pad_end(&b.value, 2, width)?], 0)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => candle_core::bail!("decoder caches of different devices cannot join"),
        };
        Ok(())
    }
}

/// `kv` ([rows, heads, len, head_dim], or nothing yet) with `padding` zero positions in front.
fn pad_keys(kv: Option<KeyValue>, rows: usize, padding: usize, like: &KeyValue) -> Result<KeyValue> {
    let (_, heads, _, head_dim) = like.key.dims4()?;
    let zeros = Tensor::zeros((rows, heads, padding, head_dim), like.key.dtype(), like.key.device())?;
    Ok(match kv {
        None => KeyValue { key: zeros.clone(), value: zeros },
        Some(kv) if padding == 0 => kv,
        Some(kv) => KeyValue { key: Tensor::cat(&[&zeros, &kv.key], 2)?, value: Tensor::cat(&[&zeros, &kv.value], 2)? },
    })
}

/// `xs` with zeros appended along `dim` up to `len`.
fn pad_end(xs: &Tensor, dim: usize, len: usize) -> Result<Tensor> {
    let have = xs.dim(dim)?;
    if have == len {
        return Ok(xs.clone());
    }
    let mut shape = xs.dims().to_vec();
    shape[dim] = len - have;
    Tensor::cat(&[xs, &Tensor::zeros(shape, xs.dtype(), xs.device())?], dim)
}

/// The encoder positions the cross-attention attends to.
fn encoder_len(cross: &CrossAttention) -> Result<usize> {
    match cross {
        CrossAttention::States(states) => states.states.dim(1),
        CrossAttention::KeyValues(kvs) => kvs.first().map_or(Ok(0), |kv| kv.key.dim(2)),
    }
}

/// A cross-attention bias [rows, 1, 1, width]: `bias` (zeros where there is none) over the
/// first `len` positions, the f32 minimum (masked, as transformers' masks) after them.
fn padded_bias(bias: Option<Tensor>, rows: usize, len: usize, width: usize, device: &Device) -> Result<Tensor> {
    let bias = match bias {
        Some(bias) => bias,
        None => Tensor::zeros((rows, 1, 1, len), DType::F32, device)?,
    };
    if width == len {
        return Ok(bias);
    }
    let masked = Tensor::full(f32::MIN, (rows, 1, 1, width - len), bias.device())?;
    Tensor::cat(&[&bias, &masked], 3)
}
