//! decode → resize → colour → orient → encode, for one input and one spec.

use std::io::Cursor;

use fast_image_resize as fr;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::{Config, Error, Fit, Format, Spec, Thumbnail};

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

/// Sniff the format from the magic bytes.
pub fn sniff(input: &[u8]) -> Result<Format, Error> {
    let fmt = image::guess_format(input).map_err(|_| {
        Error::Unsupported(
            "unsupported input: not a JPEG, PNG, GIF, TIFF, BMP or WebP image".into(),
        )
    })?;
    Ok(match fmt {
        ImageFormat::Jpeg => Format::Jpeg,
        ImageFormat::Png => Format::Png,
        ImageFormat::Gif => Format::Gif,
        ImageFormat::Tiff => Format::Tiff,
        ImageFormat::Bmp => Format::Bmp,
        ImageFormat::WebP => Format::Webp,
        other => {
            return Err(Error::Unsupported(format!(
                "unsupported input format {other:?}: only JPEG, PNG, GIF, TIFF, BMP and WebP are decoded"
            )));
        }
    })
}

fn image_format(f: Format) -> ImageFormat {
    match f {
        Format::Jpeg => ImageFormat::Jpeg,
        Format::Png => ImageFormat::Png,
        Format::Webp => ImageFormat::WebP,
        Format::Gif => ImageFormat::Gif,
        Format::Tiff => ImageFormat::Tiff,
        Format::Bmp => ImageFormat::Bmp,
    }
}

fn name(f: Format) -> &'static str {
    match f {
        Format::Jpeg => "JPEG",
        Format::Png => "PNG",
        Format::Webp => "WebP",
        Format::Gif => "GIF",
        Format::Tiff => "TIFF",
        Format::Bmp => "BMP",
    }
}

fn is_truncation(e: &image::ImageError) -> bool {
    match e {
        image::ImageError::IoError(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        other => {
            let s = other.to_string().to_ascii_lowercase();
            s.contains("eof") || s.contains("end of file") || s.contains("truncat")
        }
    }
}

fn image_err(f: Format, e: image::ImageError) -> Error {
    use image::ImageError as E;
    match &e {
        E::Limits(_) => Error::TooLarge(format!("{} image over a decoding limit: {e}", name(f))),
        E::Unsupported(_) => Error::Unsupported(format!("unsupported {} variant: {e}", name(f))),
        _ if is_truncation(&e) => Error::Corrupt(format!("truncated {}: {e}", name(f))),
        _ => Error::Corrupt(format!("corrupt {}: {e}", name(f))),
    }
}

/// Read only the header: format and stored dimensions.
pub fn probe(input: &[u8]) -> Result<Probe, Error> {
    let format = sniff(input)?;
    let (width, height) = if format == Format::Jpeg {
        let mut d = jpeg_decoder::Decoder::new(Cursor::new(input));
        d.read_info().map_err(jpeg_err)?;
        let info = d
            .info()
            .ok_or_else(|| Error::Corrupt("corrupt JPEG: no frame header".into()))?;
        (info.width as u32, info.height as u32)
    } else if format == Format::Png {
        // Straight from IHDR, the first chunk: the `image` wrapper would parse the chunks
        // that follow it too, and inflate an iCCP chunk without a bound.
        if input.len() < 33 || &input[12..16] != b"IHDR" {
            return Err(Error::Corrupt("corrupt PNG: no IHDR chunk first".into()));
        }
        let be =
            |i: usize| u32::from_be_bytes([input[i], input[i + 1], input[i + 2], input[i + 3]]);
        (be(16), be(20))
    } else {
        let r = ImageReader::with_format(Cursor::new(input), image_format(format));
        r.into_dimensions().map_err(|e| image_err(format, e))?
    };
    if width == 0 || height == 0 {
        return Err(Error::Corrupt(format!(
            "corrupt {}: image is {width}x{height}",
            name(format)
        )));
    }
    Ok(Probe {
        format,
        width,
        height,
    })
}

fn jpeg_err(e: jpeg_decoder::Error) -> Error {
    match e {
        jpeg_decoder::Error::Unsupported(u) => {
            Error::Unsupported(format!("unsupported JPEG variant: {u:?}"))
        }
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::Corrupt(format!("truncated JPEG: {io}"))
        }
        jpeg_decoder::Error::Io(io) => Error::Corrupt(format!("corrupt JPEG: {io}")),
        jpeg_decoder::Error::Format(s) => {
            let l = s.to_ascii_lowercase();
            if l.contains("eof") || l.contains("end of") || l.contains("truncat") {
                Error::Corrupt(format!("truncated JPEG: {s}"))
            } else {
                Error::Corrupt(format!("corrupt JPEG: {s}"))
            }
        }
        jpeg_decoder::Error::Internal(e) => Error::Corrupt(format!("corrupt JPEG: {e}")),
    }
}

/// Check the limits that can be checked from the header.
pub fn check_limits(input: &[u8], p: &Probe, cfg: &Config) -> Result<(), Error> {
    let pixels = p.width as u64 * p.height as u64;
    if pixels > cfg.max_pixels {
        return Err(Error::TooLarge(format!(
            "image is {}x{} = {} megapixels, over the limit of {}",
            p.width,
            p.height,
            pixels / 1_000_000,
            fmt_mp(cfg.max_pixels)
        )));
    }
    // 4 bytes per pixel is what the decoded buffer of an RGBA image needs.
    if pixels.saturating_mul(4) > cfg.max_alloc_bytes {
        return Err(Error::TooLarge(format!(
            "image is {}x{}: decoding it would allocate {} MiB, over the limit of {} MiB",
            p.width,
            p.height,
            pixels * 4 / (1 << 20),
            cfg.max_alloc_bytes / (1 << 20)
        )));
    }
    let frames = match p.format {
        Format::Gif => super::gif_frames::count_frames(input, cfg.max_frames),
        // The container's chunk headers say how many frames an animated WebP has.
        Format::Webp => image_webp::WebPDecoder::new(Cursor::new(input))
            .map(|d| d.num_frames() as u64)
            .unwrap_or(0),
        _ => 0,
    };
    if frames > cfg.max_frames {
        return Err(Error::TooLarge(format!(
            "{} has {}{} frames, over the limit of {}",
            name(p.format),
            if p.format == Format::Gif {
                "more than "
            } else {
                ""
            },
            if p.format == Format::Gif {
                cfg.max_frames
            } else {
                frames
            },
            cfg.max_frames
        )));
    }
    Ok(())
}

fn fmt_mp(n: u64) -> String {
    if n.is_multiple_of(1_000_000) {
        (n / 1_000_000).to_string()
    } else {
        format!("{:.1}", n as f64 / 1e6)
    }
}

