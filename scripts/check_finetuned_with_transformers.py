#!/usr/bin/env python3
"""Check by hand that transformers loads a `blip finetune` output folder and captions as
`blip caption --model DIR` does (the same tokens). Not run by CI (it needs the 6 GB PyTorch
environment): `.venv/bin/python scripts/check_finetuned_with_transformers.py DIR IMAGE...`.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.image_utils import load_image

REPO = Path(__file__).resolve().parents[1]


def main():
    model_dir, images = sys.argv[1], sys.argv[2:]
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = BlipProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        inputs = processor(images=[load_image(i) for i in images], return_tensors="pt")
        ids = model.generate(**inputs)
    theirs = [processor.decode(row, skip_special_tokens=True) for row in ids]
    out = subprocess.run([str(REPO / "target/release/blip"), "caption", "--model", model_dir, "--format", "jsonl",
                          *images], check=True, capture_output=True, text=True).stdout
    ours = [json.loads(line)["caption"] for line in out.splitlines()]
    for image, a, b in zip(images, theirs, ours):
        print(f"{'same' if a == b else 'DIFFERENT'}: {image}: transformers {a!r}, blip {b!r}")
    sys.exit(0 if theirs == ours else 1)


if __name__ == "__main__":
    main()
