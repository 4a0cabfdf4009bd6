#!/usr/bin/env python3
"""Generate crates/blip/tests/fixtures/expected/losses.json: the losses transformers 5.24 computes
on the committed tiny checkpoints, for crates/blip/tests/loss_parity.rs.

Run by hand, never by CI, from the repository root in the pinned environment
(`.venv/bin/python scripts/make_loss_fixtures.py`), after make_model_fixtures.py and
make_task_fixtures.py made the checkpoints.

- Captioning (`BlipForConditionalGeneration(pixel_values, input_ids, attention_mask,
  labels).loss`): the processor's ids of captions of different lengths (right-padded), with
  labels = input_ids (pads counted, as the Hugging Face fine-tuning tutorial passes them) and
  with pads set to -100; label smoothing 0 (the Hub configs) and 0.1 (transformers 4 / BLIP).
- VQA (`BlipForQuestionAnswering(input_ids, pixel_values, attention_mask, labels).loss`): the
  answers' ids as labels (fed to the decoder as they are, as transformers does).
- Contrastive (`BlipModel(..., return_loss=True).loss`) on the tiny BlipModel.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402  (pins, paths)

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    BlipModel,
    BlipProcessor,
)
from transformers.image_utils import load_image  # noqa: E402

CAPTIONS = ["a cat lying on a sofa", "an astronaut", "a rocket on its launch pad at night"]
QUESTIONS = ["what animal is this?", "who is it?", "what is it on?"]
ANSWERS = ["a cat", "astronaut", "a launch pad"]


def processor(name):
    return BlipProcessor.from_pretrained(base.MODELS / name)


def main():
    base.check_versions()
    images = [load_image(str(base.IMAGES_DIR / n)) for n in base.IMAGE_NAMES]
    out = {"images": base.IMAGE_NAMES, "captioning": [], "vqa": [], "contrastive": []}
    with torch.no_grad():
        proc = processor("tiny-caption-bin")
        model = BlipForConditionalGeneration.from_pretrained(base.MODELS / "tiny-caption-bin").eval()
        inputs = proc(images=images, text=CAPTIONS, return_tensors="pt", padding=True)
        for smoothing in (0.0, 0.1):
            model.text_decoder.label_smoothing = smoothing
            for masked in (False, True):
                labels = inputs.input_ids.clone()
                if masked:
                    labels[inputs.attention_mask == 0] = -100
                loss = model(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids,
                             attention_mask=inputs.attention_mask, labels=labels).loss
                out["captioning"].append({
                    "label_smoothing": smoothing, "input_ids": inputs.input_ids.tolist(),
                    "attention_mask": inputs.attention_mask.tolist(), "labels": labels.tolist(),
                    "loss": loss.item()})

        proc = processor("tiny-vqa")
        model = BlipForQuestionAnswering.from_pretrained(base.MODELS / "tiny-vqa").eval()
        questions = proc(images=images, text=QUESTIONS, return_tensors="pt", padding=True)
        labels = proc(text=ANSWERS, return_tensors="pt", padding=True).input_ids
        loss = model(input_ids=questions.input_ids, pixel_values=questions.pixel_values,
                     attention_mask=questions.attention_mask, labels=labels).loss
        out["vqa"].append({"input_ids": questions.input_ids.tolist(),
                           "attention_mask": questions.attention_mask.tolist(), "labels": labels.tolist(),
                           "loss": loss.item()})

        proc = processor("tiny-blip")
        model = BlipModel.from_pretrained(base.MODELS / "tiny-blip").eval()
        inputs = proc(images=images, text=CAPTIONS, return_tensors="pt", padding=True)
        loss = model(**inputs, return_loss=True).loss
        out["contrastive"].append({"texts": CAPTIONS, "input_ids": inputs.input_ids.tolist(),
                                   "attention_mask": inputs.attention_mask.tolist(), "loss": loss.item()})

    base.dump_json(out, base.EXPECTED / "losses.json")
    print(json.dumps({k: [c["loss"] for c in v] for k, v in out.items() if k != "images"}))


if __name__ == "__main__":
    main()
