//! The first frame of a GIF, decoded straight into the buffer the resizer reads.
//!
//! The `image` wrapper has the `gif` crate expand every pixel to RGBA, then the pipeline
//! scans the result for transparency and copies it to RGB; here the LZW codes become
//! palette indices (through [`super::lzw`], whose table entries are spans of the output
//! already written) and each index becomes RGB, or RGBA only when the frame
//! really has a transparent pixel or leaves part of the canvas uncovered.
//!
//! It parses untrusted bytes, so every read is bounds-checked, and anything unusual (no
//! palette, a frame outside the logical screen, an embedded ICC profile, a bad code,
//! data that ends before the last pixel) returns `None`: the caller then decodes the
//! file with the `image` crate, which reports any error exactly as before.

use super::gif_frames::skip_sub_blocks;
use super::lzw::{self, Codes};

/// A decoded frame on its logical screen: RGB (`channels` 3) or RGBA (4), row-major.
pub struct Canvas {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

fn le16(d: &[u8], i: usize) -> Option<usize> {
    Some(*d.get(i)? as usize | (*d.get(i + 1)? as usize) << 8)
}

/// Decode the first frame; `None` to leave the file to the generic decoder. At most
/// `max_alloc` bytes are allocated for pixels (indices plus the canvas).
pub fn decode_first_frame(d: &[u8], max_alloc: u64) -> Option<Canvas> {
    if !(d.starts_with(b"GIF87a") || d.starts_with(b"GIF89a")) {
        return None;
    }
    let (sw, sh) = (le16(d, 6)?, le16(d, 8)?);
    let flags = *d.get(10)?;
    let mut pos = 13usize;
    let mut global = None;
    if flags & 0x80 != 0 {
        let n = 3 << ((flags & 7) + 1);
        global = Some(d.get(pos..pos + n)?);
        pos += n;
    }
    // The graphic control extension before the frame says which index is transparent.
    let mut transparent = None;
    loop {
        match *d.get(pos)? {
            0x21 => {
                let label = *d.get(pos + 1)?;
                let body = pos + 2;
                match label {
                    0xF9 => {
                        // One 4-byte sub-block, then the terminator (the gif crate
                        // refuses other shapes).
                        let b = d.get(body..body + 6)?;
                        if b[0] != 4 || b[5] != 0 {
                            return None;
                        }
                        transparent = (b[1] & 1 != 0).then_some(b[4]);
                    }
                    0xFF if d.get(body..body + 12)? == b"\x0bICCRGBG1012" => return None,
                    _ => {}
                }
                pos = skip_sub_blocks(d, body)?;
            }
            0x2C => break,
            _ => return None,
        }
    }
    let desc = d.get(pos + 1..pos + 10)?;
    let (left, top) = (le16(desc, 0)?, le16(desc, 2)?);
    let (w, h) = (le16(desc, 4)?, le16(desc, 6)?);
    let flags = desc[8];
    pos += 10;
    let mut palette = global;
    if flags & 0x80 != 0 {
        let n = 3 << ((flags & 7) + 1);
        palette = Some(d.get(pos..pos + n)?);
        pos += n;
    }
    let palette = palette?;
    if w == 0 || h == 0 || left + w > sw || top + h > sh {
        return None;
    }
    let (channels_max, frame) = (4u64, (w * h) as u64);
    if frame + (sw * sh) as u64 * channels_max > max_alloc {
        return None;
    }
    let min_size = *d.get(pos)?;
    if !(2..=8).contains(&min_size) {
        return None;
    }
    // The LZW data is split into sub-blocks of up to 255 bytes: join them.
    let mut stream = Vec::with_capacity(d.len() - pos);
    let mut q = pos + 1;
    loop {
        let len = *d.get(q)? as usize;
        q += 1;
        if len == 0 {
            break;
        }
        stream.extend_from_slice(d.get(q..q + len)?);
        q += len;
    }
    let mut indices = vec![0u8; w * h];
    lzw::decode(&stream, &mut indices, Codes::gif(min_size)).ok()?;

    // Rows in the order they were stored: interlaced frames store every 8th row from 0,
    // every 8th from 4, every 4th from 2, then every 2nd from 1.
    let rows: Vec<usize> = if flags & 0x40 != 0 {
        [(0, 8), (4, 8), (2, 4), (1, 2)]
            .into_iter()
            .flat_map(|(start, step)| (start..h).step_by(step))
            .collect()
    } else {
        (0..h).collect()
    };
    let colours = palette.len() / 3;
    let out_of_palette = indices
        .iter()
        .copied()
        .max()
        .is_some_and(|m| m as usize >= colours);
    let shows_transparent = transparent.is_some_and(|t| memchr::memchr(t, &indices).is_some());
    let covers = w == sw && h == sh;
    if covers && !out_of_palette && !shows_transparent {
        let mut lut = [[0u8; 3]; 256];
        for (l, c) in lut.iter_mut().zip(palette.chunks_exact(3)) {
            l.copy_from_slice(c);
        }
        let mut data = vec![0u8; sw * sh * 3];
        for (src, &y) in indices.chunks_exact(w).zip(&rows) {
            let out = data.get_mut(y * sw * 3..(y + 1) * sw * 3)?;
            for (o, &i) in out.chunks_exact_mut(3).zip(src) {
                o.copy_from_slice(&lut[i as usize]);
            }
        }
        return Some(Canvas {
            width: sw as u32,
            height: sh as u32,
            channels: 3,
            data,
        });
    }
    // As the `gif` crate and `image` do: the transparent index keeps its colour with
    // alpha 0; an index past the palette and the canvas outside the frame stay (0,0,0,0).
    let mut lut = [[0u8; 4]; 256];
    for (i, (l, c)) in lut.iter_mut().zip(palette.chunks_exact(3)).enumerate() {
        let alpha = if transparent == Some(i as u8) { 0 } else { 255 };
        *l = [c[0], c[1], c[2], alpha];
    }
    let mut data = vec![0u8; sw * sh * 4];
    for (src, &y) in indices.chunks_exact(w).zip(&rows) {
        let start = ((top + y) * sw + left) * 4;
        let out = data.get_mut(start..start + w * 4)?;
        for (o, &i) in out.chunks_exact_mut(4).zip(src) {
            o.copy_from_slice(&lut[i as usize]);
        }
    }
    Some(Canvas {
        width: sw as u32,
        height: sh as u32,
        channels: 4,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the `image` crate makes of the first frame, as RGBA.
    fn reference(data: &[u8]) -> image::RgbaImage {
        image::load_from_memory_with_format(data, image::ImageFormat::Gif)
            .unwrap()
            .to_rgba8()
    }

    fn to_rgba(c: &Canvas) -> Vec<u8> {
        if c.channels == 4 {
            return c.data.clone();
        }
        c.data
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect()
    }

    /// left, top, width, height, indices, interlaced.
    type TestFrame = (u16, u16, u16, u16, Vec<u8>, bool);

    /// Encode frames with the `gif` crate (its LZW encoder is weezl's, not ours).
    fn encode(
        (sw, sh): (u16, u16),
        frames: &[TestFrame],
        palette: &[u8],
        transparent: Option<u8>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut e = gif::Encoder::new(&mut out, sw, sh, palette).unwrap();
            for (left, top, w, h, idx, interlaced) in frames {
                let mut f = gif::Frame {
                    left: *left,
                    top: *top,
                    width: *w,
                    height: *h,
                    interlaced: *interlaced,
                    transparent,
                    ..gif::Frame::default()
                };
                f.buffer = std::borrow::Cow::Borrowed(idx);
                e.write_frame(&f).unwrap();
            }
        }
        out
    }

    fn noise(n: usize, colours: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Runs and noise, so that both long and short strings occur.
                if (i / 37) % 3 == 0 {
                    ((i / 37) % colours) as u8
                } else {
                    ((s >> 33) as usize % colours) as u8
                }
            })
            .collect()
    }

