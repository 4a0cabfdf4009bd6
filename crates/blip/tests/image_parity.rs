//! Image decoding, resizing and normalization against transformers 5.24 (both BLIP image processor
//! backends) and PIL. Fixtures come from `scripts/make_image_fixtures.py`; see its docstring for
//! what is stored and why it is lossless.

use std::path::{Path, PathBuf};

use blip::processor::image::{
    load_image, load_image_from_memory, resize_pil, resize_torchvision, ImageProcessor, ResizeBackend,
};
use blip::Error;
use image::RgbImage;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

fn entries<'a>(m: &'a Value, key: &str) -> &'a Vec<Value> {
    m[key].as_array().unwrap_or_else(|| panic!("manifest has no {key}"))
}

fn fixture_path(v: &Value) -> PathBuf {
    fixtures().join(v.as_str().expect("path string"))
}

/// Expected RGB images are stored as 8-bit RGB PNGs written by PIL.
fn expected_rgb(v: &Value) -> RgbImage {
    let img = image::open(fixture_path(v)).expect("expected PNG decodes");
    assert!(matches!(img, image::DynamicImage::ImageRgb8(_)), "expected PNGs are 8-bit RGB");
    img.into_rgb8()
}

/// Number of differing u8 values (None if the shapes differ).
fn diff_count(a: &RgbImage, b: &RgbImage) -> Option<usize> {
    (a.dimensions() == b.dimensions()).then(|| a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).count())
}

/// The public checkpoints' preprocessor configs, vendored in tests/fixtures.
fn hub_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub-configs").join(name).join("preprocessor_config.json")
}

struct Luts {
    data: Vec<u8>,
}

impl Luts {
    fn load() -> Self {
        Self { data: std::fs::read(fixtures().join("luts.safetensors")).expect("luts.safetensors") }
    }
    /// transformers' f32 output for (channel, level), straight from its processor.
    fn get(&self, name: &str) -> Vec<f32> {
        let st = safetensors::SafeTensors::deserialize(&self.data).expect("safetensors");
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no LUT {name}"));
        assert_eq!(t.shape(), &[3, 256]);
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

fn backend_name(b: ResizeBackend) -> &'static str {
    match b {
        ResizeBackend::Torchvision => "torchvision",
        ResizeBackend::Pil => "pil",
        other => unimplemented!("{other:?}"),
    }
}

#[test]
fn decode_matches_pil() {
    let m = manifest();
    let mut failures = Vec::new();
    for case in entries(&m, "decode") {
        let input = fixture_path(&case["input"]);
        let expected = expected_rgb(&case["expected"]);
        let got = match load_image(&input) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{}: error {e}", input.display()));
                continue;
            }
        };
        match diff_count(&got, &expected) {
            Some(0) => println!(
                "decode ok   {:<36} {}x{}  ({})",
                case["input"].as_str().unwrap(),
                got.width(),
                got.height(),
                case["note"].as_str().unwrap()
            ),
            Some(n) => failures.push(format!("{}: {n} of {} values differ", input.display(), got.as_raw().len())),
            None => failures.push(format!(
                "{}: size {:?}, expected {:?}",
                input.display(),
                got.dimensions(),
                expected.dimensions()
            )),
        }
    }
    assert!(failures.is_empty(), "decode mismatches:\n{}", failures.join("\n"));
}

