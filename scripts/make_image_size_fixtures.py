#!/usr/bin/env python3
"""Generate crates/blip/tests/fixtures/expected/image-size.json: greedy captions of the tiny
captioning checkpoint (96 px, 6x6 patches) at other resolutions, as transformers 5.24 makes them
with the processor resized and `generate(..., interpolate_pos_encoding=True)`, for
crates/blip/tests/image_size_parity.rs. Also BlipForImageTextRetrieval's ITM and ITC scores of the
tiny retrieval checkpoint at 224 px.

Run by hand, never by CI: `.venv/bin/python scripts/make_image_size_fixtures.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402  (pins, paths)

import torch  # noqa: E402
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

SIZES = [224, 480]
TEXTS = ["a cat on a sofa", "an astronaut", "a rocket at night"]


def main():
    versions = base.check_versions()
    images = [load_image(str(base.IMAGES_DIR / n)) for n in base.IMAGE_NAMES]
    out = {"images": base.IMAGE_NAMES, "captioning": [], "matching": [], "versions": versions}
    with torch.no_grad():
        name = "tiny-caption-st"
        proc = BlipProcessor.from_pretrained(base.MODELS / name)
        model = BlipForConditionalGeneration.from_pretrained(base.MODELS / name).eval()
        for size in SIZES:
            pv = proc(images=images, return_tensors="pt", size={"height": size, "width": size}).pixel_values
            assert pv.shape[-2:] == (size, size)
            seqs = model.generate(pixel_values=pv, interpolate_pos_encoding=True, max_new_tokens=20)
            rows = [[t for t in r.tolist()[1:] if t != base.PAD] for r in seqs]
            out["captioning"].append({"model": name, "image_size": size, "tokens": rows,
                                      "captions": [proc.decode(r, skip_special_tokens=True) for r in seqs]})
        name = "tiny-itm"
        proc = BlipProcessor.from_pretrained(base.MODELS / name)
        model = BlipForImageTextRetrieval.from_pretrained(base.MODELS / name).eval()
        pv = proc(images=images, return_tensors="pt", size={"height": 224, "width": 224}).pixel_values
        enc = proc.tokenizer(TEXTS, return_tensors="pt", padding=True)
        itm, itc = [], []
        for i in range(len(images)):
            p = pv[i:i + 1].expand(len(TEXTS), -1, -1, -1)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=p,
                           use_itm_head=True, interpolate_pos_encoding=True).itm_score
            itm.append(torch.softmax(logits, dim=1)[:, 1].tolist())
            itc.append(model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pv[i:i + 1],
                             use_itm_head=False, interpolate_pos_encoding=True).itm_score[0].tolist())
        out["matching"].append({"model": name, "image_size": 224, "texts": TEXTS, "itm": itm, "itc": itc})
    base.dump_json(out, base.EXPECTED / "image-size.json")
    for c in out["captioning"]:
        print(c["image_size"], c["captions"])


if __name__ == "__main__":
    main()
