//! Properties of the thumbnail pipeline on the fixtures in fixtures/thumbnail/.

use downloader::thumbnail::{Config, ErrorKind, Fit, Format, OutputFormat, Spec, Thumbnailer};
use image::{DynamicImage, GenericImageView, RgbImage};

fn fixture(name: &str) -> Vec<u8> {
    let p = format!("{}/fixtures/thumbnail/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&fixture("expected.json")).unwrap()
}

fn thumbnailer() -> Thumbnailer {
    Thumbnailer::new(Config {
        threads: 1,
        ..Config::default()
    })
}

fn spec(w: u32, h: u32) -> Spec {
    Spec::new(w, h)
}

fn make(name: &str, s: &Spec) -> (downloader::thumbnail::Thumbnail, DynamicImage) {
    let t = thumbnailer();
    let th = t
        .make_blocking(&fixture(name), s)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let img = image::load_from_memory(&th.bytes).unwrap_or_else(|e| panic!("{name} output: {e}"));
    assert_eq!((img.width(), img.height()), (th.width, th.height), "{name}");
    (th, img)
}

fn px(img: &DynamicImage, x: u32, y: u32) -> [u8; 3] {
    let p = img.get_pixel(x, y).0;
    [p[0], p[1], p[2]]
}

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (*x as i32 - y as i32).abs() <= tol)
}

fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let mse: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

#[test]
fn every_format_decodes() {
    for name in [
        "photo.jpg",
        "progressive.jpg",
        "gray.jpg",
        "cmyk.jpg",
        "adobergb.jpg",
        "gray16.png",
        "palette-alpha.png",
        "rgba.png",
        "animated.gif",
        "static.gif",
        "tiff-raw.tif",
        "tiff-lzw.tif",
        "tiff-deflate.tif",
        "tiff-packbits.tif",
        "tiff-gray.tif",
        "photo.bmp",
        "photo.webp",
        "lossless.webp",
    ] {
        let (th, _) = make(name, &spec(64, 64));
        assert!(th.width <= 64 && th.height <= 64, "{name}");
        assert_eq!(th.format, Format::Jpeg);
    }
}

#[test]
fn fits_and_no_enlarge() {
    // photo.jpg is 1024x768.
    let (th, _) = make("photo.jpg", &spec(256, 256));
    assert_eq!((th.width, th.height), (256, 192));
    let mut s = spec(256, 256);
    s.fit = Fit::Cover;
    let (th, _) = make("photo.jpg", &s);
    assert_eq!((th.width, th.height), (256, 256));
    s.fit = Fit::Fill;
    s.width = 100;
    let (th, _) = make("photo.jpg", &s);
    assert_eq!((th.width, th.height), (100, 256));
    // Smaller than the box: kept as is unless enlarge.
    let (th, _) = make("photo.bmp", &spec(1000, 1000));
    assert_eq!((th.width, th.height), (200, 150));
    let mut s = spec(1000, 1000);
    s.enlarge = true;
    let (th, _) = make("photo.bmp", &s);
    assert_eq!((th.width, th.height), (1000, 750));
    s.fit = Fit::Cover;
    s.enlarge = false;
    let (th, _) = make("photo.bmp", &s);
    assert_eq!((th.width, th.height), (200, 150));
}

#[test]
fn all_exif_orientations_come_out_upright() {
    let exp = expected();
    let corner = |k: &str| -> [u8; 3] {
        let v = &exp["corners"][k];
        [0, 1, 2].map(|i| v[i].as_u64().unwrap() as u8)
    };
    for o in 1..=8 {
        for ext in ["jpg", "png"] {
            if ext == "png" && o != 6 {
                continue;
            }
            let name = format!("orient-{o}.{ext}");
            let mut s = spec(48, 48);
            s.format = OutputFormat::Png;
            let (th, img) = make(&name, &s);
            // Upright is 96x64 -> 48x32.
            assert_eq!((th.width, th.height), (48, 32), "{name}");
            let (w, h) = (th.width, th.height);
            for (k, x, y) in [
                ("tl", 4, 4),
                ("tr", w - 5, 4),
                ("bl", 4, h - 5),
                ("br", w - 5, h - 5),
            ] {
                let got = px(&img, x, y);
                assert!(
                    close(got, corner(k), 40),
                    "{name} corner {k}: {got:?} vs {:?}",
                    corner(k)
                );
            }
        }
    }
}

