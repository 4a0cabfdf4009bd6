//! Generation options named one by one, as a caller sets them over a task's defaults: the
//! CLI's flags, a server request's `parameters`, a Python call's keywords. One mapping onto
//! [`GenerationOptions`] for every front end.

use serde::{Deserialize, Deserializer};

use super::{EarlyStopping, GenerationOptions};
use crate::error::Param;

/// The options a caller set; `None` keeps the default. Deserializes from transformers'
/// keyword names (unknown names are refused), `early_stopping` as `true`, `false` or `"never"`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GenerationOverrides {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f32>,
    #[serde(default, deserialize_with = "early_stopping")]
    pub early_stopping: Option<EarlyStopping>,
    pub num_return_sequences: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub seed: Option<u64>,
}

impl GenerationOverrides {
    /// `defaults` with the options set here.
    pub fn apply(&self, defaults: &GenerationOptions) -> GenerationOptions {
        let mut options = defaults.clone();
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field {
                    options.$field = value;
                }
            )*};
        }
        set!(max_new_tokens, min_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences);
        set!(do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size);
        if self.seed.is_some() {
            options.seed = self.seed;
        }
        options
    }

    /// These overrides, then `later`'s where it sets one.
    pub fn merged(&self, later: &GenerationOverrides) -> GenerationOverrides {
        macro_rules! pick {
            ($($field:ident),*) => { GenerationOverrides { $($field: later.$field.or(self.$field)),* } };
        }
        pick!(
            max_new_tokens,
            min_new_tokens,
            num_beams,
            length_penalty,
            early_stopping,
            num_return_sequences,
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            no_repeat_ngram_size,
            seed
        )
    }

    /// The options set, for telling a caller which of theirs a default conflicts with.
    pub fn given(&self) -> Vec<Param> {
        [
            (Param::MaxNewTokens, self.max_new_tokens.is_some()),
            (Param::MinNewTokens, self.min_new_tokens.is_some()),
            (Param::NumBeams, self.num_beams.is_some()),
            (Param::LengthPenalty, self.length_penalty.is_some()),
            (Param::EarlyStopping, self.early_stopping.is_some()),
            (Param::NumReturnSequences, self.num_return_sequences.is_some()),
            (Param::DoSample, self.do_sample.is_some()),
            (Param::Temperature, self.temperature.is_some()),
            (Param::TopK, self.top_k.is_some()),
            (Param::TopP, self.top_p.is_some()),
            (Param::RepetitionPenalty, self.repetition_penalty.is_some()),
            (Param::NoRepeatNgramSize, self.no_repeat_ngram_size.is_some()),
            (Param::Seed, self.seed.is_some()),
        ]
        .into_iter()
        .filter_map(|(param, given)| given.then_some(param))
        .collect()
    }
}

impl EarlyStopping {
    /// transformers' spellings: `false`, `true`, `"never"`.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Bool(false) => Some(EarlyStopping::Heuristic),
            serde_json::Value::Bool(true) => Some(EarlyStopping::Done),
            serde_json::Value::String(s) if s == "never" => Some(EarlyStopping::Never),
            _ => None,
        }
    }
}

fn early_stopping<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<EarlyStopping>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => EarlyStopping::from_json(&value).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("early_stopping {value}: expected true, false or \"never\""))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_set_options_over_defaults() {
        let overrides: GenerationOverrides =
            serde_json::from_str(r#"{"max_new_tokens": 7, "early_stopping": "never", "seed": 3}"#).unwrap();
        let options = overrides.apply(&GenerationOptions::default().num_beams(2));
        assert_eq!((options.max_new_tokens, options.num_beams, options.seed), (7, 2, Some(3)));
        assert_eq!(options.early_stopping, EarlyStopping::Never);
        assert_eq!(overrides.given(), [Param::MaxNewTokens, Param::EarlyStopping, Param::Seed]);
        let later = GenerationOverrides { max_new_tokens: Some(9), ..Default::default() };
        assert_eq!(overrides.merged(&later).max_new_tokens, Some(9));
        assert_eq!(overrides.merged(&later).seed, Some(3));
    }

    #[test]
    fn unknown_names_and_bad_values_are_refused() {
        let err = serde_json::from_str::<GenerationOverrides>(r#"{"max_tokens": 3}"#).unwrap_err();
        assert!(err.to_string().contains("max_tokens"), "{err}");
        let err = serde_json::from_str::<GenerationOverrides>(r#"{"early_stopping": "soon"}"#).unwrap_err();
        assert!(err.to_string().contains("early_stopping"), "{err}");
    }
}
