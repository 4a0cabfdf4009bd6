#!/usr/bin/env python3
"""Generate crates/blip/tests/fixtures/images-differential/: random images of every PIL mode in
every format PIL writes, with transformers' decode and pixel_values, for the differential test
(crates/blip/tests/image_differential.rs).

Run by hand, never by CI, from the repository root, in the pinned environment made once with
`python3.11 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt`:
    .venv/bin/python scripts/make_differential_image_fixtures.py [OUT_DIR]

Seeded (numpy default_rng(17)): re-running rewrites the same files. Versions are pinned and
asserted as in make_image_fixtures.py (transformers 5.24.0, torchvision 0.29.2, torch 2.15.0,
Pillow 13.0.0, numpy 2.4.6, safetensors 0.8.0); torchvision must be importable, or transformers 5
silently gives `BlipImageProcessor` the PIL backend.

Each case is a small image (20-64 px a side) of one mode (1, L, LA, P, PA, RGB, RGBA, CMYK, I;16),
content smooth gradients mixed with noise of random strength, saved by PIL in one format (JPEG
with random quality, subsampling, progressive, optimize and EXIF orientation; PNG; WebP lossy and
lossless; GIF; BMP; TIFF raw (some BigTIFF), LZW, deflate or PackBits, some with an Orientation
tag), or written by hand where PIL cannot write the variant but reads it (1/2/4/8-bit palette
TIFFs of either byte order with arbitrary 16-bit ColorMap entries; 16-bit CMYK TIFFs; planar 8-bit
CMYK TIFFs). Every (mode, format) pair PIL can write appears, then random draws up to COUNT cases.

Stored per case, losslessly as in make_image_fixtures.py, in one 8-bit RGB PNG `expected/NNN.png`
(three images stacked top to bottom, left-aligned, zero-padded to the widest; sizes in the
manifest, to keep the fixture small):
* what transformers' BLIP processor resizes (`load_image(path)`, then the processor's
  `convert_to_rgb`), `decoded_size` [width, height];
* the resized uint8 image of the torchvision backend, then of the PIL backend
  (`BlipImageProcessor`, `BlipImageProcessorPil`, both from blip-image-captioning-large's config
  with `size` set to the case's random `target`, 16-56 px a side), from which pixel_values[c, y, x]
  == LUT[backend][c][level]; the script asserts that identity, and the LUTs (transformers' own
  output on an image of every level, one [3, 256] f32 tensor per backend) are `luts.safetensors`.
16-bit gray (I;16 PNG and TIFF) is the project's documented deviation: PIL's `convert("RGB")`
clips at 255, the project scales by 1/257. For those cases (`deviation: "i16_scaled"`) the script
asserts that PIL still clips, stores the scaled decode (round(v / 257) of the EXIF-transposed
16-bit values) and transformers' pixel values of that scaled image.
"""

import io
import json
import os
import shutil
import struct
import sys

import numpy as np
import torch
from PIL import Image, ImageOps

try:
    import torchvision  # noqa: F401  (transformers 5 needs it for the torchvision backend)
except ImportError as e:  # pragma: no cover
    sys.exit(f"torchvision is required (transformers would silently fall back to PIL): {e}")

from safetensors.numpy import save_file
from transformers import BlipImageProcessor, BlipImageProcessorPil
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_model_fixtures  # noqa: E402  (the pinned versions, checked in one place)

VERSIONS = make_model_fixtures.check_versions()

COUNT = 150
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "crates", "blip", "tests", "fixtures", "images-differential")
INP = os.path.join(OUT, "inputs")
EXP = os.path.join(OUT, "expected")
HUB = os.path.join(ROOT, "crates", "blip", "tests", "fixtures", "hub-configs", "blip-image-captioning-large")

shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(INP)
os.makedirs(EXP)

PROCS = {"torchvision": BlipImageProcessor.from_pretrained(HUB), "pil": BlipImageProcessorPil.from_pretrained(HUB)}
for bname, proc in PROCS.items():
    assert proc.backend == bname, proc.backend