#[test]
fn cmyk_colours() {
    let exp = expected();
    let mut s = spec(384, 64);
    s.format = OutputFormat::Png;
    let (_, img) = make("cmyk.jpg", &s);
    for (i, c) in exp["cmyk"].as_array().unwrap().iter().enumerate() {
        let want = [0, 1, 2].map(|j| c[j].as_u64().unwrap() as u8);
        let got = px(&img, i as u32 * 64 + 32, 32);
        assert!(close(got, want, 12), "CMYK block {i}: {got:?} vs {want:?}");
    }
}

/// CMYK and YCCK with an embedded CMYK profile: each patch comes out as the sRGB that
/// littlecms computed from the ink values and the profile (generate.py), not as the naive
/// conversion. cmyk-plain.jpg has no Adobe marker: its samples are not inverted.
#[test]
fn cmyk_and_ycck_with_profile_to_srgb() {
    let exp = expected();
    let rgb = |v: &serde_json::Value| [0, 1, 2].map(|j| v[j].as_u64().unwrap() as u8);
    let want: Vec<[u8; 3]> = exp["cmyk_icc"]["srgb"]
        .as_array()
        .unwrap()
        .iter()
        .map(rgb)
        .collect();
    let naive: Vec<[u8; 3]> = exp["cmyk_icc"]["naive"]
        .as_array()
        .unwrap()
        .iter()
        .map(rgb)
        .collect();
    // The profile must matter for this test to mean anything.
    assert!(
        want.iter()
            .zip(&naive)
            .filter(|(a, b)| !close(**a, **b, 30))
            .count()
            >= 4
    );
    let n = want.len() as u32;
    for name in ["cmyk-icc.jpg", "ycck.jpg", "cmyk-plain.jpg"] {
        for (w, h) in [(64 * n, 64), (32 * n, 32)] {
            let mut s = spec(w, h);
            s.format = OutputFormat::Png;
            let (_, img) = make(name, &s);
            assert_eq!((img.width(), img.height()), (w, h), "{name}");
            let side = w / n;
            for (i, (want, naive)) in want.iter().zip(&naive).enumerate() {
                let got = px(&img, i as u32 * side + side / 2, h / 2);
                assert!(
                    close(got, *want, 6),
                    "{name} at {w}x{h}, patch {i}: {got:?}, expected {want:?} (naive {naive:?})"
                );
            }
        }
    }
}

#[test]
fn adobe_rgb_converted_to_srgb() {
    let exp = expected();
    let mut s = spec(256, 64);
    s.format = OutputFormat::Png;
    let (_, img) = make("adobergb.jpg", &s);
    for (i, c) in exp["adobergb"]["srgb"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = [0, 1, 2].map(|j| c[j].as_u64().unwrap() as u8);
        let got = px(&img, i as u32 * 64 + 32, 32);
        assert!(
            close(got, want, 8),
            "Adobe RGB block {i}: {got:?} vs sRGB {want:?}"
        );
    }
}

#[test]
fn alpha_flattened_onto_background() {
    // rgba.png: left half transparent, right half opaque red.
    let mut s = spec(64, 64);
    let (_, img) = make("rgba.png", &s);
    assert!(close(px(&img, 4, 32), [255, 255, 255], 6));
    assert!(close(px(&img, 60, 32), [255, 0, 0], 12));
    s.background = [0, 0, 255];
    s.format = OutputFormat::Bmp;
    let (_, img) = make("rgba.png", &s);
    assert!(close(px(&img, 4, 32), [0, 0, 255], 2));
    // palette-alpha.png: left half transparent (index 0), right half blue.
    let mut s = spec(64, 64);
    s.background = [0, 255, 0];
    let (_, img) = make("palette-alpha.png", &s);
    assert!(
        close(px(&img, 4, 32), [0, 255, 0], 12),
        "{:?}",
        px(&img, 4, 32)
    );
    assert!(close(px(&img, 60, 32), [0, 0, 255], 12));
    // PNG output keeps the alpha.
    s.format = OutputFormat::Png;
    let (_, img) = make("rgba.png", &s);
    assert!(img.color().has_alpha());
    assert_eq!(img.get_pixel(4, 32).0[3], 0);
}

