//! The text transformer (`BlipTextModel`): BERT without token types, post-norm, with optional
//! cross-attention to encoder states. One implementation serves the caption/answer decoder
//! (causal, cached) and the question, matching and contrastive encoders (bidirectional).

use std::sync::OnceLock;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Embedding, VarBuilder};

use super::cache::{CrossAttention, DecoderCache, EncoderStates, KeyValue};
use super::Linear;
use super::{layer_norm, linear};
use crate::config::TextConfig;
use crate::kernels::amx::states::PairedStates;
use crate::ops::activation::gelu;
use crate::ops::attention::{
    attention, attention_to_states, attention_to_states_in_graph, merge_heads, split_heads, STATES_ATTENTION_QUERIES,
};
use crate::ops::norm::LayerNorm;
use crate::ops::tensor::same_bits;
use crate::ops::{cpu_f32, in_graph, on_cpu};

/// `BlipTextEmbeddings`: word + absolute position embeddings, LayerNorm. The word embeddings
/// (tied to the LM head) stay in the load dtype; looked-up rows are widened to f32.
struct TextEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    layer_norm: LayerNorm,
    /// `nn.Embedding(padding_idx=pad_token_id)`: the pad token's row gets no gradient.
    pad_token_id: u32,
}

impl TextEmbeddings {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let word = vb.get((cfg.vocab_size, cfg.hidden_size), "word_embeddings.weight")?;
        let position = vb
            .to_dtype(DType::F32)
            .get((cfg.max_position_embeddings, cfg.hidden_size), "position_embeddings.weight")?;
        Ok(Self {
            word_embeddings: Embedding::new(word, cfg.hidden_size),
            position_embeddings: Embedding::new(position, cfg.hidden_size),
            layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            pad_token_id: cfg.pad_token_id,
        })
    }

    /// Positions run from `past_len`, whatever the padding (as transformers does), less each
    /// row's `skipped` cache positions (rows joined from another batch; empty: none).
    fn forward(&self, input_ids: &Tensor, past_len: usize, skipped: &[usize]) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let positions = if skipped.iter().all(|&s| s == 0) {
            Tensor::arange(past_len as u32, (past_len + t) as u32, input_ids.device())?
        } else {
            let starts = skipped.iter().map(|&s| (past_len - s) as u32);
            let positions: Vec<u32> = starts.flat_map(|start| start..start + t as u32).collect();
            Tensor::from_vec(positions, (b, t), input_ids.device())?
        };
        let words = self.word_embeddings.forward(input_ids)?.to_dtype(DType::F32)?;
        let words = if in_graph(&words) {
            // the pad token's rows looked up outside the graph
            let (b, t) = input_ids.dims2()?;
            let padding = input_ids.eq(self.pad_token_id)?.unsqueeze(2)?.broadcast_as(words.shape())?;
            let detached = self.word_embeddings.embeddings().detach().to_dtype(DType::F32)?;
            let constant = detached.index_select(&input_ids.flatten_all()?, 0)?.reshape(words.shape())?;
            debug_assert_eq!(words.dims()[..2], [b, t]);
            padding.where_cond(&constant, &words)?
        } else {
            words
        };
        let mut positions = self.position_embeddings.forward(&positions)?;
        if positions.rank() == 2 {
            positions = positions.unsqueeze(0)?;
        }
        self.layer_norm.forward(&words.broadcast_add(&positions)?)
    }
}

/// `BlipTextAttention`: `self` (query/key/value) and `output` (dense, LayerNorm with residual).
/// The same module is self-attention or, with keys/values from the image, cross-attention.
struct TextAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    heads: usize,
    scale: f64,
}