/// The geometry of one thumbnail in *stored* (un-oriented) source coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Output size before orientation (swapped back for orientations 5–8).
    pub out_w: u32,
    pub out_h: u32,
    /// Crop region in the source: left, top, width, height (source pixels).
    pub crop: (f64, f64, f64, f64),
}

/// Compute output size and crop for a source of `sw`×`sh` stored pixels whose EXIF
/// orientation swaps axes when `swap` is true.
pub fn plan(sw: u32, sh: u32, swap: bool, spec: &Spec) -> Plan {
    // Work in oriented (displayed) coordinates.
    let (ow, oh) = if swap { (sh, sw) } else { (sw, sh) };
    let (bw, bh) = (spec.width as f64, spec.height as f64);
    let (fw, fh) = (ow as f64, oh as f64);
    let (tw, th, cw, ch) = match spec.fit {
        Fit::Contain => {
            let mut s = (bw / fw).min(bh / fh);
            if !spec.enlarge {
                s = s.min(1.0);
            }
            let tw = (fw * s).round().max(1.0);
            let th = (fh * s).round().max(1.0);
            (tw, th, fw, fh)
        }
        Fit::Cover => {
            let mut s = (bw / fw).max(bh / fh);
            if !spec.enlarge {
                s = s.min(1.0);
            }
            let tw = bw.min((fw * s).round()).max(1.0);
            let th = bh.min((fh * s).round()).max(1.0);
            // The source region that maps onto the output at scale s.
            let cw = (tw / s).min(fw);
            let ch = (th / s).min(fh);
            (tw, th, cw, ch)
        }
        Fit::Fill => {
            let (tw, th) = if spec.enlarge {
                (bw, bh)
            } else {
                (bw.min(fw), bh.min(fh))
            };
            (tw, th, fw, fh)
        }
    };
    let crop_o = ((fw - cw) / 2.0, (fh - ch) / 2.0, cw, ch);
    if swap {
        Plan {
            out_w: th as u32,
            out_h: tw as u32,
            crop: (crop_o.1, crop_o.0, crop_o.3, crop_o.2),
        }
    } else {
        Plan {
            out_w: tw as u32,
            out_h: th as u32,
            crop: crop_o,
        }
    }
}

/// JPEG DCT scaling denominator (1, 2, 4 or 8) for a plan: keep ≥1.5× the output size
/// for 1/2 and 1/4, ≥1.4× for 1/8 (a DC-only decode is an exact box filter).
/// Measured (bench/THUMBS.md): with 1.5× the SSIM of every test photo equals that of a
/// 2× margin within 0.001; below 1.5× it drops by 0.002–0.005.
pub fn jpeg_shrink(plan: &Plan) -> u32 {
    let rx = plan.crop.2 / plan.out_w as f64;
    let ry = plan.crop.3 / plan.out_h as f64;
    let r = rx.min(ry);
    if r >= 8.0 * 1.4 {
        8
    } else if r >= 4.0 * 1.5 {
        4
    } else if r >= 2.0 * 1.5 {
        2
    } else {
        1
    }
}

/// A decoded image with what we need from its metadata.
struct Decoded {
    /// For a CMYK source: an `ImageRgba8` holding C, M, Y, K ink amounts (0 = no ink).
    image: DynamicImage,
    icc: Option<Vec<u8>>,
    orientation: Orientation,
    /// Factor by which the decode was shrunk relative to the header size.
    shrink: f64,
    /// `image` holds CMYK (from a CMYK or YCCK JPEG), not RGBA.
    cmyk: bool,
}

impl Decoded {
    /// Pixels at full size with no profile and no orientation (GIF, BMP).
    fn plain(image: DynamicImage) -> Decoded {
        Decoded {
            image,
            icc: None,
            orientation: Orientation::NoTransforms,
            shrink: 1.0,
            cmyk: false,
        }
    }
}

fn swaps(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Decode a JPEG at the DCT scale that suits the largest of `specs` (the least shrink).
fn decode_jpeg(input: &[u8], p: &Probe, specs: &[&Spec], cfg: &Config) -> Result<Decoded, Error> {
    let mut d = jpeg_decoder::Decoder::new(Cursor::new(input));
    d.set_max_decoding_buffer_size(usize::try_from(cfg.max_alloc_bytes).unwrap_or(usize::MAX));
    d.read_info().map_err(jpeg_err)?;
    let orientation = d
        .exif_data()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let den = specs
        .iter()
        .map(|s| jpeg_shrink(&plan(p.width, p.height, swaps(orientation), s)))
        .min()
        .unwrap_or(1);
    if den > 1 {
        // Our own decoder: exact 1/8 scale from the DC coefficients only (any sequential or
        // progressive file), or 1/4 and 1/2 through a reduced IDCT of the low coefficients
        // (sequential files); falls back to jpeg-decoder on anything unusual.
        let bytes_per_block = u64::from((8 / den) * (8 / den)).max(4);
        let max_blocks =
            usize::try_from(cfg.max_alloc_bytes / bytes_per_block).unwrap_or(usize::MAX);
        if let Some(dc) = super::jpeg_dc::decode_scaled(input, den, max_blocks)
            && dc.width == p.width.div_ceil(den)
            && dc.height == p.height.div_ceil(den)
        {
            let image = if dc.channels == 1 {
                image::GrayImage::from_raw(dc.width, dc.height, dc.data)
                    .map(DynamicImage::ImageLuma8)
            } else {
                image::RgbImage::from_raw(dc.width, dc.height, dc.data).map(DynamicImage::ImageRgb8)
            };
            if let Some(image) = image {
                return Ok(Decoded {
                    image,
                    icc: d.icc_profile(),
                    orientation,
                    shrink: den as f64,
                    cmyk: false,
                });
            }
        }
    }
    let (mut w, mut h) = (p.width, p.height);
    if den > 1 {
        let rw = p.width.div_ceil(den) as u16;
        let rh = p.height.div_ceil(den) as u16;
        let (sw, sh) = d.scale(rw, rh).map_err(jpeg_err)?;
        w = sw as u32;
        h = sh as u32;
    }
    let pixels = d.decode().map_err(jpeg_err)?;
    let info = d
        .info()
        .ok_or_else(|| Error::Corrupt("corrupt JPEG: no frame header".into()))?;
    let n = w as usize * h as usize;
    use jpeg_decoder::PixelFormat as P;
    let image = match info.pixel_format {
        P::L8 => {
            check_len(&pixels, n)?;
            image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
        }
        P::L16 => {
            check_len(&pixels, n * 2)?;
            // Big-endian 16-bit samples; keep the high byte.
            let v: Vec<u8> = pixels.chunks_exact(2).map(|c| c[0]).collect();
            image::GrayImage::from_raw(w, h, v).map(DynamicImage::ImageLuma8)
        }
        P::RGB24 => {
            check_len(&pixels, n * 3)?;
            image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
        }
        P::CMYK32 => {
            check_len(&pixels, n * 4)?;
            // `jpeg-decoder` reads every CMYK/YCCK file as Adobe-inverted (as Photoshop
            // writes them) and undoes the inversion and the YCCK transform, giving ink
            // amounts. A file without the Adobe marker stores ink amounts as they are, so
            // that inversion must be undone again.
            let mut pixels = pixels;
            if !super::jpeg_dc::has_adobe_marker(input) {
                pixels.iter_mut().for_each(|v| *v = 255 - *v);
            }
            image::RgbaImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgba8)
        }
    }
    .ok_or_else(|| Error::Corrupt("corrupt JPEG: short pixel buffer".into()))?;
    Ok(Decoded {
        image,
        icc: d.icc_profile(),
        orientation,
        shrink: if den > 1 { den as f64 } else { 1.0 },
        cmyk: info.pixel_format == P::CMYK32,
    })
}

