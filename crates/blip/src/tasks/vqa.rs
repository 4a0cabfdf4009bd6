//! Visual question answering with `BlipForQuestionAnswering` checkpoints: free answers
//! generated as transformers' `generate` does, or answers ranked from a closed list as the
//! original BLIP evaluates VQA.

use candle_core::{DType, IndexOp, Tensor, D};
use candle_nn::VarBuilder;

use super::run::{GenerationRun, OnInputToken};
use super::{check_count, check_not_empty, GeneratedText, Images, Task, TaskModel, DEFAULT_VQA_MODEL};
use crate::config::{Architecture, BlipConfig};
use crate::error::{InvalidInput, Param, Result};
use crate::generation::{Generation, GenerationOptions};
use crate::models::question_answering::QuestionAnsweringModel;

/// How to generate answers: get them from [`QuestionAnswerer::default_options`]
/// (transformers' generation defaults, but 10 new tokens at most: answers are short) and change
/// fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AnswerOptions {
    pub generation: GenerationOptions,
}

impl AnswerOptions {
    pub fn new(generation: GenerationOptions) -> Self {
        Self { generation }
    }
}

/// A generated answer: `tokens` hold bos 30522, the answer tokens and the final [SEP] 102 when
/// produced, as transformers' `generate` returns them.
pub type Answer = GeneratedText;

/// How to rank a closed answer list.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RankOptions {
    /// Candidates scored in full: the answers whose first token is most likely (original
    /// BLIP's k = 128), capped by the list's length.
    pub candidates: usize,
    /// Ranked answers returned per question, best first.
    pub top: usize,
}

impl RankOptions {
    pub fn new(candidates: usize, top: usize) -> Self {
        Self { candidates, top }
    }

    /// Refuses scoring or returning no answer.
    pub fn validate(&self) -> Result<()> {
        for (param, value) in [(Param::Candidates, self.candidates), (Param::Top, self.top)] {
            if value == 0 {
                return Err(InvalidInput::OutOfRange { param, value: "0".into(), accepted: "at least 1" }.into());
            }
        }
        Ok(())
    }
}

impl Default for RankOptions {
    fn default() -> Self {
        Self { candidates: 128, top: 1 }
    }
}

/// One answer of the list with its log-likelihood given image and question.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RankedAnswer {
    pub answer: String,
    /// Sum of the log-probabilities of the answer's tokens and its final [SEP] (≤ 0).
    pub score: f32,
}

/// A closed answer list, tokenized once for many questions.
#[derive(Debug, Clone)]
pub struct AnswerList {
    answers: Vec<String>,
    /// `[bos] answer [SEP]` per answer.
    ids: Vec<Vec<u32>>,
}

impl AnswerList {
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

/// A loaded VQA checkpoint with its processors.
pub type QuestionAnswerer = Task<QuestionAnsweringModel>;

impl TaskModel for QuestionAnsweringModel {
    const ACCEPTS: &'static [Architecture] = &[Architecture::QuestionAnswering];
    const TASK: &'static str = "question answering";
    const DEFAULT_MODEL: &'static str = DEFAULT_VQA_MODEL;

    fn default_generation() -> GenerationOptions {
        GenerationOptions::default().max_new_tokens(10)
    }

    fn build(config: &BlipConfig, _: Architecture, weights: VarBuilder) -> candle_core::Result<Self> {
        QuestionAnsweringModel::new(config, weights)
    }
}

impl QuestionAnswerer {
    /// transformers' generation defaults with at most 10 new tokens; a checkpoint's
    /// `generation_config.json` is in [`Task::generation`].
    pub fn default_options(&self) -> AnswerOptions {
        AnswerOptions { generation: self.generation.transformers.clone() }
    }

    /// Refuses contradictory options and lengths the decoder's positions cannot hold.
    pub fn validate(&self, options: &AnswerOptions) -> Result<()> {
        options.generation.validate()?;
        let positions = self.config.text_config.max_position_embeddings;
        if 1 + options.generation.max_new_tokens > positions {
            let max_new_tokens = options.generation.max_new_tokens;
            return Err(InvalidInput::TooManyNewTokens { max_new_tokens, positions }.into());
        }
        Ok(())
    }