    fn palette(colours: usize) -> Vec<u8> {
        (0..colours * 3).map(|i| (i * 37 % 256) as u8).collect()
    }

    #[test]
    fn matches_the_image_crate() {
        for (colours, interlaced, transparent) in [
            (256, false, None),
            (4, false, None),
            (2, true, None),
            (64, true, Some(5)),
            (16, false, Some(200)),
        ] {
            let (w, h) = (301u16, 203u16);
            let idx = noise(w as usize * h as usize, colours, colours as u64);
            let data = encode(
                (w, h),
                &[(0, 0, w, h, idx, interlaced)],
                &palette(colours),
                transparent,
            );
            let c = decode_first_frame(&data, u64::MAX).expect("decodes");
            assert_eq!((c.width, c.height), (w as u32, h as u32));
            let expect_alpha = transparent.is_some_and(|t| (t as usize) < colours);
            assert_eq!(c.channels == 4, expect_alpha, "{colours} colours");
            assert_eq!(
                to_rgba(&c),
                reference(&data).into_raw(),
                "{colours} colours"
            );
        }
    }

    #[test]
    fn frame_smaller_than_the_screen_and_later_frames() {
        let idx = noise(50 * 40, 8, 7);
        let second = noise(100 * 80, 8, 8);
        let data = encode(
            (100, 80),
            &[(30, 20, 50, 40, idx, false), (0, 0, 100, 80, second, false)],
            &palette(8),
            None,
        );
        let c = decode_first_frame(&data, u64::MAX).expect("decodes");
        assert_eq!(c.channels, 4);
        assert_eq!(to_rgba(&c), reference(&data).into_raw());
    }

