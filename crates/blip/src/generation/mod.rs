//! Decoding token sequences from a model that gives next-token logits, with the options of
//! transformers' `generate` (same names, defaults and semantics): greedy search, multinomial
//! sampling and beam search, the repetition and n-gram penalties, and min/max new tokens. Rows
//! stop independently and finished rows leave the batch, so a batch gives what each row gives
//! alone.

mod beam;
pub(crate) mod config;
mod overrides;
pub mod processors;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use crate::error::{InvalidInput, Param};

pub use overrides::GenerationOverrides;

/// When beam search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EarlyStopping {
    /// `False` (the default): stop when the best running beam, at its current length, can no
    /// longer beat the worst finished one.
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Done,
    /// `"never"`: with a positive length penalty, assume running beams may still grow to the
    /// maximum length.
    Never,
}

/// Options of transformers' `generate`, with its defaults. Start from `Default` (or a task's
/// `default_options`) and change fields, or chain the setters of the same names.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GenerationOptions {
    /// New tokens at most (the prompt not counted).
    pub max_new_tokens: usize,
    /// The end token is forbidden until this many new tokens exist.
    pub min_new_tokens: usize,
    /// Beams of beam search; 1 is greedy search or sampling.
    pub num_beams: usize,
    /// Finished beams are scored sum(log p) / generated_length ** length_penalty.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Sequences returned per input: the best beams, or independent samples.
    pub num_return_sequences: usize,
    /// Sample the next token instead of taking the most likely one.
    pub do_sample: bool,
    /// Sampling: logits are divided by it.
    pub temperature: f32,
    /// Sampling: only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Sampling: only the most likely tokens whose probabilities add up to top_p.
    pub top_p: f32,
    /// Scores of tokens already in the sequence are divided (positive) or multiplied
    /// (negative) by it; 1 does nothing.
    pub repetition_penalty: f32,
    /// No n-gram of this size may occur twice (0: no limit).
    pub no_repeat_ngram_size: usize,
    /// Seed of the sampling random stream; none draws one.
    pub seed: Option<u64>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            min_new_tokens: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            num_return_sequences: 1,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            seed: None,
        }
    }
}

impl GenerationOptions {
    /// Refuses contradictory or out-of-range options, naming them as transformers does (the
    /// [`InvalidInput::params`] of a refusal are the options it involves).
    pub fn validate(&self) -> std::result::Result<(), InvalidInput> {
        let out_of_range = |param, value: &dyn std::fmt::Display, accepted| {
            Err(InvalidInput::OutOfRange { param, value: value.to_string(), accepted })
        };
        if self.max_new_tokens == 0 {
            return out_of_range(Param::MaxNewTokens, &0, "at least 1");
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(InvalidInput::MinAboveMax { min: self.min_new_tokens, max: self.max_new_tokens });
        }
        if self.num_beams == 0 {
            return out_of_range(Param::NumBeams, &0, "at least 1");
        }
        if self.num_return_sequences == 0 {
            return out_of_range(Param::NumReturnSequences, &0, "at least 1");
        }
        if self.do_sample && self.num_beams > 1 {
            return Err(InvalidInput::SamplingWithBeams { beams: self.num_beams });
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return Err(InvalidInput::MoreSequencesThanBeams {
                sequences: self.num_return_sequences,
                beams: self.num_beams,
            });
        }
        if self.num_beams == 1 && !self.do_sample && self.num_return_sequences > 1 {
            return Err(InvalidInput::SeveralFromGreedy { sequences: self.num_return_sequences });
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return out_of_range(Param::Temperature, &self.temperature, "a positive number");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return out_of_range(Param::TopP, &self.top_p, "in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return out_of_range(Param::RepetitionPenalty, &self.repetition_penalty, "a positive number");
        }
        if !self.length_penalty.is_finite() {
            return out_of_range(Param::LengthPenalty, &self.length_penalty, "a finite number");
        }
        Ok(())
    }

    /// These options with `max_new_tokens` set; one such setter per field, for chaining.
    pub fn max_new_tokens(mut self, max_new_tokens: usize) -> Self {
        self.max_new_tokens = max_new_tokens;
        self
    }

    pub fn min_new_tokens(mut self, min_new_tokens: usize) -> Self {
        self.min_new_tokens = min_new_tokens;
        self
    }

    pub fn num_beams(mut self, num_beams: usize) -> Self {
        self.num_beams = num_beams;
        self
    }

    pub fn length_penalty(mut self, length_penalty: f32) -> Self {
        self.length_penalty = length_penalty;
        self
    }

    pub fn early_stopping(mut self, early_stopping: EarlyStopping) -> Self {
        self.early_stopping = early_stopping;
        self
    }

    pub fn num_return_sequences(mut self, num_return_sequences: usize) -> Self {
        self.num_return_sequences = num_return_sequences;
        self
    }

    pub fn do_sample(mut self, do_sample: bool) -> Self {
        self.do_sample = do_sample;
        self
    }

    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    pub fn top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    pub fn top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    pub fn repetition_penalty(mut self, repetition_penalty: f32) -> Self {
        self.repetition_penalty = repetition_penalty;
        self
    }

    pub fn no_repeat_ngram_size(mut self, no_repeat_ngram_size: usize) -> Self {
        self.no_repeat_ngram_size = no_repeat_ngram_size;
        self
    }

    pub fn seed(mut self, seed: Option<u64>) -> Self {
        self.seed = seed;
        self
    }

    /// The options that have no effect with the others (sampling warpers without sampling,
    /// beam settings without beams), as transformers warns about them.
    pub fn ignored(&self) -> Vec<Param> {
        let defaults = Self::default();
        let mut ignored = vec![];
        if !self.do_sample {
            for (param, set) in [
                (Param::Temperature, self.temperature != defaults.temperature),
                (Param::TopK, self.top_k != defaults.top_k),
                (Param::TopP, self.top_p != defaults.top_p),
                (Param::Seed, self.seed.is_some()),
            ] {
                if set {
                    ignored.push(param);
                }
            }
        }
        if self.num_beams == 1 {
            for (param, set) in [
                (Param::LengthPenalty, self.length_penalty != defaults.length_penalty),
                (Param::EarlyStopping, self.early_stopping != defaults.early_stopping),
            ] {
                if set {
                    ignored.push(param);
                }
            }
        }
        ignored
    }
}

/// One generated sequence and how likely the model finds it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Generated {
    /// The whole sequence: the prefix, the new tokens and the end token when produced.
    pub tokens: Vec<u32>,
    /// Tokens generated (the end token included).
    pub new_tokens: usize,
    /// Sum of the model's log-probabilities of the generated tokens (log-softmax of its raw
    /// logits, before penalties and sampling warpers).
    pub log_prob: f32,
    /// The ranking score: transformers' `sequences_scores` for beam search (penalized
    /// log-probabilities / new_tokens ** length_penalty); the mean log-probability otherwise.
    pub score: f32,
}

