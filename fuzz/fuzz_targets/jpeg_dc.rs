//! The DC-only JPEG parser alone (fast, so many more executions than the full pipeline).
#![no_main]

use downloader::thumbnail::jpeg_dc;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(img) = jpeg_dc::decode(data, 1 << 22) {
        assert_eq!(
            img.data.len(),
            img.width as usize * img.height as usize * img.channels as usize
        );
        assert!(img.channels == 1 || img.channels == 3);
    }
});
