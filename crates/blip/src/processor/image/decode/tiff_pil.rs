//! The TIFFs the `image` crate refuses or converts unlike PIL, decoded as PIL's `convert("RGB")`
//! sees them: palette (P, PA), gray with an extra sample (LA, LX) and CMYK; and a TIFF's
//! orientation as PIL's `exif_transpose` reads it.

use std::io::Cursor;

use ::image::metadata::Orientation;
use ::image::RgbImage;
use tiff::decoder::{Decoder, DecodingResult};
use tiff::tags::Tag;

use super::{check_pixels, cmyk_to_rgb_like_pil, orientation_from_exif_value, xmp_orientation, DecodeResult};

/// PhotometricInterpretation values.
const BLACK_IS_ZERO: u16 = 1;
const RGB_PALETTE: u16 = 3;
const CMYK: u16 = 5;
/// ExtraSamples value of premultiplied alpha (PIL's "La", left to the `image` crate's refusal).
const ASSOCIATED_ALPHA: u16 = 1;

/// The TIFF kinds decoded here.
enum Kind {
    /// Indices into the ColorMap (1, 2, 4 or 8 bits), optionally followed by an alpha sample.
    Palette,
    /// 8-bit gray followed by one extra sample (alpha or unspecified), which PIL drops.
    GrayExtra,
    /// 8- or 16-bit CMYK, optionally followed by extra samples.
    Cmyk,
}

fn reason(e: impl std::fmt::Display) -> String {
    format!("cannot decode TIFF image (corrupt, truncated or unsupported): {e}")
}

/// Decodes a TIFF here if it is one of the kinds above (`None`: the `image` crate's decode
/// matches PIL's), before orientation.
pub(super) fn decode(bytes: &[u8]) -> Option<DecodeResult<RgbImage>> {
    let mut d = Decoder::new(Cursor::new(bytes)).ok()?;
    let photometric = d.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation).ok()??;
    let samples = d.find_tag_unsigned::<u16>(Tag::SamplesPerPixel).ok().flatten().unwrap_or(1);
    let bits = d.find_tag_unsigned_vec::<u16>(Tag::BitsPerSample).ok().flatten().and_then(|b| b.first().copied());
    let extra = d.find_tag_unsigned_vec::<u16>(Tag::ExtraSamples).ok().flatten().unwrap_or_default();
    let kind = match photometric {
        RGB_PALETTE => Kind::Palette,
        CMYK => Kind::Cmyk,
        BLACK_IS_ZERO if samples == 2 && bits == Some(8) && extra.first() != Some(&ASSOCIATED_ALPHA) => Kind::GrayExtra,
        _ => return None,
    };
    Some(decode_kind(bytes, d, kind))
}

fn decode_kind(bytes: &[u8], mut d: Decoder<Cursor<&[u8]>>, kind: Kind) -> DecodeResult<RgbImage> {
    let (w, h) = d.dimensions().map_err(reason)?;
    check_pixels(w as u64, h as u64)?;
    let mut out = RgbImage::new(w, h);
    match kind {
        Kind::Palette => {
            // PIL: `palette = [v // 256 for v in ColorMap]`, read as "RGB;L" (all reds, then all
            // greens, then all blues); indices past the map are black.
            let map = d
                .find_tag_unsigned_vec::<u16>(Tag::ColorMap)
                .map_err(reason)?
                .ok_or_else(|| reason("palette image without a ColorMap"))?;
            let n = map.len() / 3;
            let gray = as_black_is_zero(bytes).ok_or_else(|| reason("unreadable PhotometricInterpretation tag"))?;
            let mut gd = Decoder::new(Cursor::new(&gray[..])).map_err(reason)?;
            let indices = read_samples(&mut gd, w as usize, h as usize)?;
            for (p, px) in out.pixels_mut().enumerate() {
                let i = indices.get(p, 0) as usize;
                if i < n {
                    px.0 = [(map[i] >> 8) as u8, (map[n + i] >> 8) as u8, (map[2 * n + i] >> 8) as u8];
                }
            }
        }
        Kind::GrayExtra => {
            let s = read_samples(&mut d, w as usize, h as usize)?;
            for (p, px) in out.pixels_mut().enumerate() {
                px.0 = [s.get(p, 0) as u8; 3];
            }
        }
        Kind::Cmyk => {
            // PIL reads 16-bit CMYK as its high bytes ("CMYK;16L/B"), extra samples skipped.
            let s = read_samples(&mut d, w as usize, h as usize)?;
            if s.channels < 4 {
                return Err(reason(format!("CMYK image with {} samples per pixel", s.channels)));
            }
            let shift = if s.bits == 16 { 8 } else { 0 };
            for (p, px) in out.pixels_mut().enumerate() {
                let v = |c| (s.get(p, c) >> shift) as u8;
                px.0 = cmyk_to_rgb_like_pil(v(0), v(1), v(2), v(3));
            }
        }
    }
    Ok(out)
}

/// A decoded image's samples, whatever its layout (pixel-interleaved or one plane per sample).
struct Samples {
    data: Vec<u16>,
    channels: usize,
    /// Samples per plane when planar.
    plane_len: Option<usize>,
    bits: u16,
}

impl Samples {
    fn get(&self, pixel: usize, sample: usize) -> u16 {
        match self.plane_len {
            Some(len) => self.data[sample * len + pixel],
            None => self.data[pixel * self.channels + sample],
        }
    }
}

