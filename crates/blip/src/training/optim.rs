//! The optimizer side of training, with PyTorch's semantics so that a run matches the same loop
//! in PyTorch: `torch.optim.AdamW` (decoupled weight decay, bias correction), transformers'
//! learning-rate schedules, and `torch.nn.utils.clip_grad_norm_`.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// `torch.optim.AdamW`'s settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// The moments of one variable.
struct Moments {
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// `torch.optim.AdamW` over a list of variables, each updated as PyTorch's single-tensor
/// implementation does (the one it runs on the CPU), in f32. Variables without a gradient are
/// skipped, as PyTorch skips parameters whose `.grad` is `None`.
pub struct AdamW {
    config: AdamWConfig,
    vars: Vec<Var>,
    moments: Vec<Option<Moments>>,
    /// Steps taken per variable (PyTorch counts per parameter).
    steps: Vec<u64>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Self {
        let n = vars.len();
        Self { config, vars, moments: (0..n).map(|_| None).collect(), steps: vec![0; n] }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The learning rate of the next step (a schedule sets it before each).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One step from `grads`, one per variable in order (`None`: the loss did not use it):
    /// `p ← p·(1 − lr·wd)`, `m ← m + (g − m)·(1 − β1)`, `v ← β2·v + (1 − β2)·g²`,
    /// `p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)`.
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.config;
        if grads.len() != self.vars.len() {
            return Err(crate::Error::Training(format!("{} gradients for {} weights", grads.len(), self.vars.len())));
        }
        for (i, (var, grad)) in self.vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let grad = grad.contiguous()?;
            let (grad_storage, grad_layout) = grad.storage_and_layout();
            let grad = crate::ops::tensor::f32_values(&grad_storage, grad_layout)?;
            let moments = self.moments[i]
                .get_or_insert_with(|| Moments { exp_avg: vec![0.0; grad.len()], exp_avg_sq: vec![0.0; grad.len()] });
            self.steps[i] += 1;
            let step = self.steps[i] as i32;
            let bias_correction1 = 1.0 - beta1.powi(step);
            let update = Update {
                grad,
                moments: std::sync::Mutex::new(moments),
                decay: (1.0 - lr * weight_decay) as f32,
                weight1: (1.0 - beta1) as f32,
                beta2: beta2 as f32,
                one_minus_beta2: (1.0 - beta2) as f32,
                bias_correction2_sqrt: (1.0 - beta2.powi(step)).sqrt() as f32,
                step_size: (lr / bias_correction1) as f32,
                eps: eps as f32,
            };
            var.as_tensor().inplace_op1(&update)?;
        }
        Ok(())
    }

    /// Per variable, its step count and moments (`exp_avg`, `exp_avg_sq`), borrowed.
    pub fn moments(&self) -> impl Iterator<Item = (u64, Option<(&[f32], &[f32])>)> {
        self.steps
            .iter()
            .zip(&self.moments)
            .map(|(&steps, m)| (steps, m.as_ref().map(|m| (m.exp_avg.as_slice(), m.exp_avg_sq.as_slice()))))
    }

    /// The optimizer's state, to resume a run exactly: per variable its step count and moments.
    pub fn state(&self) -> Result<Vec<(u64, Option<(Tensor, Tensor)>)>> {
        self.vars
            .iter()
            .zip(&self.moments)
            .zip(&self.steps)
            .map(|((var, moments), &steps)| {
                let moments = match moments {
                    Some(m) => Some((
                        Tensor::from_slice(&m.exp_avg, var.shape(), var.device())?,
                        Tensor::from_slice(&m.exp_avg_sq, var.shape(), var.device())?,
                    )),
                    None => None,
                };
                Ok((steps, moments))
            })
            .collect()
    }

