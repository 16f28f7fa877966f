//! Our GIF first-frame decoder alone: any input must give a whole canvas or `None` (fall
//! back to the image crate), never a panic, an out-of-bounds access or more memory than
//! the bound.
#![no_main]

use downloader::thumbnail::gif_decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = gif_decode::decode_first_frame(data, 64 << 20) {
        let len = c.width as usize * c.height as usize * c.channels as usize;
        assert_eq!(c.data.len(), len);
        assert!(c.channels == 3 || c.channels == 4);
    }
});
