"""Callable classes for Ray Data's `Dataset.map_batches`: each actor loads its model once and
captions or embeds the batches it is given. Ray itself is not imported here; install it with
`pip install "ray[data]"`.

    import ray
    from blip.ray import BlipCaptioner, BlipEmbedder

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = ds.map_batches(BlipCaptioner, fn_constructor_kwargs={"threads": 2, "num_beams": 3},
                        concurrency=4, batch_size=8, num_cpus=2)
    ds = ds.map_batches(BlipEmbedder, fn_constructor_kwargs={"threads": 2},
                        concurrency=4, batch_size=8, num_cpus=2)
    ds.drop_columns(["bytes"]).write_parquet("s3://bucket/photos-blip/")

Images are read from the batch's `bytes` column (`read_binary_files`: decoded exactly as
transformers' `load_image` decodes files) or, failing that, its `image` column
(`read_images`: arrays as Ray's PIL decoding made them; give it `mode="RGB"`, else palette
images arrive as their indices and 16-bit ones as uint16, and no EXIF orientation is applied).
See docs/PYTHON.md.
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from . import Captioner, ImageTextMatcher


def _images(batch: Any, column: Optional[str]) -> List[Any]:
    """The batch's images (numpy or pandas batch format): `column` if named, else `bytes`, else
    `image`."""
    for name in [column] if column else ["bytes", "image"]:
        if name in batch:
            values = batch[name]
            if isinstance(values, np.ndarray) and values.dtype != object and name == "image":
                return [values[i] for i in range(values.shape[0])]  # one stacked array of equal sizes
            return [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v for v in list(values)]
    raise KeyError(f"the batch has no image column ({column or 'bytes or image'}); it has {sorted(batch)}")


def _actor_threads(threads: Optional[int]) -> Optional[int]:
    """`threads`, else the CPUs Ray assigned to this actor (`num_cpus`), so that actors on one
    node do not each take every core; outside Ray, all cores."""
    if threads is not None:
        return threads
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None
    return max(1, int(round(cpus))) if cpus else None


def _is_pandas(batch: Any) -> bool:
    return hasattr(batch, "iloc")


class BlipCaptioner:
    """Adds a `caption` column (the best caption of each image), and `caption_score`.

    `model`, `dtype`, `resize` as `blip.Captioner`'s; `threads` defaults to the CPUs Ray gives
    the actor (`num_cpus`); `prompt` and generation keywords as `Captioner.caption`'s; `column`
    names the image column. Works with the numpy (default) and pandas batch formats."""

    def __init__(self, model: str = Captioner.DEFAULT_MODEL, dtype: str = "f32", threads: Optional[int] = None,
                 column: Optional[str] = None, prompt: Optional[str] = None, resize: str = "torchvision",
                 **generation: Any) -> None:
        self.captioner = Captioner(model, dtype=dtype, threads=_actor_threads(threads), resize=resize)
        self.column, self.prompt, self.generation = column, prompt, generation

    def __call__(self, batch: Any) -> Any:
        images = _images(batch, self.column)
        if not images:
            batch["caption"], batch["caption_score"] = np.array([], dtype=object), np.array([], dtype=np.float32)
            return batch
        records = self.captioner.caption(images, self.prompt, batch_size=len(images), **self.generation)
        best = [r["captions"][0] if "captions" in r else r for r in records]
        batch["caption"] = np.array([r["caption"] for r in best], dtype=object)
        batch["caption_score"] = np.array([r["score"] for r in best], dtype=np.float32)
        return batch


class BlipEmbedder:
    """Adds an `embedding` column: each image's unit-norm ITC embedding (float32, 256 wide for
    the retrieval checkpoints). Arguments as `BlipCaptioner`'s, for `blip.ImageTextMatcher`."""

    def __init__(self, model: str = ImageTextMatcher.DEFAULT_MODEL, dtype: str = "f32",
                 threads: Optional[int] = None, column: Optional[str] = None, resize: str = "torchvision") -> None:
        self.matcher = ImageTextMatcher(model, dtype=dtype, threads=_actor_threads(threads), resize=resize)
        self.column = column

    def __call__(self, batch: Any) -> Any:
        images = _images(batch, self.column)
        if not images:
            batch["embedding"] = np.zeros((0, self.matcher.embedding_dim), dtype=np.float32)
            return batch
        embeddings = self.matcher.embed_images(images, batch_size=len(images))
        batch["embedding"] = list(embeddings) if _is_pandas(batch) else embeddings
        return batch
