//! The library's error type: every failure names the input it concerns and, where there is one,
//! the fix. Requests refused before any computation are [`InvalidInput`]s, typed so that a front
//! end can name the options in its own words (a CLI flag, a JSON field).

use std::path::PathBuf;

use crate::config::Architecture;

/// Everything that can go wrong between a checkpoint or image on disk and a caption.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image file could not be opened or decoded.
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },

    /// A checkpoint is missing, unreadable, or not the kind of model asked for.
    #[error("{location}: {reason}")]
    Checkpoint { location: String, reason: String },

    /// A checkpoint of another architecture than the task needs.
    #[error(
        "{location}: is a {} checkpoint; {task} needs a {} checkpoint such as {example}",
        found.class_name(),
        names(wanted)
    )]
    WrongArchitecture {
        location: String,
        found: Architecture,
        task: &'static str,
        wanted: &'static [Architecture],
        example: &'static str,
    },

    /// A configuration file does not parse or holds impossible values.
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },

    /// A request the model cannot serve: an option out of range, options that contradict each
    /// other, an empty or too long text.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),

    /// A file or folder a training run reads or writes (its data, its checkpoints) could not be
    /// used; a data line that cannot be used names its line.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },

    /// A training run that cannot go on as asked (a resumed run whose state does not fit).
    #[error("training: {0}")]
    Training(String),

    /// Tokenizer failures (loading tokenizer.json, encoding, decoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Tensor-library errors: a bug or an exhausted resource, not a user mistake.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn image(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Image { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn checkpoint(location: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Error::Checkpoint { location: location.to_string(), reason: reason.to_string() }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), reason: reason.to_string() }
    }

    /// The validation error, when this is one.
    pub fn invalid_input(&self) -> Option<&InvalidInput> {
        match self {
            Error::InvalidInput(invalid) => Some(invalid),
            _ => None,
        }
    }
}

fn names(architectures: &[Architecture]) -> String {
    architectures.iter().map(|a| a.class_name()).collect::<Vec<_>>().join(" or ")
}

/// An option or input of a request, by the name transformers (or, for the tasks it lacks, this
/// library) gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Param {
    MaxNewTokens,
    MinNewTokens,
    NumBeams,
    LengthPenalty,
    EarlyStopping,
    NumReturnSequences,
    DoSample,
    Temperature,
    TopK,
    TopP,
    RepetitionPenalty,
    NoRepeatNgramSize,
    Seed,
    /// The text a caption continues.
    Prompt,
    /// A question about an image.
    Question,
    /// A text to match or embed.
    Text,
    /// A zero-shot class label.
    Label,
    /// The text each label is put into.
    Template,
    /// Labels rescored with the ITM head.
    Rerank,
    /// The closed answer list of ranked VQA.
    Answers,
    /// Answers scored in full when ranking.
    Candidates,
    /// Ranked answers returned.
    Top,
    /// The images of a request.
    Images,
    /// CapFilt's filter threshold.
    Threshold,
    /// Fine-tuning: passes over the training data.
    Epochs,
    /// Fine-tuning: the peak learning rate.
    LearningRate,
    /// Fine-tuning: examples per forward pass.
    BatchSize,
    /// Fine-tuning: forward passes per optimizer step.
    GradientAccumulationSteps,
    /// Fine-tuning: AdamW's decoupled weight decay.
    WeightDecay,
    /// Fine-tuning: the global gradient norm clipped to.
    MaxGradNorm,
    /// Fine-tuning: the cross-entropy's label smoothing.
    LabelSmoothing,
    /// Fine-tuning: optimizer steps between evaluations.
    EvalSteps,
    /// The resolution images are resized to, the position embeddings interpolated to.
    ImageSize,
    /// Grad-CAM: the text encoder layer whose cross-attention is weighed.
    GradcamLayer,
    /// Token ids, attention masks and labels of a loss.
    InputIds,
    AttentionMask,
    Labels,
}

