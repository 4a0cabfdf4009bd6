//! Fine-tuning a captioning or VQA checkpoint on one's own data, as a PyTorch loop with
//! `torch.optim.AdamW` does it: the examples in a seeded order per epoch, the loss of each
//! micro-batch divided by the accumulation steps, gradients summed over them, clipped by their
//! global norm, one AdamW step and one schedule step per optimizer step. Checkpoints are saved in
//! the Hub's layout, with the optimizer state beside the weights so that a run resumes exactly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{epoch_order, Dataset, Example, TrainTask};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use super::{Params, Trained};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, InvalidInput, Param, Result};
use crate::processor::image::load_image;
use crate::tasks::caption::Captioner;
use crate::tasks::vqa::QuestionAnswerer;
use crate::RgbImage;

/// A run's settings (`blip finetune`'s flags), saved with each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FinetuneOptions {
    pub task: TrainTask,
    pub epochs: u64,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    pub freeze_vision: bool,
    pub seed: u64,
    /// `None`: the config's `label_smoothing` (0.0 on the Hub's checkpoints).
    pub label_smoothing: Option<f64>,
    /// Optimizer steps between evaluations (`None`: at the end of each epoch only).
    pub eval_every: Option<u64>,
    /// Skip (and count) unusable data lines and images instead of stopping.
    pub skip_bad: bool,
    /// Train at this resolution (position embeddings interpolated); the saved checkpoints'
    /// image processor says it. `None`: the checkpoint's.
    #[serde(default)]
    pub image_size: Option<usize>,
}

impl FinetuneOptions {
    /// `blip finetune`'s defaults for `task`.
    pub fn new(task: TrainTask) -> Self {
        Self {
            task,
            epochs: 3,
            lr: 1e-5,
            batch_size: 8,
            grad_accum: 1,
            weight_decay: 0.05,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            max_grad_norm: Some(1.0),
            freeze_vision: false,
            seed: 42,
            label_smoothing: None,
            eval_every: None,
            skip_bad: false,
            image_size: None,
        }
    }

    /// Refuses settings no run can use, naming the option.
    pub fn validate(&self) -> Result<()> {
        let out_of_range =
            |param, value: String, accepted| Err(InvalidInput::OutOfRange { param, value, accepted }.into());
        if self.epochs == 0 {
            return out_of_range(Param::Epochs, "0".into(), "at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return out_of_range(Param::LearningRate, self.lr.to_string(), "a positive number");
        }
        if self.batch_size == 0 {
            return out_of_range(Param::BatchSize, "0".into(), "at least 1");
        }
        if self.grad_accum == 0 {
            return out_of_range(Param::GradientAccumulationSteps, "0".into(), "at least 1");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return out_of_range(Param::WeightDecay, self.weight_decay.to_string(), "0 or more");
        }
        if let Some(norm) = self.max_grad_norm {
            if !(norm.is_finite() && norm > 0.0) {
                return out_of_range(Param::MaxGradNorm, norm.to_string(), "a positive number");
            }
        }
        if let Some(smoothing) = self.label_smoothing {
            if !(0.0..=1.0).contains(&smoothing) {
                return out_of_range(Param::LabelSmoothing, smoothing.to_string(), "between 0 and 1");
            }
        }
        if self.eval_every == Some(0) {
            return out_of_range(Param::EvalSteps, "0".into(), "at least 1");
        }
        Ok(())
    }
}

/// Where a run is: the next micro-batch to take, and the optimizer steps taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    /// The next micro-batch of the epoch.
    pub batch: usize,
    /// Optimizer steps taken.
    pub step: u64,
}

/// `trainer_state.json`: what a resumed run needs besides the weights and the optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    options: FinetuneOptions,
    position: Position,
    total_steps: u64,
    /// A fingerprint of the training examples (paths and texts, in file order): resuming on
    /// other data would not continue the same run.
    #[serde(default)]
    data_fingerprint: String,
    /// The checkpoint the run started from.
    source: String,
}

