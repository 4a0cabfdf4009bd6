//! Other resolutions than the checkpoint's (`set_image_size`, the CLI's `--image-size`) against
//! transformers 5.24 with the processor resized and `interpolate_pos_encoding=True` (values from
//! scripts/make_image_size_fixtures.py): the tiny captioning checkpoint (96 px) captions with
//! identical tokens at 224 and 480 px, and the tiny retrieval one scores ITM and ITC within 1e-5.

use std::path::{Path, PathBuf};

use blip::processor::image::load_image;
use blip::{Captioner, Device, ImageTextMatcher};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/image-size.json")).unwrap()).unwrap()
}

fn images(expected: &Value) -> Vec<blip::RgbImage> {
    let names = expected["images"].as_array().unwrap();
    names.iter().map(|n| load_image(&fixtures().join("images-model").join(n.as_str().unwrap())).unwrap()).collect()
}

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

#[test]
fn captions_at_other_resolutions_equal_transformers() {
    let expected = expected();
    let images = images(&expected);
    for case in expected["captioning"].as_array().unwrap() {
        let mut captioner = Captioner::load(&model(case["model"].as_str().unwrap()), &Device::Cpu).unwrap();
        let size = case["image_size"].as_u64().unwrap() as usize;
        captioner.set_image_size(size).unwrap();
        assert_eq!(captioner.image_size(), size);
        let captions = captioner.caption(&images, &captioner.default_options()).unwrap();
        let tokens: Vec<Vec<u32>> = serde_json::from_value(case["tokens"].clone()).unwrap();
        for (i, (ours, theirs)) in captions.iter().zip(&tokens).enumerate() {
            assert_eq!(&ours[0].tokens[1..], theirs.as_slice(), "{size} px, image {i}");
        }
    }
}

#[test]
fn matching_at_another_resolution_equals_transformers() {
    let expected = expected();
    let images = images(&expected);
    let case = &expected["matching"][0];
    let mut matcher = ImageTextMatcher::load(&model(case["model"].as_str().unwrap()), &Device::Cpu).unwrap();
    matcher.set_image_size(case["image_size"].as_u64().unwrap() as usize).unwrap();
    let texts: Vec<String> = serde_json::from_value(case["texts"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let scores = matcher.match_texts(&images, &texts).unwrap();
    let (itm, itc): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        (serde_json::from_value(case["itm"].clone()).unwrap(), serde_json::from_value(case["itc"].clone()).unwrap());
    for (i, row) in scores.iter().enumerate() {
        for (j, score) in row.iter().enumerate() {
            assert!(
                (score.itm.unwrap() as f64 - itm[i][j]).abs() < 1e-5,
                "itm [{i}][{j}]: {:?} vs {}",
                score.itm,
                itm[i][j]
            );
            assert!((score.itc as f64 - itc[i][j]).abs() < 1e-5, "itc [{i}][{j}]: {} vs {}", score.itc, itc[i][j]);
        }
    }
}

#[test]
fn sizes_that_are_not_whole_patches_are_refused() {
    let mut captioner = Captioner::load(&model("tiny-caption-st"), &Device::Cpu).unwrap();
    let error = captioner.set_image_size(100).unwrap_err();
    assert_eq!(error.invalid_input().map(|e| e.param()), Some(blip::Param::ImageSize), "{error}");
    assert_eq!(captioner.image_size(), 96);
}
