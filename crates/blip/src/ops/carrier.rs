//! How the trained weights of a one-op computation (the vision tower, the decoder's
//! cross-attention) join candle's autograd: candle's custom ops take at most three inputs, so
//! each trained weight goes through a carrier, an op whose output is a zero scalar, and the
//! carriers are summed into a link the computation takes as an input. The backward pass meets
//! the computation before any carrier (it consumes them); the computation leaves each weight's
//! gradient with its carrier, which hands it to candle as its weight's gradient.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The gradients a computation leaves for its weights' carriers, by weight.
pub(crate) type Gradients = Arc<Mutex<Vec<Option<Tensor>>>>;

/// The zero scalar that links the weights in the graph among `weights` to the computation
/// named `op`, with the slots their gradients are left in; `None` when no weight is in the graph.
pub(crate) fn link(weights: &[Tensor], op: &'static str) -> Result<(Option<Tensor>, Gradients)> {
    let gradients: Gradients = Arc::new(Mutex::new(vec![None; weights.len()]));
    let mut link: Option<Tensor> = None;
    for (index, weight) in weights.iter().enumerate().filter(|(_, w)| super::in_graph(w)) {
        let carrier = weight.apply_op1(Carrier { index, gradients: gradients.clone(), op })?;
        link = Some(match link {
            Some(sum) => (sum + carrier)?,
            None => carrier,
        });
    }
    Ok((link, gradients))
}

/// Leaves each weight's gradient (values in the weight's shape) for its carrier.
pub(crate) fn leave(gradients: &Gradients, weights: &[Tensor], values: Vec<Vec<f32>>) -> Result<()> {
    let mut slots = gradients.lock().unwrap_or_else(PoisonError::into_inner);
    for ((slot, values), weight) in slots.iter_mut().zip(values).zip(weights) {
        *slot = Some(Tensor::from_vec(values, weight.shape(), weight.device())?);
    }
    Ok(())
}

/// One weight's way into the graph: a zero scalar forward, the weight's gradient (left by the
/// computation's backward) backward.
struct Carrier {
    index: usize,
    gradients: Gradients,
    op: &'static str,
}

impl CustomOp1 for Carrier {
    fn name(&self) -> &'static str {
        "trained-weight"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _weight: &Tensor, _zero: &Tensor, _dzero: &Tensor) -> Result<Option<Tensor>> {
        let mut gradients = self.gradients.lock().unwrap_or_else(PoisonError::into_inner);
        match gradients.get_mut(self.index).and_then(Option::take) {
            Some(gradient) => Ok(Some(gradient)),
            None => candle_core::bail!("{}: a weight's gradient asked before its backward pass", self.op),
        }
    }
}
