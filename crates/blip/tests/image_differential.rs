//! Differential test of decoding and preprocessing against PIL and transformers 5.24: ~150 random
//! images of every PIL mode in every format PIL writes (plus hand-written palette and 16-bit CMYK
//! TIFFs), each decoded by `load_image` and preprocessed by both resize backends, compared bit for
//! bit. Fixtures come from `scripts/make_differential_image_fixtures.py`; its docstring says what
//! is stored and why it is lossless.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blip::processor::image::{load_image, resize_pil, resize_torchvision, ImageProcessor, ResizeBackend};
use image::RgbImage;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images-differential")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

/// transformers' f32 output for (channel, level) of one backend, straight from its processor.
fn lut(backend: &str) -> Vec<f32> {
    let data = std::fs::read(fixtures().join("luts.safetensors")).expect("luts.safetensors");
    let st = safetensors::SafeTensors::deserialize(&data).expect("safetensors");
    let t = st.tensor(backend).unwrap_or_else(|_| panic!("no LUT {backend}"));
    assert_eq!(t.shape(), &[3, 256]);
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// The three expected images of a case, stacked top to bottom in one PNG (left-aligned, padded):
/// the decode, the torchvision resize, the PIL resize.
fn expected_images(case: &Value) -> [RgbImage; 3] {
    let sheet = image::open(fixtures().join(case["expected"].as_str().unwrap())).expect("expected PNG decodes");
    assert!(matches!(sheet, image::DynamicImage::ImageRgb8(_)), "expected PNGs are 8-bit RGB");
    let sheet = sheet.into_rgb8();
    let size = |v: &Value, a: &str, b: &str| (v[a].as_u64().unwrap() as u32, v[b].as_u64().unwrap() as u32);
    let (dw, dh) = (case["decoded_size"][0].as_u64().unwrap() as u32, case["decoded_size"][1].as_u64().unwrap() as u32);
    let (tw, th) = size(&case["target"], "width", "height");
    assert_eq!(sheet.height(), dh + 2 * th, "sheet height");
    let crop = |y, w, h| image::imageops::crop_imm(&sheet, 0, y, w, h).to_image();
    [crop(0, dw, dh), crop(dh, tw, th), crop(dh + th, tw, th)]
}

fn diff_count(a: &RgbImage, b: &RgbImage) -> Option<usize> {
    (a.dimensions() == b.dimensions()).then(|| a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).count())
}

/// Every case: the decode equals PIL's (as the processor sees it), and each backend's
/// pixel_values equal transformers' to the bit. I;16 cases (`deviation: "i16_scaled"`) are
/// compared too, against the project's documented deviation (16-bit gray scaled by 1/257 where
/// PIL clips at 255): the generator stored that scaled decode and transformers' pixel values of it.
#[test]
fn random_images_of_every_mode_and_format_match_transformers() {
    let m = manifest();
    let cases = m["cases"].as_array().expect("cases");
    let luts =
        [("torchvision", ResizeBackend::Torchvision, lut("torchvision")), ("pil", ResizeBackend::Pil, lut("pil"))];
    let mut failures = Vec::new();
    let mut per_pair: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut deviations = 0;
    for case in cases {
        let input = fixtures().join(case["input"].as_str().unwrap());
        let pair = format!("{}/{}", case["mode"].as_str().unwrap(), case["format"].as_str().unwrap());
        let what = format!(
            "{} ({pair}, file {} {}, {})",
            case["input"].as_str().unwrap(),
            case["file_format"].as_str().unwrap(),
            case["file_mode"].as_str().unwrap(),
            case["options"]
        );
        deviations += usize::from(case["deviation"].is_string());
        let counts = per_pair.entry(pair).or_default();
        counts.0 += 1;
        let [decoded, resized_tv, resized_pil] = expected_images(case);
        let image = match load_image(&input) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{what}: error {e}"));
                continue;
            }
        };
        let mut ok = true;
        match diff_count(&image, &decoded) {
            Some(0) => {}
            Some(n) => {
                let max = image.as_raw().iter().zip(decoded.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                failures
                    .push(format!("{what}: decode: {n} of {} values differ, by up to {max}", decoded.as_raw().len()));
                ok = false;
            }
            None => {
                failures.push(format!("{what}: decode: size {:?}, PIL {:?}", image.dimensions(), decoded.dimensions()));
                continue;
            }
        }
        let (th, tw) = (resized_tv.height() as usize, resized_tv.width() as usize);
        for ((name, backend, lut), resized_expected) in luts.iter().zip([&resized_tv, &resized_pil]) {
            let p = ImageProcessor { height: th, width: tw, ..ImageProcessor::default() }.with_backend(*backend);
            // transformers' pixel_values, rebuilt losslessly (the generator asserted this identity).
            let mut expected = vec![0f32; 3 * th * tw];
            for (i, px) in resized_expected.pixels().enumerate() {
                for c in 0..3 {
                    expected[c * th * tw + i] = lut[c * 256 + px.0[c] as usize];
                }
            }
            let got = p.preprocess(&image);
            assert_eq!(got.len(), expected.len());
            let mismatches = got.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            if mismatches != 0 {
                let resized = match backend {
                    ResizeBackend::Torchvision => resize_torchvision(&image, th, tw),
                    _ => resize_pil(&image, th, tw),
                };
                let levels = diff_count(&resized, resized_expected).unwrap();
                failures.push(format!("{what}: {name}: {mismatches} f32 / {levels} resized u8 values differ"));
                ok = false;
            }
        }
        if ok {
            counts.1 += 1;
        }
    }
    for (pair, (n, exact)) in &per_pair {
        println!("{pair:<24} {exact:>3} of {n:>3} bit-exact");
    }
    let exact: usize = per_pair.values().map(|c| c.1).sum();
    println!(
        "{exact} of {} images bit-exact (decode and both backends; {deviations} I;16 against the documented scaling)",
        cases.len()
    );
    assert!(cases.len() >= 150, "the fixture holds {} cases", cases.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}
