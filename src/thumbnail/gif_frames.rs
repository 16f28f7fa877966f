//! Count the frames of a GIF without decoding them: walk the block structure, skipping
//! sub-blocks. Every read is bounds-checked; a malformed stream just ends the count.

/// Number of image descriptors found, stopping early once `stop_after` is exceeded.
pub(crate) fn count_frames(data: &[u8], stop_after: u64) -> u64 {
    let mut frames = 0u64;
    if data.len() < 13 || !(data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a")) {
        return 0;
    }
    let flags = data[10];
    let mut pos = 13usize;
    if flags & 0x80 != 0 {
        pos += 3 * (1usize << ((flags & 7) + 1));
    }
    loop {
        let Some(&block) = data.get(pos) else {
            return frames;
        };
        pos += 1;
        match block {
            0x21 => {
                // Extension: label, then sub-blocks.
                pos += 1;
                match skip_sub_blocks(data, pos) {
                    Some(p) => pos = p,
                    None => return frames,
                }
            }
            0x2C => {
                frames += 1;
                if frames > stop_after {
                    return frames;
                }
                let Some(desc) = data.get(pos..pos + 9) else {
                    return frames;
                };
                let flags = desc[8];
                pos += 9;
                if flags & 0x80 != 0 {
                    pos += 3 * (1usize << ((flags & 7) + 1));
                }
                pos += 1; // LZW minimum code size
                match skip_sub_blocks(data, pos) {
                    Some(p) => pos = p,
                    None => return frames,
                }
            }
            _ => return frames, // 0x3B trailer or garbage
        }
    }
}

pub(crate) fn skip_sub_blocks(data: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *data.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            return Some(pos);
        }
        pos += len;
    }
}
