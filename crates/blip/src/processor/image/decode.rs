//! Image files to RGB8 exactly as transformers' `load_image` (PIL) decodes them.

mod tiff_pil;

use std::io::Cursor;
use std::path::Path;

use ::image::{DynamicImage, ImageDecoder, RgbImage};

use crate::error::{Error, Result};

/// PIL refuses images above twice its `MAX_IMAGE_PIXELS` (89,478,485) as decompression bombs; so
/// do we, before allocating anything.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Decodes an image file as transformers' `load_image` does (PIL open, `ImageOps.exif_transpose`,
/// `convert("RGB")`), and as the BLIP processor's RGB step then sees it.
///
/// * Format is detected from the content. JPEG goes through libjpeg-turbo with PIL's settings
///   (accurate integer DCT, fancy upsampling), so pixels match PIL's; grayscale is replicated;
///   4-channel (CMYK/YCCK, Adobe) JPEGs are read as inverted CMYK and converted with PIL's
///   `cmyk2rgb` integer formula. PNG, GIF (first frame), BMP, TIFF and WebP go through the `image`
///   crate: alpha is dropped (not composited), gray replicated, palettes expanded, as PIL's
///   `convert("RGB")` does.
/// * TIFFs the `image` crate refuses or converts otherwise (BigTIFF included) are decoded with the `tiff` crate as
///   PIL reads them: palette TIFFs (1, 2, 4 or 8-bit indices, with or without alpha) through their
///   ColorMap, each 16-bit entry taken as `v >> 8`; gray+alpha (LA) with the alpha dropped; CMYK
///   (8-bit, or 16-bit as its high bytes) with the same `cmyk2rgb` formula as JPEG.
/// * Orientation is applied as PIL's `exif_transpose` reads it: the EXIF Orientation tag (JPEG
///   APP1, PNG `eXIf`, WebP `EXIF`, TIFF's own tag), else XMP `tiff:Orientation` (JPEG, PNG
///   iTXt, WebP, TIFF's XMLPacket).
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
    let bytes = std::fs::read(path).map_err(|e| Error::image(path, format!("cannot read image file: {e}")))?;
    load_image_from_memory(&bytes, path)
}

/// [`load_image`] on the bytes of a file; `name` is only used in error messages.
pub fn load_image_from_memory(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::image(name, "the file is empty (0 bytes), not an image"));
    }
    // PIL's JpegImagePlugin accepts exactly this prefix.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes).map_err(|reason| Error::image(name, reason));
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_other(bytes)));
    match outcome {
        Ok(result) => result.map_err(|reason| Error::image(name, reason)),
        Err(_) => Err(Error::image(name, "the image decoder failed on this file (corrupt data)")),
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
    use ::image::ImageFormat;
    // `image`'s format sniffing misses BigTIFF, which PIL and the `tiff` crate read.
    let format = if bytes.starts_with(b"II+\0") || bytes.starts_with(b"MM\0+") {
        ImageFormat::Tiff
    } else {
        ::image::guess_format(bytes).map_err(|_| {
            "not a recognized image file (supported formats: JPEG, PNG, GIF, BMP, TIFF, WebP)".to_string()
        })?
    };
    if format == ImageFormat::Tiff {
        if let Some(rgb) = tiff_pil::decode(bytes) {
            return Ok(oriented(rgb?, tiff_pil::orientation(bytes)));
        }
    }
    let fname = format!("{format:?}").to_uppercase();
    let reader = ::image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode {fname} image (corrupt, truncated or unsupported): {e}"))?;
    let (w, h) = decoder.dimensions();
    check_pixels(w as u64, h as u64)?;
    // PIL `getexif()`: the EXIF Orientation tag if present, else XMP `tiff:Orientation`. TIFF
    // orientation is a tag of the image itself.
    let orientation = if format == ImageFormat::Tiff {
        tiff_pil::orientation(bytes)
    } else {
        match decoder.exif_metadata().ok().flatten().as_deref().and_then(exif_orientation) {
            Some(v) => orientation_from_exif_value(v),
            None => {
                let xmp = decoder.xmp_metadata().ok().flatten();
                xmp.as_deref().and_then(xmp_orientation).and_then(orientation_from_exif_value)
            }
        }
    };
    let img = DynamicImage::from_decoder(decoder)
        .map_err(|e| format!("cannot decode {fname} image (corrupt, truncated or unsupported): {e}"))?;

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
    Ok(oriented(rgb, orientation))
}

/// The image turned as PIL's `exif_transpose` turns it (`None`: as it is).
fn oriented(rgb: RgbImage, orientation: Option<::image::metadata::Orientation>) -> RgbImage {
    match orientation {
        Some(o) => {
            let mut img = DynamicImage::ImageRgb8(rgb);
            img.apply_orientation(o);
            img.into_rgb8()
        }
        None => rgb,
    }
}

