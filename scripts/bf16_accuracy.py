#!/usr/bin/env python3
"""How close bf16 stays to f32, for PyTorch + transformers, on the inputs and measure of this
project's own check (crates/blip/tests/dtype.rs, `full_size`): the full-size random captioning
checkpoint of scripts/bench.py, the three model images, each f32 model's greedy caption of 30
forced new tokens fed back teacher-forced; the smallest logits cosine to f32 over all steps and
the share of steps with the same top-1 token. PyTorch's bf16 is the whole model in bf16
(`from_pretrained(dtype=torch.bfloat16)`), as scripts/bench.py runs it.

    .venv/bin/python scripts/bf16_accuracy.py [--work DIR]
    BLIP_FULL_FIXTURE=DIR cargo test --release -p blip --test dtype -- --ignored full_size --nocapture
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.image_utils import load_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, machine  # noqa: E402

STEPS = 30
IMAGES = ["chelsea.png", "astronaut.png", "rocket.jpg"]


def teacher_forced(model_dir, pixels):
    """The f32 model's greedy caption ids (STEPS forced new tokens), and the logits of those steps
    teacher-forced through the model in f32 and in PyTorch's bf16, each [steps, vocab] in f32."""
    f32 = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    bf16 = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ids = f32.generate(pixel_values=pixels, max_new_tokens=STEPS, min_new_tokens=STEPS)
        assert ids.shape[1] == STEPS + 1, ids.shape

        def logits(model, dtype):
            image_embeds = model.vision_model(pixel_values=pixels.to(dtype)).last_hidden_state
            out = model.text_decoder(input_ids=ids, encoder_hidden_states=image_embeds)
            return out.logits.float().flatten(0, 1)

        return ids, logits(f32, torch.float32), logits(bf16, torch.bfloat16)


def agreement(reduced, reference):
    """(smallest logits cosine, share of steps with the same top-1 token)."""
    cosines = torch.nn.functional.cosine_similarity(reduced, reference, dim=1)
    return cosines.min().item(), (reduced.argmax(1) == reference.argmax(1)).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "blip-bench"))
    args = ap.parse_args()
    model_dir = Path(args.work) / "model"
    torch.set_num_threads(2)
    proc = BlipProcessor.from_pretrained(model_dir)
    images = [load_image(str(REPO / "crates/blip/tests/fixtures/images-model" / n)) for n in IMAGES]
    pixels = proc(images=images, return_tensors="pt").pixel_values
    _, reference, ours = teacher_forced(model_dir, pixels)
    cosine, top1 = agreement(ours, reference)
    print(f"# {machine()}")
    print(f"PyTorch bf16 against f32: smallest logits cosine {cosine:.6f}, "
          f"same top-1 on {top1 * 100:.1f}% ({len(reference)} steps)")


if __name__ == "__main__":
    main()
