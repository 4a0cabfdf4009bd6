#!/usr/bin/env python3
"""Generate the training fixtures: small checkpoints (a 40-word vocabulary, so that gradients of
every weight fit in a few hundred kB), the gradients PyTorch's `loss.backward()` gives on them,
and a 20-step fine-tuning loop in PyTorch, for crates/blip/tests/gradient_parity.rs and
crates/blip-cli/tests/finetune.rs.

Run by hand, never by CI, from the repository root in the pinned environment
(`.venv/bin/python scripts/make_training_fixtures.py`).

Writes, under crates/blip/tests/fixtures/:
- models/train-caption, train-vqa, train-blip: BlipForConditionalGeneration,
  BlipForQuestionAnswering and BlipModel from the Hub configs shrunk (32-wide, 2 layers, 32 px
  images), seeded random weights, saved as the Hub lays checkpoints out (config.json,
  preprocessor_config.json, model.safetensors with the tied LM head stored too, tokenizer files
  from BertTokenizerFast over training/vocab.txt with BLIP's [DEC] and [ENC]).
- expected/gradients.json + gradients-{caption,vqa,contrastive}.safetensors: the inputs, the loss
  and every parameter's gradient (keys "grad.<checkpoint name>", tied names included).
- training/train.jsonl, eval.jsonl (captions), vqa.jsonl (questions and answers) and
  expected/finetune-*.json/.safetensors: a fine-tuning run in PyTorch with the data order,
  tokenization, AdamW, schedule, clipping and accumulation `blip finetune` documents, its
  per-micro-batch losses and the final weights.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402  (pins, paths)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipModel,
)
from transformers.image_utils import load_image  # noqa: E402

TRAINING = base.FIX / "training"
IMAGE_NAMES = base.IMAGE_NAMES  # chelsea.png, astronaut.png, rocket.jpg
IMAGE_SIZE = 32
WORDS = ("a an the cat lying on sofa astronaut rocket its launch pad at night what animal is this who it "
         "orange white suit space tall sitting photo of in front flag how many one two yes no color "
         "brown ? . , ##s").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["[DEC]", "[ENC]"]
PAD, SEP, BOS = 0, VOCAB.index("[SEP]"), VOCAB.index("[DEC]")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64, vocab_size=len(VOCAB), bos_token_id=BOS, sep_token_id=SEP,
            pad_token_id=PAD, eos_token_id=SEP)

CAPTIONS = ["a cat lying on a sofa", "an astronaut in a white suit", "a rocket on its launch pad at night"]
QUESTIONS = ["what animal is this?", "who is it?", "what is it on?"]
ANSWERS = ["a cat", "astronaut", "a launch pad"]

# the fine-tuning run (blip finetune's flags in the names)
FINETUNE = dict(epochs=7, lr=1e-3, batch_size=2, grad_accum=2, weight_decay=0.05, warmup_steps=2,
                schedule="cosine", max_grad_norm=1.0, seed=7, label_smoothing=0.1)
TRAIN_LINES = [
    ("chelsea.png", "a cat lying on a sofa"), ("astronaut.png", "an astronaut in a white suit"),
    ("rocket.jpg", "a rocket on its launch pad at night"), ("chelsea.png", "an orange cat"),
    ("astronaut.png", "a photo of an astronaut in front of a flag"), ("rocket.jpg", "a tall white rocket"),
    ("chelsea.png", "a brown and white cat sitting"), ("astronaut.png", "an astronaut"),
    ("rocket.jpg", "a rocket at night"), ("chelsea.png", "a cat"),
]
EVAL_LINES = [("chelsea.png", "a cat on a sofa"), ("rocket.jpg", "a rocket on its pad")]


def write_tokenizer(dst):
    TRAINING.mkdir(parents=True, exist_ok=True)
    (TRAINING / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True,
                            bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    tok.model_max_length = 512
    tok.save_pretrained(dst)
    return tok


def write_preprocessor(dst):
    p = json.loads((base.HUB / "blip-image-captioning-base" / "preprocessor_config.json").read_text())
    p["size"] = IMAGE_SIZE
    base.dump_json(p, dst / "preprocessor_config.json")


def config_for(architecture):
    cfg = BlipConfig(vision_config=VISION, text_config=TEXT, projection_dim=16, image_text_hidden_size=16)
    cfg.architectures = [architecture]
    return cfg


@torch.no_grad()
def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            continue
        if p.dim() == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
        elif p.dim() <= 1:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def save_checkpoint(model, name):
    dst = base.fresh_dir(base.MODELS / name)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    base.dump_json(model.config.to_dict(), dst / "config.json")
    write_preprocessor(dst)
    write_tokenizer(dst)
    return dst


def build(cls, architecture, name, seed):
    torch.manual_seed(seed)
    model = cls(config_for(architecture)).eval()
    reinit(model, seed)
    dst = save_checkpoint(model, name)
    reloaded = cls.from_pretrained(dst).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    return reloaded


def pixel_values(names):
    proc = BlipImageProcessor.from_pretrained(base.MODELS / "train-caption")
    images = [load_image(str(base.IMAGES_DIR / n)) for n in names]
    return proc(images=images, return_tensors="pt").pixel_values


def encode(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def decoder_batch(tok, texts):
    """blip finetune's decoder side: [DEC] text [SEP], padded; labels -100 on the padding."""
    ids, mask = encode(tok, texts)
    ids[:, 0] = BOS
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {"loss": loss.detach().reshape(1)}
    for name in model.state_dict():
        p = params.get(name)
        if p is not None and p.grad is not None:
            out["grad." + name] = p.grad.detach().clone().contiguous()
    return out