fn check_len(buf: &[u8], n: usize) -> Result<(), Error> {
    if buf.len() < n {
        return Err(Error::Corrupt("truncated JPEG: short pixel buffer".into()));
    }
    Ok(())
}

/// Naive CMYK → RGB, for CMYK without a usable embedded profile: R = (1 − C)(1 − K) and
/// so on (what Pillow, libjpeg-based viewers and browsers do without a CMYK profile).
/// Input is ink amounts (0 = no ink).
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = 255 - px[3] as u32;
        for &c in &px[..3] {
            out.push((((255 - c as u32) * k + 127) / 255) as u8);
        }
    }
    out
}

fn tiff_err(e: tiff::TiffError) -> Error {
    use tiff::TiffError as T;
    match e {
        T::LimitsExceeded => Error::TooLarge("TIFF image over a decoding limit".into()),
        T::UnsupportedError(u) => Error::Unsupported(format!("unsupported TIFF variant: {u}")),
        T::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::Corrupt(format!("truncated TIFF: {io}"))
        }
        other => {
            let s = other.to_string();
            let l = s.to_ascii_lowercase();
            if l.contains("eof") || l.contains("end of file") || l.contains("truncat") {
                Error::Corrupt(format!("truncated TIFF: {s}"))
            } else {
                Error::Corrupt(format!("corrupt TIFF: {s}"))
            }
        }
    }
}

/// 8-bit chunky Gray/GrayA/RGB/RGBA TIFFs: decode with the `tiff` crate straight into the
/// buffer the resizer reads. The `image` wrapper decodes into a buffer of its own and then
/// copies it whole into another. Returns `Ok(None)` for anything else (the caller then
/// takes the generic path), before any pixel is decoded.
fn decode_tiff(input: &[u8], p: &Probe, cfg: &Config) -> Result<Option<Decoded>, Error> {
    use tiff::ColorType as C;
    use tiff::tags::Tag;
    let Ok(mut dec) = tiff::decoder::Decoder::new(Cursor::new(input)) else {
        return Ok(None);
    };
    let Ok((w, h)) = dec.dimensions() else {
        return Ok(None);
    };
    if (w, h) != (p.width, p.height) {
        return Ok(None);
    }
    let channels = match dec.colortype() {
        Ok(C::Gray(8)) => 1usize,
        Ok(C::GrayA(8)) => 2,
        Ok(C::RGB(8)) => 3,
        Ok(C::RGBA(8)) => 4,
        _ => return Ok(None),
    };
    match dec.find_tag_unsigned_vec::<u16>(Tag::SampleFormat) {
        Ok(None) => {}
        Ok(Some(v)) if v.iter().all(|&f| f == 1) => {}
        _ => return Ok(None),
    }
    let Ok(layout) = dec.image_buffer_layout() else {
        return Ok(None);
    };
    let len = w as usize * h as usize * channels;
    if layout.planes != 1 || layout.complete_len != len || layout.len != len {
        return Ok(None);
    }
    // The same split of max_alloc as the `image` wrapper: the output buffer, and what is
    // left of the budget for intermediate buffers and IFD values.
    if len as u64 > cfg.max_alloc_bytes {
        return Err(Error::TooLarge("TIFF image over a decoding limit".into()));
    }
    let inter = usize::try_from(cfg.max_alloc_bytes - len as u64).unwrap_or(usize::MAX);
    let mut limits = tiff::decoder::Limits::default();
    limits.decoding_buffer_size = len;
    limits.intermediate_buffer_size = inter;
    limits.ifd_value_size = inter;
    let mut dec = dec.with_limits(limits);
    let icc = dec.get_tag_u8_vec(Tag::IccProfile).ok();
    let orientation = dec
        .find_tag(Tag::Orientation)
        .ok()
        .flatten()
        .and_then(|v| Orientation::from_exif(v.into_u16().ok()?.min(255) as u8))
        .unwrap_or(Orientation::NoTransforms);
    let mut buf = vec![0u8; len];
    if !super::tiff_lzw::decode_strips(&mut dec, input, (w, h, channels), inter, &mut buf) {
        dec.read_image_bytes(&mut buf).map_err(tiff_err)?;
    }
    let image = match channels {
        1 => image::GrayImage::from_raw(w, h, buf).map(DynamicImage::ImageLuma8),
        2 => image::GrayAlphaImage::from_raw(w, h, buf).map(DynamicImage::ImageLumaA8),
        3 => image::RgbImage::from_raw(w, h, buf).map(DynamicImage::ImageRgb8),
        _ => image::RgbaImage::from_raw(w, h, buf).map(DynamicImage::ImageRgba8),
    }
    .ok_or_else(|| Error::Corrupt("corrupt TIFF: short pixel buffer".into()))?;
    Ok(Some(Decoded {
        image,
        icc,
        orientation,
        shrink: 1.0,
        cmyk: false,
    }))
}

/// The first frame of a GIF through our own decoder (see `gif_decode`); `None` for
/// anything it leaves to the generic path.
fn decode_gif(input: &[u8], p: &Probe, cfg: &Config) -> Option<Decoded> {
    let c = super::gif_decode::decode_first_frame(input, cfg.max_alloc_bytes)?;
    if (c.width, c.height) != (p.width, p.height) {
        return None;
    }
    let image = if c.channels == 3 {
        DynamicImage::ImageRgb8(image::RgbImage::from_raw(c.width, c.height, c.data)?)
    } else {
        DynamicImage::ImageRgba8(image::RgbaImage::from_raw(c.width, c.height, c.data)?)
    };
    Some(Decoded::plain(image))
}

