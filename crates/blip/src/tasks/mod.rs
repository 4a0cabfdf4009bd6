//! What users ask of a checkpoint, end to end: images and text in, typed results out. The CLI
//! (and later a server) is a thin layer over these. One entry point per task:
//! [`caption::Captioner`], [`vqa::QuestionAnswerer`], [`matching::ImageTextMatcher`] (match,
//! embed, classify).

pub mod capfilt;
pub mod caption;
pub mod gradcam;
pub mod loss;
pub mod matching;
pub mod run;
pub mod vqa;

use std::borrow::Cow;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, BlipConfig};
use crate::error::{Error, InvalidInput, Param, Result};
use crate::generation::{config::GenerationConfigFile, GenerationOptions};
use crate::processor::image::{ImageProcessor, ResizeBackend};
use crate::processor::text::TextProcessor;

/// The public checkpoint each task loads when none is named, and suggests when given a
/// checkpoint of another kind.
pub const DEFAULT_CAPTION_MODEL: &str = "Salesforce/blip-image-captioning-base";
/// See [`DEFAULT_CAPTION_MODEL`].
pub const DEFAULT_VQA_MODEL: &str = "Salesforce/blip-vqa-base";
/// See [`DEFAULT_CAPTION_MODEL`].
pub const DEFAULT_MATCHING_MODEL: &str = "Salesforce/blip-itm-base-coco";

/// A loaded checkpoint of one task: its model, config and processors. The task's own methods
/// are on the aliases [`caption::Captioner`], [`vqa::QuestionAnswerer`] and
/// [`matching::ImageTextMatcher`].
pub struct Task<M> {
    model: M,
    architecture: Architecture,
    config: BlipConfig,
    image_processor: ImageProcessor,
    text_processor: TextProcessor,
    /// `generate`'s defaults for this checkpoint.
    generation: GenerationDefaults,
    device: Device,
}

/// A task's model: the architectures it serves and how it is built from their weights.
pub trait TaskModel: Sized {
    /// The accepted architectures, the first assumed when a config names none.
    const ACCEPTS: &'static [Architecture];
    /// The task, as refusals name it ("question answering").
    const TASK: &'static str;
    /// The public checkpoint loaded when none is named.
    const DEFAULT_MODEL: &'static str;
    /// Whether the task generates text (and so reads `generation_config.json`).
    const GENERATES: bool = true;
    /// `generate`'s defaults before a checkpoint's `generation_config.json` (for the tasks that
    /// generate).
    fn default_generation() -> GenerationOptions {
        GenerationOptions::default()
    }

    fn build(config: &BlipConfig, architecture: Architecture, weights: VarBuilder) -> candle_core::Result<Self>;
}

/// The images of a request: decoded images, or `pixel_values` [b, 3, H, W] already made by the
/// checkpoint's image processor.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Images<'a> {
    Decoded(&'a [RgbImage]),
    Pixels(&'a Tensor),
}

impl Images<'_> {
    /// How many images.
    pub fn len(&self) -> Result<usize> {
        Ok(match self {
            Images::Decoded(images) => images.len(),
            Images::Pixels(pixel_values) => pixel_values.dim(0)?,
        })
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl<'a> From<&'a [RgbImage]> for Images<'a> {
    fn from(images: &'a [RgbImage]) -> Self {
        Images::Decoded(images)
    }
}

impl<'a> From<&'a Vec<RgbImage>> for Images<'a> {
    fn from(images: &'a Vec<RgbImage>) -> Self {
        Images::Decoded(images)
    }
}

impl<'a, const N: usize> From<&'a [RgbImage; N]> for Images<'a> {
    fn from(images: &'a [RgbImage; N]) -> Self {
        Images::Decoded(images)
    }
}

impl<'a> From<&'a Tensor> for Images<'a> {
    fn from(pixel_values: &'a Tensor) -> Self {
        Images::Pixels(pixel_values)
    }
}

impl<M: TaskModel> Task<M> {
    /// The public checkpoint loaded when none is named.
    pub const DEFAULT_MODEL: &'static str = M::DEFAULT_MODEL;

    /// transformers' `generate` defaults for this task (what `default_options` holds).
    pub fn default_generation() -> GenerationOptions {
        M::default_generation()
    }

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

