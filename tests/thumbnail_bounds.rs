//! Every thumbnail is bounded: its output size (pixels, bytes), the memory its decode may
//! reserve (and the estimate it reserves is an upper bound of what it really allocates,
//! measured here by a counting allocator), the compressed metadata it inflates, and its
//! place in the pool (a flood of API work does not push a job's thumbnail back).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use downloader::thumbnail::{Class, Config, ErrorKind, OutputFormat, Spec, Thumbnailer, pipeline};
use downloader::web::thumbnail as http;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

// ---- a counting allocator: bytes live and their peak, per thread ----

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            account(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            account(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        account(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            account(new as i64 - l.size() as i64);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated (beyond what was live before) by `f` on this thread.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(|p| p.get());
    (r, (peak - base).max(0) as u64)
}

// ---- fixtures, made here ----

fn noise(w: u32, h: u32, channels: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    let mut v = Vec::with_capacity(w as usize * h as usize * channels);
    for i in 0..(w as usize * h as usize * channels) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Smooth-ish content with some noise, like a photo.
        v.push(((i / channels % w as usize) as u32 / 4 + (x & 31)) as u8);
    }
    v
}

fn encode(img: image::DynamicImage, f: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, f).unwrap();
    out.into_inner()
}

fn jpeg_rgb(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_raw(w, h, noise(w, h, 3, 1)).unwrap();
    encode(img.into(), image::ImageFormat::Jpeg)
}

fn png_rgba16(w: u32, h: u32) -> Vec<u8> {
    let px: Vec<u16> = noise(w, h, 4, 2)
        .into_iter()
        .map(|b| b as u16 * 257)
        .collect();
    let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_raw(w, h, px).unwrap();
    encode(
        image::DynamicImage::ImageRgba16(img),
        image::ImageFormat::Png,
    )
}

fn gif(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_raw(w, h, noise(w, h, 4, 3)).unwrap();
    encode(img.into(), image::ImageFormat::Gif)
}

fn tiff_rgb(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_raw(w, h, noise(w, h, 3, 4)).unwrap();
    encode(img.into(), image::ImageFormat::Tiff)
}

fn webp_rgba(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_raw(w, h, noise(w, h, 4, 5)).unwrap();
    encode(img.into(), image::ImageFormat::WebP)
}

fn bmp_rgb(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_raw(w, h, noise(w, h, 3, 6)).unwrap();
    encode(img.into(), image::ImageFormat::Bmp)
}

fn tiny_png() -> Vec<u8> {
    encode(
        image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10])).into(),
        image::ImageFormat::Png,
    )
}

/// A PNG chunk: length, type, data, CRC.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(data.len() + 12);
    c.extend_from_slice(&(data.len() as u32).to_be_bytes());
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    let mut h = flate2::Crc::new();
    h.update(kind);
    h.update(data);
    c.extend_from_slice(&h.sum().to_be_bytes());
    c
}

/// A zlib stream of `reps` × 258 + 1 zeros, written by hand: one fixed-Huffman block of
/// a literal 0 and `reps` copies of (length 258, distance 1), 13 bits each — about 160×
/// its size when inflated (compressing gigabytes of zeros here would take minutes).
fn zeros_zlib(reps: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, v: u64, n: u32) {
            self.acc |= v << self.n;
            self.n += n;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code: most significant bit first.
        fn code(&mut self, c: u64, n: u32) {
            let rev = (0..n).fold(0, |r, i| r | ((c >> i) & 1) << (n - 1 - i));
            self.put(rev, n);
        }
    }
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE = fixed Huffman
    b.code(0x30, 8); // literal 0
    for _ in 0..reps {
        b.code(0b1100_0101, 8); // length code 285 = 258
        b.code(0, 5); // distance code 0 = 1
    }
    b.code(0, 7); // end of block
    if b.n > 0 {
        b.put(0, 8 - b.n);
    }
    // Adler-32 of n zeros: a = 1, b = n mod 65521.
    let n = (reps as u64 * 258 + 1) % 65521;
    b.out.extend_from_slice(&((n << 16) | 1).to_be_bytes()[4..]);
    b.out
}

