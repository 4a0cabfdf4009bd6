//! Image files to BLIP `pixel_values`, bit-identical to transformers 5.24.
//!
//! The pipeline is the one a transformers user runs: `load_image(path)` (PIL decode, EXIF
//! orientation, RGB) followed by the BLIP image processor (resize to 384x384 bicubic, rescale,
//! normalize, CHW f32). Both of transformers' processor backends are reproduced to the bit:
//!
//! * [`ResizeBackend::Torchvision`], transformers 5's default `BlipImageProcessor`: torchvision
//!   `resize(BICUBIC, antialias=True)` on the uint8 tensor (torch's fixed-point uint8 kernel), then
//!   `(x - 255*mean) / (255*std)` in f32.
//! * [`ResizeBackend::Pil`], transformers 4 and 5's `BlipImageProcessorPil`: `PIL.Image.resize`
//!   (BICUBIC) on uint8, then `x * (1/255)` in f64 rounded to f32, then `(x - mean) / std` in f32.
//!
//! The two resizers differ by one level on a fraction of a percent of the pixels, which is enough
//! to change a caption, hence both.

use std::io::Cursor;
use std::path::Path;

use ::image::{DynamicImage, ImageDecoder, RgbImage};
use serde_json::Value;

use crate::error::{Error, Result};

/// OpenAI CLIP mean, transformers' `OPENAI_CLIP_MEAN` (BLIP's default).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP std, transformers' `OPENAI_CLIP_STD` (BLIP's default).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// PIL refuses images above twice its `MAX_IMAGE_PIXELS` (89,478,485) as decompression bombs; so
/// do we, before allocating anything.
const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Which resampling (and normalization arithmetic) transformers uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeBackend {
    /// transformers 5 default (`BlipImageProcessor`, needs torchvision installed): torchvision
    /// `resize(BICUBIC, antialias=True)` on the uint8 tensor, normalization fused as
    /// `(x - 255*mean) / (255*std)` in f32.
    #[default]
    Torchvision,
    /// transformers 4, or 5's `BlipImageProcessorPil` (what 5 silently uses without torchvision):
    /// `PIL.Image.resize(BICUBIC)` on uint8, `x*(1/255)` in f64 then f32, `(x-mean)/std` in f32.
    Pil,
}

/// `preprocessor_config.json` as the BLIP processor reads it, with transformers' defaults for
/// missing keys.
///
/// Keys the BLIP processor ignores or that cannot change its output here (`do_pad`, `size_divisor`,
/// `image_processor_type`, ...) are ignored. `do_pad` pads a batch to its largest image, a no-op
/// when every image is resized to the same size.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Output height in pixels (`size.height`, 384 for every public BLIP checkpoint).
    pub height: usize,
    /// Output width in pixels (`size.width`).
    pub width: usize,
    /// Resize to `height` x `width` (bicubic, aspect ratio not kept).
    pub do_resize: bool,
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// 1/255 by default.
    pub rescale_factor: f64,
    /// Subtract `image_mean` and divide by `image_std`, per channel.
    pub do_normalize: bool,
    /// Per-channel mean (RGB), after rescaling.
    pub image_mean: [f64; 3],
    /// Per-channel std (RGB), after rescaling.
    pub image_std: [f64; 3],
    /// Whose resize and arithmetic to reproduce.
    pub backend: ResizeBackend,
}

impl Default for ImageProcessor {
    fn default() -> Self {
        Self {
            height: 384,
            width: 384,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            backend: ResizeBackend::Torchvision,
        }
    }
}