impl Generated {
    /// Mean log-probability per generated token.
    pub fn mean_log_prob(&self) -> f32 {
        if self.new_tokens == 0 {
            0.0
        } else {
            self.log_prob / self.new_tokens as f32
        }
    }
}

/// A model in the middle of decoding a batch.
pub trait Decoder {
    /// Feeds `input_ids` [rows, t] (the prefix first, then one token per row) and returns the
    /// logits of the next token, [rows, vocab].
    fn next_logits(&mut self, input_ids: &Tensor) -> Result<Tensor>;
    /// Keeps these rows of the current batch, in this order; a row listed twice is copied
    /// (beams and samples start as copies of their input's row).
    fn keep_rows(&mut self, rows: &[u32]) -> Result<()>;
}

/// Generates from every prefix (all of one length) until `eos_token_id` or `max_new_tokens`:
/// `num_return_sequences` sequences per prefix, best first for beam search. The decoder starts
/// with one batch row per prefix; it is expanded for beams and samples with `keep_rows`.
pub fn generate(
    decoder: &mut (impl Decoder + Send),
    prefixes: &[Vec<u32>],
    eos_token_id: u32,
    options: &GenerationOptions,
    device: &Device,
) -> Result<Vec<Vec<Generated>>> {
    generate_streaming(decoder, prefixes, eos_token_id, options, device, &mut |_, _, _| ())
}

/// Called with each token as it is chosen: (prefix, copy, token), the copy numbering the
/// `num_return_sequences` sequences of a prefix. Beam search chooses nothing for certain until
/// it ends, so it calls nothing.
pub type OnToken<'a> = dyn FnMut(usize, usize, u32) + Send + 'a;

/// [`generate`], telling `on_token` each token of greedy search and sampling as it is chosen
/// (a server streams them).
pub fn generate_streaming(
    decoder: &mut (impl Decoder + Send),
    prefixes: &[Vec<u32>],
    eos_token_id: u32,
    options: &GenerationOptions,
    device: &Device,
    on_token: &mut OnToken<'_>,
) -> Result<Vec<Vec<Generated>>> {
    // On a worker of rayon's pool (where candle's CPU kernels and this crate's run), a decoding
    // step's many small parallel steps run inline instead of each being handed to a sleeping
    // worker and waited for. On a worker already, it just runs.
    rayon::scope(|_| {
        let mut generation = Generation::start(decoder, prefixes, eos_token_id, options, device)?;
        while !generation.step(on_token)? {}
        Ok(generation.finish())
    })
}