fn decode_other(input: &[u8], p: &Probe, cfg: &Config) -> Result<Decoded, Error> {
    let mut r = ImageReader::with_format(Cursor::new(input), image_format(p.format));
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(cfg.max_alloc_bytes);
    limits.max_image_width = Some(p.width);
    limits.max_image_height = Some(p.height);
    r.limits(limits);
    let f = p.format;
    let mut dec = r.into_decoder().map_err(|e| image_err(f, e))?;
    let icc = dec.icc_profile().ok().flatten();
    let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
    let image = DynamicImage::from_decoder(dec).map_err(|e| image_err(f, e))?;
    Ok(Decoded {
        image,
        icc,
        orientation,
        shrink: 1.0,
        cmyk: false,
    })
}

/// Bring any decoded image to one of the four 8-bit layouts the resizer handles.
fn to_8bit(img: DynamicImage) -> DynamicImage {
    match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => img,
        DynamicImage::ImageLuma16(_) => DynamicImage::ImageLuma8(img.to_luma8()),
        DynamicImage::ImageLumaA16(_) => DynamicImage::ImageLumaA8(img.to_luma_alpha8()),
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.to_rgba8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

/// Drop an alpha channel that is fully opaque (cheaper resize, smaller output).
fn drop_opaque_alpha(img: DynamicImage) -> DynamicImage {
    match &img {
        DynamicImage::ImageRgba8(b) if b.pixels().all(|p| p.0[3] == 255) => {
            DynamicImage::ImageRgb8(img.to_rgb8())
        }
        DynamicImage::ImageLumaA8(b) if b.pixels().all(|p| p.0[1] == 255) => {
            DynamicImage::ImageLuma8(img.to_luma8())
        }
        _ => img,
    }
}

fn pixel_type(img: &DynamicImage) -> fr::PixelType {
    match img {
        DynamicImage::ImageLuma8(_) => fr::PixelType::U8,
        DynamicImage::ImageLumaA8(_) => fr::PixelType::U8x2,
        DynamicImage::ImageRgb8(_) => fr::PixelType::U8x3,
        _ => fr::PixelType::U8x4,
    }
}

fn rebuild(w: u32, h: u32, like: &DynamicImage, buf: Vec<u8>) -> Option<DynamicImage> {
    Some(match like {
        DynamicImage::ImageLuma8(_) => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, buf)?)
        }
        DynamicImage::ImageLumaA8(_) => {
            DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_raw(w, h, buf)?)
        }
        DynamicImage::ImageRgb8(_) => {
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, buf)?)
        }
        _ => DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, buf)?),
    })
}

/// Lanczos3 resize of `img` (8-bit layouts only) cropped to `crop`, to `w`×`h`.
/// With `alpha`, a fourth channel is alpha and is premultiplied during the resize by
/// `fast_image_resize`; without, all channels are independent (CMYK).
pub(crate) fn resize(
    img: &DynamicImage,
    crop: (f64, f64, f64, f64),
    w: u32,
    h: u32,
    alpha: bool,
) -> Result<DynamicImage, Error> {
    let (sw, sh) = (img.width(), img.height());
    let full = crop.0 <= 0.0 && crop.1 <= 0.0 && crop.2 >= sw as f64 && crop.3 >= sh as f64;
    if full && sw == w && sh == h {
        return Ok(img.clone());
    }
    let pt = pixel_type(img);
    let src = fr::images::ImageRef::new(sw, sh, img.as_bytes(), pt)
        .map_err(|e| Error::Corrupt(format!("resize: {e}")))?;
    let mut dst = fr::images::Image::new(w, h, pt);
    let mut opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3))
        .use_alpha(alpha);
    if !full {
        opts = opts.crop(crop.0, crop.1, crop.2, crop.3);
    }
    fr::Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| Error::Corrupt(format!("resize: {e}")))?;
    rebuild(w, h, img, dst.into_vec()).ok_or_else(|| Error::Corrupt("resize: bad buffer".into()))
}

type Transform = std::sync::Arc<moxcms::Transform8BitExecutor>;

/// The transform from the embedded ICC profile to sRGB for an image laid out like `img`
/// (RGB, RGBA, or CMYK when `cmyk`). `None` when there is no profile to apply: profiles
/// that cannot be parsed, or whose colour space does not match the pixels, are ignored
/// (RGB pixels are then taken as sRGB, CMYK converted naively).
fn srgb_transform(img: &DynamicImage, icc: &[u8], cmyk: bool) -> Option<Transform> {
    let src = moxcms::ColorProfile::new_from_slice(icc).ok()?;
    let (space, from, to) = match img {
        DynamicImage::ImageRgba8(_) if cmyk => (
            moxcms::DataColorSpace::Cmyk,
            moxcms::Layout::Rgba,
            moxcms::Layout::Rgb,
        ),
        DynamicImage::ImageRgb8(_) => (
            moxcms::DataColorSpace::Rgb,
            moxcms::Layout::Rgb,
            moxcms::Layout::Rgb,
        ),
        DynamicImage::ImageRgba8(_) => (
            moxcms::DataColorSpace::Rgb,
            moxcms::Layout::Rgba,
            moxcms::Layout::Rgba,
        ),
        _ => return None,
    };
    if src.color_space != space {
        return None;
    }
    let dst = moxcms::ColorProfile::new_srgb();
    src.create_transform_8bit(from, &dst, to, moxcms::TransformOptions::default())
        .ok()
}

/// Bring a resized image to sRGB: through `t` when there is one, else CMYK naively and
/// anything else as it is.
fn to_srgb(img: DynamicImage, t: Option<&Transform>, cmyk: bool) -> Result<DynamicImage, Error> {
    let (w, h) = (img.width(), img.height());
    let bad = || Error::Corrupt("colour conversion: bad buffer".into());
    let Some(t) = t else {
        return Ok(if cmyk {
            let rgb = cmyk_to_rgb(img.as_bytes());
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, rgb).ok_or_else(bad)?)
        } else {
            img
        });
    };
    let channels = if cmyk {
        3
    } else {
        img.color().channel_count() as usize
    };
    let mut out = vec![0u8; w as usize * h as usize * channels];
    t.transform(img.as_bytes(), &mut out)
        .map_err(|e| Error::Corrupt(format!("colour conversion: {e}")))?;
    if cmyk {
        Ok(DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w, h, out).ok_or_else(bad)?,
        ))
    } else {
        rebuild(w, h, &img, out).ok_or_else(bad)
    }
}