/// Reads the whole image of 8- or 16-bit samples, or 1-, 2- or 4-bit single samples (unpacked).
fn read_samples(d: &mut Decoder<Cursor<&[u8]>>, w: usize, h: usize) -> DecodeResult<Samples> {
    let bits = d.find_tag_unsigned_vec::<u16>(Tag::BitsPerSample).ok().flatten().and_then(|b| b.first().copied());
    let bits = bits.unwrap_or(1);
    let mut result = DecodingResult::U8(Vec::new());
    let layout = d.read_image_to_buffer(&mut result).map_err(reason)?;
    if result.as_buffer(0).byte_len() < layout.complete_len {
        return Err(reason("the image is too large for the TIFF decoder's memory limit"));
    }
    let pixels = w * h;
    let data: Vec<u16> = match (result, bits) {
        (DecodingResult::U8(v), 1 | 2 | 4) => {
            // Rows of packed samples, most significant first, each padded to a byte.
            let row = layout.row_stride.map_or(0, |s| s.get());
            if row * 8 < w * bits as usize || v.len() < row * h {
                return Err(reason("inconsistent packed sample layout"));
            }
            let (per_byte, mask) = (8 / bits as usize, (1u16 << bits) - 1);
            let mut out = Vec::with_capacity(pixels);
            for y in 0..h {
                for x in 0..w {
                    let byte = v[y * row + x / per_byte] as u16;
                    out.push((byte >> (8 - bits as usize * (x % per_byte + 1))) & mask);
                }
            }
            return Ok(Samples { data: out, channels: 1, plane_len: None, bits });
        }
        (DecodingResult::U8(v), 8) => v.into_iter().map(u16::from).collect(),
        (DecodingResult::U16(v), 16) => v,
        _ => return Err(reason(format!("unsupported sample format ({bits} bits per sample)"))),
    };
    let (channels, plane_len) = if layout.planes > 1 {
        let len = layout.plane_stride.map_or(0, |s| s.get()) / (bits as usize / 8);
        (layout.planes, Some(len))
    } else {
        (data.len().checked_div(pixels).unwrap_or(0), None)
    };
    let needed = match plane_len {
        Some(len) if len >= pixels => (channels - 1) * len + pixels,
        Some(_) => usize::MAX,
        None => channels * pixels,
    };
    if channels == 0 || data.len() < needed {
        return Err(reason("fewer samples than pixels"));
    }
    Ok(Samples { data, channels, plane_len, bits })
}

/// A copy of the TIFF whose first image says BlackIsZero instead of RGBPalette, so that the
/// `tiff` crate (which refuses palette images) decodes the indices as gray samples.
fn as_black_is_zero(bytes: &[u8]) -> Option<Vec<u8>> {
    let (le, big) = match bytes.get(..4)? {
        b"II*\0" => (true, false),
        b"MM\0*" => (false, false),
        b"II+\0" => (true, true),
        b"MM\0+" => (false, true),
        _ => return None,
    };
    let uint = |p: usize, n: usize| -> Option<u64> {
        let b = bytes.get(p..p.checked_add(n)?)?;
        Some(if le {
            b.iter().rev().fold(0, |a, &x| a << 8 | x as u64)
        } else {
            b.iter().fold(0, |a, &x| a << 8 | x as u64)
        })
    };
    // Classic TIFF: 2-byte entry count, 12-byte entries, value at +8; BigTIFF: 8, 20, +12.
    let (count, entries, entry_len, value_at) = if big {
        let ifd = usize::try_from(uint(8, 8)?).ok()?;
        (uint(ifd, 8)?, ifd + 8, 20, 12)
    } else {
        let ifd = uint(4, 4)? as usize;
        (uint(ifd, 2)?, ifd + 2, 12, 8)
    };
    // Entries must lie in the file, so this loop ends after at most len / entry_len steps.
    for i in 0..usize::try_from(count).ok()? {
        let entry = entries.checked_add(i.checked_mul(entry_len)?)?;
        if uint(entry, 2)? != 262 {
            continue;
        }
        // SHORT, one value, stored in the entry itself.
        if uint(entry + 2, 2)? != 3 || uint(entry + 4, if big { 8 } else { 4 })? != 1 {
            return None;
        }
        let mut out = bytes.to_vec();
        let v = if le { BLACK_IS_ZERO.to_le_bytes() } else { BLACK_IS_ZERO.to_be_bytes() };
        out.get_mut(entry + value_at..entry + value_at + 2)?.copy_from_slice(&v);
        return Some(out);
    }
    None
}

/// PIL's `exif_transpose` orientation of a TIFF: its Orientation tag when present (any value;
/// only 2-8 transform), else XMP `tiff:Orientation` from the XMLPacket tag (700).
pub(super) fn orientation(bytes: &[u8]) -> Option<Orientation> {
    let mut d = Decoder::new(Cursor::new(bytes)).ok()?;
    if let Ok(Some(v)) = d.find_tag_unsigned::<u32>(Tag::Orientation) {
        return orientation_from_exif_value(v);
    }
    let xmp = d.find_tag(Tag::Unknown(700)).ok()??.into_u8_vec().ok()?;
    orientation_from_exif_value(xmp_orientation(&xmp)?)
}