impl Param {
    /// The name in transformers' keyword arguments (`max_new_tokens`, ...) or this library's.
    pub fn name(self) -> &'static str {
        match self {
            Param::MaxNewTokens => "max_new_tokens",
            Param::MinNewTokens => "min_new_tokens",
            Param::NumBeams => "num_beams",
            Param::LengthPenalty => "length_penalty",
            Param::EarlyStopping => "early_stopping",
            Param::NumReturnSequences => "num_return_sequences",
            Param::DoSample => "do_sample",
            Param::Temperature => "temperature",
            Param::TopK => "top_k",
            Param::TopP => "top_p",
            Param::RepetitionPenalty => "repetition_penalty",
            Param::NoRepeatNgramSize => "no_repeat_ngram_size",
            Param::Seed => "seed",
            Param::Prompt => "prompt",
            Param::Question => "question",
            Param::Text => "text",
            Param::Label => "label",
            Param::Template => "template",
            Param::Rerank => "rerank",
            Param::Answers => "answers",
            Param::Candidates => "candidates",
            Param::Top => "top",
            Param::Images => "images",
            Param::Threshold => "threshold",
            Param::InputIds => "input_ids",
            Param::AttentionMask => "attention_mask",
            Param::Labels => "labels",
            Param::Epochs => "num_train_epochs",
            Param::LearningRate => "learning_rate",
            Param::BatchSize => "batch_size",
            Param::GradientAccumulationSteps => "gradient_accumulation_steps",
            Param::WeightDecay => "weight_decay",
            Param::MaxGradNorm => "max_grad_norm",
            Param::LabelSmoothing => "label_smoothing",
            Param::EvalSteps => "eval_steps",
            Param::ImageSize => "image_size",
            Param::GradcamLayer => "block_num",
        }
    }
}

impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A request refused before any computation, naming the offending option and value. Its text
/// comes from [`InvalidInput::message`], which a front end calls with its own names for the
/// options; `Display` uses [`Param::name`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum InvalidInput {
    /// `param` has a value outside what it accepts (`accepted` says what does).
    OutOfRange { param: Param, value: String, accepted: &'static str },
    /// `min_new_tokens` above `max_new_tokens`.
    MinAboveMax { min: usize, max: usize },
    /// Beam search returns at most its beams.
    MoreSequencesThanBeams { sequences: usize, beams: usize },
    /// Greedy search gives one sequence per input.
    SeveralFromGreedy { sequences: usize },
    /// Sampling runs with one beam (beam-search multinomial sampling is not supported).
    SamplingWithBeams { beams: usize },
    /// The prompt, with `max_new_tokens` new tokens, does not fit the model's positions.
    PromptTooLong { prompt_tokens: usize, max_new_tokens: usize, positions: usize },
    /// `max_new_tokens` does not fit the decoder's positions.
    TooManyNewTokens { max_new_tokens: usize, positions: usize },
    /// An answer of the list is longer than the decoder's positions.
    AnswerTooLong { answer: String, tokens: usize, positions: usize },
    /// An empty text (`index`: its place among several, from 0).
    Empty { param: Param, index: Option<usize> },
    /// A list that needs at least one entry has none.
    NoneGiven { param: Param },
    /// The same entry twice where entries must differ.
    Duplicate { param: Param, value: String },
    /// A template without the `{}` where the label goes.
    NoPlaceholder { template: String },
    /// Per-image inputs (prompts, questions) that do not match the images in number.
    CountMismatch { param: Param, given: usize, images: usize },
    /// Images of different sizes given to a processor that does not resize.
    UnequalSizes { first: (u32, u32), other: (u32, u32) },
    /// `param` needs a head this checkpoint does not have.
    NeedsArchitecture { param: Param, needs: Architecture, found: Architecture },
}

impl InvalidInput {
    /// The option or input at fault.
    pub fn param(&self) -> Param {
        match self {
            InvalidInput::OutOfRange { param, .. }
            | InvalidInput::Empty { param, .. }
            | InvalidInput::NoneGiven { param }
            | InvalidInput::Duplicate { param, .. }
            | InvalidInput::CountMismatch { param, .. }
            | InvalidInput::NeedsArchitecture { param, .. } => *param,
            InvalidInput::MinAboveMax { .. } => Param::MinNewTokens,
            InvalidInput::MoreSequencesThanBeams { .. } | InvalidInput::SeveralFromGreedy { .. } => {
                Param::NumReturnSequences
            }
            InvalidInput::SamplingWithBeams { .. } => Param::DoSample,
            InvalidInput::PromptTooLong { .. } => Param::Prompt,
            InvalidInput::TooManyNewTokens { .. } => Param::MaxNewTokens,
            InvalidInput::AnswerTooLong { .. } => Param::Answers,
            InvalidInput::NoPlaceholder { .. } => Param::Template,
            InvalidInput::UnequalSizes { .. } => Param::Images,
        }
    }

