#!/usr/bin/env python3
"""Issue 20's benchmark (not run by CI; results in BENCHMARKS.md): the full-size random
captioning checkpoint of scripts/bench.py, the same 8 scikit-image photos at 384 px, on this
machine, 2 threads. In rounds (`--rounds`, 3 by default): each round times every runtime once,
one after the other, each figure the best of 3 timings after a warm-up, so that every ratio
compares runtimes measured within the same minutes (this machine's speed drifts by up to 2×
over an hour); the ratios printed are the median of the rounds' own ratios, with their range:

  - the vision tower, seconds per image at batch 1 (mean over the first 4 photos) and batch 8:
    this project (crates/blip/examples/bench.rs) f32 and bf16, PyTorch + transformers f32 and
    bf16, and OpenVINO (`ov.convert_model(model.vision_model)` compiled for the CPU with
    `INFERENCE_PRECISION_HINT` f32 and bf16, 2 threads, the latency hint);
  - whole `generate` (greedy, exactly 20 new tokens) at batch 1 and 8, and batch-1 decoding per
    token, for this project and PyTorch in f32 and bf16.

Prints the CPU model and flags, which bf16 path this project takes (`blip --version`), and the
ratios first, then the seconds.

    .venv/bin/pip install -r scripts/requirements-bench-openvino.txt
    .venv/bin/python scripts/bench_vision_openvino.py [--work DIR]
"""

import argparse
import json
import os
import statistics
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
NEW_TOKENS = 20


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
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each timing every runtime once")
    args = ap.parse_args()
    model_dir = Path(args.work) / "model"
    paths = [Path(skimage.__file__).parent / "data" / n for n in IMAGES]
    torch.set_num_threads(THREADS)
    gen = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = BlipProcessor.from_pretrained(model_dir)
        pixels = processor(images=[load_image(str(p)) for p in paths], return_tensors="pt")["pixel_values"]
        models = {name: BlipForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
                  for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16))}
        with torch.no_grad():
            converted = ov.convert_model(models["f32"].vision_model, example_input={"pixel_values": pixels[:1]})
    core = ov.Core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    requests = {}
    for name in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": name, "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
        requests[name] = core.compile_model(converted, "CPU", config).create_infer_request()
    subprocess.run(["cargo", "build", "--release", "--example", "bench", "--bin", "blip", "--features", "blip/openblas"],
                   cwd=REPO, check=True, capture_output=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    paths_line = subprocess.run([str(REPO / "target/release/blip"), "--version"], capture_output=True, text=True,
                                env=env, check=True).stdout.strip().replace("\n", "; ")

    def one_round():
        """Every runtime timed once, one after the other: (vision, generate, decode) by runtime."""
        vision, generate, decode = {}, {}, {}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            for name, model in models.items():
                pv = pixels.to(model.dtype)
                vision[f"PyTorch {name}"] = per_image(lambda p: model.vision_model(pixel_values=p), pv)
                generate[f"PyTorch {name}"] = per_image(lambda p: model.generate(pixel_values=p, **gen), pv)
                decode[f"PyTorch {name}"] = (generate[f"PyTorch {name}"][0] - vision[f"PyTorch {name}"][0]) / NEW_TOKENS
        for name, request in requests.items():
            vision[f"OpenVINO {name}"] = per_image(lambda pv: request.infer({0: pv.numpy()}), pixels)
        for name in ("f32", "bf16"):
            cmd = [str(REPO / "target/release/examples/bench"), str(model_dir), name] + [str(p) for p in paths]
            # the example times each stage once: the best of 3 runs, as for the others
            runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
                    for _ in range(3)]
            best_of = lambda key: min(r[key] for r in runs)  # noqa: E731
            vision[f"this project {name}"] = (best_of("vision_b1_s"), best_of("vision_b8_s_per_image"))
            generate[f"this project {name}"] = (best_of("generate_b1_s"), best_of("generate_b8_s_per_image"))
            decode[f"this project {name}"] = best_of("decode_ms_per_token_b1") / 1e3
        return vision, generate, decode

    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round())
        print(f"# round {i + 1} of {args.rounds}: {json.dumps(rounds[-1])}", file=sys.stderr, flush=True)
    # each figure: the best over the rounds; each ratio: the median of the rounds' own ratios
    vision, generate = ({key: tuple(min(r[part][key][i] for r in rounds) for i in range(2))
                         for key in rounds[0][part]} for part in (0, 1))
    decode = {key: min(r[2][key] for r in rounds) for key in rounds[0][2]}

    def ratios(part, ours, theirs):
        per_round = [[r[part][ours][i] / r[part][theirs][i] for r in rounds] for i in range(2)]
        return " | ".join(f"{statistics.median(x):.2f}× ({min(x):.2f}–{max(x):.2f})" for x in per_round)

    print(f"# {machine()}; OpenVINO {ov.__version__} CPU capabilities: {' '.join(capabilities)}; {THREADS} threads")
    print(f"# {paths_line}")
    print(f"\nRatios (this project / other; below 1 is faster): the median of {args.rounds} rounds' own ratios "
          "(each round times every runtime once, one after the other), their range in brackets:\n")
    print("| | batch 1 | batch 8 |")
    print("|---|---|---|")
    for p in ("f32", "bf16"):
        for other in ("OpenVINO", "PyTorch"):
            print(f"| vision {p} / {other} {p} | {ratios(0, f'this project {p}', f'{other} {p}')} |")
    for p in ("f32", "bf16"):
        print(f"| whole `generate` {p} / PyTorch {p} | {ratios(1, f'this project {p}', f'PyTorch {p}')} |")
    print(f"\nSeconds: the best of the {args.rounds} rounds for each runtime.")
    print("\n| vision tower (s/image) | " + " | ".join(vision) + " |")
    print("|---|" + "---|" * len(vision))
    for i, label in enumerate(("batch 1", "batch 8")):
        print(f"| {label} | " + " | ".join(f"{v[i]:.3f}" for v in vision.values()) + " |")
    print("\n| whole `generate`, 20 tokens | " + " | ".join(generate) + " |")
    print("|---|" + "---|" * len(generate))
    for i, label in enumerate(("batch 1 (s/image)", "batch 8 (s/image)")):
        print(f"| {label} | " + " | ".join(f"{v[i]:.3f}" for v in generate.values()) + " |")
    print("| decoding, batch 1 (ms/token) | " + " | ".join(f"{v * 1e3:.1f}" for v in decode.values()) + " |")


if __name__ == "__main__":
    main()
