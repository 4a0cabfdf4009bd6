//! The Hugging Face Inference API's image-to-text wire format, as
//! `huggingface_hub.InferenceClient(model=URL).image_to_text` speaks it: the body is the raw
//! image bytes, or JSON `{"inputs": "<base64 image>", "parameters": {...}}`; the answer is
//! `[{"generated_text": "..."}]`.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// `parameters`: the generation parameters a request may set, named as transformers' `generate` names them.
/// Unset ones keep the captioner's defaults; the values are checked by the library.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationParameters {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub num_beams: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub seed: Option<u64>,
    /// The same keys, as the newer clients send them; they win where both set one.
    pub generation_parameters: Option<Box<GenerationParameters>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    inputs: String,
    #[serde(default)]
    parameters: Option<GenerationParameters>,
}

impl GenerationParameters {
    /// `options` with the parameters set here.
    pub fn apply(&self, options: &mut blip::GenerationOptions) {
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field {
                    options.$field = value;
                }
            )*};
        }
        set!(max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_k, top_p);
        set!(repetition_penalty, no_repeat_ngram_size);
        if self.seed.is_some() {
            options.seed = self.seed;
        }
        if let Some(nested) = &self.generation_parameters {
            nested.apply(options);
        }
    }
}

/// A parsed request: the image's bytes and the parameters.
#[derive(Debug)]
pub struct ImageToText {
    pub image: Vec<u8>,
    pub parameters: GenerationParameters,
}

/// Reads a body: JSON when it starts with `{` (after white space), else the image itself.
pub fn parse(body: &[u8]) -> Result<ImageToText, ApiError> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Ok(ImageToText { image: body.to_vec(), parameters: GenerationParameters::default() });
    }
    let request: JsonRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not a valid request: {e}")))?;
    let image = decode_base64(&request.inputs)?;
    Ok(ImageToText { image, parameters: request.parameters.unwrap_or_default() })
}

/// `inputs`: standard base64 (padded or not), optionally as a `data:...;base64,` URL.
fn decode_base64(inputs: &str) -> Result<Vec<u8>, ApiError> {
    let data = match inputs.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => inputs,
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(data.trim())
        .map_err(|e| ApiError::bad_request("invalid_base64", format!("inputs must be a base64-encoded image: {e}")))
}

/// One generated text, as the Inference API returns it (in a list).
#[derive(Debug, Serialize)]
pub struct GeneratedText {
    pub generated_text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_are_the_image() {
        let parsed = parse(b"\x89PNG...").unwrap();
        assert_eq!(parsed.image, b"\x89PNG...");
        assert_eq!(parsed.parameters, GenerationParameters::default());
    }

    #[test]
    fn json_with_parameters() {
        let body = br#" {"inputs": "aGVsbG8=", "parameters": {"max_new_tokens": 5, "generation_parameters": {"num_beams": 2, "max_new_tokens": 7}}}"#;
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.image, b"hello");
        let mut options = blip::GenerationOptions::default();
        parsed.parameters.apply(&mut options);
        assert_eq!((options.max_new_tokens, options.num_beams), (7, 2));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"{\"inputs\": 3}").unwrap_err().kind, "invalid_json");
        assert_eq!(parse(b"{\"inputs\": \"%%%\"}").unwrap_err().kind, "invalid_base64");
        let unknown = parse(br#"{"inputs": "aGVsbG8=", "parameters": {"max_tokens": 3}}"#).unwrap_err();
        assert!(unknown.message.contains("max_tokens"), "{}", unknown.message);
        assert_eq!(parse(b"{\"inputs\": \"data:image/png;base64,aGVsbG8\"}").unwrap().image, b"hello");
    }
}