#[test]
fn animated_gif_uses_first_frame() {
    let (_, img) = make("animated.gif", &spec(48, 48));
    assert!(close(px(&img, 24, 16), [255, 0, 0], 10));
}

#[test]
fn downscale_quality_against_reference() {
    let reference = image::load_from_memory(&fixture("photo-ref-256.png"))
        .unwrap()
        .to_rgb8();
    for name in ["photo.jpg", "progressive.jpg"] {
        let mut s = spec(256, 256);
        s.format = OutputFormat::Png;
        let (_, img) = make(name, &s);
        let p = psnr(&img.to_rgb8(), &reference);
        assert!(
            p > 32.0,
            "{name}: PSNR {p:.1} dB vs Pillow LANCZOS reference"
        );
        s.format = OutputFormat::Jpeg;
        let (_, img) = make(name, &s);
        let p = psnr(&img.to_rgb8(), &reference);
        assert!(p > 30.0, "{name} as JPEG q85: PSNR {p:.1} dB");
    }
}

#[test]
fn shrink_on_load_close_to_full_decode() {
    // 1024x768 -> 64: the JPEG is decoded at 1/8; compare with the BMP-like path
    // (full decode via image + resize).
    let full = image::load_from_memory(&fixture("photo.jpg")).unwrap();
    let reference = full
        .resize_exact(64, 48, image::imageops::FilterType::Lanczos3)
        .to_rgb8();
    let mut s = spec(64, 64);
    s.format = OutputFormat::Png;
    // photo.jpg and progressive.jpg hold the same picture; both take the DC-only path.
    for name in ["photo.jpg", "progressive.jpg"] {
        let (_, img) = make(name, &s);
        let p = psnr(&img.to_rgb8(), &reference);
        assert!(p > 28.0, "{name}: 1/8 shrink-on-load PSNR {p:.1} dB");
    }
    // 1/2 and 1/4: 1024x768 -> 200 and -> 120. The baseline file takes our reduced IDCT,
    // the progressive one (same quantized coefficients) jpeg-decoder's scaled decode: the
    // two agree within rounding.
    for (w, h) in [(200u32, 150u32), (120, 90)] {
        let reference = full
            .resize_exact(w, h, image::imageops::FilterType::Lanczos3)
            .to_rgb8();
        let mut s = spec(w, w);
        s.format = OutputFormat::Png;
        let (th, img) = make("photo.jpg", &s);
        assert_eq!((th.width, th.height), (w, h));
        let p = psnr(&img.to_rgb8(), &reference);
        assert!(p > 28.0, "{w}x{h}: shrink-on-load PSNR {p:.1} dB");
        let (_, other) = make("progressive.jpg", &s);
        let p = psnr(&img.to_rgb8(), &other.to_rgb8());
        assert!(p > 45.0, "{w}x{h}: baseline vs progressive PSNR {p:.1} dB");
    }
}