    /// Tokenizes a closed answer list (one answer per entry, none empty).
    pub fn answer_list<S: AsRef<str>>(&self, answers: &[S]) -> Result<AnswerList> {
        check_not_empty(Param::Answers, answers)?;
        let positions = self.config.text_config.max_position_embeddings;
        let ids = answers
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let ids = self.text_processor.answer_ids(a.as_ref(), i)?;
                if ids.len() > positions {
                    let answer = a.as_ref().to_string();
                    return Err(InvalidInput::AnswerTooLong { answer, tokens: ids.len(), positions }.into());
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        Ok(AnswerList { answers: answers.iter().map(|a| a.as_ref().to_string()).collect(), ids })
    }

    /// Question states [b, t, hidden] and their mask [b, t] for image i and question i.
    pub fn encode<'a>(&self, images: impl Into<Images<'a>>, questions: &[&str]) -> Result<(Tensor, Tensor)> {
        let images = images.into();
        check_count(Param::Question, questions.len(), images.len()?)?;
        check_not_empty(Param::Question, questions)?;
        let pixel_values = self.pixel_values(images)?;
        let positions = self.config.text_config.max_position_embeddings;
        let ids = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let index = (questions.len() > 1).then_some(i);
                self.text_processor.encode_for_encoder(q, positions, Param::Question, index)
            })
            .collect::<Result<Vec<_>>>()?;
        let (input_ids, mask) = self.text_processor.pad_batch(&ids, &self.device)?;
        let image_embeds = self.model.vision_model.forward(&pixel_values)?;
        let states = self.model.encode_questions(&input_ids, Some(&mask), &image_embeds)?;
        Ok((states, mask))
    }

    /// Answers question i about image i: `num_return_sequences` answers each, best first.
    pub fn answer<'a>(
        &self,
        images: impl Into<Images<'a>>,
        questions: &[&str],
        options: &AnswerOptions,
    ) -> Result<Vec<Vec<Answer>>> {
        self.answer_streaming(images, questions, options, &mut |_, _, _| ())
    }

    /// [`answer`](Self::answer), telling `on_token` (question, sequence, token) for each token
    /// of greedy search and sampling as it is chosen (beam search tells nothing until its end).
    pub fn answer_streaming<'a>(
        &self,
        images: impl Into<Images<'a>>,
        questions: &[&str],
        options: &AnswerOptions,
        on_token: &mut OnInputToken<'_>,
    ) -> Result<Vec<Vec<Answer>>> {
        self.start_answers(images, questions, options)?.run(on_token)
    }

    /// Encodes the images and questions and starts decoding the answers, to be stepped by the
    /// caller ([`GenerationRun::step`]).
    pub fn start_answers<'a>(
        &self,
        images: impl Into<Images<'a>>,
        questions: &[&str],
        options: &AnswerOptions,
    ) -> Result<GenerationRun<'_>> {
        self.validate(options)?;
        let (states, mask) = self.encode(images, questions)?;
        let decoder = &self.model.text_decoder;
        let decoding = decoder.decoding(decoder.new_cache(&states, Some(&mask))?);
        let bos = self.text_processor.bos_token_id();
        let generation = Generation::start(
            decoding,
            &vec![vec![bos]; questions.len()],
            self.text_processor.sep_token_id(),
            &options.generation,
            &self.device,
        )?;
        let mut run = GenerationRun::new(&self.text_processor, questions.len());
        run.push((0..questions.len()).collect(), generation);
        Ok(run)
    }

    /// Ranks `answers` for question i about image i, best first: the `candidates` answers
    /// with the most likely first tokens are each scored by their full log-likelihood.
    pub fn rank<'a>(
        &self,
        images: impl Into<Images<'a>>,
        questions: &[&str],
        answers: &AnswerList,
        options: &RankOptions,
    ) -> Result<Vec<Vec<RankedAnswer>>> {
        options.validate()?;
        let (states, mask) = self.encode(images, questions)?;
        let first_token_probs = self.first_token_probs(&states, &mask)?;
        let k = options.candidates.min(answers.len());
        let mut ranked = Vec::with_capacity(questions.len());
        for (row, probs) in first_token_probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..answers.len()).collect();
            let first = |a: usize| probs[answers.ids[a][1] as usize];
            order.sort_by(|&a, &b| first(b).total_cmp(&first(a)));
            order.truncate(k);
            let scores = self.log_likelihoods(&states.i(row..row + 1)?, &mask.i(row..row + 1)?, answers, &order)?;
            let mut scored: Vec<RankedAnswer> = order
                .iter()
                .zip(scores)
                .map(|(&a, score)| RankedAnswer { answer: answers.answers[a].clone(), score })
                .collect();
            scored.sort_by(|a, b| b.score.total_cmp(&a.score));
            scored.truncate(options.top);
            ranked.push(scored);
        }
        Ok(ranked)
    }

    /// Softmax over the vocabulary of the first answer token, per question: [b][vocab].
    fn first_token_probs(&self, states: &Tensor, mask: &Tensor) -> Result<Vec<Vec<f32>>> {
        let rows = states.dim(0)?;
        let decoder = &self.model.text_decoder;
        let mut cache = decoder.new_cache(states, Some(mask))?;
        let bos = Tensor::full(self.text_processor.bos_token_id(), (rows, 1), &self.device)?;
        let logits = decoder.next_token_logits(&bos, &mut cache)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?.to_vec2()?)
    }

    /// Log-likelihood of answers `which` given one question's states [1, t, hidden]: the
    /// candidates decoded as one right-padded batch (padding sits after every real token, so
    /// the causal mask already hides it).
    fn log_likelihoods(
        &self,
        states: &Tensor,
        mask: &Tensor,
        answers: &AnswerList,
        which: &[usize],
    ) -> Result<Vec<f32>> {
        let rows: Vec<Vec<u32>> = which.iter().map(|&a| answers.ids[a].clone()).collect();
        let (input_ids, _) = self.text_processor.pad_batch(&rows, &self.device)?;
        let n = rows.len();
        let repeat = Tensor::zeros(n, DType::U32, &self.device)?;
        let decoder = &self.model.text_decoder;
        let mut cache = decoder.new_cache(&states.index_select(&repeat, 0)?, Some(&mask.index_select(&repeat, 0)?))?;
        let (_, logits) = decoder.forward(&input_ids, &mut cache)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        // Targets: each token after the first, scored at the position before it.
        let width = input_ids.dim(1)?;
        let targets = input_ids.narrow(1, 1, width - 1)?.unsqueeze(2)?.contiguous()?;
        let picked =
            log_probs.narrow(1, 0, width - 1)?.contiguous()?.gather(&targets, 2)?.squeeze(2)?.to_vec2::<f32>()?;
        Ok(rows
            .iter()
            .zip(picked)
            .map(|(ids, lp)| lp[..ids.len() - 1].iter().map(|&x| x as f64).sum::<f64>() as f32)
            .collect())
    }
}
