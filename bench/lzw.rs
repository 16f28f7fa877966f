//! LZW decode speed: our decoder against `weezl` (the one the `gif` and `tiff` crates
//! use) on the same compressed streams, as output MB/s.
//!
//! Usage (from the repository root):
//!
//!     cargo run --release --example lzw -- [--secs S] [FILE.gif | FILE.tif ...]
//!
//! Inputs: the LZW fixtures (`fixtures/thumbnail/static.gif`, `animated.gif`,
//! `tiff-lzw.tif`), larger generated images (a 2000×1500 GIF, a 3000×2000 RGB TIFF
//! with and without the horizontal predictor) and any GIF or LZW TIFF named on the
//! command line (e.g. `bench/.work/corpus/gif/*.gif` after `bench/thumbs`). Only the
//! LZW step is timed: a GIF's first frame (sub-blocks joined beforehand), a TIFF's
//! strips one by one, each into a buffer allocated beforehand. Each decoder runs in
//! turn, round after round, for about `S` seconds per input (default 1); the fastest
//! round counts, which is the figure least disturbed by other work on a shared machine.
//! Both decoders must give the same bytes, or the run stops.

use std::io::Cursor;
use std::time::{Duration, Instant};

use downloader::thumbnail::lzw::{self, Codes};
use downloader::thumbnail::tiff_lzw;
use tiff::decoder::Decoder as TiffDecoder;
use tiff::encoder::{Compression, Predictor, TiffEncoder, colortype};
use tiff::tags::Tag;
use weezl::{BitOrder, LzwStatus};

/// What a stream is, for the decoders' settings.
#[derive(Clone, Copy)]
enum Kind {
    /// GIF: LSB-first, this minimum code size.
    Gif(u8),
    /// TIFF: MSB-first, early change.
    Tiff,
}

/// One input: its compressed parts (a GIF has one, a TIFF one per strip), each with the
/// number of bytes it decodes to.
struct Input {
    name: String,
    kind: Kind,
    parts: Vec<(Vec<u8>, usize)>,
}

impl Input {
    fn out_len(&self) -> usize {
        self.parts.iter().map(|p| p.1).sum()
    }
    fn in_len(&self) -> usize {
        self.parts.iter().map(|p| p.0.len()).sum()
    }
}

fn from_gif(name: &str, data: &[u8]) -> Result<Input, String> {
    let mut o = gif::DecodeOptions::new();
    // The frame buffer then holds the minimum code size and the joined LZW data.
    o.skip_frame_decoding(true);
    let mut d = o.read_info(data).map_err(|e| format!("{name}: {e}"))?;
    let f = d
        .read_next_frame()
        .map_err(|e| format!("{name}: {e}"))?
        .ok_or(format!("{name}: no frame"))?;
    let (&min, lzw) = f
        .buffer
        .split_first()
        .ok_or(format!("{name}: empty frame"))?;
    Ok(Input {
        name: name.into(),
        kind: Kind::Gif(min),
        parts: vec![(lzw.to_vec(), f.width as usize * f.height as usize)],
    })
}

fn from_tiff(name: &str, data: &[u8]) -> Result<Input, String> {
    let err = |e: tiff::TiffError| format!("{name}: {e}");
    let mut d = TiffDecoder::new(Cursor::new(data)).map_err(err)?;
    let tag = |d: &mut TiffDecoder<_>, t| d.find_tag_unsigned::<u64>(t).ok().flatten();
    if tag(&mut d, Tag::Compression) != Some(5) {
        return Err(format!("{name}: not LZW"));
    }
    let (w, h) = d.dimensions().map_err(err)?;
    let spp = tag(&mut d, Tag::SamplesPerPixel).unwrap_or(1) as usize;
    if d.colortype().map_err(err)?.bit_depth() != 8 {
        return Err(format!("{name}: not 8 bits per sample"));
    }
    let rps = tag(&mut d, Tag::RowsPerStrip)
        .unwrap_or(h as u64)
        .min(h as u64) as usize;
    let offs = d.get_tag_u64_vec(Tag::StripOffsets).map_err(err)?;
    let counts = d.get_tag_u64_vec(Tag::StripByteCounts).map_err(err)?;
    let row = w as usize * spp;
    let parts = (0..h as usize)
        .step_by(rps)
        .zip(offs.iter().zip(&counts))
        .map(|(y, (&o, &c))| {
            let rows = rps.min(h as usize - y);
            (data[o as usize..(o + c) as usize].to_vec(), rows * row)
        })
        .collect();
    Ok(Input {
        name: name.into(),
        kind: Kind::Tiff,
        parts,
    })
}