    /// Reads the config first, refusing an architecture the task cannot use before anything
    /// else is fetched, then the processors, the generation defaults and the weights.
    pub fn from_checkpoint(checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            let reason = format!("cannot hold weights in {dtype:?}: use f32, bf16 or f16");
            return Err(Error::checkpoint(&checkpoint.location, reason));
        }
        Self::from_checkpoint_with(checkpoint, device, || checkpoint.var_builder(dtype, device))
    }

    /// [`Self::from_checkpoint`] with the weights opened by `weights` once everything else has
    /// been read and checked (training opens them as trained variables).
    pub(crate) fn from_checkpoint_with(
        checkpoint: &Checkpoint,
        device: &Device,
        weights: impl FnOnce() -> Result<VarBuilder<'static>>,
    ) -> Result<Self> {
        let location = &checkpoint.location;
        let (config, architecture) = Self::read_config(checkpoint)?;
        let generation = Self::generation_defaults(checkpoint)?;
        let image_processor = checkpoint.image_processor()?;
        // A processor size other than the vision model's image_size is the resolution the
        // checkpoint runs at, the position embeddings interpolated (see `set_image_size`).
        check_image_size(&config, image_processor.height)
            .and(check_image_size(&config, image_processor.width))
            .map_err(|e| Error::checkpoint(location, format!("the image processor's size: {e}")))?;
        let text_processor = TextProcessor::from_file(&checkpoint.tokenizer_file()?, &config.text_config)?;
        let weights = weights()?;
        let model = M::build(&config, architecture, weights).map_err(|e| {
            Error::checkpoint(location, format!("weights do not fit a {} model: {e}", architecture.class_name()))
        })?;
        Ok(Self { model, architecture, config, image_processor, text_processor, generation, device: device.clone() })
    }

    /// `generate`'s defaults for a checkpoint of this task, read without loading its weights
    /// (so that options can be checked against them first). A `generation_config.json` that
    /// does not parse is an error; what it asks for is only checked when it is used
    /// ([`GenerationDefaults::saved`]), since transformers does not apply it.
    pub fn generation_defaults(checkpoint: &Checkpoint) -> Result<GenerationDefaults> {
        Self::read_config(checkpoint)?;
        let transformers = M::default_generation();
        let saved = match checkpoint.generation_config_file()? {
            Some(path) if M::GENERATES => {
                let file = GenerationConfigFile::from_file(&path)?;
                let mut saved = transformers.clone();
                // Unprompted, the decoder starts from bos alone: max_length counts it.
                Some(file.apply(&mut saved, 1).map(|()| saved).map_err(|reason| (path, reason)))
            }
            _ => None,
        };
        Ok(GenerationDefaults { transformers, saved })
    }

    /// The checkpoint's config and the architecture the task runs it as.
    fn read_config(checkpoint: &Checkpoint) -> Result<(BlipConfig, Architecture)> {
        let config = BlipConfig::from_file(&checkpoint.config_file()?)?;
        let architecture = match config.architecture() {
            None => M::ACCEPTS[0],
            Some(Ok(arch)) if M::ACCEPTS.contains(&arch) => arch,
            Some(Ok(found)) => {
                return Err(Error::WrongArchitecture {
                    location: checkpoint.location.clone(),
                    found,
                    task: M::TASK,
                    wanted: M::ACCEPTS,
                    example: M::DEFAULT_MODEL,
                })
            }
            Some(Err(name)) => {
                return Err(Error::checkpoint(
                    &checkpoint.location,
                    format!("architecture {name} is not a BLIP model"),
                ));
            }
        };
        Ok((config, architecture))
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

    /// `pixel_values` of the images, made by the checkpoint's image processor unless given
    /// (then of the processor's size).
    pub fn pixel_values<'a>(&self, images: Images<'a>) -> Result<Cow<'a, Tensor>> {
        Ok(match images {
            Images::Decoded(images) => Cow::Owned(self.image_processor.preprocess_batch(images, &self.device)?),
            Images::Pixels(pixel_values) => {
                let (_, _, h, w) = pixel_values.dims4()?;
                if (h, w) != (self.image_processor.height, self.image_processor.width) {
                    return Err(InvalidInput::OutOfRange {
                        param: Param::ImageSize,
                        value: format!("pixel values of {h}x{w}"),
                        accepted: "the image processor's size (set_image_size changes it)",
                    }
                    .into());
                }
                Cow::Borrowed(pixel_values)
            }
        })
    }

    /// Runs the model on images resized to `size` × `size`, its vision position embeddings
    /// interpolated as transformers' `interpolate_pos_encoding=True` does (bicubic). `size`
    /// must be a multiple of the patch size (16).
    pub fn set_image_size(&mut self, size: usize) -> Result<()> {
        check_image_size(&self.config, size)?;
        self.image_processor.height = size;
        self.image_processor.width = size;
        Ok(())
    }

    /// The side of the square images the model runs on (the processor's size).
    pub fn image_size(&self) -> usize {
        self.image_processor.height
    }

    /// `generate`'s defaults for this checkpoint, including its `generation_config.json`.
    pub fn generation(&self) -> &GenerationDefaults {
        &self.generation
    }
}