/// Several specs from one decode give the same thumbnails as one spec at a time when
/// they share a shrink-on-load scale, and close ones when a larger spec forces a finer
/// decode for a smaller one; a bad spec fails alone.
#[test]
fn several_specs_from_one_decode() {
    let t = thumbnailer();
    let sp = |w: u32, h: u32, fit: Fit, format: OutputFormat| {
        let mut s = spec(w, h);
        s.fit = fit;
        s.format = format;
        s
    };
    // 1024x768 JPEGs: all three at 1/2 scale. Orientation, CMYK+ICC and non-JPEG too.
    let same_scale = vec![
        sp(256, 256, Fit::Contain, OutputFormat::Same),
        sp(240, 180, Fit::Fill, OutputFormat::Png),
        sp(200, 100, Fit::Cover, OutputFormat::Webp),
    ];
    for name in [
        "photo.jpg",
        "progressive.jpg",
        "orient-6.jpg",
        "cmyk-icc.jpg",
        "rgba.png",
    ] {
        let input = fixture(name);
        let many = t.make_many_blocking(&input, &same_scale);
        assert_eq!(many.len(), same_scale.len());
        for (s, got) in same_scale.iter().zip(many) {
            let one = t.make_blocking(&input, s).unwrap();
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, one, "{name} {}x{} {:?}", s.width, s.height, s.fit);
        }
    }
    // 64x64 alone would be decoded at 1/8; beside 512x512 it comes from the full decode.
    let mixed = vec![
        sp(64, 64, Fit::Contain, OutputFormat::Png),
        sp(512, 512, Fit::Contain, OutputFormat::Png),
    ];
    let input = fixture("photo.jpg");
    for (s, got) in mixed.iter().zip(t.make_many_blocking(&input, &mixed)) {
        let got = got.unwrap();
        let one = t.make_blocking(&input, s).unwrap();
        assert_eq!((got.width, got.height), (one.width, one.height));
        let a = image::load_from_memory(&got.bytes).unwrap().to_rgb8();
        let b = image::load_from_memory(&one.bytes).unwrap().to_rgb8();
        let p = psnr(&a, &b);
        assert!(p > 30.0, "{}x{}: PSNR {p:.1} dB", s.width, s.height);
    }
    // A bad spec fails alone; an undecodable input fails every spec.
    let before = t.stats();
    let with_bad = vec![spec(64, 64), spec(0, 64), spec(32, 32)];
    let r = t.make_many_blocking(&input, &with_bad);
    assert!(r[0].is_ok() && r[2].is_ok());
    assert_eq!(r[1].as_ref().unwrap_err().kind(), ErrorKind::BadParams);
    let r = t.make_many_blocking(&fixture("truncated.jpg"), &with_bad);
    assert_eq!(r[0].as_ref().unwrap_err().kind(), ErrorKind::Corrupt);
    assert_eq!(r[1].as_ref().unwrap_err().kind(), ErrorKind::BadParams);
    assert_eq!(r[2].as_ref().unwrap_err().kind(), ErrorKind::Corrupt);
    let after = t.stats();
    assert_eq!(
        (after.made - before.made, after.refused - before.refused),
        (2, 4)
    );
}

#[test]
fn output_formats_and_same() {
    for (f, want) in [
        (OutputFormat::Png, Format::Png),
        (OutputFormat::Webp, Format::Webp),
        (OutputFormat::Gif, Format::Gif),
        (OutputFormat::Tiff, Format::Tiff),
        (OutputFormat::Bmp, Format::Bmp),
        (OutputFormat::Jpeg, Format::Jpeg),
    ] {
        let mut s = spec(40, 40);
        s.format = f;
        let (th, _) = make("photo.webp", &s);
        assert_eq!(th.format, want);
        let guessed = image::guess_format(&th.bytes).unwrap();
        assert!(
            guessed.extensions_str().contains(&want.extension()),
            "{guessed:?} vs {want:?}"
        );
        assert!(th.format.mime().starts_with("image/"));
    }
    let mut s = spec(40, 40);
    s.format = OutputFormat::Same;
    for (name, want) in [
        ("photo.webp", Format::Webp),
        ("tiff-lzw.tif", Format::Tiff),
        ("static.gif", Format::Gif),
        ("photo.bmp", Format::Bmp),
        ("rgba.png", Format::Png),
        ("photo.jpg", Format::Jpeg),
    ] {
        let (th, _) = make(name, &s);
        assert_eq!(th.format, want, "{name}");
    }
    let mut s = spec(100, 100);
    s.progressive = true;
    s.quality = 50;
    let (th, _) = make("photo.jpg", &s);
    // SOF2 marker = progressive.
    assert!(th.bytes.windows(2).any(|w| w == [0xFF, 0xC2]));
}

