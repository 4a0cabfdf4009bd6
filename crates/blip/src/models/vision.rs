//! The ViT image encoder (`BlipVisionModel`): patch embedding, pre-norm transformer layers,
//! post LayerNorm.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::Linear;

use super::{layer_norm, linear};
use crate::config::VisionConfig;
use crate::ops::attention::attention_packed;
use crate::ops::norm::LayerNorm;
use crate::ops::trained_vision::{self, TowerShape};
use crate::ops::{in_graph, on_cpu};

/// `BlipVisionEmbeddings`: a stride-16 conv over patches, a class token, learned positions.
struct VisionEmbeddings {
    /// The conv kernel flattened to [hidden, channels*patch*patch] (a view of the weight): with
    /// stride = kernel size the conv is one matrix product over non-overlapping patches.
    patch_weight: Tensor,
    /// Its transpose made contiguous once, for inference; none for a trained weight, whose
    /// values change (a copy would keep the old ones).
    patch_weight_t: Option<Tensor>,
    patch_bias: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
    image_size: usize,
}

impl VisionEmbeddings {
    /// Kept in f32 whatever the load dtype: the patch kernel is small and sees raw pixels.
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.to_dtype(DType::F32);
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let positions = cfg.patches_per_side().pow(2) + 1;
        let patch_weight = vb.get((d, c, p, p), "patch_embedding.weight")?.reshape((d, c * p * p))?;
        let patch_weight_t =
            if crate::ops::in_graph(&patch_weight) { None } else { Some(patch_weight.t()?.contiguous()?) };
        Ok(Self {
            patch_weight,
            patch_weight_t,
            patch_bias: vb.get(d, "patch_embedding.bias")?,
            class_embedding: vb.get((1, 1, d), "class_embedding")?,
            position_embedding: vb.get((1, positions, d), "position_embedding")?,
            patch_size: p,
            image_size: cfg.image_size,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let p = self.patch_size;
        if h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "the model takes images whose sides are multiples of its {p}-pixel patches, got {h}x{w}"
            );
        }
        let (gh, gw) = (h / p, w / p);
        // [b, c, gh, p, gw, p] → [b, gh, gw, c, p, p]: each row one patch in the conv's order.
        let patches = pixel_values.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((
            b,
            gh * gw,
            c * p * p,
        ))?;
        let patch_weight_t = match &self.patch_weight_t {
            Some(transposed) => transposed.clone(),
            None => self.patch_weight.t()?,
        };
        let patch_embeds = patches.broadcast_matmul(&patch_weight_t)?.broadcast_add(&self.patch_bias)?;
        let d = patch_embeds.dim(D::Minus1)?;
        let class = self.class_embedding.broadcast_as((b, 1, d))?;
        Tensor::cat(&[&class, &patch_embeds], 1)?.broadcast_add(&self.positions(gh, gw)?)
    }

    /// The position embeddings [1, 1 + gh·gw, hidden] of a grid of gh × gw patches: the
    /// learned ones on the checkpoint's grid, else those interpolated as transformers'
    /// `interpolate_pos_encoding=True` does (bicubic, `align_corners=False`), as one product with
    /// the interpolation's weights, so that a trained embedding gets its gradient through it.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let side = self.image_size / self.patch_size;
        if (gh, gw) == (side, side) {
            return Ok(self.position_embedding.clone());
        }
        let (_, positions, d) = self.position_embedding.dims3()?;
        let class = self.position_embedding.narrow(1, 0, 1)?;
        let patches = self.position_embedding.narrow(1, 1, positions - 1)?.reshape((positions - 1, d))?;
        let weights = bicubic_weights((side, side), (gh, gw));
        let weights = Tensor::from_vec(weights, (gh * gw, side * side), self.position_embedding.device())?;
        let interpolated = weights.matmul(&patches)?.unsqueeze(0)?;
        Tensor::cat(&[&class, &interpolated], 1)
    }
}