    #[test]
    fn long_runs_fill_the_code_table() {
        // A flat image makes ever longer strings; a big noisy one fills all 4096 codes.
        for (w, h, colours) in [(640u16, 480u16, 1usize), (1000, 1000, 256)] {
            let idx = if colours == 1 {
                vec![0; w as usize * h as usize]
            } else {
                noise(w as usize * h as usize, colours, 3)
            };
            let data = encode(
                (w, h),
                &[(0, 0, w, h, idx, false)],
                &palette(colours.max(2)),
                None,
            );
            let c = decode_first_frame(&data, u64::MAX).expect("decodes");
            assert_eq!(to_rgba(&c), reference(&data).into_raw());
        }
    }

    #[test]
    fn unusual_or_broken_falls_back() {
        let (w, h) = (64u16, 48u16);
        let data = encode(
            (w, h),
            &[(0, 0, w, h, noise(64 * 48, 16, 1), false)],
            &palette(16),
            None,
        );
        assert!(decode_first_frame(&data, u64::MAX).is_some());
        // Over the allocation bound.
        assert!(decode_first_frame(&data, 64 * 48 * 4).is_none());
        // Truncated anywhere: never a panic, and never a frame from missing data.
        for cut in 0..data.len() - 1 {
            if let Some(c) = decode_first_frame(&data[..cut], u64::MAX) {
                assert_eq!(c.data.len(), 64 * 48 * 3);
            }
        }
        // Truncated inside the LZW data (the sub-block lengths patched to match).
        let mut short = data.clone();
        let desc = [0x2C, 0, 0, 0, 0, 64, 0, 48, 0];
        let start = short.windows(9).position(|x| x == desc).unwrap() + 10 + 1;
        short[start] = 20;
        short.truncate(start + 21);
        short.extend_from_slice(&[0, 0x3B]);
        assert!(decode_first_frame(&short, u64::MAX).is_none());
        // Flipped bytes: any result, no panic.
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 0x5A;
            let _ = decode_first_frame(&bad, u64::MAX);
        }
        // A graphic control extension split over two sub-blocks (the gif crate refuses
        // it): left to the generic decoder.
        let gce = encode(
            (w, h),
            &[(0, 0, w, h, noise(64 * 48, 16, 1), false)],
            &palette(16),
            Some(3),
        );
        let at = gce.windows(3).position(|x| x == [0x21, 0xF9, 4]).unwrap();
        assert!(decode_first_frame(&gce, u64::MAX).is_some());
        let mut split = gce[..at + 7].to_vec();
        split.extend_from_slice(&[4, 0, 0, 0, 0]);
        split.extend_from_slice(&gce[at + 7..]);
        assert!(decode_first_frame(&split, u64::MAX).is_none());
        assert!(decode_first_frame(b"GIF89a", u64::MAX).is_none());
        assert!(decode_first_frame(b"", u64::MAX).is_none());
    }
}
