use blip::models::linear::Linear;
use candle_core::{DType, Device, Module, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        for (k, n) in [(768, 768), (768, 3072), (3072, 768), (768, 30524)] {
            let lins: Vec<Linear> = (0..12).map(|_| Linear::new(Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(dtype).unwrap(), None).unwrap()).collect();
            let x = Tensor::randn(0f32, 1.0, (1, 1, k), &dev).unwrap();
            lins[0].forward(&x).unwrap();
            let iters = 48;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for i in 0..iters { lins[i % 12].forward(&x).unwrap(); }
                best = best.min(t.elapsed().as_secs_f64() / iters as f64);
            }
            let bytes = (n * k * dtype.size_in_bytes()) as f64;
            println!("{dtype:?} {k}->{n}: {:.3} ms, {:.1} GB/s", best * 1e3, bytes / best / 1e9);
        }
    }
}
