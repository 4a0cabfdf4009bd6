//! Each Inference API task: parse the body, decode the image, check the options with the
//! library (before queueing, so a bad request never enters a batch), run it on the model's
//! worker, and answer in the API's format.

use axum::body::Bytes;
use axum::response::Response;
use blip::{
    Architecture, CaptionOptions, ClassifyOptions, GenerationOptions, GenerationOverrides, InvalidInput, Param, Prompt,
};

use crate::app::{answered, AppState};
use crate::error::ApiError;
use crate::hf;
use crate::models::{ServedModel, Task};
use crate::scheduler::{Engine, Output, Resized, Slot, TokenSender, Work};

/// Runs `task` in the queue place `slot` holds. The body is dropped once parsed, so that a
/// waiting request holds only its `pixel_values`.
pub async fn run(
    state: &AppState,
    model: &ServedModel,
    task: Task,
    body: Bytes,
    slot: Slot,
) -> Result<Response, ApiError> {
    match task {
        Task::ImageToText => {
            let request = hf::image_to_text(&body)?;
            drop(body);
            let job = GenerationJob::check(model, None, &request.generation)?;
            let image = state.pixels(model, request.image, "inputs").await?;
            let (output, batch) = state.run(model, job.work(image, None), slot).await?;
            let texts = texts(output)?;
            let body: Vec<hf::GeneratedText> =
                texts.into_iter().map(|t| hf::GeneratedText { generated_text: t.text }).collect();
            Ok(answered(body, batch))
        }
        Task::VisualQuestionAnswering => {
            let request = hf::question_answering(&body)?;
            drop(body);
            let mut overrides = request.generation.clone();
            if let Some(k) = request.top_k.filter(|&k| k > 1) {
                // k answers: the k best beams (sampling gives k samples).
                overrides.num_return_sequences = Some(k);
                if overrides.do_sample != Some(true) && overrides.num_beams.is_none_or(|b| b < k) {
                    overrides.num_beams = Some(k);
                }
            }
            let job = GenerationJob::check(model, Some(request.question), &overrides)?;
            let image = state.pixels(model, request.image, "image").await?;
            let (output, batch) = state.run(model, job.work(image, None), slot).await?;
            let mut answers: Vec<hf::AnswerScore> = texts(output)?
                .into_iter()
                .map(|t| hf::AnswerScore { answer: t.text, score: t.log_prob.exp() })
                .collect();
            answers.sort_by(|a, b| b.score.total_cmp(&a.score));
            Ok(answered(answers, batch))
        }
        Task::ZeroShotImageClassification => {
            let request = hf::zero_shot(&body)?;
            drop(body);
            let Engine::Matching(matcher) = &model.engine else { return Err(wrong_engine()) };
            let template = request.hypothesis_template.unwrap_or_else(|| ClassifyOptions::DEFAULT_TEMPLATE.into());
            let options = ClassifyOptions::new(template, None);
            let labels: Vec<&str> = request.candidate_labels.iter().map(String::as_str).collect();
            matcher.validate_classify(&labels, &options)?;
            let image = state.pixels(model, request.image, "inputs").await?;
            let work = Work::Classify { image, labels: request.candidate_labels.clone(), options };
            let (output, batch) = state.run(model, work, slot).await?;
            let Output::Labels(mut scores) = output else { return Err(wrong_output()) };
            scores.sort_by(|a, b| b.probability.total_cmp(&a.probability));
            let body: Vec<hf::LabelScore> =
                scores.into_iter().map(|s| hf::LabelScore { label: s.label, score: s.probability }).collect();
            Ok(answered(body, batch))
        }
        Task::ImageFeatureExtraction => {
            let source = hf::image_features(&body)?;
            drop(body);
            let image = state.pixels(model, source, "inputs").await?;
            let (output, batch) = state.run(model, Work::EmbedImage { image }, slot).await?;
            let Output::Embedding(embedding) = output else { return Err(wrong_output()) };
            Ok(answered(vec![embedding], batch))
        }
        Task::FeatureExtraction => {
            let texts = hf::text_features(&body)?;
            drop(body);
            blip::tasks::check_not_empty(Param::Text, &texts)?;
            // One job (and queue place) per text, so that texts of concurrent requests batch
            // together.
            let mut slots = vec![slot];
            for _ in 1..texts.len() {
                slots.push(model.scheduler.reserve().map_err(|_| ApiError::overloaded())?);
            }
            let mut pending = Vec::with_capacity(texts.len());
            for (text, slot) in texts.into_iter().zip(slots) {
                pending.push(state.run(model, Work::EmbedText { text }, slot));
            }
            let mut embeddings = Vec::with_capacity(pending.len());
            let mut batch = 0;
            for result in futures_util::future::join_all(pending).await {
                let (output, size) = result?;
                let Output::Embedding(embedding) = output else { return Err(wrong_output()) };
                embeddings.push(embedding);
                batch = batch.max(size);
            }
            Ok(answered(embeddings, batch))
        }
        Task::ImageTextMatching => {
            let request = hf::matching(&body)?;
            drop(body);
            blip::tasks::check_not_empty(Param::Text, &request.texts)?;
            let image = state.pixels(model, request.image, "image").await?;
            let work = Work::Match { image, texts: request.texts.clone() };
            let (output, batch) = state.run(model, work, slot).await?;
            let Output::Matches(scores) = output else { return Err(wrong_output()) };
            let body: Vec<hf::TextMatch> = request
                .texts
                .into_iter()
                .zip(scores)
                .map(|(text, s)| hf::TextMatch { text, itm: s.itm, itc: s.itc })
                .collect();
            Ok(answered(body, batch))
        }
    }
}