rng = np.random.default_rng(17)


# ---------------------------------------------------------------- content
def content(h, w, channels):
    """Smooth gradients and blobs plus noise of random strength, uint8 (h, w, channels)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((h, w, channels))
    for c in range(channels):
        a, b, ph = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(0, 6.3)
        smooth = 127.5 + 127.5 * np.sin(a * xx / w + b * yy / h + ph)
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(h, w) / 2)
        smooth = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 255 - smooth, smooth)
        out[..., c] = smooth + rng.normal(0, rng.choice([0, 4, 16, 48, 128]), (h, w))
    return out.clip(0, 255).astype(np.uint8)


def alpha(h, w):
    """Alpha with opaque, transparent and partial regions."""
    a = content(h, w, 1)[..., 0]
    a[: h // 4] = 255
    a[-(h // 5):, : w // 3] = 0
    return a


def make_image(mode, h, w):
    rgb = Image.fromarray(content(h, w, 3), "RGB")
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha(h, w)]), "RGBA")
    if mode == "L":
        return rgb.convert("L")
    if mode == "LA":
        return Image.fromarray(np.dstack([np.asarray(rgb.convert("L")), alpha(h, w)]), "LA")
    if mode == "1":
        return rgb.convert("L").convert("1", dither=Image.Dither(int(rng.choice([0, 3]))))
    if mode in ("P", "PA"):
        colors = int(rng.choice([2, 3, 4, 7, 16, 40, 100, 256]))
        p = rgb.quantize(colors, method=Image.Quantize(int(rng.choice([0, 1, 2]))))
        if mode == "PA":
            p = p.convert("PA")
            p.putalpha(Image.fromarray(alpha(h, w), "L"))
        return p
    if mode == "CMYK":  # all four inks random (PIL's RGB->CMYK conversion leaves K at 0)
        return Image.fromarray(content(h, w, 4), "CMYK")
    if mode == "I;16":
        g = np.asarray(Image.fromarray(content(h, w, 1)[..., 0], "L")).astype(np.int64) * 257
        g = (g + rng.integers(-300, 300, g.shape)).clip(0, 65535).astype(np.uint16)
        im = Image.fromarray(g)
        assert im.mode == "I;16"
        return im
    raise ValueError(mode)


# ---------------------------------------------------------------- writers
def exif_with_orientation(o):
    exif = Image.Exif()
    exif[0x0112] = o
    return exif.tobytes()


def maybe_orientation(p):
    return int(rng.integers(2, 9)) if rng.random() < p else None


def save_jpeg(im, path):
    opts = {"quality": int(rng.integers(5, 101)), "subsampling": int(rng.choice([0, 1, 2])),
            "progressive": bool(rng.random() < 0.4), "optimize": bool(rng.random() < 0.3)}
    o = maybe_orientation(0.4)
    im.save(path, "JPEG", **opts, **({"exif": exif_with_orientation(o)} if o else {}))
    return {**opts, "orientation": o}


def save_png(im, path):
    opts = {"optimize": bool(rng.random() < 0.3)}
    if im.mode == "P" and rng.random() < 0.4:
        opts["transparency"] = int(rng.integers(0, len(im.getpalette()) // 3))
    o = maybe_orientation(0.2)
    im.save(path, "PNG", **opts, **({"exif": exif_with_orientation(o)} if o else {}))
    return {**opts, "orientation": o}


def save_webp_lossy(im, path):
    opts = {"quality": int(rng.integers(5, 101)), "method": int(rng.integers(0, 7))}
    o = maybe_orientation(0.2)
    im.save(path, "WEBP", **opts, **({"exif": exif_with_orientation(o)} if o else {}))
    return {**opts, "orientation": o}


def save_webp_lossless(im, path):
    opts = {"lossless": True, "method": int(rng.integers(0, 7)), "exact": bool(rng.random() < 0.5)}
    o = maybe_orientation(0.2)
    im.save(path, "WEBP", **opts, **({"exif": exif_with_orientation(o)} if o else {}))
    return {**opts, "orientation": o}


def save_gif(im, path):
    opts = {}
    if im.mode == "P" and rng.random() < 0.4:
        opts["transparency"] = int(rng.integers(0, len(im.getpalette()) // 3))
    im.save(path, "GIF", **opts)
    return opts


def save_bmp(im, path):
    im.save(path, "BMP")
    return {}


def save_tiff(im, path):
    opts = {"compression": str(rng.choice(["raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"])),
            "big_tiff": bool(rng.random() < 0.5)}  # Pillow writes BigTIFF only when uncompressed
    o = maybe_orientation(0.3)
    im.save(path, "TIFF", **opts, **({"tiffinfo": {274: o}} if o else {}))
    head = path.getvalue()[:4] if isinstance(path, io.BytesIO) else open(path, "rb").read(4)
    opts["big_tiff"] = head in (b"II+\0", b"MM\0+")
    return {**opts, "orientation": o}


def tiff_by_hand(path, width, height, bits, photometric, samples, data, byte_order, colormap=None, planes=1):
    """An uncompressed classic TIFF, one strip per plane (`data` holds the planes one after the
    other when `planes` > 1): what PIL cannot write but reads."""
    e = "<" if byte_order == "II" else ">"
    plane_bytes = len(data) // planes
    entries = []  # (tag, type, values)
    entries.append((256, 4, [width]))
    entries.append((257, 4, [height]))
    entries.append((258, 3, [bits] * samples))
    entries.append((259, 3, [1]))
    entries.append((262, 3, [photometric]))
    entries.append((273, 4, [0] * planes))  # patched below
    entries.append((277, 3, [samples]))
    entries.append((278, 4, [height]))
    entries.append((279, 4, [plane_bytes] * planes))
    entries.append((284, 3, [1 if planes == 1 else 2]))
    if colormap is not None:
        entries.append((320, 3, list(colormap)))
    ifd_size = 2 + 12 * len(entries) + 4
    # Values longer than 4 bytes go after the IFD; the strip offsets are known once they are placed.
    extra_base = 8 + ifd_size
    extra_len = sum((len(v) * (2 if t == 3 else 4) + 1) // 2 * 2 for _, t, v in entries if len(v) * (2 if t == 3 else 4) > 4)
    data_offset = extra_base + extra_len
    extra = bytearray()
    out = bytearray(byte_order.encode() + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(entries)))
    for tag, typ, vals in entries:
        if tag == 273:
            vals = [data_offset + k * plane_bytes for k in range(planes)]
        raw = struct.pack(e + {3: "H", 4: "I"}[typ] * len(vals), *vals)
        if len(raw) <= 4:
            value = raw.ljust(4, b"\0")
        else:
            value = struct.pack(e + "I", extra_base + len(extra))
            extra += raw + b"\0" * (len(raw) % 2)
        out += struct.pack(e + "HHI", tag, typ, len(vals)) + value
    assert len(extra) == extra_len
    out += struct.pack(e + "I", 0) + extra + data
    with open(path, "wb") as f:
        f.write(bytes(out))


def pack_bits(indices, bits):
    """Rows of n-bit samples, most significant first, each row padded to a byte."""
    h, w = indices.shape
    per = 8 // bits
    rows = []
    for y in range(h):
        row = bytearray((w * bits + 7) // 8)
        for x in range(w):
            row[x // per] |= int(indices[y, x]) << (8 - bits * (x % per + 1))
        rows.append(bytes(row))
    return b"".join(rows)


def palette_tiff_by_hand(path, h, w, bits):
    order = str(rng.choice(["II", "MM"]))
    n = 1 << bits
    indices = (content(h, w, 1)[..., 0].astype(np.int64) * n // 256).astype(np.uint8)
    colormap = rng.integers(0, 65536, 3 * n)  # arbitrary 16-bit entries: PIL keeps v // 256
    tiff_by_hand(path, w, h, bits, 3, 1, pack_bits(indices, bits), order, colormap)
    back = Image.open(path)
    assert back.mode == "P" and (np.asarray(back) == indices).all(), "PIL misreads the hand-written TIFF"
    assert back.getpalette()[: 3 * n] == list((colormap.reshape(3, n).T >> 8).reshape(-1))
    return {"bits": bits, "byte_order": order, "by_hand": True}


def cmyk16_tiff_by_hand(path, h, w):
    """Pixel-interleaved only: Pillow 13 misreads planar 16-bit CMYK (not a PIL decode to match)."""
    order = str(rng.choice(["II", "MM"]))
    v = (content(h, w, 4).astype(np.int64) * 257 + rng.integers(-300, 300, (h, w, 4))).clip(0, 65535)
    tiff_by_hand(path, w, h, 16, 5, 4, v.astype("<u2" if order == "II" else ">u2").tobytes(), order)
    back = Image.open(path)
    assert back.mode == "CMYK" and (np.asarray(back) == v >> 8).all(), "PIL misreads the hand-written TIFF"
    return {"bits": 16, "byte_order": order, "by_hand": True}


def cmyk_planar_tiff_by_hand(path, h, w):
    order = str(rng.choice(["II", "MM"]))
    cmyk = content(h, w, 4)
    data = np.moveaxis(cmyk, 2, 0).tobytes()
    tiff_by_hand(path, w, h, 8, 5, 4, data, order, planes=4)
    back = Image.open(path)
    assert back.mode == "CMYK" and (np.asarray(back) == cmyk).all(), "PIL misreads the hand-written TIFF"
    return {"bits": 8, "byte_order": order, "planar": True, "by_hand": True}


WRITERS = {
    "jpeg": ("jpg", save_jpeg),
    "png": ("png", save_png),
    "webp_lossy": ("webp", save_webp_lossy),
    "webp_lossless": ("webp", save_webp_lossless),
    "gif": ("gif", save_gif),
    "bmp": ("bmp", save_bmp),
    "tiff": ("tif", save_tiff),
}
HAND = {
    **{("P", f"tiff_{b}bit_by_hand"): (lambda path, h, w, b=b: palette_tiff_by_hand(path, h, w, b)) for b in (1, 2, 4, 8)},
    ("CMYK", "tiff16_by_hand"): cmyk16_tiff_by_hand,
    ("CMYK", "tiff_planar_by_hand"): cmyk_planar_tiff_by_hand,
}
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16"]


def writable(mode, fmt):
    try:
        WRITERS[fmt][1](make_image(mode, 8, 8), io.BytesIO())
        return True
    except (OSError, ValueError, KeyError):
        return False


state = rng.bit_generator.state
pairs = [(m, f) for m in MODES for f in WRITERS if writable(m, f)] + list(HAND)
rng.bit_generator.state = state  # the probe draws do not shift the cases
# Every pair once, then random draws weighted towards the variants with the most options and the
# TIFF kinds the `image` crate cannot decode as PIL does (palette, gray+alpha, CMYK).
weights = np.array([
    8.0 if (m, f) in (("RGB", "jpeg"), ("CMYK", "tiff"), ("P", "tiff"))
    else 4.0 if f == "jpeg" or (f.startswith("tiff") and m in ("P", "PA", "LA", "CMYK"))
    else 2.0 if f.startswith("tiff") or f.startswith("webp") else 1.0
    for m, f in pairs
])
draws = list(range(len(pairs))) + list(rng.choice(len(pairs), COUNT - len(pairs), p=weights / weights.sum()))
print(f"{len(pairs)} (mode, format) pairs:", ", ".join(f"{m}/{f}" for m, f in pairs))

# ---------------------------------------------------------------- LUTs
levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
lut_img = Image.fromarray(np.dstack([levels, levels[::-1], levels.T]), "RGB")
luts = {}
for bname, proc in PROCS.items():
    pv = proc(images=[lut_img], do_resize=False, return_tensors="np")["pixel_values"][0]
    assert pv.dtype == np.float32 and pv.shape == (3, 16, 16), pv.shape
    lut = np.zeros((3, 256), np.float32)
    for c in range(3):
        lut[c, np.asarray(lut_img)[..., c].reshape(-1)] = pv[c].reshape(-1)
    luts[bname] = lut
save_file(luts, os.path.join(OUT, "luts.safetensors"))


def invert(pv, lut):
    """pixel_values -> uint8 levels, asserting pv == lut[level] exactly."""
    out = np.zeros(pv.shape[1:] + (3,), np.uint8)
    for c in range(3):
        order = np.argsort(lut[c])
        lv = order[np.clip(np.searchsorted(lut[c][order], pv[c]), 0, 255)]
        assert (lut[c][lv] == pv[c]).all(), "pixel_values are not a per-level function"
        out[..., c] = lv
    return out


def save_stacked_png(arrays, name):
    """The arrays stacked top to bottom, left-aligned, zero-padded to the widest, as one RGB PNG."""
    width = max(a.shape[1] for a in arrays)
    sheet = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in arrays])
    path = os.path.join(EXP, name)
    Image.fromarray(sheet, "RGB").save(path, optimize=True)
    assert (np.asarray(Image.open(path)) == sheet).all()
    return os.path.relpath(path, OUT)


# ---------------------------------------------------------------- cases
manifest = {"versions": VERSIONS,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "pairs": [f"{m}/{f}" for m, f in pairs], "cases": []}
for i, k in enumerate(draws):
    mode, fmt = pairs[k]
    h, w = (int(v) for v in rng.integers(20, 65, 2))
    th, tw = (int(v) for v in rng.integers(16, 57, 2))
    stem = f"{i:03d}_{mode.replace(';', '').lower()}_{fmt}"
    if (mode, fmt) in HAND:
        path = os.path.join(INP, stem + ".tif")
        opts = HAND[(mode, fmt)](path, h, w)
    else:
        ext, writer = WRITERS[fmt]
        path = os.path.join(INP, f"{stem}.{ext}")
        opts = writer(make_image(mode, h, w), path)
    opened = Image.open(path)
    file_mode, file_format = opened.mode, opened.format
    im = load_image(path)
    decoded = np.asarray(convert_to_rgb(im, return_numpy=True), dtype=np.uint8)
    deviation = None
    if file_mode == "I;16":
        v16 = np.asarray(ImageOps.exif_transpose(Image.open(path)))
        assert v16.dtype == np.uint16
        assert (decoded == np.minimum(v16, 255)[..., None]).all(), "PIL no longer clips I;16"
        decoded = np.repeat(((v16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, 2)
        im = Image.fromarray(decoded, "RGB")
        deviation = "i16_scaled"
    case = {"input": os.path.relpath(path, OUT), "mode": mode, "format": fmt, "file_mode": file_mode,
            "file_format": file_format, "options": opts, "decoded_size": [decoded.shape[1], decoded.shape[0]],
            "target": {"height": th, "width": tw}, "deviation": deviation}
    resized = []
    for bname, proc in PROCS.items():
        pv = proc(images=[im], size={"height": th, "width": tw}, return_tensors="np")["pixel_values"][0]
        assert pv.shape == (3, th, tw) and pv.dtype == np.float32, pv.shape
        resized.append(invert(pv, luts[bname]))
    case["expected"] = save_stacked_png([decoded] + resized, f"{i:03d}.png")
    manifest["cases"].append(case)
    print(f"{stem:<34} {file_format:<5} {file_mode:<5} {w}x{h} -> {tw}x{th} {opts}")

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")
total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(OUT) for n in ns)
print(f"wrote {len(manifest['cases'])} cases to {OUT}: {total / 1e6:.2f} MB")