impl<D: Decoder + ?Sized> Decoder for &mut D {
    fn next_logits(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        (**self).next_logits(input_ids)
    }

    fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
        (**self).keep_rows(rows)
    }
}

/// A decoder whose batch can take the rows of another batch of the same model, decoding from
/// other positions: what lets a generation join a running one (continuous batching).
pub trait Join {
    /// Appends `other`'s rows after this batch's rows.
    fn join(&mut self, other: Self) -> Result<()>;
}

/// A batch being generated one step at a time: what [`generate`] runs to its end, for callers
/// that interleave batches or stop some of a batch's prefixes early. Prefixes are numbered from
/// 0 in the order given to [`Generation::start`]; another generation's prefixes [`join`]ed later
/// are numbered after them. Beam searches step with the rest, a batch row per beam.
///
/// [`join`]: Generation::join
pub struct Generation<D> {
    decoder: D,
    /// The prefixes not yet taken by the caller, by number.
    prefixes: BTreeMap<usize, Prefix>,
    /// The number the next joined prefix gets.
    next_prefix: usize,
    /// Batch row → (prefix, copy) of the sequence it decodes.
    active: Vec<(usize, usize)>,
    /// What the decoder reads next: the prefixes, then each row's last token.
    input: Option<Tensor>,
    device: Device,
}

/// One prefix's sequences and how they are generated.
struct Prefix {
    options: Arc<GenerationOptions>,
    eos_token_id: u32,
    prefix_len: usize,
    /// Its `num_return_sequences` sequences (greedy search and sampling).
    sequences: Vec<Sequence>,
    /// Sequences still being generated (1 for a beam search still searching).
    running: usize,
    /// Its beam search, when `num_beams` > 1: its rows are its beams, in beam order.
    search: Option<beam::Search>,
}

/// A sequence of greedy search or sampling.
struct Sequence {
    tokens: Vec<u32>,
    log_prob: f32,
    sampler: Sampler,
}

impl Prefix {
    /// Its sequences, those still running ending as they are.
    fn generated(self) -> Vec<Generated> {
        if let Some(search) = self.search {
            return search.generated(self.prefix_len, &self.options);
        }
        let prefix_len = self.prefix_len;
        self.sequences
            .into_iter()
            .map(|s| {
                let new_tokens = s.tokens.len() - prefix_len;
                let score = if new_tokens == 0 { 0.0 } else { s.log_prob / new_tokens as f32 };
                Generated { tokens: s.tokens, new_tokens, log_prob: s.log_prob, score }
            })
            .collect()
    }
}

impl<D: Decoder> Generation<D> {
    /// Starts generating from every prefix (all of one length) until `eos_token_id` or
    /// `max_new_tokens`; the decoder holds one batch row per prefix.
    pub fn start(
        decoder: D,
        prefixes: &[Vec<u32>],
        eos_token_id: u32,
        options: &GenerationOptions,
        device: &Device,
    ) -> Result<Self> {
        options.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut generation = Self {
            decoder,
            prefixes: BTreeMap::new(),
            next_prefix: prefixes.len(),
            active: vec![],
            input: None,
            device: device.clone(),
        };
        let Some(first) = prefixes.first() else { return Ok(generation) };
        if prefixes.iter().any(|p| p.len() != first.len()) {
            candle_core::bail!("generation needs prefixes of equal length");
        }
        let options = Arc::new(options.clone());
        let copies = options.num_return_sequences;
        let prefix = |sequences, running, search| Prefix {
            options: options.clone(),
            eos_token_id,
            prefix_len: first.len(),
            sequences,
            running,
            search,
        };
        // Beam search: a row per beam; greedy search and sampling: a row per returned sequence.
        let beams = options.num_beams;
        let per_prefix = if beams > 1 { beams } else { copies };
        let rows: Vec<u32> = (0..prefixes.len() as u32).flat_map(|r| std::iter::repeat_n(r, per_prefix)).collect();
        if per_prefix > 1 {
            generation.decoder.keep_rows(&rows)?;
        }
        generation.active = rows.iter().enumerate().map(|(i, &r)| (r as usize, i % per_prefix)).collect();
        let input: Vec<Vec<u32>> = rows.iter().map(|&r| prefixes[r as usize].clone()).collect();
        generation.input = Some(Tensor::new(input, device)?);
        if beams > 1 {
            for (i, tokens) in prefixes.iter().enumerate() {
                generation.prefixes.insert(i, prefix(vec![], 1, Some(beam::Search::new(tokens, beams))));
            }
            return Ok(generation);
        }
        // One random stream per returned sequence, seeded by its index, so that an input samples
        // the same alone or in a batch.
        let seed = options.seed.unwrap_or_else(random_seed);
        for (i, tokens) in prefixes.iter().enumerate() {
            let sequences = (0..copies)
                .map(|copy| Sequence {
                    tokens: tokens.clone(),
                    log_prob: 0.0,
                    sampler: Sampler::new(seed, copy as u64),
                })
                .collect();
            generation.prefixes.insert(i, prefix(sequences, copies, None));
        }
        Ok(generation)
    }

