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
use crate::processor::image::ImageProcessor;
use crate::processor::text::TextProcessor;

/// What every task loads from a checkpoint before building its model.
pub(crate) struct Loaded<'a> {
    pub config: BlipConfig,
    /// The declared architecture, or the task's first when the config names none.
    pub architecture: Architecture,
    pub image_processor: ImageProcessor,
    pub text_processor: TextProcessor,
    pub weights: VarBuilder<'a>,
}

/// Reads a checkpoint's config, refusing architectures the task cannot use before anything
/// else is fetched, then its processors and weights. `task` names the task in messages
/// ("question answering"), `example` a checkpoint that fits it.
pub(crate) fn load<'a>(
    checkpoint: &Checkpoint,
    accepted: &[Architecture],
    task: &str,
    example: &str,
    device: &Device,
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
    let weights = checkpoint.var_builder(DType::F32, device)?;
    Ok(Loaded { config, architecture, image_processor, text_processor, weights })
}

/// The error for weights that do not fit the declared model.
pub(crate) fn weights_error(checkpoint: &Checkpoint, architecture: Architecture, err: candle_core::Error) -> Error {
    Error::checkpoint(&checkpoint.location, format!("weights do not fit a {} model: {err}", architecture.class_name()))
}
