//! Training losses against transformers 5.24 on the committed tiny checkpoints (values from
//! scripts/make_loss_fixtures.py): captioning with and without -100 at the pads, label smoothing
//! 0 and 0.1; VQA with the answers as labels; BlipModel's contrastive loss. Within 1e-5 relative.

use std::path::{Path, PathBuf};

use blip::processor::image::load_image;
use blip::{Captioner, Device, ImageTextMatcher, QuestionAnswerer};
use image::RgbImage;
use serde_json::Value;

const RELATIVE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/losses.json")).unwrap()).unwrap()
}

fn images(expected: &Value) -> Vec<RgbImage> {
    expected["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| load_image(&fixtures().join("images-model").join(name.as_str().unwrap())).unwrap())
        .collect()
}

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn rows<T: serde::de::DeserializeOwned>(value: &Value) -> Vec<Vec<T>> {
    serde_json::from_value(value.clone()).unwrap()
}

fn assert_close(ours: f32, theirs: f64, what: &str) {
    let error = (ours as f64 - theirs).abs() / theirs.abs();
    assert!(error < RELATIVE, "{what}: {ours} vs transformers {theirs} (relative {error:e})");
}

#[test]
fn captioning_loss_equals_transformers() {
    let expected = expected();
    let images = images(&expected);
    let captioner = Captioner::load(&model("tiny-caption-bin"), &Device::Cpu).unwrap();
    let cases = expected["captioning"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let smoothing = case["label_smoothing"].as_f64().unwrap();
        let loss = captioner
            .loss(
                &images,
                &rows::<u32>(&case["input_ids"]),
                &rows::<u32>(&case["attention_mask"]),
                &rows::<i64>(&case["labels"]),
                Some(smoothing),
            )
            .unwrap();
        let masked = rows::<i64>(&case["labels"]).iter().flatten().any(|&l| l == -100);
        assert_close(loss, case["loss"].as_f64().unwrap(), &format!("smoothing {smoothing}, pads masked {masked}"));
    }
}

#[test]
fn vqa_and_contrastive_losses_equal_transformers() {
    let expected = expected();
    let images = images(&expected);
    let answerer = QuestionAnswerer::load(&model("tiny-vqa"), &Device::Cpu).unwrap();
    let case = &expected["vqa"][0];
    let loss = answerer
        .loss(
            &images,
            &rows::<u32>(&case["input_ids"]),
            &rows::<u32>(&case["attention_mask"]),
            &rows::<i64>(&case["labels"]),
            None,
        )
        .unwrap();
    assert_close(loss, case["loss"].as_f64().unwrap(), "vqa");

    let matcher = ImageTextMatcher::load(&model("tiny-blip"), &Device::Cpu).unwrap();
    let case = &expected["contrastive"][0];
    let texts: Vec<String> = serde_json::from_value(case["texts"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert_close(matcher.contrastive_loss(&images, &texts).unwrap(), case["loss"].as_f64().unwrap(), "contrastive");
}

#[test]
fn bad_labels_are_refused_with_their_value() {
    let expected = expected();
    let images = images(&expected);
    let answerer = QuestionAnswerer::load(&model("tiny-vqa"), &Device::Cpu).unwrap();
    let case = &expected["vqa"][0];
    let mut labels = rows::<i64>(&case["labels"]);
    labels[0][1] = -100;
    let err = answerer
        .loss(&images, &rows::<u32>(&case["input_ids"]), &rows::<u32>(&case["attention_mask"]), &labels, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("labels") && err.contains("-100"), "{err}");

    let retrieval = ImageTextMatcher::load(&model("tiny-itm"), &Device::Cpu).unwrap();
    let err = retrieval.contrastive_loss(&images, &["a", "b", "c"]).unwrap_err().to_string();
    assert!(err.contains("BlipModel"), "{err}");
}
