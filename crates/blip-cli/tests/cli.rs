//! The real `blip` binary on the committed tiny checkpoints: outputs, and every bad input giving
//! one clear line and the right exit code while the good images are still captioned.

mod common;

use common::*;

use std::process::Command;

use serde_json::Value;

/// The tokens transformers generated for the fixture images 0, 1, 2 (chelsea, astronaut,
/// rocket), unconditionally, one image at a time.
fn expected_tokens(checkpoint: &str) -> Vec<serde_json::Value> {
    let path = fixtures().join("expected").join(format!("{checkpoint}.json"));
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    (0..3)
        .map(|i| {
            let case = cases.iter().find(|c| c["name"] == format!("uncond_{i}").as_str()).unwrap();
            case["sequences"][0].clone()
        })
        .collect()
}

#[test]
fn jsonl_records_in_input_order_with_transformers_tokens() {
    let images = ["chelsea.png", "astronaut.png", "rocket.jpg"].map(image);
    let model = model("tiny-caption-bin");
    let mut args = vec!["caption", "--model", &model, "--format", "jsonl", "--batch-size", "2"];
    args.extend(images.iter().map(String::as_str));
    let out = blip(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    let expected = expected_tokens("tiny-caption-bin");
    assert_eq!(records.len(), 3);
    for ((record, path), tokens) in records.iter().zip(&images).zip(&expected) {
        assert_eq!(record["image"], path.as_str());
        assert_eq!(&record["tokens"], tokens);
        assert!(record["caption"].is_string());
    }
}

#[test]
fn bad_images_are_reported_and_the_rest_captioned() {
    let dir = tempdir("bad-images");
    let not_image = dir.join("notes.jpg");
    std::fs::write(&not_image, "this is text, not a JPEG").unwrap();
    let missing = dir.join("missing.png");
    let (good, bad, gone) = (image("chelsea.png"), not_image.display().to_string(), missing.display().to_string());
    let out = blip(&["caption", "--model", &model("tiny-caption-bin"), "--format", "jsonl", &bad, &good, &gone]);
    assert_eq!(out.status.code(), Some(1));
    let records = jsonl(&out);
    assert_eq!(records.len(), 3, "one line per image");
    assert!(records[0]["error"].as_str().unwrap().contains("notes.jpg"));
    assert!(records[1]["caption"].is_string());
    assert!(records[2]["error"].as_str().unwrap().contains("missing.png"));
    let err = stderr(&out);
    assert!(err.contains("notes.jpg") && err.contains("missing.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn text_format_prints_path_and_caption() {
    let out = blip(&["caption", "--model", &model("tiny-caption-bin"), &image("chelsea.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let (path, caption) = text.trim_end().split_once('\t').unwrap();
    assert_eq!(path, image("chelsea.png"));
    assert!(!caption.is_empty());
}

#[test]
fn wrong_kind_of_checkpoint_is_refused() {
    let out = blip(&["caption", "--model", &model("tiny-itm"), &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("BlipForImageTextRetrieval") && err.contains("tiny-itm"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn missing_weights_and_missing_folders_are_named() {
    let out = blip(&["caption", "--model", &model("tiny-missing-weights"), &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("tiny-missing-weights") && err.contains("no weights"), "{err}");

    let out = blip(&["caption", "--model", "./no/such/folder", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("./no/such/folder"), "{}", stderr(&out));
}

#[test]
fn overlong_prompt_is_refused_before_any_image() {
    let prompt = "a picture of ".repeat(30);
    let out = blip(&["caption", "--model", &model("tiny-caption-bin"), "--prompt", &prompt, &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("positions") && err.contains("prompt"), "{err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn contradictory_lengths_are_refused() {
    let out = blip(&["caption", "--min-new-tokens", "9", "--max-new-tokens", "3", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--min-new-tokens"), "{}", stderr(&out));
}

#[test]
fn hub_id_not_cached_while_offline_says_so() {
    let home = tempdir("empty-hf-home");
    let out = Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(["caption", "--model", "Salesforce/blip-image-captioning-base", &image("chelsea.png")])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("Salesforce/blip-image-captioning-base") && err.contains("cache"), "{err}");
}

/// A model in the Hugging Face cache layout (refs/main → snapshots/<commit>/files) loads by repo
/// id with no network.
#[test]
fn cached_hub_model_works_offline() {
    let home = tempdir("hf-home");
    let repo = home.join("hub/models--tiny--caption");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(model("tiny-caption-bin")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(["caption", "--model", "tiny/caption", "--format", "jsonl", &image("chelsea.png")])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(jsonl(&out)[0]["tokens"], expected_tokens("tiny-caption-bin")[0]);
}

/// `--threads` changes how the work is split, not the result.
#[test]
fn threads_option_gives_the_same_captions() {
    let args = ["caption", "--model", &model("tiny-caption-bin"), &image("chelsea.png"), &image("rocket.jpg")];
    let all = blip(&args);
    let mut one_args = vec!["--threads", "1"];
    one_args.extend(args);
    let one = blip(&one_args);
    assert!(all.status.success() && one.status.success(), "{}", stderr(&one));
    assert_eq!(all.stdout, one.stdout);
    let bad = blip(&["caption", "--threads", "0", &image("chelsea.png")]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn half_precision_weights_caption_and_other_dtypes_are_refused() {
    for dtype in ["bf16", "f16"] {
        let out = blip(&["caption", "--dtype", dtype, "--model", &model("tiny-caption-bin"), &image("chelsea.png")]);
        assert!(out.status.success(), "{dtype}: {}", stderr(&out));
        assert!(stdout(&out).contains('\t'));
    }
    // global, so it may come before the command too
    let out =
        blip(&["--dtype", "bf16", "vqa", "--model", &model("tiny-vqa"), "--question", "what?", &image("chelsea.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = blip(&["caption", "--dtype", "f64", "--model", &model("tiny-caption-bin"), &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("f64"), "{}", stderr(&out));
}

/// A checkpoint saved by transformers 5 (`processor_config.json`, a `generation_config.json`):
/// by default the tokens of transformers' `generate`, which ignores the file, with a warning
/// saying so; with --generation-config those of `generate` given the file's settings.
#[test]
fn generation_config_is_applied_only_when_asked() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/tiny-caption-saved5.json")).unwrap())
            .unwrap();
    let tokens = |case: &str| {
        let case = expected["cases"].as_array().unwrap().iter().find(|c| c["name"] == case && c["image"] == 0).unwrap();
        let row: Vec<u64> = case["sequences"][0].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        serde_json::to_value(row).unwrap()
    };
    let chelsea = fixtures().join(expected["images"][0].as_str().unwrap()).display().to_string();
    let model = model("tiny-caption-saved5");
    let out = blip(&["caption", "--model", &model, "--format", "jsonl", &chelsea]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("generation_config.json is not applied"), "{}", stderr(&out));
    assert_eq!(jsonl(&out)[0]["tokens"], tokens("default"));
    let out = blip(&["caption", "--model", &model, "--generation-config", "--format", "jsonl", &chelsea]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(jsonl(&out)[0]["tokens"], tokens("generation_config"));
}
