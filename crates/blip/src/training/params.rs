//! The trained weights: every checkpoint tensor the model reads that the run trains becomes a
//! candle [`Var`], recorded under its checkpoint name, so that gradients, the optimizer and the
//! saved checkpoint address weights as transformers names them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::checkpoint::weights::WeightReader;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Which of a checkpoint's tensors a run trains, by name.
pub type TrainsFn = dyn Fn(&str) -> bool + Send + Sync;

/// The trained variables of a model, in the order the model read them, with the names of
/// checkpoint tensors that are the same weight as another (tied).
pub struct Params {
    vars: Vec<(String, Var)>,
    /// (tied name, name of the variable it is)
    ties: Vec<(String, String)>,
    /// The checkpoint the weights came from: what is not trained is saved as it is there.
    source: WeightReader,
}

/// Reads tensors from the checkpoint in f32, making the trained ones variables.
struct Recording {
    reader: Arc<WeightReader>,
    trains: Arc<TrainsFn>,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.reader.get(shape, name, init, dtype, dev)?;
        if dtype != DType::F32 || !(self.trains)(name) {
            return Ok(tensor);
        }
        let var = Var::from_tensor(&tensor)?;
        self.vars.lock().unwrap_or_else(PoisonError::into_inner).push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.reader.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.reader.contains_tensor(name)
    }
}

/// Opens `checkpoint`'s weights in f32 for training; the builder hands out variables for the
/// tensors `trains` accepts, and [`Recorded::finish`] collects them once the model is built.
pub(crate) fn open(
    checkpoint: &Checkpoint,
    device: &Device,
    trains: Arc<TrainsFn>,
) -> Result<(VarBuilder<'static>, Recorded)> {
    let reader = Arc::new(checkpoint.weight_reader()?);
    let vars = Arc::new(Mutex::new(Vec::new()));
    let backend = Recording { reader: reader.clone(), trains, vars: vars.clone() };
    let builder = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    Ok((builder, Recorded { vars, source: checkpoint.weight_reader()? }))
}

/// What [`open`]'s builder recorded.
pub(crate) struct Recorded {
    vars: Arc<Mutex<Vec<(String, Var)>>>,
    source: WeightReader,
}

impl Recorded {
    /// The variables the model holds. `ties` are pairs of checkpoint names (name, the name of
    /// the weight it is), as the model reports them: a tied name's own variable, where one was
    /// read, is dropped (the model holds the other), and saving writes the weight under both.
    pub(crate) fn finish(self, ties: Vec<(String, String)>) -> Params {
        let mut vars = std::mem::take(&mut *self.vars.lock().unwrap_or_else(PoisonError::into_inner));
        let ties: Vec<(String, String)> =
            ties.into_iter().filter(|(_, target)| vars.iter().any(|(name, _)| name == target)).collect();
        vars.retain(|(name, _)| !ties.iter().any(|(tied, _)| tied == name));
        Params { vars, ties, source: self.source }
    }
}

impl Params {
    /// The trained variables by checkpoint name, in the order the model reads them.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The number of trained values.
    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, var)| var.elem_count()).sum()
    }

    /// The trained variable of a checkpoint name (or of the name it is tied to).
    pub fn get(&self, name: &str) -> Option<&Var> {
        let name = self.ties.iter().find(|(tied, _)| tied == name).map_or(name, |(_, target)| target.as_str());
        self.vars.iter().find(|(n, _)| n == name).map(|(_, var)| var)
    }

    /// Every tensor of the source checkpoint, the trained ones (and those tied to them) with
    /// their current values, the others as the checkpoint stores them.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = HashMap::new();
        for name in self.source.names() {
            let tensor = match self.get(name) {
                Some(var) => var.as_tensor().detach(),
                None => self.source.load(name)?,
            };
            state.insert(name.to_string(), tensor);
        }
        Ok(state)
    }

    /// Writes [`Self::state_dict`] as `model.safetensors` in `dir`, through a temporary file
    /// renamed into place (an interrupted save leaves the previous file whole).
    pub fn save_safetensors(&self, dir: &Path) -> Result<()> {
        let state = self.state_dict()?;
        let path = dir.join("model.safetensors");
        let partial = dir.join(".model.safetensors.partial");
        let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
        safetensors::serialize_to_file(state.iter().map(|(k, v)| (k.as_str(), v)), metadata, &partial)
            .map_err(|e| Error::file(&partial, e))?;
        std::fs::rename(&partial, &path).map_err(|e| Error::file(&path, e))?;
        Ok(())
    }
}
