//! Finding a checkpoint's files — a local folder or a Hub repo id fetched into the standard
//! Hugging Face cache — and opening its weights in whichever format the Hub publishes.

use std::path::{Path, PathBuf};

pub(crate) mod weights;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::processor::image::ImageProcessor;

/// Weight files, in the order of preference transformers uses.
#[derive(Debug, Clone)]
pub enum WeightFiles {
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    Safetensors(Vec<PathBuf>),
    /// `pytorch_model.bin` (the PyTorch zip/pickle format).
    PyTorch(PathBuf),
}

/// A checkpoint: a local folder or a Hub repo. Files are fetched when asked for, so that a
/// wrong kind of checkpoint is refused from its config before any weights are downloaded.
pub struct Checkpoint {
    /// What the user named (folder or repo id), for messages.
    pub location: String,
    source: Source,
}

enum Source {
    Dir(PathBuf),
    Hub(Box<Hub>),
}

const CONFIG: &str = "config.json";
const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
const PROCESSOR_CONFIG: &str = "processor_config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH: &str = "pytorch_model.bin";
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "vocab.txt"];

impl Checkpoint {
    /// A path to an existing folder is used as it is; anything else is taken as a Hub repo id.
    pub fn locate(model: &str) -> Result<Self> {
        let path = Path::new(model);
        let source = if path.is_dir() {
            Source::Dir(path.to_path_buf())
        } else if looks_like_repo_id(model) {
            Source::Hub(Box::new(Hub::new(model)?))
        } else {
            return Err(Error::checkpoint(model, "no such folder, and not a Hub repo id of the form owner/name"));
        };
        Ok(Self { location: model.to_string(), source })
    }

    /// `config.json` (downloaded if needed).
    pub fn config_file(&self) -> Result<PathBuf> {
        self.require(CONFIG)
    }

    /// The image processor's settings, where transformers reads them: `preprocessor_config.json`,
    /// or (as transformers 5's `save_pretrained` writes them) the `image_processor` entry of
    /// `processor_config.json`. A checkpoint with neither is refused, as transformers does:
    /// default settings could silently give other pixels.
    pub fn image_processor(&self) -> Result<ImageProcessor> {
        if let Some(path) = self.first_of(&[PREPROCESSOR_CONFIG])? {
            return ImageProcessor::from_file(&path);
        }
        if let Some(path) = self.first_of(&[PROCESSOR_CONFIG])? {
            if let Some(processor) = ImageProcessor::from_processor_config(&path)? {
                return Ok(processor);
            }
        }
        Err(self.missing(format!(
            "no image processor settings: neither {PREPROCESSOR_CONFIG} nor an \"image_processor\" entry in {PROCESSOR_CONFIG}; save the processor with the model (BlipProcessor.save_pretrained) or copy {PREPROCESSOR_CONFIG} from the checkpoint it was fine-tuned from"
        )))
    }

    /// `generation_config.json`, when the checkpoint has one (see `tasks::GenerationDefaults`).
    pub fn generation_config_file(&self) -> Result<Option<PathBuf>> {
        self.first_of(&[GENERATION_CONFIG])
    }

    /// `tokenizer.json`, or failing that `vocab.txt`.
    pub fn tokenizer_file(&self) -> Result<PathBuf> {
        self.first_of(&TOKENIZER_FILES)?
            .ok_or_else(|| self.missing("no tokenizer.json or vocab.txt in the checkpoint".into()))
    }

    /// The weight files, in transformers' order of preference.
    pub fn weight_files(&self) -> Result<WeightFiles> {
        if let Some(file) = self.first_of(&[SAFETENSORS])? {
            return Ok(WeightFiles::Safetensors(vec![file]));
        }
        if let Some(index) = self.first_of(&[SAFETENSORS_INDEX])? {
            let shards = shard_names(&index)?.iter().map(|name| self.require(name)).collect::<Result<_>>()?;
            return Ok(WeightFiles::Safetensors(shards));
        }
        if let Some(file) = self.first_of(&[PYTORCH])? {
            return Ok(WeightFiles::PyTorch(file));
        }
        Err(self
            .missing(format!("no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH} in the checkpoint")))
    }

