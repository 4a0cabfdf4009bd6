#!/usr/bin/env python3
"""Generate the tiny VQA, image-text retrieval and BlipModel checkpoints and the transformers
reference outputs that the Rust task tests compare against.

Run by hand (never by CI), after scripts/make_model_fixtures.py (it reuses its images), from the
repository root, in the pinned environment made once with
`python3.11 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt`:

    .venv/bin/python scripts/make_task_fixtures.py            # tiny fixtures (committed)
    .venv/bin/python scripts/make_task_fixtures.py --full DIR # full-size VQA + ITM check

Same pinned versions, tiny dimensions and weight re-initialisation as make_model_fixtures.py.
Everything is seeded; re-running it rewrites the same files. See
crates/blip/tests/fixtures/FIXTURES.md for what each file holds.
"""

import argparse
import collections
import copy
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402  (pins, paths, tiny config, helpers)

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipModel)
from transformers.image_utils import load_image  # noqa: E402

BOS, SEP, PAD = base.BOS, base.SEP, base.PAD

QUESTIONS = [
    "what is in the picture?",
    "how many animals are there?",
    "is this a rocket that flies into space at night or a cat sleeping on a sofa?",
]
# The closed answer set of the rank-mode cases (one-token and multi-token answers; some share a
# first token, as "a cat" / "a rocket" do).
ANSWERS = ["yes", "no", "2", "cat", "a cat", "a rocket", "astronaut", "red", "blue sky",
           "coffee cup", "nothing at all", "zero"]
TEXTS = [
    "a cat",
    "a photograph of an astronaut standing next to a flag",
    "rocket",
    "two dogs playing in the snow on a sunny winter afternoon near a lake",
]
# VQA's text width must equal the vision width (below); 2 heads keep head_dim at 64.
VQA_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2)
VQA_SEEDS = (1, 8.0)      # seed, cls.predictions.bias[102] shift
ITM_SEED = 6
ITM_HEAD_GAIN = 3.0       # spreads the match probabilities away from 0.5
BLIP_SEED = 7
BLIP_LOGIT_SCALE = 2.0
FULL = None               # the --full output folder, when building the full-size check    # not the init value 2.6592, so that reading the weight is tested


@torch.no_grad()
def reinit(model, seed, sep_shift=None):
    """make_model_fixtures.reinit's scheme for any BLIP model (tiny: N(0, 0.2) embeddings and
    N(0, 0.2 * sqrt(64 / fan_in)) Linear/Conv weights, see make_model_fixtures.TINY_REF_FAN_IN;
    full size: gain/sqrt(fan_in) matrices and 0.04 embeddings; LayerNorm 1 + 0.1 N, biases
    0.1 N); `sep_shift` raises the LM bias of [SEP] so answers end."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "logit_scale":
            p.fill_(BLIP_LOGIT_SCALE)
        elif p.dim() == 1 and name.endswith("weight"):
            p.copy_(base.LN_WEIGHT[0] + base.LN_WEIGHT[1] * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(base.BIAS_STD * torch.randn(p.shape, generator=g))
        elif FULL is None:
            p.copy_(base.tiny_weight_std(name, p) * torch.randn(p.shape, generator=g))
        elif "embedding" in name:
            p.copy_(base.FULL_EMBED_STD * torch.randn(p.shape, generator=g))
        else:
            gain = base.FULL_LINEAR_GAIN_TEXT if name.startswith("text_") else base.FULL_LINEAR_GAIN_VISION
            p.copy_(gain / p[0].numel() ** 0.5 * torch.randn(p.shape, generator=g))
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:
        decoder.cls.predictions.bias[SEP] += sep_shift
        assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def task_config(hub_name, arch, text=None):
    """The Hub config itself for the full-size check, else the tiny one."""
    if FULL is not None:
        return base.json.loads((base.HUB / hub_name / "config.json").read_text())
    return tiny_config(hub_name, arch, text)


def preprocessor(hub_name):
    if FULL is not None:
        return base.json.loads((base.HUB / hub_name / "preprocessor_config.json").read_text())
    return base.preproc_dict(base.TINY_IMAGE_SIZE)


def checkpoint_dir(name):
    return base.fresh_dir((FULL / name) if FULL is not None else (base.MODELS / name))


def tiny_config(hub_name, arch, text=None):
    """The captioning tiny config, with `text` changes: VQA raises the text width to the vision
    width, because its answer decoder cross-attends to question states through
    encoder_hidden_size (= the vision width), which only works when both widths are equal, as in
    every public checkpoint. Retrieval and BlipModel keep the narrower captioning text."""
    cfg = base.tiny_config_dict()
    cfg["text_config"].update(text or {})
    hub = base.json.loads((base.HUB / hub_name / "config.json").read_text())
    assert hub["architectures"] == [arch], hub["architectures"]
    cfg["architectures"] = [arch]
    return cfg


def build(cls, config_dir, seed, **kw):
    config = BlipConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).eval()
    reinit(model, seed, **kw)
    return model


def save_safetensors(model, dst, dtype):
    """model.safetensors as transformers 5 writes it, in `dtype` (half precision keeps the
    fixtures small; the expected outputs come from the reloaded, upcast model)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = base.save_pretrained_files(copy.deepcopy(model).to(dtype), tmp)
        assert "model.safetensors" in files, files
        base.shutil.copyfile(Path(tmp) / "model.safetensors", dst / "model.safetensors")


