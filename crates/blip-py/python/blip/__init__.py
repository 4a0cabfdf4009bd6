"""BLIP (Salesforce) captioning, visual question answering, image-text matching, embeddings and
zero-shot classification, computed in Rust with the same outputs as Hugging Face transformers.

    >>> import blip
    >>> captioner = blip.Captioner()  # Salesforce/blip-image-captioning-base
    >>> captioner.caption(["cat.jpg"], num_beams=3)[0]["caption"]

Images may be paths (or http(s) URLs), the bytes of an image file, `PIL.Image.Image`s or uint8
numpy arrays (H×W×3, H×W, H×W×4); files are decoded as transformers' `load_image` decodes them,
PIL images and arrays converted to RGB as transformers' processor converts them. Generation
keywords are transformers' `generate` keywords; left out, they take transformers' defaults.
Computations release the GIL, and one object may be used from several threads at once.
Errors: `ValueError` (bad options, undecodable images, wrong kind of checkpoint),
`FileNotFoundError` (a missing image file), `OSError` (a checkpoint that cannot be found or
read), `RuntimeError` (internal failures).
"""

from __future__ import annotations

import json
import numbers
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _blip
from ._images import ImageLike, prepare

__all__ = ["Captioner", "QuestionAnswerer", "ImageTextMatcher", "__version__"]
__version__: str = _blip.__version__

Images = Union[ImageLike, Sequence[ImageLike]]
EarlyStopping = Union[bool, str]


def _count(name: str, value: Any, least: int = 0) -> int:
    """An integer option (numpy integers too), refused below `least` as the CLI refuses it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")
    return int(value)


# transformers' `generate` keywords, as `caption` and `answer` take them.
_GENERATION = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
               "num_return_sequences", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
               "no_repeat_ngram_size", "seed")


def _generation(arguments: Dict[str, Any]) -> str:
    """The generation keywords among a call's `arguments` that were given (not None),
    JSON-encoded for the native module; the library checks their values and combinations."""
    given = {}
    for name in _GENERATION:
        value = arguments.get(name)
        if value is None:
            continue
        if name == "early_stopping" or name == "do_sample":
            given[name] = value if isinstance(value, str) else bool(value)
        elif name in ("length_penalty", "temperature", "top_p", "repetition_penalty"):
            if not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, not {value!r}")
            given[name] = float(value)
        else:
            given[name] = _count(name, value)
    return json.dumps(given)


def _in_batches(images: Any, batch_size: int, resize: str, run: Any) -> List[Any]:
    """`run` over the images `batch_size` at a time (as the CLI's --batch-size), results joined."""
    items = prepare(images, resize)
    if not items:
        raise ValueError("images: an empty list; give at least one image")
    size = _count("batch_size", batch_size, 1)
    results: List[Any] = []
    for start in range(0, len(items), size):
        results.extend(run(items[start:start + size], start))
    return results


def _texts_list(name: str, values: Union[str, Sequence[str]], single: bool) -> List[str]:
    """Texts given as a list; one string only where one text is meant (`single`)."""
    if isinstance(values, str):
        if single:
            return [values]
        raise ValueError(f"{name}: a string; give a list of them")
    return list(values)


def _texts(key: str, generated: List[List[Dict[str, Any]]], several: bool) -> List[Dict[str, Any]]:
    """One record per input, as `blip ... --format jsonl` prints them: the best text's fields,
    or with several asked for, all of them under `key + "s"`."""
    if several:
        return [{key + "s": texts} for texts in generated]
    return [texts[0] for texts in generated]


def _per_image(value: Union[str, Sequence[str]], count: int, name: str) -> List[str]:
    if isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} given for {count} images; give one, or one per image")
    return values


def _load(native: Any, model: str, dtype: str, threads: Optional[int], resize: str,
          image_size: Optional[int]) -> Any:
    """The native object of a task class, its integer settings checked first."""
    threads = None if threads is None else _count("threads", threads, 1)
    image_size = None if image_size is None else _count("image_size", image_size, 16)
    return native(model, dtype, threads, resize, image_size)