impl ImageProcessor {
    /// Reads a `preprocessor_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| Error::config(path, format!("cannot read preprocessor config: {e}")))?;
        Self::from_json_str(&json, path)
    }

    /// Parses the text of a `preprocessor_config.json`; `path` only names it in errors.
    ///
    /// `size` may be an int (a square, as transformers' `default_to_square=True` makes it),
    /// `{"height": h, "width": w}`, or `{"shortest_edge": s}` (read as an s x s square, as the
    /// project decided; transformers itself would keep the aspect ratio there). `resample` must be
    /// 3 (bicubic), the only filter implemented. `image_mean`/`image_std` may be a list of three
    /// numbers or one number for all channels.
    pub fn from_json_str(json: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object at the top level"))?;
        let bad = |key: &str, why: &str| Error::config(path, format!("`{key}`: {why}"));
        let get_bool = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(key, &format!("expected true or false, got {other}"))),
            }
        };
        let get_triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => {
                    let v = n.as_f64().ok_or_else(|| bad(key, "not a finite number"))?;
                    Ok([v; 3])
                }
                Some(Value::Array(items)) if items.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (slot, item) in out.iter_mut().zip(items) {
                        *slot = item
                            .as_f64()
                            .ok_or_else(|| bad(key, &format!("expected numbers, got {item}")))?;
                    }
                    Ok(out)
                }
                Some(other) => Err(bad(
                    key,
                    &format!("expected a list of 3 numbers (RGB), got {other}"),
                )),
            }
        };

        let mut p = Self::default();
        if let Some(size) = obj.get("size").filter(|v| !v.is_null()) {
            let dim = |v: &Value, what: &str| -> Result<usize> {
                v.as_u64()
                    .filter(|&n| n > 0 && n <= 1 << 16)
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        bad(
                            "size",
                            &format!("{what} must be a positive integer, got {v}"),
                        )
                    })
            };
            match size {
                Value::Number(_) => {
                    let s = dim(size, "size")?;
                    (p.height, p.width) = (s, s);
                }
                Value::Object(m) => {
                    if let (Some(h), Some(w)) = (m.get("height"), m.get("width")) {
                        p.height = dim(h, "height")?;
                        p.width = dim(w, "width")?;
                    } else if let Some(s) = m.get("shortest_edge") {
                        let s = dim(s, "shortest_edge")?;
                        (p.height, p.width) = (s, s);
                    } else {
                        return Err(bad(
                            "size",
                            &format!("expected {{\"height\", \"width\"}} or {{\"shortest_edge\"}}, got {size}"),
                        ));
                    }
                }
                other => {
                    return Err(bad(
                        "size",
                        &format!("expected an integer or an object, got {other}"),
                    ))
                }
            }
        }
        p.do_resize = get_bool("do_resize", true)?;
        p.do_rescale = get_bool("do_rescale", true)?;
        p.do_normalize = get_bool("do_normalize", true)?;
        // Always true in practice; images here are RGB already (see `load_image`).
        get_bool("do_convert_rgb", true)?;
        if let Some(v) = obj.get("rescale_factor").filter(|v| !v.is_null()) {
            p.rescale_factor = v
                .as_f64()
                .filter(|f| f.is_finite() && *f != 0.0)
                .ok_or_else(|| {
                    bad(
                        "rescale_factor",
                        &format!("expected a nonzero number, got {v}"),
                    )
                })?;
        }
        p.image_mean = get_triple("image_mean", OPENAI_CLIP_MEAN)?;
        p.image_std = get_triple("image_std", OPENAI_CLIP_STD)?;
        if p.image_std.contains(&0.0) {
            return Err(bad("image_std", "a zero std divides by zero"));
        }
        if let Some(v) = obj.get("resample").filter(|v| !v.is_null()) {
            match v.as_u64() {
                Some(3) => {}
                Some(0..=5) => {
                    return Err(bad(
                        "resample",
                        &format!("only 3 (bicubic, BLIP's filter) is implemented, got {v}"),
                    ))
                }
                _ => {
                    return Err(bad(
                        "resample",
                        &format!("expected a PIL filter number 0-5, got {v}"),
                    ))
                }
            }
        }
        Ok(p)
    }

    /// Chooses whose resize and arithmetic to reproduce.
    pub fn with_backend(mut self, backend: ResizeBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Size of one preprocessed image as `(height, width)`: the configured size when resizing,
    /// else the image's own.
    fn output_size(&self, image: &RgbImage) -> (usize, usize) {
        if self.do_resize {
            (self.height, self.width)
        } else {
            (image.height() as usize, image.width() as usize)
        }
    }

    /// One image to CHW f32 values, exactly transformers' `pixel_values[i]` for the same RGB image.
    pub fn preprocess(&self, image: &RgbImage) -> Vec<f32> {
        let (h, w) = self.output_size(image);
        let mut out = vec![0f32; 3 * h * w];
        self.preprocess_into(image, &mut out);
        out
    }

    /// Several images to a `[N, 3, H, W]` f32 tensor on `device`.
    pub fn preprocess_batch(
        &self,
        images: &[RgbImage],
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let first = images
            .first()
            .ok_or_else(|| Error::InvalidInput("no images to preprocess".into()))?;
        let (h, w) = self.output_size(first);
        if let Some(odd) = images.iter().find(|im| self.output_size(im) != (h, w)) {
            return Err(Error::InvalidInput(format!(
                "images of different sizes ({}x{} and {}x{}) cannot be batched without resizing",
                first.width(),
                first.height(),
                odd.width(),
                odd.height()
            )));
        }
        let per = 3 * h * w;
        let mut data = vec![0f32; per * images.len()];
        for (image, out) in images.iter().zip(data.chunks_exact_mut(per)) {
            self.preprocess_into(image, out);
        }
        Ok(candle_core::Tensor::from_vec(
            data,
            (images.len(), 3, h, w),
            device,
        )?)
    }

    fn preprocess_into(&self, image: &RgbImage, out: &mut [f32]) {
        let resized;
        let src = if self.do_resize
            && (image.height() as usize, image.width() as usize) != (self.height, self.width)
        {
            resized = match self.backend {
                ResizeBackend::Torchvision => resize_torchvision(image, self.height, self.width),
                ResizeBackend::Pil => resize_pil(image, self.height, self.width),
            };
            &resized
        } else {
            image
        };
        let lut = self.value_table();
        let plane = src.width() as usize * src.height() as usize;
        debug_assert_eq!(out.len(), 3 * plane);
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in src.as_raw().chunks_exact(3).enumerate() {
            r[i] = lut[0][px[0] as usize];
            g[i] = lut[1][px[1] as usize];
            b[i] = lut[2][px[2] as usize];
        }
    }

    /// The output value of every (channel, uint8 level): the arithmetic depends on nothing else,
    /// so a 3x256 table computed with transformers' exact operations gives its exact bits.
    fn value_table(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, row) in lut.iter_mut().enumerate() {
            for (level, slot) in row.iter_mut().enumerate() {
                *slot = self.value(c, level as u8);
            }
        }
        lut
    }

    fn value(&self, c: usize, level: u8) -> f32 {
        let x = level as f32;
        match self.backend {
            // transformers `TorchvisionBackend.rescale_and_normalize`: with both steps on, mean and
            // std become `torch.tensor(mean) * (1.0 / rescale_factor)`, a float32 tensor times a
            // Python float (cast to float32), then `tvF.normalize`: `(x - mean) / std` in f32.
            ResizeBackend::Torchvision => {
                if self.do_normalize {
                    let (mut mean, mut std) = (self.image_mean[c] as f32, self.image_std[c] as f32);
                    if self.do_rescale {
                        let inv = (1.0 / self.rescale_factor) as f32;
                        mean *= inv;
                        std *= inv;
                    }
                    (x - mean) / std
                } else if self.do_rescale {
                    // uint8 tensor * Python float: f32 product with the scalar cast to f32.
                    x * self.rescale_factor as f32
                } else {
                    x
                }
            }
            // transformers `image_transforms.rescale` (f64 product, then f32) and `normalize`
            // (numpy f32 arrays: (x - mean) / std with mean/std as float32).
            ResizeBackend::Pil => {
                let v = if self.do_rescale {
                    (level as f64 * self.rescale_factor) as f32
                } else {
                    x
                };
                if self.do_normalize {
                    (v - self.image_mean[c] as f32) / self.image_std[c] as f32
                } else {
                    v
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resampling
// ---------------------------------------------------------------------------------------------

/// Fixed-point resampling weights for one axis: output `i` reads `len[i]` inputs from `start[i]`
/// with weights `k[i*ksize..][..len[i]]`, a sum rounded by `+ 2^(prec-1)`, shifted by `prec` and
/// clamped to 0..=255 (both PIL and torch's uint8 kernels work this way).
struct AxisKernel {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    k: Vec<i32>,
    prec: u32,
}

/// PIL's `bicubic_filter` (libImaging/Resample.c), a = -0.5.
fn pil_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// torch's `HelperInterpCubic::aa_filter` (UpSampleKernel.cpp) with `cubic_convolution1/2`
/// (UpSample.h), A = -0.5: the same cubic as PIL's, written in another order.
fn torch_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Normalized f64 weights as both libraries compute them (PIL `precompute_coeffs`, torch
/// `_compute_indices_min_size_weights_aa`): antialiased support `2 * max(scale, 1)`, centre
/// `(i + 0.5) * scale`, taps from `trunc(centre - support + 0.5)` to `trunc(centre + support + 0.5)`.
fn float_weights(
    in_size: usize,
    out_size: usize,
    filter: fn(f64) -> f64,
) -> (Vec<usize>, Vec<usize>, usize, Vec<f64>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut k = vec![0f64; out_size * ksize];
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let row = &mut k[i * ksize..][..ksize];
        let mut total = 0.0;
        for (j, w) in row[..n].iter_mut().enumerate() {
            *w = filter(((j as i64 + xmin) as f64 - center + 0.5) * inv);
            total += *w;
        }
        if total != 0.0 {
            for w in &mut row[..n] {
                *w /= total;
            }
        }
        start.push(xmin as usize);
        len.push(n);
    }
    (start, len, ksize, k)
}

/// `(int)(±0.5 + w * 2^prec)`, the rounding both libraries use.
fn to_fixed(w: f64, prec: u32) -> i32 {
    let v = w * (1u32 << prec) as f64;
    if v < 0.0 {
        (-0.5 + v) as i32
    } else {
        (0.5 + v) as i32
    }
}

/// PIL: 22 fractional bits (`PRECISION_BITS = 32 - 8 - 2`) for every axis.
fn pil_kernel(in_size: usize, out_size: usize) -> AxisKernel {
    const PRECISION_BITS: u32 = 22;
    let (start, len, ksize, kf) = float_weights(in_size, out_size, pil_bicubic);
    let k = kf.iter().map(|&w| to_fixed(w, PRECISION_BITS)).collect();
    AxisKernel {
        start,
        len,
        ksize,
        k,
        prec: PRECISION_BITS,
    }
}

/// torch (`_compute_index_ranges_int16_weights`): int16 weights with the most fractional bits
/// (at most 22) for which the largest weight of the axis still rounds below 2^15.
fn torch_kernel(in_size: usize, out_size: usize) -> AxisKernel {
    let (start, len, ksize, kf) = float_weights(in_size, out_size, torch_bicubic);
    let mut wt_max = 0f64;
    for (i, &n) in len.iter().enumerate() {
        for &w in &kf[i * ksize..][..n] {
            wt_max = wt_max.max(w);
        }
    }
    let mut prec = 0u32;
    while prec < 22 {
        let next = (0.5 + wt_max * (1u32 << (prec + 1)) as f64) as i32;
        if next >= 1 << 15 {
            break;
        }
        prec += 1;
    }
    let k = kf
        .iter()
        .map(|&w| to_fixed(w, prec) as i16 as i32)
        .collect();
    AxisKernel {
        start,
        len,
        ksize,
        k,
        prec,
    }
}

#[inline]
fn clip8(sum: i32, prec: u32) -> u8 {
    (sum >> prec).clamp(0, 255) as u8
}

/// Horizontal pass over input rows `rows` of an interleaved RGB image of width `in_w`.
fn resample_horizontal(
    src: &[u8],
    in_w: usize,
    rows: std::ops::Range<usize>,
    kx: &AxisKernel,
    out_w: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; rows.len() * out_w * 3];
    let round = 1i32 << (kx.prec - 1);
    for (oy, y) in rows.enumerate() {
        let line = &src[y * in_w * 3..][..in_w * 3];
        let dst = &mut out[oy * out_w * 3..][..out_w * 3];
        for (xx, px) in dst.chunks_exact_mut(3).enumerate() {
            let start = kx.start[xx];
            let n = kx.len[xx];
            let k = &kx.k[xx * kx.ksize..][..n];
            let (mut s0, mut s1, mut s2) = (round, round, round);
            for (w, p) in k.iter().zip(line[start * 3..][..n * 3].chunks_exact(3)) {
                s0 += p[0] as i32 * w;
                s1 += p[1] as i32 * w;
                s2 += p[2] as i32 * w;
            }
            px[0] = clip8(s0, kx.prec);
            px[1] = clip8(s1, kx.prec);
            px[2] = clip8(s2, kx.prec);
        }
    }
    out
}

/// Vertical pass: output row `yy` sums input rows `start[yy] - row_offset ..` of `src`.
fn resample_vertical(
    src: &[u8],
    w: usize,
    row_offset: usize,
    ky: &AxisKernel,
    out_h: usize,
) -> Vec<u8> {
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    let round = 1i32 << (ky.prec - 1);
    for (yy, dst) in out.chunks_exact_mut(stride).enumerate() {
        acc.fill(round);
        let start = ky.start[yy] - row_offset;
        let k = &ky.k[yy * ky.ksize..][..ky.len[yy]];
        for (j, &wgt) in k.iter().enumerate() {
            let line = &src[(start + j) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * wgt;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a, ky.prec);
        }
    }
    out
}

/// Which pass runs first when both axes change.
#[derive(Clone, Copy)]
enum PassOrder {
    /// torch's uint8 kernels: always horizontal, then vertical.
    HorizontalFirst,
    /// Pillow 13 (`ImagingResampleInner`): vertical first when the height shrinks by more than
    /// twice as many pixels as the width does, `(in_h - out_h) > 0 && (in_h - out_h) >
    /// 2 * (in_w - out_w)`; horizontal first otherwise.
    Pillow13,
}

/// Separable two-pass resize as both libraries run it: each pass rounds and clips to uint8; a
/// pass whose size does not change is skipped; a horizontal first pass only computes the rows
/// the vertical pass reads.
fn resize_with(
    image: &RgbImage,
    height: usize,
    width: usize,
    kernel: fn(usize, usize) -> AxisKernel,
    order: PassOrder,
) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        return RgbImage::new(width as u32, height as u32);
    }
    if (in_w, in_h) == (width, height) {
        return image.clone();
    }
    let src = image.as_raw();
    let need_h = width != in_w;
    let need_v = height != in_h;
    let horizontal_first = match order {
        PassOrder::HorizontalFirst => true,
        PassOrder::Pillow13 => {
            let (dh, dw) = (in_h as i64 - height as i64, in_w as i64 - width as i64);
            !(dh > 0 && dh > dw * 2)
        }
    };
    let data = match (need_h, need_v) {
        (true, true) if horizontal_first => {
            let ky = kernel(in_h, height);
            let first = ky.start[0];
            let last = (0..height)
                .map(|i| ky.start[i] + ky.len[i])
                .max()
                .unwrap_or(in_h);
            let tmp = resample_horizontal(src, in_w, first..last, &kernel(in_w, width), width);
            resample_vertical(&tmp, width, first, &ky, height)
        }
        (true, true) => {
            let tmp = resample_vertical(src, in_w, 0, &kernel(in_h, height), height);
            resample_horizontal(&tmp, in_w, 0..height, &kernel(in_w, width), width)
        }
        (true, false) => resample_horizontal(src, in_w, 0..in_h, &kernel(in_w, width), width),
        (false, true) => resample_vertical(src, in_w, 0, &kernel(in_h, height), height),
        (false, false) => unreachable!("sizes differ"),
    };
    RgbImage::from_raw(width as u32, height as u32, data).expect("buffer size matches")
}

/// torchvision `resize(img, [height, width], BICUBIC, antialias=True)` on a uint8 CHW tensor, as
/// transformers 5 calls it (torch's `_upsample_bicubic2d_aa` uint8 kernel): PIL's antialiased
/// bicubic (a = -0.5) with weights in int16 at a precision chosen from the largest weight.
pub fn resize_torchvision(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    resize_with(
        image,
        height,
        width,
        torch_kernel,
        PassOrder::HorizontalFirst,
    )
}

/// `PIL.Image.resize((width, height), Image.BICUBIC)` on an RGB image, as Pillow 13 does it
/// (libImaging/Resample.c: 22-bit fixed-point weights, pass order chosen from the size change).
pub fn resize_pil(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    resize_with(image, height, width, pil_kernel, PassOrder::Pillow13)
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Decodes an image file as transformers' `load_image` does (PIL open, `ImageOps.exif_transpose`,
/// `convert("RGB")`), and as the BLIP processor's RGB step then sees it.
///
/// * Format is detected from the content. JPEG goes through libjpeg-turbo with PIL's settings
///   (accurate integer DCT, fancy upsampling), so pixels match PIL's; grayscale is replicated;
///   4-channel (CMYK/YCCK, Adobe) JPEGs are read as inverted CMYK and converted with PIL's
///   `cmyk2rgb` integer formula. PNG, GIF (first frame), BMP, TIFF and WebP go through the `image`
///   crate: alpha is dropped (not composited), gray replicated, palettes expanded, as PIL's
///   `convert("RGB")` does.
/// * Orientation is applied as PIL's `exif_transpose` reads it: the EXIF Orientation tag (JPEG
///   APP1, PNG `eXIf`, WebP `EXIF`, TIFF's own tag), else XMP `tiff:Orientation` (JPEG, PNG
///   iTXt, WebP).
/// * The processor's RGB step (`do_convert_rgb`, on by default) composites images with a
///   colour-key transparency (PNG `tRNS` naming one palette index, gray level or RGB colour; GIF
///   transparency index) onto white: after `load_image` such an image is RGB with
///   `info["transparency"]` still set to that colour, so every pixel of exactly that colour becomes
///   white. That is applied here too, so the result is what the processor resizes.
/// * Deviation from PIL: 16-bit grayscale is scaled to 8 bits as `round(v / 257)`; PIL's
///   `convert("RGB")` clips I;16 at 255 (a near-white image). 16-bit colour (and gray+alpha)
///   takes the high byte, as PIL does.
///
/// Missing, empty, truncated, corrupt or non-image files give `Error::Image` naming the path.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::image(path, format!("cannot read image file: {e}")))?;
    load_image_from_memory(&bytes, path)
}

/// [`load_image`] on the bytes of a file; `name` is only used in error messages.
pub fn load_image_from_memory(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::image(
            name,
            "the file is empty (0 bytes), not an image",
        ));
    }
    // PIL's JpegImagePlugin accepts exactly this prefix.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes).map_err(|reason| Error::image(name, reason));
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_other(bytes)));
    match outcome {
        Ok(result) => result.map_err(|reason| Error::image(name, reason)),
        Err(_) => Err(Error::image(
            name,
            "the image decoder failed on this file (corrupt data)",
        )),
    }
}