def load(cls, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def images_and_pixels(proc):
    paths = [base.IMAGES_DIR / n for n in base.IMAGE_NAMES]
    assert all(p.exists() for p in paths), "run make_model_fixtures.py first"
    images = [load_image(str(p)) for p in paths]
    pv = proc(images=images, return_tensors="pt")["pixel_values"]
    return paths, images, pv


def meta_common(name, cls, proc, paths, versions):
    return {
        "checkpoint": name,
        "model_dir": f"models/{name}",
        "load": f"{cls.__name__}.from_pretrained('models/{name}', dtype=torch.float32)",
        "versions": versions,
        "image_processor_backend": "torchvision",
        "images": [str(p.relative_to(base.FIX)) for p in paths],
        "image_loading": "transformers.image_utils.load_image(path)",
    }


def write(name, tensors, meta):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in tensors.items()}
    out = FULL if FULL is not None else base.EXPECTED
    base.write_expected(tensors, meta, out / f"{name}.safetensors", out / f"{name}.json")


# ---- VQA --------------------------------------------------------------------------------
def answer_ids(tok, answer):
    """`[CLS] answer [SEP]` with [CLS] replaced by bos: the decoder input (and, shifted, the
    targets) of original BLIP's rank_answer."""
    ids = tok(answer)["input_ids"]
    ids[0] = BOS
    return ids


