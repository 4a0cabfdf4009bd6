#!/usr/bin/env python3
"""Generate crates/blip/tests/fixtures/expected/bf16.{json,safetensors}: how PyTorch's bf16 (the
whole model in bf16, `from_pretrained(dtype=torch.bfloat16)`) departs from f32 on the checkpoint
and inputs of crates/blip/tests/dtype.rs: `tiny-caption-scaled`, the three model images, the f32
model's greedy caption of 30 forced new tokens fed back teacher-forced. Writes the token ids, each
step's top-1 token under f32 and under bf16, and PyTorch bf16's smallest logits cosine to f32 and
top-1 agreement: the bar this project's bf16 must meet.

Run by hand, never by CI: `.venv/bin/python scripts/make_bf16_fixtures.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402  (pins, paths)

from bf16_accuracy import IMAGES, STEPS, agreement, teacher_forced  # noqa: E402  (the same measure)
from transformers import BlipProcessor  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

MODEL = "tiny-caption-scaled"


def main():
    versions = base.check_versions()
    model_dir = base.MODELS / MODEL
    proc = BlipProcessor.from_pretrained(model_dir)
    images = [load_image(str(base.IMAGES_DIR / n)) for n in IMAGES]
    pixels = proc(images=images, return_tensors="pt").pixel_values
    ids, reference, reduced = teacher_forced(model_dir, pixels)
    cosine, top1 = agreement(reduced, reference)
    out = {"model": MODEL, "images": IMAGES, "steps": STEPS, "ids": ids.tolist(),
           "f32_top1": reference.argmax(1).tolist(), "pytorch_bf16_top1_tokens": reduced.argmax(1).tolist(),
           "pytorch_bf16_min_cosine": cosine, "pytorch_bf16_top1": top1, "versions": versions}
    base.dump_json(out, base.EXPECTED / "bf16.json")
    print(f"PyTorch bf16 against f32: smallest logits cosine {cosine:.6f}, "
          f"same top-1 on {top1 * 100:.1f}% ({len(reference)} steps)")


if __name__ == "__main__":
    main()