type DecodeResult<T> = std::result::Result<T, String>;

fn check_pixels(width: u64, height: u64) -> DecodeResult<()> {
    if width == 0 || height == 0 {
        return Err(format!("the image has no pixels ({width}x{height})"));
    }
    if width * height > MAX_PIXELS {
        return Err(format!(
            "{width}x{height} pixels is over the {MAX_PIXELS}-pixel limit (PIL's decompression-bomb limit)"
        ));
    }
    Ok(())
}

fn decode_other(bytes: &[u8]) -> DecodeResult<RgbImage> {
    use ::image::metadata::Orientation;
    use ::image::ImageFormat;
    let format = ::image::guess_format(bytes).map_err(|_| {
        "not a recognized image file (supported formats: JPEG, PNG, GIF, BMP, TIFF, WebP)"
            .to_string()
    })?;
    let fname = format!("{format:?}").to_uppercase();
    let reader = ::image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder = reader.into_decoder().map_err(|e| {
        format!("cannot decode {fname} image (corrupt, truncated or unsupported): {e}")
    })?;
    let (w, h) = decoder.dimensions();
    check_pixels(w as u64, h as u64)?;
    // PIL `getexif()`: the EXIF Orientation tag if present, else XMP `tiff:Orientation`. TIFF
    // orientation is a tag of the image itself.
    let exif_value = decoder
        .exif_metadata()
        .ok()
        .flatten()
        .as_deref()
        .and_then(exif_orientation);
    let orientation = match exif_value {
        Some(v) => orientation_from_exif_value(v),
        None => {
            let tiff = match format {
                ImageFormat::Tiff => decoder
                    .orientation()
                    .ok()
                    .filter(|o| *o != Orientation::NoTransforms),
                _ => None,
            };
            tiff.or_else(|| {
                let xmp = decoder.xmp_metadata().ok().flatten()?;
                orientation_from_exif_value(xmp_orientation(&xmp)?)
            })
        }
    };
    let img = DynamicImage::from_decoder(decoder).map_err(|e| {
        format!("cannot decode {fname} image (corrupt, truncated or unsupported): {e}")
    })?;

    let mut rgb = to_rgb8_like_pil(img);
    match format {
        ImageFormat::Png => {
            if let Some(key) = png_color_key(bytes) {
                apply_color_key(&mut rgb, key);
            }
        }
        ImageFormat::Gif => {
            if let Some(info) = gif_first_frame(bytes) {
                fix_gif_first_frame(&mut rgb, &info);
            }
        }
        _ => {}
    }
    if let Some(orientation) = orientation {
        let mut img = DynamicImage::ImageRgb8(rgb);
        img.apply_orientation(orientation);
        rgb = img.into_rgb8();
    }
    Ok(rgb)
}

