#!/usr/bin/env python3
"""Generate crates/blip/tests/fixtures/images/: inputs and transformers' expected outputs for the
image-processor parity tests (crates/blip/tests/image_parity.rs).

Run by hand, never by CI, from the repository root, in the pinned environment made once with
`python3.11 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt`:
    .venv/bin/python scripts/make_image_fixtures.py

Pinned (asserted below): transformers 5.24.0, torchvision 0.29.2, torch 2.15.0, Pillow 13.0.0,
numpy 2.4.6, safetensors 0.8.0, scikit-image 0.26.0 (source photos only).

torchvision must be importable: without it transformers 5 silently gives the PIL backend to
`BlipImageProcessor`, and every "torchvision" expectation would be PIL's.

What is stored, and why it is lossless:
* Expected decodes (transformers `load_image` + the processor's `convert_to_rgb`) as 8-bit RGB PNGs.
* pixel_values: transformers' pixel_values[c, y, x] depend only on (c, resized uint8 value); this
  script asserts pixel_values == LUT[c][resized] exactly (LUT = transformers' own output on an
  image holding every level), then stores the resized uint8 image (PNG) and the LUT
  (luts.safetensors, f32 straight from transformers). The Rust test rebuilds transformers' f32
  tensor from them and compares f32 bits.
* A resize sweep (resize_sweep.safetensors): random small images resized to many sizes by
  torchvision `resize(BICUBIC, antialias=True)` on uint8 (exactly as transformers calls it) and by
  `PIL.Image.resize(BICUBIC)`.
"""

import io
import json
import struct
import zlib
import os
import shutil
import sys

import numpy as np
import PIL
import safetensors
import skimage
import torch
import transformers
from PIL import Image

try:
    import torchvision  # noqa: F401  (transformers 5 needs it for the torchvision backend)
    from torchvision.transforms.v2 import functional as tvF
except ImportError as e:  # pragma: no cover
    sys.exit(f"torchvision is required (transformers would silently fall back to PIL): {e}")

from safetensors.numpy import save_file
from transformers import BlipImageProcessor, BlipImageProcessorPil
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

EXPECTED_VERSIONS = {
    "transformers": (transformers.__version__, "5.24.0"),
    "torchvision": (torchvision.__version__.split("+")[0], "0.29.2"),
    "torch": (torch.__version__.split("+")[0], "2.15.0"),
    "Pillow": (PIL.__version__, "13.0.0"),
    "numpy": (np.__version__, "2.4.6"),
    "safetensors": (safetensors.__version__, "0.8.0"),
}
for name, (got, want) in EXPECTED_VERSIONS.items():
    assert got == want, f"{name} {got} != pinned {want}"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "blip", "tests", "fixtures", "images")
INP = os.path.join(OUT, "inputs")
EXP = os.path.join(OUT, "expected")
HUB = os.path.join(ROOT, "crates", "blip", "tests", "fixtures", "hub-configs")
SKDATA = os.path.join(os.path.dirname(skimage.__file__), "data")

shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(INP)
os.makedirs(EXP)

TV = BlipImageProcessor.from_pretrained(os.path.join(HUB, "blip-image-captioning-large"))
PILP = BlipImageProcessorPil.from_pretrained(os.path.join(HUB, "blip-image-captioning-large"))
assert TV.backend == "torchvision", TV.backend
assert PILP.backend == "pil", PILP.backend
assert type(TV).__name__ == "BlipImageProcessor" and type(PILP).__name__ == "BlipImageProcessorPil"
print("cpu capability:", torch.backends.cpu.get_cpu_capability())

manifest = {
    "versions": {k: v[0] for k, v in EXPECTED_VERSIONS.items()},
    # torch's uint8 antialiased kernels: the AVX2 build runs UpSampleKernelAVXAntialias.h.
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "decode": [],
    "errors": [],
    "pixel_values": [],
}


def rel(path):
    return os.path.relpath(path, OUT)


def processor_view(path):
    """What transformers' BLIP processor resizes: load_image + its RGB step (do_convert_rgb)."""
    im = load_image(path)
    return np.asarray(convert_to_rgb(im, return_numpy=True), dtype=np.uint8)


