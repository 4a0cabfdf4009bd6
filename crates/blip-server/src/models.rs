//! The models a server holds: each `--model` loaded as the task its checkpoint's architecture
//! serves, named as requests name it, with the tasks (Inference API pipeline names) it answers.

use std::path::Path;
use std::sync::Arc;

use blip::{Architecture, Captioner, Checkpoint, Device, ImageTextMatcher, QuestionAnswerer};

use crate::metrics::Metrics;
use crate::scheduler::{Engine, Scheduler};

/// A task of the Inference API, by its pipeline name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    ImageToText,
    VisualQuestionAnswering,
    ZeroShotImageClassification,
    ImageFeatureExtraction,
    FeatureExtraction,
    ImageTextMatching,
}

impl Task {
    pub const ALL: [Task; 6] = [
        Task::ImageToText,
        Task::VisualQuestionAnswering,
        Task::ZeroShotImageClassification,
        Task::ImageFeatureExtraction,
        Task::FeatureExtraction,
        Task::ImageTextMatching,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::ImageToText => "image-to-text",
            Task::VisualQuestionAnswering => "visual-question-answering",
            Task::ZeroShotImageClassification => "zero-shot-image-classification",
            Task::ImageFeatureExtraction => "image-feature-extraction",
            Task::FeatureExtraction => "feature-extraction",
            Task::ImageTextMatching => "image-text-matching",
        }
    }

    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|task| task.name() == name)
    }
}

/// One served model.
pub struct ServedModel {
    /// What requests name it by: the Hub id, or a local folder's name.
    pub id: String,
    /// `--model` as given.
    pub location: String,
    pub engine: Engine,
    pub scheduler: Scheduler,
}

impl ServedModel {
    /// The tasks it answers, its default (`POST /models/{id}`) first.
    pub fn tasks(&self) -> Vec<Task> {
        match &self.engine {
            Engine::Caption(_) => vec![Task::ImageToText],
            Engine::Vqa(_) => vec![Task::VisualQuestionAnswering],
            Engine::Matching(matcher) if matcher.has_itm_head() => vec![
                Task::ZeroShotImageClassification,
                Task::ImageFeatureExtraction,
                Task::FeatureExtraction,
                Task::ImageTextMatching,
            ],
            Engine::Matching(_) => {
                vec![Task::ZeroShotImageClassification, Task::ImageFeatureExtraction, Task::FeatureExtraction]
            }
        }
    }

    pub fn architecture(&self) -> Architecture {
        match &self.engine {
            Engine::Caption(task) => task.architecture(),
            Engine::Vqa(task) => task.architecture(),
            Engine::Matching(task) => task.architecture(),
        }
    }
}

/// The id requests name a model by: a local folder's name, else what was given (a Hub id).
pub fn model_id(location: &str) -> String {
    let path = Path::new(location);
    match path.file_name() {
        Some(name) if path.is_dir() => name.to_string_lossy().into_owned(),
        _ => location.to_string(),
    }
}

/// How models are loaded and scheduled.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: blip::DType,
    pub max_batch_size: usize,
    pub max_queue: usize,
}

/// Loads `location` as the task its architecture serves and starts its worker.
pub fn load(location: &str, options: &LoadOptions, metrics: Arc<Metrics>) -> blip::Result<ServedModel> {
    let checkpoint = Checkpoint::locate(location)?;
    let config = blip::config::BlipConfig::from_file(&checkpoint.config_file()?)?;
    let device = Device::Cpu;
    let dtype = options.dtype;
    let engine = match config.architecture() {
        Some(Ok(Architecture::ConditionalGeneration)) | None => {
            Engine::Caption(Arc::new(Captioner::from_checkpoint(&checkpoint, &device, dtype)?))
        }
        Some(Ok(Architecture::QuestionAnswering)) => {
            Engine::Vqa(Arc::new(QuestionAnswerer::from_checkpoint(&checkpoint, &device, dtype)?))
        }
        Some(Ok(Architecture::ImageTextRetrieval | Architecture::Model)) => {
            Engine::Matching(Arc::new(ImageTextMatcher::from_checkpoint(&checkpoint, &device, dtype)?))
        }
        Some(Ok(other)) => {
            let reason = format!("{} checkpoints cannot be served", other.class_name());
            return Err(blip::Error::Checkpoint { location: location.into(), reason });
        }
        Some(Err(found)) => {
            let reason = format!("architecture {found} is not a BLIP model this server knows");
            return Err(blip::Error::Checkpoint { location: location.into(), reason });
        }
    };
    let id = model_id(location);
    let scheduler = Scheduler::start(engine.clone(), id.clone(), options.max_batch_size, options.max_queue, metrics);
    Ok(ServedModel { id, location: location.to_string(), engine, scheduler })
}