@torch.no_grad()
def make_vqa(versions):
    name = "tiny-vqa"
    d = checkpoint_dir(name)
    base.dump_json(task_config("blip-vqa-base", "BlipForQuestionAnswering", VQA_TEXT), d / "config.json")
    base.dump_json(preprocessor("blip-vqa-base"), d / "preprocessor_config.json")
    base.write_tokenizer(d, full=False)
    seed, shift = VQA_SEEDS if FULL is None else (1, base.FULL_SEP_BIAS_SHIFT)
    model = build(BlipForQuestionAnswering, d, seed, sep_shift=shift)
    save_safetensors(model, d, torch.float16 if FULL is None else torch.float32)
    del model
    with safe_open(d / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "text_decoder.cls.predictions.decoder.weight" not in keys
    assert any(k.startswith("text_encoder.encoder.layer.0.crossattention") for k in keys)
    loaded, info = load(BlipForQuestionAnswering, d)
    assert not any(info.values()), info
    proc = base.load_processor(d)
    tok = proc.tokenizer
    paths, images, pv = images_and_pixels(proc)
    vision = loaded.vision_model(pixel_values=pv).last_hidden_state

    tensors = {"pixel_values": pv, "vision_last_hidden_state": vision}
    cases = []
    answer_lists = [answer_ids(tok, a) for a in ANSWERS]
    for i in range(len(images)):
        for q, question in enumerate(QUESTIONS):
            enc = tok(question, return_tensors="pt")
            qstates = loaded.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                          encoder_hidden_states=vision[i:i + 1]).last_hidden_state
            tensors[f"question_states_{i}_{q}"] = qstates[0]
            case = {"image": i, "question": question, "question_ids": enc["input_ids"][0].tolist()}
            for max_new in (10, 20):
                seq = loaded.generate(input_ids=enc["input_ids"], pixel_values=pv[i:i + 1],
                                      attention_mask=enc["attention_mask"], max_new_tokens=max_new)
                case[f"generate_max_new_{max_new}"] = seq[0].tolist()
                case[f"answer_max_new_{max_new}"] = proc.decode(seq[0], skip_special_tokens=True)
            # rank mode: first-token probabilities (softmax over the whole vocabulary at the bos
            # step) and every answer's full log-likelihood, each from transformers' forward pass
            start = loaded.text_decoder(input_ids=torch.tensor([[BOS]]), encoder_hidden_states=qstates)
            probs = start.logits[0, 0].softmax(-1)
            case["first_token_probs"] = [probs[ids[1]].item() for ids in answer_lists]
            lls = []
            for ids in answer_lists:
                ids_t = torch.tensor([ids])
                out = loaded.text_decoder(input_ids=ids_t, encoder_hidden_states=qstates,
                                          labels=ids_t, reduction="none")
                lls.append(-out.loss.item())
            case["log_likelihoods"] = lls
            cases.append(case)
    # transformers' batched generate over questions of different lengths (padding attended to
    # by the decoder's cross-attention): recorded to show the difference, not to be matched
    batch = tok(QUESTIONS, padding=True, return_tensors="pt")
    seqs = loaded.generate(input_ids=batch["input_ids"], pixel_values=pv[:1].expand(len(QUESTIONS), -1, -1, -1),
                           attention_mask=batch["attention_mask"], max_new_tokens=10)
    batched = [s.tolist() for s in seqs]

    for c in cases:
        print(f"  vqa img{c['image']} {c['question'][:30]!r:34} -> {c['answer_max_new_10']!r} {c['generate_max_new_10']}")
    print("  transformers batched:", [proc.decode(s, skip_special_tokens=True) for s in batched])
    answers = {tuple(c["generate_max_new_10"]) for c in cases}
    assert FULL is not None or len(answers) >= 4, f"answers should vary: {answers}"
    assert FULL is not None or any(SEP in c["generate_max_new_10"] for c in cases), "some answer must end at [SEP]"
    meta = meta_common(name, BlipForQuestionAnswering, proc, paths, versions)
    meta.update({
        "questions": QUESTIONS,
        "answers": ANSWERS,
        "answer_ids": answer_lists,
        "generate": "model.generate(input_ids=q_ids, pixel_values=pixel_values[i:i+1], attention_mask=..., max_new_tokens=N)",
        "question_states": "model.text_encoder(input_ids=q_ids, attention_mask=..., encoder_hidden_states=vision[i:i+1]).last_hidden_state[0]",
        "log_likelihood": "-model.text_decoder(input_ids=ids, encoder_hidden_states=question_states, labels=ids, reduction='none').loss",
        "cases": cases,
        "transformers_batched_generate_image_0_max_new_10": batched,
    })
    write(name, tensors, meta)


# ---- image-text retrieval -----------------------------------------------------------------
def itm_hub_state_dict(model):
    """blip-itm-base-coco's pytorch_model.bin key set: every weight plus the int64
    text_encoder.embeddings.position_ids [1, max_pos] buffer."""
    out = collections.OrderedDict()
    max_pos = model.config.text_config.max_position_embeddings
    for k, v in model.state_dict().items():
        if k == "text_encoder.embeddings.word_embeddings.weight":
            out["text_encoder.embeddings.position_ids"] = torch.arange(max_pos).expand((1, -1))
        out[k] = v.detach().clone()
    return out