fn load(path: &str) -> Result<Input, String> {
    let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let name = path.rsplit('/').next().unwrap_or(path);
    if data.starts_with(b"GIF8") {
        from_gif(name, &data)
    } else {
        from_tiff(name, &data)
    }
}

/// Photo-like RGB: smooth colour fields, hard-edged discs, 8×8 texture and noise.
fn photo(w: usize, h: usize, seed: u32) -> Vec<u8> {
    let mut s = seed | 1;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    let discs: Vec<(f32, f32, f32, [f32; 3])> = (0..40)
        .map(|_| {
            let u = |r: u32| (r % 10_000) as f32 / 10_000.0;
            let (cx, cy, rad) = (
                u(rnd()) * w as f32,
                u(rnd()) * h as f32,
                0.02 + u(rnd()) * 0.18,
            );
            (
                cx,
                cy,
                rad * w as f32,
                [0, 1, 2].map(|_| (rnd() % 256) as f32),
            )
        })
        .collect();
    let tex: Vec<f32> = (0..(w / 8 + 1) * (h / 8 + 1))
        .map(|_| (rnd() % 37) as f32 - 18.0)
        .collect();
    let mut v = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let t = tex[(y / 8) * (w / 8 + 1) + x / 8];
            for c in 0..3 {
                let k = c as f32 + 1.0;
                let mut p = 120.0
                    + 60.0 * (k * 2.1 * fx * 3.0).sin() * (k * 1.3 * fy * 3.0 + k).cos()
                    + 30.0 * ((fx + fy) * 5.0 * k).sin();
                for &(cx, cy, r, col) in &discs {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    if dx * dx + dy * dy < r * r {
                        p = p * 0.2 + col[c] * 0.8;
                    }
                }
                p += t + (rnd() % 11) as f32 - 5.0;
                v.push(p.clamp(0.0, 255.0) as u8);
            }
        }
    }
    v
}

fn generated() -> Vec<Input> {
    let mut inputs = Vec::new();
    // GIF: the photo on a 6×7×6 colour cube (no dithering), encoded by the `gif` crate.
    let (w, h) = (2000usize, 1500usize);
    let px = photo(w, h, 7);
    let idx: Vec<u8> = px
        .chunks_exact(3)
        .map(|p| {
            let q = |v: u8, n: u32| (v as u32 * n / 256) as u8;
            q(p[0], 6) * 42 + q(p[1], 7) * 6 + q(p[2], 6)
        })
        .collect();
    let palette: Vec<u8> = (0..256u32)
        .flat_map(|i| {
            let (r, g, b) = (i / 42 % 6, i / 6 % 7, i % 6);
            [(r * 51) as u8, (g * 42) as u8, (b * 51) as u8]
        })
        .collect();
    let mut gif_bytes = Vec::new();
    {
        let mut e = gif::Encoder::new(&mut gif_bytes, w as u16, h as u16, &palette).unwrap();
        let mut f = gif::Frame {
            width: w as u16,
            height: h as u16,
            ..gif::Frame::default()
        };
        f.buffer = std::borrow::Cow::Borrowed(&idx);
        e.write_frame(&f).unwrap();
    }
    inputs.push(from_gif("generated 2000x1500.gif", &gif_bytes).unwrap());
    // TIFF: the photo as RGB, without and with the horizontal predictor.
    let (w, h) = (3000usize, 2000usize);
    let px = photo(w, h, 11);
    for (pr, name) in [
        (Predictor::None, "generated 3000x2000.tif"),
        (Predictor::Horizontal, "generated 3000x2000 predictor.tif"),
    ] {
        let mut out = Cursor::new(Vec::new());
        let mut e = TiffEncoder::new(&mut out)
            .unwrap()
            .with_compression(Compression::Lzw)
            .with_predictor(pr);
        e.write_image::<colortype::RGB8>(w as u32, h as u32, &px)
            .unwrap();
        inputs.push(from_tiff(name, &out.into_inner()).unwrap());
    }
    inputs
}