/// A generation request whose options and text are checked, waiting for its image.
pub struct GenerationJob {
    text: Option<String>,
    generation: GenerationOptions,
    captioning: bool,
}

impl GenerationJob {
    /// Checks `overrides` over the model's defaults and the text: for a captioning model the
    /// prompt (optional), for a VQA model the question (required).
    pub fn check(model: &ServedModel, text: Option<String>, overrides: &GenerationOverrides) -> blip::Result<Self> {
        match &model.engine {
            Engine::Caption(captioner) => {
                let generation = overrides.apply(&captioner.default_options().generation);
                let prompt = text.filter(|t| !t.trim().is_empty());
                let options =
                    CaptionOptions::new(prompt.clone().map_or(Prompt::None, Prompt::Same), generation.clone());
                captioner.validate(&options)?;
                Ok(Self { text: prompt, generation, captioning: true })
            }
            Engine::Vqa(vqa) => {
                let question = text.unwrap_or_default();
                blip::tasks::check_not_empty(Param::Question, std::slice::from_ref(&question))?;
                let generation = overrides.apply(&vqa.default_options().generation);
                vqa.validate(&blip::AnswerOptions::new(generation.clone()))?;
                Ok(Self { text: Some(question), generation, captioning: false })
            }
            Engine::Matching(matcher) => Err(InvalidInput::NeedsArchitecture {
                param: Param::Text,
                needs: Architecture::ConditionalGeneration,
                found: matcher.architecture(),
            }
            .into()),
        }
    }

    /// The job for `image`, streaming its tokens to `tokens` if given.
    pub fn work(self, image: Resized, tokens: Option<TokenSender>) -> Work {
        let generation = self.generation;
        match self.captioning {
            true => Work::Caption { image, prompt: self.text, generation, tokens },
            false => Work::Answer { image, question: self.text.unwrap_or_default(), generation, tokens },
        }
    }
}

/// The generated sequences of a generation job.
pub fn texts(output: Output) -> Result<Vec<blip::GeneratedText>, ApiError> {
    match output {
        Output::Texts(texts) => Ok(texts),
        _ => Err(wrong_output()),
    }
}

fn wrong_engine() -> ApiError {
    ApiError::internal("the model cannot run this task")
}

fn wrong_output() -> ApiError {
    ApiError::internal("the model answered with another kind of output")
}