/// Composite alpha over `bg` (sRGB values, as browsers do).
fn flatten(img: DynamicImage, bg: [u8; 3]) -> DynamicImage {
    let blend = |c: u8, b: u8, a: u8| -> u8 {
        let a = a as u32;
        ((c as u32 * a + b as u32 * (255 - a) + 127) / 255) as u8
    };
    match img {
        DynamicImage::ImageRgba8(b) => {
            let (w, h) = b.dimensions();
            let mut out = Vec::with_capacity(w as usize * h as usize * 3);
            for p in b.pixels() {
                let [r, g, bl, a] = p.0;
                out.extend_from_slice(&[
                    blend(r, bg[0], a),
                    blend(g, bg[1], a),
                    blend(bl, bg[2], a),
                ]);
            }
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, out).expect("size"))
        }
        DynamicImage::ImageLumaA8(b) => {
            // A grey image on a coloured background becomes RGB.
            let (w, h) = b.dimensions();
            let mut out = Vec::with_capacity(w as usize * h as usize * 3);
            for p in b.pixels() {
                let [l, a] = p.0;
                out.extend_from_slice(&[
                    blend(l, bg[0], a),
                    blend(l, bg[1], a),
                    blend(l, bg[2], a),
                ]);
            }
            let rgb = DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, out).expect("size"));
            if bg[0] == bg[1] && bg[1] == bg[2] {
                DynamicImage::ImageLuma8(rgb.to_luma8())
            } else {
                rgb
            }
        }
        other => other,
    }
}

fn encode(img: &DynamicImage, format: Format, spec: &Spec, cap: u64) -> Result<Vec<u8>, Error> {
    let mut out = Capped {
        buf: Cursor::new(Vec::new()),
        cap,
        over: false,
    };
    match encode_into(img, format, spec, &mut out) {
        Ok(()) => Ok(out.buf.into_inner()),
        Err(_) if out.over => Err(Error::TooLarge(format!(
            "the encoded {} thumbnail is over the limit of {cap} bytes (thumbnail.max_output_bytes)",
            name(format)
        ))),
        Err(e) => Err(e),
    }
}

fn encode_into(
    img: &DynamicImage,
    format: Format,
    spec: &Spec,
    out: &mut Capped,
) -> Result<(), Error> {
    let (w, h) = (img.width(), img.height());
    let enc_err = |e: String| Error::Corrupt(format!("encoding {}: {e}", name(format)));
    match format {
        Format::Jpeg => {
            let (ct, data) = match img {
                DynamicImage::ImageLuma8(b) => (jpeg_encoder::ColorType::Luma, b.as_raw()),
                DynamicImage::ImageRgb8(b) => (jpeg_encoder::ColorType::Rgb, b.as_raw()),
                _ => return Err(enc_err("unexpected pixel layout".into())),
            };
            let mut e = jpeg_encoder::Encoder::new(&mut *out, spec.quality);
            e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
            e.set_progressive(spec.progressive);
            // Optimised Huffman tables only for progressive: zune-jpeg 0.5 (the `image`
            // crate's decoder) mis-decodes jpeg-encoder 0.7's optimised *baseline* tables.
            e.set_optimized_huffman_tables(spec.progressive);
            e.encode(data, w as u16, h as u16, ct)
                .map_err(|e| enc_err(e.to_string()))?;
        }
        Format::Webp => {
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut *out);
            let rgb;
            let img = match img {
                DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_) => {
                    rgb = if img.color().has_alpha() {
                        DynamicImage::ImageRgba8(img.to_rgba8())
                    } else {
                        DynamicImage::ImageRgb8(img.to_rgb8())
                    };
                    &rgb
                }
                _ => img,
            };
            img.write_with_encoder(enc)
                .map_err(|e| enc_err(e.to_string()))?;
        }
        Format::Gif => {
            let rgba = img.to_rgba8();
            let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut *out, 10);
            enc.encode(rgba.as_raw(), w, h, image::ExtendedColorType::Rgba8)
                .map_err(|e| enc_err(e.to_string()))?;
        }
        Format::Png | Format::Tiff | Format::Bmp => {
            img.write_to(out, image_format(format))
                .map_err(|e| enc_err(e.to_string()))?;
        }
    }
    Ok(())
}

/// The whole pipeline for one input and one spec (runs on the calling thread).
pub fn make(input: &[u8], spec: &Spec, cfg: &Config) -> Result<Thumbnail, Error> {
    make_many(input, std::slice::from_ref(spec), cfg)
        .pop()
        .unwrap_or_else(|| Err(Error::BadParams("no thumbnail spec".into())))
}

/// One decode, several thumbnails: the image is decoded once, at the JPEG shrink-on-load
/// scale that suits the largest of `specs`, then resized, converted and encoded for each.
/// One result per spec, in order; a spec that does not validate fails alone, an input that
/// cannot be decoded fails them all with the same error. No memory budget (see
/// [`make_each`]).
pub fn make_many(input: &[u8], specs: &[Spec], cfg: &Config) -> Vec<Result<Thumbnail, Error>> {
    let mut out = Vec::with_capacity(specs.len());
    make_each(input, specs, cfg, &mut |_| Ok(None), &mut |_, r| {
        out.push(r);
        true
    });
    out
}

/// Grants (or refuses) the memory a decode estimated it needs, before it starts.
pub type Reserve<'a> = dyn FnMut(u64) -> Result<Option<crate::budget::Reservation>, Error> + 'a;

/// As [`make_many`], but each thumbnail is handed to `each(index, result)` as soon as it
/// is encoded and dropped before the next one is made (so a job's peak memory is one
/// decoded image and one output); `each` returning false stops the rest. `reserve` is
/// called with the decode's memory estimate once the header has been read and checked,
/// before any pixel is decoded; its reservation is held until the last thumbnail.
pub fn make_each(
    input: &[u8],
    specs: &[Spec],
    cfg: &Config,
    reserve: &mut Reserve<'_>,
    each: &mut dyn FnMut(usize, Result<Thumbnail, Error>) -> bool,
) {
    let checks: Vec<Result<(), Error>> = specs
        .iter()
        .map(|s| s.validate_against(cfg).map_err(Error::BadParams))
        .collect();
    let valid: Vec<&Spec> = specs
        .iter()
        .zip(&checks)
        .filter(|(_, c)| c.is_ok())
        .map(|(s, _)| s)
        .collect();
    let prepared = if valid.is_empty() {
        Err(Error::BadParams("no valid thumbnail spec".into()))
    } else {
        prepare(input, &valid, cfg)
    };
    // Per-spec output checks (from the header), then the reservation, then the decode.
    let mut out_checks = Vec::with_capacity(specs.len());
    let mut vi = 0;
    for c in &checks {
        out_checks.push(match (c, &prepared) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), Err(e)) => Err(e.clone()),
            (Ok(()), Ok(p)) => {
                vi += 1;
                p.output_checks[vi - 1].clone()
            }
        });
    }
    let renderable: Vec<&Spec> = specs
        .iter()
        .zip(&out_checks)
        .filter(|(_, c)| c.is_ok())
        .map(|(s, _)| s)
        .collect();
    let decoded = match prepared {
        Err(e) => Err(e),
        Ok(_) if renderable.is_empty() => Err(Error::BadParams("no valid thumbnail spec".into())),
        Ok(p) => {
            let est = estimate(input, &p.probe, &renderable, cfg);
            match reserve(est) {
                Err(e) => Err(e),
                Ok(guard) => decode(input, p.probe, &renderable, cfg).map(|d| (d, guard)),
            }
        }
    };
    for (i, (spec, check)) in specs.iter().zip(out_checks).enumerate() {
        let r = check.and_then(|()| {
            let ((p, d, t), _) = decoded.as_ref().map_err(Clone::clone)?;
            render(p, d, t.as_ref(), spec, cfg)
        });
        if !each(i, r) {
            return;
        }
    }
}

