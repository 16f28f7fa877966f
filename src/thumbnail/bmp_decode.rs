//! Uncompressed 24-bit BMPs, the common kind, copied straight into an RGB buffer.
//!
//! The `image` decoder reads such a file row by row through its reader and converts each
//! pixel in a closure; here each row is one slice of the input, reversed from BGR in a
//! tight loop. Anything else (palettes, 16/32-bit, bit fields, RLE, OS/2 headers, data
//! that ends early) returns `None` and the caller decodes the file with `image`, which
//! reports any error exactly as before. Colour-space fields are ignored, as `image` does.

fn le32(d: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(i..i + 4)?.try_into().ok()?))
}

fn le16(d: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(i..i + 2)?.try_into().ok()?))
}

/// Width, height and RGB samples of a 24-bit `BI_RGB` BMP; `None` to leave the file to
/// the generic decoder, or if the buffer would exceed `max_alloc` bytes.
pub fn decode_rgb24(d: &[u8], max_alloc: u64) -> Option<(u32, u32, Vec<u8>)> {
    if !d.starts_with(b"BM") {
        return None;
    }
    let offset = le32(d, 10)? as usize;
    let header = le32(d, 14)?;
    if !matches!(header, 40 | 108 | 124) {
        return None;
    }
    let width = le32(d, 18)? as i32;
    let height = le32(d, 22)? as i32;
    if le16(d, 26)? != 1 || le16(d, 28)? != 24 || le32(d, 30)? != 0 {
        return None;
    }
    if width <= 0 || height == 0 || height == i32::MIN {
        return None;
    }
    let (w, h) = (width as usize, height.unsigned_abs() as usize);
    let len = w.checked_mul(h)?.checked_mul(3)?;
    if len as u64 > max_alloc {
        return None;
    }
    // Rows are padded to a multiple of 4 bytes and stored bottom-up unless the height
    // is negative.
    let stride = (w * 3).div_ceil(4) * 4;
    // Every row with its padding, as `image` reads them.
    let last = offset.checked_add(stride.checked_mul(h)?)?;
    if last > d.len() {
        return None;
    }
    let mut out = vec![0u8; len];
    for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
        let stored = if height > 0 { h - 1 - y } else { y };
        let start = offset + stored * stride;
        let src = &d[start..start + w * 3];
        for (o, i) in row.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
            o[0] = i[2];
            o[1] = i[1];
            o[2] = i[0];
        }
    }
    Some((w as u32, h as u32, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 24-bit BMP written by hand: `top_down` stores rows top first (negative height).
    fn bmp(w: usize, h: usize, top_down: bool, header: u32) -> (Vec<u8>, Vec<u8>) {
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let stride = (w * 3).div_ceil(4) * 4;
        let offset = 14 + header as usize;
        let mut d = Vec::new();
        d.extend_from_slice(b"BM");
        d.extend_from_slice(&((offset + stride * h) as u32).to_le_bytes());
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&(offset as u32).to_le_bytes());
        d.extend_from_slice(&header.to_le_bytes());
        d.extend_from_slice(&(w as i32).to_le_bytes());
        let hh = if top_down { -(h as i32) } else { h as i32 };
        d.extend_from_slice(&hh.to_le_bytes());
        d.extend_from_slice(&1u16.to_le_bytes());
        d.extend_from_slice(&24u16.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        d.extend_from_slice(&((stride * h) as u32).to_le_bytes());
        d.extend_from_slice(&[0x13, 0x0B, 0, 0, 0x13, 0x0B, 0, 0]);
        d.extend_from_slice(&[0; 8]);
        d.resize(offset, 0);
        for y in 0..h {
            let row = if top_down { y } else { h - 1 - y };
            for x in 0..w {
                let p = &rgb[(row * w + x) * 3..][..3];
                d.extend_from_slice(&[p[2], p[1], p[0]]);
            }
            d.resize(d.len() + stride - w * 3, 0);
        }
        (d, rgb)
    }

    #[test]
    fn matches_the_image_crate() {
        for (w, h, top_down, header) in [
            (17, 9, false, 40),
            (16, 5, true, 40),
            (3, 1, false, 124),
            (1, 7, true, 108),
        ] {
            let (data, rgb) = bmp(w, h, top_down, header);
            let reference = image::load_from_memory_with_format(&data, image::ImageFormat::Bmp)
                .unwrap()
                .to_rgb8();
            let (dw, dh, got) = decode_rgb24(&data, u64::MAX).expect("decodes");
            assert_eq!((dw, dh), (w as u32, h as u32));
            assert_eq!(got, rgb);
            assert_eq!(got, reference.into_raw(), "{w}x{h} top_down={top_down}");
        }
    }

    #[test]
    fn unusual_or_broken_falls_back() {
        let (data, _) = bmp(17, 9, false, 40);
        assert!(decode_rgb24(&data, 17 * 9 * 3 - 1).is_none());
        for cut in 0..data.len() {
            assert!(
                decode_rgb24(&data[..cut], u64::MAX).is_none(),
                "cut at {cut}"
            );
        }
        let mut bad = data.clone();
        bad[28] = 32; // 32 bits per pixel
        assert!(decode_rgb24(&bad, u64::MAX).is_none());
        let mut bad = data.clone();
        bad[30] = 1; // RLE8
        assert!(decode_rgb24(&bad, u64::MAX).is_none());
        let mut bad = data;
        bad[10..14].copy_from_slice(&u32::MAX.to_le_bytes()); // pixel data offset
        assert!(decode_rgb24(&bad, u64::MAX).is_none());
    }
}
