//! A checkpoint's `generation_config.json`: the defaults transformers' `generate` starts from
//! for that model, under the options passed explicitly.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{EarlyStopping, GenerationOptions};
use crate::error::{Error, Result};

/// The fields of `generation_config.json` that change what `generate` does. Token ids are not
/// among them: BLIP's `generate` passes its config's sep and pad ids explicitly.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct GenerationConfigFile {
    max_new_tokens: Option<usize>,
    /// Counts the prefix (bos and prompt) too.
    max_length: Option<usize>,
    min_new_tokens: Option<usize>,
    /// Counts the prefix too.
    min_length: Option<usize>,
    num_beams: Option<usize>,
    length_penalty: Option<f32>,
    early_stopping: Option<Value>,
    num_return_sequences: Option<usize>,
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    no_repeat_ngram_size: Option<usize>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// Settings this crate does not implement, with the value that means "off" (null and an empty
/// list are off too): a file that turns one on is refused rather than silently ignored.
const UNSUPPORTED: [(&str, &str); 22] = [
    ("num_beam_groups", "1"),
    ("diversity_penalty", "0.0"),
    ("penalty_alpha", "null"),
    ("typical_p", "1.0"),
    ("epsilon_cutoff", "0.0"),
    ("eta_cutoff", "0.0"),
    ("min_p", "null"),
    ("encoder_repetition_penalty", "1.0"),
    ("bad_words_ids", "null"),
    ("force_words_ids", "null"),
    ("suppress_tokens", "null"),
    ("begin_suppress_tokens", "null"),
    ("forced_bos_token_id", "null"),
    ("forced_eos_token_id", "null"),
    ("encoder_no_repeat_ngram_size", "0"),
    ("exponential_decay_length_penalty", "null"),
    ("sequence_bias", "null"),
    ("renormalize_logits", "false"),
    ("guidance_scale", "null"),
    ("stop_strings", "null"),
    ("max_time", "null"),
    ("top_h", "null"),
];

impl GenerationConfigFile {
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::config(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not a generation config: {e}")))
    }

    /// Sets `options` from the file's values, as transformers' `generate` would start from
    /// them; `prefix_len` (bos, without a prompt) turns `max_length`/`min_length` into new
    /// tokens. The refusal names the setting at fault.
    pub(crate) fn apply(&self, options: &mut GenerationOptions, prefix_len: usize) -> std::result::Result<(), String> {
        for (key, off) in UNSUPPORTED {
            if let Some(value) = self.other.get(key) {
                let off: Value = serde_json::from_str(off).expect("valid JSON");
                let is_off = value.is_null()
                    || *value == off
                    || value.as_array().is_some_and(Vec::is_empty)
                    || value.as_f64().zip(off.as_f64()).is_some_and(|(a, b)| a == b);
                if !is_off {
                    return Err(format!("{key} {value} is not supported (only {off} is)"));
                }
            }
        }
        // transformers: max_new_tokens wins over max_length; either decides the new tokens.
        if let Some(max_new_tokens) = self.max_new_tokens {
            options.max_new_tokens = max_new_tokens;
        } else if let Some(max_length) = self.max_length {
            options.max_new_tokens = max_length.saturating_sub(prefix_len);
        }
        if let Some(min_new_tokens) = self.min_new_tokens {
            options.min_new_tokens = min_new_tokens;
        } else if let Some(min_length) = self.min_length {
            options.min_new_tokens = min_length.saturating_sub(prefix_len);
        }
        if let Some(early_stopping) = &self.early_stopping {
            options.early_stopping = EarlyStopping::from_json(early_stopping)
                .ok_or_else(|| format!("early_stopping {early_stopping}: expected true, false or \"never\""))?;
        }
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field {
                    options.$field = value;
                }
            )*};
        }
        set!(num_beams, length_penalty, num_return_sequences, do_sample, temperature, top_k, top_p);
        set!(repetition_penalty, no_repeat_ngram_size);
        options.validate().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(json: &str) -> std::result::Result<GenerationOptions, String> {
        let file: GenerationConfigFile = serde_json::from_str(json).unwrap();
        let mut options = GenerationOptions::default();
        file.apply(&mut options, 1).map(|()| options)
    }

    #[test]
    fn the_file_sets_the_defaults() {
        let options = applied(r#"{"num_beams": 3, "max_new_tokens": 12, "min_new_tokens": 3, "bos_token_id": 30522, "transformers_version": "5.24.0"}"#).unwrap();
        assert_eq!((options.num_beams, options.max_new_tokens, options.min_new_tokens), (3, 12, 3));
        assert_eq!(options.top_k, 50);
        // max_length counts bos; max_new_tokens wins over it
        assert_eq!(applied(r#"{"max_length": 30}"#).unwrap().max_new_tokens, 29);
        assert_eq!(applied(r#"{"max_length": 30, "max_new_tokens": 7}"#).unwrap().max_new_tokens, 7);
        assert_eq!(applied(r#"{"early_stopping": "never"}"#).unwrap().early_stopping, EarlyStopping::Never);
    }

    #[test]
    fn unsupported_or_contradictory_settings_are_refused() {
        assert!(applied(
            r#"{"num_beam_groups": 1, "diversity_penalty": 0.0, "typical_p": 1.0, "suppress_tokens": []}"#
        )
        .is_ok());
        let err = applied(r#"{"num_beams": 4, "num_beam_groups": 2}"#).unwrap_err();
        assert!(err.contains("num_beam_groups 2 is not supported"), "{err}");
        let err = applied(r#"{"top_p": 1.5}"#).unwrap_err();
        assert!(err.contains("top_p must be in (0, 1], not 1.5"), "{err}");
    }
}