    /// Restores what [`Self::state`] gave (for the same variables, in the same order).
    pub fn restore(&mut self, state: Vec<(u64, Option<(Tensor, Tensor)>)>) -> Result<()> {
        if state.len() != self.vars.len() {
            return Err(crate::Error::Training(format!(
                "optimizer state for {} weights, the model trains {}",
                state.len(),
                self.vars.len()
            )));
        }
        for (i, (steps, moments)) in state.into_iter().enumerate() {
            let expected = self.vars[i].elem_count();
            if let Some((m, v)) = &moments {
                if m.elem_count() != expected || v.elem_count() != expected {
                    return Err(crate::Error::Training(format!(
                        "optimizer state of {} and {} values for a weight of {expected}",
                        m.elem_count(),
                        v.elem_count()
                    )));
                }
            }
            self.steps[i] = steps;
            self.moments[i] = match moments {
                Some((m, v)) => {
                    Some(Moments { exp_avg: m.flatten_all()?.to_vec1()?, exp_avg_sq: v.flatten_all()?.to_vec1()? })
                }
                None => None,
            };
        }
        Ok(())
    }
}

/// One variable's AdamW update, applied in place to its values on all threads.
struct Update<'a> {
    grad: &'a [f32],
    /// In a mutex only because the op is called through `&self`.
    moments: std::sync::Mutex<&'a mut Moments>,
    decay: f32,
    weight1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    step_size: f32,
    eps: f32,
}

impl candle_core::InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let (candle_core::CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw: a contiguous f32 weight expected");
        };
        let params = &mut data[start..end];
        let mut moments = self.moments.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if params.len() != self.grad.len()
            || params.len() != moments.exp_avg.len()
            || params.len() != moments.exp_avg_sq.len()
        {
            candle_core::bail!("adamw: the gradient does not have the weight's shape");
        }
        let Moments { exp_avg, exp_avg_sq } = &mut **moments;
        params
            .par_chunks_mut(CHUNK)
            .zip(self.grad.par_chunks(CHUNK))
            .zip(exp_avg.par_chunks_mut(CHUNK))
            .zip(exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((params, grads), ms), vs)| {
                for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(ms).zip(vs) {
                    *p *= self.decay;
                    // torch.lerp with a weight below one half
                    *m += self.weight1 * (g - *m);
                    *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
                    let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
                    // torch.addcdiv: value·m, then / denom
                    *p += (-self.step_size * *m) / denom;
                }
            });
        Ok(())
    }
}

/// transformers' learning-rate schedules (`get_scheduler`), each with linear warmup from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `get_cosine_schedule_with_warmup` (half a cosine from the peak to 0).
    #[default]
    Cosine,
    /// `get_linear_schedule_with_warmup` (down to 0 at the last step).
    Linear,
    /// `get_constant_schedule_with_warmup`.
    Constant,
}

impl Schedule {
    /// The factor on the peak learning rate for the optimizer step that follows `step` earlier
    /// ones (`LambdaLR`'s `lr_lambda(step)`: with warmup, the first step's rate is 0).
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((total as f64 - step as f64) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0),
            Schedule::Cosine => {
                let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient by
/// `min(1, max_norm / (norm + 1e-6))`, where `norm` is the 2-norm of all gradients together;
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut squares = 0f32;
    for grad in grads.iter().flatten() {
        // torch: the norm of the per-tensor norms, in f32
        let norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        squares += norm * norm;
    }
    let total = squares.sqrt();
    let coefficient = (max_norm as f32 / (total + 1e-6)).min(1.0);
    // (multiplying by 1 changes nothing: skipped)
    if coefficient < 1.0 {
        for grad in grads.iter_mut() {
            if let Some(g) = grad.take() {
                *grad = Some((g * coefficient as f64)?);
            }
        }
    }
    Ok(total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        // warmup 2 of 10 steps: 0, 0.5, then the peak and down
        assert_eq!(Schedule::Cosine.factor(0, 2, 10), 0.0);
        assert_eq!(Schedule::Cosine.factor(1, 2, 10), 0.5);
        assert_eq!(Schedule::Cosine.factor(2, 2, 10), 1.0);
        assert!((Schedule::Cosine.factor(6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Linear.factor(6, 2, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(10, 2, 10), 0.0);
        assert_eq!(Schedule::Constant.factor(9, 2, 10), 1.0);
    }
}