impl TextAttention {
    fn new(cfg: &TextConfig, kv_width: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let head_dim = d / cfg.num_attention_heads;
        Ok(Self {
            query: linear(d, d, vb.pp("self.query"))?,
            key: linear(kv_width, d, vb.pp("self.key"))?,
            value: linear(kv_width, d, vb.pp("self.value"))?,
            dense: linear(d, d, vb.pp("output.dense"))?,
            layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    fn key_value(&self, states: &Tensor) -> Result<KeyValue> {
        Ok(KeyValue {
            key: split_heads(&self.key.forward(states)?, self.heads)?,
            value: split_heads(&self.value.forward(states)?, self.heads)?,
        })
    }

    /// LayerNorm(x + dense(attention(query(x), kv))).
    fn attend(&self, xs: &Tensor, kv: &KeyValue, bias: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(xs)?, self.heads)?;
        let context = merge_heads(&attention(&q, &kv.key, &kv.value, self.scale, bias)?)?;
        self.layer_norm.forward(&self.dense.forward_residual(&context, xs)?)
    }

    /// Cross-attention to encoder `states` [b, n, encoder_hidden]: LayerNorm(x + dense(context)).
    /// For a few queries, without computing the states' keys and values at all: on the CPU
    /// kernels, or, in an autograd graph (training, Grad-CAM), in differentiable ops.
    /// `paired`: where the states' bf16 pairs are kept between steps (decoding).
    fn attend_states(
        &self,
        xs: &Tensor,
        (states, paired): (&Tensor, Option<&OnceLock<PairedStates>>),
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let queries = xs.dim(1)?;
        let trained = self.query.in_graph() || self.key.in_graph() || self.value.in_graph();
        let kernels_take = cpu_f32(xs) && cpu_f32(states) && !trained;
        let in_graph = trained || in_graph(xs) || in_graph(states);
        let f32_weights = [&self.key, &self.value].iter().all(|l| l.weight().dtype() == DType::F32);
        if queries > STATES_ATTENTION_QUERIES || !(kernels_take || in_graph && f32_weights) {
            return self.attend(xs, &self.key_value(states)?, bias);
        }
        let q = self.query.forward(xs)?;
        let context = if kernels_take {
            attention_to_states(&q, (states, paired), (&self.key, &self.value), self.heads, self.scale, bias)?
        } else {
            attention_to_states_in_graph(&q, states, (&self.key, &self.value), self.heads, self.scale, bias)?
        };
        self.layer_norm.forward(&self.dense.forward_residual(&context, xs)?)
    }
}

impl TextAttention {
    /// Cross-attention to `states` whose probabilities [b, heads, t, n] are made a variable, the
    /// output computed from it: the gradient of anything downstream with respect to the
    /// probabilities is then the variable's (Grad-CAM). Images are never padded: no mask.
    fn attend_probing(&self, xs: &Tensor, states: &Tensor) -> Result<(Tensor, Var)> {
        let kv = self.key_value(states)?;
        let q = split_heads(&self.query.forward(xs)?, self.heads)?;
        let scores = (q.matmul(&kv.key.t()?.contiguous()?)? * self.scale)?;
        let probs = Var::from_tensor(&candle_nn::ops::softmax_last_dim(&scores)?)?;
        let context = merge_heads(&probs.as_tensor().matmul(&kv.value)?)?;
        Ok((self.layer_norm.forward(&self.dense.forward_residual(&context, xs)?)?, probs))
    }
}

/// What a layer's cross-attention attends to: the encoder states, or their keys and values.
#[derive(Clone, Copy)]
enum Encoder<'a> {
    /// The states, with their pairs for AMX tiles where the decoding cache keeps them.
    States(&'a Tensor, Option<&'a OnceLock<PairedStates>>),
    KeyValue(&'a KeyValue),
}

/// `BlipTextLayer`: self-attention, cross-attention (when encoder states are given), FFN.
struct TextLayer {
    attention: TextAttention,
    crossattention: Option<TextAttention>,
    intermediate: Linear,
    output: Linear,
    output_layer_norm: LayerNorm,
}

impl TextLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let crossattention = if vb.contains_tensor("crossattention.self.query.weight") {
            Some(TextAttention::new(cfg, cfg.encoder_hidden_size, vb.pp("crossattention"))?)
        } else {
            None
        };
        Ok(Self {
            attention: TextAttention::new(cfg, d, vb.pp("attention"))?,
            crossattention,
            intermediate: linear(d, i, vb.pp("intermediate.dense"))?,
            output: linear(i, d, vb.pp("output.dense"))?,
            output_layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
        })
    }