    /// Every option the refusal involves: the one at fault and those it conflicts with.
    pub fn params(&self) -> Vec<Param> {
        match self {
            InvalidInput::MinAboveMax { .. } => vec![Param::MinNewTokens, Param::MaxNewTokens],
            InvalidInput::MoreSequencesThanBeams { .. } => vec![Param::NumReturnSequences, Param::NumBeams],
            InvalidInput::SeveralFromGreedy { .. } => {
                vec![Param::NumReturnSequences, Param::NumBeams, Param::DoSample]
            }
            InvalidInput::SamplingWithBeams { .. } => vec![Param::DoSample, Param::NumBeams],
            InvalidInput::PromptTooLong { .. } => vec![Param::Prompt, Param::MaxNewTokens],
            other => vec![other.param()],
        }
    }

    /// The message, with every option written as `name` writes it (e.g. a CLI's `--num-beams`).
    pub fn message(&self, name: &dyn Fn(Param) -> String) -> String {
        match self {
            InvalidInput::OutOfRange { param, value, accepted } => {
                format!("{} must be {accepted}, not {value}", name(*param))
            }
            InvalidInput::MinAboveMax { min, max } => {
                format!("{} {min} is larger than {} {max}", name(Param::MinNewTokens), name(Param::MaxNewTokens))
            }
            InvalidInput::MoreSequencesThanBeams { sequences, beams } => format!(
                "{} {sequences} is larger than {} {beams}: beam search returns at most its beams",
                name(Param::NumReturnSequences),
                name(Param::NumBeams)
            ),
            InvalidInput::SeveralFromGreedy { sequences } => format!(
                "greedy search gives one sequence, not {} {sequences}: use beam search ({} {sequences} or more) or {}",
                name(Param::NumReturnSequences),
                name(Param::NumBeams),
                name(Param::DoSample)
            ),
            InvalidInput::SamplingWithBeams { beams } => format!(
                "{} samples with one beam, not {} {beams}: beam-search multinomial sampling is not supported",
                name(Param::DoSample),
                name(Param::NumBeams)
            ),
            InvalidInput::PromptTooLong { prompt_tokens, max_new_tokens, positions } => {
                let room = positions.saturating_sub(*prompt_tokens);
                if room == 0 {
                    format!(
                        "the {} is {prompt_tokens} tokens long; the model has only {positions} positions: shorten it",
                        name(Param::Prompt)
                    )
                } else {
                    format!(
                        "the {} ({prompt_tokens} tokens) plus {} {max_new_tokens} exceed the model's {positions} positions: shorten it or set {} to at most {room}",
                        name(Param::Prompt),
                        name(Param::MaxNewTokens),
                        name(Param::MaxNewTokens)
                    )
                }
            }
            InvalidInput::TooManyNewTokens { max_new_tokens, positions } => format!(
                "{} {max_new_tokens} exceeds the model's {positions} positions: set it to at most {}",
                name(Param::MaxNewTokens),
                positions.saturating_sub(1)
            ),
            InvalidInput::AnswerTooLong { answer, tokens, positions } => format!(
                "{}: \"{answer}\" is {tokens} tokens long; the model has {positions} positions",
                name(Param::Answers)
            ),
            InvalidInput::Empty { param, index: Some(i) } => {
                format!("{} number {} is empty: give some words", name(*param), i + 1)
            }
            InvalidInput::Empty { param, index: None } => format!("{} is empty: give some words", name(*param)),
            InvalidInput::NoneGiven { param } => format!("no {} given", name(*param)),
            InvalidInput::Duplicate { param, value } => format!("{} has \"{value}\" twice", name(*param)),
            InvalidInput::NoPlaceholder { template } => {
                format!("{} \"{template}\" has no {{}} where the label goes", name(Param::Template))
            }
            InvalidInput::CountMismatch { param, given, images } => {
                format!("{given} {} for {images} images: give one per image", name(*param))
            }
            InvalidInput::UnequalSizes { first, other } => format!(
                "images of different sizes ({}x{} and {}x{}) cannot be batched without resizing",
                first.0, first.1, other.0, other.1
            ),
            InvalidInput::NeedsArchitecture { param, needs, found } => {
                let head = match needs {
                    Architecture::ImageTextRetrieval => " (its ITM head)",
                    Architecture::Model => " (its projections and logit scale)",
                    _ => "",
                };
                format!(
                    "{} needs a {} checkpoint{head}; this one is a {}",
                    name(*param),
                    needs.class_name(),
                    found.class_name()
                )
            }
        }
    }
}

impl std::fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message(&|param| param.name().to_string()))
    }
}

impl std::error::Error for InvalidInput {}