/// PIL `convert("RGB")` semantics on the decoded buffer (see [`load_image`] for 16-bit).
fn to_rgb8_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out = RgbImage::new(w, h);
    let dst = &mut *out;
    match img {
        DynamicImage::ImageRgb8(im) => return im,
        DynamicImage::ImageLuma8(im) => {
            for (d, &v) in dst.chunks_exact_mut(3).zip(im.as_raw()) {
                d.fill(v);
            }
        }
        DynamicImage::ImageLumaA8(im) => {
            for (d, s) in dst.chunks_exact_mut(3).zip(im.as_raw().chunks_exact(2)) {
                d.fill(s[0]);
            }
        }
        DynamicImage::ImageRgba8(im) => {
            for (d, s) in dst.chunks_exact_mut(3).zip(im.as_raw().chunks_exact(4)) {
                d.copy_from_slice(&s[..3]);
            }
        }
        DynamicImage::ImageLuma16(im) => {
            for (d, &v) in dst.chunks_exact_mut(3).zip(im.as_raw()) {
                d.fill(((v as u32 * 255 + 32767) / 65535) as u8);
            }
        }
        DynamicImage::ImageLumaA16(im) => {
            for (d, s) in dst.chunks_exact_mut(3).zip(im.as_raw().chunks_exact(2)) {
                d.fill((s[0] >> 8) as u8);
            }
        }
        DynamicImage::ImageRgb16(im) => {
            for (d, s) in dst.chunks_exact_mut(3).zip(im.as_raw().chunks_exact(3)) {
                for c in 0..3 {
                    d[c] = (s[c] >> 8) as u8;
                }
            }
        }
        DynamicImage::ImageRgba16(im) => {
            for (d, s) in dst.chunks_exact_mut(3).zip(im.as_raw().chunks_exact(4)) {
                for c in 0..3 {
                    d[c] = (s[c] >> 8) as u8;
                }
            }
        }
        other => {
            // Float images (rare TIFFs): clamp to 0..1 and round to 8 bits.
            let f = other.into_rgb32f();
            for (d, s) in dst.iter_mut().zip(f.as_raw()) {
                *d = (s.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    out
}

/// Whitens every pixel equal to the colour key (see [`load_image`]). Components are compared as
/// integers, as PIL does (a 16-bit key never matches an 8-bit pixel component above 255).
fn apply_color_key(rgb: &mut RgbImage, key: [u16; 3]) {
    for px in rgb.pixels_mut() {
        if px.0.iter().zip(&key).all(|(&p, &k)| p as u16 == k) {
            px.0 = [255, 255, 255];
        }
    }
}

/// The colour key PIL's `convert("RGB")` leaves in `info["transparency"]` for a PNG, which the
/// processor's RGB step then turns white: the palette entry of a single fully transparent index
/// (tRNS `^\xff*\x00\xff*$`; partial palette alpha is dropped), the tRNS gray level (2-8 bit), the
/// raw tRNS RGB samples (8 or 16 bit; a 16-bit key only matches 8-bit pixels if it is below 256,
/// as in PIL). 1-bit and 16-bit gray keys survive as a bare integer `t`, which PIL applies to RGB
/// as the colour `(t, 0, 0)`: only `t == 0` can match a gray pixel.
fn png_color_key(bytes: &[u8]) -> Option<[u16; 3]> {
    let mut pos = 8;
    let (mut bit_depth, mut color_type) = (0u8, 255u8);
    let mut palette: &[u8] = &[];
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().ok()?) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let data = bytes.get(pos + 8..pos + 8 + len)?;
        match kind {
            b"IHDR" if len >= 10 => {
                bit_depth = data[8];
                color_type = data[9];
            }
            b"PLTE" => palette = data,
            b"tRNS" => {
                return match color_type {
                    3 => {
                        let zero = data.iter().position(|&a| a == 0)?;
                        let simple = data
                            .iter()
                            .enumerate()
                            .all(|(i, &a)| a == 0xFF || i == zero);
                        if !simple {
                            return None;
                        }
                        let c = palette.get(zero * 3..zero * 3 + 3).unwrap_or(&[0, 0, 0]);
                        Some([c[0] as u16, c[1] as u16, c[2] as u16])
                    }
                    0 if data.len() >= 2 => {
                        let v = u16::from_be_bytes([data[0], data[1]]);
                        match bit_depth {
                            2..=8 if v <= 255 => Some([v, v, v]),
                            1 | 16 if v == 0 => Some([0, 0, 0]),
                            _ => None,
                        }
                    }
                    2 if data.len() >= 6 => Some([
                        u16::from_be_bytes([data[0], data[1]]),
                        u16::from_be_bytes([data[2], data[3]]),
                        u16::from_be_bytes([data[4], data[5]]),
                    ]),
                    _ => None,
                };
            }
            b"IDAT" | b"IEND" => return None,
            _ => {}
        }
        pos += 12 + len;
    }
    None
}

/// What PIL does with the first frame of a GIF that the `image` crate does differently.
struct GifFrameInfo {
    screen: (u32, u32),
    rect: (u32, u32, u32, u32),
    palette: Vec<u8>,
    transparency: Option<u8>,
}

/// Parses the GIF header up to the first image descriptor.
fn gif_first_frame(bytes: &[u8]) -> Option<GifFrameInfo> {
    if bytes.len() < 13 || !bytes.starts_with(b"GIF") {
        return None;
    }
    let screen = (
        u16::from_le_bytes([bytes[6], bytes[7]]) as u32,
        u16::from_le_bytes([bytes[8], bytes[9]]) as u32,
    );
    let packed = bytes[10];
    let mut pos = 13;
    let mut palette = Vec::new();
    if packed & 0x80 != 0 {
        let n = 3 << ((packed & 7) + 1);
        palette = bytes.get(pos..pos + n)?.to_vec();
        pos += n;
    }
    let mut transparency = None;
    loop {
        match *bytes.get(pos)? {
            0x21 => {
                let label = *bytes.get(pos + 1)?;
                pos += 2;
                if label == 0xF9 && *bytes.get(pos)? >= 4 {
                    let flags = *bytes.get(pos + 1)?;
                    transparency = (flags & 1 != 0).then_some(*bytes.get(pos + 4)?);
                }
                loop {
                    let n = *bytes.get(pos)? as usize;
                    pos += 1 + n;
                    if n == 0 {
                        break;
                    }
                }
            }
            0x2C => {
                let d = bytes.get(pos + 1..pos + 10)?;
                let rect = (
                    u16::from_le_bytes([d[0], d[1]]) as u32,
                    u16::from_le_bytes([d[2], d[3]]) as u32,
                    u16::from_le_bytes([d[4], d[5]]) as u32,
                    u16::from_le_bytes([d[6], d[7]]) as u32,
                );
                if d[8] & 0x80 != 0 {
                    let n = 3 << ((d[8] & 7) + 1);
                    palette = bytes.get(pos + 10..pos + 10 + n)?.to_vec();
                }
                return Some(GifFrameInfo {
                    screen,
                    rect,
                    palette,
                    transparency,
                });
            }
            _ => return None,
        }
    }
}

/// PIL fills the area of the logical screen outside the first frame with the transparency index
/// (else index 0), and the processor then turns the transparency colour white.
fn fix_gif_first_frame(rgb: &mut RgbImage, info: &GifFrameInfo) {
    let colour = |i: u8| -> [u8; 3] {
        info.palette
            .get(i as usize * 3..i as usize * 3 + 3)
            .map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
    };
    let (left, top, w, h) = info.rect;
    if (rgb.width(), rgb.height()) == info.screen
        && (left, top, w, h) != (0, 0, info.screen.0, info.screen.1)
    {
        let fill = colour(info.transparency.unwrap_or(0));
        for (x, y, px) in rgb.enumerate_pixels_mut() {
            if x < left || y < top || x >= left.saturating_add(w) || y >= top.saturating_add(h) {
                px.0 = fill;
            }
        }
    }
    if let Some(t) = info.transparency {
        let c = colour(t);
        apply_color_key(rgb, [c[0] as u16, c[1] as u16, c[2] as u16]);
    }
}

/// JPEG metadata PIL looks at: EXIF (all `Exif\0\0` APP1 segments, concatenated) and the last XMP
/// packet, read up to the first scan.
struct JpegMeta {
    exif: Option<Vec<u8>>,
    xmp: Option<Vec<u8>>,
}

fn jpeg_meta(bytes: &[u8]) -> JpegMeta {
    let mut meta = JpegMeta {
        exif: None,
        xmp: None,
    };
    let mut pos = 2;
    while pos + 4 <= bytes.len() {
        if bytes[pos] != 0xFF {
            break;
        }
        let marker = bytes[pos + 1];
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
            pos += 2;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            break;
        }
        let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
        let Some(seg) = bytes.get(pos + 4..pos + 2 + len.max(2)) else {
            break;
        };
        if marker == 0xE1 {
            if seg.starts_with(b"Exif\0\0") {
                match &mut meta.exif {
                    Some(e) => e.extend_from_slice(&seg[6..]),
                    None => meta.exif = Some(seg.to_vec()),
                }
            } else if let Some(rest) = seg.strip_prefix(b"http://ns.adobe.com/xap/1.0/\0") {
                meta.xmp = Some(rest.to_vec());
            }
        }
        pos += 2 + len;
    }
    meta
}

