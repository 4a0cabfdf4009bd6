//! Visual question answering with `BlipForQuestionAnswering` checkpoints: free answers
//! generated as transformers' `generate` does, or answers ranked from a closed list as the
//! original BLIP evaluates VQA.

use candle_core::{DType, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::{GeneratedText, Task, TaskModel};
use crate::config::{Architecture, BlipConfig};
use crate::error::{Error, Result};
use crate::generation::{self, CachedDecoder, CausalLm, GenerationOptions};
use crate::models::question_answering::QuestionAnsweringModel;

/// How to generate answers; `max_new_tokens` defaults to 10 (answers are short).
#[derive(Debug, Clone)]
pub struct AnswerOptions {
    pub generation: GenerationOptions,
}

impl Default for AnswerOptions {
    fn default() -> Self {
        Self { generation: GenerationOptions { max_new_tokens: 10, ..Default::default() } }
    }
}

/// A generated answer: `tokens` hold bos 30522, the answer tokens and the final [SEP] 102 when
/// produced, as transformers' `generate` returns them.
pub type Answer = GeneratedText;

/// How to rank a closed answer list.
#[derive(Debug, Clone)]
pub struct RankOptions {
    /// Candidates scored in full: the answers whose first token is most likely (original
    /// BLIP's k = 128), capped by the list's length.
    pub candidates: usize,
    /// Ranked answers returned per question, best first.
    pub top: usize,
}

impl Default for RankOptions {
    fn default() -> Self {
        Self { candidates: 128, top: 1 }
    }
}

/// One answer of the list with its log-likelihood given image and question.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedAnswer {
    pub answer: String,
    /// Sum of the log-probabilities of the answer's tokens and its final [SEP] (≤ 0).
    pub score: f32,
}

/// A closed answer list, tokenized once for many questions.
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
    const EXAMPLE: &'static str = "Salesforce/blip-vqa-base";

    fn build(config: &BlipConfig, _: Architecture, weights: VarBuilder) -> candle_core::Result<Self> {
        QuestionAnsweringModel::new(config, weights)
    }
}

impl QuestionAnswerer {
    /// Refuses contradictory options and lengths the decoder's positions cannot hold.
    pub fn check_options(&self, options: &AnswerOptions) -> Result<()> {
        options.generation.validate().map_err(Error::InvalidInput)?;
        let positions = self.config.text_config.max_position_embeddings;
        if 1 + options.generation.max_new_tokens > positions {
            return Err(Error::InvalidInput(format!(
                "max_new_tokens {} exceeds the model's {positions} positions: set it to at most {}",
                options.generation.max_new_tokens,
                positions - 1
            )));
        }
        Ok(())
    }

    /// Tokenizes a closed answer list (one answer per entry, none empty).
    pub fn answer_list(&self, answers: &[String]) -> Result<AnswerList> {
        if answers.is_empty() {
            return Err(Error::InvalidInput("the answer list is empty".into()));
        }
        let positions = self.config.text_config.max_position_embeddings;
        let ids = answers
            .iter()
            .map(|a| {
                let ids = self.text_processor.answer_ids(a)?;
                if ids.len() > positions {
                    return Err(Error::InvalidInput(format!(
                        "answer \"{a}\" is {} tokens long; the model has {positions} positions",
                        ids.len()
                    )));
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        Ok(AnswerList { answers: answers.to_vec(), ids })
    }

    /// Question states [b, t, hidden] and their mask [b, t] for image i and question i.
    pub fn encode(&self, pixel_values: &Tensor, questions: &[&str]) -> Result<(Tensor, Tensor)> {
        let rows = pixel_values.dim(0)?;
        if questions.len() != rows {
            return Err(Error::InvalidInput(format!("{} questions for {rows} images", questions.len())));
        }
        let positions = self.config.text_config.max_position_embeddings;
        let ids = questions
            .iter()
            .map(|q| self.text_processor.encode_for_encoder(q, positions))
            .collect::<Result<Vec<_>>>()?;
        let (input_ids, mask) = self.text_processor.pad_batch(&ids, &self.device)?;
        let image_embeds = self.model.vision_model.forward(pixel_values)?;
        let states = self.model.encode_questions(&input_ids, Some(&mask), &image_embeds)?;
        Ok((states, mask))
    }

    /// Answers question i about image i: `num_return_sequences` answers each, best first.
    pub fn answer(&self, images: &[RgbImage], questions: &[&str], options: &AnswerOptions) -> Result<Vec<Vec<Answer>>> {
        let pixel_values = self.image_processor.preprocess_batch(images, &self.device)?;
        self.answer_pixels(&pixel_values, questions, options)
    }

    /// [`Self::answer`] on preprocessed `pixel_values` [b, 3, H, W].
    pub fn answer_pixels(
        &self,
        pixel_values: &Tensor,
        questions: &[&str],
        options: &AnswerOptions,
    ) -> Result<Vec<Vec<Answer>>> {
        self.check_options(options)?;
        let (states, mask) = self.encode(pixel_values, questions)?;
        let mut decoder = CachedDecoder { model: &self.model, cache: self.model.new_cache(&states, Some(&mask))? };
        let bos = self.text_processor.bos_token_id();
        let generated = generation::generate(
            &mut decoder,
            &vec![vec![bos]; questions.len()],
            self.text_processor.sep_token_id(),
            &options.generation,
            &self.device,
        )?;
        generated
            .into_iter()
            .map(|sequences| sequences.into_iter().map(|g| self.decode_generated(g)).collect())
            .collect()
    }

    /// Ranks `answers` for question i about image i, best first.
    pub fn rank(
        &self,
        images: &[RgbImage],
        questions: &[&str],
        answers: &AnswerList,
        options: &RankOptions,
    ) -> Result<Vec<Vec<RankedAnswer>>> {
        let pixel_values = self.image_processor.preprocess_batch(images, &self.device)?;
        self.rank_pixels(&pixel_values, questions, answers, options)
    }

    /// [`Self::rank`] on preprocessed `pixel_values`: the `candidates` answers with the most
    /// likely first tokens are each scored by their full log-likelihood.
    pub fn rank_pixels(
        &self,
        pixel_values: &Tensor,
        questions: &[&str],
        answers: &AnswerList,
        options: &RankOptions,
    ) -> Result<Vec<Vec<RankedAnswer>>> {
        if options.candidates == 0 || options.top == 0 {
            return Err(Error::InvalidInput("candidates and top must be at least 1".into()));
        }
        let (states, mask) = self.encode(pixel_values, questions)?;
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
        let mut cache = self.model.new_cache(states, Some(mask))?;
        let bos = Tensor::full(self.text_processor.bos_token_id(), (rows, 1), &self.device)?;
        let logits = self.model.next_token_logits(&bos, &mut cache)?;
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
        let mut cache =
            self.model.new_cache(&states.index_select(&repeat, 0)?, Some(&mask.index_select(&repeat, 0)?))?;
        let logits = self.model.decode(&input_ids, &mut cache)?;
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
