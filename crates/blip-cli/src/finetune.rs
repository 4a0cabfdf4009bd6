//! `blip finetune caption|vqa`: fine-tunes a checkpoint on a JSONL file of examples (see
//! `blip::training`), with a progress bar, evaluations, checkpoints in the Hub's layout and a
//! resumable one saved on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use blip::training::{
    Dataset, EvalReport, FinetuneOptions, Finetuner, Observer, Schedule as LibSchedule, StepReport, TrainTask,
};
use blip::{Captioner, Device, QuestionAnswerer};
use clap::{Args, ValueEnum};

/// Test hook: stop as Ctrl-C does after this many optimizer steps.
const TEST_STOP_AFTER: &str = "BLIP_FINETUNE_TEST_STOP_AFTER_STEP";

#[derive(Clone, Copy, ValueEnum)]
pub enum Task {
    /// Captioning: `{"image", "text"}` lines.
    Caption,
    /// Visual question answering: `{"image", "question", "answer"}` lines.
    Vqa,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// What to train the model to write.
    #[arg(value_enum)]
    task: Task,

    /// Training data: JSONL, one example per line, image paths relative to the file.
    #[arg(long, value_name = "FILE.jsonl")]
    train: PathBuf,

    /// Evaluation data in the same form: its loss (and captions of its first images) at each
    /// evaluation.
    #[arg(long, value_name = "FILE.jsonl")]
    eval: Option<PathBuf>,

    /// Where the fine-tuned model goes (in the Hub's layout), with `checkpoint-<step>` folders.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// The checkpoint to start from (default: the task's default model).
    #[arg(long, value_name = "ID|DIR")]
    model: Option<String>,

    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    epochs: u64,

    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,

    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,

    /// Forward passes per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,

    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,

    /// Optimizer steps of linear warmup from 0.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,

    /// The learning rate after warmup: transformers' cosine, linear (to 0 at the last step) or
    /// constant schedule.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    schedule: Schedule,

    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,

    /// Cross-entropy label smoothing (default: the config's, 0.0 on the Hub's checkpoints;
    /// BLIP was trained with 0.1).
    #[arg(long)]
    label_smoothing: Option<f64>,

    /// Train all but the vision model.
    #[arg(long)]
    freeze_vision: bool,

    /// Seed of the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Continue the run saved in this checkpoint folder, with the settings it started with.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,

    /// Evaluate every N optimizer steps (default: after each epoch).
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,

    /// Skip (and count) unusable data lines and images instead of stopping.
    #[arg(long)]
    skip_bad: bool,

    /// Train on images resized to N×N (a multiple of 16), the position embeddings interpolated;
    /// the saved model's image processor says N, so it runs at N.
    #[arg(long, value_name = "N")]
    image_size: Option<usize>,
}