/// A 1×1 PNG whose `iCCP` chunk is ~2 MB of zlib-compressed zeros (~330 MB inflated).
fn iccp_bomb() -> Vec<u8> {
    let png = tiny_png();
    let mut data = b"bomb\0\0".to_vec();
    data.extend_from_slice(&zeros_zlib(2_000_000 * 8 / 13));
    // Signature and IHDR (8 + 25 bytes), the iCCP chunk, then the rest.
    let mut out = png[..33].to_vec();
    out.extend_from_slice(&chunk(b"iCCP", &data));
    out.extend_from_slice(&png[33..]);
    out
}

fn cfg() -> Config {
    Config {
        threads: 2,
        ..Config::default()
    }
}

fn spec(w: u32, h: u32, format: OutputFormat) -> Spec {
    let mut s = Spec::new(w, h);
    s.format = format;
    s
}

// ---- the estimate is an upper bound of the real peak ----

/// Measured peak of one decode + render on this thread, and its estimate.
fn measure(input: &[u8], s: &Spec) -> (u64, u64) {
    let cfg = cfg();
    let p = pipeline::probe(input).unwrap();
    let est = pipeline::estimate(input, &p, &[s], &cfg);
    let (r, peak) = peak_of(|| pipeline::make(input, s, &cfg));
    let t = r.unwrap_or_else(|e| panic!("{s:?}: {e}"));
    assert!(!t.bytes.is_empty());
    (peak, est)
}

#[test]
fn estimates_bound_the_real_peak() {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let cases: Vec<(&str, Vec<u8>, Spec)> = vec![
        (
            "8-bit RGB JPEG, full decode",
            jpeg_rgb(1600, 1200),
            spec(1500, 1500, OutputFormat::Jpeg),
        ),
        (
            "8-bit RGB JPEG, 1/4 scale",
            jpeg_rgb(2400, 1800),
            spec(256, 256, OutputFormat::Jpeg),
        ),
        (
            "16-bit RGBA PNG",
            png_rgba16(1500, 1200),
            spec(400, 400, OutputFormat::Png),
        ),
        ("16-bit RGBA PNG, enlarged", png_rgba16(300, 200), {
            let mut s = spec(2400, 1600, OutputFormat::Png);
            s.enlarge = true;
            s
        }),
        ("GIF", gif(1200, 900), spec(300, 300, OutputFormat::Gif)),
        (
            "TIFF RGB",
            tiff_rgb(1400, 1000),
            spec(300, 300, OutputFormat::Tiff),
        ),
        (
            "WebP RGBA",
            webp_rgba(900, 700),
            spec(300, 300, OutputFormat::Webp),
        ),
        (
            "BMP",
            bmp_rgb(1300, 900),
            spec(1300, 900, OutputFormat::Bmp),
        ),
    ];
    for (what, input, s) in cases {
        let (peak, est) = measure(&input, &s);
        eprintln!(
            "{what}: peak {:.1} MiB, estimate {:.1} MiB",
            mib(peak),
            mib(est)
        );
        assert!(peak <= est, "{what}: peak {peak} over the estimate {est}");
        // Not uselessly loose either: the pixel part within 5× of what is used.
        let fixed = pipeline::FIXED_OVERHEAD;
        assert!(
            est - fixed <= 5 * peak.max(1 << 20),
            "{what}: estimate {est} far above the peak {peak}"
        );
    }
}

// ---- output bounds ----

async fn post(app: axum::Router, query: &str, body: Vec<u8>) -> (StatusCode, String) {
    let req = Request::post(format!("/thumbnail?{query}"))
        .body(Body::from(body))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, msg)
}