/// Whether the vision model can run on `size`-pixel sides: whole patches, at least one.
fn check_image_size(config: &BlipConfig, size: usize) -> Result<()> {
    let patch = config.vision_config.patch_size;
    if size == 0 || size % patch != 0 {
        return Err(InvalidInput::OutOfRange {
            param: Param::ImageSize,
            value: size.to_string(),
            accepted: "a multiple of the vision model's patch size (16)",
        }
        .into());
    }
    Ok(())
}

/// `generate`'s defaults for a checkpoint.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GenerationDefaults {
    /// What transformers' BLIP `generate` starts from, and so what the tasks' `default_options`
    /// hold: its defaults (for VQA here, at most 10 new tokens).
    pub transformers: GenerationOptions,
    /// The checkpoint's `generation_config.json` over those, or why it cannot be used.
    saved: Option<std::result::Result<GenerationOptions, (PathBuf, String)>>,
}

impl GenerationDefaults {
    /// The checkpoint's `generation_config.json` over transformers' defaults, when it has one;
    /// an error when it asks for what this crate does not implement or contradicts itself.
    /// transformers' BLIP `generate` does not apply it (it calls `text_decoder.generate`, whose
    /// own config is never loaded from the file), so neither do the tasks unless a caller
    /// starts from these.
    pub fn saved(&self) -> Result<Option<&GenerationOptions>> {
        match &self.saved {
            None => Ok(None),
            Some(Ok(saved)) => Ok(Some(saved)),
            Some(Err((path, reason))) => Err(Error::config(path, reason)),
        }
    }

    /// Whether the checkpoint's `generation_config.json` asks for something other than
    /// transformers' defaults: what a caller that leaves it unused should say.
    pub fn differs(&self) -> bool {
        match &self.saved {
            None => false,
            Some(Ok(saved)) => *saved != self.transformers,
            Some(Err(_)) => true,
        }
    }
}

/// Per-image inputs (prompts, questions) must match the images in number.
fn check_count(param: Param, given: usize, images: usize) -> Result<()> {
    if given != images {
        return Err(InvalidInput::CountMismatch { param, given, images }.into());
    }
    Ok(())
}

/// Texts that must hold words (`param`: what they are): none given, or the first empty one,
/// is refused.
pub fn check_not_empty<S: AsRef<str>>(param: Param, texts: &[S]) -> Result<()> {
    if texts.is_empty() {
        return Err(InvalidInput::NoneGiven { param }.into());
    }
    match texts.iter().position(|t| t.as_ref().trim().is_empty()) {
        Some(i) => Err(InvalidInput::Empty { param, index: (texts.len() > 1).then_some(i) }.into()),
        None => Ok(()),
    }
}

/// A generated text (caption or answer) with its tokens and scores.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GeneratedText {
    pub text: String,
    /// The whole sequence, as transformers' `generate` returns it.
    pub tokens: Vec<u32>,
    /// Ranking score: the beam score for beam search, else the mean log-probability of the
    /// generated tokens (see [`Generated`](crate::generation::Generated)).
    pub score: f32,
    /// Sum of the model's log-probabilities of the generated tokens.
    pub log_prob: f32,
}

/// The tasks are shared between threads (a server's workers): they must stay `Send + Sync`.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<caption::Captioner>();
    shareable::<vqa::QuestionAnswerer>();
    shareable::<matching::ImageTextMatcher>();
    shareable::<vqa::AnswerList>();
};