#[test]
fn metadata_is_stripped() {
    let (th, _) = make("orient-6.jpg", &spec(48, 48));
    assert!(!th.bytes.windows(4).any(|w| w == b"Exif"));
    let (th, _) = make("adobergb.jpg", &spec(48, 48));
    assert!(!th.bytes.windows(11).any(|w| w == b"ICC_PROFILE"));
}

#[test]
fn bomb_refused_before_decoding() {
    let t = thumbnailer();
    let e = t
        .make_blocking(&fixture("bomb.png"), &spec(64, 64))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    let msg = e.to_string();
    assert!(
        msg.contains("100000x100000") && msg.contains("megapixels"),
        "{msg}"
    );
    // Even with the pixel limit lifted, the allocation bound refuses it.
    let t = Thumbnailer::new(Config {
        max_pixels: u64::MAX,
        threads: 1,
        ..Config::default()
    });
    let e = t
        .make_blocking(&fixture("bomb.png"), &spec(64, 64))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    assert_eq!(t.stats().refused, 1);
}

#[test]
fn input_size_limit() {
    let t = Thumbnailer::new(Config {
        max_input_bytes: 1000,
        threads: 1,
        ..Config::default()
    });
    let e = t
        .make_blocking(&fixture("photo.jpg"), &spec(64, 64))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
}

#[test]
fn gif_frame_limit() {
    let t = Thumbnailer::new(Config {
        max_frames: 2,
        threads: 1,
        ..Config::default()
    });
    let e = t
        .make_blocking(&fixture("animated.gif"), &spec(64, 64))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
}

#[test]
fn truncated_and_corrupt_are_errors_not_panics() {
    let t = thumbnailer();
    let e = t
        .make_blocking(&fixture("truncated.jpg"), &spec(64, 64))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("JPEG"), "{e}");
    let e = t.make_blocking(&fixture("corrupt.jpg"), &spec(64, 64));
    if let Err(e) = e {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }
    // Every prefix of a few fixtures: an error or an image, never a panic.
    for name in [
        "photo.webp",
        "static.gif",
        "tiff-lzw.tif",
        "rgba.png",
        "orient-6.jpg",
        "photo.bmp",
    ] {
        let data = fixture(name);
        for cut in (1..data.len()).step_by((data.len() / 40).max(1)) {
            if let Err(e) = t.make_blocking(&data[..cut], &spec(32, 32)) {
                assert_ne!(e.kind(), ErrorKind::BadParams, "{name}[..{cut}]: {e}");
            }
        }
    }
    assert_eq!(t.stats().panics, 0);
}

#[test]
fn unsupported_bytes() {
    let t = thumbnailer();
    for data in [
        fixture("not-an-image.txt"),
        Vec::new(),
        b"\x00\x00\x01\x00garbage".to_vec(),
    ] {
        let e = t.make_blocking(&data, &spec(64, 64)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }
}

#[test]
fn image_size_reads_header() {
    use downloader::thumbnail::image_size;
    assert_eq!(image_size(&fixture("photo.jpg")), Some((1024, 768)));
    assert_eq!(image_size(&fixture("bomb.png")), Some((100000, 100000)));
    assert_eq!(image_size(&fixture("not-an-image.txt")), None);
    let p = std::path::PathBuf::from(format!(
        "{}/fixtures/thumbnail/tiff-lzw.tif",
        env!("CARGO_MANIFEST_DIR")
    ));
    assert_eq!(image_size(&p), Some((200, 150)));
}

#[test]
fn async_make_on_pool() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = std::sync::Arc::new(Thumbnailer::new(Config {
        threads: 2,
        ..Config::default()
    }));
    rt.block_on(async {
        let data = bytes::Bytes::from(fixture("photo.webp"));
        let mut hs = Vec::new();
        for _ in 0..6 {
            let t = t.clone();
            let d = data.clone();
            hs.push(tokio::spawn(
                async move { t.make(d, Spec::new(50, 50)).await },
            ));
        }
        for h in hs {
            let th = h.await.unwrap().unwrap();
            assert_eq!(th.width, 50);
        }
    });
    assert_eq!(t.stats().made, 6);
}
