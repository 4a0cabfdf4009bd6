//! Grad-CAM: where in an image a text matches, as LAVIS's `compute_gradcam` computes it for
//! BLIP (the BLIP demo's method): the ITM head's match logit differentiated with respect to the
//! cross-attention probabilities of one layer of the ITM text encoder, clamped at 0, times
//! those probabilities, averaged over heads, then over the text's tokens.

use candle_core::{DType, IndexOp, Module};

use super::matching::{ImageTextMatcher, MatchingModel};
use super::Images;
use crate::config::Architecture;
use crate::error::{InvalidInput, Param, Result};
use crate::models::retrieval::first_token;

/// LAVIS's default layer (`block_num=6`).
pub const DEFAULT_GRADCAM_LAYER: usize = 6;

/// The Grad-CAM maps of one text over one image, each on the grid of image patches (row-major,
/// `grid.0` rows of `grid.1`; the image's [CLS] state left out).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GradCam {
    pub text: String,
    /// (rows, columns) of patches.
    pub grid: (usize, usize),
    /// The map averaged over the text's tokens ([CLS] and [SEP] out).
    pub map: Vec<f32>,
    /// Each of those tokens with its own map.
    pub tokens: Vec<(String, Vec<f32>)>,
    /// The ITM match probability of the pair.
    pub itm: f32,
}

impl ImageTextMatcher {
    /// Grad-CAM maps of each text over each image: `[image][text]`, from the cross-attention of
    /// the ITM text encoder's layer `layer` (0-based; LAVIS uses 6). Retrieval checkpoints only.
    pub fn gradcam<'a>(
        &self,
        images: impl Into<Images<'a>>,
        texts: &[&str],
        layer: usize,
    ) -> Result<Vec<Vec<GradCam>>> {
        let MatchingModel::Retrieval(model) = &self.model else {
            return Err(InvalidInput::NeedsArchitecture {
                param: Param::Text,
                needs: Architecture::ImageTextRetrieval,
                found: self.architecture,
            }
            .into());
        };
        let layers = self.config.text_config.num_hidden_layers;
        if layer >= layers {
            return Err(InvalidInput::OutOfRange {
                param: Param::GradcamLayer,
                value: layer.to_string(),
                accepted: "a layer of the text encoder (0 to its num_hidden_layers - 1)",
            }
            .into());
        }
        let (ids, mask) = self.encode_texts(Param::Text, texts)?;
        let pixel_values = self.pixel_values(images.into())?;
        let all_states = model.vision_model.forward(&pixel_values)?;
        let patch = self.config.vision_config.patch_size;
        let grid = (self.image_processor.height / patch, self.image_processor.width / patch);
        let lengths: Vec<usize> =
            mask.sum(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?.iter().map(|&n| n as usize).collect();
        let id_rows = ids.to_vec2::<u32>()?;
        let (n, t) = ids.dims2()?;
        (0..all_states.dim(0)?)
            .map(|image| {
                let states =
                    all_states.i(image..image + 1)?.broadcast_as((n, all_states.dim(1)?, all_states.dim(2)?))?;
                let (hidden, probs) =
                    model.text_encoder.forward_encoder_probing(&ids, Some(&mask), &states.contiguous()?, layer)?;
                let logits = model.itm_head.forward(&first_token(&hidden)?)?;
                let grads = logits.i((.., 1))?.sum_all()?.backward()?;
                let itm = candle_nn::ops::softmax_last_dim(&logits.detach())?.i((.., 1))?.to_vec1::<f32>()?;
                let Some(grad) = grads.get(probs.as_tensor()) else {
                    let reason = format!("the ITM logit does not depend on layer {layer}'s cross-attention");
                    return Err(candle_core::Error::Msg(reason).into());
                };
                // cams · max(grad, 0) [n, heads, t, 1 + patches] → mean over heads, image [CLS] out
                let weighted = (probs.as_tensor() * grad.relu()?)?.mean(1)?.narrow(2, 1, grid.0 * grid.1)?;
                let weighted = weighted.to_vec3::<f32>()?;
                (0..n)
                    .map(|j| {
                        let words = lengths[j].saturating_sub(2);
                        let per_token: Vec<Vec<f32>> = weighted[j][1..=words].to_vec();
                        let mut map = vec![0f32; grid.0 * grid.1];
                        for token in &per_token {
                            map.iter_mut().zip(token).for_each(|(m, v)| *m += v);
                        }
                        map.iter_mut().for_each(|m| *m /= words.max(1) as f32);
                        let tokens = per_token
                            .into_iter()
                            .enumerate()
                            .map(|(k, values)| Ok((self.text_processor.token_text(id_rows[j][k + 1])?, values)))
                            .collect::<Result<Vec<_>>>()?;
                        debug_assert!(t >= words + 2);
                        Ok(GradCam { text: texts[j].to_string(), grid, map, tokens, itm: itm[j] })
                    })
                    .collect()
            })
            .collect()
    }
}
