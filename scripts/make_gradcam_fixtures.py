#!/usr/bin/env python3
"""Generate crates/blip/tests/fixtures/expected/gradcam.json: Grad-CAM maps computed as LAVIS's
`compute_gradcam` (lavis/models/blip_models/blip_image_text_matching.py) does for BLIP, on
transformers 5.24's BlipForImageTextRetrieval (the tiny retrieval checkpoint, 6x6 patches, 2
text layers), for crates/blip/tests/gradcam_parity.rs.

Per image: the ITM match logits of every text (`itm_score[:, 1].sum()`) differentiated with
respect to the cross-attention probabilities of text encoder layer `block_num` (kept with
retain_grad from a forward hook: transformers 5 no longer saves them), then
`cams[..., 1:] * grads[..., 1:].clamp(0)` masked to the text's tokens, the mean over heads, and
per text the mean over its tokens 1..len-2 ([CLS] and [SEP] out), as LAVIS's second map.

Run by hand, never by CI: `.venv/bin/python scripts/make_gradcam_fixtures.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402  (pins, paths)

import torch  # noqa: E402
from transformers import BlipForImageTextRetrieval, BlipProcessor  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

TEXTS = ["a cat lying on a sofa", "an astronaut", "a rocket at night on its launch pad"]
MODEL = "tiny-itm"


def gradcam(model, pixel_values, enc, block_num):
    saved = []

    def keep(module, inputs, outputs):
        outputs[1].retain_grad()
        saved.append(outputs[1])

    hook = model.text_encoder.encoder.layer[block_num].crossattention.self.register_forward_hook(keep)
    try:
        n = enc.input_ids.size(0)
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    pixel_values=pixel_values.expand(n, -1, -1, -1), use_itm_head=True)
        model.zero_grad()
        out.itm_score[:, 1].sum().backward()
    finally:
        hook.remove()
    probs = saved[0]
    side = int((probs.size(-1) - 1) ** 0.5)
    heads = probs.size(1)
    with torch.no_grad():
        mask = enc.attention_mask.view(n, 1, -1, 1, 1)
        cams = probs[:, :, :, 1:].reshape(n, heads, -1, side, side) * mask
        grads = probs.grad[:, :, :, 1:].clamp(0).reshape(n, heads, -1, side, side) * mask
        gradcams = (cams * grads).mean(1)  # [n, t, side, side]
        lengths = enc.attention_mask.sum(-1) - 2
        maps = [(gradcams[j, 1:lengths[j] + 1].sum(0) / lengths[j]).flatten().tolist() for j in range(n)]
        tokens = [gradcams[j, 1:lengths[j] + 1].flatten(1).tolist() for j in range(n)]
        itm = torch.softmax(out.itm_score, dim=1)[:, 1].tolist()
    return maps, tokens, itm, side


def main():
    versions = base.check_versions()
    proc = BlipProcessor.from_pretrained(base.MODELS / MODEL)
    model = BlipForImageTextRetrieval.from_pretrained(base.MODELS / MODEL).eval()
    images = [load_image(str(base.IMAGES_DIR / n)) for n in base.IMAGE_NAMES]
    pv = proc(images=images, return_tensors="pt").pixel_values
    enc = proc.tokenizer(TEXTS, return_tensors="pt", padding=True)
    cases = []
    for block_num in (0, 1):
        for i in range(len(images)):
            maps, tokens, itm, side = gradcam(model, pv[i:i + 1], enc, block_num)
            cases.append({"image": base.IMAGE_NAMES[i], "block_num": block_num, "maps": maps,
                          "token_maps": tokens, "itm": itm, "grid": [side, side]})
    base.dump_json({"model": MODEL, "texts": TEXTS, "cases": cases, "versions": versions},
                   base.EXPECTED / "gradcam.json")
    print(f"{len(cases)} cases, grid {cases[0]['grid']}, max {max(max(m) for c in cases for m in c['maps']):.3e}")


if __name__ == "__main__":
    main()