@torch.no_grad()
def make_itm(versions):
    name = "tiny-itm"
    d = checkpoint_dir(name)
    base.dump_json(task_config("blip-itm-base-coco", "BlipForImageTextRetrieval"), d / "config.json")
    base.dump_json(preprocessor("blip-itm-base-coco"), d / "preprocessor_config.json")
    base.write_tokenizer(d, full=True)
    model = build(BlipForImageTextRetrieval, d, ITM_SEED)
    with torch.no_grad():
        model.itm_head.weight *= ITM_HEAD_GAIN
    torch.save(itm_hub_state_dict(model), d / "pytorch_model.bin")
    del model
    loaded, info = load(BlipForImageTextRetrieval, d)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    proc = base.load_processor(d)
    paths, images, pv = images_and_pixels(proc)
    n, t = len(images), len(TEXTS)
    vision = loaded.vision_model(pixel_values=pv).last_hidden_state
    enc = proc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    itm = torch.zeros(n, t)
    itm_logits = torch.zeros(n, t, 2)
    for i in range(n):
        out = loaded(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     pixel_values=pv[i:i + 1].expand(t, -1, -1, -1), use_itm_head=True)
        itm_logits[i] = out.itm_score
        itm[i] = out.itm_score.softmax(-1)[:, 1]
    itc = loaded(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv,
                 use_itm_head=False).itm_score
    assert itc.shape == (n, t)
    text_states = loaded.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    image_embeds = torch.nn.functional.normalize(loaded.vision_proj(vision[:, 0, :]), dim=-1)
    text_embeds = torch.nn.functional.normalize(loaded.text_proj(text_states[:, 0, :]), dim=-1)
    assert torch.allclose(image_embeds @ text_embeds.t(), itc, atol=1e-6)
    # each text alone (no padding) gives the batched embedding
    for j, text in enumerate(TEXTS):
        one = proc.tokenizer(text, return_tensors="pt")
        s = loaded.text_encoder(input_ids=one["input_ids"]).last_hidden_state
        e = torch.nn.functional.normalize(loaded.text_proj(s[:, 0, :]), dim=-1)
        assert torch.allclose(e[0], text_embeds[j], atol=1e-5)
    assert FULL is not None or (itm.min() < 0.3 and itm.max() > 0.7), itm
    tensors = {"pixel_values": pv, "vision_last_hidden_state": vision, "itm_logits": itm_logits,
               "itm": itm, "itc": itc, "image_embeds": image_embeds, "text_embeds": text_embeds,
               "text_input_ids": enc["input_ids"].to(torch.int64)}
    meta = meta_common(name, BlipForImageTextRetrieval, proc, paths, versions)
    meta.update({
        "texts": TEXTS,
        "itm": "model(input_ids, attention_mask, pixel_values=image i repeated, use_itm_head=True).itm_score.softmax(-1)[:, 1]",
        "itc": "model(input_ids, attention_mask, pixel_values, use_itm_head=False).itm_score  [images, texts]",
        "embeds": "normalize(vision_proj(vision[:, 0])), normalize(text_proj(text_encoder(ids, mask)[:, 0]))",
    })
    write(name, tensors, meta)
    print("  itm:\n", itm, "\n  itc:\n", itc)


# ---- BlipModel -----------------------------------------------------------------------------
@torch.no_grad()
def make_blip_model(versions):
    name = "tiny-blip"
    d = base.fresh_dir(base.MODELS / name)
    cfg = tiny_config("blip-image-captioning-base", "BlipForConditionalGeneration")
    cfg["architectures"] = ["BlipModel"]
    base.dump_json(cfg, d / "config.json")
    base.dump_json(base.preproc_dict(base.TINY_IMAGE_SIZE), d / "preprocessor_config.json")
    base.write_tokenizer(d, full=False)
    model = build(BlipModel, d, BLIP_SEED)
    save_safetensors(model, d, torch.bfloat16)
    loaded, info = load(BlipModel, d)
    assert not any(info.values()), info
    assert abs(loaded.logit_scale.item() - BLIP_LOGIT_SCALE) < 1e-7
    proc = base.load_processor(d)
    paths, images, pv = images_and_pixels(proc)
    enc = proc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = loaded(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv)
    image_features = loaded.get_image_features(pixel_values=pv).pooler_output
    text_features = loaded.get_text_features(input_ids=enc["input_ids"],
                                             attention_mask=enc["attention_mask"]).pooler_output
    tensors = {"pixel_values": pv, "image_features": image_features, "text_features": text_features,
               "image_embeds": out.image_embeds, "text_embeds": out.text_embeds,
               "logits_per_image": out.logits_per_image,
               "probs": out.logits_per_image.softmax(dim=1)}
    meta = meta_common(name, BlipModel, proc, paths, versions)
    meta.update({
        "texts": TEXTS,
        "logit_scale": BLIP_LOGIT_SCALE,
        "forward": "model(input_ids, attention_mask, pixel_values): image_embeds, text_embeds (normalized), logits_per_image; probs = logits_per_image.softmax(1)",
        "features": "get_image_features(pixel_values).pooler_output, get_text_features(ids, mask).pooler_output (projected, not normalized)",
    })
    write(name, tensors, meta)
    print("  BlipModel probs:\n", tensors["probs"])


def main():
    global FULL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", metavar="OUT_DIR",
                    help="full-size random VQA and ITM checkpoints (real configs) + expected outputs there")
    args = ap.parse_args()
    versions = base.check_versions()
    torch.set_grad_enabled(False)
    transformers.utils.logging.set_verbosity_error()
    if args.full:
        FULL = Path(args.full)
        FULL.mkdir(parents=True, exist_ok=True)
        make_vqa(versions)
        make_itm(versions)
        return
    make_vqa(versions)
    make_itm(versions)
    make_blip_model(versions)


if __name__ == "__main__":
    main()