const TRAINER_STATE: &str = "trainer_state.json";
const OPTIMIZER_STATE: &str = "optimizer.safetensors";
/// The files of a checkpoint besides its weights, copied into each saved one when present.
const CHECKPOINT_FILES: [&str; 8] = [
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// The model being trained.
enum Model {
    Caption(Captioner),
    Vqa(QuestionAnswerer),
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StepReport {
    pub position: Position,
    pub total_steps: u64,
    /// The mean of the step's micro-batch losses.
    pub loss: f32,
    /// Each micro-batch's loss (before the division by the accumulation steps).
    pub micro_losses: Vec<f32>,
    pub lr: f64,
    pub grad_norm: f64,
}

/// An evaluation: the mean loss over the eval data and, when captioning, a few captions.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EvalReport {
    pub step: u64,
    pub loss: f32,
    /// (image, greedy caption) of the first eval images.
    pub captions: Vec<(PathBuf, String)>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Outcome {
    pub position: Position,
    /// Interrupted (the stop flag) before the last step: the checkpoint saved can be resumed.
    pub interrupted: bool,
    /// The last checkpoint saved.
    pub saved: PathBuf,
    /// Examples skipped for unreadable images (with `skip_bad`), as (line, why).
    pub skipped: Vec<(usize, String)>,
}

/// What a front end is told as a run goes.
pub trait Observer {
    fn step(&mut self, _report: &StepReport) {}
    fn eval(&mut self, _report: &EvalReport) {}
    fn saved(&mut self, _dir: &Path) {}
}

/// A fine-tuning run: the model, its trained weights and optimizer, the data, where it is.
pub struct Finetuner {
    model: Model,
    params: Params,
    optimizer: AdamW,
    options: FinetuneOptions,
    position: Position,
    /// The checkpoint the run started from (its other files are copied into saved ones).
    source: Checkpoint,
    source_name: String,
    train: Dataset,
    eval: Option<Dataset>,
    skipped: Vec<(usize, String)>,
}

impl Finetuner {
    /// A new run of `options` from the checkpoint `model` on `train` (and `eval`).
    pub fn new(
        model: &str,
        options: FinetuneOptions,
        train: Dataset,
        eval: Option<Dataset>,
        device: &Device,
    ) -> Result<Self> {
        options.validate()?;
        let trained = if options.freeze_vision { Trained::FrozenVision } else { Trained::All };
        let (model_task, params) = match options.task {
            TrainTask::Caption => {
                let (mut task, params) = Captioner::load_for_training(model, device, trained)?;
                if let Some(size) = options.image_size {
                    task.set_image_size(size)?;
                }
                (Model::Caption(task), params)
            }
            TrainTask::Vqa => {
                let (mut task, params) = QuestionAnswerer::load_for_training(model, device, trained)?;
                if let Some(size) = options.image_size {
                    task.set_image_size(size)?;
                }
                (Model::Vqa(task), params)
            }
        };
        let vars = params.vars().iter().map(|(_, var)| var.clone()).collect();
        let config = AdamWConfig { lr: options.lr, weight_decay: options.weight_decay, ..AdamWConfig::default() };
        Ok(Self {
            model: model_task,
            params,
            optimizer: AdamW::new(vars, config),
            position: Position { epoch: 0, batch: 0, step: 0 },
            source: Checkpoint::locate(model)?,
            source_name: model.to_string(),
            options,
            train,
            eval,
            skipped: Vec::new(),
        })
    }

    /// Continues the run saved in `dir` (a checkpoint this type saved) on `train` (and `eval`),
    /// with the settings it was started with.
    pub fn resume(dir: &Path, train: Dataset, eval: Option<Dataset>, device: &Device) -> Result<Self> {
        let state_path = dir.join(TRAINER_STATE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| {
            Error::file(&state_path, format!("{e} (is {} a checkpoint of blip finetune?)", dir.display()))
        })?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::file(&state_path, e))?;
        let dir_name = dir.display().to_string();
        let mut run = Self::new(&dir_name, state.options, train, eval, device)?;
        run.source_name = state.source;
        run.position = state.position;
        if !state.data_fingerprint.is_empty() && state.data_fingerprint != run.train.fingerprint() {
            return Err(Error::Training(format!(
                "{}: the run was trained on other data than {}: resume with the same --train file",
                dir.display(),
                run.train.path.display()
            )));
        }
        if run.total_steps() != state.total_steps {
            return Err(Error::Training(format!(
                "{}: the run had {} optimizer steps in all, this data gives {}: resume with the same --train file",
                dir.display(),
                state.total_steps,
                run.total_steps()
            )));
        }
        run.restore_optimizer(&dir.join(OPTIMIZER_STATE))?;
        Ok(run)
    }

    pub fn options(&self) -> &FinetuneOptions {
        &self.options
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn position(&self) -> Position {
        self.position
    }

    fn micro_batches_per_epoch(&self) -> usize {
        self.train.examples.len().div_ceil(self.options.batch_size)
    }

    fn steps_per_epoch(&self) -> u64 {
        self.micro_batches_per_epoch().div_ceil(self.options.grad_accum) as u64
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch() * self.options.epochs
    }

    /// Runs to the end (or until `stop` is set, checked after each optimizer step), saving a
    /// checkpoint in `out/checkpoint-<step>` after each epoch and when stopped, and the final
    /// model in `out` itself.
    pub fn run(&mut self, out: &Path, stop: &AtomicBool, observer: &mut dyn Observer) -> Result<Outcome> {
        std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
        let total = self.total_steps();
        let micro_per_epoch = self.micro_batches_per_epoch();
        while self.position.epoch < self.options.epochs {
            let order = epoch_order(self.train.examples.len(), self.options.seed, self.position.epoch);
            let batches: Vec<&[usize]> = order.chunks(self.options.batch_size).collect();
            while self.position.batch < micro_per_epoch {
                let group_end = (self.position.batch + self.options.grad_accum).min(micro_per_epoch);
                let report = self.optimizer_step(&batches[self.position.batch..group_end], total)?;
                self.position.batch = group_end;
                self.position.step += 1;
                observer.step(&StepReport { position: self.position, ..report });
                if self.options.eval_every.is_some_and(|every| self.position.step % every == 0) {
                    self.evaluate_into(observer);
                }
                if stop.load(Ordering::SeqCst) && self.position.step < total {
                    let saved = self.save_checkpoint(out, observer)?;
                    return Ok(self.outcome(saved, true));
                }
            }
            self.position.epoch += 1;
            self.position.batch = 0;
            self.save_checkpoint(out, observer)?;
            if self.options.eval_every.is_none() {
                self.evaluate_into(observer);
            }
        }
        self.save(out)?;
        observer.saved(out);
        Ok(self.outcome(out.to_path_buf(), false))
    }

    fn outcome(&self, saved: PathBuf, interrupted: bool) -> Outcome {
        let mut skipped = self.train.skipped.clone();
        skipped.extend(self.skipped.iter().cloned());
        Outcome { position: self.position, interrupted, saved, skipped }
    }

    /// One optimizer step over the micro-batches `group` (each a list of example indices).
    fn optimizer_step(&mut self, group: &[&[usize]], total: u64) -> Result<StepReport> {
        let vars: Vec<_> = self.params.vars().iter().map(|(_, var)| var.clone()).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut micro_losses = Vec::with_capacity(group.len());
        for batch in group {
            let examples: Vec<Example> = batch.iter().map(|&i| self.train.examples[i].clone()).collect();
            let started = std::time::Instant::now();
            let Some(loss) = self.batch_loss(&examples)? else { continue };
            micro_losses.push(loss.to_scalar::<f32>()?);
            let forward = started.elapsed();
            let store = (loss / self.options.grad_accum as f64)?.backward()?;
            tracing::debug!(?forward, backward = ?started.elapsed() - forward, "micro-batch");
            for (sum, var) in grads.iter_mut().zip(&vars) {
                if let Some(grad) = store.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(previous) => (previous + grad)?,
                        None => grad.clone(),
                    });
                }
            }
        }
        let grad_norm = match self.options.max_grad_norm {
            Some(max_norm) => clip_grad_norm(&mut grads, max_norm)?,
            None => f64::NAN,
        };
        let factor = self.options.schedule.factor(self.position.step, self.options.warmup_steps, total);
        let lr = self.options.lr * factor;
        self.optimizer.set_lr(lr);
        let started = std::time::Instant::now();
        self.optimizer.step(&grads)?;
        tracing::debug!(optimizer = ?started.elapsed(), "step");
        // (no usable example in the group: NaN, as a mean over nothing)
        let loss = micro_losses.iter().sum::<f32>() / micro_losses.len() as f32;
        Ok(StepReport { position: self.position, total_steps: total, loss, micro_losses, lr, grad_norm })
    }

    /// The loss of a micro-batch, as a graph tensor; `None` when every image was unusable and
    /// skipped.
    fn batch_loss(&mut self, examples: &[Example]) -> Result<Option<Tensor>> {
        let mut images = Vec::with_capacity(examples.len());
        let mut kept = Vec::with_capacity(examples.len());
        for example in examples {
            match load_image(&example.image) {
                Ok(image) => {
                    images.push(image);
                    kept.push(example);
                }
                Err(e) if self.options.skip_bad => self.skipped.push((example.line, e.to_string())),
                Err(e) => {
                    return Err(Error::file(
                        format!("{}:{}", self.train.path.display(), example.line),
                        format!("{e} (--skip-bad skips such examples)"),
                    ))
                }
            }
        }
        if kept.is_empty() {
            return Ok(None);
        }
        self.loss(&images, &kept).map(Some)
    }

    /// The loss of examples over their decoded images.
    fn loss(&self, images: &[RgbImage], examples: &[&Example]) -> Result<Tensor> {
        let smoothing = self.options.label_smoothing;
        match &self.model {
            Model::Caption(captioner) => {
                let processor = captioner.text_processor();
                let max = captioner.config().text_config.max_position_embeddings;
                let rows = examples
                    .iter()
                    .map(|e| decoder_ids(processor, &e.text, max, e.line))
                    .collect::<Result<Vec<_>>>()?;
                let (ids, mask, labels) = pad_decoder(&rows, processor.pad_token_id());
                captioner.loss_tensor(images, &ids, &mask, &labels, smoothing)
            }
            Model::Vqa(vqa) => {
                let processor = vqa.text_processor();
                let max = vqa.config().text_config.max_position_embeddings;
                let questions = examples
                    .iter()
                    .map(|e| processor.encode_for_encoder(&e.text, max, Param::Question, Some(e.line)))
                    .collect::<Result<Vec<_>>>()?;
                let (question_ids, question_mask, _) = pad_decoder(&questions, processor.pad_token_id());
                let answers = examples
                    .iter()
                    .map(|e| decoder_ids(processor, e.answer.as_deref().unwrap_or_default(), max, e.line))
                    .collect::<Result<Vec<_>>>()?;
                let (ids, mask, labels) = pad_decoder(&answers, processor.pad_token_id());
                vqa.answer_loss_tensor(images, (&question_ids, &question_mask), (&ids, Some(&mask)), &labels, smoothing)
            }
        }
    }

    /// Evaluates and tells `observer`; an evaluation that fails (an unreadable eval image) is
    /// a warning, not the end of the run.
    fn evaluate_into(&mut self, observer: &mut dyn Observer) {
        match self.evaluate() {
            Ok(Some(eval)) => observer.eval(&eval),
            Ok(None) => {}
            Err(e) => tracing::warn!("evaluation at step {} failed: {e}", self.position.step),
        }
    }

    /// The mean loss over the eval data (weighted by examples) and, when captioning, greedy
    /// captions of its first three images.
    pub fn evaluate(&mut self) -> Result<Option<EvalReport>> {
        let Some(eval) = self.eval.take() else { return Ok(None) };
        let result = self.evaluate_on(&eval);
        self.eval = Some(eval);
        result.map(Some)
    }

    fn evaluate_on(&self, eval: &Dataset) -> Result<EvalReport> {
        let (mut total, mut count) = (0f64, 0usize);
        for batch in eval.examples.chunks(self.options.batch_size) {
            let images = batch.iter().map(|e| load_image(&e.image)).collect::<Result<Vec<_>>>()?;
            let examples: Vec<&Example> = batch.iter().collect();
            let loss = self.loss(&images, &examples)?.detach().to_scalar::<f32>()?;
            total += loss as f64 * batch.len() as f64;
            count += batch.len();
        }
        let mut captions = Vec::new();
        if let Model::Caption(captioner) = &self.model {
            let shown = &eval.examples[..eval.examples.len().min(3)];
            let images = shown.iter().map(|e| load_image(&e.image)).collect::<Result<Vec<_>>>()?;
            let generated = captioner.caption(&images, &captioner.default_options())?;
            for (example, texts) in shown.iter().zip(generated) {
                let text = texts.into_iter().next().map(|c| c.text).unwrap_or_default();
                captions.push((example.image.clone(), text));
            }
        }
        Ok(EvalReport { step: self.position.step, loss: (total / count.max(1) as f64) as f32, captions })
    }

    /// Saves the model in the Hub's layout in `dir`: the source checkpoint's other files, the
    /// weights as `model.safetensors`, and the run's state (`trainer_state.json`,
    /// `optimizer.safetensors`) so that [`Self::resume`] continues from here.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        for name in CHECKPOINT_FILES {
            if let Some(file) = self.source.optional_file(name)? {
                let target = dir.join(name);
                match self.options.image_size {
                    Some(size) if name.ends_with("processor_config.json") => {
                        write_atomically(&target, &with_image_size(&file, name, size)?)?;
                    }
                    _ if file != target => {
                        std::fs::copy(&file, &target).map_err(|e| Error::file(&target, e))?;
                    }
                    _ => {}
                }
            }
        }
        self.params.save_safetensors(dir)?;
        self.save_optimizer(&dir.join(OPTIMIZER_STATE))?;
        let state = TrainerState {
            options: self.options.clone(),
            position: self.position,
            total_steps: self.total_steps(),
            data_fingerprint: self.train.fingerprint(),
            source: self.source_name.clone(),
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| Error::Training(e.to_string()))?;
        write_atomically(&dir.join(TRAINER_STATE), text.as_bytes())
    }

    fn save_checkpoint(&self, out: &Path, observer: &mut dyn Observer) -> Result<PathBuf> {
        let dir = out.join(format!("checkpoint-{}", self.position.step));
        self.save(&dir)?;
        observer.saved(&dir);
        Ok(dir)
    }

    /// `optimizer.safetensors`: per trained weight its AdamW step count (`step.<name>`, i64) and
    /// moments (`exp_avg.<name>`, `exp_avg_sq.<name>`), written from where they are held.
    fn save_optimizer(&self, path: &Path) -> Result<()> {
        let mut views: Vec<(String, Slice)> = Vec::new();
        for ((name, var), (steps, moments)) in self.params.vars().iter().zip(self.optimizer.moments()) {
            views.push((format!("step.{name}"), Slice::I64(vec![1], (steps as i64).to_le_bytes().to_vec())));
            if let Some((m, v)) = moments {
                views.push((format!("exp_avg.{name}"), Slice::F32(var.dims().to_vec(), m)));
                views.push((format!("exp_avg_sq.{name}"), Slice::F32(var.dims().to_vec(), v)));
            }
        }
        let partial = path.with_extension("partial");
        safetensors::serialize_to_file(views.iter().map(|(k, v)| (k.as_str(), v)), None, &partial)
            .map_err(|e| Error::file(&partial, e))?;
        std::fs::rename(&partial, path).map_err(|e| Error::file(path, e))
    }

    fn restore_optimizer(&mut self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::file(path, e))?;
        let mut state = Vec::with_capacity(self.params.vars().len());
        for (name, _) in self.params.vars() {
            let steps = tensors
                .get(&format!("step.{name}"))
                .ok_or_else(|| Error::file(path, format!("no optimizer state for {name}")))?
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?[0] as u64;
            let moments = match (tensors.get(&format!("exp_avg.{name}")), tensors.get(&format!("exp_avg_sq.{name}"))) {
                (Some(m), Some(v)) => Some((m.clone(), v.clone())),
                _ => None,
            };
            state.push((steps, moments));
        }
        self.optimizer.restore(state)
    }
}

