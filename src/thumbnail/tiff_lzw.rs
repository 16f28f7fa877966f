//! TIFF LZW strips decoded straight into the image buffer by [`super::lzw`].
//!
//! Anything unusual (a layout other than 8-bit chunky strips, a bad code, data that ends
//! early) makes `decode_strips` return `false` and the caller decodes the image again
//! with the `tiff` crate, which reports the error exactly as before. Old-style LZW
//! strips (LSB-first, which the `tiff` crate does not read) are decoded here too.

use std::io::Cursor;

use tiff::decoder::Decoder;
use tiff::tags::Tag;

use super::lzw::{self, Codes};

/// Decode one LZW strip (new- or old-style, see [`Codes::tiff_strip`]) into `out`,
/// which must be filled exactly; bytes past its end are discarded, as `tiff` does.
pub fn decode_strip(src: &[u8], out: &mut [u8]) -> bool {
    lzw::decode(src, out, Codes::tiff_strip(src)).is_ok()
}

/// Decode a stripped, chunky, 8-bit LZW TIFF (predictor none or horizontal) into `buf`
/// (`w`×`h`×`channels` bytes). `false` if the image is not such a TIFF or if anything
/// in the data is off: the caller then decodes it with the `tiff` crate.
pub(crate) fn decode_strips(
    dec: &mut Decoder<Cursor<&[u8]>>,
    input: &[u8],
    (w, h, channels): (u32, u32, usize),
    max_strip_bytes: usize,
    buf: &mut [u8],
) -> bool {
    let tag = |d: &mut Decoder<Cursor<&[u8]>>, t| d.find_tag_unsigned::<u64>(t).ok().flatten();
    if tag(dec, Tag::Compression) != Some(5) {
        return false;
    }
    let predict = match tag(dec, Tag::Predictor) {
        None | Some(1) => false,
        Some(2) => true,
        _ => return false,
    };
    // Not tiled, chunky, and a photometric interpretation that needs no conversion.
    if tag(dec, Tag::TileWidth).is_some()
        || !matches!(tag(dec, Tag::PlanarConfiguration), None | Some(1))
        || !matches!(tag(dec, Tag::PhotometricInterpretation), Some(1) | Some(2))
        || !matches!(tag(dec, Tag::FillOrder), None | Some(1))
    {
        return false;
    }
    // Exactly the samples we output (an extra non-alpha sample is dropped by `tiff`).
    if tag(dec, Tag::SamplesPerPixel).unwrap_or(1) != channels as u64 {
        return false;
    }
    let rps = tag(dec, Tag::RowsPerStrip)
        .unwrap_or(h as u64)
        .min(h as u64);
    if rps == 0 {
        return false;
    }
    let (Ok(Some(offsets)), Ok(Some(counts))) = (
        dec.find_tag_unsigned_vec::<u64>(Tag::StripOffsets),
        dec.find_tag_unsigned_vec::<u64>(Tag::StripByteCounts),
    ) else {
        return false;
    };
    let strips = (h as u64).div_ceil(rps) as usize;
    if offsets.len() < strips || counts.len() < strips {
        return false;
    }
    let row = w as usize * channels;
    if buf.len() != row * h as usize {
        return false;
    }
    for (i, chunk) in buf.chunks_mut(row * rps as usize).enumerate() {
        let (o, c) = (offsets[i], counts[i]);
        if c > max_strip_bytes as u64 {
            return false;
        }
        let Some(src) = usize::try_from(o)
            .ok()
            .zip(usize::try_from(c).ok())
            .and_then(|(o, c)| input.get(o..o.checked_add(c)?))
        else {
            return false;
        };
        if !decode_strip(src, chunk) {
            return false;
        }
        if predict {
            for r in chunk.chunks_exact_mut(row) {
                for x in channels..row {
                    r[x] = r[x].wrapping_add(r[x - channels]);
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiff::encoder::{Compression, Predictor, TiffEncoder, colortype};

    fn encode(w: u32, h: u32, data: &[u8], predictor: Predictor) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut e = TiffEncoder::new(&mut out)
            .unwrap()
            .with_compression(Compression::Lzw)
            .with_predictor(predictor);
        e.write_image::<colortype::RGB8>(w, h, data).unwrap();
        out.into_inner()
    }

    /// Smooth areas (long strings, table resets) next to noise (short strings).
    fn pixels(w: u32, h: u32) -> Vec<u8> {
        let mut s = 0x9e37_79b9u32;
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3u32 {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    v.push(if x < w / 2 {
                        ((x / 7 + y / 5 + c * 40) % 256) as u8
                    } else {
                        (s >> 24) as u8
                    });
                }
            }
        }
        v
    }

    fn fast(tif: &[u8], w: u32, h: u32) -> Option<Vec<u8>> {
        let mut d = Decoder::new(Cursor::new(tif)).unwrap();
        let mut buf = vec![0u8; (w * h * 3) as usize];
        decode_strips(&mut d, tif, (w, h, 3), usize::MAX, &mut buf).then_some(buf)
    }

    #[test]
    fn matches_the_tiff_crate() {
        for (w, h) in [(1, 1), (37, 5), (300, 211), (1000, 90)] {
            let px = pixels(w, h);
            for pr in [Predictor::None, Predictor::Horizontal] {
                let tif = encode(w, h, &px, pr);
                assert_eq!(fast(&tif, w, h).as_deref(), Some(&px[..]), "{w}x{h} {pr:?}");
            }
        }
    }

    #[test]
    fn bad_data_falls_back() {
        let (w, h) = (300, 211);
        let tif = encode(w, h, &pixels(w, h), Predictor::None);
        // Cut inside the strip data: the fast path gives up, it does not make pixels up.
        let cut = &tif[..tif.len() / 2];
        let Ok(mut d) = Decoder::new(Cursor::new(cut)) else {
            return;
        };
        let mut buf = vec![0u8; (w * h * 3) as usize];
        assert!(!decode_strips(&mut d, cut, (w, h, 3), usize::MAX, &mut buf));
        // Garbage codes.
        assert!(!decode_strip(&[0xff; 64], &mut [0u8; 1000]));
        assert!(!decode_strip(&[], &mut [0u8; 10]));
    }

    #[test]
    fn old_style_strips() {
        // Old-style LZW is packed as GIF's with 8-bit literals; weezl writes it so.
        let px = pixels(300, 20);
        let strip = weezl::encode::Encoder::new(weezl::BitOrder::Lsb, 8)
            .encode(&px)
            .unwrap();
        let mut out = vec![0u8; px.len()];
        assert!(decode_strip(&strip, &mut out));
        assert_eq!(out, px);
        // The same bytes read as new-style are refused or differ.
        let mut new = vec![0u8; px.len()];
        let fast = lzw::decode(&strip, &mut new, Codes::TIFF).is_ok();
        assert!(!fast || new != px);
    }

    #[test]
    fn random_data_never_panics() {
        let mut s = 1u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for _ in 0..2000 {
            let n = (rnd() % 300) as usize;
            // Start with Clear so that the codes get somewhere.
            let mut src = vec![0x80u8, 0x00];
            src.extend((0..n).map(|_| (rnd() >> 24) as u8));
            let mut out = vec![0u8; (rnd() % 2000) as usize];
            let _ = decode_strip(&src, &mut out);
        }
    }
}