/// PyTorch's bicubic interpolation (`F.interpolate(mode="bicubic", align_corners=False)`, A =
/// -0.75, source indices clamped at the edges) from an `input` grid to an `output` grid, as the
/// matrix [output cells, input cells] of the weights each output takes from each input.
pub(crate) fn bicubic_weights(input: (usize, usize), output: (usize, usize)) -> Vec<f32> {
    /// Per output index along one axis: the four (clamped) source indices and their weights.
    fn axis(input: usize, output: usize) -> Vec<[(usize, f32); 4]> {
        const A: f32 = -0.75;
        let scale = input as f32 / output as f32;
        let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
        let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
        (0..output)
            .map(|i| {
                let source = scale * (i as f32 + 0.5) - 0.5;
                let floor = source.floor();
                let t = source - floor;
                let coefficients = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
                let clamp = |k: i64| k.clamp(0, input as i64 - 1) as usize;
                std::array::from_fn(|k| (clamp(floor as i64 - 1 + k as i64), coefficients[k]))
            })
            .collect()
    }
    let (rows, columns) = (axis(input.0, output.0), axis(input.1, output.1));
    let mut weights = vec![0f32; output.0 * output.1 * input.0 * input.1];
    for (y, row_taps) in rows.iter().enumerate() {
        for (x, column_taps) in columns.iter().enumerate() {
            let cell = &mut weights[(y * output.1 + x) * input.0 * input.1..][..input.0 * input.1];
            for &(source_y, wy) in row_taps {
                for &(source_x, wx) in column_taps {
                    cell[source_y * input.1 + source_x] += wy * wx;
                }
            }
        }
    }
    weights
}

/// `BlipAttention`: fused qkv projection, softmax attention, output projection.
struct VisionAttention {
    qkv: Linear,
    projection: Linear,
    heads: usize,
    scale: f64,
}

impl VisionAttention {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let head_dim = d / cfg.num_attention_heads;
        Ok(Self {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?.column_major()?,
            projection: linear(d, d, vb.pp("projection"))?.column_major()?,
            heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `residual` + attention(xs), `xs` the output of `norm` (rounded as the product takes it).
    fn forward(&self, norm: &LayerNorm, residual: &Tensor) -> Result<Tensor> {
        let xs = norm.forward_for(residual, &self.qkv)?;
        let bf16_model = self.qkv.weight().dtype() == DType::BF16;
        // rounded to bf16 by the product where it multiplies in bf16: the attention rounds q, k, v
        let qkv = self.qkv.forward_rounded(&xs)?;
        let context = attention_packed(&qkv, self.heads, self.scale, bf16_model, Some(&self.projection))?;
        self.projection.forward_residual(&context, residual)
    }
}

/// `BlipEncoderLayer` (pre-norm).
struct VisionLayer {
    self_attn: VisionAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

impl VisionLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: VisionAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            fc1: linear(d, i, vb.pp("mlp.fc1"))?.column_major()?,
            fc2: linear(i, d, vb.pp("mlp.fc2"))?.column_major()?,
            layer_norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.self_attn.forward(&self.layer_norm1, xs)?;
        let hidden = self.fc1.forward_gelu_for(&self.layer_norm2.forward_for(&xs, &self.fc1)?, &self.fc2)?;
        self.fc2.forward_residual(&hidden, &xs)
    }
}

/// `BlipVisionModel`, loaded from the `vision_model.` prefix.
pub struct VisionModel {
    embeddings: VisionEmbeddings,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
    shape: TowerShape,
}

impl VisionModel {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        let shape = TowerShape {
            heads: cfg.num_attention_heads,
            patch: cfg.patch_size,
            side: cfg.patches_per_side(),
            eps: cfg.layer_norm_eps as f32,
        };
        Ok(Self {
            embeddings: VisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            post_layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            shape,
        })
    }

