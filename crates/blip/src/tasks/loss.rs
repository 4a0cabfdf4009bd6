//! The training losses of transformers' BLIP heads, computed as their `forward` computes them:
//! as values, and as scalar tensors in the autograd graph of the trained weights (see
//! [`crate::training`]).

use candle_core::{DType, Tensor};

use super::{check_count, Images};
use crate::config::Architecture;
use crate::error::{InvalidInput, Param, Result};
use crate::tasks::caption::Captioner;
use crate::tasks::matching::{ImageTextMatcher, MatchingModel};
use crate::tasks::vqa::QuestionAnswerer;

/// `torch.nn.CrossEntropyLoss` `ignore_index`.
pub const IGNORE_INDEX: i64 = -100;

/// Token ids of a batch, one row per input, all rows of one length (padded).
pub type Rows<'a, T> = &'a [Vec<T>];

impl Captioner {
    /// `BlipForConditionalGeneration(pixel_values, input_ids, attention_mask, labels).loss`: the
    /// decoder's next-token cross-entropy over the images, labels shifted by one, `-100`
    /// ignored, the mean over the rest, with the config's `label_smoothing` unless
    /// `label_smoothing` is given. Positions whose label is a pad token count, as in transformers
    /// (set them to -100 to leave them out).
    pub fn loss<'a>(
        &self,
        images: impl Into<Images<'a>>,
        input_ids: Rows<'_, u32>,
        attention_mask: Rows<'_, u32>,
        labels: Rows<'_, i64>,
        label_smoothing: Option<f64>,
    ) -> Result<f32> {
        scalar(self.loss_tensor(images, input_ids, attention_mask, labels, label_smoothing)?)
    }

    /// [`Self::loss`] as a scalar tensor in the autograd graph of the trained weights (see
    /// [`crate::training`]), for `backward()`.
    pub fn loss_tensor<'a>(
        &self,
        images: impl Into<Images<'a>>,
        input_ids: Rows<'_, u32>,
        attention_mask: Rows<'_, u32>,
        labels: Rows<'_, i64>,
        label_smoothing: Option<f64>,
    ) -> Result<Tensor> {
        let images = images.into();
        check_count(Param::Text, input_ids.len(), images.len()?)?;
        same_shape(Param::Labels, input_ids, labels)?;
        same_shape(Param::AttentionMask, input_ids, attention_mask)?;
        let (ids, mask) = (ids_tensor(self, input_ids)?, ids_tensor(self, attention_mask)?);
        let pixel_values = self.pixel_values(images)?;
        let image_embeds = self.model.encode_images(&pixel_values)?;
        let decoder = &self.model.text_decoder;
        let mut cache = decoder.new_cache(&image_embeds, None)?;
        let logits = decoder.forward_masked(&ids, Some(&mask), &mut cache)?;
        let smoothing = label_smoothing.unwrap_or(self.config.text_config.label_smoothing);
        shifted_cross_entropy(&logits, labels, smoothing)
    }
}

