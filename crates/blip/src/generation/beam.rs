//! Beam search exactly as transformers 5's `_beam_search`: per input, the 2·num_beams best
//! continuations of all beams; the best num_beams unfinished ones run on; those of the first
//! num_beams that end (end token or maximum length) compete, length-normalized, for the
//! num_beams finished slots; an input stops when its finished slots cannot be beaten any more.

use super::{apply_processors, processors, EarlyStopping, Generated, GenerationOptions};

/// transformers' stand-in for minus infinity in beam bookkeeping.
const NEG: f32 = -1.0e9;

#[derive(Clone)]
struct Beam {
    tokens: Vec<u32>,
    /// Sum of processed log-probabilities (transformers' running beam score).
    score: f32,
    /// Sum of the model's own log-probabilities of the generated tokens.
    log_prob: f32,
}

#[derive(Clone)]
struct Hypothesis {
    beam: Beam,
    /// Length-normalized score (with transformers' −1e9 markers when not finished).
    score: f32,
    finished: bool,
}

/// The beam search of one input, stepped by [`super::Generation`] with the logits of its
/// `num_beams` batch rows.
pub(super) struct Search {
    running: Vec<Beam>,
    /// Always num_beams slots, best first.
    finished: Vec<Hypothesis>,
    improvable: bool,
    done: bool,
}

struct Candidate {
    beam: Beam,
    source: usize,
    hits_stop: bool,
}

impl Search {
    /// The search from `prefix` with `beams` beams: the first beam live, the others copies
    /// that cannot win (transformers' −1e9 start), so that the first step does not pick the
    /// same continuation `beams` times.
    pub(super) fn new(prefix: &[u32], beams: usize) -> Self {
        let beam = |score| Beam { tokens: prefix.to_vec(), score, log_prob: 0.0 };
        Search {
            running: (0..beams).map(|b| beam(if b == 0 { 0.0 } else { NEG })).collect(),
            finished: (0..beams).map(|_| Hypothesis { beam: beam(NEG), score: NEG, finished: false }).collect(),
            improvable: true,
            done: false,
        }
    }

    /// Whether the search has ended.
    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// The last token of each running beam, in beam order: what its batch rows read next.
    pub(super) fn last_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.running.iter().map(|b| *b.tokens.last().expect("non-empty"))
    }

    /// One step on this input's beam logits [beams][vocab] (its rows, in beam order); returns,
    /// for each new running beam, the beam it continues.
    pub(super) fn advance(
        &mut self,
        logits: &[Vec<f32>],
        prompt_len: usize,
        eos_token_id: u32,
        options: &GenerationOptions,
    ) -> Vec<usize> {
        let cur_len = self.running[0].tokens.len();
        let (max_len, keep) = (prompt_len + options.max_new_tokens, 2 * options.num_beams);
        self.step(logits, cur_len, prompt_len, max_len, keep, eos_token_id, options)
    }

    /// The best `num_return_sequences` sequences, best first. A search stopped before its end
    /// (its caller gone, or finished early) has its running beams compete with the finished
    /// ones, each scored at its length, as transformers' beam search finalizes.
    pub(super) fn generated(mut self, prompt_len: usize, options: &GenerationOptions) -> Vec<Generated> {
        if !self.done {
            let mut candidates: Vec<Hypothesis> = self.finished.into_iter().filter(|h| h.finished).collect();
            for beam in self.running.into_iter().filter(|b| b.score > NEG / 2.0) {
                let length = ((beam.tokens.len() - prompt_len).max(1) as f64).powf(options.length_penalty as f64);
                let score = beam.score / length as f32;
                candidates.push(Hypothesis { beam, score, finished: true });
            }
            let scores: Vec<f32> = candidates.iter().map(|h| h.score).collect();
            self.finished =
                top_indices(&scores, options.num_beams).into_iter().map(|i| candidates[i].clone()).collect();
        }
        self.finished
            .into_iter()
            .take(options.num_return_sequences)
            .map(|h| {
                let new_tokens = h.beam.tokens.len() - prompt_len;
                Generated { tokens: h.beam.tokens, new_tokens, log_prob: h.beam.log_prob, score: h.score }
            })
            .collect()
    }
}

