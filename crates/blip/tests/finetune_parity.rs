//! The fine-tuning loop against the same loop in PyTorch (scripts/make_training_fixtures.py:
//! transformers' BlipForConditionalGeneration, torch.optim.AdamW, LambdaLR with transformers'
//! cosine schedule, clip_grad_norm_, gradient accumulation, the same data order): every
//! micro-batch loss of the 21 optimizer steps within 1e-4 relative, and the final weights
//! close; a run stopped and resumed ends bit for bit where an uninterrupted one does; the saved
//! checkpoint reloads with the trained weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blip::training::{Dataset, FinetuneOptions, Finetuner, Observer, Schedule, StepReport, TrainTask};
use blip::{Device, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/finetune.json")).unwrap()).unwrap()
}

/// The fixture run's settings.
fn options(expected: &Value) -> FinetuneOptions {
    let s = &expected["settings"];
    let mut options = FinetuneOptions::new(TrainTask::Caption);
    options.epochs = s["epochs"].as_u64().unwrap();
    options.lr = s["lr"].as_f64().unwrap();
    options.batch_size = s["batch_size"].as_u64().unwrap() as usize;
    options.grad_accum = s["grad_accum"].as_u64().unwrap() as usize;
    options.weight_decay = s["weight_decay"].as_f64().unwrap();
    options.warmup_steps = s["warmup_steps"].as_u64().unwrap();
    options.schedule = serde_json::from_value::<Schedule>(s["schedule"].clone()).unwrap();
    options.max_grad_norm = s["max_grad_norm"].as_f64();
    options.seed = s["seed"].as_u64().unwrap();
    options.label_smoothing = s["label_smoothing"].as_f64();
    options
}

fn train_data() -> Dataset {
    Dataset::read(&fixtures().join("training/train.jsonl"), TrainTask::Caption, false).unwrap()
}

