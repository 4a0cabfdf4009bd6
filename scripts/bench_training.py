#!/usr/bin/env python3
"""Fine-tuning, measured side by side with PyTorch (not run by CI; results in BENCHMARKS.md): the
full-size random captioning checkpoint of scripts/bench.py, batch 8 of scikit-image photos with
captions, AdamW (lr 1e-5, weight decay 0.05), clipping at norm 1, as `blip finetune caption` and
as the same loop in PyTorch + transformers (the loop of scripts/make_training_fixtures.py): seconds
per optimizer step after the first, vision frozen and trained, and the peak memory (RSS
high-water mark) of each run, as its own process.

    .venv/bin/python scripts/bench_training.py [--work DIR] [--steps 3]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import skimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, machine  # noqa: E402

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png",
          "ihc.png", "page.png"]
CAPTION = "a photo of {} on a table in a bright room"
BATCH = 8


def write_data(work, steps):
    photos = Path(skimage.__file__).parent / "data"
    rows = [{"image": str(photos / PHOTOS[i % len(PHOTOS)]), "text": CAPTION.format(PHOTOS[i % len(PHOTOS)].split(".")[0])}
            for i in range(BATCH * steps)]
    path = work / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ours(model, data, out, freeze, steps):
    """`blip finetune` in its own process: the times its per-step lines arrive, its peak RSS."""
    args = [str(REPO / "target/release/blip"), "finetune", "caption", "--train", str(data), "--out", str(out),
            "--model", str(model), "--epochs", "1", "--batch-size", str(BATCH), "--lr", "1e-5", "--threads", "2"]
    if freeze:
        args.append("--freeze-vision")
    # through a wrapper process whose only child is blip: its RUSAGE_CHILDREN is blip's peak
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    arrivals = []
    for line in proc.stderr:
        if line.startswith("step ") and "loss" in line:
            arrivals.append(time.perf_counter())
    peak_kb = int(proc.stdout.read().strip())
    proc.wait()
    assert proc.returncode == 0 and len(arrivals) == steps, (proc.returncode, len(arrivals))
    return [b - a for a, b in zip(arrivals, arrivals[1:])], peak_kb


TORCH_LOOP = r'''
import json, resource, sys, time, torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.image_utils import load_image
model_dir, data, freeze, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
torch.set_num_threads(2)
model = BlipForConditionalGeneration.from_pretrained(model_dir).train()
proc = BlipProcessor.from_pretrained(model_dir)
if freeze:
    model.vision_model.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
rows = [json.loads(l) for l in open(data)]
times = []
for s in range(steps):
    batch = rows[s * 8:(s + 1) * 8]
    start = time.perf_counter()
    inputs = proc(images=[load_image(r["image"]) for r in batch], text=[r["text"] for r in batch],
                  return_tensors="pt", padding=True)
    ids = inputs.input_ids.clone()
    ids[:, 0] = model.config.text_config.bos_token_id
    labels = ids.masked_fill(inputs.attention_mask == 0, -100)
    loss = model(pixel_values=inputs.pixel_values, input_ids=ids, attention_mask=inputs.attention_mask,
                 labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times[1:], "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def pytorch(model, data, freeze, steps):
    out = subprocess.run([sys.executable, "-c", TORCH_LOOP, str(model), str(data), "1" if freeze else "0", str(steps)],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["times"], result["peak_kb"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip-bench"))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    model = work / "model"
    if not (model / "pytorch_model.bin").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_model_fixtures.py"), "--full", str(work)], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "blip"], cwd=REPO, check=True)
    data = write_data(work, args.steps)
    print(f"# {machine()}, 2 threads, batch {BATCH}, {args.steps} steps (the first not timed)")
    print("| vision | blip s/step | PyTorch s/step | ratio | blip peak RSS | PyTorch peak RSS | ratio |")
    print("|---|---|---|---|---|---|---|")
    for freeze in (True, False):
        out = Path(tempfile.mkdtemp(prefix="blip-bench-finetune-"))
        try:
            # each measured in a fresh child: RUSAGE_CHILDREN keeps the largest child's peak
            theirs, their_peak = pytorch(model, data, freeze, args.steps)
            mine, my_peak = ours(model, data, out, freeze, args.steps)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        a, b = min(mine), min(theirs)
        print(f"| {'frozen' if freeze else 'trained'} | {a:.2f} | {b:.2f} | {a / b:.2f}× | {my_peak / 1024**2:.2f} GB "
              f"| {their_peak / 1024**2:.2f} GB | {my_peak / their_peak:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