impl Search {
    /// One step on this input's beam logits [beams][vocab]; returns, for each new running
    /// beam, the beam it continues.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        logits: &[Vec<f32>],
        cur_len: usize,
        prompt_len: usize,
        max_len: usize,
        keep: usize,
        eos_token_id: u32,
        options: &GenerationOptions,
    ) -> Vec<usize> {
        let beams = self.running.len();
        let step = cur_len - prompt_len;
        // Accumulated scores of every (beam, token), flattened beam-major as transformers does.
        let vocab = logits[0].len();
        let mut accumulated = Vec::with_capacity(beams * vocab);
        let mut model_log_probs = Vec::with_capacity(beams);
        for (beam, logits) in self.running.iter().zip(logits) {
            let raw = processors::log_softmax(logits);
            let mut scores = raw.clone();
            apply_processors(&mut scores, &beam.tokens, step, eos_token_id, options);
            accumulated.extend(scores.iter().map(|&s| s + beam.score));
            model_log_probs.push(raw);
        }
        let top = top_indices(&accumulated, keep);
        let candidates: Vec<Candidate> = top
            .iter()
            .map(|&flat| {
                let (source, token) = (flat / vocab, flat % vocab);
                let parent = &self.running[source];
                let mut tokens = parent.tokens.clone();
                tokens.push(token as u32);
                let hits_stop = token as u32 == eos_token_id || tokens.len() >= max_len;
                let log_prob = parent.log_prob + model_log_probs[source][token];
                Candidate { beam: Beam { tokens, score: accumulated[flat], log_prob }, source, hits_stop }
            })
            .collect();

        // The best unfinished continuations run on (finished ones pushed down by −1e9).
        let running_scores: Vec<f32> =
            candidates.iter().map(|c| c.beam.score + if c.hits_stop { NEG } else { 0.0 }).collect();
        let next = top_indices(&running_scores, beams);
        let sources: Vec<usize> = next.iter().map(|&k| candidates[k].source).collect();
        let next_running: Vec<Beam> =
            next.iter().map(|&k| Beam { score: running_scores[k], ..candidates[k].beam.clone() }).collect();

        // Finished slots: the previous ones and the just-finished among the first `beams`.
        let length = ((cur_len + 1 - prompt_len) as f64).powf(options.length_penalty as f64) as f32;
        let all_finished = self.finished.iter().all(|h| h.finished);
        let full = all_finished && options.early_stopping == EarlyStopping::Done;
        let mut merged: Vec<Hypothesis> = self.finished.clone();
        for (k, candidate) in candidates.iter().enumerate() {
            let just_finished = candidate.hits_stop && k < beams;
            let mut score = candidate.beam.score / length;
            score += if full { NEG } else { 0.0 };
            score += if self.improvable { 0.0 } else { NEG };
            score += if just_finished { 0.0 } else { NEG };
            merged.push(Hypothesis { beam: candidate.beam.clone(), score, finished: just_finished });
        }
        let merged_scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        self.finished = top_indices(&merged_scores, beams).into_iter().map(|i| merged[i].clone()).collect();
        self.running = next_running;

        // Can the running beams still beat the finished ones?
        let generated = cur_len + 1 - prompt_len;
        let best_length = if options.early_stopping == EarlyStopping::Never && options.length_penalty > 0.0 {
            max_len - prompt_len
        } else {
            generated
        };
        let best_possible = self.running[0].score / (best_length as f64).powf(options.length_penalty as f64) as f32;
        let worst_finished = self.finished.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
        let beatable = self.finished.iter().any(|h| best_possible > if h.finished { worst_finished } else { NEG });
        self.improvable &= beatable;
        let all_finished = self.finished.iter().all(|h| h.finished);
        let all_stopped = candidates.iter().all(|c| c.hits_stop);
        self.done = !self.improvable || (all_finished && options.early_stopping == EarlyStopping::Done) || all_stopped;
        sources
    }
}

/// Indices of the `k` largest values, largest first; equal values in index order.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    let mut order: Vec<usize> = (0..values.len()).collect();
    if k < values.len() {
        order.select_nth_unstable_by(k, |&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        order.truncate(k);
    }
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order
}