    /// `cross` holds the encoder side and the additive bias masking its padding.
    fn forward(
        &self,
        xs: &Tensor,
        self_bias: Option<&Tensor>,
        past: &mut Option<KeyValue>,
        cross: Option<(Encoder, Option<&Tensor>)>,
    ) -> Result<Tensor> {
        let mut kv = self.attention.key_value(xs)?;
        if let Some(past) = past.as_ref() {
            kv = KeyValue {
                key: Tensor::cat(&[&past.key, &kv.key], 2)?,
                value: Tensor::cat(&[&past.value, &kv.value], 2)?,
            };
        }
        let mut hidden = self.attention.attend(xs, &kv, self_bias)?;
        *past = Some(kv);
        if let (Some(crossattention), Some((encoder, bias))) = (&self.crossattention, cross) {
            hidden = match encoder {
                Encoder::States(states, paired) => crossattention.attend_states(&hidden, (states, paired), bias)?,
                Encoder::KeyValue(kv) => crossattention.attend(&hidden, kv, bias)?,
            };
        }
        let ffn = self.output.forward_residual(&gelu(self.intermediate.forward(&hidden)?)?, &hidden)?;
        self.output_layer_norm.forward(&ffn)
    }
}

impl TextLayer {
    /// [`Self::forward`] of an encoder layer with its cross-attention probabilities probed (see
    /// [`TextAttention::attend_probing`]).
    fn forward_probing(&self, xs: &Tensor, self_bias: Option<&Tensor>, states: &Tensor) -> Result<(Tensor, Var)> {
        let Some(crossattention) = &self.crossattention else {
            candle_core::bail!("this text model has no cross-attention weights");
        };
        let kv = self.attention.key_value(xs)?;
        let hidden = self.attention.attend(xs, &kv, self_bias)?;
        let (hidden, probs) = crossattention.attend_probing(&hidden, states)?;
        let ffn = self.output.forward_residual(&gelu(self.intermediate.forward(&hidden)?)?, &hidden)?;
        Ok((self.output_layer_norm.forward(&ffn)?, probs))
    }
}

/// `BlipTextModel` without pooler (see [`TextPooler`]).
pub struct TextModel {
    embeddings: TextEmbeddings,
    layers: Vec<TextLayer>,
    max_positions: usize,
}

