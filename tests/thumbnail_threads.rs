//! The thumbnail pool's bound is real: a decode uses only the thread it runs on.
//! (Alone in its own test binary, so that no other test's threads are counted.)

use downloader::thumbnail::{Config, OutputFormat, Spec, Thumbnailer};

/// CPU time (user + system, clock ticks) from a /proc stat file.
fn cpu_ticks(path: &str) -> u64 {
    let s = std::fs::read_to_string(path).unwrap();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn scaled_jpeg_decode_stays_on_the_calling_thread() {
    if !std::path::Path::new("/proc/thread-self/stat").exists() {
        eprintln!("skipped: no /proc/thread-self");
        return;
    }
    // A 1600x1200 photo-like JPEG; a 384 px target decodes it at 1/2 (jpeg-decoder's
    // scaled IDCT, whose stock multithreaded worker would start a thread per component).
    let (w, h) = (1600usize, 1200usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let v = (x * 7 + y * 3) ^ (x * y / 97);
            rgb.extend_from_slice(&[(v % 251) as u8, (x % 256) as u8, (y % 241) as u8]);
        }
    }
    let mut jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpeg, 90)
        .encode(&rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let t = Thumbnailer::new(Config {
        threads: 1,
        ..Config::default()
    });
    let mut s = Spec::new(384, 384);
    s.format = OutputFormat::Png;
    t.make_blocking(&jpeg, &s).unwrap(); // warm up
    let (p0, t0) = (
        cpu_ticks("/proc/self/stat"),
        cpu_ticks("/proc/thread-self/stat"),
    );
    // Enough work to measure in clock ticks (10 ms each), however fast the machine.
    for _ in 0..200 {
        let th = t.make_blocking(&jpeg, &s).unwrap();
        assert_eq!((th.width, th.height), (384, 288));
        if cpu_ticks("/proc/thread-self/stat") - t0 >= 12 {
            break;
        }
    }
    let (p1, t1) = (
        cpu_ticks("/proc/self/stat"),
        cpu_ticks("/proc/thread-self/stat"),
    );
    let (process, this) = (p1 - p0, t1 - t0);
    assert!(this >= 10, "too little work to measure: {this} ticks");
    // Whatever the process spent beyond this thread is other threads' work.
    assert!(
        process <= this + 3,
        "decode used other threads: process {process} ticks, this thread {this}"
    );
}