/// Our decoder on one part; `false` if it refused the stream.
fn ours(kind: Kind, src: &[u8], out: &mut [u8]) -> bool {
    match kind {
        Kind::Gif(min) => lzw::decode(src, out, Codes::gif(min)).is_ok(),
        Kind::Tiff => tiff_lzw::decode_strip(src, out),
    }
}

/// weezl on one part, as the `gif` and `tiff` crates set it up; `false` on an error or
/// a short output.
fn weezl(kind: Kind, src: &[u8], out: &mut [u8]) -> bool {
    let mut d = match kind {
        Kind::Gif(min) => weezl::decode::Decoder::new(BitOrder::Lsb, min),
        Kind::Tiff => weezl::decode::Decoder::with_tiff_size_switch(BitOrder::Msb, 8),
    };
    let (mut i, mut o) = (0, 0);
    // A call right after a Clear code may move nothing (weezl resets its state then), so
    // only the number of calls is bounded: each of the others moves at least a byte.
    let mut calls = 16 * src.len() + out.len() + 8;
    while o < out.len() && calls > 0 {
        calls -= 1;
        let r = d.decode_bytes(&src[i..], &mut out[o..]);
        i += r.consumed_in;
        o += r.consumed_out;
        match r.status {
            Ok(LzwStatus::Ok) => {}
            Ok(_) => break,
            Err(_) => return false,
        }
    }
    o == out.len()
}

type DecodeFn = fn(Kind, &[u8], &mut [u8]) -> bool;

/// Decode every part of `input` once into `bufs`; the time taken.
fn run(f: DecodeFn, input: &Input, bufs: &mut [Vec<u8>]) -> Duration {
    let t = Instant::now();
    for ((src, _), out) in input.parts.iter().zip(bufs.iter_mut()) {
        assert!(
            f(input.kind, src, out),
            "{}: a decoder refused it",
            input.name
        );
    }
    t.elapsed()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut secs = 1.0f64;
    if let Some(i) = args.iter().position(|a| a == "--secs") {
        secs = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .expect("--secs takes a number");
        args.drain(i..i + 2);
    }
    let mut inputs = Vec::new();
    for f in ["static.gif", "animated.gif", "tiff-lzw.tif"] {
        inputs.push(load(&format!("fixtures/thumbnail/{f}")).unwrap());
    }
    inputs.extend(generated());
    for a in &args {
        match load(a) {
            Ok(i) => inputs.push(i),
            Err(e) => eprintln!("skipped {e}"),
        }
    }
    let decoders: [(&str, DecodeFn); 2] = [("ours", ours), ("weezl", weezl)];
    println!("| input | decoded MB | compressed MB | ours MB/s | weezl MB/s | ours ÷ weezl |");
    println!("|---|---:|---:|---:|---:|---:|");
    for input in &inputs {
        let mut outs: Vec<Vec<Vec<u8>>> = decoders
            .iter()
            .map(|_| input.parts.iter().map(|p| vec![0u8; p.1]).collect())
            .collect();
        let mut best = [Duration::MAX; 2];
        let start = Instant::now();
        let mut rounds = 0;
        while rounds < 5 || start.elapsed().as_secs_f64() < secs {
            for (k, (_, f)) in decoders.iter().enumerate() {
                best[k] = best[k].min(run(*f, input, &mut outs[k]));
            }
            rounds += 1;
        }
        assert!(outs[0] == outs[1], "{}: the decoders disagree", input.name);
        let mb = input.out_len() as f64 / 1e6;
        let rate = best.map(|d| mb / d.as_secs_f64());
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2}× |",
            input.name,
            mb,
            input.in_len() as f64 / 1e6,
            rate[0],
            rate[1],
            rate[0] / rate[1]
        );
    }
}