/// A tensor of the optimizer state as safetensors writes it: f32 values borrowed, or the bytes
/// of a little-endian i64.
enum Slice<'a> {
    F32(Vec<usize>, &'a [f32]),
    I64(Vec<usize>, Vec<u8>),
}

impl safetensors::View for &Slice<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Slice::F32(..) => safetensors::Dtype::F32,
            Slice::I64(..) => safetensors::Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Slice::F32(shape, _) | Slice::I64(shape, _) => shape,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Slice::F32(_, values) => {
                // SAFETY: f32 has no padding and every bit pattern is a valid byte; the bytes are
                // borrowed for as long as the values. Little-endian, as safetensors stores them,
                // on every target this crate builds for.
                let bytes =
                    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(*values)) };
                std::borrow::Cow::Borrowed(bytes)
            }
            Slice::I64(_, bytes) => std::borrow::Cow::Borrowed(bytes),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Slice::F32(_, values) => std::mem::size_of_val(*values),
            Slice::I64(_, bytes) => bytes.len(),
        }
    }
}

/// `[DEC] text [SEP]`: what the decoder reads and is scored on, cut to the model's positions
/// (keeping the final [SEP]).
fn decoder_ids(
    processor: &crate::processor::text::TextProcessor,
    text: &str,
    max: usize,
    line: usize,
) -> Result<Vec<u32>> {
    let mut ids = processor.answer_ids(text, line)?;
    if ids.len() > max {
        let sep = ids[ids.len() - 1];
        ids.truncate(max - 1);
        ids.push(sep);
    }
    Ok(ids)
}