pub fn run(args: FinetuneArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    if dtype != blip::DType::F32 {
        anyhow::bail!("training runs in f32: leave out --dtype (or give --dtype f32)");
    }
    let task = match args.task {
        Task::Caption => TrainTask::Caption,
        Task::Vqa => TrainTask::Vqa,
    };
    let skip_bad = args.skip_bad;
    // the settings are refused before any data or weights are read
    let settings = options(&args, task);
    if args.resume.is_none() {
        settings.validate()?;
    }
    let train = Dataset::read(&args.train, task, skip_bad)?;
    let eval = args.eval.as_deref().map(|path| Dataset::read(path, task, skip_bad)).transpose()?;
    for (line, reason) in &train.skipped {
        eprintln!("skipped {}:{line}: {reason}", train.path.display());
    }
    let device = Device::Cpu;
    let mut run = match &args.resume {
        Some(dir) => {
            let run = Finetuner::resume(dir, train, eval, &device)
                .with_context(|| format!("cannot resume from {}", dir.display()))?;
            eprintln!(
                "resuming at optimizer step {} of {} (the run's own settings; training flags other than --train, --eval and --out are not used)",
                run.position().step,
                run.total_steps()
            );
            run
        }
        None => {
            let model = args.model.clone().unwrap_or_else(|| match task {
                TrainTask::Caption => Captioner::DEFAULT_MODEL.to_string(),
                TrainTask::Vqa => QuestionAnswerer::DEFAULT_MODEL.to_string(),
            });
            Finetuner::new(&model, settings, train, eval, &device)?
        }
    };
    eprintln!(
        "training {} weights ({} values), {} optimizer steps",
        run.params().vars().len(),
        run.params().count(),
        run.total_steps()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let presses = Arc::new(AtomicUsize::new(0));
    {
        let (stop, presses) = (stop.clone(), presses.clone());
        ctrlc::set_handler(move || {
            if presses.fetch_add(1, Ordering::SeqCst) == 0 {
                eprintln!("\nstopping after this step to save a resumable checkpoint (Ctrl-C again to quit now)");
                stop.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(130);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let stop_after = std::env::var(TEST_STOP_AFTER).ok().and_then(|v| v.parse::<u64>().ok());
    let mut progress = Progress::new(run.total_steps(), run.position().step, stop.clone(), stop_after);
    let outcome = run.run(&args.out, &stop, &mut progress)?;
    progress.bar.finish_and_clear();
    if !outcome.skipped.is_empty() {
        eprintln!("skipped {} bad examples", outcome.skipped.len());
    }
    if outcome.interrupted {
        eprintln!(
            "stopped at optimizer step {}: resume with --resume {}",
            outcome.position.step,
            outcome.saved.display()
        );
        return Ok(ExitCode::from(130));
    }
    eprintln!("fine-tuned {} optimizer steps: the model is in {}", outcome.position.step, outcome.saved.display());
    Ok(ExitCode::SUCCESS)
}

fn options(args: &FinetuneArgs, task: TrainTask) -> FinetuneOptions {
    let mut options = FinetuneOptions::new(task);
    options.epochs = args.epochs;
    options.lr = args.lr;
    options.batch_size = args.batch_size;
    options.grad_accum = args.grad_accum;
    options.weight_decay = args.weight_decay;
    options.warmup_steps = args.warmup_steps;
    options.schedule = match args.schedule {
        Schedule::Cosine => LibSchedule::Cosine,
        Schedule::Linear => LibSchedule::Linear,
        Schedule::Constant => LibSchedule::Constant,
    };
    options.max_grad_norm = (args.max_grad_norm != 0.0).then_some(args.max_grad_norm);
    options.label_smoothing = args.label_smoothing;
    options.freeze_vision = args.freeze_vision;
    options.seed = args.seed;
    options.eval_every = args.eval_every;
    options.skip_bad = args.skip_bad;
    options.image_size = args.image_size;
    options
}

/// The progress bar (loss, steps/s) on a terminal, a line per step otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
    terminal: bool,
    stop: Arc<AtomicBool>,
    stop_after: Option<u64>,
}

impl Progress {
    fn new(total: u64, done: u64, stop: Arc<AtomicBool>, stop_after: Option<u64>) -> Self {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if terminal { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps, {per_sec}, {elapsed} elapsed, {eta} left, {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(done);
        Self { bar, terminal, stop, stop_after }
    }

    fn line(&self, text: String) {
        if self.terminal {
            self.bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

impl Observer for Progress {
    fn step(&mut self, report: &StepReport) {
        self.bar.set_position(report.position.step);
        self.bar.set_message(format!("loss {:.4}", report.loss));
        if !self.terminal {
            eprintln!(
                "step {}/{}: loss {:.6}, lr {:.3e}, grad norm {:.4}",
                report.position.step, report.total_steps, report.loss, report.lr, report.grad_norm
            );
        }
        if self.stop_after == Some(report.position.step) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn eval(&mut self, report: &EvalReport) {
        self.line(format!("step {}: eval loss {:.6}", report.step, report.loss));
        for (image, caption) in &report.captions {
            self.line(format!("  {}: {caption}", file_name(image)));
        }
    }

    fn saved(&mut self, dir: &Path) {
        self.line(format!("saved {}", dir.display()));
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}