    /// pixel_values [b, 3, H, W] → last_hidden_state [b, 1 + patches, hidden].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let _span = tracing::debug_span!("vision").entered();
        if let Some(weights) = self.trained_on_cpu(pixel_values) {
            return trained_vision::forward(pixel_values, weights, self.shape);
        }
        self.forward_per_op(pixel_values)
    }

    /// [`Self::forward`] op by op: inference, and training off the CPU.
    fn forward_per_op(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.post_layernorm.forward(&xs)
    }

    /// The weights in `ops::trained_vision`'s order, where the tower trains there: some weight
    /// in an autograd graph, every weight f32 and contiguous on the CPU, and f32 CPU pixels
    /// outside the graph.
    fn trained_on_cpu(&self, pixel_values: &Tensor) -> Option<Vec<Tensor>> {
        let e = &self.embeddings;
        let mut weights =
            vec![e.patch_weight.clone(), e.patch_bias.clone(), e.class_embedding.clone(), e.position_embedding.clone()];
        for layer in &self.layers {
            let attention = &layer.self_attn;
            weights.extend(layer.layer_norm1.parameters().map(Tensor::clone));
            weights.extend(
                [
                    attention.qkv.weight(),
                    attention.qkv.bias(),
                    attention.projection.weight(),
                    attention.projection.bias(),
                ]
                .map(Tensor::clone),
            );
            weights.extend(layer.layer_norm2.parameters().map(Tensor::clone));
            weights.extend(
                [layer.fc1.weight(), layer.fc1.bias(), layer.fc2.weight(), layer.fc2.bias()].map(Tensor::clone),
            );
        }
        weights.extend(self.post_layernorm.parameters().map(Tensor::clone));
        let kernels_take = |t: &Tensor| on_cpu(t) && t.dtype() == DType::F32 && t.is_contiguous();
        // the one-op tower reads every weight as the checkpoint stores it
        let as_stored = self.layers.iter().all(|layer| {
            let linears = [&layer.self_attn.qkv, &layer.self_attn.projection, &layer.fc1, &layer.fc2];
            linears.iter().all(|linear| !linear.is_column_major())
        });
        let trains = weights.iter().any(in_graph) && weights.iter().all(kernels_take) && as_stored;
        (trains && kernels_take(pixel_values) && !in_graph(pixel_values)).then_some(weights)
    }

    /// `pooler_output`: post_layernorm applied once more, to the class token of
    /// `last_hidden_state` [b, 1 + patches, hidden] → [b, hidden] (only BlipModel uses it).
    pub fn pool(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(&last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::training::{Params, Trained};
    use crate::Captioner;

    fn fixture() -> (Captioner, Params) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/train-caption");
        Captioner::load_for_training(dir, &Device::Cpu, Trained::All).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The trained tower as one op (`ops::trained_vision`) gives the per-op graph's output and
    /// every weight's gradient, on the checkpoint's grid and on a larger one (interpolated
    /// positions).
    #[test]
    fn the_one_op_tower_trains_as_the_per_op_graph() {
        let (captioner, params) = fixture();
        let vision = &captioner.model().vision_model;
        let (side, patch) = (vision.shape.side, vision.shape.patch);
        for pixels_per_side in [side * patch, (side + 2) * patch] {
            let pixels = Tensor::randn(0f32, 1.0, (2, 3, pixels_per_side, pixels_per_side), &Device::Cpu).unwrap();
            let weights = vision.trained_on_cpu(&pixels).expect("the one-op route");
            let ours = super::trained_vision::forward(&pixels, weights, vision.shape).unwrap();
            let reference = vision.forward_per_op(&pixels).unwrap();
            let upstream = Tensor::randn(0f32, 1.0, reference.shape(), &Device::Cpu).unwrap();
            assert!(max_abs(&(&ours - &reference).unwrap()) <= 1e-5 * max_abs(&reference), "outputs");
            let ours = (ours * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let reference = (reference * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let mut checked = 0;
            for (name, var) in params.vars().iter().filter(|(name, _)| name.starts_with("vision_model.")) {
                let expected =
                    reference.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no reference gradient"));
                let got = ours.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
                let diff = max_abs(&(got - expected).unwrap());
                assert!(diff <= 1e-5 * max_abs(expected), "{name} at {pixels_per_side} px: {diff:e}");
                checked += 1;
            }
            assert_eq!(checked, 4 + 12 * vision.layers.len() + 2);
        }
    }
}