impl QuestionAnswerer {
    /// `BlipForQuestionAnswering(input_ids, pixel_values, attention_mask, labels).loss`: the
    /// questions (`input_ids`, `attention_mask`) encoded over the images, then the answer
    /// decoder's shifted cross-entropy on `labels` — which transformers also feeds to the decoder
    /// as its input ids (no decoder attention mask), so they must be token ids (no -100); the
    /// config's `label_smoothing` unless given.
    pub fn loss<'a>(
        &self,
        images: impl Into<Images<'a>>,
        input_ids: Rows<'_, u32>,
        attention_mask: Rows<'_, u32>,
        labels: Rows<'_, i64>,
        label_smoothing: Option<f64>,
    ) -> Result<f32> {
        scalar(self.loss_tensor(images, input_ids, attention_mask, labels, label_smoothing)?)
    }

    /// [`Self::loss`] as a scalar tensor in the autograd graph of the trained weights.
    pub fn loss_tensor<'a>(
        &self,
        images: impl Into<Images<'a>>,
        input_ids: Rows<'_, u32>,
        attention_mask: Rows<'_, u32>,
        labels: Rows<'_, i64>,
        label_smoothing: Option<f64>,
    ) -> Result<Tensor> {
        let decoder_ids: Vec<Vec<u32>> = labels
            .iter()
            .map(|row| row.iter().map(|&l| u32::try_from(l).map_err(|_| label_not_id(l))).collect())
            .collect::<Result<_>>()?;
        self.answer_loss_tensor(images, (input_ids, attention_mask), (&decoder_ids, None), labels, label_smoothing)
    }

    /// `BlipForQuestionAnswering(input_ids, pixel_values, attention_mask, decoder_input_ids,
    /// decoder_attention_mask, labels).loss`: the answer decoder reads `decoder_input_ids` (with
    /// their mask when given) and is scored on `labels`, where -100 leaves a position out — the
    /// form a training loop uses to leave the answers' padding out of the loss.
    pub fn answer_loss_tensor<'a>(
        &self,
        images: impl Into<Images<'a>>,
        (input_ids, attention_mask): (Rows<'_, u32>, Rows<'_, u32>),
        (decoder_input_ids, decoder_attention_mask): (Rows<'_, u32>, Option<Rows<'_, u32>>),
        labels: Rows<'_, i64>,
        label_smoothing: Option<f64>,
    ) -> Result<Tensor> {
        let images = images.into();
        check_count(Param::Question, input_ids.len(), images.len()?)?;
        check_count(Param::Labels, labels.len(), images.len()?)?;
        same_shape(Param::AttentionMask, input_ids, attention_mask)?;
        same_shape(Param::Labels, decoder_input_ids, labels)?;
        if let Some(mask) = decoder_attention_mask {
            same_shape(Param::AttentionMask, decoder_input_ids, mask)?;
        }
        let (ids, mask) = (ids_tensor(self, input_ids)?, ids_tensor(self, attention_mask)?);
        let pixel_values = self.pixel_values(images)?;
        let image_embeds = self.model.vision_model.forward(&pixel_values)?;
        let questions = self.model.encode_questions(&ids, Some(&mask), &image_embeds)?;
        let decoder = &self.model.text_decoder;
        // transformers' answer decoder attends to the questions' padding too (since 4.54; the
        // generation here deliberately does not, see docs/CLI.md): so does its loss.
        let mut cache = decoder.new_cache(&questions, None)?;
        let decoder_mask = decoder_attention_mask.map(|rows| ids_tensor(self, rows)).transpose()?;
        let logits =
            decoder.forward_masked(&ids_tensor(self, decoder_input_ids)?, decoder_mask.as_ref(), &mut cache)?;
        let smoothing = label_smoothing.unwrap_or(self.config.text_config.label_smoothing);
        shifted_cross_entropy(&logits, labels, smoothing)
    }
}

impl ImageTextMatcher {
    /// `BlipModel(..., return_loss=True).loss`: the symmetric contrastive loss of image i with
    /// text i, the mean of the cross-entropies of `logits_per_text` and `logits_per_image`
    /// against the diagonal. BlipModel checkpoints only (the retrieval ones carry no learned
    /// temperature, and transformers gives them no such loss).
    pub fn contrastive_loss<'a>(&self, images: impl Into<Images<'a>>, texts: &[&str]) -> Result<f32> {
        scalar(self.contrastive_loss_tensor(images, texts)?)
    }

    /// [`Self::contrastive_loss`] as a scalar tensor in the autograd graph of the trained
    /// weights (the logit scale included).
    pub fn contrastive_loss_tensor<'a>(&self, images: impl Into<Images<'a>>, texts: &[&str]) -> Result<Tensor> {
        let MatchingModel::Contrastive(model) = &self.model else {
            return Err(InvalidInput::NeedsArchitecture {
                param: Param::Text,
                needs: Architecture::Model,
                found: self.architecture,
            }
            .into());
        };
        let images = images.into();
        check_count(Param::Text, texts.len(), images.len()?)?;
        let cosines = self.embed_images(images)?.matmul(&self.embed_texts(texts)?.t()?)?;
        let logits_per_image = cosines.broadcast_mul(&model.logit_scale_param.exp()?)?;
        let n = texts.len();
        let diagonal: Vec<i64> = (0..n as i64).collect();
        let per_image = cross_entropy_tensor(&logits_per_image, &diagonal, 0.0)?;
        let per_text = cross_entropy_tensor(&logits_per_image.t()?.contiguous()?, &diagonal, 0.0)?;
        Ok(((per_text + per_image)? / 2.0)?)
    }
}

/// The value of a scalar loss tensor.
fn scalar(loss: Tensor) -> Result<f32> {
    Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

/// Ids as a u32 tensor [rows, t] on the task's device.
fn ids_tensor<M: super::TaskModel>(task: &super::Task<M>, rows: Rows<'_, u32>) -> Result<Tensor> {
    let t = rows.first().map_or(0, Vec::len);
    if t < 2 || rows.iter().any(|r| r.len() != t) {
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        return Err(InvalidInput::OutOfRange {
            param: Param::InputIds,
            value: format!("rows of {lengths:?} tokens"),
            accepted: "rows of one length (padded), at least 2 tokens",
        }
        .into());
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), t), &task.device)?)
}