def save_png(arr, name):
    path = os.path.join(EXP, name)
    Image.fromarray(arr, "RGB").save(path, optimize=True)
    back = np.asarray(Image.open(path))
    assert back.dtype == np.uint8 and (back == arr).all()
    return path


def add_decode(path, note, expected=None):
    """A decode case; `expected` overrides transformers' view (documented deviations only)."""
    got = processor_view(path)
    if expected is not None:
        exp = expected
    else:
        exp = got
    stem = os.path.basename(path).replace(".", "_")
    e = save_png(exp, f"decode_{stem}.png")
    manifest["decode"].append({"input": rel(path), "expected": rel(e), "note": note})
    return got


# ---------------------------------------------------------------- decode inputs
rng = np.random.default_rng(1234)
chelsea = Image.open(os.path.join(SKDATA, "chelsea.png")).convert("RGB")
# An odd-sized natural crop (MCU edges in both directions for 4:2:0).
base = chelsea.crop((150, 40, 150 + 121, 40 + 91))
base_arr = np.asarray(base)


def inp(name):
    return os.path.join(INP, name)


# JPEG variants (PIL writes with libjpeg-turbo too).
base.save(inp("jpeg_420.jpg"), quality=90, subsampling="4:2:0")
add_decode(inp("jpeg_420.jpg"), "JPEG 4:2:0 (fancy upsampling)")
base.save(inp("jpeg_422.jpg"), quality=90, subsampling="4:2:2")
add_decode(inp("jpeg_422.jpg"), "JPEG 4:2:2")
base.save(inp("jpeg_444.jpg"), quality=95, subsampling="4:4:4")
add_decode(inp("jpeg_444.jpg"), "JPEG 4:4:4")
base.save(inp("jpeg_progressive.jpg"), quality=85, progressive=True)
add_decode(inp("jpeg_progressive.jpg"), "progressive JPEG")
base.convert("L").save(inp("jpeg_gray.jpg"), quality=90)
assert Image.open(inp("jpeg_gray.jpg")).mode == "L"
add_decode(inp("jpeg_gray.jpg"), "grayscale JPEG, replicated")
base.convert("CMYK").save(inp("jpeg_cmyk.jpg"), quality=90)
assert Image.open(inp("jpeg_cmyk.jpg")).mode == "CMYK"
add_decode(inp("jpeg_cmyk.jpg"), "Adobe CMYK JPEG (inverted CMYK, PIL cmyk2rgb)")
# Orientations 2..8, each through EXIF (non-square so rotations change the shape).
small = base.crop((0, 0, 40, 30))
for o in range(1, 9):
    exif = Image.Exif()
    exif[0x0112] = o
    small.save(inp(f"jpeg_exif{o}.jpg"), quality=92, exif=exif.tobytes())
    got = add_decode(inp(f"jpeg_exif{o}.jpg"), f"JPEG with EXIF orientation {o}")
    if o in (5, 6, 7, 8):
        assert got.shape[:2] == (40, 30), got.shape
# Orientation only in XMP (PIL's fallback when EXIF has none).
xmp = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)
small.save(inp("jpeg_xmp6.jpg"), quality=92, xmp=xmp)
assert Image.open(inp("jpeg_xmp6.jpg")).info.get("xmp")
got = add_decode(inp("jpeg_xmp6.jpg"), "JPEG with XMP tiff:Orientation=6 and no EXIF")
assert got.shape[:2] == (40, 30)
# Trailing garbage after EOI and a "Corrupt JPEG data" warning are fine for PIL.
raw = open(inp("jpeg_420.jpg"), "rb").read()
open(inp("jpeg_trailing_garbage.jpg"), "wb").write(raw + b"not jpeg data" * 20)
add_decode(inp("jpeg_trailing_garbage.jpg"), "JPEG followed by garbage")