    /// Whether every sequence has ended.
    pub fn is_done(&self) -> bool {
        self.active.is_empty()
    }

    /// Batch rows being decoded.
    pub fn rows(&self) -> usize {
        self.active.len()
    }

    /// Chooses the next token of every running sequence (the next beams of every beam search);
    /// true once every sequence has ended.
    pub fn step(&mut self, on_token: &mut OnToken<'_>) -> Result<bool> {
        let Some(input) = &self.input else { return Ok(true) };
        let mut logits: Vec<Option<Vec<f32>>> =
            self.decoder.next_logits(input)?.to_vec2::<f32>()?.into_iter().map(Some).collect();
        // The rows that run on (a row listed twice is copied: beams), and what each decodes, in
        // the batch's order: each beam search's block where its first row was, so that a batch
        // whose beams keep their places is not reordered.
        let mut next_rows = Vec::with_capacity(self.active.len());
        let mut next_active = Vec::with_capacity(self.active.len());
        // Beam searches' rows, by prefix: (beam, row).
        let mut searches: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for (row, &(id, copy)) in self.active.iter().enumerate() {
            if self.prefixes[&id].search.is_some() {
                searches.entry(id).or_default().push((copy, row));
            }
        }
        for (row, &(id, copy)) in self.active.iter().enumerate() {
            let prefix = self.prefixes.get_mut(&id).expect("active prefixes are kept");
            if let Some(search) = prefix.search.as_mut() {
                // the whole search, at its first row
                let Some(mut rows) = searches.remove(&id) else { continue };
                rows.sort_unstable();
                let block: Vec<Vec<f32>> =
                    rows.iter().map(|&(_, r)| logits[r].take().expect("each row once")).collect();
                let sources = search.advance(&block, prefix.prefix_len, prefix.eos_token_id, &prefix.options);
                if search.is_done() {
                    prefix.running = 0;
                    continue;
                }
                for (beam, source) in sources.into_iter().enumerate() {
                    next_rows.push(rows[source].1 as u32);
                    next_active.push((id, beam));
                }
                continue;
            }
            let mut scores = logits[row].take().expect("each row once");
            let options = &*prefix.options;
            let sequence = &mut prefix.sequences[copy];
            let step = sequence.tokens.len() - prefix.prefix_len;
            let model_log_probs = processors::log_softmax(&scores);
            apply_processors(&mut scores, &sequence.tokens, step, prefix.eos_token_id, options);
            let token = if options.do_sample {
                warp(&mut scores, options);
                sequence.sampler.draw(&processors::softmax(&scores))
            } else {
                argmax(&scores)
            };
            sequence.log_prob += model_log_probs[token as usize];
            sequence.tokens.push(token);
            on_token(id, copy, token);
            if token != prefix.eos_token_id && step + 1 < options.max_new_tokens {
                next_rows.push(row as u32);
                next_active.push((id, copy));
            } else {
                prefix.running -= 1;
            }
        }
        self.keep(next_rows, next_active)?;
        Ok(self.is_done())
    }

    /// Stops generating `prefix`'s sequences (their caller is gone): they end as they are.
    pub fn stop(&mut self, prefix: usize) -> Result<()> {
        let Some(state) = self.prefixes.get_mut(&prefix) else { return Ok(()) };
        state.running = 0;
        let keep: Vec<u32> = (0..self.active.len() as u32).filter(|&r| self.active[r as usize].0 != prefix).collect();
        if keep.len() == self.active.len() {
            return Ok(());
        }
        if keep.is_empty() {
            self.active.clear();
            self.input = None;
            return Ok(());
        }
        // the rows' next input as it was (before the first step: their whole prefixes)
        if let Some(input) = &self.input {
            self.input = Some(input.index_select(&Tensor::new(keep.as_slice(), &self.device)?, 0)?);
        }
        self.decoder.keep_rows(&keep)?;
        self.active = keep.iter().map(|&r| self.active[r as usize]).collect();
        Ok(())
    }

