//! Bicubic antialiased resampling of uint8 RGB, bit-exact with torch's uint8 kernel
//! (torchvision, transformers 5) and with Pillow 13's `Image.resize(BICUBIC)` (transformers 4).

use ::image::RgbImage;

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
fn float_weights(in_size: usize, out_size: usize, filter: fn(f64) -> f64) -> (Vec<usize>, Vec<usize>, usize, Vec<f64>) {
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
    AxisKernel { start, len, ksize, k, prec: PRECISION_BITS }
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
    let k = kf.iter().map(|&w| to_fixed(w, prec) as i16 as i32).collect();
    AxisKernel { start, len, ksize, k, prec }
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
fn resample_vertical(src: &[u8], w: usize, row_offset: usize, ky: &AxisKernel, out_h: usize) -> Vec<u8> {
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
            let last = (0..height).map(|i| ky.start[i] + ky.len[i]).max().unwrap_or(in_h);
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
    resize_with(image, height, width, torch_kernel, PassOrder::HorizontalFirst)
}

/// `PIL.Image.resize((width, height), Image.BICUBIC)` on an RGB image, as Pillow 13 does it
/// (libImaging/Resample.c: 22-bit fixed-point weights, pass order chosen from the size change).
pub fn resize_pil(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    resize_with(image, height, width, pil_kernel, PassOrder::Pillow13)
}