#[tokio::test]
async fn huge_output_box_refused_with_400_before_decoding() {
    let t = Arc::new(Thumbnailer::new(cfg()));
    let app = http::router(t.clone());
    let q = "width=10000&height=10000&enlarge=true&fit=fill&format=bmp";
    let (s, msg) = post(app, q, tiny_png()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{msg}");
    assert!(
        msg.contains("width") && msg.contains("height") && msg.contains("25000000"),
        "{msg}"
    );
    // Refused on the spec: nothing reached the pool.
    assert_eq!(t.stats().made + t.stats().refused, 0);
}

#[tokio::test]
async fn uncompressed_output_over_max_output_bytes_is_413_before_decoding() {
    let t = Arc::new(Thumbnailer::new(Config {
        max_output_bytes: 1 << 20,
        ..cfg()
    }));
    // 1000×1000 BMP = 3 MB whatever the pixels: refused from the header.
    let q = "width=1000&height=1000&enlarge=true&fit=fill&format=bmp";
    let (s, msg) = post(http::router(t.clone()), q, tiny_png()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{msg}");
    assert!(msg.contains("max_output_bytes"), "{msg}");
    // Within the cap it is made.
    let q = "width=500&height=500&enlarge=true&fit=fill&format=bmp";
    let (s, msg) = post(http::router(t), q, tiny_png()).await;
    assert_eq!(s, StatusCode::OK, "{msg}");
}

#[test]
fn compressed_output_over_the_cap_stops_the_encoder() {
    // Noise does not compress: a 600×600 PNG of it is ~1 MB, over a 256 KiB cap.
    let input = png_rgba16(600, 600);
    let cfg = Config {
        max_output_bytes: 256 << 10,
        ..cfg()
    };
    let e = pipeline::make(&input, &spec(600, 600, OutputFormat::Png), &cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    assert!(e.to_string().contains("max_output_bytes"), "{e}");
    // The same as JPEG fits.
    let t = pipeline::make(&input, &spec(600, 600, OutputFormat::Jpeg), &cfg).unwrap();
    assert!(t.bytes.len() <= 256 << 10);
}

#[tokio::test]
async fn job_with_a_huge_thumbnail_spec_is_400_at_submit() {
    let origin = common::start_origin().await;
    let rcv = common::start_receiver().await;
    let s = common::Service::start_with(json!({}), &[]).await;
    let mut job = common::job(&origin, "/a.png", &rcv.url(0), "bounds", 1);
    job["thumbnails"] = json!([
        {"name": "ok", "width": 256, "height": 256},
        {"name": "huge", "width": 10000, "height": 10000, "fit": "fill", "enlarge": true, "format": "bmp"}
    ]);
    let (st, v) = s.post_raw("/download", &job.to_string()).await;
    assert_eq!(st, 400, "{v}");
    let msg = v.to_string();
    assert!(
        msg.contains("thumbnails[1].width × height") && msg.contains("25000000"),
        "{msg}"
    );
    // The configured limit is the one applied.
    drop(s);
    let s =
        common::Service::start_with(json!({"thumbnail": {"max_output_pixels": 10000}}), &[]).await;
    job["thumbnails"] = json!([{"name": "ok", "width": 100, "height": 100},
                               {"name": "big", "width": 101, "height": 100}]);
    let (st, v) = s.post_raw("/download", &job.to_string()).await;
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("thumbnails[1]."), "{v}");
}

// ---- the memory budget ----

#[tokio::test]
async fn estimate_over_the_whole_budget_is_refused_at_once() {
    // 2000×2000 16-bit RGBA: ~16 MiB decoded at 8 bits plus buffers, over 12 MiB.
    let input = png_rgba16(2000, 2000);
    let t = Arc::new(Thumbnailer::new(Config {
        max_memory_bytes: 12 << 20,
        ..cfg()
    }));
    let (s, msg) = post(http::router(t.clone()), "width=200&height=200", input).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{msg}");
    assert!(
        msg.contains("max_memory_bytes") && msg.contains("12 MiB"),
        "{msg}"
    );
    // A small image fits the same budget.
    let (s, msg) = post(http::router(t), "width=50&height=50", png_rgba16(100, 100)).await;
    assert_eq!(s, StatusCode::OK, "{msg}");
}

#[tokio::test]
async fn no_room_in_the_budget_before_the_deadline_is_503() {
    let t = Arc::new(Thumbnailer::new(Config {
        max_memory_bytes: 64 << 20,
        ..cfg()
    }));
    // Someone else holds the whole budget.
    let held = t.budget().try_acquire(64 << 20).unwrap();
    let app = http::router_with_timeout(t.clone(), Duration::from_millis(300));
    let (s, msg) = post(app, "width=50&height=50", png_rgba16(400, 300)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{msg}");
    assert!(msg.contains("busy") || msg.contains("not ready"), "{msg}");
    drop(held);
    let app = http::router_with_timeout(t.clone(), Duration::from_secs(30));
    let (s, msg) = post(app, "width=50&height=50", png_rgba16(400, 300)).await;
    assert_eq!(s, StatusCode::OK, "{msg}");
    // Everything reserved is given back (the worker lets go once the answer is taken).
    common::eventually(30, "the budget is whole again", async || {
        (t.budget().free() == 64 << 20).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_waits_for_memory_instead_of_failing() {
    let t = Arc::new(Thumbnailer::new(Config {
        max_memory_bytes: 64 << 20,
        ..cfg()
    }));
    let held = t.budget().try_acquire(64 << 20).unwrap();
    let input = bytes::Bytes::from(png_rgba16(400, 300));
    let t2 = t.clone();
    let job = tokio::spawn(async move { t2.make_many(input, vec![Spec::new(50, 50)]).await });
    // Queued behind the held budget (the budget sees a waiter), not failed.
    common::eventually(30, "the job waits on the budget", async || {
        (t.budget().waiters() == 1 && !job.is_finished()).then_some(())
    })
    .await;
    drop(held);
    let r = tokio::time::timeout(Duration::from_secs(60), job)
        .await
        .expect("job thumbnail within 60 s")
        .unwrap()
        .unwrap();
    assert!(r[0].is_ok(), "{:?}", r[0].as_ref().err());
}

// ---- compressed metadata ----

#[test]
fn iccp_bomb_is_not_inflated() {
    let bomb = iccp_bomb();
    assert!(bomb.len() > 1_900_000, "{}", bomb.len());
    // It is a real zlib stream of zeros (checked on its first 64 MiB).
    {
        use std::io::Read;
        let at = bomb.windows(4).position(|w| w == b"iCCP").unwrap() + 4 + 6;
        let mut z = flate2::read::ZlibDecoder::new(&bomb[at..]).take(64 << 20);
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = z.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            assert!(buf[..k].iter().all(|&b| b == 0));
            n += k as u64;
        }
        assert_eq!(n, 64 << 20);
    }
    let (icc, peak) = peak_of(|| pipeline::png_icc(&bomb, pipeline::MAX_ICC_BYTES));
    assert_eq!(icc, None);
    assert!(
        peak < 4 << 20,
        "inflating the profile allocated {peak} bytes"
    );
    let cfg = cfg();
    let (r, peak) = peak_of(|| pipeline::make(&bomb, &Spec::new(16, 16), &cfg));
    let t = r.unwrap();
    assert_eq!((t.width, t.height), (1, 1));
    assert!(peak < 16 << 20, "the thumbnail allocated {peak} bytes");
}

#[test]
fn a_real_png_profile_is_still_applied() {
    // A profile under the cap is read back exactly.
    use std::io::Write;
    let png = tiny_png();
    let profile: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&profile).unwrap();
    let mut data = b"icc\0\0".to_vec();
    data.extend_from_slice(&z.finish().unwrap());
    let mut input = png[..33].to_vec();
    input.extend_from_slice(&chunk(b"iCCP", &data));
    input.extend_from_slice(&png[33..]);
    assert_eq!(
        pipeline::png_icc(&input, pipeline::MAX_ICC_BYTES),
        Some(profile)
    );
    assert_eq!(pipeline::png_icc(&input, 100), None);
}

// ---- fairness between the two classes ----

#[tokio::test]
async fn api_flood_does_not_push_a_job_back() {
    // One worker: the order the work finishes in is the order it was taken.
    let t = Arc::new(Thumbnailer::new(Config {
        threads: 1,
        ..Config::default()
    }));
    let big = bytes::Bytes::from(jpeg_rgb(1200, 900));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (t, big, tx) = (t.clone(), big.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let r = t
                .make_until(big, spec(1800, 1800, OutputFormat::Png), deadline)
                .await;
            tx.send(format!("api{i}")).unwrap();
            r.map(|_| ())
        }));
    }
    // Wait until the API work is running, then a job arrives.
    common::eventually(60, "API work started", async || {
        (t.budget().free() < t.budget().total()).then_some(())
    })
    .await;
    let (t2, tx2) = (t.clone(), tx.clone());
    tasks.push(tokio::spawn(async move {
        let r = t2
            .make_many_until(
                bytes::Bytes::from(tiny_png()),
                vec![Spec::new(16, 16)],
                Class::Job,
                Instant::now() + Duration::from_secs(120),
            )
            .await;
        tx2.send("job".to_string()).unwrap();
        r.map(|_| ())
    }));
    drop(tx);
    let mut order = Vec::new();
    while let Some(n) = tokio::time::timeout(Duration::from_secs(300), rx.recv())
        .await
        .expect("all finish")
    {
        order.push(n);
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let pos = order.iter().position(|n| n == "job").unwrap();
    // The running API decode and at most one queued before it.
    assert!(pos <= 2, "the job finished at position {pos} of {order:?}");
}