    /// Keeps these batch rows after a step (in this order, a row listed twice copied), decoding
    /// `active`, and sets the next input to their last tokens.
    fn keep(&mut self, rows: Vec<u32>, active: Vec<(usize, usize)>) -> Result<()> {
        if rows.is_empty() {
            self.active.clear();
            self.input = None;
            return Ok(());
        }
        if !rows.iter().enumerate().all(|(i, &r)| r as usize == i) || rows.len() < self.active.len() {
            self.decoder.keep_rows(&rows)?;
        }
        self.active = active;
        let mut beams_read = BTreeMap::new();
        let mut last = Vec::with_capacity(self.active.len());
        for &(id, copy) in &self.active {
            let prefix = &self.prefixes[&id];
            match &prefix.search {
                Some(search) => {
                    let tokens = beams_read.entry(id).or_insert_with(|| search.last_tokens().collect::<Vec<_>>());
                    last.push(tokens[copy]);
                }
                None => last.push(*prefix.sequences[copy].tokens.last().expect("non-empty")),
            }
        }
        self.input = Some(Tensor::new(last, &self.device)?.unsqueeze(1)?);
        Ok(())
    }

    /// The prefixes whose sequences have all ended, with their sequences (best first for beam
    /// search), taken out of the generation.
    pub fn take_finished(&mut self) -> Vec<(usize, Vec<Generated>)> {
        let finished: Vec<usize> = self.prefixes.iter().filter(|(_, p)| p.running == 0).map(|(&id, _)| id).collect();
        finished.into_iter().map(|id| (id, self.prefixes.remove(&id).expect("listed").generated())).collect()
    }

    /// Per prefix not taken, in order, its sequences (best first for beam search); sequences
    /// still running end as they are.
    pub fn finish(self) -> Vec<Vec<Generated>> {
        self.prefixes.into_values().map(Prefix::generated).collect()
    }
}

impl<D: Decoder + Join> Generation<D> {
    /// Adds `other`'s prefixes to this generation, their rows to its batch: from the next step
    /// they decode together, each with its own options and positions. Both must be between
    /// steps reading one token per row (`other` after its first step, unless its prefixes are a
    /// single token). Returns the number `other`'s prefix 0 has here (the others follow).
    pub fn join(&mut self, other: Self) -> Result<usize> {
        let offset = self.next_prefix;
        // The batch first (what can fail), then the bookkeeping.
        match (&self.input, other.input) {
            (_, None) => {}
            (None, Some(theirs)) => {
                // nothing of this batch runs: the other's decoder takes its place
                self.decoder = other.decoder;
                self.input = Some(theirs);
            }
            (Some(mine), Some(theirs)) => {
                if mine.dim(1)? != theirs.dim(1)? {
                    candle_core::bail!("a generation joins another between steps that read one token per row");
                }
                let input = Tensor::cat(&[mine, &theirs], 0)?;
                self.decoder.join(other.decoder)?;
                self.input = Some(input);
            }
        }
        self.active.extend(other.active.into_iter().map(|(id, copy)| (id + offset, copy)));
        self.next_prefix += other.next_prefix;
        self.prefixes.extend(other.prefixes.into_iter().map(|(id, prefix)| (id + offset, prefix)));
        Ok(offset)
    }
}

