//! Grad-CAM maps against the same computation in PyTorch on transformers 5.24's
//! BlipForImageTextRetrieval (LAVIS's `compute_gradcam`, values from
//! scripts/make_gradcam_fixtures.py): the text-averaged and per-token patch maps of every
//! image-text pair, through both text encoder layers, within 1e-4 of the largest value.

use std::path::{Path, PathBuf};

use blip::processor::image::load_image;
use blip::{Device, ImageTextMatcher};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn gradcam_maps_equal_pytorchs() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/gradcam.json")).unwrap()).unwrap();
    let model = fixtures().join("models").join(expected["model"].as_str().unwrap());
    let matcher = ImageTextMatcher::load(&model.display().to_string(), &Device::Cpu).unwrap();
    let texts: Vec<String> = serde_json::from_value(expected["texts"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let cases = expected["cases"].as_array().unwrap();
    let scale = cases.iter().flat_map(|c| c["maps"].as_array().unwrap()).flat_map(|m| m.as_array().unwrap());
    let scale = scale.map(|v| v.as_f64().unwrap().abs()).fold(0.0, f64::max);
    for case in cases {
        let image = load_image(&fixtures().join("images-model").join(case["image"].as_str().unwrap())).unwrap();
        let layer = case["block_num"].as_u64().unwrap() as usize;
        let ours = matcher.gradcam(&[image], &texts, layer).unwrap().remove(0);
        let maps: Vec<Vec<f64>> = serde_json::from_value(case["maps"].clone()).unwrap();
        let token_maps: Vec<Vec<Vec<f64>>> = serde_json::from_value(case["token_maps"].clone()).unwrap();
        let itm: Vec<f64> = serde_json::from_value(case["itm"].clone()).unwrap();
        for (j, cam) in ours.iter().enumerate() {
            assert_eq!(cam.grid, (6, 6));
            assert!((cam.itm as f64 - itm[j]).abs() < 1e-5, "itm {}", cam.itm);
            let what = format!("{} / {:?}, layer {layer}", case["image"], cam.text);
            assert_eq!(cam.tokens.len(), token_maps[j].len(), "{what}: tokens");
            for (ours, theirs) in
                std::iter::once((&cam.map, &maps[j])).chain(cam.tokens.iter().map(|t| &t.1).zip(&token_maps[j]))
            {
                for (a, b) in ours.iter().zip(theirs) {
                    assert!((*a as f64 - b).abs() <= 1e-4 * scale, "{what}: {a} vs PyTorch {b}");
                }
            }
        }
    }
    // the words of the per-token maps
    let image = load_image(&fixtures().join("images-model/chelsea.png")).unwrap();
    let cams = matcher.gradcam(&[image], &["a cat lying on a sofa"], 1).unwrap();
    let words: Vec<&str> = cams[0][0].tokens.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(words, ["a", "cat", "lying", "on", "a", "sofa"]);
}

#[test]
fn a_layer_the_encoder_lacks_is_refused() {
    let model = fixtures().join("models/tiny-itm").display().to_string();
    let matcher = ImageTextMatcher::load(&model, &Device::Cpu).unwrap();
    let image = load_image(&fixtures().join("images-model/chelsea.png")).unwrap();
    let error = matcher.gradcam(&[image], &["a cat"], 6).unwrap_err();
    assert_eq!(error.invalid_input().map(|e| e.param()), Some(blip::Param::GradcamLayer), "{error}");
}