/// PIL's `cmyk2rgb` (libImaging/Convert.c), used by `convert("RGB")` on CMYK images:
/// `nk = 255 - k; out = clip8(nk - MULDIV255(c, nk))`, `MULDIV255(a, b) = (((a*b + 128) >> 8) +
/// a*b + 128) >> 8`.
fn cmyk_to_rgb_like_pil(c: u8, m: u8, y: u8, k: u8) -> [u8; 3] {
    let nk = 255 - k as i32;
    [c, m, y].map(|v| {
        let tmp = v as i32 * nk + 128;
        (nk - (((tmp >> 8) + tmp) >> 8)).clamp(0, 255) as u8
    })
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
                        let simple = data.iter().enumerate().all(|(i, &a)| a == 0xFF || i == zero);
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
    let screen = (u16::from_le_bytes([bytes[6], bytes[7]]) as u32, u16::from_le_bytes([bytes[8], bytes[9]]) as u32);
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
                return Some(GifFrameInfo { screen, rect, palette, transparency });
            }
            _ => return None,
        }
    }
}

/// PIL fills the area of the logical screen outside the first frame with the transparency index
/// (else index 0), and the processor then turns the transparency colour white.
fn fix_gif_first_frame(rgb: &mut RgbImage, info: &GifFrameInfo) {
    let colour = |i: u8| -> [u8; 3] {
        info.palette.get(i as usize * 3..i as usize * 3 + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
    };
    let (left, top, w, h) = info.rect;
    if (rgb.width(), rgb.height()) == info.screen && (left, top, w, h) != (0, 0, info.screen.0, info.screen.1) {
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
    let mut meta = JpegMeta { exif: None, xmp: None };
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
        Some(if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) })
    };
    let u32_at = |p: usize| -> Option<u32> {
        let b: [u8; 4] = exif.get(p..p + 4)?.try_into().ok()?;
        Some(if le { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) })
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
            let fatal = turbojpeg::raw::tj3GetErrorCode(self.0) as u32 == turbojpeg::raw::TJERR_TJERR_FATAL;
            let msg = std::ffi::CStr::from_ptr(turbojpeg::raw::tj3GetErrorStr(self.0)).to_string_lossy().into_owned();
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
    // SAFETY: tj3Init takes no pointers; the handle it returns is checked for null below and
    // owned (destroyed once) by TjHandle.
    let handle = TjHandle(unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as _) });
    if handle.0.is_null() {
        return Err("cannot initialize the JPEG decoder".into());
    }
    // SAFETY: a live decompression handle, and `bytes` valid for `bytes.len()` bytes during the call.
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
        return Err(format!("cannot handle {precision}-bit JPEG samples (only 8-bit, like PIL)"));
    }
    check_pixels(width as u64, height as u64)?;
    let (w, h) = (width as usize, height as usize);
    let (pf, channels) = match colorspace as u32 {
        raw::TJCS_TJCS_GRAY => (raw::TJPF_TJPF_GRAY, 1),
        raw::TJCS_TJCS_CMYK | raw::TJCS_TJCS_YCCK => (raw::TJPF_TJPF_CMYK, 4),
        _ => (raw::TJPF_TJPF_RGB, 3),
    };
    let mut buf = vec![0u8; w * h * channels];
    // SAFETY: a live handle whose header gave w × h; `buf` holds h rows of w·channels bytes (the
    // pitch passed) in pixel format `pf` of `channels` bytes, and `bytes` is valid for its length.
    let rc = unsafe {
        raw::tj3Decompress8(handle.0, bytes.as_ptr(), bytes.len() as _, buf.as_mut_ptr(), (w * channels) as _, pf as _)
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

    let rgb = match channels {
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
            // cmyk2rgb.
            let mut out = RgbImage::new(w as u32, h as u32);
            for (d, s) in out.chunks_exact_mut(3).zip(buf.chunks_exact(4)) {
                d.copy_from_slice(&cmyk_to_rgb_like_pil(255 - s[0], 255 - s[1], 255 - s[2], 255 - s[3]));
            }
            out
        }
    };

    let meta = jpeg_meta(bytes);
    let orientation =
        meta.exif.as_deref().and_then(exif_orientation).or_else(|| meta.xmp.as_deref().and_then(xmp_orientation));
    Ok(oriented(rgb, orientation.and_then(orientation_from_exif_value)))
}

fn jpeg_reason(msg: &str) -> String {
    if msg.starts_with(JPEG_EOF_WARNING) {
        "truncated JPEG file: the data ends before the image is complete".into()
    } else {
        format!("corrupt or unsupported JPEG: {msg}")
    }
}