    /// Opens the weights (read tensor by tensor when the model is built), converting what is
    /// stored to `dtype` (the models ask for f32 where they keep small tensors in f32).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let weights = self.weight_reader()?;
        Ok(VarBuilder::from_backend(Box::new(weights), dtype, device.clone()))
    }

    /// The weight files opened for reading tensor by tensor.
    pub(crate) fn weight_reader(&self) -> Result<weights::WeightReader> {
        let opened = match self.weight_files()? {
            WeightFiles::Safetensors(files) => weights::WeightReader::open_safetensors(&files),
            WeightFiles::PyTorch(file) => weights::WeightReader::open_pytorch(&file),
        };
        opened.map_err(|e| Error::checkpoint(&self.location, format!("cannot read the weights: {e}")))
    }

    /// A file of the checkpoint, when it has one (fetched from the Hub if needed).
    pub(crate) fn optional_file(&self, name: &str) -> Result<Option<PathBuf>> {
        self.first_of(&[name])
    }

    fn require(&self, file: &str) -> Result<PathBuf> {
        self.first_of(&[file])?.ok_or_else(|| self.missing(format!("no {file} in the checkpoint")))
    }

    /// An error for a missing file, saying where it was looked for when that was only the cache.
    fn missing(&self, what: String) -> Error {
        match &self.source {
            Source::Hub(hub) if hub.online.is_none() => {
                Error::checkpoint(&self.location, format!("{what} (offline: only the Hugging Face cache was searched)"))
            }
            _ => Error::checkpoint(&self.location, what),
        }
    }

    /// The first of `files` the checkpoint has (downloading it from the Hub if needed).
    fn first_of(&self, files: &[&str]) -> Result<Option<PathBuf>> {
        match &self.source {
            Source::Dir(dir) => Ok(files.iter().map(|f| dir.join(f)).find(|p| p.is_file())),
            Source::Hub(hub) => hub.first_of(files),
        }
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The distinct shard file names of a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::config(index, e))?;
    let index_json: Index =
        serde_json::from_str(&text).map_err(|e| Error::config(index, format!("bad shard index: {e}")))?;
    let mut names: Vec<String> = index_json.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// One Hub repo, reached online or through the cache only.
struct Hub {
    repo_id: String,
    cache: hf_hub::CacheRepo,
    online: Option<(hf_hub::api::sync::ApiRepo, Vec<String>)>,
}

impl Hub {
    fn new(repo_id: &str) -> Result<Self> {
        let cache = hf_hub::Cache::from_env().model(repo_id.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"));
        if offline {
            return Ok(Self { repo_id: repo_id.into(), cache, online: None });
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .map_err(|e| Error::checkpoint(repo_id, format!("cannot set up the Hub client: {e}")))?;
        let repo = api.model(repo_id.to_string());
        match repo.info() {
            Ok(info) => {
                let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
                Ok(Self { repo_id: repo_id.into(), cache, online: Some((repo, files)) })
            }
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(401 | 404, _)) => {
                Err(Error::checkpoint(repo_id, "no such model on the Hub (or it is private: set HF_TOKEN)"))
            }
            // Unreachable Hub: fall back to what the cache holds, as transformers does.
            Err(_) => Ok(Self { repo_id: repo_id.into(), cache, online: None }),
        }
    }

    /// The first of `files` the repo has, downloaded if needed; `None` if it has none of them.
    fn first_of(&self, files: &[&str]) -> Result<Option<PathBuf>> {
        match &self.online {
            Some((repo, listing)) => {
                let Some(file) = files.iter().find(|f| listing.iter().any(|l| l == *f)) else { return Ok(None) };
                repo.get(file)
                    .map(Some)
                    .map_err(|e| Error::checkpoint(&self.repo_id, format!("downloading {file} failed: {e}")))
            }
            None => {
                if let Some(found) = files.iter().find_map(|f| self.cache.get(f)) {
                    return Ok(Some(found));
                }
                if self.cache.get(CONFIG).is_some() {
                    return Ok(None);
                }
                Err(Error::checkpoint(
                    &self.repo_id,
                    format!(
                        "not in the Hugging Face cache ({}) and the Hub is not reachable (HF_HUB_OFFLINE or no network): download it once online, or use a local folder instead",
                        hf_hub::Cache::from_env().path().display()
                    ),
                ))
            }
        }
    }
}