def gradient_cases(tok):
    cases = {}
    pv = pixel_values(IMAGE_NAMES)
    ids, mask, labels = decoder_batch(tok, CAPTIONS)
    caption = BlipForConditionalGeneration.from_pretrained(base.MODELS / "train-caption").train()
    caption.text_decoder.label_smoothing = 0.1
    loss = caption(pixel_values=pv, input_ids=ids, attention_mask=mask, labels=labels).loss
    save_file(grads_of(caption, loss), base.EXPECTED / "gradients-caption.safetensors")
    cases["caption"] = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist(),
                        "label_smoothing": 0.1, "loss": loss.item()}

    vqa = BlipForQuestionAnswering.from_pretrained(base.MODELS / "train-vqa").train()
    q_ids, q_mask = encode(tok, QUESTIONS)
    a_ids, a_mask, a_labels = decoder_batch(tok, ANSWERS)
    loss = vqa(input_ids=q_ids, pixel_values=pv, attention_mask=q_mask, decoder_input_ids=a_ids,
               decoder_attention_mask=a_mask, labels=a_labels).loss
    save_file(grads_of(vqa, loss), base.EXPECTED / "gradients-vqa.safetensors")
    cases["vqa"] = {"input_ids": q_ids.tolist(), "attention_mask": q_mask.tolist(),
                    "decoder_input_ids": a_ids.tolist(), "decoder_attention_mask": a_mask.tolist(),
                    "labels": a_labels.tolist(), "loss": loss.item()}

    blip = BlipModel.from_pretrained(base.MODELS / "train-blip").train()
    t_ids, t_mask = encode(tok, CAPTIONS)
    loss = blip(input_ids=t_ids, pixel_values=pv, attention_mask=t_mask, return_loss=True).loss
    save_file(grads_of(blip, loss), base.EXPECTED / "gradients-contrastive.safetensors")
    cases["contrastive"] = {"texts": CAPTIONS, "loss": loss.item()}
    for case in cases.values():
        case["images"] = IMAGE_NAMES
    return cases


# ---- the fine-tuning loop, as blip finetune runs it --------------------------------------
MASK64 = (1 << 64) - 1


