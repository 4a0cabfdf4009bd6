#!/usr/bin/env python3
"""The Python package, measured (not run by CI; results in BENCHMARKS.md), on the full-size
random captioning checkpoint of scripts/bench.py:

1. The binding's cost: `blip.Captioner.caption` on decoded images (numpy arrays), per image at
   batch 1 and 8, against the Rust API on the same images (crates/blip/examples/bench.rs:
   preprocessing plus `Captioner::caption`), 20 new tokens forced in both.
2. Ray Data: 200 photos, `read_binary_files` → `map_batches` (one actor, 2 threads, batch 8) →
   captions, with this package's `blip.ray.BlipCaptioner` and with transformers'
   `BlipForConditionalGeneration` in a callable class as Ray's batch-inference examples write it;
   images per second and the actor's peak memory (its RSS high-water mark).

Run from the repository root in the pinned environment plus Ray and the package:
    .venv/bin/pip install -r scripts/requirements-bench-python.txt
    VIRTUAL_ENV=$PWD/.venv .venv/bin/maturin develop --release -m crates/blip-py/Cargo.toml
    .venv/bin/python scripts/bench_python.py [--work DIR] [--images 200]
"""

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import IMAGES, REPO, machine  # noqa: E402

NEW_TOKENS = 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def binding(model_dir: Path, paths):
    import blip

    rust = json.loads(subprocess.run([str(REPO / "target/release/examples/bench"), str(model_dir), "f32",
                                      *map(str, paths)], capture_output=True, text=True, check=True).stdout)
    captioner = blip.Captioner(str(model_dir))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    forced = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    captioner.caption(arrays[:1], **forced)  # warm-up, as the Rust bench
    started = time.perf_counter()
    for image in arrays[:4]:
        captioner.caption([image], **forced)
    b1 = (time.perf_counter() - started) / 4
    started = time.perf_counter()
    captioner.caption(arrays, **forced)
    b8 = (time.perf_counter() - started) / 8
    rust_b1 = rust["generate_b1_s"] + rust["preprocess_s_per_image"]
    rust_b8 = rust["generate_b8_s_per_image"] + rust["preprocess_s_per_image"]
    return {"python_b1_s": b1, "python_b8_s_per_image": b8, "rust_b1_s": rust_b1, "rust_b8_s_per_image": rust_b8}


class TransformersCaptioner:
    """The way Ray's batch-inference examples caption: processor + model in a callable class."""

    def __init__(self, model_dir: str, threads: int):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        torch.set_num_threads(threads)
        self.torch = torch
        self.processor = BlipProcessor.from_pretrained(model_dir)
        self.model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()

    def __call__(self, batch):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["bytes"]]
        inputs = self.processor(images=images, return_tensors="pt")
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        batch["caption"] = np.array(self.processor.batch_decode(out, skip_special_tokens=True), dtype=object)
        batch["peak_rss_mb"] = np.full(len(images), peak_rss_mb())
        return batch


class OursCaptioner:
    """blip.ray.BlipCaptioner, recording the actor's peak memory beside the captions."""

    def __init__(self, model_dir: str, threads: int):
        from blip.ray import BlipCaptioner

        self.inner = BlipCaptioner(model_dir, threads=threads, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    def __call__(self, batch):
        batch = self.inner(batch)
        batch["peak_rss_mb"] = np.full(len(batch["caption"]), peak_rss_mb())
        return batch


def ray_pipeline(model_dir: Path, folder: Path, callable_class, threads: int, batch: int):
    import ray

    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    started = time.perf_counter()
    rows = ds.map_batches(callable_class, fn_constructor_kwargs={"model_dir": str(model_dir), "threads": threads},
                          concurrency=1, batch_size=batch, num_cpus=1).drop_columns(["bytes"]).take_all()
    seconds = time.perf_counter() - started
    return {"images_per_s": len(rows) / seconds, "seconds": seconds, "images": len(rows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip-bench"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.work)
    model_dir = work / "model"
    if not (model_dir / "pytorch_model.bin").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_model_fixtures.py"), "--full", str(work)], check=True)
    subprocess.run(["cargo", "build", "--release", "--example", "bench", "--features", "blip/openblas"], cwd=REPO,
                   check=True)
    data = Path(skimage.__file__).parent / "data"
    paths = [data / n for n in IMAGES]
    threads = os.cpu_count()

    result = {"machine": machine(), "binding": binding(model_dir, paths)}
    print(json.dumps(result["binding"]), file=sys.stderr)

    folder = work / f"ray-photos-{args.images}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(args.images):
        shutil.copy(paths[i % len(paths)], folder / f"{i:04d}-{paths[i % len(paths)].name}")
    import ray

    ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
    result["ray"] = {
        "ours": ray_pipeline(model_dir, folder, OursCaptioner, threads, args.batch_size),
        "transformers": ray_pipeline(model_dir, folder, TransformersCaptioner, threads, args.batch_size),
    }
    ray.shutdown()
    print(json.dumps(result, indent=1))

    b = result["binding"]
    print(f"\n{result['machine']}")
    print(f"binding: batch 1 {b['python_b1_s']:.3f} s vs Rust {b['rust_b1_s']:.3f} s "
          f"({b['python_b1_s'] / b['rust_b1_s']:.3f}×); batch 8 {b['python_b8_s_per_image']:.3f} s/image vs "
          f"{b['rust_b8_s_per_image']:.3f} ({b['python_b8_s_per_image'] / b['rust_b8_s_per_image']:.3f}×)")
    ours, theirs = result["ray"]["ours"], result["ray"]["transformers"]
    print(f"ray: ours {ours['images_per_s']:.2f} images/s, transformers {theirs['images_per_s']:.2f} images/s "
          f"({ours['images_per_s'] / theirs['images_per_s']:.2f}×); peak RSS per actor {ours['peak_rss_mb']:.0f} MB "
          f"vs {theirs['peak_rss_mb']:.0f} MB ({ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}×)")


if __name__ == "__main__":
    main()