fn model() -> String {
    fixtures().join("models/train-caption").display().to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip-finetune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Records the micro-batch losses; sets `stop` after `stop_at` steps.
struct Recorder<'a> {
    losses: Vec<f32>,
    stop: Option<(u64, &'a AtomicBool)>,
}

impl Observer for Recorder<'_> {
    fn step(&mut self, report: &StepReport) {
        self.losses.extend(&report.micro_losses);
        if let Some((at, flag)) = self.stop {
            if report.position.step == at {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn the_loop_equals_pytorchs_and_resumes_exactly() {
    let expected = expected();
    let out = scratch("full");
    let mut run = Finetuner::new(&model(), options(&expected), train_data(), None, &Device::Cpu).unwrap();
    assert_eq!(run.total_steps(), expected["optimizer_steps"].as_u64().unwrap());
    let mut full = Recorder { losses: Vec::new(), stop: None };
    let outcome = run.run(&out, &AtomicBool::new(false), &mut full).unwrap();
    assert!(!outcome.interrupted);
    let theirs: Vec<f64> = serde_json::from_value(expected["losses"].clone()).unwrap();
    assert_eq!(full.losses.len(), theirs.len());
    for (i, (ours, theirs)) in full.losses.iter().zip(&theirs).enumerate() {
        let error = (*ours as f64 - theirs).abs() / theirs.abs();
        assert!(error < 1e-4, "micro-batch {i}: loss {ours} vs PyTorch {theirs} (relative {error:e})");
    }

    // The final weights: PyTorch's within 1e-4 of the tensor's largest value, but for the
    // attention key biases, whose gradient is exactly zero: AdamW normalizes the float noise
    // both frameworks leave there into steps of up to lr, different in each.
    let reference: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("expected/finetune-final.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ours = weights(&out);
    assert_eq!(ours.len(), reference.len(), "the saved checkpoint holds the source's tensors");
    for (name, theirs) in &reference {
        let mine = &ours[name];
        assert_eq!(mine.dims(), theirs.dims(), "{name}");
        // the vision model's fused qkv bias holds the key bias in its middle third
        let (mine, theirs) = if name.ends_with("qkv.bias") {
            let third = theirs.dim(0).unwrap() / 3;
            let without_keys = |t: &Tensor| {
                Tensor::cat(&[t.narrow(0, 0, third).unwrap(), t.narrow(0, 2 * third, third).unwrap()], 0).unwrap()
            };
            (without_keys(mine), without_keys(theirs))
        } else if name.ends_with(".key.bias") {
            // at most lr per step, in either direction
            let diff = max_abs(&(mine - theirs).unwrap());
            assert!(diff <= 2.0 * 1e-3 * 21.0, "{name}: {diff:e}");
            continue;
        } else {
            (mine.clone(), theirs.clone())
        };
        let diff = max_abs(&(&mine - &theirs).unwrap());
        assert!(diff <= 1e-4 * max_abs(&theirs), "{name}: max |ours − PyTorch| {diff:e} of {:e}", max_abs(&theirs));
    }

    // Stopped after step 7 and resumed: the same weights, bit for bit.
    let stopped_out = scratch("stopped");
    let flag = AtomicBool::new(false);
    let mut first = Finetuner::new(&model(), options(&expected), train_data(), None, &Device::Cpu).unwrap();
    let mut recorder = Recorder { losses: Vec::new(), stop: Some((7, &flag)) };
    let stopped = first.run(&stopped_out, &flag, &mut recorder).unwrap();
    assert!(stopped.interrupted);
    assert_eq!(stopped.saved, stopped_out.join("checkpoint-7"));
    let mut resumed = Finetuner::resume(&stopped.saved, train_data(), None, &Device::Cpu).unwrap();
    assert_eq!(resumed.position().step, 7);
    let mut rest = Recorder { losses: Vec::new(), stop: None };
    let finished = resumed.run(&stopped_out, &AtomicBool::new(false), &mut rest).unwrap();
    assert!(!finished.interrupted);
    let (a, b) = (weights(&out), weights(&stopped_out));
    for (name, tensor) in &a {
        assert_eq!(max_abs(&(tensor - &b[name]).unwrap()), 0.0, "{name} differs after resuming");
    }
    let all: Vec<f32> = recorder.losses.iter().chain(&rest.losses).copied().collect();
    assert_eq!(all, full.losses, "the resumed run's losses");

    // The saved checkpoint loads as an ordinary one with the trained weights (the LM head
    // tied), and captions as the same checkpoint loaded for training (the graph's ops) does: the
    // same tokens, the same scores but for float rounding.
    let location = out.display().to_string();
    let captioner = blip::Captioner::load(&location, &Device::Cpu).unwrap();
    let (trainable, params) =
        blip::Captioner::load_for_training(&location, &Device::Cpu, blip::training::Trained::All).unwrap();
    for (name, var) in params.vars() {
        assert_eq!(max_abs(&(var.as_tensor() - &a[name]).unwrap()), 0.0, "{name}");
    }
    let images: Vec<_> = ["chelsea.png", "astronaut.png", "rocket.jpg"]
        .iter()
        .map(|n| blip::load_image(&fixtures().join("images-model").join(n)).unwrap())
        .collect();
    let kernels = captioner.caption(&images, &captioner.default_options()).unwrap();
    let graph = trainable.caption(&images, &trainable.default_options()).unwrap();
    for (a, b) in kernels.iter().flatten().zip(graph.iter().flatten()) {
        assert_eq!((&a.text, &a.tokens), (&b.text, &b.tokens));
        assert!((a.log_prob - b.log_prob).abs() < 1e-5 * a.log_prob.abs(), "{} vs {}", a.log_prob, b.log_prob);
    }
    for dir in [out, stopped_out] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// AdamW's steps against torch.optim.AdamW's on recorded gradients, learning rates (0 among
/// them) and weight decay, a zero gradient included: within 1e-7 of each value.
#[test]
fn adamw_steps_equal_torchs() {
    let expected = expected();
    let case = &expected["adamw"];
    let start: Vec<Vec<f32>> = serde_json::from_value(case["start"].clone()).unwrap();
    let var = candle_core::Var::from_tensor(&Tensor::new(start, &candle_core::Device::Cpu).unwrap()).unwrap();
    let config =
        blip::training::AdamWConfig { weight_decay: case["weight_decay"].as_f64().unwrap(), ..Default::default() };
    let mut adamw = blip::training::AdamW::new(vec![var.clone()], config);
    for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        adamw.set_lr(step["lr"].as_f64().unwrap());
        let grad: Vec<Vec<f32>> = serde_json::from_value(step["grad"].clone()).unwrap();
        adamw.step(&[Some(Tensor::new(grad, &candle_core::Device::Cpu).unwrap())]).unwrap();
        let theirs = Tensor::new(
            serde_json::from_value::<Vec<Vec<f32>>>(step["param"].clone()).unwrap(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let diff = max_abs(&(var.as_tensor() - &theirs).unwrap());
        assert!(diff < 1e-7, "step {i}: {diff:e}");
    }
}
