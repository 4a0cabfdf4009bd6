//! Captioning or VQA generation for a batch, stepped by the caller: what `caption` and
//! `answer` run to their end, for a server that starts new requests between the steps of
//! running ones and stops those whose client is gone.

use std::collections::BTreeMap;

use super::GeneratedText;
use crate::error::Result;
use crate::generation::{Generated, Generation};
use crate::models::text_decoder::Decoding;
use crate::processor::text::TextProcessor;

/// Called with (input, copy, token) as each token is chosen: `input` is the image (captioning)
/// or question (VQA) of the batch, `copy` numbers its `num_return_sequences` sequences.
pub type OnInputToken<'a> = dyn FnMut(usize, usize, u32) + Send + 'a;

/// A batch's generation between steps. Inputs whose decoder prefixes differ in length
/// (captions with prompts) start as separate groups; after their first step the groups join
/// into one batch, as do the runs [`join`](Self::join)ed to this one (continuous batching).
pub struct GenerationRun<'a> {
    text_processor: &'a TextProcessor,
    /// Inputs numbered so far (joined runs' inputs are numbered after this run's).
    inputs: usize,
    /// Each group's generation, and which input each of its prefixes is.
    groups: Vec<Group<'a>>,
}

struct Group<'a> {
    /// The generation's prefix number → the run's input.
    inputs: BTreeMap<usize, usize>,
    generation: Generation<Decoding<'a>>,
}

impl<'a> GenerationRun<'a> {
    pub(crate) fn new(text_processor: &'a TextProcessor, inputs: usize) -> Self {
        Self { text_processor, inputs, groups: Vec::new() }
    }

    pub(crate) fn push(&mut self, inputs: Vec<usize>, generation: Generation<Decoding<'a>>) {
        self.groups.push(Group { inputs: inputs.into_iter().enumerate().collect(), generation });
    }

    /// Inputs numbered in the run: its own and those of the runs joined to it.
    pub fn len(&self) -> usize {
        self.inputs
    }

    pub fn is_empty(&self) -> bool {
        self.inputs == 0
    }

    /// Whether every sequence has ended.
    pub fn is_done(&self) -> bool {
        self.groups.iter().all(|group| group.generation.is_done())
    }

    /// Sequences being decoded (batch rows).
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|group| group.generation.rows()).sum()
    }

    /// One token more for every running sequence; true once every sequence has ended. Run it on
    /// a worker of rayon's pool (see [`crate::generation::generate`]).
    pub fn step(&mut self, on_token: &mut OnInputToken<'_>) -> Result<bool> {
        for group in &mut self.groups {
            if !group.generation.is_done() {
                let inputs = &group.inputs;
                group.generation.step(&mut |prefix, copy, token| on_token(inputs[&prefix], copy, token))?;
            }
        }
        self.merge_groups()?;
        Ok(self.is_done())
    }

    /// Joins the groups into the first: all read one token per row after a step.
    fn merge_groups(&mut self) -> Result<()> {
        while self.groups.len() > 1 {
            let Group { inputs, generation } = self.groups.pop().expect("more than one");
            let first = &mut self.groups[0];
            let offset = first.generation.join(generation)?;
            first.inputs.extend(inputs.into_iter().map(|(prefix, input)| (prefix + offset, input)));
        }
        Ok(())
    }

    /// Adds `other`'s inputs to this run: they start decoding at the next step, in one batch
    /// with this run's sequences (after their first step, which reads their prefixes). Returns
    /// the number `other`'s input 0 has here (the others follow).
    pub fn join(&mut self, other: GenerationRun<'a>) -> Result<usize> {
        let offset = self.inputs;
        self.inputs += other.inputs;
        for Group { inputs, generation } in other.groups {
            let inputs = inputs.into_iter().map(|(prefix, input)| (prefix, input + offset)).collect();
            self.groups.push(Group { inputs, generation });
        }
        Ok(offset)
    }

    /// Stops generating for `input` (its caller is gone); its sequences end as they are.
    pub fn stop(&mut self, input: usize) -> Result<()> {
        for group in &mut self.groups {
            if let Some((&prefix, _)) = group.inputs.iter().find(|(_, &i)| i == input) {
                group.generation.stop(prefix)?;
            }
        }
        Ok(())
    }

    /// The inputs whose sequences have all ended, with their sequences decoded (best first),
    /// taken out of the run.
    pub fn take_finished(&mut self) -> Result<Vec<(usize, Vec<GeneratedText>)>> {
        let mut finished = Vec::new();
        for group in &mut self.groups {
            for (prefix, sequences) in group.generation.take_finished() {
                let input = group.inputs.remove(&prefix).expect("every prefix is an input");
                let texts = sequences.into_iter().map(|g| decode_generated(self.text_processor, g));
                finished.push((input, texts.collect::<Result<_>>()?));
            }
        }
        self.groups.retain(|group| !group.inputs.is_empty());
        Ok(finished)
    }

    /// Per input, its sequences decoded, best first (none for inputs already taken).
    pub fn finish(self) -> Result<Vec<Vec<GeneratedText>>> {
        let mut texts: Vec<Vec<GeneratedText>> = vec![vec![]; self.inputs];
        for Group { inputs, generation } in self.groups {
            for (input, sequences) in inputs.into_values().zip(generation.finish()) {
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
