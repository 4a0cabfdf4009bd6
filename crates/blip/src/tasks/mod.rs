//! What users ask of a checkpoint, end to end: images and text in, typed results out. The CLI
//! (and later a server) is a thin layer over these. One entry point per task:
//! [`caption::Captioner`], [`vqa::QuestionAnswerer`], [`matching::ImageTextMatcher`] (match,
//! embed, classify).

pub mod caption;
pub mod matching;
pub mod vqa;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, BlipConfig};
use crate::error::{Error, Result};
use crate::generation::Generated;
use crate::processor::image::{ImageProcessor, ResizeBackend};
use crate::processor::text::TextProcessor;

/// A loaded checkpoint of one task: its model, config and processors. The task's own methods
/// are on the aliases [`caption::Captioner`], [`vqa::QuestionAnswerer`] and
/// [`matching::ImageTextMatcher`].
pub struct Task<M> {
    model: M,
    architecture: Architecture,
    config: BlipConfig,
    image_processor: ImageProcessor,
    text_processor: TextProcessor,
    device: Device,
}

/// A task's model: the architectures it serves and how it is built from their weights.
pub trait TaskModel: Sized {
    /// The accepted architectures, the first assumed when a config names none.
    const ACCEPTS: &'static [Architecture];
    /// The task, as refusals name it ("question answering").
    const TASK: &'static str;
    /// A public checkpoint that fits the task.
    const EXAMPLE: &'static str;

    fn build(config: &BlipConfig, architecture: Architecture, weights: VarBuilder) -> candle_core::Result<Self>;
}

impl<M: TaskModel> Task<M> {
    /// Loads a local folder or Hub repo id (see [`Checkpoint::locate`]) with f32 weights.
    pub fn load(model: &str, device: &Device) -> Result<Self> {
        Self::load_with_dtype(model, device, DType::F32)
    }

    /// Loads with the weight matrices held in `dtype` (f32, bf16 or f16), whatever the
    /// checkpoint stores. Activations and sums stay f32: bf16/f16 halve the memory and the
    /// weight traffic, at the cost of rounding the weights.
    pub fn load_with_dtype(model: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::locate(model)?, device, dtype)
    }

    pub fn from_checkpoint(checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::checkpoint(
                &checkpoint.location,
                format!("cannot hold weights in {dtype:?}: use f32, bf16 or f16"),
            ));
        }
        let loaded = load(checkpoint, M::ACCEPTS, M::TASK, M::EXAMPLE, device, dtype)?;
        let architecture = loaded.architecture;
        let model = M::build(&loaded.config, architecture, loaded.weights).map_err(|e| {
            Error::checkpoint(
                &checkpoint.location,
                format!("weights do not fit a {} model: {e}", architecture.class_name()),
            )
        })?;
        Ok(Self {
            model,
            architecture,
            config: loaded.config,
            image_processor: loaded.image_processor,
            text_processor: loaded.text_processor,
            device: device.clone(),
        })
    }
}

impl<M> Task<M> {
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The checkpoint's architecture (or the task's, when its config names none).
    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    pub fn config(&self) -> &BlipConfig {
        &self.config
    }

    pub fn image_processor(&self) -> &ImageProcessor {
        &self.image_processor
    }

    pub fn text_processor(&self) -> &TextProcessor {
        &self.text_processor
    }

    /// Chooses the resize of transformers 5 (torchvision, default) or 4 (PIL).
    pub fn set_resize_backend(&mut self, backend: ResizeBackend) {
        self.image_processor.backend = backend;
    }

    /// A generated sequence with its decoded text.
    fn decode_generated(&self, generated: Generated) -> Result<GeneratedText> {
        Ok(GeneratedText {
            text: self.text_processor.decode(&generated.tokens)?,
            score: generated.score,
            log_prob: generated.log_prob,
            tokens: generated.tokens,
        })
    }
}

/// A generated text (caption or answer) with its tokens and scores.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    pub text: String,
    /// The whole sequence, as transformers' `generate` returns it.
    pub tokens: Vec<u32>,
    /// Ranking score: the beam score for beam search, else the mean log-probability of the
    /// generated tokens (see [`Generated`]).
    pub score: f32,
    /// Sum of the model's log-probabilities of the generated tokens.
    pub log_prob: f32,
}

/// What every task loads from a checkpoint before building its model.
struct Loaded<'a> {
    config: BlipConfig,
    /// The declared architecture, or the task's first when the config names none.
    architecture: Architecture,
    image_processor: ImageProcessor,
    text_processor: TextProcessor,
    weights: VarBuilder<'a>,
}

/// Reads a checkpoint's config, refusing architectures the task cannot use before anything
/// else is fetched, then its processors and weights. `task` names the task in messages
/// ("question answering"), `example` a checkpoint that fits it.
fn load<'a>(
    checkpoint: &Checkpoint,
    accepted: &[Architecture],
    task: &str,
    example: &str,
    device: &Device,
    dtype: DType,
) -> Result<Loaded<'a>> {
    let location = &checkpoint.location;
    let config = BlipConfig::from_file(&checkpoint.config_file()?)?;
    let architecture = match config.architecture() {
        None => accepted[0],
        Some(Ok(arch)) if accepted.contains(&arch) => arch,
        Some(Ok(other)) => {
            let wanted = accepted.iter().map(|a| a.class_name()).collect::<Vec<_>>().join(" or ");
            return Err(Error::checkpoint(
                location,
                format!(
                    "is a {} checkpoint ({}); {task} needs a {wanted} checkpoint such as {example}",
                    other.class_name(),
                    other.use_with()
                ),
            ));
        }
        Some(Err(name)) => {
            return Err(Error::checkpoint(location, format!("architecture {name} is not a BLIP model")));
        }
    };
    let image_processor = match checkpoint.preprocessor_config_file()? {
        Some(path) => ImageProcessor::from_file(&path)?,
        None => ImageProcessor::default(),
    };
    let image_size = config.vision_config.image_size;
    if (image_processor.height, image_processor.width) != (image_size, image_size) {
        return Err(Error::checkpoint(
            location,
            format!(
                "preprocessor size {}x{} differs from the vision model's image_size {image_size}; resized position embeddings are not supported",
                image_processor.height, image_processor.width
            ),
        ));
    }
    let text_processor = TextProcessor::from_file(&checkpoint.tokenizer_file()?, &config.text_config)?;
    let weights = checkpoint.var_builder(dtype, device)?;
    Ok(Loaded { config, architecture, image_processor, text_processor, weights })
}