/// The processors transformers applies to every search, in its order: repetition penalty,
/// n-gram ban, then the end token forbidden before `min_new_tokens`.
fn apply_processors(scores: &mut [f32], sequence: &[u32], step: usize, eos_token_id: u32, options: &GenerationOptions) {
    if options.repetition_penalty != 1.0 {
        processors::repetition_penalty(scores, sequence, options.repetition_penalty);
    }
    if options.no_repeat_ngram_size > 0 {
        processors::no_repeat_ngram(scores, sequence, options.no_repeat_ngram_size);
    }
    if step < options.min_new_tokens {
        if let Some(score) = scores.get_mut(eos_token_id as usize) {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// The sampling warpers, in transformers' order: temperature, top-k, top-p.
fn warp(scores: &mut [f32], options: &GenerationOptions) {
    if options.temperature != 1.0 {
        for score in scores.iter_mut() {
            *score /= options.temperature;
        }
    }
    if options.top_k != 0 {
        processors::top_k(scores, options.top_k);
    }
    if options.top_p < 1.0 {
        processors::top_p(scores, options.top_p, 1);
    }
}

/// A seeded random stream for sampling (ChaCha8: the same draws on every platform and version).
struct Sampler(rand_chacha::ChaCha8Rng);

impl Sampler {
    fn new(seed: u64, stream: u64) -> Self {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self(rng)
    }

    /// A token drawn with the given probabilities.
    fn draw(&mut self, probs: &[f32]) -> u32 {
        use rand_chacha::rand_core::RngCore;
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        // 53 random bits → uniform in [0, total)
        let mut target = (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last = i;
                target -= p as f64;
                if target < 0.0 {
                    return i as u32;
                }
            }
        }
        last as u32
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    nanos as u64 ^ ((std::process::id() as u64) << 32)
}

/// Index of the largest value, the first one on ties (as `torch.argmax`).
pub(crate) fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits, for row r, the token `script[r][step]` by putting the largest logit there.
    struct Scripted {
        script: Vec<Vec<u32>>,
        rows: Vec<usize>,
        step: usize,
        vocab: usize,
    }

    impl Decoder for Scripted {
        fn next_logits(&mut self, _input: &Tensor) -> Result<Tensor> {
            let mut logits = vec![0f32; self.rows.len() * self.vocab];
            for (i, &r) in self.rows.iter().enumerate() {
                let wanted = self.script[r][self.step] as usize;
                logits[i * self.vocab + wanted] = 2.0;
                logits[i * self.vocab + 9] = 1.0; // the runner-up when eos is forbidden
            }
            self.step += 1;
            Tensor::from_vec(logits, (self.rows.len(), self.vocab), &Device::Cpu)
        }

        fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
            self.rows = rows.iter().map(|&r| self.rows[r as usize]).collect();
            Ok(())
        }
    }

    fn run(script: Vec<Vec<u32>>, options: GenerationOptions) -> Vec<Vec<u32>> {
        let rows = (0..script.len()).collect();
        let prefixes = vec![vec![7]; script.len()];
        let mut decoder = Scripted { script, rows, step: 0, vocab: 12 };
        generate(&mut decoder, &prefixes, 5, &options, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|mut g| g.remove(0).tokens)
            .collect()
    }

    #[test]
    fn rows_stop_at_eos_independently() {
        let out = run(vec![vec![1, 5, 0, 0], vec![2, 3, 4, 5]], GenerationOptions::default());
        assert_eq!(out, vec![vec![7, 1, 5], vec![7, 2, 3, 4, 5]]);
    }

    /// A beam search ended before its end (`finish` mid-way, or its caller gone) returns its
    /// best running beams, as transformers finalizes a search that ran out of length.
    #[test]
    fn a_beam_search_finished_early_returns_its_running_beams() {
        let mut decoder = Scripted { script: vec![vec![1, 2, 3, 4, 5]], rows: vec![0], step: 0, vocab: 12 };
        let options = GenerationOptions::default().num_beams(3).num_return_sequences(2).max_new_tokens(5);
        let mut generation = Generation::start(&mut decoder, &[vec![7]], 5, &options, &Device::Cpu).unwrap();
        assert_eq!(generation.rows(), 3, "a row per beam");
        generation.step(&mut |_, _, _| ()).unwrap();
        generation.step(&mut |_, _, _| ()).unwrap();
        let generated = generation.finish();
        assert_eq!(generated[0].len(), 2);
        assert_eq!(generated[0][0].tokens, vec![7, 1, 2]);
        assert_eq!(generated[0][0].new_tokens, 2);
        assert!(generated[0][0].score >= generated[0][1].score);
    }

    #[test]
    fn max_and_min_new_tokens() {
        let opts = GenerationOptions::default().max_new_tokens(3).min_new_tokens(2);
        let out = run(vec![vec![5, 5, 5, 5]], opts);
        assert_eq!(out, vec![vec![7, 9, 9, 5]]);
    }

    /// The same logits for every row at every step.
    struct Constant {
        logits: Vec<f32>,
        rows: usize,
    }

    impl Decoder for Constant {
        fn next_logits(&mut self, _input: &Tensor) -> Result<Tensor> {
            Tensor::from_vec(self.logits.repeat(self.rows), (self.rows, self.logits.len()), &Device::Cpu)
        }

        fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
            self.rows = rows.len();
            Ok(())
        }
    }

    /// Frequencies of the first sampled token over `draws` independent samples.
    fn frequencies(logits: &[f32], options: GenerationOptions, draws: usize) -> Vec<f64> {
        let options = options.do_sample(true).max_new_tokens(1).num_return_sequences(draws);
        let mut decoder = Constant { logits: logits.to_vec(), rows: 1 };
        let generated = generate(&mut decoder, &[vec![0]], 99, &options, &Device::Cpu).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for g in &generated[0] {
            counts[g.tokens[1] as usize] += 1;
        }
        counts.into_iter().map(|c| c as f64 / draws as f64).collect()
    }

    /// Each frequency within 4.5 standard deviations of its probability (a false alarm has odds
    /// below 1e-5 per token; the seed makes the check repeatable anyway).
    fn assert_frequencies(freqs: &[f64], probs: &[f64], draws: usize) {
        for (token, (&f, &p)) in freqs.iter().zip(probs).enumerate() {
            let bound = 4.5 * (p * (1.0 - p) / draws as f64).sqrt() + 1e-12;
            assert!((f - p).abs() <= bound, "token {token}: frequency {f} vs probability {p}");
        }
    }

    const LOGITS: [f32; 6] = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0];

    fn softmax64(logits: &[f32]) -> Vec<f64> {
        let exps: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect()
    }

    #[test]
    fn sampled_frequencies_follow_the_softmax() {
        let draws = 20000;
        let options = GenerationOptions::default().top_k(0).seed(Some(11));
        assert_frequencies(&frequencies(&LOGITS, options.clone(), draws), &softmax64(&LOGITS), draws);
        // temperature 2 flattens the distribution: softmax(logits / 2)
        let warm = options.temperature(2.0);
        let halved: Vec<f32> = LOGITS.iter().map(|l| l / 2.0).collect();
        assert_frequencies(&frequencies(&LOGITS, warm, draws), &softmax64(&halved), draws);
    }

    #[test]
    fn top_k_and_top_p_never_emit_tokens_outside_their_set() {
        let draws = 20000;
        // top_k 3: only the three best, renormalized
        let options = GenerationOptions::default().top_k(3).seed(Some(5));
        let freqs = frequencies(&LOGITS, options, draws);
        assert!(freqs[3..].iter().all(|&f| f == 0.0), "{freqs:?}");
        assert_frequencies(&freqs[..3], &softmax64(&LOGITS[..3]), draws);

        // top_p 0.8: the smallest set of best tokens reaching 0.8 of the probability
        let probs = softmax64(&LOGITS);
        let nucleus = (1..=probs.len()).find(|&n| probs[..n].iter().sum::<f64>() >= 0.8).unwrap();
        let options = GenerationOptions::default().top_k(0).top_p(0.8).seed(Some(6));
        let freqs = frequencies(&LOGITS, options, draws);
        assert!(freqs[nucleus..].iter().all(|&f| f == 0.0), "nucleus {nucleus}: {freqs:?}");
        assert_frequencies(&freqs[..nucleus], &softmax64(&LOGITS[..nucleus]), draws);
    }

    #[test]
    fn contradictory_options_are_refused() {
        let bad = [
            GenerationOptions::default().top_p(1.5),
            GenerationOptions::default().temperature(0.0),
            GenerationOptions::default().num_beams(2).num_return_sequences(4),
            GenerationOptions::default().num_return_sequences(2),
            GenerationOptions::default().do_sample(true).num_beams(3),
            GenerationOptions::default().min_new_tokens(5).max_new_tokens(3),
        ];
        for options in bad {
            assert!(options.validate().is_err(), "{options:?}");
        }
        assert!(GenerationOptions::default().do_sample(true).num_return_sequences(4).validate().is_ok());
    }

    /// Logits that depend only on each row's own tokens so far (a hash of them), so that a row
    /// gets the same logits whatever else is in the batch: what the model's decoder gives up to
    /// float noise, exactly.
    struct Histories {
        rows: Vec<Vec<u32>>,
        vocab: usize,
    }

    impl Decoder for Histories {
        fn next_logits(&mut self, input: &Tensor) -> Result<Tensor> {
            let input = input.to_vec2::<u32>()?;
            assert_eq!(input.len(), self.rows.len(), "a row of input per batch row");
            let mut logits = Vec::with_capacity(self.rows.len() * self.vocab);
            for (history, tokens) in self.rows.iter_mut().zip(input) {
                history.extend(tokens);
                let mut hash =
                    history.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| (h ^ t as u64).wrapping_mul(0x100_0000_01b3));
                for _ in 0..self.vocab {
                    hash ^= hash << 13;
                    hash ^= hash >> 7;
                    hash ^= hash << 17;
                    logits.push((hash % 1000) as f32 / 150.0);
                }
            }
            Tensor::from_vec(logits, (self.rows.len(), self.vocab), &Device::Cpu)
        }

        fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
            self.rows = rows.iter().map(|&r| self.rows[r as usize].clone()).collect();
            Ok(())
        }
    }

    impl Join for Histories {
        fn join(&mut self, other: Self) -> Result<()> {
            self.rows.extend(other.rows);
            Ok(())
        }
    }

    /// A small deterministic random stream for the test's choices.
    struct Choices(u64);

    impl Choices {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Generations started at random steps, with random options (greedy, sampling, beams,
    /// penalties) and prefixes of random lengths, joined into one running batch, some stopped:
    /// every prefix not stopped gets exactly what it gets alone.
    #[test]
    fn joined_generations_give_what_each_gives_alone() {
        let (vocab, eos) = (23, 3);
        for scenario in 0..200u64 {
            let mut choose = Choices(0x9e37_79b9_7f4a_7c15 ^ (scenario * 7919 + 1));
            let mut requests = Vec::new();
            for _ in 0..1 + choose.below(5) {
                let beams = [1, 1, 2, 3][choose.below(4)];
                let sample = beams == 1 && choose.below(2) == 0;
                let copies = match (beams, sample) {
                    (1, true) => 1 + choose.below(3),
                    (1, false) => 1,
                    (b, _) => 1 + choose.below(b),
                };
                let options = GenerationOptions::default()
                    .max_new_tokens(1 + choose.below(8))
                    .min_new_tokens(choose.below(2))
                    .num_beams(beams)
                    .num_return_sequences(copies)
                    .do_sample(sample)
                    .seed(Some(scenario))
                    .repetition_penalty([1.0, 1.3][choose.below(2)])
                    .no_repeat_ngram_size(choose.below(3));
                let prefix_len = 1 + choose.below(3);
                let prefixes: Vec<Vec<u32>> = (0..1 + choose.below(2))
                    .map(|_| (0..prefix_len).map(|_| 4 + choose.below(vocab - 4) as u32).collect())
                    .collect();
                requests.push((prefixes, options, choose.below(4), choose.below(6) == 0));
            }
            let start = |prefixes: &[Vec<u32>], options: &GenerationOptions| {
                let decoder = Histories { rows: vec![vec![]; prefixes.len()], vocab };
                Generation::start(decoder, prefixes, eos, options, &Device::Cpu).unwrap()
            };
            let alone: Vec<Vec<Vec<Generated>>> = requests
                .iter()
                .map(|(prefixes, options, _, _)| {
                    let mut generation = start(prefixes, options);
                    while !generation.step(&mut |_, _, _| ()).unwrap() {}
                    generation.finish()
                })
                .collect();
            // Each request starts after its delay in steps; a newcomer steps alone once (its
            // prefix), then joins; some are stopped a step after joining.
            let mut running: Option<Generation<Histories>> = None;
            let mut numbers: Vec<Option<usize>> = vec![None; requests.len()];
            let mut finished: BTreeMap<usize, Vec<Generated>> = BTreeMap::new();
            let mut pending: Vec<usize> = (0..requests.len()).collect();
            let mut stops: Vec<(usize, usize)> = Vec::new();
            for step in 0..40 {
                for i in pending.clone() {
                    let (prefixes, options, delay, stop) = &requests[i];
                    if *delay > step {
                        continue;
                    }
                    pending.retain(|&p| p != i);
                    let mut newcomer = start(prefixes, options);
                    newcomer.step(&mut |_, _, _| ()).unwrap();
                    numbers[i] = Some(match running.as_mut() {
                        Some(batch) => batch.join(newcomer).unwrap(),
                        None => {
                            running = Some(newcomer);
                            0
                        }
                    });
                    if *stop {
                        stops.push((step + 1, i));
                    }
                }
                let Some(batch) = running.as_mut() else { continue };
                for &(at, i) in &stops {
                    if at == step {
                        for p in 0..requests[i].0.len() {
                            batch.stop(numbers[i].unwrap() + p).unwrap();
                        }
                    }
                }
                batch.step(&mut |_, _, _| ()).unwrap();
                finished.extend(batch.take_finished());
            }
            let batch = running.expect("something ran");
            assert!(batch.is_done(), "scenario {scenario}: still running after 40 steps");
            for (i, (prefixes, _, _, stop)) in requests.iter().enumerate() {
                if *stop {
                    continue;
                }
                for p in 0..prefixes.len() {
                    let got = &finished[&(numbers[i].unwrap() + p)];
                    let want = &alone[i][p];
                    assert_eq!(got, want, "scenario {scenario}, request {i}, prefix {p}");
                }
            }
        }
    }

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }
}
