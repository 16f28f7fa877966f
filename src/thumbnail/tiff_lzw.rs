//! A TIFF LZW strip decoder that writes straight into the image buffer.
//!
//! Every LZW string is the previous string plus one byte, and both already sit side by
//! side in the output, so a table entry is just (offset, length) into the strip's output
//! and decoding a code is a short forward copy. Anything unusual (a bad code, a table
//! overflow without Clear, data that ends early) makes `decode_strips` return `false`
//! and the caller decodes the image again with the `tiff` crate, which reports the error
//! exactly as before.

use std::io::Cursor;

use tiff::decoder::Decoder;
use tiff::tags::Tag;

const CLEAR: usize = 256;
const EOI: usize = 257;
const FIRST: usize = 258;
const MAX: usize = 4096;

/// Decode one LZW strip (MSB bit order, TIFF early code-width change) into `out`,
/// which must be filled exactly; bytes past its end are discarded, as `tiff` does.
pub fn decode_strip(src: &[u8], out: &mut [u8]) -> bool {
    let mut offs = [0u32; MAX];
    let mut lens = [0u16; MAX];
    let mut next = FIRST;
    let mut width = 9u32;
    // Output span of the previous code, if any since the last Clear.
    let mut prev: Option<(usize, usize)> = None;
    let (mut bits, mut nbits, mut ip) = (0u64, 0u32, 0usize);
    let mut p = 0usize;
    let end = out.len();
    while p < end {
        if nbits < width {
            if ip + 8 <= src.len() {
                // Branchless refill: the bits below the `nbits` we count are true stream
                // bits too, so OR-ing the same byte in again later changes nothing.
                let v = u64::from_be_bytes(src[ip..ip + 8].try_into().expect("8 bytes"));
                bits |= v >> nbits;
                let take = (63 - nbits) / 8;
                ip += take as usize;
                nbits += take * 8;
            } else {
                while nbits <= 56 && ip < src.len() {
                    bits |= (src[ip] as u64) << (56 - nbits);
                    ip += 1;
                    nbits += 8;
                }
                if nbits < width {
                    return false;
                }
            }
        }
        let code = (bits >> (64 - width)) as usize;
        bits <<= width;
        nbits -= width;
        if code == CLEAR {
            next = FIRST;
            width = 9;
            prev = None;
            continue;
        }
        if code == EOI {
            return false;
        }
        let (off, len) = if code < 256 {
            (usize::MAX, 1)
        } else if code < next {
            (offs[code] as usize, lens[code] as usize)
        } else if code == next
            && let Some((pp, pl)) = prev
        {
            (pp, pl + 1)
        } else {
            return false;
        };
        if let Some((pp, pl)) = prev {
            if next >= MAX {
                return false;
            }
            offs[next] = pp as u32;
            lens[next] = (pl + 1) as u16;
            next += 1;
            if next + 1 >= (1 << width) && width < 12 {
                width += 1;
            }
        }
        prev = Some((p, len));
        p += put_string(out, p, code as u8, off, len);
    }
    true
}

/// Write one LZW string at `out[p..]`, cut at the end of `out`: the byte `literal` when
/// `off` is `usize::MAX`, else a copy of `len` bytes from `out[off..]` (earlier output).
/// Returns the number of bytes written.
#[inline(always)]
pub(crate) fn put_string(out: &mut [u8], p: usize, literal: u8, off: usize, len: usize) -> usize {
    let end = out.len();
    let n = len.min(end - p);
    if off == usize::MAX {
        out[p] = literal;
    } else if n <= 8 && p + 8 <= end && off + 8 <= p {
        let mut v = [0u8; 8];
        v.copy_from_slice(&out[off..off + 8]);
        out[p..p + 8].copy_from_slice(&v);
    } else {
        // Forward byte copy: also right for the one overlapping case (KwKwK).
        for i in 0..n {
            out[p + i] = out[off + i];
        }
    }
    n
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
