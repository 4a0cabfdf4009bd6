//! The Hugging Face Inference API's wire formats, as `huggingface_hub.InferenceClient` and
//! huggingface.js send them: a body is an image's raw bytes, or JSON (it starts with `{`) with
//! `inputs` and `parameters`. Each task's request is parsed here into inputs and options;
//! the answers are the API's lists of objects.

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::images::ImageSource;
use blip::GenerationOverrides;

/// `image-to-text`: the image and the generation parameters.
#[derive(Debug)]
pub struct ImageToText {
    pub image: ImageSource,
    pub generation: GenerationOverrides,
}

/// `visual-question-answering`: `{"inputs": {"image", "question"}, "parameters": {"top_k"}}`,
/// or flat `{"image", "question"}` beside `inputs` as huggingface_hub sends it.
#[derive(Debug)]
pub struct QuestionAnswering {
    pub image: ImageSource,
    pub question: String,
    /// Answers returned, best first.
    pub top_k: Option<usize>,
    pub generation: GenerationOverrides,
}

/// `zero-shot-image-classification`.
#[derive(Debug)]
pub struct ZeroShot {
    pub image: ImageSource,
    pub candidate_labels: Vec<String>,
    pub hypothesis_template: Option<String>,
}

/// `image-text-matching` (this server's own task): one image, texts to score against it.
#[derive(Debug)]
pub struct Matching {
    pub image: ImageSource,
    pub texts: Vec<String>,
}

/// Whether a body is JSON rather than an image's bytes.
fn is_json(body: &[u8]) -> bool {
    body.trim_ascii_start().starts_with(b"{")
}

/// The body as a JSON object: 415 when it is not JSON at all (an image sent to a task that
/// takes JSON), 400 when it is broken JSON.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if !is_json(body) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "this task takes a JSON body ({\"inputs\": ...}), not raw bytes",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid_json("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))),
    }
}

/// 422: valid JSON that is not the request the task takes (a missing, unknown or mistyped field).
fn invalid_json(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
}

/// Refuses keys other than `allowed`, naming the first one.
fn only(map: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), ApiError> {
    match map.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(invalid_json(format!("unknown field {key:?} in {what} (expected: {})", allowed.join(", ")))),
        None => Ok(()),
    }
}

fn string(value: &Value, field: &str) -> Result<String, ApiError> {
    value.as_str().map(str::to_string).ok_or_else(|| invalid_json(format!("{field} must be a string")))
}

/// A string or a list of strings (a comma-separated string for `candidate_labels`, as older
/// clients send it, is split).
fn strings(value: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    match value {
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Array(items) => items.iter().map(|item| string(item, field)).collect(),
        _ => Err(invalid_json(format!("{field} must be a string or a list of strings"))),
    }
}

fn image(value: &Value, field: &str) -> Result<ImageSource, ApiError> {
    ImageSource::parse(&string(value, field)?, field)
}

fn required<'a>(map: &'a Map<String, Value>, key: &str, what: &str) -> Result<&'a Value, ApiError> {
    map.get(key).ok_or_else(|| invalid_json(format!("{what} needs {key:?}")))
}

/// `parameters` as an object (absent or null: empty).
fn parameters(map: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    match map.get("parameters") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(parameters)) => Ok(parameters.clone()),
        Some(_) => Err(invalid_json("parameters must be an object")),
    }
}

/// Generation parameters by transformers' names, with `generation_parameters` (newer
/// clients) over them; `extra` keys are left for the caller.
fn generation(mut parameters: Map<String, Value>, extra: &[&str]) -> Result<GenerationOverrides, ApiError> {
    for key in extra {
        parameters.remove(*key);
    }
    let nested = parameters.remove("generation_parameters");
    let parse = |value: Value, what: &str| {
        serde_json::from_value::<GenerationOverrides>(value).map_err(|e| invalid_json(format!("{what}: {e}")))
    };
    let outer = parse(Value::Object(parameters), "parameters")?;
    match nested {
        None | Some(Value::Null) => Ok(outer),
        Some(nested) => Ok(outer.merged(&parse(nested, "parameters.generation_parameters")?)),
    }
}

