//! A checkpoint saved the transformers-5 way (`save_pretrained`: the image processor's settings
//! inside `processor_config.json`, no `preprocessor_config.json`, a `generation_config.json`):
//! its own normalization (mean and std 0.5) and size (64 px) give transformers' pixel values bit
//! for bit and its tokens, and the file's generation settings are applied only when asked for,
//! as transformers' BLIP `generate` ignores them (fixture made by
//! scripts/make_model_fixtures.py; see FIXTURES.md).

use std::path::{Path, PathBuf};

use blip::{load_image, Captioner, Device, GenerationOptions, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> (Value, Tensor) {
    let base = fixtures().join("expected/tiny-caption-saved5");
    let meta = serde_json::from_str(&std::fs::read_to_string(base.with_extension("json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(base.with_extension("safetensors"), &Device::Cpu).unwrap();
    (meta, tensors["pixel_values"].clone())
}

fn model_dir() -> PathBuf {
    fixtures().join("models/tiny-caption-saved5")
}

/// A row of `generate`'s output without the padding after [SEP].
fn tokens(row: &Value) -> Vec<u32> {
    let row: Vec<u32> = row.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    match row.iter().position(|&t| t == 102) {
        Some(sep) => row[..=sep].to_vec(),
        None => row,
    }
}

#[test]
fn processor_config_layout_gives_transformers_pixels_and_tokens() {
    let (meta, pixel_values) = expected();
    let captioner = Captioner::load(model_dir().to_str().unwrap(), &Device::Cpu).unwrap();
    let processor = captioner.image_processor();
    assert_eq!(
        (processor.height, processor.width, processor.image_mean, processor.image_std),
        (64, 64, [0.5; 3], [0.5; 3])
    );
    let images: Vec<_> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| load_image(&fixtures().join(p.as_str().unwrap())).unwrap())
        .collect();
    let ours = processor.preprocess_batch(&images, &Device::Cpu).unwrap();
    let diff = (&ours - &pixel_values).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "pixel values must be bit-exact");

    let defaults = captioner.generation().clone();
    let saved = defaults.saved().unwrap().cloned().expect("the checkpoint has a generation_config.json");
    assert_eq!(
        (saved.num_beams, saved.max_new_tokens, saved.min_new_tokens, saved.no_repeat_ngram_size),
        (3, 12, 3, 2)
    );
    assert!(defaults.differs());
    let override_with = |base: GenerationOptions| base.num_beams(1).max_new_tokens(5);
    let mut checked = 0;
    for case in meta["cases"].as_array().unwrap().iter().filter(|c| c["image"].is_u64()) {
        let generation = match case["name"].as_str().unwrap() {
            // transformers' `model.generate(**inputs)`: the file is not applied
            "default" => defaults.transformers.clone(),
            "generation_config" => saved.clone(),
            "override" => override_with(defaults.transformers.clone()),
            "generation_config_override" => override_with(saved.clone()),
            other => panic!("unknown case {other}"),
        };
        let i = case["image"].as_u64().unwrap() as usize;
        let mut options = captioner.default_options();
        options.generation = generation;
        let caption = &captioner.caption(&ours.narrow(0, i, 1).unwrap(), &options).unwrap()[0][0];
        assert_eq!(caption.tokens, tokens(&case["sequences"][0]), "case {} image {i}", case["name"]);
        assert_eq!(caption.text, case["captions"][0].as_str().unwrap(), "case {} image {i}", case["name"]);
        checked += 1;
    }
    assert_eq!(checked, 40);
}

/// The same settings as `preprocessor_config.json` (the older layout) load the same processor;
/// a checkpoint with neither file is refused, naming both.
#[test]
fn both_layouts_and_neither() {
    let saved = Captioner::load(model_dir().to_str().unwrap(), &Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("blip-saved-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "processor_config.json" {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let err = Captioner::load(dir.to_str().unwrap(), &Device::Cpu).err().expect("no image processor settings");
    let message = err.to_string();
    assert!(message.contains("preprocessor_config.json") && message.contains("processor_config.json"), "{message}");

    let processor_config: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("processor_config.json")).unwrap()).unwrap();
    std::fs::write(dir.join("preprocessor_config.json"), processor_config["image_processor"].to_string()).unwrap();
    let older = Captioner::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(older.image_processor(), saved.image_processor());

    // A generation_config.json asking for what this crate lacks does not stop loading (it is not
    // applied unless asked for); asked for, it is refused naming the setting.
    std::fs::write(dir.join("generation_config.json"), r#"{"num_beams": 4, "num_beam_groups": 2}"#).unwrap();
    let grouped = Captioner::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let err = grouped.generation().saved().unwrap_err().to_string();
    assert!(err.contains("generation_config.json") && err.contains("num_beam_groups 2"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