# PNG variants.
base.save(inp("png_rgb.png"))
add_decode(inp("png_rgb.png"), "PNG RGB")
rgba = np.dstack([base_arr, rng.integers(0, 256, base_arr.shape[:2], dtype=np.uint8)])
Image.fromarray(rgba, "RGBA").save(inp("png_rgba.png"))
got = add_decode(inp("png_rgba.png"), "PNG RGBA: alpha dropped, not composited")
assert (got == base_arr).all()
base.convert("L").save(inp("png_gray.png"))
add_decode(inp("png_gray.png"), "PNG gray")
la = np.dstack([np.asarray(base.convert("L")), rng.integers(0, 256, base_arr.shape[:2], dtype=np.uint8)])
Image.fromarray(la, "LA").save(inp("png_la.png"))
add_decode(inp("png_la.png"), "PNG gray+alpha")
base.quantize(64).save(inp("png_palette.png"))
assert Image.open(inp("png_palette.png")).mode == "P"
add_decode(inp("png_palette.png"), "PNG palette")
pal = base.quantize(16)
pal.save(inp("png_palette_trns.png"), transparency=5)
assert Image.open(inp("png_palette_trns.png")).info.get("transparency") == 5
got = add_decode(inp("png_palette_trns.png"), "PNG palette with one transparent index: that colour turns white")
assert (got == 255).all(-1).sum() > 0
pal.save(inp("png_palette_alpha.png"), transparency=bytes([255, 0, 128] + [255] * 13))
add_decode(inp("png_palette_alpha.png"), "PNG palette with partial alpha: alpha ignored")
q = (base_arr // 64 * 64).astype(np.uint8)
Image.fromarray(q).save(inp("png_rgb_trns.png"), transparency=(128, 64, 0))
got = add_decode(inp("png_rgb_trns.png"), "PNG RGB with tRNS colour key: that colour turns white")
keyed = (q == [128, 64, 0]).all(-1)
assert keyed.any() and (got[keyed] == 255).all() and (got[~keyed] == q[~keyed]).all()
Image.fromarray(np.asarray(base.convert("L")) // 32 * 32, "L").save(inp("png_gray_trns.png"), transparency=96)
add_decode(inp("png_gray_trns.png"), "PNG gray with tRNS level: that level turns white")
exif = Image.Exif()
exif[0x0112] = 6
small.save(inp("png_exif6.png"), exif=exif.tobytes())
got = add_decode(inp("png_exif6.png"), "PNG with eXIf orientation 6")
assert got.shape[:2] == (40, 30)
from PIL.PngImagePlugin import PngInfo

info = PngInfo()
info.add_itxt("XML:com.adobe.xmp", xmp.decode().replace('"6"', '"8"'))
small.save(inp("png_xmp8.png"), pnginfo=info)
got = add_decode(inp("png_xmp8.png"), "PNG with XMP tiff:Orientation=8 (iTXt) and no eXIf")
assert got.shape[:2] == (40, 30)
exif3 = Image.Exif()
exif3[0x0112] = 3
small.save(inp("webp_exif3.webp"), lossless=True, exif=exif3.tobytes())
add_decode(inp("webp_exif3.webp"), "WebP with EXIF orientation 3")
small.save(inp("tiff_orient6.tif"), tiffinfo={274: 6})
got = add_decode(inp("tiff_orient6.tif"), "TIFF with Orientation tag 6")
assert got.shape[:2] == (40, 30)
# 16-bit: PIL keeps the high byte of RGB;16 (matched) but clips I;16 gray at 255 (deviation).
g16 = (np.asarray(base.convert("L")).astype(np.uint32) * 257 + rng.integers(-100, 100, base_arr.shape[:2])).clip(0, 65535).astype(np.uint16)
Image.fromarray(g16).save(inp("png_gray16.png"))
assert Image.open(inp("png_gray16.png")).mode == "I;16"
scaled = ((g16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
assert (scaled == np.round(g16 / 257.0)).all()
pil16 = processor_view(inp("png_gray16.png"))
assert (pil16 == np.minimum(g16, 255)[..., None].astype(np.uint8)).all(), "PIL no longer clips I;16"
add_decode(inp("png_gray16.png"), "16-bit gray PNG: DEVIATION, round(v/257) instead of PIL's clip at 255",
           expected=np.repeat(scaled[..., None], 3, axis=2))
rgb16 = (base_arr.astype(np.uint32) * 257 + rng.integers(-200, 200, base_arr.shape)).clip(0, 65535).astype(">u2")
# Pillow cannot write 48-bit PNGs; write one by hand.

def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


h, w = rgb16.shape[:2]
rows = b"".join(b"\0" + rgb16[y].tobytes() for y in range(h))
png48 = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
         + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))
open(inp("png_rgb16.png"), "wb").write(png48)
got = add_decode(inp("png_rgb16.png"), "16-bit RGB PNG: high byte, as PIL")
assert (got == (rgb16.astype(np.uint16) >> 8).astype(np.uint8)).all()
# 16-bit RGB with a tRNS key: PIL compares the raw 16-bit key with the 8-bit (high byte) pixels.
rgb16k = rgb16.copy()
rgb16k[::3, ::4] = [5, 100, 255]  # high bytes 0, 0, 0
rows = b"".join(b"\0" + rgb16k[y].tobytes() for y in range(h))
png48 = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
         + png_chunk(b"tRNS", struct.pack(">HHH", 0, 0, 0))
         + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))