class Captioner:
    """A `BlipForConditionalGeneration` checkpoint (a Hub repo id, from the Hugging Face cache, or
    a local folder), its weights held in `dtype` ("f32", "bf16" or "f16"), computing on
    `threads` threads (None: all cores), resizing as transformers 5 ("torchvision") or 4 ("pil").
    `image_size` runs it on N×N images (a multiple of 16) instead of the checkpoint's size, the
    vision position embeddings interpolated as transformers' `interpolate_pos_encoding=True`."""

    DEFAULT_MODEL: str = _blip.DEFAULT_CAPTION_MODEL

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "f32", threads: Optional[int] = None,
                 resize: str = "torchvision", image_size: Optional[int] = None) -> None:
        self.model, self.resize = model, resize
        self._native = _load(_blip.NativeCaptioner, model, dtype, threads, resize, image_size)

    def caption(self, images: Images, prompt: Optional[str] = None, *, max_new_tokens: Optional[int] = None,
                min_new_tokens: Optional[int] = None, num_beams: Optional[int] = None,
                length_penalty: Optional[float] = None, early_stopping: Optional[EarlyStopping] = None,
                num_return_sequences: Optional[int] = None, do_sample: Optional[bool] = None,
                temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                repetition_penalty: Optional[float] = None, no_repeat_ngram_size: Optional[int] = None,
                seed: Optional[int] = None, batch_size: int = 8) -> List[Dict[str, Any]]:
        """Captions `images`, `batch_size` per forward pass, continuing `prompt` if given (it is
        part of the caption, as in transformers). Returns one dict per image: `{"caption",
        "tokens", "score", "log_prob"}` (tokens as transformers' `generate` returns them), or
        with `num_return_sequences` > 1 `{"captions": [...]}` best first."""
        generation = _generation(locals())
        generated = _in_batches(images, batch_size, self.resize,
                                lambda batch, _: self._native.caption(batch, prompt, generation))
        return _texts("caption", generated, (num_return_sequences or 1) > 1)


class QuestionAnswerer:
    """A `BlipForQuestionAnswering` checkpoint; arguments as `Captioner`'s."""

    DEFAULT_MODEL: str = _blip.DEFAULT_VQA_MODEL

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "f32", threads: Optional[int] = None,
                 resize: str = "torchvision", image_size: Optional[int] = None) -> None:
        self.model, self.resize = model, resize
        self._native = _load(_blip.NativeQuestionAnswerer, model, dtype, threads, resize, image_size)

    def answer(self, images: Images, questions: Union[str, Sequence[str]], *, max_new_tokens: Optional[int] = None,
               min_new_tokens: Optional[int] = None, num_beams: Optional[int] = None,
               length_penalty: Optional[float] = None, early_stopping: Optional[EarlyStopping] = None,
               num_return_sequences: Optional[int] = None, do_sample: Optional[bool] = None,
               temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
               repetition_penalty: Optional[float] = None, no_repeat_ngram_size: Optional[int] = None,
               seed: Optional[int] = None, batch_size: int = 8) -> List[Dict[str, Any]]:
        """Answers a question about each image (one question for all, or one per image),
        `batch_size` images per forward pass.
        Returns one dict per image: `{"answer", "tokens", "score", "log_prob"}`, or with
        `num_return_sequences` > 1 `{"answers": [...]}` best first."""
        count = len(images) if isinstance(images, (list, tuple)) else 1
        questions = _per_image(questions, count, "questions")
        generation = _generation(locals())
        generated = _in_batches(images, batch_size, self.resize, lambda batch, start: self._native.answer(
            batch, questions[start:start + len(batch)], generation))
        return _texts("answer", generated, (num_return_sequences or 1) > 1)

    def rank(self, images: Images, questions: Union[str, Sequence[str]], answers: Sequence[str],
             top: int = _blip.DEFAULT_RANK_TOP,
             candidates: int = _blip.DEFAULT_RANK_CANDIDATES, batch_size: int = 8) -> List[List[Dict[str, Any]]]:
        """Ranks a closed list of `answers` for each image: per image the `top` best as
        `{"answer", "score"}` (score: the answer's log-likelihood), best first; the `candidates`
        answers whose first token is likeliest are scored in full (BLIP's `rank_answer`)."""
        count = len(images) if isinstance(images, (list, tuple)) else 1
        questions = _per_image(questions, count, "questions")
        answers = _texts_list("answers", answers, single=False)
        top, candidates = _count("top", top, 1), _count("candidates", candidates, 1)
        return _in_batches(images, batch_size, self.resize, lambda batch, start: self._native.rank(
            batch, questions[start:start + len(batch)], answers, top, candidates))


