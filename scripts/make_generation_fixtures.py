#!/usr/bin/env python3
"""transformers' `generate` with beam search, penalties and length options on the committed tiny
captioning and VQA checkpoints: the reference the Rust generation tests compare against.

Run by hand (never by CI), after make_model_fixtures.py and make_task_fixtures.py, from the
repository root, in the pinned environment made once with
`python3.11 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt`:

    .venv/bin/python scripts/make_generation_fixtures.py

Same pinned versions as make_model_fixtures.py. Writes crates/blip/tests/fixtures/expected/
generation.json (see FIXTURES.md).
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as base  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

SEP = base.SEP
PROMPTS = ["a picture of", "a photograph of a", "an image showing"]

# (name, prompt, generate kwargs); every case runs on each image alone and on all three at once
CAPTION_CASES = [
    ("beam2", None, dict(num_beams=2)),
    ("beam3", None, dict(num_beams=3)),
    ("beam5", None, dict(num_beams=5)),
    ("beam3_prompt", "a picture of", dict(num_beams=3)),
    ("beam5_prompt", "a picture of", dict(num_beams=5)),
    ("beam3_lp0", None, dict(num_beams=3, length_penalty=0.0)),
    ("beam3_lp2", None, dict(num_beams=3, length_penalty=2.0)),
    ("beam3_lp_neg1", None, dict(num_beams=3, length_penalty=-1.0)),
    ("beam3_min8_max12", None, dict(num_beams=3, min_new_tokens=8, max_new_tokens=12)),
    ("beam3_min5_max20_prompt", "a picture of", dict(num_beams=3, min_new_tokens=5, max_new_tokens=20)),
    ("beam2_max5", None, dict(num_beams=2, max_new_tokens=5)),
    ("beam4_return4", None, dict(num_beams=4, num_return_sequences=4)),
    ("beam5_return3_prompt", "a picture of", dict(num_beams=5, num_return_sequences=3)),
    ("beam3_early_true", None, dict(num_beams=3, early_stopping=True)),
    ("beam3_early_never_lp2", None, dict(num_beams=3, early_stopping="never", length_penalty=2.0)),
    ("greedy_rep1.5", None, dict(repetition_penalty=1.5)),
    ("greedy_rep0.8_prompt", "a picture of", dict(repetition_penalty=0.8)),
    ("beam3_rep1.3", None, dict(num_beams=3, repetition_penalty=1.3)),
    ("greedy_ngram2", None, dict(no_repeat_ngram_size=2)),
    ("greedy_ngram3_max30", None, dict(no_repeat_ngram_size=3, max_new_tokens=30)),
    ("beam3_ngram2", None, dict(num_beams=3, no_repeat_ngram_size=2)),
    ("beam3_ngram2_rep1.1_prompt", "a picture of", dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.1)),
]
# (name, question index, generate kwargs) for every image alone
VQA_CASES = [
    ("beam3", dict(num_beams=3, max_new_tokens=10)),
    ("beam5_return2", dict(num_beams=5, num_return_sequences=2, max_new_tokens=10)),
    ("greedy_rep1.5", dict(repetition_penalty=1.5, max_new_tokens=10)),
    ("beam3_ngram2", dict(num_beams=3, no_repeat_ngram_size=2, max_new_tokens=10)),
]


def generate(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(**kwargs, return_dict_in_generate=True, output_scores=True)
    scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else None
    return out.sequences.tolist(), scores


@torch.no_grad()
def caption_cases(model, proc, pv):
    n = pv.shape[0]
    cases = []
    for name, prompt, kwargs in CAPTION_CASES:
        for images in [[i] for i in range(n)] + [list(range(n))]:
            call = dict(pixel_values=pv[images])
            if prompt is not None:
                enc = proc.tokenizer([prompt] * len(images), return_tensors="pt")
                call.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            seqs, scores = generate(model, **call, **kwargs)
            cases.append({"name": name, "images": images, "prompt": prompt, "generate_kwargs": kwargs,
                          "sequences": seqs, "sequences_scores": scores})
    # each image with each prompt alone (the Rust side batches them together)
    for i in range(n):
        for prompt in PROMPTS:
            enc = proc.tokenizer([prompt], return_tensors="pt")
            seqs, _ = generate(model, pixel_values=pv[[i]], input_ids=enc["input_ids"],
                               attention_mask=enc["attention_mask"])
            cases.append({"name": "ragged_single", "images": [i], "prompt": prompt, "generate_kwargs": {},
                          "sequences": seqs, "sequences_scores": None})
    return cases


@torch.no_grad()
def vqa_cases(model, proc, pv, questions):
    cases = []
    for name, kwargs in VQA_CASES:
        for i in range(pv.shape[0]):
            for question in questions:
                enc = proc.tokenizer(question, return_tensors="pt")
                seqs, scores = generate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                        pixel_values=pv[[i]], **kwargs)
                cases.append({"name": name, "image": i, "question": question, "generate_kwargs": kwargs,
                              "sequences": seqs, "sequences_scores": scores})
    return cases


def main():
    versions = base.check_versions()
    torch.set_grad_enabled(False)
    transformers.utils.logging.set_verbosity_error()
    paths = [base.IMAGES_DIR / n for n in base.IMAGE_NAMES]
    images = [load_image(str(p)) for p in paths]

    cap_dir = base.MODELS / "tiny-caption-bin"
    cap, _ = base.load_f32(cap_dir)
    cap_proc = base.load_processor(cap_dir)
    cap_pv = cap_proc(images=images, return_tensors="pt")["pixel_values"]
    captions = caption_cases(cap, cap_proc, cap_pv)

    vqa_dir = base.MODELS / "tiny-vqa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vqa = BlipForQuestionAnswering.from_pretrained(vqa_dir, dtype=torch.float32).eval()
    vqa_proc = base.load_processor(vqa_dir)
    vqa_pv = vqa_proc(images=images, return_tensors="pt")["pixel_values"]
    questions = base.json.loads((base.EXPECTED / "tiny-vqa.json").read_text())["questions"][:2]
    answers = vqa_cases(vqa, vqa_proc, vqa_pv, questions)

    # the options must change the results, or the tests could not fail
    greedy = {i: base.json.loads((base.EXPECTED / "tiny-caption-bin.json").read_text())["cases"][i]["sequences"][0]
              for i in range(3)}
    for c in captions:
        if c["name"] in ("beam3", "greedy_rep1.5", "greedy_ngram2") and len(c["images"]) == 1:
            print(f"  {c['name']} image {c['images'][0]}: differs from greedy: {c['sequences'][0] != greedy[c['images'][0]]}")
    for c in captions + answers:
        for seq, score in zip(c["sequences"], c["sequences_scores"] or [None] * len(c["sequences"])):
            text = cap_proc.decode(seq, skip_special_tokens=True)
            print(f"  {c['name']:<28} {str(c.get('images', c.get('image'))):<10} {score if score is None else round(score, 4)!s:<9} {text!r}")

    meta = {
        "versions": versions,
        "images": [str(p.relative_to(base.FIX)) for p in paths],
        "caption_model": "models/tiny-caption-bin",
        "vqa_model": "models/tiny-vqa",
        "call": "model.generate(pixel_values, [input_ids, attention_mask], **generate_kwargs, "
                "return_dict_in_generate=True, output_scores=True): sequences, sequences_scores",
        "caption_cases": captions,
        "vqa_cases": answers,
    }
    base.dump_json(meta, base.EXPECTED / "generation.json")


if __name__ == "__main__":
    main()
