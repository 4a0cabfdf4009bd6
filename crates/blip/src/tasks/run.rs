//! Captioning or VQA generation for a batch, stepped by the caller: what `caption` and
//! `answer` run to their end, for a server that starts new requests between the steps of
//! running ones and stops those whose client is gone.

use super::GeneratedText;
use crate::error::Result;
use crate::generation::{Generated, Generation};
use crate::models::text_decoder::Decoding;
use crate::processor::text::TextProcessor;

/// Called with (input, copy, token) as each token is chosen: `input` is the image (captioning)
/// or question (VQA) of the batch, `copy` numbers its `num_return_sequences` sequences.
pub type OnInputToken<'a> = dyn FnMut(usize, usize, u32) + Send + 'a;

/// A batch's generation between steps. Inputs whose decoder prefixes differ in length
/// (captions with prompts) decode as separate groups, each stepped in turn.
pub struct GenerationRun<'a> {
    text_processor: &'a TextProcessor,
    inputs: usize,
    /// The batch's inputs in each group, and the group's generation.
    groups: Vec<(Vec<usize>, Generation<Decoding<'a>>)>,
}

impl<'a> GenerationRun<'a> {
    pub(crate) fn new(text_processor: &'a TextProcessor, inputs: usize) -> Self {
        Self { text_processor, inputs, groups: Vec::new() }
    }

    pub(crate) fn push(&mut self, inputs: Vec<usize>, generation: Generation<Decoding<'a>>) {
        self.groups.push((inputs, generation));
    }

    /// Inputs in the batch.
    pub fn len(&self) -> usize {
        self.inputs
    }

    pub fn is_empty(&self) -> bool {
        self.inputs == 0
    }

    /// Whether every sequence has ended.
    pub fn is_done(&self) -> bool {
        self.groups.iter().all(|(_, generation)| generation.is_done())
    }

    /// One token more for every running sequence; true once every sequence has ended. Run it on
    /// a worker of rayon's pool (see [`crate::generation::generate`]).
    pub fn step(&mut self, on_token: &mut OnInputToken<'_>) -> Result<bool> {
        for (inputs, generation) in &mut self.groups {
            if !generation.is_done() {
                generation.step(&mut |prefix, copy, token| on_token(inputs[prefix], copy, token))?;
            }
        }
        Ok(self.is_done())
    }

    /// Stops generating for `input` (its caller is gone); its sequences end as they are.
    pub fn stop(&mut self, input: usize) -> Result<()> {
        for (inputs, generation) in &mut self.groups {
            if let Some(prefix) = inputs.iter().position(|&i| i == input) {
                generation.stop(prefix)?;
            }
        }
        Ok(())
    }

    /// Per input, its sequences decoded, best first.
    pub fn finish(self) -> Result<Vec<Vec<GeneratedText>>> {
        let mut texts: Vec<Vec<GeneratedText>> = vec![vec![]; self.inputs];
        for (inputs, generation) in self.groups {
            for (&input, sequences) in inputs.iter().zip(generation.finish()) {
                texts[input] =
                    sequences.into_iter().map(|g| decode_generated(self.text_processor, g)).collect::<Result<_>>()?;
            }
        }
        Ok(texts)
    }

    /// Steps to the end on a worker of rayon's pool, then decodes.
    pub(crate) fn run(mut self, on_token: &mut OnInputToken<'_>) -> Result<Vec<Vec<GeneratedText>>> {
        rayon::scope(|_| {
            while !self.step(on_token)? {}
            self.finish()
        })
    }
}

/// A generated sequence with its decoded text.
pub(crate) fn decode_generated(text_processor: &TextProcessor, generated: Generated) -> Result<GeneratedText> {
    Ok(GeneratedText {
        text: text_processor.decode(&generated.tokens)?,
        score: generated.score,
        log_prob: generated.log_prob,
        tokens: generated.tokens,
    })
}
