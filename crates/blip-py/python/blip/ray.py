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
(`read_images`: arrays as Ray's PIL decoding made them). See docs/PYTHON.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from . import Captioner, ImageTextMatcher


def _images(batch: Dict[str, Any], column: Optional[str]) -> List[Any]:
    """The batch's images: `column` if named, else `bytes`, else `image`."""
    for name in [column] if column else ["bytes", "image"]:
        if name in batch:
            values = batch[name]
            if isinstance(values, np.ndarray) and values.dtype != object and name == "image":
                return [values[i] for i in range(values.shape[0])]  # one stacked array of equal sizes
            return [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v for v in values]
    raise KeyError(f"the batch has no image column ({column or 'bytes or image'}); it has {sorted(batch)}")


class BlipCaptioner:
    """Adds a `caption` column (the best caption of each image), and `caption_score`.

    `model`, `dtype`, `threads` as `blip.Captioner`'s (give `threads` the actor's `num_cpus`);
    `prompt` and generation keywords as `Captioner.caption`'s; `column` names the image column."""

    def __init__(self, model: str = Captioner.DEFAULT_MODEL, dtype: str = "f32", threads: Optional[int] = None,
                 column: Optional[str] = None, prompt: Optional[str] = None, **generation: Any) -> None:
        self.captioner = Captioner(model, dtype=dtype, threads=threads)
        self.column, self.prompt, self.generation = column, prompt, generation

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        records = self.captioner.caption(_images(batch, self.column), self.prompt, **self.generation)
        best = [r["captions"][0] if "captions" in r else r for r in records]
        batch["caption"] = np.array([r["caption"] for r in best], dtype=object)
        batch["caption_score"] = np.array([r["score"] for r in best], dtype=np.float32)
        return batch


class BlipEmbedder:
    """Adds an `embedding` column: each image's unit-norm ITC embedding (float32, 256 wide for
    the retrieval checkpoints). Arguments as `BlipCaptioner`'s, for `blip.ImageTextMatcher`."""

    def __init__(self, model: str = ImageTextMatcher.DEFAULT_MODEL, dtype: str = "f32",
                 threads: Optional[int] = None, column: Optional[str] = None) -> None:
        self.matcher = ImageTextMatcher(model, dtype=dtype, threads=threads)
        self.column = column

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        batch["embedding"] = self.matcher.embed_images(_images(batch, self.column))
        return batch
