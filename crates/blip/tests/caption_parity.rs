//! The captioning model against transformers 5.24 on the committed tiny checkpoints (made by
//! scripts/make_model_fixtures.py): pixel values bit-exact, hidden states and logits within 1e-4,
//! generated tokens identical. Set BLIP_FULL_FIXTURE to the folder `--full` wrote to run the same
//! checks on a full-size checkpoint (`cargo test --release -- --ignored full_size`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip::generation::GenerationOptions;
use blip::processor::image::load_image;
use blip::{CaptionOptions, Captioner, Device};
use candle_core::{IndexOp, Tensor};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One checkpoint with what transformers produced for it.
struct Expected {
    meta: Value,
    tensors: HashMap<String, Tensor>,
    captioner: Captioner,
}

impl Expected {
    /// `expected` is the path of the `.json`/`.safetensors` pair without extension.
    fn load(expected: &Path, model_dir: &Path) -> Self {
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(expected.with_extension("json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(expected.with_extension("safetensors"), &Device::Cpu).unwrap();
        let captioner = Captioner::load(model_dir.to_str().unwrap(), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        Self { meta, tensors, captioner }
    }

    fn tiny(name: &str) -> Self {
        Self::load(&fixtures().join("expected").join(name), &fixtures().join("models").join(name))
    }

    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn image_paths(&self) -> Vec<PathBuf> {
        self.meta["images"].as_array().unwrap().iter().map(|p| fixtures().join(p.as_str().unwrap())).collect()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor) {
    let diff = max_abs_diff(ours, theirs);
    eprintln!("{what}: max |diff| {diff:e}");
    assert!(diff <= TOLERANCE, "{what}: max |diff| {diff} > {TOLERANCE}");
}

/// Pixel values from the image files through our decoder and resize: the same f32 bits.
fn check_pixels(e: &Expected) {
    let images: Vec<_> = e.image_paths().iter().map(|p| load_image(p).unwrap()).collect();
    let ours = e.captioner.image_processor().preprocess_batch(&images, &Device::Cpu).unwrap();
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = e.tensor("pixel_values").flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let differing = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} pixel values differ", theirs.len());
}

/// The vision tower and a teacher-forced decoder pass on the prompt.
fn check_activations(e: &Expected) {
    let model = e.captioner.model();
    let image_embeds = model.encode_images(e.tensor("pixel_values")).unwrap();
    assert_close("vision last_hidden_state", &image_embeds, e.tensor("vision_last_hidden_state"));

    let ids = e.tensor("prompt_input_ids").to_dtype(candle_core::DType::U32).unwrap();
    let (hidden, logits) = model.decode(&ids, &image_embeds).unwrap();
    assert_close("text decoder hidden state", &hidden, e.tensor("text_decoder_hidden_state"));
    assert_close("text decoder logits, image 0", &logits.i(0).unwrap(), e.tensor("text_decoder_logits_0"));
    let last = logits.i((.., logits.dim(1).unwrap() - 1)).unwrap();
    assert_close("text decoder last logits", &last, e.tensor("text_decoder_last_logits"));
}

/// transformers pads rows that finished early with pad 0 after [SEP]; we return them unpadded.
fn unpadded(sequence: &Value, prefix_len: usize) -> Vec<u32> {
    let tokens: Vec<u32> = sequence.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    match tokens.iter().skip(prefix_len).position(|&t| t == 102) {
        Some(i) => tokens[..prefix_len + i + 1].to_vec(),
        None => tokens,
    }
}

/// Every generate call the fixture recorded, from its pixel values, same batch composition.
fn check_generation(e: &Expected) {
    let pixel_values = e.tensor("pixel_values");
    let cases = e.meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rows: Vec<u32> = case["images"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
        let kwargs = &case["generate_kwargs"];
        let options = CaptionOptions::new(
            case["prompt"].as_str().map(String::from),
            GenerationOptions::default()
                .max_new_tokens(kwargs["max_new_tokens"].as_u64().unwrap_or(20) as usize)
                .min_new_tokens(kwargs["min_new_tokens"].as_u64().unwrap_or(0) as usize),
        );
        let batch = pixel_values.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
        let captions = e.captioner.caption(&batch, &options).unwrap();
        let prefix_len = e.captioner.text_processor().caption_prefix(case["prompt"].as_str()).unwrap().len();
        for (row, (caption, sequence)) in
            captions.iter().map(|c| &c[0]).zip(case["sequences"].as_array().unwrap()).enumerate()
        {
            assert_eq!(caption.tokens, unpadded(sequence, prefix_len), "case {name}, row {row}");
            if rows.len() == 1 {
                assert_eq!(caption.text, case["captions"][row].as_str().unwrap(), "case {name}: decoded text");
            }
        }
    }
}

#[test]
fn pytorch_bin_checkpoint() {
    let e = Expected::tiny("tiny-caption-bin");
    check_pixels(&e);
    check_activations(&e);
    check_generation(&e);
}

/// bf16-stored safetensors without the tied decoder weight.
#[test]
fn bf16_safetensors_checkpoint_without_tied_key() {
    let e = Expected::tiny("tiny-caption-st");
    check_pixels(&e);
    check_activations(&e);
    check_generation(&e);
}

/// f16 weights split over two safetensors shards with an index.
#[test]
fn sharded_f16_checkpoint() {
    let e = Expected::tiny("tiny-caption-sharded");
    check_activations(&e);
    check_generation(&e);
}

#[test]
#[ignore = "needs a full-size fixture: BLIP_FULL_FIXTURE=/tmp/blip-full (scripts/make_model_fixtures.py --full)"]
fn full_size() {
    let root = PathBuf::from(std::env::var("BLIP_FULL_FIXTURE").expect("BLIP_FULL_FIXTURE"));
    let e = Expected::load(&root.join("expected"), &root.join("model"));
    check_pixels(&e);
    check_activations(&e);
    check_generation(&e);
}