/// The EXIF orientation tag (0x0112) of IFD0, from a TIFF structure (optionally behind
/// `Exif\0\0` prefixes, which PIL strips).
fn exif_orientation(mut exif: &[u8]) -> Option<u32> {
    while let Some(rest) = exif.strip_prefix(b"Exif\0\0") {
        exif = rest;
    }
    let le = match exif.get(..4)? {
        b"II*\0" => true,
        b"MM\0*" => false,
        _ => return None,
    };
    let u16_at = |p: usize| -> Option<u16> {
        let b = exif.get(p..p + 2)?;
        Some(if le {
            u16::from_le_bytes([b[0], b[1]])
        } else {
            u16::from_be_bytes([b[0], b[1]])
        })
    };
    let u32_at = |p: usize| -> Option<u32> {
        let b: [u8; 4] = exif.get(p..p + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    for i in 0..count {
        let entry = ifd + 2 + 12 * i;
        if u16_at(entry)? != 0x0112 {
            continue;
        }
        let (kind, n) = (u16_at(entry + 2)?, u32_at(entry + 4)?);
        if n != 1 {
            return None;
        }
        return match kind {
            3 => u16_at(entry + 8).map(u32::from),
            4 => u32_at(entry + 8),
            1 => exif.get(entry + 8).map(|&b| b as u32),
            _ => None,
        };
    }
    None
}

/// PIL's XMP fallback: the first `tiff:Orientation="N` or `tiff:Orientation>N`.
fn xmp_orientation(xmp: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut from = 0;
    while let Some(i) = xmp[from..].windows(KEY.len()).position(|w| w == KEY) {
        let after = &xmp[from + i + KEY.len()..];
        let digit = match after {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(*d),
            _ => None,
        };
        if let Some(d) = digit {
            return Some((d - b'0') as u32);
        }
        from += i + 1;
    }
    None
}

/// PIL `exif_transpose`: orientations 2-8, anything else leaves the image as is.
fn orientation_from_exif_value(v: u32) -> Option<::image::metadata::Orientation> {
    use ::image::metadata::Orientation as O;
    match v {
        2 => Some(O::FlipHorizontal),
        3 => Some(O::Rotate180),
        4 => Some(O::FlipVertical),
        5 => Some(O::Rotate90FlipH),
        6 => Some(O::Rotate90),
        7 => Some(O::Rotate270FlipH),
        8 => Some(O::Rotate270),
        _ => None,
    }
}

/// A TurboJPEG decompressor handle, destroyed on drop.
struct TjHandle(turbojpeg::raw::tjhandle);

impl Drop for TjHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { turbojpeg::raw::tj3Destroy(self.0) }
    }
}