/// What the header says, checked against the limits, before any pixel is decoded.
struct Prepared {
    probe: Probe,
    /// For each spec given: refused because its output would be over
    /// `max_output_bytes` whatever the pixels are.
    output_checks: Vec<Result<(), Error>>,
}

/// Input size, header and the limits it allows checking; the worst-case encoded size of
/// each spec.
fn prepare(input: &[u8], specs: &[&Spec], cfg: &Config) -> Result<Prepared, Error> {
    if input.len() as u64 > cfg.max_input_bytes {
        return Err(Error::TooLarge(format!(
            "input is {} bytes, over the limit of {} bytes",
            input.len(),
            cfg.max_input_bytes
        )));
    }
    if input.is_empty() {
        return Err(Error::Unsupported("unsupported input: empty".into()));
    }
    let p = probe(input)?;
    check_limits(input, &p, cfg)?;
    let output_checks = specs
        .iter()
        .map(|s| {
            // Orientation can only swap the sides: the worst case does not depend on it.
            let pl = plan(p.width, p.height, false, s);
            let fmt = s.format.resolve(p.format);
            let worst = worst_case_bytes(fmt, pl.out_w, pl.out_h);
            match worst {
                Some(n) if n > cfg.max_output_bytes => Err(Error::TooLarge(format!(
                    "a {}x{} {} thumbnail is {n} bytes uncompressed, over the limit of {} bytes (thumbnail.max_output_bytes)",
                    pl.out_w,
                    pl.out_h,
                    name(fmt),
                    cfg.max_output_bytes
                ))),
                _ => Ok(()),
            }
        })
        .collect();
    Ok(Prepared {
        probe: p,
        output_checks,
    })
}

/// The encoded size of a `w`×`h` thumbnail whatever its pixels, for the formats that
/// store them uncompressed (BMP: 24-bit rows padded to 4 bytes; TIFF: up to 4 channels);
/// `None` for the compressed ones, whose encoders are stopped at the cap instead.
pub fn worst_case_bytes(f: Format, w: u32, h: u32) -> Option<u64> {
    let (w, h) = (w as u64, h as u64);
    match f {
        Format::Bmp => Some((w * 3).div_ceil(4) * 4 * h + 54),
        Format::Tiff => Some(w * h * 4 + 1024),
        _ => None,
    }
}

/// Bytes for what every decode holds besides its pixel buffers: decoder tables and
/// state, an ICC profile (≤ [`MAX_ICC_BYTES`]) and its transform, the encoder's state.
pub const FIXED_OVERHEAD: u64 = 8 << 20;

/// The largest ICC profile we read (real profiles are < 1 MiB; a PNG's is inflated under
/// this cap, a bigger one is ignored).
pub const MAX_ICC_BYTES: u64 = 1 << 20;

/// Channels and sample size of the pixels as the decoder produces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Samples per pixel out of the decoder.
    pub channels: u64,
    /// Bytes per sample out of the decoder (1, 2 or 4).
    pub sample_bytes: u64,
    /// JPEG: progressive (its coefficients are kept whole until the end).
    pub progressive: bool,
}

/// Read the layout from the header (an upper bound where the header leaves it open).
pub fn layout(input: &[u8], p: &Probe) -> Layout {
    let l = |channels, sample_bytes| Layout {
        channels,
        sample_bytes,
        progressive: false,
    };
    match p.format {
        Format::Png => {
            // IHDR is the first chunk: bit depth at 24, colour type at 25. Our decoder
            // expands palette and transparency and strips 16-bit samples to 8 bits.
            let ct = input.get(25).copied().unwrap_or(6);
            let channels = match ct {
                0 => 2, // grey, + alpha from tRNS
                4 => 2,
                _ => 4,
            };
            l(channels, 1)
        }
        Format::Jpeg => {
            let mut d = jpeg_decoder::Decoder::new(Cursor::new(input));
            match d.read_info().ok().and(d.info()) {
                Some(info) => Layout {
                    channels: match info.pixel_format {
                        jpeg_decoder::PixelFormat::L8 => 1,
                        jpeg_decoder::PixelFormat::L16 => 2,
                        jpeg_decoder::PixelFormat::RGB24 => 3,
                        jpeg_decoder::PixelFormat::CMYK32 => 4,
                    },
                    sample_bytes: 1,
                    progressive: info.coding_process == jpeg_decoder::CodingProcess::DctProgressive,
                },
                None => Layout {
                    channels: 4,
                    sample_bytes: 1,
                    progressive: true,
                },
            }
        }
        Format::Tiff => {
            use tiff::ColorType as C;
            let ct = tiff::decoder::Decoder::new(Cursor::new(input))
                .ok()
                .and_then(|mut d| d.colortype().ok());
            let (channels, bits) = match ct {
                Some(C::Gray(b)) => (1, b),
                Some(C::GrayA(b)) => (2, b),
                Some(C::RGB(b)) | Some(C::YCbCr(b)) | Some(C::Lab(b)) => (3, b),
                Some(C::RGBA(b)) | Some(C::CMYK(b)) => (4, b),
                Some(C::CMYKA(b)) => (5, b),
                Some(C::Multiband {
                    bit_depth,
                    num_samples,
                }) => (u64::from(num_samples), bit_depth),
                _ => (4, 32),
            };
            l(channels, u64::from(bits).div_ceil(8).max(1))
        }
        Format::Gif | Format::Bmp | Format::Webp => l(4, 1),
    }
}

