//! Our LZW strip decoder for TIFF alone (new- and old-style strips, through
//! `thumbnail::lzw`): any input must end in `true` (strip filled)
//! or `false` (fall back to the tiff crate), never a panic or an out-of-bounds access.
#![no_main]

use downloader::thumbnail::tiff_lzw;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the strip's size (up to 64 KiB), the rest is the strip.
    if data.len() < 2 {
        return;
    }
    let len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let mut out = vec![0u8; len];
    let _ = tiff_lzw::decode_strip(&data[2..], &mut out);
});
