//! decode → resize → encode on arbitrary bytes. The pipeline is called directly (not
//! through `Thumbnailer`, whose `catch_unwind` would hide panics from the fuzzer).
#![no_main]

use downloader::thumbnail::{Config, Fit, OutputFormat, Spec, pipeline};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits keep each run fast and memory bounded.
    let cfg = Config {
        max_pixels: 4_000_000,
        max_alloc_bytes: 256 << 20,
        max_input_bytes: 4 << 20,
        max_frames: 100,
        threads: 1,
        max_output_pixels: 1 << 20,
        max_output_bytes: 16 << 20,
        max_memory_bytes: 256 << 20,
    };
    // The last byte picks the spec, so the image bytes stay intact at the front.
    let sel = data.last().copied().unwrap_or(0);
    let mut spec = Spec::new(
        [64, 256, 17, 1][(sel & 3) as usize],
        [64, 256, 33, 1][((sel >> 2) & 3) as usize],
    );
    spec.fit = [Fit::Contain, Fit::Cover, Fit::Fill, Fit::Contain][((sel >> 4) & 3) as usize];
    spec.format = [OutputFormat::Jpeg, OutputFormat::Png, OutputFormat::Same, OutputFormat::Jpeg]
        [((sel >> 6) & 3) as usize];
    spec.progressive = sel & 1 == 1;
    let _ = pipeline::make(data, &spec, &cfg);
});