/// An upper bound of the bytes one decode and the rendering of its largest spec allocate
/// at once, from the header (see the measurements in `tests/thumbnail_bounds.rs`):
///
/// - the decoder: its output buffer (width × height × channels × bytes per sample, at the
///   JPEG shrink-on-load scale), plus what it keeps beside it — a JPEG's component planes
///   (and a progressive one's 16-bit coefficients at full size), the `image` decoders' own
///   copy for GIF, TIFF and BMP, WebP's YUV planes — and the 8-bit copy made of a 16-bit
///   or opaque-alpha result;
/// - rendering one spec: the source copy premultiplied for alpha, the resizer's
///   intermediate rows, two output-sized buffers alive at once (resized, then converted,
///   flattened or oriented), the encoder's own copy or planes and its output
///   (≤ `max_output_bytes`);
/// - [`FIXED_OVERHEAD`].
pub fn estimate(input: &[u8], p: &Probe, specs: &[&Spec], cfg: &Config) -> u64 {
    let lay = layout(input, p);
    let (w, h) = (p.width as u64, p.height as u64);
    let px = w * h;
    let den = if p.format == Format::Jpeg {
        // The orientation is not known yet: the smaller shrink of both is the safe bound.
        specs
            .iter()
            .flat_map(|s| [false, true].map(|swap| jpeg_shrink(&plan(p.width, p.height, swap, s))))
            .min()
            .unwrap_or(1) as u64
    } else {
        1
    };
    let (dw, dh) = (w.div_ceil(den), h.div_ceil(den));
    let dpx = dw * dh;
    let ch8 = lay.channels.min(4);
    let native = dpx * lay.channels * lay.sample_bytes;
    let decoded8 = dpx * ch8;
    let decoder_side = match p.format {
        // Component planes at the decoded scale; a progressive file's coefficients at
        // full size (2 bytes per sample), whatever the scale.
        Format::Jpeg => {
            dpx * lay.channels
                + if lay.progressive {
                    px * lay.channels * 2
                } else {
                    0
                }
        }
        // Two rows of raw samples (up to 8 bytes per pixel).
        Format::Png => w * 8 * 2,
        // A decoder-side frame or strip buffer as big as the image.
        Format::Gif | Format::Tiff | Format::Bmp => native + px,
        // RGBA plus YUV planes (lossy) or ARGB words (lossless).
        Format::Webp => px * 4,
    };
    // 16-bit → 8-bit, or opaque alpha dropped: one more 8-bit copy while the first lives.
    let conversion = decoded8;
    let decode = native + decoder_side + conversion;
    let render = specs
        .iter()
        .map(|s| {
            let pl = plan(p.width, p.height, false, s);
            let (ow, oh) = (pl.out_w as u64, pl.out_h as u64);
            let (cw, chh) = (
                (pl.crop.2 / den as f64).ceil() as u64,
                (pl.crop.3 / den as f64).ceil() as u64,
            );
            let premultiplied = if ch8.is_multiple_of(2) {
                cw * chh * ch8
            } else {
                0
            };
            // Either pass may come first; intermediate rows in 4 channels.
            let intermediate = (ow * chh).max(cw * oh) * 4;
            let outputs = ow * oh * 4 * 2;
            let fmt = s.format.resolve(p.format);
            let encoder = ow * oh * 4
                + worst_case_bytes(fmt, pl.out_w, pl.out_h)
                    .unwrap_or(ow * oh * 4 + 1024)
                    .min(cfg.max_output_bytes);
            premultiplied + intermediate + outputs + encoder
        })
        .max()
        .unwrap_or(0);
    FIXED_OVERHEAD + decode + render
}

/// Check the input against the limits and decode it, ready for [`render`]: 8-bit, opaque
/// alpha dropped, with the transform to sRGB of its embedded profile.
fn decode(
    input: &[u8],
    p: Probe,
    specs: &[&Spec],
    cfg: &Config,
) -> Result<(Probe, Decoded, Option<Transform>), Error> {
    let mut d = if p.format == Format::Jpeg {
        decode_jpeg(input, &p, specs, cfg)?
    } else if p.format == Format::Png {
        decode_png(input, &p, cfg)?
    } else if p.format == Format::Tiff
        && let Some(d) = decode_tiff(input, &p, cfg)?
    {
        d
    } else if p.format == Format::Gif
        && let Some(d) = decode_gif(input, &p, cfg)
    {
        d
    } else if p.format == Format::Bmp
        && let Some((w, h, rgb)) = super::bmp_decode::decode_rgb24(input, cfg.max_alloc_bytes)
        && (w, h) == (p.width, p.height)
        && let Some(image) = image::RgbImage::from_raw(w, h, rgb)
    {
        Decoded::plain(DynamicImage::ImageRgb8(image))
    } else {
        decode_other(input, &p, cfg)?
    };
    if d.icc
        .as_ref()
        .is_some_and(|icc| icc.len() as u64 > MAX_ICC_BYTES)
    {
        tracing::debug!("ICC profile over {MAX_ICC_BYTES} bytes ignored");
        d.icc = None;
    }
    if !d.cmyk {
        d.image = drop_opaque_alpha(to_8bit(d.image));
    }
    let t = d
        .icc
        .as_deref()
        .and_then(|icc| srgb_transform(&d.image, icc, d.cmyk));
    Ok((p, d, t))
}

fn png_err(e: png::DecodingError) -> Error {
    use png::DecodingError as D;
    match e {
        D::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::Corrupt(format!("truncated PNG: {io}"))
        }
        D::LimitsExceeded => Error::TooLarge("PNG image over a decoding limit".into()),
        other => {
            let s = other.to_string();
            let l = s.to_ascii_lowercase();
            if l.contains("eof") || l.contains("end of") || l.contains("truncat") {
                Error::Corrupt(format!("truncated PNG: {s}"))
            } else {
                Error::Corrupt(format!("corrupt PNG: {s}"))
            }
        }
    }
}

