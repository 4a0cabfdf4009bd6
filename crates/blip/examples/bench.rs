//! Times the captioning pipeline stage by stage on one checkpoint and prints JSON; the Rust half
//! of `scripts/bench.py`, which runs transformers on the same inputs and writes BENCHMARKS.md.
//!
//! cargo run --release --example bench -- MODEL_DIR f32|bf16|f16 IMAGE... (8 images; the first 4
//! at batch 1)

use std::time::Instant;

use blip::generation::GenerationOptions;
use blip::models::Linear;
use blip::{load_image, CaptionOptions, Captioner, DType, Device};
use candle_core::{Module, Tensor};

/// New tokens per caption, forced (min = max) so that every run decodes the same number.
const NEW_TOKENS: usize = 20;

/// Seconds `f` takes (its result dropped).
fn seconds<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<f64, E> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench MODEL_DIR f32|bf16|f16 IMAGE...";
    let [model, dtype, images @ ..] = args.as_slice() else { return Err(usage.into()) };
    let dtype = match dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => return Err(usage.into()),
    };
    if images.len() != 8 {
        return Err("give 8 images".into());
    }
    // As `blip` does: freed tensors stay in the heap for the next ones (see blip-cli's main).
    // SAFETY: mallopt only changes allocator thresholds, before any thread starts.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    let device = Device::Cpu;
    let started = Instant::now();
    let captioner = Captioner::load_with_dtype(model, &device, dtype)?;
    let load_s = started.elapsed().as_secs_f64();

    let decoded = images.iter().map(|p| load_image(std::path::Path::new(p))).collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let pixels = captioner.image_processor().preprocess_batch(&decoded, &device)?;
    let preprocess_s = started.elapsed().as_secs_f64() / 8.0;

    let options = CaptionOptions::new(
        blip::Prompt::None,
        GenerationOptions::default().max_new_tokens(NEW_TOKENS).min_new_tokens(NEW_TOKENS),
    );
    let model = captioner.model();
    // warm-up: first-touch allocations, thread pool start
    captioner.caption(&pixels.narrow(0, 0, 1)?, &options)?;

    let mut vision_b1 = 0.0;
    let mut generate_b1 = 0.0;
    for i in 0..4 {
        let one = pixels.narrow(0, i, 1)?;
        vision_b1 += seconds(|| model.encode_images(&one))? / 4.0;
        generate_b1 += seconds(|| captioner.caption(&one, &options))? / 4.0;
    }
    let vision_b8 = seconds(|| model.encode_images(&pixels))? / 8.0;
    let generate_b8 = seconds(|| captioner.caption(&pixels, &options))? / 8.0;

    // The matrix-product throughput this project's Linear reaches here, on the vision MLP's
    // shape at batch 8 (f32 weights [n, k] as checkpoints store them).
    let (m, k, n) = (8 * 577, 768, 3072);
    let a = Tensor::randn(0f32, 1.0, (m, k), &device)?;
    let fc = Linear::new(Tensor::randn(0f32, 1.0, (n, k), &device)?, None)?;
    fc.forward(&a)?;
    let matmul_s = seconds(|| (0..5).try_for_each(|_| fc.forward(&a).map(drop)))? / 5.0;

    let report = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(),
        "load_s": load_s,
        "preprocess_s_per_image": preprocess_s,
        "vision_b1_s": vision_b1,
        "vision_b8_s_per_image": vision_b8,
        "generate_b1_s": generate_b1,
        "generate_b8_s_per_image": generate_b8,
        "decode_ms_per_token_b1": (generate_b1 - vision_b1) / NEW_TOKENS as f64 * 1e3,
        "decode_ms_per_token_b8": (generate_b8 - vision_b8) * 8.0 / NEW_TOKENS as f64 * 1e3,
        "matmul_gflops_4616x768x3072": 2.0 * (m * k * n) as f64 / matmul_s / 1e9,
    });
    println!("{report}");
    Ok(())
}
