//! Search latency on a synthetic collection (run by `scripts/bench_index.py`, not by CI):
//! `bench_search DB N QUERIES` fills DB with N random unit 256-d embeddings (if it has fewer),
//! then prints one JSON object: the time to open and answer the first query (embeddings loaded
//! from the database), the p50 and p95 of the next QUERIES searches, and the file size per image.

use std::path::Path;
use std::time::Instant;

use blip_index::{ImageRecord, Index, ModelIdentity};

const DIM: usize = 256;

/// xorshift64: the same vectors on every run, without a dependency.
struct Random(u64);

impl Random {
    fn unit_vector(&mut self) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIM)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 11) as f32 / (1u64 << 53) as f32 - 0.5
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, db, n, queries] = args.as_slice() else {
        return Err("usage: bench_search DB N QUERIES".into());
    };
    let (db, n, queries): (&Path, usize, usize) = (db.as_ref(), n.parse()?, queries.parse()?);
    let mut random = Random(0x9E37_79B9_7F4A_7C15);
    {
        let mut index = Index::open(db)?;
        let model = ModelIdentity {
            model: "synthetic".into(),
            config_hash: "0".repeat(64),
            dtype: "f32".into(),
            resize: "torchvision".into(),
            embedding_dim: DIM,
        };
        index.bind_model(&model)?;
        let have = index.len()?;
        let started = Instant::now();
        for first in (have..n).step_by(10_000) {
            let records: Vec<ImageRecord> = (first..(first + 10_000).min(n))
                .map(|i| ImageRecord {
                    path: format!("/photos/{:03}/{i:08}.jpg", i % 1000),
                    hash: Some(format!("{i:064x}")),
                    size: 100_000,
                    mtime_ns: 1_700_000_000_000_000_000,
                    width: Some(640),
                    height: Some(480),
                    embedding: Some(random.unit_vector()),
                    caption: Some("a photograph of something on a table".into()),
                    caption_score: Some(-5.0),
                    error: None,
                })
                .collect();
            index.add(&records, &[])?;
        }
        if have < n {
            eprintln!("filled {} rows in {:.1} s", n - have, started.elapsed().as_secs_f64());
        }
    }
    let mut query_random = Random(42);
    let started = Instant::now();
    let index = Index::open(db)?;
    index.search(&query_random.unit_vector(), 10)?;
    let cold = started.elapsed().as_secs_f64();
    let mut times: Vec<f64> = (0..queries)
        .map(|_| {
            let query = query_random.unit_vector();
            let started = Instant::now();
            index.search(&query, 10).map(|_| started.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let bytes = std::fs::metadata(db)?.len();
    println!(
        "{{\"n\": {n}, \"open_and_first_s\": {cold:.4}, \"p50_ms\": {:.3}, \"p95_ms\": {:.3}, \"bytes_per_image\": {}}}",
        at(0.5) * 1e3,
        at(0.95) * 1e3,
        bytes / n as u64
    );
    Ok(())
}