open(inp("png_rgb16_trns.png"), "wb").write(png48)
got = add_decode(inp("png_rgb16_trns.png"), "16-bit RGB PNG with tRNS (0,0,0): pixels whose high bytes are 0 turn white")
assert (got == 255).all(-1).sum() >= rgb16k[::3, ::4].shape[0] * rgb16k[::3, ::4].shape[1]
bw = base.convert("1")
bw.save(inp("png_1bit_trns0.png"), transparency=0)
got = add_decode(inp("png_1bit_trns0.png"), "1-bit PNG with tRNS 0: black turns white")
assert (got == 255).all()

# GIF, BMP, TIFF, WebP.
base.quantize(128).save(inp("gif_palette.gif"))
add_decode(inp("gif_palette.gif"), "GIF palette")
pal.save(inp("gif_trns.gif"), transparency=5)
got = add_decode(inp("gif_trns.gif"), "GIF with transparency index: that colour turns white")
assert (got == 255).all(-1).sum() > 0


def gif_with_offset_frame(src, dst, screen, offset):
    """Enlarge the logical screen and move the (single) frame: PIL fills the rest of the first
    frame with the transparency index, else index 0."""
    b = bytearray(open(src, "rb").read())
    b[6:10] = struct.pack("<HH", *screen)
    pos = 13 + (3 << ((b[10] & 7) + 1) if b[10] & 0x80 else 0)
    while b[pos] == 0x21:
        pos += 2
        while b[pos]:
            pos += 1 + b[pos]
        pos += 1
    assert b[pos] == 0x2C
    b[pos + 1:pos + 5] = struct.pack("<HH", *offset)
    open(dst, "wb").write(bytes(b))


gif_with_offset_frame(inp("gif_palette.gif"), inp("gif_small_frame.gif"), (130, 100), (5, 4))
got = add_decode(inp("gif_small_frame.gif"), "GIF whose frame is smaller than the screen: rest is palette[0]")
assert got.shape[:2] == (100, 130)
gif_with_offset_frame(inp("gif_trns.gif"), inp("gif_small_frame_trns.gif"), (127, 95), (3, 2))
got = add_decode(inp("gif_small_frame_trns.gif"), "same with a transparency index: the rest turns white")
assert (got[:2] == 255).all()
shutil.copy(os.path.join(SKDATA, "no_time_for_that_tiny.gif"), inp("gif_animated_skimage.gif"))
add_decode(inp("gif_animated_skimage.gif"), "animated GIF (scikit-image), first frame")
base.save(inp("bmp_rgb.bmp"))
add_decode(inp("bmp_rgb.bmp"), "BMP 24-bit")
base.save(inp("tiff_rgb.tif"))
add_decode(inp("tiff_rgb.tif"), "TIFF RGB uncompressed")
base.save(inp("tiff_lzw.tif"), compression="tiff_lzw")
add_decode(inp("tiff_lzw.tif"), "TIFF RGB LZW")
base.save(inp("webp_lossless.webp"), lossless=True)
add_decode(inp("webp_lossless.webp"), "WebP lossless")
base.save(inp("webp_lossy.webp"), quality=80)
add_decode(inp("webp_lossy.webp"), "WebP lossy")
Image.fromarray(rgba, "RGBA").save(inp("webp_lossy_alpha.webp"), quality=80)
add_decode(inp("webp_lossy_alpha.webp"), "WebP lossy with alpha: alpha dropped")
# Format from content, not extension.
shutil.copy(inp("png_rgb.png"), inp("png_named_as.jpg"))
add_decode(inp("png_named_as.jpg"), "PNG file with a .jpg name")

