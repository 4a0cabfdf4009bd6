//! BLIP (Salesforce's Bootstrapping Language-Image Pre-training) in Rust, giving the same outputs
//! as Hugging Face transformers' `models/blip` on the public checkpoints.
//!
//! The modules follow the pipeline: [`config`] and [`checkpoint`] load a model as the Hub
//! publishes it, [`processor`] turns image files and text into model inputs, [`models`] holds the
//! networks, [`generation`] decodes, and [`tasks`] ties them into what users ask for.
//!
//! ```no_run
//! use blip::{load_image, Captioner, ClassifyOptions, Device, ImageTextMatcher, QuestionAnswerer};
//!
//! # fn main() -> blip::Result<()> {
//! let images = vec![load_image(std::path::Path::new("cat.jpg"))?];
//! let captioner = Captioner::load(Captioner::DEFAULT_MODEL, &Device::Cpu)?;
//! let mut options = captioner.default_options(); // transformers' generate defaults
//! options.generation.num_beams = 3;
//! let captions = captioner.caption(&images, &options)?; // per image: captions best first
//! let vqa = QuestionAnswerer::load(QuestionAnswerer::DEFAULT_MODEL, &Device::Cpu)?;
//! let answers = vqa.answer(&images, &["how many cats are there?"], &vqa.default_options())?;
//! let matcher = ImageTextMatcher::load(ImageTextMatcher::DEFAULT_MODEL, &Device::Cpu)?;
//! let scores = matcher.match_texts(&images, &["a cat on a sofa", "a rocket"])?; // [image][text]: itm, itc
//! let image_embeds = matcher.embed_images(&images)?; // [n, 256], unit norm
//! let labels = matcher.classify(&images, &["cat", "dog"], &ClassifyOptions::default())?;
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
mod kernels;
pub mod models;
pub mod ops;
pub mod processor;
pub mod tasks;
pub mod training;

pub use candle_core::{DType, Device, Tensor};
pub use checkpoint::Checkpoint;
pub use config::Architecture;
pub use error::{Error, InvalidInput, Param, Result};
pub use generation::{EarlyStopping, GenerationOptions, GenerationOverrides};
pub use image::RgbImage;
pub use kernels::{bf16_products_in_bf16, compute_paths};
pub use processor::image::{load_image, load_image_from_memory, ImageSource, ResizeBackend, UrlLimits};
pub use tasks::capfilt::{capfilt, CapFiltOptions, Filtered, FilteredText, TextSource};
pub use tasks::caption::{Caption, CaptionOptions, Captioner, Prompt};
pub use tasks::gradcam::GradCam;
pub use tasks::matching::{ClassifyOptions, ImageTextMatcher, LabelScore, MatchScore};
pub use tasks::run::GenerationRun;
pub use tasks::vqa::{Answer, AnswerList, AnswerOptions, QuestionAnswerer, RankOptions, RankedAnswer};
pub use tasks::{GeneratedText, Images, Task, TaskModel};