#[test]
fn decode_from_memory_matches_file() {
    let path = fixtures().join("inputs/jpeg_exif6.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let a = load_image(&path).unwrap();
    let b = load_image_from_memory(&bytes, Path::new("in-memory.jpg")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_files_give_errors_naming_the_path() {
    let m = manifest();
    for case in entries(&m, "errors") {
        let input = fixture_path(&case["input"]);
        match load_image(&input) {
            Ok(img) => panic!(
                "{} decoded ({}x{}), PIL raises: {}",
                input.display(),
                img.width(),
                img.height(),
                case["pil_error"]
            ),
            Err(e) => {
                assert!(matches!(e, Error::Image { .. }), "{}: not an image error: {e:?}", input.display());
                let msg = e.to_string();
                assert!(msg.contains(&*input.to_string_lossy()), "message lacks the path: {msg}");
                println!("error ok    {msg}");
            }
        }
    }
    // Garbage that merely looks like a JPEG or PNG must not panic either.
    let mut junk = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
    junk.extend((0..500u32).map(|i| (i * 7919 % 251) as u8));
    assert!(load_image_from_memory(&junk, Path::new("junk.jpg")).is_err());
    let png = std::fs::read(fixtures().join("inputs/png_rgb.png")).unwrap();
    for cut in [8, 20, 33, 60, png.len() - 13] {
        let r = load_image_from_memory(&png[..cut], Path::new("cut.png"));
        assert!(r.is_err(), "PNG cut at {cut} decoded");
    }
}

fn processor(backend: ResizeBackend) -> ImageProcessor {
    ImageProcessor::from_file(&hub_config("blip-image-captioning-large")).unwrap().with_backend(backend)
}

#[test]
fn pixel_values_bit_exact_at_384() {
    let m = manifest();
    let luts = Luts::load();
    let mut failures = Vec::new();
    for case in entries(&m, "pixel_values") {
        let input = fixture_path(&case["input"]);
        let image = load_image(&input).unwrap();
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pil] {
            let name = backend_name(backend);
            let resized_expected = expected_rgb(&case[name]);
            let lut = luts.get(&format!("default/{name}"));
            // transformers' pixel_values, rebuilt losslessly (the generator asserted this identity).
            let (h, w) = (384usize, 384usize);
            let mut expected = vec![0f32; 3 * h * w];
            for (i, px) in resized_expected.pixels().enumerate() {
                for c in 0..3 {
                    expected[c * h * w + i] = lut[c * 256 + px.0[c] as usize];
                }
            }
            let got = processor(backend).preprocess(&image);
            assert_eq!(got.len(), expected.len());
            // resized first (what a server queues), the values made later: the same bits
            let later = processor(backend).preprocess(&processor(backend).resize(image.clone()));
            assert!(later.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "resize, then preprocess");
            let mismatches = got.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            let resized = match backend {
                ResizeBackend::Torchvision => resize_torchvision(&image, 384, 384),
                ResizeBackend::Pil => resize_pil(&image, 384, 384),
                other => unimplemented!("{other:?}"),
            };
            let level_diffs = diff_count(&resized, &resized_expected).unwrap();
            println!(
                "pixel_values {:<28} {:<11} f32 mismatches {mismatches} of {}, resized u8 mismatches {level_diffs}",
                case["input"].as_str().unwrap(),
                name,
                got.len()
            );
            if mismatches != 0 || level_diffs != 0 {
                failures.push(format!("{} {name}: {mismatches} f32 / {level_diffs} u8 mismatches", input.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn backends_really_differ() {
    // Guard against fixtures accidentally produced by the same backend twice.
    let m = manifest();
    let total: u64 = entries(&m, "pixel_values").iter().map(|c| c["backend_differing_values"].as_u64().unwrap()).sum();
    assert!(total > 0);
    let image = load_image(&fixtures().join("inputs/chelsea.png")).unwrap();
    assert_ne!(resize_torchvision(&image, 384, 384), resize_pil(&image, 384, 384));
}

#[test]
fn arithmetic_variants_match_transformers() {
    let m = manifest();
    let luts = Luts::load();
    let levels: Vec<u8> = (0..=255).collect();
    // A 256x1 image per channel pattern: every level in every channel, no resize.
    let img = RgbImage::from_fn(256, 1, |x, _| image::Rgb([levels[x as usize]; 3]));
    let variants = m["lut_variants"].as_object().unwrap();
    let mut failures = Vec::new();
    for (vname, extra) in variants {
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pil] {
            let mut cfg = serde_json::json!({"do_resize": false});
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            let p = ImageProcessor::from_json_str(&cfg.to_string(), Path::new("variant.json"))
                .unwrap()
                .with_backend(backend);
            let got = p.preprocess(&img);
            let want = luts.get(&format!("{vname}/{}", backend_name(backend)));
            let bad = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            println!("arithmetic  {vname:<15} {:<11} mismatches {bad} of 768", backend_name(backend));
            if bad != 0 {
                failures.push(format!("{vname}/{}: {bad}", backend_name(backend)));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn resize_sweep_matches_torch_and_pil() {
    let m = manifest();
    let n = m["resize_sweep_cases"].as_u64().unwrap() as usize;
    let data = std::fs::read(fixtures().join("resize_sweep.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let img = |name: String| -> RgbImage {
        let t = st.tensor(&name).unwrap();
        let s = t.shape();
        assert_eq!(s.len(), 3);
        RgbImage::from_raw(s[1] as u32, s[0] as u32, t.data().to_vec()).unwrap()
    };
    let mut failures = Vec::new();
    for i in 0..n {
        let input = img(format!("{i:02}/input"));
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pil] {
            let want = img(format!("{i:02}/{}", backend_name(backend)));
            let (h, w) = (want.height() as usize, want.width() as usize);
            let got = match backend {
                ResizeBackend::Torchvision => resize_torchvision(&input, h, w),
                ResizeBackend::Pil => resize_pil(&input, h, w),
                other => unimplemented!("{other:?}"),
            };
            let d = diff_count(&got, &want).unwrap();
            if d != 0 {
                failures.push(format!(
                    "case {i}: {}x{} -> {w}x{h} {}: {d} of {} values differ",
                    input.width(),
                    input.height(),
                    backend_name(backend),
                    got.as_raw().len()
                ));
            }
        }
    }
    println!("resize sweep: {n} size pairs x 2 backends, {} failing", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn hub_configs_parse() {
    for name in ["blip-image-captioning-base", "blip-image-captioning-large", "blip-vqa-base", "blip-itm-base-coco"] {
        let path = hub_config(name);
        let p = ImageProcessor::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((p.height, p.width), (384, 384), "{name}");
        assert_eq!(p.image_mean, [0.48145466, 0.4578275, 0.40821073], "{name}");
        assert_eq!(p.image_std, [0.26862954, 0.26130258, 0.27577711], "{name}");
        assert!(p.do_resize && p.do_rescale && p.do_normalize, "{name}");
        assert_eq!(p.rescale_factor, 1.0 / 255.0, "{name}");
        assert_eq!(p.backend, ResizeBackend::Torchvision);
        assert_eq!(p, ImageProcessor::default(), "{name}");
    }
}

#[test]
fn config_forms_and_errors() {
    let path = Path::new("some/dir/preprocessor_config.json");
    let parse = |s: &str| ImageProcessor::from_json_str(s, path);
    assert_eq!((parse(r#"{"size": 224}"#).unwrap().height, parse(r#"{"size": 224}"#).unwrap().width), (224, 224));
    let p = parse(r#"{"size": {"height": 240, "width": 320}}"#).unwrap();
    assert_eq!((p.height, p.width), (240, 320));
    let p = parse(r#"{"size": {"shortest_edge": 300}}"#).unwrap();
    assert_eq!((p.height, p.width), (300, 300));
    let p = parse(r#"{"image_mean": 0.5, "image_std": [0.1, 0.2, 0.3], "do_pad": true, "size_divisor": 32, "resample": 3, "unknown": {"x": 1}}"#).unwrap();
    assert_eq!(p.image_mean, [0.5; 3]);
    assert_eq!(p.image_std, [0.1, 0.2, 0.3]);
    assert_eq!(parse("{}").unwrap(), ImageProcessor::default());
    for bad in [
        "not json",
        "[1, 2]",
        r#"{"size": "big"}"#,
        r#"{"size": {"longest_edge": 3}}"#,
        r#"{"size": 0}"#,
        r#"{"do_resize": "yes"}"#,
        r#"{"image_mean": [0.5, 0.5]}"#,
        r#"{"image_std": [0.0, 1.0, 1.0]}"#,
        r#"{"resample": 2}"#,
        r#"{"rescale_factor": "x"}"#,
    ] {
        let e = parse(bad).expect_err(bad);
        assert!(matches!(e, Error::Config { .. }), "{bad}: {e:?}");
        assert!(e.to_string().contains("some/dir/preprocessor_config.json"), "{e}");
    }
    let missing = Path::new("/nonexistent/preprocessor_config.json");
    let e = ImageProcessor::from_file(missing).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/preprocessor_config.json"), "{e}");
}

#[test]
fn batch_equals_single_images() {
    let images: Vec<RgbImage> = ["inputs/chelsea.png", "inputs/rocket.jpg", "inputs/jpeg_gray.jpg"]
        .iter()
        .map(|p| load_image(&fixtures().join(p)).unwrap())
        .collect();
    for backend in [ResizeBackend::Torchvision, ResizeBackend::Pil] {
        let p = ImageProcessor::default().with_backend(backend);
        let t = p.preprocess_batch(&images, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 3, 384, 384]);
        let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let single: Vec<f32> = images.iter().flat_map(|im| p.preprocess(im)).collect();
        assert!(flat.iter().zip(&single).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let p = ImageProcessor::default();
    assert!(matches!(p.preprocess_batch(&[], &candle_core::Device::Cpu), Err(Error::InvalidInput(_))));
    let no_resize = ImageProcessor { do_resize: false, ..ImageProcessor::default() };
    assert!(matches!(no_resize.preprocess_batch(&images[..2], &candle_core::Device::Cpu), Err(Error::InvalidInput(_))));
    let t = no_resize.preprocess_batch(&images[..1], &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 300, 451]);
}

#[test]
fn same_size_is_untouched_and_resize_is_fast_enough() {
    let image = load_image(&fixtures().join("inputs/rocket.jpg")).unwrap();
    assert_eq!(resize_torchvision(&image, 427, 640), image);
    assert_eq!(resize_pil(&image, 427, 640), image);
    // A 12-megapixel photo to 384x384 must stay well under a second in release builds.
    let big = image::imageops::resize(&image, 4000, 3000, image::imageops::FilterType::Triangle);
    let t = std::time::Instant::now();
    let out = resize_torchvision(&big, 384, 384);
    let dt = t.elapsed();
    println!("resize 4000x3000 -> 384x384: {dt:?}");
    assert_eq!(out.dimensions(), (384, 384));
    if !cfg!(debug_assertions) {
        assert!(dt.as_secs_f64() < 2.0, "{dt:?}");
    }
}