class ImageTextMatcher:
    """A `BlipForImageTextRetrieval` (ITM and ITC) or `BlipModel` (ITC only) checkpoint;
    arguments as `Captioner`'s."""

    DEFAULT_MODEL: str = _blip.DEFAULT_MATCHING_MODEL
    DEFAULT_TEMPLATE: str = _blip.DEFAULT_TEMPLATE

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "f32", threads: Optional[int] = None,
                 resize: str = "torchvision", image_size: Optional[int] = None) -> None:
        self.model, self.resize = model, resize
        self._native = _load(_blip.NativeImageTextMatcher, model, dtype, threads, resize, image_size)

    @property
    def has_itm_head(self) -> bool:
        """Whether ITM match probabilities are available (BlipForImageTextRetrieval)."""
        return self._native.has_itm_head

    @property
    def embedding_dim(self) -> int:
        """Width of the embeddings: 256 (retrieval ITC) or the BlipModel projection's."""
        return self._native.embedding_dim

    def match(self, images: Images, texts: Union[str, Sequence[str]],
              batch_size: int = 8) -> List[List[Dict[str, Any]]]:
        """Every image against every text: per image, per text `{"text", "itm", "itc"}` (ITM
        match probability, None for BlipModel; ITC cosine similarity)."""
        texts = _texts_list("texts", texts, single=True)
        return _in_batches(images, batch_size, self.resize, lambda batch, _: self._native.match_texts(batch, texts))

    def gradcam(self, images: Images, texts: Union[str, Sequence[str]], layer: int = 6,
                batch_size: int = 8) -> List[List[Dict[str, Any]]]:
        """Grad-CAM maps of where each text matches each image, as LAVIS's `compute_gradcam`
        (the BLIP demo's): per image, per text `{"text", "map", "tokens", "itm"}`, `map` the
        float32 [rows, cols] patch map averaged over the text's tokens, `tokens` each token with
        its own map, from the ITM text encoder's layer `layer` (0-based; LAVIS uses 6).
        BlipForImageTextRetrieval checkpoints only."""
        texts = _texts_list("texts", texts, single=True)
        layer = _count("layer", layer, 0)
        return _in_batches(images, batch_size, self.resize,
                           lambda batch, _: self._native.gradcam(batch, texts, layer))

    def embed_images(self, images: Images, batch_size: int = 8) -> np.ndarray:
        """Unit-norm image embeddings, float32 [n, embedding_dim]."""
        parts = _in_batches(images, batch_size, self.resize, lambda batch, _: [self._native.embed_images(batch)])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def embed_texts(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """Unit-norm text embeddings, float32 [n, embedding_dim]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._native.embed_texts(texts)

    def classify(self, images: Images, labels: Sequence[str], template: str = DEFAULT_TEMPLATE,
                 rerank: Union[bool, int] = False, batch_size: int = 8) -> List[List[Dict[str, Any]]]:
        """Zero-shot classification: per image, the labels best first as `{"label",
        "probability", "itc"}`; with `rerank` (True: the 5 best, or a number) the best labels
        rescored with the ITM head come first, ordered by `"itm"`."""
        count = None if rerank is False else (5 if rerank is True else _count("rerank", rerank, 1))
        labels = _texts_list("labels", labels, single=False)
        return _in_batches(images, batch_size, self.resize,
                           lambda batch, _: self._native.classify(batch, labels, template, count))
