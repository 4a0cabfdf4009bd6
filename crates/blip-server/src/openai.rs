//! The OpenAI chat completions API, as the official `openai` client speaks it:
//! `POST /v1/chat/completions` and `GET /v1/models`. The last user message is read: its image
//! (`image_url`, a data URL, or http(s) with `--allow-image-urls`) gets a caption; with text, a
//! VQA model answers the text as a question and a captioning model continues it as a prompt.
//! Earlier turns and system messages are not read: BLIP has no chat context.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use blip::{GenerationOverrides, Param};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::app::{answered, read_body, Shared};
use crate::error::ApiError;
use crate::images::ImageSource;
use crate::models::ServedModel;
use crate::scheduler::Engine;
use crate::tasks::{texts, GenerationJob};

/// OpenAI's chat completion request, as far as this server reads it (any other field is
/// refused): the last user message's `image_url` part and `text` parts are read.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    /// Accepted and not used.
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ImageUrl {
    url: String,
}

/// OpenAI's names for the generation options, in refusals.
fn openai_name(param: Param) -> String {
    match param {
        Param::MaxNewTokens => "max_tokens".into(),
        Param::NumReturnSequences => "n".into(),
        other => other.name().into(),
    }
}

impl ChatRequest {
    fn overrides(&self) -> GenerationOverrides {
        let mut overrides = GenerationOverrides::default();
        overrides.max_new_tokens = self.max_completion_tokens.or(self.max_tokens);
        overrides.num_return_sequences = self.n;
        overrides.seed = self.seed;
        match self.temperature {
            Some(0.0) => overrides.do_sample = Some(false),
            Some(t) => {
                overrides.do_sample = Some(true);
                overrides.temperature = Some(t);
            }
            None => {}
        }
        if let Some(p) = self.top_p {
            overrides.top_p = Some(p);
            if self.temperature != Some(0.0) {
                overrides.do_sample = Some(true);
            }
        }
        overrides
    }

    fn stops(&self) -> Vec<String> {
        match &self.stop {
            None => vec![],
            Some(Stop::One(stop)) => vec![stop.clone()],
            Some(Stop::Many(stops)) => stops.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }

    /// The last user message's image and text.
    fn image_and_text(&self) -> Result<(String, Option<String>), ApiError> {
        let message = self
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .ok_or_else(|| invalid("messages need a user message with an image"))?;
        let (mut image, mut texts) = (None, Vec::new());
        match &message.content {
            Some(Content::Text(text)) => texts.push(text.clone()),
            Some(Content::Parts(parts)) => {
                for part in parts {
                    match part {
                        Part::Text { text } => texts.push(text.clone()),
                        Part::ImageUrl { image_url } if image.is_none() => image = Some(image_url.url.clone()),
                        Part::ImageUrl { .. } => return Err(invalid("the user message has more than one image")),
                    }
                }
            }
            None => {}
        }
        let image = image.ok_or_else(|| invalid("the last user message has no image_url part"))?;
        let text = texts.join(" ");
        Ok((image, (!text.trim().is_empty()).then_some(text)))
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
}

/// The model named by `model`, or the only model a one-model server has (clients such as
/// huggingface_hub send a placeholder name).
fn pick_model<'a>(state: &'a Shared, name: &str) -> Result<&'a ServedModel, ApiError> {
    match state.model(name) {
        Ok(model) => Ok(model),
        Err(err) if err.kind == "not_found" => match state.models()? {
            [only] => Ok(only),
            _ => Err(err),
        },
        Err(err) => Err(err),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The text up to the first stop string, and whether one was found.
fn cut_at_stop(text: &str, stops: &[String]) -> (String, bool) {
    match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// A finished sequence's content (cut at the first stop string) and OpenAI's finish reason:
/// `stop` when the end token or a stop string ended it, `length` when `max_tokens` did.
fn completion(
    generated: &blip::GeneratedText,
    prefix_len: usize,
    eos: u32,
    stops: &[String],
) -> (String, &'static str) {
    let ended = generated.tokens.len() > prefix_len && generated.tokens.last() == Some(&eos);
    let (content, stopped) = cut_at_stop(&generated.text, stops);
    (content, if ended || stopped { "stop" } else { "length" })
}

/// What the decoder starts from (counted as the prompt's tokens) and its end token.
fn decoder_prefix(model: &ServedModel, text: Option<&str>) -> Result<(Vec<u32>, u32, usize), ApiError> {
    match &model.engine {
        Engine::Caption(captioner) => {
            let processor = captioner.text_processor();
            let prefix = processor.caption_prefix(text)?;
            let prompt_tokens = prefix.len();
            Ok((prefix, processor.sep_token_id(), prompt_tokens))
        }
        Engine::Vqa(vqa) => {
            let processor = vqa.text_processor();
            let question = processor.encode(text.unwrap_or_default())?.len();
            Ok((vec![processor.bos_token_id()], processor.sep_token_id(), question))
        }
        Engine::Matching(_) => Ok((vec![], 0, 0)),
    }
}

fn decode(model: &ServedModel, tokens: &[u32]) -> Result<String, ApiError> {
    Ok(match &model.engine {
        Engine::Caption(task) => task.text_processor().decode(tokens)?,
        Engine::Vqa(task) => task.text_processor().decode(tokens)?,
        Engine::Matching(_) => String::new(),
    })
}

/// A chat completion request, read: what the model is asked and how.
#[derive(Debug)]
pub struct Chat {
    pub model: String,
    pub image: ImageSource,
    /// The user message's text: a prompt to continue, or a question.
    pub text: Option<String>,
    pub overrides: GenerationOverrides,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Reads a chat completion request's body.
pub fn parse(body: &[u8]) -> Result<Chat, ApiError> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("the body is not a valid chat completion request: {e}"),
        ),
        _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
    })?;
    let (image, text) = request.image_and_text()?;
    Ok(Chat {
        image: ImageSource::parse(&image, "image_url")?,
        text,
        overrides: request.overrides(),
        stops: request.stops(),
        stream: request.stream,
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        model: request.model,
    })
}

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses((status = 200, description = "A chat.completion, or with stream: server-sent chat.completion.chunk events"),
              (status = "4XX", body = crate::openapi::ErrorBody)))]