/// `b` (labels, a mask) has the shape of the ids `a`.
fn same_shape<A, B>(param: Param, a: Rows<'_, A>, b: Rows<'_, B>) -> Result<()> {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.len() != y.len()) {
        let lengths: Vec<usize> = b.iter().map(Vec::len).collect();
        return Err(InvalidInput::OutOfRange {
            param,
            value: format!("rows of {lengths:?}"),
            accepted: "the shape of input_ids",
        }
        .into());
    }
    Ok(())
}

fn label_not_id(label: i64) -> crate::Error {
    InvalidInput::OutOfRange {
        param: Param::Labels,
        value: label.to_string(),
        accepted:
            "token ids: transformers feeds VQA labels to the answer decoder (pad with the pad token id, not -100)",
    }
    .into()
}

/// The mean cross-entropy of logits [b, t, vocab] at positions 0..t-1 against labels at 1..t
/// (transformers' `BlipTextLMHeadModel` shift).
fn shifted_cross_entropy(logits: &Tensor, labels: Rows<'_, i64>, label_smoothing: f64) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    let scores = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), vocab))?;
    let targets: Vec<i64> = labels.iter().flat_map(|row| row[1..].iter().copied()).collect();
    cross_entropy_tensor(&scores, &targets, label_smoothing)
}

/// [`cross_entropy`] of logits [rows, classes] in candle's differentiable ops (f32): the same
/// formula, as a scalar tensor.
pub fn cross_entropy_tensor(logits: &Tensor, targets: &[i64], label_smoothing: f64) -> Result<Tensor> {
    let (rows, classes) = logits.dims2()?;
    if targets.len() != rows {
        return Err(InvalidInput::OutOfRange {
            param: Param::Labels,
            value: format!("{} labels", targets.len()),
            accepted: "one label per scored position",
        }
        .into());
    }
    let mut kept_rows = Vec::new();
    let mut picked = Vec::new();
    for (row, &target) in targets.iter().enumerate() {
        if target == IGNORE_INDEX {
            continue;
        }
        let class = usize::try_from(target).ok().filter(|&t| t < classes).ok_or_else(|| InvalidInput::OutOfRange {
            param: Param::Labels,
            value: target.to_string(),
            accepted: "a class (token id) of the logits, or -100",
        })?;
        picked.push((kept_rows.len() * classes + class) as u32);
        kept_rows.push(row as u32);
    }
    let device = logits.device();
    if kept_rows.is_empty() {
        // torch's mean over no rows
        return Ok(Tensor::new(f32::NAN, device)?);
    }
    let count = kept_rows.len();
    let kept = logits.to_dtype(DType::F32)?.contiguous()?.index_select(&Tensor::new(kept_rows, device)?, 0)?;
    let log_probs = log_softmax(&kept)?;
    let nll = log_probs.flatten_all()?.index_select(&Tensor::new(picked, device)?, 0)?.neg()?;
    let per_row = if label_smoothing == 0.0 {
        nll
    } else {
        let smooth = log_probs.mean(1)?.neg()?;
        ((nll * (1.0 - label_smoothing))? + (smooth * label_smoothing)?)?
    };
    Ok((per_row.sum_all()? / count as f64)?)
}

/// log-softmax over the last dimension; the maximum subtracted is a constant to the gradient.
fn log_softmax(xs: &Tensor) -> Result<Tensor> {
    let shifted = xs.broadcast_sub(&xs.max_keepdim(candle_core::D::Minus1)?.detach())?;
    let log_sum = shifted.exp()?.sum_keepdim(candle_core::D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// `torch.nn.CrossEntropyLoss(reduction="mean", ignore_index=-100, label_smoothing)` of rows of
/// `classes` logits: per counted row `(1 - ε)·(-log p[target]) + ε·mean_k(-log p[k])`, the mean
/// over the rows whose target is not -100 (NaN when there are none, as torch gives).
pub fn cross_entropy(logits: &[f32], classes: usize, targets: &[i64], label_smoothing: f64) -> Result<f32> {
    let (mut total, mut counted) = (0f64, 0usize);
    for (row, &target) in logits.chunks_exact(classes).zip(targets) {
        if target == IGNORE_INDEX {
            continue;
        }
        let target = usize::try_from(target).ok().filter(|&t| t < classes).ok_or_else(|| InvalidInput::OutOfRange {
            param: Param::Labels,
            value: target.to_string(),
            accepted: "a class (token id) of the logits, or -100",
        })?;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_sum = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
        let nll = log_sum - row[target] as f64;
        let smooth = log_sum - row.iter().map(|&x| x as f64).sum::<f64>() / classes as f64;
        total += (1.0 - label_smoothing) * nll + label_smoothing * smooth;
        counted += 1;
    }
    Ok((total / counted as f64) as f32)
}
