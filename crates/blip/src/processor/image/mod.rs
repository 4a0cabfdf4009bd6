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

mod decode;
mod resize;
mod sources;

use std::path::Path;

use ::image::RgbImage;
use serde_json::Value;

use crate::error::{Error, InvalidInput, Param, Result};
pub use decode::{load_image, load_image_from_memory, MAX_PIXELS};
pub use resize::{resize_pil, resize_torchvision};
pub use sources::{collect_sources, fetch_url, find_images, is_image_file, ImageSource, UrlLimits, IMAGE_EXTENSIONS};

/// OpenAI CLIP mean, transformers' `OPENAI_CLIP_MEAN` (BLIP's default).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP std, transformers' `OPENAI_CLIP_STD` (BLIP's default).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Which resampling (and normalization arithmetic) transformers uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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
        let value: Value = serde_json::from_str(json).map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        Self::from_json_value(&value, path)
    }

    /// The `image_processor` entry of a `processor_config.json` (transformers 5's
    /// `save_pretrained` keeps the image processor's settings there); `None` when it has none.
    pub fn from_processor_config(path: &Path) -> Result<Option<Self>> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| Error::config(path, format!("cannot read processor config: {e}")))?;
        let value: Value =
            serde_json::from_str(&json).map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        match value.get("image_processor") {
            None | Some(Value::Null) => Ok(None),
            Some(settings) => Self::from_json_value(settings, path).map(Some),
        }
    }

    /// The settings held by a JSON object; `path` only names the file in errors.
    fn from_json_value(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object of image processor settings"))?;
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
                        *slot = item.as_f64().ok_or_else(|| bad(key, &format!("expected numbers, got {item}")))?;
                    }
                    Ok(out)
                }
                Some(other) => Err(bad(key, &format!("expected a list of 3 numbers (RGB), got {other}"))),
            }
        };

        let mut p = Self::default();
        if let Some(size) = obj.get("size").filter(|v| !v.is_null()) {
            let dim = |v: &Value, what: &str| -> Result<usize> {
                v.as_u64()
                    .filter(|&n| n > 0 && n <= 1 << 16)
                    .map(|n| n as usize)
                    .ok_or_else(|| bad("size", &format!("{what} must be a positive integer, got {v}")))
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
                other => return Err(bad("size", &format!("expected an integer or an object, got {other}"))),
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
                .ok_or_else(|| bad("rescale_factor", &format!("expected a nonzero number, got {v}")))?;
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
                    return Err(bad("resample", &format!("only 3 (bicubic, BLIP's filter) is implemented, got {v}")))
                }
                _ => return Err(bad("resample", &format!("expected a PIL filter number 0-5, got {v}"))),
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
    pub fn preprocess_batch(&self, images: &[RgbImage], device: &candle_core::Device) -> Result<candle_core::Tensor> {
        let first = images.first().ok_or(InvalidInput::NoneGiven { param: Param::Images })?;
        let (h, w) = self.output_size(first);
        if let Some(odd) = images.iter().find(|im| self.output_size(im) != (h, w)) {
            return Err(InvalidInput::UnequalSizes { first: first.dimensions(), other: odd.dimensions() }.into());
        }
        let per = 3 * h * w;
        let mut data = vec![0f32; per * images.len()];
        for (image, out) in images.iter().zip(data.chunks_exact_mut(per)) {
            self.preprocess_into(image, out);
        }
        Ok(candle_core::Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
    }

    /// The image as [`preprocess`](Self::preprocess) resizes it before making its values: what
    /// to keep when the values are made later (a quarter of their memory); preprocessing it
    /// gives the same values as preprocessing the original.
    pub fn resize(&self, image: RgbImage) -> RgbImage {
        match self.resized(&image) {
            Some(resized) => resized,
            None => image,
        }
    }

    /// The image resized to the processor's size, unless it needs no resizing.
    fn resized(&self, image: &RgbImage) -> Option<RgbImage> {
        if !self.do_resize || (image.height() as usize, image.width() as usize) == (self.height, self.width) {
            return None;
        }
        Some(match self.backend {
            ResizeBackend::Torchvision => resize_torchvision(image, self.height, self.width),
            ResizeBackend::Pil => resize_pil(image, self.height, self.width),
        })
    }

    fn preprocess_into(&self, image: &RgbImage, out: &mut [f32]) {
        let resized = self.resized(image);
        let src = resized.as_ref().unwrap_or(image);
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
                let v = if self.do_rescale { (level as f64 * self.rescale_factor) as f32 } else { x };
                if self.do_normalize {
                    (v - self.image_mean[c] as f32) / self.image_std[c] as f32
                } else {
                    v
                }
            }
        }
    }
}