impl TextModel {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| TextLayer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings: TextEmbeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word_embeddings.embeddings()
    }

    /// A cache for decoding against `encoder_states` [b, n, encoder_hidden]. On the CPU it keeps
    /// the states, which each step attends to directly; elsewhere the cross-attention
    /// keys/values are computed here, once. `encoder_mask` [b, n] (1 = real, 0 = padding) keeps
    /// the decoder off padded encoder positions (transformers ignores it since 4.54; images are
    /// never padded, padded question batches are).
    pub fn new_cache(&self, encoder_states: &Tensor, encoder_mask: Option<&Tensor>) -> Result<DecoderCache> {
        let cross_layers = self
            .layers
            .iter()
            .map(|layer| match &layer.crossattention {
                Some(cross) => Ok(cross),
                None => candle_core::bail!("this text model has no cross-attention weights"),
            })
            .collect::<Result<Vec<_>>>()?;
        let cross_attention = if on_cpu(encoder_states) {
            CrossAttention::States(EncoderStates::new(encoder_states.contiguous()?))
        } else {
            let key_values = cross_layers.iter().map(|cross| cross.key_value(encoder_states));
            CrossAttention::KeyValues(key_values.collect::<Result<_>>()?)
        };
        Ok(DecoderCache {
            self_attention: vec![None; self.layers.len()],
            cross_attention,
            cross_attention_bias: encoder_mask.map(padding_bias).transpose()?,
            past_len: 0,
            padding: vec![0; encoder_states.dim(0)?],
        })
    }

    /// Bidirectional pass (the text encoder of VQA, ITM and ITC): `input_ids` [b, t] with
    /// `attention_mask` [b, t] (1 = token, 0 = padding), optionally cross-attending to
    /// `encoder_states` [b, n, encoder_hidden] (images: never padded). Returns [b, t, hidden].
    pub fn forward_encoder(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        encoder_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if t > self.max_positions {
            candle_core::bail!("text of {t} tokens exceeds the model's {} positions", self.max_positions);
        }
        let bias = attention_mask.map(padding_bias).transpose()?;
        let mut xs = self.embeddings.forward(input_ids, 0, &[])?;
        for layer in &self.layers {
            let cross = match (encoder_states, &layer.crossattention) {
                (Some(states), Some(_)) => Some((Encoder::States(states, None), None)),
                (Some(_), None) => candle_core::bail!("this text model has no cross-attention weights"),
                (None, _) => None,
            };
            xs = layer.forward(&xs, bias.as_ref(), &mut None, cross)?;
        }
        Ok(xs)
    }

    /// [`Self::forward_encoder`] over `encoder_states`, with the cross-attention probabilities
    /// [b, heads, t, n] of layer `probed` returned as a variable that the returned states [b,
    /// t, hidden] depend on: their gradient is what Grad-CAM weighs the probabilities by.
    pub fn forward_encoder_probing(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        encoder_states: &Tensor,
        probed: usize,
    ) -> Result<(Tensor, Var)> {
        if probed >= self.layers.len() {
            candle_core::bail!("no layer {probed}: the text model has {} layers", self.layers.len());
        }
        let bias = attention_mask.map(padding_bias).transpose()?;
        let mut xs = self.embeddings.forward(input_ids, 0, &[])?;
        let mut probs = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == probed {
                let (hidden, var) = layer.forward_probing(&xs, bias.as_ref(), encoder_states)?;
                (xs, probs) = (hidden, Some(var));
            } else {
                xs = layer.forward(
                    &xs,
                    bias.as_ref(),
                    &mut None,
                    Some((Encoder::States(encoder_states, None), None)),
                )?;
            }
        }
        let probs = probs.ok_or_else(|| candle_core::Error::Msg("no probed layer".into()))?;
        Ok((xs, probs))
    }

    /// Causal decoder step: `input_ids` [b, t] continue the sequences in `cache`; returns the
    /// last hidden states [b, t, hidden].
    pub fn forward_decoder(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        self.forward_decoder_masked(input_ids, None, cache)
    }

    /// [`Self::forward_decoder`] from an empty cache with `attention_mask` [b, t] (1 = token,
    /// 0 = padding) hiding padded keys too: transformers' decoder mask, causal × padding, for
    /// teacher-forced passes over padded batches (training losses).
    pub fn forward_decoder_masked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if attention_mask.is_some() && cache.past_len > 0 {
            candle_core::bail!("a decoder attention mask is only taken from an empty cache");
        }
        let past_len = cache.past_len;
        if past_len + t > self.max_positions {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                past_len + t,
                self.max_positions
            );
        }
        let causal = if t > 1 { Some(causal_bias(t, past_len, input_ids.device())?) } else { None };
        let bias = match attention_mask {
            None if cache.is_padded() => {
                let skipped = skipped_bias(&cache.padding, past_len + t, input_ids.device())?;
                Some(match causal {
                    Some(causal) => skipped.broadcast_minimum(&causal)?,
                    None => skipped,
                })
            }
            None => causal,
            // Masked by either: the f32 minimum, as transformers' combined mask.
            Some(mask) => {
                let padding = padding_bias(mask)?;
                Some(match causal {
                    Some(causal) => padding.broadcast_minimum(&causal)?,
                    None => padding,
                })
            }
        };
        let mut xs = self.embeddings.forward(input_ids, past_len, &cache.padding)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let encoder = match &cache.cross_attention {
                CrossAttention::States(states) => Encoder::States(&states.states, Some(&states.paired)),
                CrossAttention::KeyValues(key_values) => Encoder::KeyValue(&key_values[i]),
            };
            let cross = (encoder, cache.cross_attention_bias.as_ref());
            xs = layer.forward(&xs, bias.as_ref(), &mut cache.self_attention[i], Some(cross))?;
        }
        cache.past_len += t;
        Ok(xs)
    }
}