/// `image-to-text`: raw bytes, or `{"inputs": b64, "parameters": {...}}`.
pub fn image_to_text(body: &[u8]) -> Result<ImageToText, ApiError> {
    if !is_json(body) {
        return Ok(ImageToText {
            image: ImageSource::Bytes(body.to_vec()),
            generation: GenerationOverrides::default(),
        });
    }
    let map = object(body)?;
    only(&map, &["inputs", "parameters"], "the request")?;
    let image = image(required(&map, "inputs", "the request")?, "inputs")?;
    Ok(ImageToText { image, generation: generation(parameters(&map)?, &[])? })
}

/// `visual-question-answering`.
pub fn question_answering(body: &[u8]) -> Result<QuestionAnswering, ApiError> {
    let map = object(body)?;
    only(&map, &["inputs", "image", "question", "parameters"], "the request")?;
    let (image_value, question_value) = match map.get("inputs") {
        Some(Value::Object(inputs)) => {
            only(inputs, &["image", "question"], "inputs")?;
            (required(inputs, "image", "inputs")?, required(inputs, "question", "inputs")?)
        }
        // huggingface_hub: {"inputs": <image>, "image": <image>, "question": ...}
        _ => (
            map.get("image").or(map.get("inputs")).ok_or_else(|| invalid_json("the request needs an image"))?,
            required(&map, "question", "the request")?,
        ),
    };
    let parameters = parameters(&map)?;
    let top_k = match parameters.get("top_k") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .filter(|&k| k >= 1)
                .ok_or_else(|| invalid_json("parameters.top_k must be a whole number of at least 1"))?
                as usize,
        ),
    };
    Ok(QuestionAnswering {
        image: image(image_value, "image")?,
        question: string(question_value, "question")?,
        top_k,
        generation: generation(parameters, &["top_k"])?,
    })
}

/// `zero-shot-image-classification`: `{"inputs": b64, "parameters": {"candidate_labels",
/// "hypothesis_template"}}`.
pub fn zero_shot(body: &[u8]) -> Result<ZeroShot, ApiError> {
    let map = object(body)?;
    only(&map, &["inputs", "parameters"], "the request")?;
    let image = image(required(&map, "inputs", "the request")?, "inputs")?;
    let parameters = parameters(&map)?;
    only(&parameters, &["candidate_labels", "hypothesis_template"], "parameters")?;
    let mut candidate_labels = strings(required(&parameters, "candidate_labels", "parameters")?, "candidate_labels")?;
    if let [single] = candidate_labels.as_slice() {
        if single.contains(',') {
            candidate_labels = single.split(',').map(|label| label.trim().to_string()).collect();
        }
    }
    let hypothesis_template = match parameters.get("hypothesis_template") {
        None | Some(Value::Null) => None,
        Some(value) => Some(string(value, "hypothesis_template")?),
    };
    Ok(ZeroShot { image, candidate_labels, hypothesis_template })
}

/// `image-feature-extraction`: raw bytes or `{"inputs": b64}`.
pub fn image_features(body: &[u8]) -> Result<ImageSource, ApiError> {
    if !is_json(body) {
        return Ok(ImageSource::Bytes(body.to_vec()));
    }
    let map = object(body)?;
    only(&map, &["inputs", "parameters"], "the request")?;
    only(&parameters(&map)?, &[], "parameters")?;
    image(required(&map, "inputs", "the request")?, "inputs")
}

/// `feature-extraction`: `{"inputs": text or [texts]}`.
pub fn text_features(body: &[u8]) -> Result<Vec<String>, ApiError> {
    let map = object(body)?;
    // huggingface_hub sends `normalize`, `truncate` and the like only when set.
    only(&map, &["inputs", "parameters"], "the request")?;
    only(&parameters(&map)?, &[], "parameters")?;
    strings(required(&map, "inputs", "the request")?, "inputs")
}

