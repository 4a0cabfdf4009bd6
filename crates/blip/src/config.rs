//! `config.json` of a BLIP checkpoint, with transformers' defaults for every field the published
//! files leave out (they are transformers 4.26 dumps; some omit `encoder_hidden_size`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The text transformer (BERT without token types), `BlipTextConfig` in transformers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the states cross-attention reads; always the vision width (see [`BlipConfig`]).
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub bos_token_id: u32,
    pub pad_token_id: u32,
    pub sep_token_id: u32,
    pub label_smoothing: f64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            pad_token_id: 0,
            sep_token_id: 102,
            label_smoothing: 0.0,
        }
    }
}

/// The ViT image encoder, `BlipVisionConfig` in transformers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 384,
            patch_size: 16,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Patches per side of the (square) input image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The model classes of `transformers.models.blip` a checkpoint can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// Captioning: `BlipForConditionalGeneration`.
    ConditionalGeneration,
    /// Visual question answering: `BlipForQuestionAnswering`.
    QuestionAnswering,
    /// Image-text matching and similarity: `BlipForImageTextRetrieval`.
    ImageTextRetrieval,
    /// Contrastive image and text features: `BlipModel`.
    Model,
}

impl Architecture {
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::ConditionalGeneration => "BlipForConditionalGeneration",
            Architecture::QuestionAnswering => "BlipForQuestionAnswering",
            Architecture::ImageTextRetrieval => "BlipForImageTextRetrieval",
            Architecture::Model => "BlipModel",
        }
    }

    fn from_class_name(name: &str) -> Option<Self> {
        [Self::ConditionalGeneration, Self::QuestionAnswering, Self::ImageTextRetrieval, Self::Model]
            .into_iter()
            .find(|a| a.class_name() == name)
    }
}

/// The whole `config.json` (`BlipConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BlipConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
    pub image_text_hidden_size: usize,
    pub logit_scale_init_value: f64,
}

impl Default for BlipConfig {
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: None,
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
            image_text_hidden_size: 256,
            logit_scale_init_value: 2.6592,
        }
    }
}

impl BlipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::config(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks a config; `path` only names the file in errors.
    pub fn from_json_str(json: &str, path: &Path) -> Result<Self> {
        let mut config: BlipConfig =
            serde_json::from_str(json).map_err(|e| Error::config(path, format!("not a BLIP config.json: {e}")))?;
        if let Some(model_type) = &config.model_type {
            if model_type != "blip" {
                return Err(Error::config(
                    path,
                    format!("model_type is \"{model_type}\", not \"blip\": this is not a BLIP checkpoint"),
                ));
            }
        }
        // `BlipConfig.__init__` overwrites it: cross-attention always reads the vision states.
        config.text_config.encoder_hidden_size = config.vision_config.hidden_size;
        config.validate().map_err(|reason| Error::config(path, reason))?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (t, v) = (&self.text_config, &self.vision_config);
        for (what, hidden, heads) in [
            ("text_config", t.hidden_size, t.num_attention_heads),
            ("vision_config", v.hidden_size, v.num_attention_heads),
        ] {
            if heads == 0 || hidden % heads != 0 {
                return Err(format!("{what}.hidden_size {hidden} is not divisible by num_attention_heads {heads}"));
            }
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        for (what, act) in [("text_config", &t.hidden_act), ("vision_config", &v.hidden_act)] {
            if act != "gelu" {
                return Err(format!("{what}.hidden_act \"{act}\" is not supported (BLIP uses \"gelu\")"));
            }
        }
        Ok(())
    }

    /// The architecture the checkpoint declares (`architectures[0]`); `None` when the config
    /// names none, which the task then assumes.
    pub fn architecture(&self) -> Option<std::result::Result<Architecture, String>> {
        let name = self.architectures.as_ref()?.first()?;
        Some(Architecture::from_class_name(name).ok_or_else(|| name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_transformers_defaults() {
        let c = BlipConfig::from_json_str("{}", Path::new("config.json")).unwrap();
        assert_eq!(c.text_config.num_attention_heads, 8);
        assert_eq!(c.text_config.encoder_hidden_size, 768);
        assert_eq!(c.vision_config.image_size, 384);
        assert_eq!(c.architecture(), None);
    }

    #[test]
    fn rejects_other_model_types() {
        let err = BlipConfig::from_json_str(r#"{"model_type": "clip"}"#, Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("not a BLIP checkpoint"), "{err}");
    }
}