def permutation(n, seed, epoch):
    """Fisher-Yates over SplitMix64 seeded with seed + epoch (blip finetune's data order)."""
    state = (seed + epoch) & MASK64

    def next_u64():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = next_u64() % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def schedule_factor(kind, step, warmup, total):
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def finetune_reference(tok):
    f = FINETUNE
    model = BlipForConditionalGeneration.from_pretrained(base.MODELS / "train-caption").train()
    model.text_decoder.label_smoothing = f["label_smoothing"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=f["lr"], weight_decay=f["weight_decay"], eps=1e-8, betas=(0.9, 0.999))
    n = len(TRAIN_LINES)
    micro_per_epoch = math.ceil(n / f["batch_size"])
    steps_per_epoch = math.ceil(micro_per_epoch / f["grad_accum"])
    total = steps_per_epoch * f["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: schedule_factor(f["schedule"], s, f["warmup_steps"], total))
    losses, step = [], 0
    for epoch in range(f["epochs"]):
        order = permutation(n, f["seed"], epoch)
        batches = [order[i:i + f["batch_size"]] for i in range(0, n, f["batch_size"])]
        for b, batch in enumerate(batches):
            names = [TRAIN_LINES[i][0] for i in batch]
            ids, mask, labels = decoder_batch(tok, [TRAIN_LINES[i][1] for i in batch])
            loss = model(pixel_values=pixel_values(names), input_ids=ids, attention_mask=mask, labels=labels).loss
            losses.append(loss.item())
            (loss / f["grad_accum"]).backward()
            if (b + 1) % f["grad_accum"] == 0 or b + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(params, f["max_grad_norm"])
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
    assert step == total
    final = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return losses, total, final


def adamw_reference():
    """torch.optim.AdamW on one tensor for four steps with given gradients and learning rates."""
    g = torch.Generator().manual_seed(5)
    param = torch.nn.Parameter(torch.randn(2, 5, generator=g))
    start = param.detach().clone()
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999))
    steps = []
    for lr in (1e-3, 5e-4, 0.0, 2e-3):
        grad = torch.randn(2, 5, generator=g) * 0.01
        grad[0, 0] = 0.0  # a zero gradient: only the weight decay moves it
        for group in opt.param_groups:
            group["lr"] = lr
        param.grad = grad.clone()
        opt.step()
        steps.append({"lr": lr, "grad": grad.tolist(), "param": param.detach().tolist()})
    return {"weight_decay": 0.05, "start": start.tolist(), "steps": steps}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main():
    versions = base.check_versions()
    base.EXPECTED.mkdir(parents=True, exist_ok=True)
    build(BlipForConditionalGeneration, "BlipForConditionalGeneration", "train-caption", 11)
    build(BlipForQuestionAnswering, "BlipForQuestionAnswering", "train-vqa", 12)
    build(BlipModel, "BlipModel", "train-blip", 13)
    tok = BertTokenizerFast.from_pretrained(base.MODELS / "train-caption")
    assert tok.convert_tokens_to_ids("[DEC]") == BOS and tok.sep_token_id == SEP

    cases = gradient_cases(tok)
    cases["versions"] = versions
    base.dump_json(cases, base.EXPECTED / "gradients.json")

    images_rel = "../images-model/"
    write_jsonl(TRAINING / "train.jsonl", [{"image": images_rel + i, "text": t} for i, t in TRAIN_LINES])
    write_jsonl(TRAINING / "eval.jsonl", [{"image": images_rel + i, "text": t} for i, t in EVAL_LINES])
    write_jsonl(TRAINING / "vqa.jsonl", [{"image": images_rel + i, "question": q, "answer": a}
                                         for i, q, a in zip(IMAGE_NAMES, QUESTIONS, ANSWERS)])
    losses, total, final = finetune_reference(tok)
    save_file(final, base.EXPECTED / "finetune-final.safetensors")
    base.dump_json({"settings": FINETUNE, "optimizer_steps": total, "losses": losses, "adamw": adamw_reference(),
                    "versions": versions}, base.EXPECTED / "finetune.json")
    print(f"gradients: {[(k, v['loss']) for k, v in cases.items() if k != 'versions']}")
    print(f"finetune: {total} steps, losses {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