/// Additive mask [t, past+t]: query i sees keys up to past+i. transformers fills with the
/// dtype's minimum rather than -inf; both give exactly zero weight.
fn causal_bias(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { f32::MIN })).collect();
    Tensor::from_vec(mask, (t, s), device)
}

/// Additive bias [b, 1, 1, len] masking each row's first `skipped[row]` cache positions (the
/// padding of rows joined from another batch) with the f32 minimum: their weight is exactly
/// zero, so a row decodes as it would alone.
fn skipped_bias(skipped: &[usize], len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        skipped.iter().flat_map(|&s| (0..len).map(move |j| if j < s { f32::MIN } else { 0.0 })).collect();
    Tensor::from_vec(mask, (skipped.len(), 1, 1, len), device)
}

/// Additive bias [b, 1, 1, n] from a 0/1 mask [b, n]: 0 where attended, the f32 minimum on
/// padding (as transformers' masks), broadcast over heads and queries.
fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, n) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    // keep·0 + (1 − keep)·MIN without producing 0·MIN
    let bias = keep.affine(-(f32::MIN as f64), f32::MIN as f64)?;
    bias.reshape((b, 1, 1, n))
}

/// `BlipTextPooler` (BlipModel's text model only): tanh(dense(first token)).
pub struct TextPooler {
    dense: Linear,
}

impl TextPooler {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self { dense: linear(cfg.hidden_size, cfg.hidden_size, vb.pp("dense"))? })
    }

    /// hidden [b, t, hidden] → pooled [b, hidden].
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        self.dense.forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()
    }
}

/// `BlipTextLMPredictionHead` (under `cls.predictions`): dense → gelu → LayerNorm → vocab.
pub struct LmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    decoder: Linear,
    /// The bias's name in the checkpoint: `bias`, or `decoder.bias` where that is the only one.
    bias_name: &'static str,
}

impl LmHead {
    /// `tied_embeddings` stand in for `decoder.weight` when the checkpoint leaves the tied key
    /// out (transformers 5 saves it so), and are shared when it holds the same values (the Hub's
    /// checkpoints do): one copy in memory, as in PyTorch, not two (47 MB in bf16, 94 in f32).
    pub fn new(cfg: &TextConfig, tied_embeddings: &Tensor, vb: VarBuilder) -> Result<Self> {
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let decoder_weight = if vb.contains_tensor("decoder.weight") {
            let stored = vb.get((vocab, d), "decoder.weight")?;
            if same_bits(&stored, tied_embeddings)? {
                tied_embeddings.clone()
            } else {
                stored
            }
        } else {
            tied_embeddings.clone()
        };
        let bias_name = if vb.contains_tensor("bias") { "bias" } else { "decoder.bias" };
        let bias = vb.to_dtype(DType::F32).get(vocab, bias_name)?;
        Ok(Self {
            dense: linear(d, d, vb.pp("transform.dense"))?,
            layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("transform.LayerNorm"))?,
            decoder: Linear::new(decoder_weight, Some(bias))?,
            bias_name,
        })
    }

    /// Checkpoint names (under this head's prefix, `cls.predictions`) of tensors that are the
    /// same weight as another: the decoder weight when it is the word embeddings
    /// (`tied_embeddings`, their name `embeddings_name`), and the bias's second name. Pairs of
    /// (name, the name of the weight it is), for saving what was trained under both.
    pub(crate) fn ties(&self, prefix: &str, tied_embeddings: &Tensor, embeddings_name: &str) -> Vec<(String, String)> {
        let other_bias = if self.bias_name == "bias" { "decoder.bias" } else { "bias" };
        let mut ties = vec![(format!("{prefix}.{other_bias}"), format!("{prefix}.{}", self.bias_name))];
        if self.decoder.weight().id() == tied_embeddings.id() {
            ties.push((format!("{prefix}.decoder.weight"), embeddings_name.to_string()));
        }
        ties
    }

    /// hidden [b, t, hidden] → logits [b, t, vocab].
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let xs = self.layer_norm.forward(&gelu(self.dense.forward(hidden)?)?)?;
        self.decoder.forward(&xs)
    }
}
