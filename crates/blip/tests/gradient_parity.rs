//! Gradients against PyTorch's `loss.backward()` on transformers 5.24's models (values from
//! scripts/make_training_fixtures.py, on the train-* checkpoints): every trained weight's
//! gradient within 1e-4 of the largest value of PyTorch's (max-abs over the tensor), for the
//! captioning loss (label smoothing, -100 at the pads), the VQA loss (decoder ids, mask and
//! labels) and BlipModel's contrastive loss; and the trained weights' names, tied ones included.
//!
//! The attention key biases have a gradient of exactly zero (adding one vector to every key
//! adds the same score to all keys, which the softmax cancels): PyTorch's values there are float
//! noise, 1e-10 against gradients of order 1. A tensor whose PyTorch gradient is below
//! [`ZERO`] times the largest gradient of the model is taken as zero, and ours must be too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip::processor::image::load_image;
use blip::training::{Params, Trained};
use blip::{Captioner, Device, ImageTextMatcher, QuestionAnswerer, Tensor};
use candle_core::backprop::GradStore;
use image::RgbImage;
use serde_json::Value;

const RELATIVE: f32 = 1e-4;
/// Below this fraction of the model's largest gradient, a gradient is zero but for float noise.
const ZERO: f32 = 1e-7;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn case(name: &str) -> Value {
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/gradients.json")).unwrap()).unwrap();
    all[name].clone()
}

fn images(case: &Value) -> Vec<RgbImage> {
    let names = case["images"].as_array().unwrap();
    names.iter().map(|n| load_image(&fixtures().join("images-model").join(n.as_str().unwrap())).unwrap()).collect()
}

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn rows<T: serde::de::DeserializeOwned>(value: &Value) -> Vec<Vec<T>> {
    serde_json::from_value(value.clone()).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Every trained variable has PyTorch's gradient, and every weight PyTorch gave a gradient is
/// trained here.
fn assert_gradients(params: &Params, grads: &GradStore, loss: &Tensor, expected_file: &str, case: &Value) {
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("expected").join(expected_file), &candle_core::Device::Cpu)
            .unwrap();
    let theirs = expected["loss"].to_vec1::<f32>().unwrap()[0];
    let ours = loss.to_scalar::<f32>().unwrap();
    assert!((ours - theirs).abs() <= 1e-5 * theirs.abs(), "loss {ours} vs PyTorch {theirs}");
    assert!((theirs as f64 - case["loss"].as_f64().unwrap()).abs() < 1e-6);
    let mut checked = 0;
    let largest = expected.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, g)| max_abs(g)).fold(0f32, f32::max);
    for (name, var) in params.vars() {
        let reference = expected.get(&format!("grad.{name}"));
        let Some(grad) = grads.get(var.as_tensor()) else {
            // a weight the loss does not use (BlipModel's text model has cross-attention weights)
            assert!(reference.is_none(), "{name}: PyTorch gave a gradient, we none");
            continue;
        };
        let reference = reference.unwrap_or_else(|| panic!("{name}: PyTorch gave no gradient"));
        assert_eq!(grad.dims(), reference.dims(), "{name}");
        let scale = max_abs(reference).max(ZERO * largest / RELATIVE);
        let diff = max_abs(&(grad - reference).unwrap());
        assert!(diff <= RELATIVE * scale, "{name}: max |ours − PyTorch| {diff:e}, PyTorch's max |grad| {scale:e}");
        checked += 1;
    }
    // PyTorch's gradients, tied names aside, are exactly the trained variables
    let tied_elsewhere = expected.keys().filter(|k| k.starts_with("grad.")).filter(|k| params.get(&k[5..]).is_none());
    assert_eq!(tied_elsewhere.collect::<Vec<_>>(), Vec::<&String>::new());
    assert!(checked > 40, "{checked} weights");
}

#[test]
fn captioning_gradients_equal_pytorch() {
    let case = case("caption");
    let (captioner, params) =
        Captioner::load_for_training(&model("train-caption"), &Device::Cpu, Trained::All).unwrap();
    let loss = captioner
        .loss_tensor(
            &images(&case),
            &rows::<u32>(&case["input_ids"]),
            &rows::<u32>(&case["attention_mask"]),
            &rows::<i64>(&case["labels"]),
            Some(case["label_smoothing"].as_f64().unwrap()),
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_gradients(&params, &grads, &loss, "gradients-caption.safetensors", &case);
    // the LM head is tied to the word embeddings: one variable, saved under both names
    let embeddings = "text_decoder.bert.embeddings.word_embeddings.weight";
    let head = params.get("text_decoder.cls.predictions.decoder.weight").unwrap();
    assert_eq!(head.as_tensor().id(), params.get(embeddings).unwrap().as_tensor().id());
    assert!(params.vars().iter().all(|(name, _)| name != "text_decoder.cls.predictions.decoder.weight"));
}

#[test]
fn vqa_gradients_equal_pytorch() {
    let case = case("vqa");
    let (vqa, params) = QuestionAnswerer::load_for_training(&model("train-vqa"), &Device::Cpu, Trained::All).unwrap();
    let decoder_mask = rows::<u32>(&case["decoder_attention_mask"]);
    let loss = vqa
        .answer_loss_tensor(
            &images(&case),
            (&rows::<u32>(&case["input_ids"]), &rows::<u32>(&case["attention_mask"])),
            (&rows::<u32>(&case["decoder_input_ids"]), Some(&decoder_mask)),
            &rows::<i64>(&case["labels"]),
            None,
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_gradients(&params, &grads, &loss, "gradients-vqa.safetensors", &case);
}

#[test]
fn contrastive_gradients_equal_pytorch() {
    let case = case("contrastive");
    let (matcher, params) =
        ImageTextMatcher::load_for_training(&model("train-blip"), &Device::Cpu, Trained::All).unwrap();
    let texts: Vec<String> = serde_json::from_value(case["texts"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let loss = matcher.contrastive_loss_tensor(&images(&case), &texts).unwrap();
    let grads = loss.backward().unwrap();
    assert_gradients(&params, &grads, &loss, "gradients-contrastive.safetensors", &case);
    assert!(params.get("logit_scale").is_some());
}

/// With the vision model frozen, its weights are not variables (and keep the inference
/// kernels), and the rest get the same gradients as when everything trains.
#[test]
fn a_frozen_vision_model_is_not_trained() {
    let case = case("caption");
    let (captioner, params) =
        Captioner::load_for_training(&model("train-caption"), &Device::Cpu, Trained::FrozenVision).unwrap();
    assert!(params.vars().iter().all(|(name, _)| !name.starts_with("vision_model.")));
    let loss = captioner
        .loss_tensor(
            &images(&case),
            &rows::<u32>(&case["input_ids"]),
            &rows::<u32>(&case["attention_mask"]),
            &rows::<i64>(&case["labels"]),
            Some(case["label_smoothing"].as_f64().unwrap()),
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    let expected: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("expected/gradients-caption.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let largest = expected.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, g)| max_abs(g)).fold(0f32, f32::max);
    for (name, var) in params.vars() {
        let reference = &expected[&format!("grad.{name}")];
        let diff = max_abs(&(grads.get(var.as_tensor()).unwrap() - reference).unwrap());
        assert!(diff <= RELATIVE * max_abs(reference).max(ZERO * largest / RELATIVE), "{name}: {diff:e}");
    }
}
