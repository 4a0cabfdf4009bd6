#!/usr/bin/env python3
"""The vision tower beside OpenVINO (not run by CI; results in BENCHMARKS.md): the full-size
random captioning checkpoint of scripts/bench.py, the same 8 scikit-image photos at 384 px, in
one run on this machine, seconds per image at batch 1 (mean over the first 4 photos) and batch 8:

  - this project (crates/blip/examples/bench.rs), f32 and bf16 weights;
  - PyTorch + transformers, f32 and bf16;
  - OpenVINO: `ov.convert_model(model.vision_model)` compiled for the CPU with
    `INFERENCE_PRECISION_HINT` f32 and bf16, 2 threads, the latency hint (issue 20's setting).

Each is the best of 3 timings after a warm-up. Records the CPU model and flags, and whether the
CPU has bf16 instructions (without them OpenVINO's bf16 hint runs f32).

    .venv/bin/pip install -r scripts/requirements-bench-openvino.txt
    .venv/bin/python scripts/bench_vision_openvino.py [--work DIR]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import openvino as ov
import skimage
import torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.image_utils import load_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import IMAGES, REPO, machine  # noqa: E402

THREADS = 2


def best(f, repeat=3):
    f()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def per_image(run, pixels):
    """(batch 1 mean over 4 photos, batch 8 per image) seconds of `run(pixels)`."""
    b1 = sum(best(lambda: run(pixels[i:i + 1])) for i in range(4)) / 4
    return b1, best(lambda: run(pixels)) / 8


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip-bench"))
    args = ap.parse_args()
    model_dir = Path(args.work) / "model"
    paths = [Path(skimage.__file__).parent / "data" / n for n in IMAGES]
    torch.set_num_threads(THREADS)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = BlipProcessor.from_pretrained(model_dir)
        pixels = processor(images=[load_image(str(p)) for p in paths], return_tensors="pt")["pixel_values"]
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
            with torch.no_grad():
                results[f"PyTorch {name}"] = per_image(lambda pv: model.vision_model(pixel_values=pv.to(dtype)), pixels)
        model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        with torch.no_grad():
            converted = ov.convert_model(model.vision_model, example_input={"pixel_values": pixels[:1]})
    core = ov.Core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for name in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": name, "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
        compiled = core.compile_model(converted, "CPU", config)
        request = compiled.create_infer_request()
        results[f"OpenVINO {name}"] = per_image(lambda pv: request.infer({0: pv.numpy()}), pixels)
    subprocess.run(["cargo", "build", "--release", "--example", "bench", "--features", "blip/openblas"], cwd=REPO,
                   check=True, capture_output=True)
    for name in ("f32", "bf16"):
        cmd = [str(REPO / "target/release/examples/bench"), str(model_dir), name] + [str(p) for p in paths]
        ours = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                         env={"RAYON_NUM_THREADS": str(THREADS)}).stdout)
        results[f"this project {name}"] = (ours["vision_b1_s"], ours["vision_b8_s_per_image"])
    print(f"# {machine()}; OpenVINO {ov.__version__} CPU capabilities: {' '.join(capabilities)}; {THREADS} threads")
    print("| vision tower (s/image) | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for i, label in enumerate(("batch 1", "batch 8")):
        print(f"| {label} | " + " | ".join(f"{v[i]:.3f}" for v in results.values()) + " |")
    for i, label in enumerate(("batch 1", "batch 8")):
        o, t, v = results["this project f32"][i], results["PyTorch f32"][i], results["OpenVINO f32"][i]
        ob, tb, vb = results["this project bf16"][i], results["PyTorch bf16"][i], results["OpenVINO bf16"][i]
        print(f"{label}: this project / OpenVINO f32 {o / v:.2f}×, / PyTorch f32 {o / t:.2f}×; "
              f"bf16: / OpenVINO {ob / vb:.2f}×, / PyTorch {ob / tb:.2f}×")


if __name__ == "__main__":
    main()