/// A PNG through the `png` crate directly: palette and transparency expanded and 16-bit
/// samples stripped to 8 bits as rows are decoded (no 16-bit copy of the image), text
/// chunks not read and the `iCCP` chunk not inflated by the decoder (it would inflate up
/// to its whole allocation limit); the profile is inflated by [`png_icc`] under
/// [`MAX_ICC_BYTES`] instead.
fn decode_png(input: &[u8], p: &Probe, cfg: &Config) -> Result<Decoded, Error> {
    // The decoder's own allocations: its row buffers and the chunks it keeps (PLTE, tRNS,
    // eXIf...), which are never larger than the input.
    let bytes = (p.width as u64 * 8 * 4 + input.len() as u64 + (1 << 20)).min(cfg.max_alloc_bytes);
    let mut dec = png::Decoder::new_with_limits(
        Cursor::new(input),
        png::Limits {
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
        },
    );
    dec.set_ignore_iccp_chunk(true);
    dec.set_ignore_text_chunk(true);
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(png_err)?;
    let info = reader.info();
    if (info.width, info.height) != (p.width, p.height) {
        return Err(Error::Corrupt("corrupt PNG: header changed".into()));
    }
    let orientation = info
        .exif_metadata
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let (ct, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight {
        return Err(Error::Unsupported(format!(
            "unsupported PNG variant: {depth:?}-bit output"
        )));
    }
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| Error::TooLarge("PNG image over a decoding limit".into()))?;
    if len as u64 > cfg.max_alloc_bytes {
        return Err(Error::TooLarge("PNG image over a decoding limit".into()));
    }
    let mut buf = vec![0u8; len];
    let frame = reader.next_frame(&mut buf).map_err(png_err)?;
    buf.truncate(frame.buffer_size());
    let (w, h) = (frame.width, frame.height);
    use png::ColorType as C;
    let image = match ct {
        C::Grayscale => image::GrayImage::from_raw(w, h, buf).map(DynamicImage::ImageLuma8),
        C::GrayscaleAlpha => {
            image::GrayAlphaImage::from_raw(w, h, buf).map(DynamicImage::ImageLumaA8)
        }
        C::Rgb => image::RgbImage::from_raw(w, h, buf).map(DynamicImage::ImageRgb8),
        C::Rgba => image::RgbaImage::from_raw(w, h, buf).map(DynamicImage::ImageRgba8),
        C::Indexed => None,
    }
    .ok_or_else(|| Error::Corrupt("corrupt PNG: short pixel buffer".into()))?;
    Ok(Decoded {
        image,
        icc: png_icc(input, MAX_ICC_BYTES),
        orientation,
        shrink: 1.0,
        cmyk: false,
    })
}

/// The embedded profile of a PNG (its `iCCP` chunk, before the first `IDAT`), inflated
/// to at most `max` bytes: `None` when there is none, it is damaged, or it inflates to
/// more than `max` (a zlib bomb stops there).
pub fn png_icc(input: &[u8], max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut pos = 8usize;
    while pos + 8 <= input.len() {
        let len = u32::from_be_bytes(input[pos..pos + 4].try_into().ok()?) as usize;
        let kind = &input[pos + 4..pos + 8];
        let data = input.get(pos + 8..(pos + 8).checked_add(len)?)?;
        match kind {
            b"IDAT" | b"IEND" => return None,
            b"iCCP" => {
                let nul = data.iter().take(80).position(|&b| b == 0)?;
                if data.get(nul + 1) != Some(&0) {
                    return None;
                }
                let mut out = Vec::new();
                let mut z = flate2::read::ZlibDecoder::new(data.get(nul + 2..)?).take(max + 1);
                z.read_to_end(&mut out).ok()?;
                if out.len() as u64 > max {
                    tracing::debug!("PNG iCCP profile inflates to over {max} bytes: ignored");
                    return None;
                }
                return Some(out);
            }
            _ => {}
        }
        pos = pos.checked_add(12 + len)?;
    }
    None
}

/// A `Write + Seek` sink for the encoders that fails once `cap` bytes would be passed;
/// `over` tells that this is why the encoder failed.
struct Capped {
    buf: Cursor<Vec<u8>>,
    cap: u64,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.position() + data.len() as u64 > self.cap {
            self.over = true;
            return Err(std::io::Error::other(
                "output over thumbnail.max_output_bytes",
            ));
        }
        self.buf.write(data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for Capped {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.buf.seek(pos)
    }
}

/// resize → colour → flatten → orient → encode, for one spec.
fn render(
    p: &Probe,
    d: &Decoded,
    t: Option<&Transform>,
    spec: &Spec,
    cfg: &Config,
) -> Result<Thumbnail, Error> {
    let out_format = spec.format.resolve(p.format);
    // Plan in header coordinates, then scale the crop to the decoded size.
    let pl = plan(p.width, p.height, swaps(d.orientation), spec);
    let s = d.shrink;
    let crop = (pl.crop.0 / s, pl.crop.1 / s, pl.crop.2 / s, pl.crop.3 / s);
    let img = resize(&d.image, crop, pl.out_w, pl.out_h, !d.cmyk)?;
    let mut img = to_srgb(img, t, d.cmyk)?;
    if !out_format.has_alpha() {
        img = flatten(img, spec.background);
    }
    img.apply_orientation(d.orientation);
    let bytes = encode(&img, out_format, spec, cfg.max_output_bytes)?;
    Ok(Thumbnail {
        bytes,
        width: img.width(),
        height: img.height(),
        format: out_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(w: u32, h: u32, fit: Fit, enlarge: bool) -> Spec {
        let mut s = Spec::new(w, h);
        s.fit = fit;
        s.enlarge = enlarge;
        s
    }

    #[test]
    fn plans() {
        let p = plan(4000, 3000, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!((p.out_w, p.out_h), (256, 192));
        let p = plan(4000, 3000, true, &spec(256, 256, Fit::Contain, false));
        // Displayed 3000x4000 -> 192x256, stored (before rotation) 256x192.
        assert_eq!((p.out_w, p.out_h), (256, 192));
        let p = plan(4000, 3000, false, &spec(256, 256, Fit::Cover, false));
        assert_eq!((p.out_w, p.out_h), (256, 256));
        assert!((p.crop.2 - 3000.0).abs() < 1e-6 && (p.crop.0 - 500.0).abs() < 1e-6);
        let p = plan(100, 50, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!((p.out_w, p.out_h), (100, 50));
        let p = plan(100, 50, false, &spec(256, 256, Fit::Contain, true));
        assert_eq!((p.out_w, p.out_h), (256, 128));
        let p = plan(100, 50, false, &spec(256, 256, Fit::Cover, false));
        assert_eq!((p.out_w, p.out_h), (100, 50));
        let p = plan(100, 50, false, &spec(256, 256, Fit::Fill, false));
        assert_eq!((p.out_w, p.out_h), (100, 50));
        let p = plan(1000, 500, false, &spec(200, 300, Fit::Fill, false));
        assert_eq!((p.out_w, p.out_h), (200, 300));
    }

    #[test]
    fn shrink_choice() {
        let p = plan(6000, 4000, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!(jpeg_shrink(&p), 8);
        let p = plan(1500, 1000, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!(jpeg_shrink(&p), 2);
        // 1/4 leaves 500 px for 256: ≥ 1.5×.
        let p = plan(2000, 1333, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!(jpeg_shrink(&p), 4);
        // 1/2 would leave 350 px for 256: < 1.5×.
        let p = plan(700, 467, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!(jpeg_shrink(&p), 1);
        let p = plan(300, 300, false, &spec(256, 256, Fit::Contain, false));
        assert_eq!(jpeg_shrink(&p), 1);
    }

    #[test]
    fn gif_frame_count_bounded() {
        assert_eq!(super::super::gif_frames::count_frames(b"GIF89a", 10), 0);
        assert_eq!(super::super::gif_frames::count_frames(b"", 10), 0);
    }
}