# A real-size JPEG decode (and the 384 pixel values below).
shutil.copy(os.path.join(SKDATA, "rocket.jpg"), inp("rocket.jpg"))
add_decode(inp("rocket.jpg"), "scikit-image rocket.jpg, 640x427 4:2:0 JPEG, full size")

# ---------------------------------------------------------------- errors (PIL raises on all)
def add_error(name, data, note):
    path = inp(name)
    if data is not None:
        open(path, "wb").write(data)
    try:
        load_image(path)
    except Exception as e:  # noqa: BLE001
        manifest["errors"].append({"input": rel(path), "note": note, "pil_error": f"{type(e).__name__}: {e}".replace(ROOT + os.sep, "")})
        return
    raise AssertionError(f"PIL decoded {name}")


rocket = open(inp("rocket.jpg"), "rb").read()
add_error("truncated.jpg", rocket[: len(rocket) // 2], "JPEG cut in half")
add_error("truncated_no_eoi.jpg", rocket[:-2], "JPEG without its EOI marker")
add_error("truncated_header.jpg", rocket[:300], "JPEG cut inside the header")
pngb = open(inp("png_rgb.png"), "rb").read()
add_error("truncated.png", pngb[: len(pngb) // 2], "PNG cut in half")
add_error("text.jpg", b"this is a text file, not a JPEG\n" * 4, "text file named .jpg")
add_error("empty.jpg", b"", "empty file")
manifest["errors"].append({"input": "inputs/does_not_exist.jpg", "note": "missing file", "pil_error": "FileNotFoundError"})

# ---------------------------------------------------------------- pixel values
# LUTs straight from transformers: an image holding all 256 levels in every channel, not resized.
levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
lut_img = Image.fromarray(np.dstack([levels, levels[::-1], levels.T]), "RGB")


def lut_from(proc):
    pv = proc(images=[lut_img], return_tensors="np")["pixel_values"][0]
    assert pv.dtype == np.float32 and pv.shape == (3, 16, 16), pv.shape
    src = np.asarray(lut_img)
    lut = np.zeros((3, 256), np.float32)
    for c in range(3):
        lut[c, src[..., c].reshape(-1)] = pv[c].reshape(-1)
    return lut


luts = {}
variants = {
    "default": {},
    "rescale_only": {"do_normalize": False},
    "normalize_only": {"do_rescale": False},
    "neither": {"do_rescale": False, "do_normalize": False},
    "odd_factor": {"rescale_factor": 0.003, "image_mean": [0.5, 0.25, 0.125], "image_std": [0.3, 0.2, 0.1]},
}
for vname, extra in variants.items():
    for bname, cls in (("torchvision", BlipImageProcessor), ("pil", BlipImageProcessorPil)):
        proc = cls(do_resize=False, **extra)
        assert proc.backend == bname
        if vname == "neither":
            pv = proc(images=[lut_img], return_tensors="np")["pixel_values"][0]
            assert (pv.astype(np.float32) == np.moveaxis(np.asarray(lut_img), -1, 0)).all()
        luts[f"{vname}/{bname}"] = lut_from(proc) if vname != "neither" else np.tile(np.arange(256, dtype=np.float32), (3, 1))
manifest["lut_variants"] = {k: v for k, v in variants.items()}
save_file(luts, os.path.join(OUT, "luts.safetensors"))


def invert(pv, lut):
    """pixel_values -> uint8 levels, asserting pv == lut[level] exactly."""
    out = np.zeros(pv.shape[1:] + (3,), np.uint8)
    for c in range(3):
        order = np.argsort(lut[c])
        idx = np.searchsorted(lut[c][order], pv[c])
        idx = np.clip(idx, 0, 255)
        lv = order[idx]
        assert (lut[c][lv] == pv[c]).all(), "pixel_values are not a per-level function"
        out[..., c] = lv
    return out


astro = Image.open(os.path.join(SKDATA, "astronaut.png")).convert("RGB").crop((100, 20, 100 + 301, 20 + 257))
astro.save(inp("astronaut_crop.png"))
shutil.copy(os.path.join(SKDATA, "chelsea.png"), inp("chelsea.png"))
photos = [
    ("chelsea.png", "451x300 PNG: width down, height up"),
    ("astronaut_crop.png", "301x257 crop of astronaut.png: both up"),
    ("rocket.jpg", "640x427 JPEG: both down"),
]
base_proc = BlipImageProcessor.from_pretrained(os.path.join(HUB, "blip-image-captioning-base"))
assert base_proc.backend == "torchvision"
batch_imgs = []
for name, note in photos:
    path = inp(name)
    im = load_image(path)
    batch_imgs.append(im)
    entry = {"input": rel(path), "note": note}
    for bname, proc in (("torchvision", TV), ("pil", PILP)):
        pv = proc(images=[im], return_tensors="np")["pixel_values"][0]
        assert pv.shape == (3, 384, 384) and pv.dtype == np.float32
        if bname == "torchvision":
            pv_base = base_proc(images=[im], return_tensors="np")["pixel_values"][0]
            assert (pv_base == pv).all(), "captioning-base config (size: 384) differs"
        resized = invert(pv, luts[f"default/{bname}"])
        e = save_png(resized, f"pv384_{bname}_{name.replace('.', '_')}.png")
        entry[bname] = rel(e)
    tv = np.asarray(Image.open(os.path.join(OUT, entry["torchvision"])))
    pl = np.asarray(Image.open(os.path.join(OUT, entry["pil"])))
    entry["backend_differing_values"] = int((tv != pl).sum())
    print(name, "torchvision vs PIL differ on", entry["backend_differing_values"], "of", tv.size, "values")
    manifest["pixel_values"].append(entry)

# Batched call gives the same values as single calls.
pv_batch = TV(images=batch_imgs, return_tensors="np")["pixel_values"]
for i, im in enumerate(batch_imgs):
    assert (pv_batch[i] == TV(images=[im], return_tensors="np")["pixel_values"][0]).all()

# ---------------------------------------------------------------- resize sweep
sizes = [
    ((31, 47), (64, 64)), ((64, 64), (31, 47)), ((7, 5), (60, 41)), ((60, 41), (7, 5)), ((100, 3), (3, 100)),
    ((1, 1), (9, 13)), ((9, 13), (1, 2)), ((2, 50), (2, 17)), ((50, 2), (17, 2)), ((37, 53), (37, 20)),
    ((37, 53), (90, 53)), ((45, 45), (44, 46)), ((40, 30), (41, 29)), ((17, 19), (51, 57)), ((128, 96), (32, 24)),
    ((127, 97), (33, 23)), ((96, 128), (24, 32)), ((23, 29), (384 // 8, 384 // 8)), ((200, 150), (48, 48)),
    ((150, 200), (48, 48)), ((11, 250), (19, 7)), ((250, 11), (7, 19)), ((64, 48), (96, 72)), ((33, 66), (99, 22)),
    # Pillow 13 runs the vertical pass first iff (in_h - out_h) > 0 and > 2 * (in_w - out_w).
    ((60, 60), (40, 50)), ((61, 60), (40, 50)), ((100, 100), (10, 90)), ((64, 64), (31, 47)), ((150, 226), (192, 192)),
]
sweep = {}
for i, ((ih, iw), (oh, ow)) in enumerate(sizes):
    if i % 3 == 0:
        a = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)  # noise: worst case for rounding
    else:
        yy, xx = np.mgrid[0:ih, 0:iw]
        a = np.dstack([(yy * 255 // max(ih - 1, 1)), (xx * 255 // max(iw - 1, 1)), ((xx * yy) % 256)]).astype(np.uint8)
        a = np.where(rng.random(a.shape) < 0.1, 255 - a, a).astype(np.uint8)
    t = torch.from_numpy(a).permute(2, 0, 1).contiguous()[None]
    tv = tvF.resize(t, [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)[0].permute(1, 2, 0).numpy()
    pl = np.asarray(Image.fromarray(a).resize((ow, oh), Image.Resampling.BICUBIC))
    sweep[f"{i:02d}/input"] = a
    sweep[f"{i:02d}/torchvision"] = np.ascontiguousarray(tv)
    sweep[f"{i:02d}/pil"] = pl
save_file(sweep, os.path.join(OUT, "resize_sweep.safetensors"))
manifest["resize_sweep_cases"] = len(sizes)

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")

total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(OUT) for n in ns)
print(f"wrote {OUT}: {total / 1e6:.2f} MB")