/// `image-text-matching`: `{"inputs": {"image": b64, "text": str or [str]}}`.
pub fn matching(body: &[u8]) -> Result<Matching, ApiError> {
    let map = object(body)?;
    only(&map, &["inputs"], "the request")?;
    let Some(Value::Object(inputs)) = map.get("inputs") else {
        return Err(invalid_json("inputs must be an object {\"image\", \"text\"}"));
    };
    only(inputs, &["image", "text"], "inputs")?;
    Ok(Matching {
        image: image(required(inputs, "image", "inputs")?, "image")?,
        texts: strings(required(inputs, "text", "inputs")?, "text")?,
    })
}

/// One generated text, as the Inference API returns it (in a list).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GeneratedText {
    pub generated_text: String,
}

/// One answer and its probability.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AnswerScore {
    pub answer: String,
    pub score: f32,
}

/// One label and its probability.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// One text's scores against the image.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextMatch {
    pub text: String,
    pub itm: Option<f32>,
    pub itc: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(source: ImageSource) -> Vec<u8> {
        match source {
            ImageSource::Bytes(bytes) => bytes,
            ImageSource::Url(url) => panic!("{url}"),
        }
    }

    #[test]
    fn raw_bytes_are_the_image() {
        let parsed = image_to_text(b"\x89PNG...").unwrap();
        assert_eq!(bytes(parsed.image), b"\x89PNG...");
        assert_eq!(parsed.generation, GenerationOverrides::default());
    }

    #[test]
    fn json_with_parameters() {
        let body = br#" {"inputs": "aGVsbG8=", "parameters": {"max_new_tokens": 5, "generation_parameters": {"num_beams": 2, "max_new_tokens": 7}}}"#;
        let parsed = image_to_text(body).unwrap();
        assert_eq!(bytes(parsed.image), b"hello");
        let options = parsed.generation.apply(&blip::GenerationOptions::default());
        assert_eq!((options.max_new_tokens, options.num_beams), (7, 2));
    }

    #[test]
    fn refusals() {
        assert_eq!(image_to_text(b"{\"inputs\": 3}").unwrap_err().kind, "invalid_request");
        assert_eq!(image_to_text(b"{\"inputs\": ").unwrap_err().kind, "invalid_json");
        assert_eq!(zero_shot(b"\x89PNG").unwrap_err().kind, "unsupported_media_type");
        assert_eq!(image_to_text(b"{\"inputs\": \"%%%\"}").unwrap_err().kind, "invalid_base64");
        let unknown = image_to_text(br#"{"inputs": "aGVsbG8=", "parameters": {"max_tokens": 3}}"#).unwrap_err();
        assert!(unknown.message.contains("max_tokens"), "{}", unknown.message);
        assert_eq!(bytes(image_to_text(b"{\"inputs\": \"data:image/png;base64,aGVsbG8\"}").unwrap().image), b"hello");
    }

    #[test]
    fn vqa_both_forms() {
        let nested = question_answering(
            br#"{"inputs": {"image": "aGVsbG8=", "question": "what?"}, "parameters": {"top_k": 2}}"#,
        )
        .unwrap();
        assert_eq!((nested.question.as_str(), nested.top_k), ("what?", Some(2)));
        let flat = question_answering(br#"{"inputs": "aGVsbG8=", "image": "aGVsbG8=", "question": "who?"}"#).unwrap();
        assert_eq!(bytes(flat.image), b"hello");
        assert!(question_answering(br#"{"inputs": {"image": "aGVsbG8="}}"#).is_err());
    }

    #[test]
    fn zero_shot_labels() {
        let parsed = zero_shot(br#"{"inputs": "aGVsbG8=", "parameters": {"candidate_labels": "cat, dog"}}"#).unwrap();
        assert_eq!(parsed.candidate_labels, ["cat", "dog"]);
        let parsed = zero_shot(br#"{"inputs": "aGVsbG8=", "parameters": {"candidate_labels": ["a, b", "c"], "hypothesis_template": "x {}"}}"#).unwrap();
        assert_eq!((parsed.candidate_labels.len(), parsed.hypothesis_template.as_deref()), (2, Some("x {}")));
        assert!(zero_shot(br#"{"inputs": "aGVsbG8="}"#).unwrap_err().message.contains("candidate_labels"));
    }
}
