//! Training: the model's weights as candle variables ([`Params`]), the losses of
//! [`crate::tasks::loss`] as tensors in their autograd graph, and the optimizer
//! ([`optim`]). Forward passes over trained weights take candle's differentiable ops instead of
//! this crate's kernels (see [`crate::ops`]); frozen parts keep the kernels.

pub mod data;
pub mod finetune;
pub mod optim;
pub mod params;

use std::sync::Arc;

use candle_core::Device;

pub use data::{Dataset, Example, TrainTask};
pub use finetune::{EvalReport, FinetuneOptions, Finetuner, Observer, Outcome, Position, StepReport};
pub use optim::{AdamW, AdamWConfig, Schedule};
pub use params::Params;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::models::captioning::CaptioningModel;
use crate::models::question_answering::QuestionAnsweringModel;
use crate::tasks::matching::MatchingModel;
use crate::tasks::{Task, TaskModel};

/// A model that can be trained: it names the checkpoint tensors that are the same weight.
pub trait Trainable: TaskModel {
    /// Pairs of checkpoint names (name, the name of the weight it is).
    fn ties(&self) -> Vec<(String, String)>;
}

impl Trainable for CaptioningModel {
    fn ties(&self) -> Vec<(String, String)> {
        self.text_decoder.ties("text_decoder")
    }
}

impl Trainable for QuestionAnsweringModel {
    fn ties(&self) -> Vec<(String, String)> {
        self.text_decoder.ties("text_decoder")
    }
}

impl Trainable for MatchingModel {
    fn ties(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Which weights a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Trained {
    /// Every weight.
    #[default]
    All,
    /// All but the vision model's (`vision_model.*`), which keep the inference kernels.
    FrozenVision,
}

impl Trained {
    fn trains(self, name: &str) -> bool {
        match self {
            Trained::All => true,
            Trained::FrozenVision => !name.starts_with("vision_model."),
        }
    }
}

impl<M: Trainable> Task<M> {
    /// Loads a checkpoint in f32 for training: the weights `trained` names become variables
    /// (returned as [`Params`]), whose gradients the task's `loss_tensor` methods give.
    pub fn load_for_training(model: &str, device: &Device, trained: Trained) -> Result<(Self, Params)> {
        let checkpoint = Checkpoint::locate(model)?;
        let mut recorded = None;
        let task = Self::from_checkpoint_with(&checkpoint, device, || {
            let (weights, record) = params::open(&checkpoint, device, Arc::new(move |name| trained.trains(name)))?;
            recorded = Some(record);
            Ok(weights)
        })?;
        let recorded = recorded.ok_or_else(|| crate::Error::checkpoint(&checkpoint.location, "weights not opened"))?;
        let params = recorded.finish(task.model().ties());
        Ok((task, params))
    }
}
