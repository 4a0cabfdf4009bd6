"""Images as the native module takes them: PIL images become RGB uint8 arrays the way
transformers' BLIP processor converts them; everything else passes through."""

from __future__ import annotations

import os
from typing import Any, List, Sequence, Union

import numpy as np

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray, Any]


def _is_pil(image: Any) -> bool:
    module = type(image).__module__
    return module.startswith("PIL.") and hasattr(image, "convert") and hasattr(image, "mode")


def pil_to_rgb(image: Any) -> np.ndarray:
    """transformers' `convert_to_rgb` (what `BlipImageProcessor` applies, `do_convert_rgb`):
    an image with alpha or a transparency key is composited over white through RGBA; any other
    is PIL's `convert("RGB")`."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        from PIL import Image

        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def array_to_rgb(array: np.ndarray, resize: str = "torchvision") -> np.ndarray:
    """transformers' `convert_to_rgb` on a channels-last uint8 array, as the processor backend
    that `resize` names does it: one channel repeated; four composited over white — the
    torchvision backend (transformers 5's default) in float32, truncating `x * 255.999`, the PIL
    backend in float64, rounding; three channels and H×W as they are."""
    if array.ndim == 3 and array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.ndim == 3 and array.shape[-1] == 4:
        if resize == "pil":
            alpha = array[..., 3:4] / 255
            return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        x = array.astype(np.float32) * np.float32(1.0 / 255)
        composite = x[..., :3] * x[..., 3:] + (np.float32(1) - x[..., 3:])
        return (composite * np.float32(255.999)).astype(np.uint8)
    return array


def prepare(images: Union[ImageLike, Sequence[ImageLike]], resize: str = "torchvision") -> List[Any]:
    """One image or a sequence of them, as a list the native module reads."""
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    out = []
    for item in items:
        if _is_pil(item):
            out.append(pil_to_rgb(item))
            continue
        if not isinstance(item, (str, bytes, bytearray, memoryview, np.ndarray)) and hasattr(item, "__array__"):
            item = np.asarray(item)  # torch tensors, Ray's tensor elements, ...
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8:
                raise ValueError(f"a numpy array of {item.dtype}; give uint8 pixels (H×W×3 or H×W)")
            out.append(array_to_rgb(item, resize))
        elif isinstance(item, os.PathLike):
            out.append(os.fsdecode(os.fspath(item)))  # a path, never image bytes
        elif isinstance(item, memoryview):
            out.append(item.tobytes())
        else:
            out.append(item)
    return out
