//! `blip finetune` as a user runs it, on the small train-* checkpoints: bad data named by its
//! line (or skipped with --skip-bad), a run stopped as Ctrl-C stops it and resumed ends with
//! the weights of an uninterrupted run bit for bit, and the fine-tuned folders load as ordinary
//! checkpoints for `blip caption` and `blip vqa`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{blip, fixtures, image, model};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip-cli-finetune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train_file() -> String {
    fixtures().join("training/train.jsonl").display().to_string()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The fixture run's settings, as flags.
fn run_args<'a>(out: &'a str, model_dir: &'a str, train: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "caption",
        "--train",
        train,
        "--out",
        out,
        "--model",
        model_dir,
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "2",
        "--seed",
        "7",
    ]
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn a_stopped_run_resumes_to_the_uninterrupted_weights() {
    let dir = scratch("resume");
    let (full, stopped) = (dir.join("full"), dir.join("stopped"));
    let (full_s, stopped_s) = (full.display().to_string(), stopped.display().to_string());
    let (model_dir, train) = (model("train-caption"), train_file());

    let output = blip(&run_args(&full_s, &model_dir, &train));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("fine-tuned 9 optimizer steps"), "{}", stderr(&output));
    for epoch_end in ["checkpoint-3", "checkpoint-6", "checkpoint-9"] {
        assert!(full.join(epoch_end).join("model.safetensors").is_file(), "{epoch_end}");
    }

    let output = Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(run_args(&stopped_s, &model_dir, &train))
        .env("BLIP_FINETUNE_TEST_STOP_AFTER_STEP", "4")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    let checkpoint = stopped.join("checkpoint-4");
    assert!(stderr(&output).contains(&format!("--resume {}", checkpoint.display())), "{}", stderr(&output));
    for file in
        ["config.json", "preprocessor_config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors"]
    {
        assert!(checkpoint.join(file).is_file(), "{file}");
    }

    let checkpoint_s = checkpoint.display().to_string();
    // other data (one caption changed) is not the same run
    let other = dir.join("other.jsonl");
    let text = std::fs::read_to_string(&train).unwrap().replacen("a cat lying on a sofa", "a cat on a sofa", 1);
    std::fs::write(
        &other,
        text.replace("../images-model/", &format!("{}/", fixtures().join("images-model").display())),
    )
    .unwrap();
    let other_s = other.display().to_string();
    let output = blip(&["finetune", "caption", "--train", &other_s, "--out", &stopped_s, "--resume", &checkpoint_s]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("other data"), "{}", stderr(&output));

    let output = blip(&["finetune", "caption", "--train", &train, "--out", &stopped_s, "--resume", &checkpoint_s]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("resuming at optimizer step 4 of 9"), "{}", stderr(&output));
    assert!(weights(&full) == weights(&stopped), "the resumed run's weights differ from the uninterrupted run's");

    // the result captions with `blip caption`, as the run's own evaluation would
    let output = blip(&["caption", "--model", &full_s, "--format", "jsonl", &image("chelsea.png")]);
    assert!(output.status.success(), "{}", stderr(&output));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_lines_are_named_or_skipped() {
    let dir = scratch("bad");
    let images = fixtures().join("images-model");
    let lines = [
        format!(r#"{{"image": "{}", "text": "a cat"}}"#, images.join("chelsea.png").display()),
        r#"{"image": "nowhere.png", "text": "a dog"}"#.to_string(),
        format!(r#"{{"image": "{}", "text": ""}}"#, images.join("rocket.jpg").display()),
        "{not json".to_string(),
        format!(r#"{{"image": "{}", "text": "a rocket"}}"#, images.join("rocket.jpg").display()),
    ];
    let train = dir.join("train.jsonl");
    std::fs::write(&train, lines.join("\n")).unwrap();
    let (train_s, out_s) = (train.display().to_string(), dir.join("out").display().to_string());
    let model_dir = model("train-caption");
    let args = ["finetune", "caption", "--train", &train_s, "--out", &out_s, "--model", &model_dir, "--epochs", "1"];

    let output = blip(&args);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("train.jsonl:2") && message.contains("nowhere.png") && message.contains("--skip-bad"),
        "{message}"
    );

    let mut skipping = args.to_vec();
    skipping.push("--skip-bad");
    let output = blip(&skipping);
    assert!(output.status.success(), "{}", stderr(&output));
    let message = stderr(&output);
    for line in [":2:", ":3: empty \"text\"", ":4: not a JSON object"] {
        assert!(message.contains(line), "{line} in {message}");
    }

    // options out of range are refused with the flag's name
    let mut bad_lr = args.to_vec();
    bad_lr.extend(["--lr=-1"]);
    let output = blip(&bad_lr);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--lr"), "{}", stderr(&output));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn vqa_fine_tunes_and_answers() {
    let dir = scratch("vqa");
    let out = dir.join("out").display().to_string();
    let train = fixtures().join("training/vqa.jsonl").display().to_string();
    let model_dir = model("train-vqa");
    let output = blip(&[
        "finetune",
        "vqa",
        "--train",
        &train,
        "--eval",
        &train,
        "--out",
        &out,
        "--model",
        &model_dir,
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "--freeze-vision",
        "--image-size",
        "48",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("eval loss"), "{message}");
    // the vision model's weights are saved as they were, the rest trained
    let before = std::fs::read(Path::new(&model_dir).join("model.safetensors")).unwrap();
    let after = std::fs::read(Path::new(&out).join("model.safetensors")).unwrap();
    let (before, after) = (tensors(&before), tensors(&after));
    assert_eq!(before.len(), after.len());
    for (name, data) in &before {
        let same = after.iter().find(|(n, _)| n == name).is_some_and(|(_, d)| d == data);
        assert_eq!(same, name.starts_with("vision_model."), "{name}");
    }
    // trained at 48 px (the checkpoint's 32 interpolated), and saved to run at 48
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&out).join("preprocessor_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["size"], 48);
    let output = blip(&["vqa", "--model", &out, "--question", "what is it?", &image("rocket.jpg")]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output =
        blip(&["vqa", "--model", &out, "--question", "what is it?", "--image-size", "50", &image("rocket.jpg")]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--image-size"), "{}", stderr(&output));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Tensor names and bytes of a safetensors file.
fn tensors(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
    tensors.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect()
}