/// Rows padded to the longest: ids, mask (1 = token), labels (-100 on the padding).
fn pad_decoder(rows: &[Vec<u32>], pad: u32) -> (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<i64>>) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    for row in rows {
        let padding = width - row.len();
        ids.push(row.iter().copied().chain(std::iter::repeat_n(pad, padding)).collect());
        mask.push((0..width).map(|i| u32::from(i < row.len())).collect());
        labels.push(
            row.iter()
                .map(|&t| t as i64)
                .chain(std::iter::repeat_n(crate::tasks::loss::IGNORE_INDEX, padding))
                .collect(),
        );
    }
    (ids, mask, labels)
}

/// An image processor's settings (`preprocessor_config.json`, or the `image_processor` entry of
/// `processor_config.json`) with their size set to `size` × `size`, in the form the file uses.
fn with_image_size(path: &Path, name: &str, size: usize) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::config(path, e))?;
    let settings = if name == "processor_config.json" { &mut json["image_processor"] } else { &mut json };
    if let Some(object) = settings.as_object_mut() {
        let value = match object.get("size") {
            Some(serde_json::Value::Number(_)) => serde_json::json!(size),
            _ => serde_json::json!({ "height": size, "width": size }),
        };
        object.insert("size".into(), value);
    }
    serde_json::to_vec_pretty(&json).map_err(|e| Error::config(path, e))
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).map_err(|e| Error::file(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| Error::file(path, e))
}
