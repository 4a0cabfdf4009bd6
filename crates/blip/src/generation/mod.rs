//! Decoding token sequences from a model that gives next-token logits. Greedy search with
//! transformers' `max_new_tokens` / `min_new_tokens` semantics; rows stop independently and
//! finished rows leave the batch.

use candle_core::{Device, Result, Tensor};

use crate::models::cache::DecoderCache;

/// Options of transformers' `generate` that greedy decoding uses, with its defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOptions {
    /// New tokens at most (the prompt not counted).
    pub max_new_tokens: usize,
    /// The end token is forbidden until this many new tokens exist.
    pub min_new_tokens: usize,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self { max_new_tokens: 20, min_new_tokens: 0 }
    }
}

/// A model in the middle of decoding a batch.
pub trait Decoder {
    /// Feeds `input_ids` [rows, t] (the prefix first, then one token per row) and returns the
    /// logits of the next token, [rows, vocab].
    fn next_logits(&mut self, input_ids: &Tensor) -> Result<Tensor>;
    /// Keeps only these rows of the current batch, in this order.
    fn keep_rows(&mut self, rows: &[u32]) -> Result<()>;
}

/// A text decoder with its LM head that continues the sequences held in a cache.
pub trait CausalLm {
    /// Feeds `input_ids` [b, t]; returns the next-token logits [b, vocab].
    fn next_token_logits(&self, input_ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor>;
}

/// A [`CausalLm`] bound to one batch's cache: the [`Decoder`] the engine drives.
pub struct CachedDecoder<'a, M> {
    pub model: &'a M,
    pub cache: DecoderCache,
}

impl<M: CausalLm> Decoder for CachedDecoder<'_, M> {
    fn next_logits(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        self.model.next_token_logits(input_ids, &mut self.cache)
    }

    fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
        self.cache.select_rows(rows)
    }
}

/// Greedy decoding of every row from its prefix (all prefixes of one length) until `eos_token_id`
/// or `max_new_tokens`. Returns each row's full sequence, prefix included, ending with the eos
/// token when one was produced — the sequences transformers' `generate` returns, without the
/// padding it appends to rows that finished early.
pub fn greedy(
    decoder: &mut impl Decoder,
    prefixes: &[Vec<u32>],
    eos_token_id: u32,
    options: &GenerationOptions,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let Some(first) = prefixes.first() else { return Ok(vec![]) };
    if prefixes.iter().any(|p| p.len() != first.len()) {
        candle_core::bail!("greedy decoding needs prefixes of equal length");
    }
    let mut sequences = prefixes.to_vec();
    // Batch row → index into `sequences`.
    let mut active: Vec<usize> = (0..prefixes.len()).collect();
    let mut input = Tensor::new(prefixes.to_vec(), device)?;
    for step in 0..options.max_new_tokens {
        let logits = decoder.next_logits(&input)?.to_vec2::<f32>()?;
        let mut still_running = Vec::with_capacity(active.len());
        for (row, (&seq, mut row_logits)) in active.iter().zip(logits).enumerate() {
            if step < options.min_new_tokens {
                if let Some(l) = row_logits.get_mut(eos_token_id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            let token = argmax(&row_logits);
            sequences[seq].push(token);
            if token != eos_token_id {
                still_running.push(row as u32);
            }
        }
        if still_running.is_empty() || step + 1 == options.max_new_tokens {
            break;
        }
        if still_running.len() < active.len() {
            decoder.keep_rows(&still_running)?;
            active = still_running.iter().map(|&r| active[r as usize]).collect();
        }
        let last: Vec<u32> = active.iter().map(|&s| *sequences[s].last().expect("non-empty")).collect();
        input = Tensor::new(last, device)?.unsqueeze(1)?;
    }
    Ok(sequences)
}

/// Index of the largest value, the first one on ties (as `torch.argmax`).
fn argmax(values: &[f32]) -> u32 {
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
        greedy(&mut decoder, &prefixes, 5, &options, &Device::Cpu).unwrap()
    }

    #[test]
    fn rows_stop_at_eos_independently() {
        let out = run(vec![vec![1, 5, 0, 0], vec![2, 3, 4, 5]], GenerationOptions::default());
        assert_eq!(out, vec![vec![7, 1, 5], vec![7, 2, 3, 4, 5]]);
    }

    #[test]
    fn max_and_min_new_tokens() {
        let opts = GenerationOptions { max_new_tokens: 3, min_new_tokens: 2 };
        let out = run(vec![vec![5, 5, 5, 5]], opts);
        assert_eq!(out, vec![vec![7, 9, 9, 5]]);
    }

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }
}