pub async fn chat_completions(State(state): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let body = read_body(body, state.config.max_body_size).await?;
    let Chat { model, image, text, overrides, stops, stream, include_usage } = parse(&body)?;
    let model = pick_model(&state, &model)?;
    let slot = model.scheduler.reserve().map_err(|_| ApiError::overloaded())?;
    let (prefix, eos, prompt_tokens) = decoder_prefix(model, text.as_deref())?;
    let job = GenerationJob::check(model, text, &overrides).map_err(|err| ApiError::from_blip(err, &openai_name))?;
    let image = state.pixels(model, image, "image_url").await?;
    let (tokens, token_stream) = if stream { Some(mpsc::unbounded_channel()).unzip() } else { (None, None) };
    let work = job.work(image, tokens);
    let id = format!("chatcmpl-{:016x}", rand_id());
    let created = now();
    let model_id = model.id.clone();

    let Some(token_stream) = token_stream else {
        let (output, batch) = state.run(model, work, slot).await?;
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (index, generated) in texts(output)?.into_iter().enumerate() {
            completion_tokens += generated.tokens.len().saturating_sub(prefix.len());
            let (content, finish_reason) = completion(&generated, prefix.len(), eos, &stops);
            choices.push(json!({
                "index": index,
                "message": {"role": "assistant", "content": content},
                "logprobs": null,
                "finish_reason": finish_reason,
            }));
        }
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        });
        return Ok(answered(body, batch));
    };

    let answer = model.scheduler.submit(work, slot)?;
    let timeout = state.config.request_timeout;
    let state = state.clone();
    let model_name = model_id.clone();
    let events = async_stream::stream! {
        let chunk = |choices: Value| -> Result<Event, Infallible> {
            let body = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": choices});
            Ok(Event::default().data(body.to_string()))
        };
        let n = overrides.num_return_sequences.unwrap_or(1);
        let mut sequences: Vec<Vec<u32>> = vec![prefix.clone(); n];
        let mut sent: Vec<String> = vec![String::new(); n];
        let mut stopped = vec![false; n];
        for index in 0..n {
            yield chunk(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]));
        }
        let model = match state.model(&model_name) { Ok(model) => model, Err(_) => return };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut token_stream = token_stream;
        // Tokens as they are chosen: text is sent up to its last space (a later token may
        // still join the last word or clean up the space before punctuation).
        while let Ok(Some((sequence, token))) = tokio::time::timeout_at(deadline, token_stream.recv()).await {
            let Some(tokens) = sequences.get_mut(sequence) else { continue };
            tokens.push(token);
            if stopped[sequence] {
                continue;
            }
            let Ok(text) = decode(model, tokens) else { continue };
            let (text, hit_stop) = cut_at_stop(&text, &stops);
            let settled = if hit_stop { text.as_str() } else { text.rsplit_once(' ').map_or("", |(head, _)| head) };
            if settled.len() > sent[sequence].len() && settled.starts_with(sent[sequence].as_str()) {
                let delta = settled[sent[sequence].len()..].to_string();
                sent[sequence] = settled.to_string();
                yield chunk(json!([{"index": sequence, "delta": {"content": delta}, "logprobs": null, "finish_reason": null}]));
            }
            stopped[sequence] = hit_stop;
        }
        let reply = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok((output, _)))) => texts(output),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(ApiError::internal("the model's worker failed on this request")),
            Err(_) => Err(ApiError::new(axum::http::StatusCode::GATEWAY_TIMEOUT, "timeout", "no answer within the request timeout")),
        };
        let generated = match reply {
            Ok(generated) => generated,
            Err(err) => {
                yield Ok(Event::default().data(json!({"error": {"message": err.message, "type": err.kind}}).to_string()));
                return;
            }
        };
        let mut completion_tokens = 0;
        for (index, generated) in generated.into_iter().enumerate().take(n) {
            completion_tokens += generated.tokens.len().saturating_sub(prefix.len());
            let (text, finish_reason) = completion(&generated, prefix.len(), eos, &stops);
            if let Some(rest) = text.strip_prefix(sent[index].as_str()).filter(|rest| !rest.is_empty()) {
                yield chunk(json!([{"index": index, "delta": {"content": rest}, "logprobs": null, "finish_reason": null}]));
            }
            yield chunk(json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason}]));
        }
        if include_usage {
            let body = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [], "usage": usage(prompt_tokens, completion_tokens)});
            yield Ok(Event::default().data(body.to_string()));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A request id that differs between requests (not a secret).
fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now());
    hasher.finish()
}

/// `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, description = "The served models")))]
pub async fn list_models(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = state
        .models()?
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "blip"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}
