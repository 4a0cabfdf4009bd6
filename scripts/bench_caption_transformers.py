#!/usr/bin/env python3
"""What `blip caption --min-new-tokens 20 --max-new-tokens 20 IMAGE...` does, in transformers:
the Python side of the whole-program comparison in scripts/bench.py.

    .venv/bin/python scripts/bench_caption_transformers.py MODEL_DIR IMAGE...

(in the pinned environment of the fixture scripts, made once with
`python3.11 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt`).
"""
import sys

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.image_utils import load_image


def main():
    model_dir, paths = sys.argv[1], sys.argv[2:]
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    images = [load_image(p) for p in paths]
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        out = model.generate(pixel_values=pixel_values, min_new_tokens=20, max_new_tokens=20)
    for path, row in zip(paths, out):
        print(f"{path}\t{processor.decode(row, skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