impl TjHandle {
    fn error(&self) -> (bool, String) {
        // SAFETY: valid handle; tj3GetErrorStr returns a NUL-terminated static or per-handle buffer.
        unsafe {
            let fatal =
                turbojpeg::raw::tj3GetErrorCode(self.0) as u32 == turbojpeg::raw::TJERR_TJERR_FATAL;
            let msg = std::ffi::CStr::from_ptr(turbojpeg::raw::tj3GetErrorStr(self.0))
                .to_string_lossy()
                .into_owned();
            (fatal, msg)
        }
    }
    fn get(&self, param: turbojpeg::raw::TJPARAM) -> i32 {
        // SAFETY: valid handle, read-only parameter query.
        unsafe { turbojpeg::raw::tj3Get(self.0, param as _) }
    }
}

/// libjpeg-turbo's message for running out of data (JWRN_JPEG_EOF): PIL raises "image file is
/// truncated" where libjpeg-turbo would pad the image with gray.
const JPEG_EOF_WARNING: &str = "Premature end of JPEG file";

fn decode_jpeg(bytes: &[u8]) -> DecodeResult<RgbImage> {
    use turbojpeg::raw;
    // SAFETY: plain FFI calls on a handle we own; buffers are sized from the header and outlive
    // the calls.
    let handle = TjHandle(unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as _) });
    if handle.0.is_null() {
        return Err("cannot initialize the JPEG decoder".into());
    }
    let rc = unsafe { raw::tj3DecompressHeader(handle.0, bytes.as_ptr(), bytes.len() as _) };
    if rc != 0 {
        let (fatal, msg) = handle.error();
        if fatal || msg.starts_with(JPEG_EOF_WARNING) {
            return Err(jpeg_reason(&msg));
        }
    }
    let width = handle.get(raw::TJPARAM_TJPARAM_JPEGWIDTH);
    let height = handle.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT);
    let precision = handle.get(raw::TJPARAM_TJPARAM_PRECISION);
    let colorspace = handle.get(raw::TJPARAM_TJPARAM_COLORSPACE);
    if width <= 0 || height <= 0 {
        return Err("corrupt JPEG header (no image size)".into());
    }
    if precision != 8 {
        return Err(format!(
            "cannot handle {precision}-bit JPEG samples (only 8-bit, like PIL)"
        ));
    }
    check_pixels(width as u64, height as u64)?;
    let (w, h) = (width as usize, height as usize);
    let (pf, channels) = match colorspace as u32 {
        raw::TJCS_TJCS_GRAY => (raw::TJPF_TJPF_GRAY, 1),
        raw::TJCS_TJCS_CMYK | raw::TJCS_TJCS_YCCK => (raw::TJPF_TJPF_CMYK, 4),
        _ => (raw::TJPF_TJPF_RGB, 3),
    };
    let mut buf = vec![0u8; w * h * channels];
    let rc = unsafe {
        raw::tj3Decompress8(
            handle.0,
            bytes.as_ptr(),
            bytes.len() as _,
            buf.as_mut_ptr(),
            (w * channels) as _,
            pf as _,
        )
    };
    if rc != 0 {
        // Warnings (corrupt-but-decodable data) are ignored, as PIL ignores them, except running
        // out of data, which PIL reports as a truncated file.
        let (fatal, msg) = handle.error();
        if fatal || msg.starts_with(JPEG_EOF_WARNING) {
            return Err(jpeg_reason(&msg));
        }
    }
    drop(handle);

    let mut rgb = match channels {
        3 => RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer sized from header"),
        1 => {
            let mut out = RgbImage::new(w as u32, h as u32);
            for (d, &v) in out.chunks_exact_mut(3).zip(&buf) {
                d.fill(v);
            }
            out
        }
        _ => {
            // PIL reads 4-channel JPEGs as "CMYK;I" (Adobe's inverted CMYK), then converts with
            // cmyk2rgb: nk = 255 - k; out = nk - MULDIV255(c, nk), MULDIV255(a, b) =
            // ((a*b + 128) >> 8 + a*b + 128) >> 8.
            let mut out = RgbImage::new(w as u32, h as u32);
            for (d, s) in out.chunks_exact_mut(3).zip(buf.chunks_exact(4)) {
                let nk = s[3] as i32; // 255 - (255 - k): inverted K
                for c in 0..3 {
                    let v = 255 - s[c] as i32;
                    let tmp = v * nk + 128;
                    d[c] = (nk - (((tmp >> 8) + tmp) >> 8)).clamp(0, 255) as u8;
                }
            }
            out
        }
    };

    let meta = jpeg_meta(bytes);
    let orientation = meta
        .exif
        .as_deref()
        .and_then(exif_orientation)
        .or_else(|| meta.xmp.as_deref().and_then(xmp_orientation));
    if let Some(o) = orientation.and_then(orientation_from_exif_value) {
        let mut img = DynamicImage::ImageRgb8(rgb);
        img.apply_orientation(o);
        rgb = img.into_rgb8();
    }
    Ok(rgb)
}

fn jpeg_reason(msg: &str) -> String {
    if msg.starts_with(JPEG_EOF_WARNING) {
        "truncated JPEG file: the data ends before the image is complete".into()
    } else {
        format!("corrupt or unsupported JPEG: {msg}")
    }
}
