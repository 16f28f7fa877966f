//! Our own JPEG parser alone (fast, so many more executions than the full pipeline): the
//! DC-only 1/8 decode and the reduced-IDCT 1/4 and 1/2 decodes of the same bytes.
#![no_main]

use downloader::thumbnail::jpeg_dc;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for den in [8, 4, 2] {
        if let Some(img) = jpeg_dc::decode_scaled(data, den, 1 << 22) {
            assert_eq!(
                img.data.len(),
                img.width as usize * img.height as usize * img.channels as usize
            );
            assert!(img.channels == 1 || img.channels == 3);
        }
    }
});
