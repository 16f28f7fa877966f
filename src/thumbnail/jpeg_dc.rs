//! DC-only JPEG decoding: an exact 1/8-scale image (each pixel is the mean of one 8×8
//! block) from the DC coefficients alone. AC coefficients are Huffman-decoded only to be
//! skipped (sequential files) or not read at all (the AC scans of progressive files).
//!
//! Sequential (baseline) files can also be decoded at 1/4 or 1/2 scale ([`decode_scaled`]):
//! each block keeps only its top-left 2×2 or 4×4 coefficients (the first 5 or 25 in
//! zig-zag order; the others are skipped as above), dequantized and put through a 2- or
//! 4-point inverse DCT, the same reduced transform as `jpeg-decoder`'s `scale()`; chroma is
//! then upsampled with the same triangle filter and converted with the same fixed-point
//! YCbCr→RGB, so the output equals that decoder's within rounding.
//!
//! This parses untrusted bytes, so: every length and index is checked (safe Rust, no
//! `unsafe`), and anything unusual returns `None` so that the caller falls back to the full
//! decoder: arithmetic coding, lossless/hierarchical, 12-bit, more than 3 components,
//! RGB-coded 3-component files, sampling factors other than 1 or 2 (or not dividing the
//! maximum), non-interleaved sequential scans of a multi-component image, premature ends
//! of data, a missing end-of-image marker, any Huffman code error.

/// A decoded reduced-scale image: `channels` is 1 (grey) or 3 (RGB), row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcImage {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

const MAX_COMPONENTS: usize = 3;
/// Fast Huffman tables built per file at most (a real file needs 2–4 per scan and
/// has at most a dozen scans that use them here).
const MAX_TABLE_BUILDS: usize = 64;

/// Bits looked at by the Huffman tables' fast look-ups. 12 covers nearly every symbol
/// of real files together with its magnitude bits (codes of 2–8 bits, magnitudes of
/// 1–4); the tables a scan uses stay within L1/L2.
const FAST_BITS: u32 = 12;
const FAST_SIZE: usize = 1 << FAST_BITS;

struct Huffman {
    maxcode: [i32; 18],
    valptr: [i32; 17],
    mincode: [i32; 17],
    vals: Vec<u8>,
    /// The look-ups below, built for the tables a scan uses ([`Huffman::prepare`]).
    fast: Option<Box<Fast>>,
}

/// Look-up tables indexed by the next [`FAST_BITS`] bits of the stream; 0 = not covered
/// (a longer code or magnitude), take the slow path.
struct Fast {
    /// One symbol: `code length << 8 | symbol`.
    sym: Vec<u16>,
    /// One whole coefficient, code and magnitude bits: `value << 12 | run << 4 | bits`.
    /// DC tables: the difference (run 0; 0 is a valid value). AC tables: nonzero
    /// coefficients only (not end-of-block or sixteen zeros).
    val: Vec<i32>,
    /// AC tables: as many whole symbols as fit, to skip them: `bits | advance << 4 |
    /// end_of_block << 11`, where `advance` is how far the coefficient index moves (it
    /// stops at the first end-of-block, and once the block is full).
    skip: Vec<u16>,
}

impl Huffman {
    fn new(counts: &[u8; 16], vals: &[u8]) -> Option<Huffman> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total == 0 || total > 256 || total != vals.len() {
            return None;
        }
        let mut h = Huffman {
            maxcode: [-1; 18],
            valptr: [0; 17],
            mincode: [0; 17],
            vals: vals.to_vec(),
            fast: None,
        };
        let mut code: u32 = 0;
        let mut k = 0usize;
        for len in 1..=16usize {
            let n = counts[len - 1] as usize;
            if n > 0 {
                h.valptr[len] = k as i32;
                h.mincode[len] = code as i32;
                code += n as u32;
                if code > (1u32 << len) {
                    return None;
                }
                k += n;
                h.maxcode[len] = code as i32 - 1;
            }
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        Some(h)
    }

    /// Build the fast look-ups (once; a progressive file defines many tables it never
    /// uses here). `ac` says how the symbols are to be read: run/size or DC size.
    fn prepare(&mut self, ac: bool) -> bool {
        if self.fast.is_some() {
            return false;
        }
        let mut sym = vec![0u16; FAST_SIZE];
        for len in 1..=FAST_BITS as usize {
            if self.maxcode[len] < 0 {
                continue;
            }
            for code in self.mincode[len]..=self.maxcode[len] {
                let v = self.vals[(self.valptr[len] + code - self.mincode[len]) as usize];
                let shift = FAST_BITS as usize - len;
                let start = (code as usize) << shift;
                let end = (code as usize + 1) << shift;
                for e in &mut sym[start..end] {
                    *e = ((len as u16) << 8) | v as u16;
                }
            }
        }
        let mut val = vec![0i32; FAST_SIZE];
        let mut skip = vec![0u16; if ac { FAST_SIZE } else { 0 }];
        for i in 0..FAST_SIZE {
            let f = sym[i];
            if f == 0 {
                continue;
            }
            let len = (f >> 8) as u32;
            let rs = (f & 0xFF) as u32;
            let (r, sz) = if ac { (rs >> 4, rs & 15) } else { (0, rs) };
            if len + sz <= FAST_BITS && (sz > 0 || !ac) && sz <= 11 {
                let mag = (i as u32 >> (FAST_BITS - len - sz)) & ((1 << sz) - 1);
                val[i] = (extend(mag, sz) << 12) | ((r as i32) << 4) | (len + sz) as i32;
            }
            if !ac {
                continue;
            }
            let (mut p, mut advance, mut eob) = (0u32, 0u32, false);
            while advance < 64 {
                let f = sym[(i << p) & (FAST_SIZE - 1)];
                let len = (f >> 8) as u32;
                let (r, sz) = ((f >> 4) as u32 & 15, f as u32 & 15);
                // A code that runs past the window was read from the zeros shifted in.
                if f == 0 || p + len + sz > FAST_BITS {
                    break;
                }
                p += len + sz;
                match (r, sz) {
                    (0, 0) => {
                        eob = true;
                        break;
                    }
                    (15, 0) => advance += 16,
                    // Other runs with size 0 are undefined; read as end-of-block, as
                    // libjpeg does.
                    (_, 0) => {
                        eob = true;
                        break;
                    }
                    _ => advance += r + 1,
                }
            }
            if p > 0 {
                skip[i] = (p | advance << 4 | (eob as u32) << 11) as u16;
            }
        }
        self.fast = Some(Box::new(Fast { sym, val, skip }));
        true
    }

    fn fast(&self) -> Option<&Fast> {
        self.fast.as_deref()
    }
}

/// Bit reader over one scan's entropy-coded data. The data is unstuffed (0xFF00 → 0xFF)
/// a chunk at a time into a small buffer, so that the reads in the Huffman loops are
/// plain 8-byte loads with no check for 0xFF bytes or markers; memory stays bounded
/// whatever the size of the scan.
struct Bits<'a> {
    d: &'a [u8],
    /// Next byte of `d` to unstuff.
    spos: usize,
    /// Unstuffed bytes: `buf[..len]` to read (data, then zeros once the interval's data
    /// ended), followed by 8 zero bytes so that a load at any `pos < len` is whole.
    buf: Vec<u8>,
    len: usize,
    /// Next byte of `buf` to load.
    pos: usize,
    /// Unstuffed bytes of this restart interval dropped from the front of `buf`.
    base: usize,
    /// Once reached: the marker that ends the interval's data, its position in `d`, and
    /// where the data ended (counted like `base + pos`).
    marker: Option<(u8, usize, usize)>,
    /// The file ended inside the data, with no marker.
    truncated: bool,
    /// Bits not yet consumed, from the most significant bit on; the bits below `n` are
    /// loaded again by the next refill.
    acc: u64,
    n: u32,
}

/// Unstuffed bytes per refill of [`Bits`]' buffer.
const CHUNK: usize = 32 << 10;

impl<'a> Bits<'a> {
    fn new(d: &'a [u8], pos: usize) -> Self {
        Bits {
            d,
            spos: pos,
            buf: Vec::with_capacity(CHUNK + 16),
            len: 0,
            pos: 0,
            base: 0,
            marker: None,
            truncated: false,
            acc: 0,
            n: 0,
        }
    }

    /// Top up the accumulator to at least 56 bits. Past the end of the data (only corrupt
    /// data reads that far, and [`Bits::overran`] tells) the bits are zeros.
    #[inline(always)]
    fn fill(&mut self) {
        if self.pos + 8 > self.len {
            self.more();
        }
        let w = match self.buf.get(self.pos..self.pos + 8) {
            Some(c) => u64::from_be_bytes(c.try_into().unwrap_or([0; 8])),
            None => 0,
        };
        self.acc |= w >> self.n;
        self.pos += ((63 - self.n) >> 3) as usize;
        self.n |= 56;
    }

    /// Keep the bytes not yet loaded and unstuff up to a chunk more after them.
    #[cold]
    #[inline(never)]
    fn more(&mut self) {
        let keep = self.pos.min(self.len);
        self.buf.truncate(self.len);
        self.buf.drain(..keep);
        self.base += keep;
        self.pos -= keep;
        if self.marker.is_some() || self.truncated {
            self.buf.resize(CHUNK, 0);
        }
        while self.buf.len() < CHUNK {
            let rest = self.d.get(self.spos..).unwrap_or_default();
            let room = (CHUNK - self.buf.len()).min(rest.len());
            let Some(i) = memchr::memchr(0xFF, &rest[..room]) else {
                self.buf.extend_from_slice(&rest[..room]);
                self.spos += room;
                if room == rest.len() {
                    self.truncated = true;
                    self.marker = Some((0, self.d.len(), self.base + self.buf.len()));
                    break;
                }
                continue;
            };
            self.buf.extend_from_slice(&rest[..i]);
            self.spos += i;
            match self.d.get(self.spos + 1) {
                Some(0x00) => {
                    self.buf.push(0xFF);
                    self.spos += 2;
                }
                // Fill byte before a marker.
                Some(0xFF) => self.spos += 1,
                Some(&m) => {
                    self.marker = Some((m, self.spos, self.base + self.buf.len()));
                    break;
                }
                None => {
                    self.truncated = true;
                    self.marker = Some((0, self.d.len(), self.base + self.buf.len()));
                    break;
                }
            }
        }
        self.len = self.buf.len();
        self.buf.extend_from_slice(&[0; 8]);
    }

    /// Bits of this restart interval consumed so far.
    fn consumed(&self) -> usize {
        ((self.base + self.pos) * 8).saturating_sub(self.n as usize)
    }

    /// True if bits beyond the current restart interval's data have been consumed.
    fn overran(&self) -> bool {
        let consumed = self.consumed();
        self.marker
            .is_some_and(|(_, _, end)| consumed > end.saturating_mul(8))
    }

    /// Find the marker that ends the interval's data, if not reached yet.
    fn find_marker(&mut self) -> Option<(u8, usize)> {
        if self.marker.is_none() {
            let p = skip_entropy_once(self.d, self.spos)?;
            // Bytes not unstuffed yet count as they are: close enough to tell a few
            // leftover bytes from many.
            let end = self.base + self.len + (p - self.spos);
            self.marker = Some((*self.d.get(p + 1)?, p, end));
        }
        self.marker.map(|(m, p, _)| (m, p))
    }

    /// Where the scan's data ends in `d`: the first marker other than a restart marker.
    /// `None` if the file ended inside the data or bits past it were consumed.
    fn finish(mut self) -> Option<usize> {
        if self.overran() || self.truncated {
            return None;
        }
        let (_, p) = self.find_marker()?;
        skip_entropy(self.d, p)
    }

    #[inline]
    fn bits(&mut self, s: u32) -> u32 {
        if s == 0 {
            return 0;
        }
        if self.n < s {
            self.fill();
        }
        let v = (self.acc >> (64 - s)) as u32;
        self.acc <<= s;
        self.n -= s;
        v
    }

    /// Decode one symbol, the slow way for codes longer than [`FAST_BITS`].
    #[inline]
    fn decode(&mut self, h: &Huffman) -> Option<u8> {
        let peek = self.peek();
        let mut first = 1;
        if let Some(f) = h.fast() {
            let e = f.sym[peek];
            if e != 0 {
                self.consume((e >> 8) as u32);
                return Some(e as u8);
            }
            first = FAST_BITS as usize + 1;
        }
        let peek = (self.acc >> 48) as u32;
        for len in first..=16usize {
            let code = (peek >> (16 - len)) as i32;
            if code <= h.maxcode[len] {
                let idx = h.valptr[len] + code - h.mincode[len];
                let v = *h.vals.get(usize::try_from(idx).ok()?)?;
                self.acc <<= len;
                self.n -= len as u32;
                return Some(v);
            }
        }
        None
    }

    /// The next [`FAST_BITS`] bits, to index a Huffman table's fast look-ups; makes sure
    /// at least 16 bits are buffered.
    #[inline(always)]
    fn peek(&mut self) -> usize {
        if self.n < 16 {
            self.fill();
        }
        (self.acc >> (64 - FAST_BITS)) as usize
    }

    /// Drop `s` bits that `peek` has seen (`s` ≤ 16).
    #[inline(always)]
    fn consume(&mut self, s: u32) {
        self.acc <<= s;
        self.n -= s;
    }

    /// Byte-align and go on after the restart marker that must end this interval.
    fn restart(&mut self) -> Option<()> {
        if self.overran() || self.truncated {
            return None;
        }
        let (m, p) = self.find_marker()?;
        if !(0xD0..=0xD7).contains(&m) {
            return None;
        }
        // An interval's data ends within a byte of where its last block did: more left
        // over is a corrupt file (jpeg-decoder refuses it too).
        let end = self.marker.map_or(0, |(_, _, end)| end);
        if end.saturating_sub(self.consumed().div_ceil(8)) > 8 {
            return None;
        }
        self.spos = p + 2;
        self.buf.clear();
        self.len = 0;
        self.pos = 0;
        self.base = 0;
        self.marker = None;
        self.acc = 0;
        self.n = 0;
        Some(())
    }
}

#[inline]
fn extend(v: u32, s: u32) -> i32 {
    if s == 0 {
        0
    } else if v < (1 << (s - 1)) {
        v as i32 - (1 << s) + 1
    } else {
        v as i32
    }
}

#[derive(Clone, Copy, Default)]
struct Comp {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Block grid of this component (padded to whole MCUs).
    bw: usize,
    bh: usize,
    /// Blocks that hold image data (for non-interleaved scans).
    bw_real: usize,
    bh_real: usize,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Comp>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
    /// Output samples per block side: 1 (DC only), 2 or 4 (reduced IDCT).
    n: usize,
    /// DC coefficients per block (when `n` is 1).
    dc: Vec<Vec<i32>>,
    /// Decoded samples (when `n` is 2 or 4): `bw·n` × `bh·n` per component.
    planes: Vec<Vec<u8>>,
}

fn be16(d: &[u8], i: usize) -> Option<usize> {
    Some(((*d.get(i)? as usize) << 8) | *d.get(i + 1)? as usize)
}

/// Whether the header (the segments before the first scan) has an Adobe APP14 marker.
/// Its presence decides how a 4-component JPEG's samples are to be read: Adobe files
/// store CMYK inverted (0 = full ink), others store ink amounts as they are.
pub fn has_adobe_marker(d: &[u8]) -> bool {
    let mut pos = 2usize;
    while let (Some(0xFF), Some(&m)) = (d.get(pos), d.get(pos + 1)) {
        if m == 0xFF {
            pos += 1;
            continue;
        }
        let Some(len) = be16(d, pos + 2) else {
            return false;
        };
        let seg = d.get(pos + 4..pos + 2 + len).unwrap_or_default();
        if m == 0xEE && seg.starts_with(b"Adobe") {
            return true;
        }
        if m == 0xDA || m == 0xD9 || len < 2 {
            return false;
        }
        pos += 2 + len;
    }
    false
}

/// Decode at 1/8 scale from the DC coefficients, or `None` to fall back.
/// `max_blocks` bounds the allocation (number of 8×8 blocks over all components, 4 bytes
/// each).
pub fn decode(d: &[u8], max_blocks: usize) -> Option<DcImage> {
    decode_scaled(d, 8, max_blocks)
}

/// Decode at scale 1/`den` (8: DC only, any sequential or progressive file; 4 or 2:
/// sequential files only), or `None` to fall back. The image is
/// ⌈width/den⌉ × ⌈height/den⌉. `max_blocks` bounds the number of 8×8 blocks over all
/// components; memory is about 4 bytes per block at 1/8, `(8/den)²` bytes per block at 1/4
/// and 1/2 (plus the output image).
pub fn decode_scaled(d: &[u8], den: u32, max_blocks: usize) -> Option<DcImage> {
    let n = match den {
        8 => 1,
        4 => 2,
        2 => 4,
        _ => return None,
    };
    if d.get(0..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut pos = 2usize;
    // Quantization tables in zig-zag order, as stored.
    let mut qt = [None::<[u16; 64]>; 4];
    let mut dc_tables: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac_tables: [Option<Huffman>; 4] = [None, None, None, None];
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0usize;
    let mut adobe_transform: Option<u8> = None;
    let mut seen_dc_scan = false;
    let mut table_builds = 0usize;
    loop {
        if *d.get(pos)? != 0xFF {
            return None;
        }
        while *d.get(pos + 1)? == 0xFF {
            pos += 1;
        }
        let m = *d.get(pos + 1)?;
        pos += 2;
        match m {
            0xD9 => break,
            0xD8 => return None,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let len = be16(d, pos)?;
        if len < 2 || pos + len > d.len() {
            return None;
        }
        let seg = &d[pos + 2..pos + len];
        pos += len;
        match m {
            0xDB => {
                let mut i = 0;
                while i < seg.len() {
                    let pq = seg[i] >> 4;
                    let tq = (seg[i] & 15) as usize;
                    if tq > 3 {
                        return None;
                    }
                    let mut t = [0u16; 64];
                    match pq {
                        0 => {
                            let v = seg.get(i + 1..i + 65)?;
                            t.iter_mut().zip(v).for_each(|(t, &v)| *t = v as u16);
                            i += 65;
                        }
                        1 => {
                            let v = seg.get(i + 1..i + 129)?;
                            for (t, v) in t.iter_mut().zip(v.chunks_exact(2)) {
                                *t = u16::from_be_bytes([v[0], v[1]]);
                            }
                            i += 129;
                        }
                        _ => return None,
                    }
                    qt[tq] = Some(t);
                }
            }
            0xC4 => {
                let mut i = 0;
                while i < seg.len() {
                    let tc = seg[i] >> 4;
                    let th = (seg[i] & 15) as usize;
                    if th > 3 || tc > 1 {
                        return None;
                    }
                    let counts: [u8; 16] = seg.get(i + 1..i + 17)?.try_into().ok()?;
                    let total: usize = counts.iter().map(|&c| c as usize).sum();
                    let vals = seg.get(i + 17..i + 17 + total)?;
                    let h = Huffman::new(&counts, vals)?;
                    if tc == 0 {
                        dc_tables[th] = Some(h);
                    } else {
                        ac_tables[th] = Some(h);
                    }
                    i += 17 + total;
                }
            }
            0xC0..=0xC2 => {
                if frame.is_some() || *seg.first()? != 8 || (m == 0xC2 && n > 1) {
                    return None;
                }
                let height = be16(seg, 1)?;
                let width = be16(seg, 3)?;
                let nc = *seg.get(5)? as usize;
                if width == 0 || height == 0 || !(nc == 1 || nc == 3) {
                    return None;
                }
                let mut comps = Vec::with_capacity(nc);
                for c in 0..nc {
                    let b = seg.get(6 + c * 3..9 + c * 3)?;
                    let (h, v) = ((b[1] >> 4) as usize, (b[1] & 15) as usize);
                    if !(1..=2).contains(&h) || !(1..=2).contains(&v) || b[2] > 3 {
                        return None;
                    }
                    comps.push(Comp {
                        id: b[0],
                        h,
                        v,
                        tq: b[2] as usize,
                        ..Comp::default()
                    });
                }
                if nc == 1 {
                    // A single component is never interleaved: one block per MCU.
                    comps[0].h = 1;
                    comps[0].v = 1;
                }
                let hmax = comps.iter().map(|c| c.h).max()?;
                let vmax = comps.iter().map(|c| c.v).max()?;
                if comps.iter().any(|c| hmax % c.h != 0 || vmax % c.v != 0) {
                    return None;
                }
                let mcux = width.div_ceil(8 * hmax);
                let mcuy = height.div_ceil(8 * vmax);
                let mut total = 0usize;
                for c in &mut comps {
                    c.bw = mcux * c.h;
                    c.bh = mcuy * c.v;
                    c.bw_real = (width * c.h).div_ceil(hmax).div_ceil(8);
                    c.bh_real = (height * c.v).div_ceil(vmax).div_ceil(8);
                    total = total.checked_add(c.bw.checked_mul(c.bh)?)?;
                }
                if total > max_blocks {
                    return None;
                }
                let (dc, planes) = if n == 1 {
                    let dc = comps.iter().map(|c| vec![0i32; c.bw * c.bh]).collect();
                    (dc, Vec::new())
                } else {
                    let p = comps.iter().map(|c| vec![0u8; c.bw * c.bh * n * n]);
                    (Vec::new(), p.collect())
                };
                frame = Some(Frame {
                    width,
                    height,
                    progressive: m == 0xC2,
                    comps,
                    hmax,
                    vmax,
                    mcux,
                    mcuy,
                    n,
                    dc,
                    planes,
                });
            }
            // Lossless, hierarchical, arithmetic coding, DAC: not for this path.
            0xC3 | 0xC5..=0xCF => return None,
            0xDD => restart_interval = be16(seg, 0)?,
            0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                adobe_transform = Some(seg[11]);
            }
            0xDA => {
                let f = frame.as_mut()?;
                let ns = *seg.first()? as usize;
                if ns == 0 || ns > MAX_COMPONENTS {
                    return None;
                }
                let mut scomps = Vec::with_capacity(ns);
                for i in 0..ns {
                    let b = seg.get(1 + i * 2..3 + i * 2)?;
                    let ci = f.comps.iter().position(|c| c.id == b[0])?;
                    let (td, ta) = ((b[1] >> 4) as usize, (b[1] & 15) as usize);
                    if td > 3 || ta > 3 {
                        return None;
                    }
                    scomps.push((ci, td, ta));
                }
                let ss = *seg.get(1 + ns * 2)?;
                let se = *seg.get(2 + ns * 2)?;
                let a = *seg.get(3 + ns * 2)?;
                let (ah, al) = ((a >> 4) as u32, (a & 15) as u32);
                if f.progressive {
                    if ss != 0 {
                        // AC scan: skip its entropy-coded data entirely.
                        pos = skip_entropy(d, pos)?;
                        continue;
                    }
                    if se != 0 || al > 13 {
                        return None;
                    }
                } else if ss != 0 || se != 63 || ah != 0 || al != 0 || ns != f.comps.len() {
                    return None;
                }
                for &(_, td, ta) in &scomps {
                    if ah == 0 && dc_tables[td].as_mut()?.prepare(false) {
                        table_builds += 1;
                    }
                    if !f.progressive && ac_tables[ta].as_mut()?.prepare(true) {
                        table_builds += 1;
                    }
                }
                // Each build costs ~10⁴ operations: a file that redefines tables before
                // thousands of tiny scans goes to the full decoder instead.
                if table_builds > MAX_TABLE_BUILDS {
                    return None;
                }
                let dct: Vec<&Huffman> = if ah == 0 {
                    scomps
                        .iter()
                        .map(|&(_, td, _)| dc_tables[td].as_ref())
                        .collect::<Option<_>>()?
                } else {
                    Vec::new()
                };
                let act: Vec<&Huffman> = if f.progressive {
                    Vec::new()
                } else {
                    scomps
                        .iter()
                        .map(|&(_, _, ta)| ac_tables[ta].as_ref())
                        .collect::<Option<_>>()?
                };
                // Reduced IDCT: the tables of the scan's components (in scan order).
                let q: Vec<[u16; 64]> = if f.n > 1 {
                    scomps
                        .iter()
                        .map(|&(ci, _, _)| qt[f.comps[ci].tq])
                        .collect::<Option<_>>()?
                } else {
                    Vec::new()
                };
                let mut bits = Bits::new(d, pos);
                let tables = ScanTables {
                    dc: &dct,
                    ac: &act,
                    q: &q,
                };
                decode_scan(f, &scomps, &tables, ah, al, restart_interval, &mut bits)?;
                pos = bits.finish()?;
                seen_dc_scan = true;
            }
            _ => {} // APPn, COM, DNL (unsupported sizes would fail above), …
        }
    }
    let f = frame?;
    if !seen_dc_scan {
        return None;
    }
    if f.comps.len() == 3 {
        let ids: Vec<u8> = f.comps.iter().map(|c| c.id).collect();
        if adobe_transform == Some(0) || ids == b"RGB" {
            return None;
        }
    }
    if f.n > 1 {
        return render_scaled(&f);
    }
    let q: Vec<u32> = f
        .comps
        .iter()
        .map(|c| qt[c.tq].map(|t| t[0] as u32))
        .collect::<Option<_>>()?;
    Some(render(&f, &q))
}

/// Find the next marker (RST included; not stuffing or fill bytes) at or after `pos`.
fn skip_entropy_once(d: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let i = pos + memchr::memchr(0xFF, d.get(pos..)?)?;
        match *d.get(i + 1)? {
            0x00 | 0xFF => pos = i + 1,
            _ => return Some(i),
        }
    }
}

/// Find the next marker (not RST, not stuffing) at or after `pos`.
fn skip_entropy(d: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let i = pos + memchr::memchr(0xFF, d.get(pos..)?)?;
        match *d.get(i + 1)? {
            0x00 | 0xD0..=0xD7 | 0xFF => pos = i + 1,
            _ => return Some(i),
        }
    }
}

/// The tables a scan uses, in scan-component order.
struct ScanTables<'a> {
    dc: &'a [&'a Huffman],
    /// Empty for progressive scans (their DC scans have no AC data).
    ac: &'a [&'a Huffman],
    /// Quantization tables (zig-zag order), for the reduced IDCT only.
    q: &'a [[u16; 64]],
}

/// One AC symbol with its magnitude bits.
enum Ac {
    EndOfBlock,
    SixteenZeros,
    Coef { run: u32, value: i32 },
}

/// Read one AC symbol the slow way (a code or magnitude past the fast look-ups). Sizes
/// of 0 with a run other than 15 are undefined and read as end-of-block, as libjpeg does.
fn slow_ac(bits: &mut Bits<'_>, ac: &Huffman) -> Option<Ac> {
    let rs = bits.decode(ac)?;
    let (run, size) = ((rs >> 4) as u32, (rs & 15) as u32);
    Some(match (run, size) {
        (15, 0) => Ac::SixteenZeros,
        (_, 0) => Ac::EndOfBlock,
        _ => Ac::Coef {
            run,
            value: extend(bits.bits(size), size),
        },
    })
}

/// Huffman-decode and skip the AC coefficients of a block from index `k` on.
#[inline]
fn skip_ac(bits: &mut Bits<'_>, ac: &Huffman, mut k: u32) -> Option<()> {
    let skip = &ac.fast()?.skip;
    while k < 64 {
        let e = skip[bits.peek()] as u32;
        let advance = (e >> 4) & 127;
        let eob = e & (1 << 11) != 0;
        // Whole symbols only while they stay inside the block; an end-of-block must come
        // before the block is full (after that the bits belong to the next block).
        if e != 0
            && (if eob {
                k + advance < 64
            } else {
                k + advance <= 64
            })
        {
            bits.consume(e & 15);
            if eob {
                return Some(());
            }
            k += advance;
            continue;
        }
        match slow_ac(bits, ac)? {
            Ac::EndOfBlock => break,
            Ac::SixteenZeros => k += 16,
            Ac::Coef { run, .. } => k += run + 1,
        }
    }
    if k > 64 {
        return None;
    }
    Some(())
}

/// (zig-zag index, row-major index in the `n`×`n` block) of the coefficients kept: the
/// top-left 2×2 lies within the first 5 zig-zag positions, the top-left 4×4 within the
/// first 25 (checked against the zig-zag order by a test).
const PICK_2X2: [(u8, u8); 4] = [(0, 0), (1, 1), (2, 2), (4, 3)];
const PICK_4X4: [(u8, u8); 16] = [
    (0, 0),
    (1, 1),
    (2, 4),
    (3, 8),
    (4, 5),
    (5, 2),
    (6, 3),
    (7, 6),
    (8, 9),
    (9, 12),
    (11, 13),
    (12, 10),
    (13, 7),
    (17, 11),
    (18, 14),
    (24, 15),
];

/// Decode a sequential block's AC coefficients keeping the top-left `n`×`n` (`n` 2 or 4),
/// and write its `n`×`n` samples through the reduced IDCT into `out` (row stride `stride`).
#[inline]
fn reduced_block(
    bits: &mut Bits<'_>,
    ac: &Huffman,
    dc: i32,
    q: &[u16; 64],
    n: usize,
    out: &mut [u8],
    stride: usize,
) -> Option<()> {
    let kmax = if n == 2 { 4 } else { 24 };
    let mut zz = [0i32; 25];
    zz[0] = dc;
    let mut k = 1usize;
    let val = &ac.fast()?.val;
    while k <= kmax {
        let e = val[bits.peek()];
        if e != 0 {
            bits.consume((e & 15) as u32);
            k += ((e >> 4) & 15) as usize;
            if let Some(z) = zz.get_mut(k) {
                *z = e >> 12;
            }
            k += 1;
            continue;
        }
        match slow_ac(bits, ac)? {
            Ac::EndOfBlock => {
                k = 64;
                break;
            }
            Ac::SixteenZeros => k += 16,
            Ac::Coef { run, value } => {
                k += run as usize;
                if let Some(z) = zz.get_mut(k) {
                    *z = value;
                }
                k += 1;
            }
        }
    }
    skip_ac(bits, ac, u32::try_from(k).ok()?)?;
    // Dequantize into natural order (row = vertical frequency). Real coefficients of 8-bit
    // samples are within ±2048 (plus half a quantization step); clamping keeps the integer
    // arithmetic below in range for any input.
    let mut c = [0i64; 16];
    let picks: &[(u8, u8)] = if n == 2 { &PICK_2X2 } else { &PICK_4X4 };
    for &(k, i) in picks {
        let (k, i) = (k as usize, i as usize);
        c[i] = (zz[k] as i64 * q[k] as i64).clamp(-32768, 32767);
    }
    if n == 2 {
        idct_2x2(&c, out, stride)
    } else {
        idct_4x4(&c, out, stride)
    }
}

fn put(out: &mut [u8], i: usize, v: i64) -> Option<()> {
    *out.get_mut(i)? = v.clamp(0, 255) as u8;
    Some(())
}

/// The reduced inverse DCT keeps the 8-point transform's weights (so that the DC term gives
/// the block mean): with `k₀ = 1`, `kᵤ = √2` otherwise,
/// `s(x, y) = 128 + 1/8 · Σ_{u,v<n} k_u k_v F(v, u) cos((2x+1)uπ/2n) cos((2y+1)vπ/2n)`,
/// which for `n = 2` is plain sums and differences (`√2 cos(π/4) = 1`).
fn idct_2x2(c: &[i64; 16], out: &mut [u8], stride: usize) -> Option<()> {
    let (top, bottom) = (c[0] + c[2], c[0] - c[2]);
    let (top1, bottom1) = (c[1] + c[3], c[1] - c[3]);
    let f = |v: i64| (v + 4 + (128 << 3)) >> 3;
    put(out, 0, f(top + top1))?;
    put(out, 1, f(top - top1))?;
    put(out, stride, f(bottom + bottom1))?;
    put(out, stride + 1, f(bottom - bottom1))
}

/// 4-point version of [`idct_2x2`]'s transform, fixed point with 12 fraction bits per pass:
/// even part `s₀ ± s₂` (`√2 cos(π/4) = 1`), odd part `√2 cos(π/8)`, `√2 cos(3π/8)`.
fn idct_4x4(c: &[i64; 16], out: &mut [u8], stride: usize) -> Option<()> {
    const BITS: u32 = 12;
    const A: i64 = 5352; // √2·cos(π/8)·4096
    const B: i64 = 2217; // √2·cos(3π/8)·4096
    #[inline]
    fn idct4(s: [i64; 4]) -> [i64; 4] {
        let e0 = (s[0] + s[2]) << BITS;
        let e1 = (s[0] - s[2]) << BITS;
        let o0 = A * s[1] + B * s[3];
        let o1 = B * s[1] - A * s[3];
        [e0 + o0, e1 + o1, e1 - o1, e0 - o0]
    }
    // Columns (over v), then rows (over u); |values| < 2^15·4·2^13 after the first pass.
    let mut t = [0i64; 16];
    for u in 0..4 {
        let col = idct4([c[u], c[4 + u], c[8 + u], c[12 + u]]);
        for (y, v) in col.into_iter().enumerate() {
            t[y * 4 + u] = v;
        }
    }
    const SHIFT: u32 = 2 * BITS + 3;
    for y in 0..4 {
        let row = idct4([t[y * 4], t[y * 4 + 1], t[y * 4 + 2], t[y * 4 + 3]]);
        for (x, v) in row.into_iter().enumerate() {
            put(
                out,
                y * stride + x,
                (v + (1 << (SHIFT - 1)) + (128 << SHIFT)) >> SHIFT,
            )?;
        }
    }
    Some(())
}

fn decode_scan(
    f: &mut Frame,
    scomps: &[(usize, usize, usize)],
    tables: &ScanTables,
    ah: u32,
    al: u32,
    restart_interval: usize,
    bits: &mut Bits<'_>,
) -> Option<()> {
    let mut pred = [0i32; MAX_COMPONENTS];
    let progressive = f.progressive;
    let n = f.n;
    let comps = f.comps.clone();
    let dcs = &mut f.dc;
    let planes = &mut f.planes;
    let mut block =
        |bits: &mut Bits<'_>, si: usize, ci: usize, bx: usize, by: usize, pred: &mut [i32]| {
            let c = comps.get(ci)?;
            if ah == 0 {
                let dc = tables.dc[si];
                let e = dc.fast()?.val[bits.peek()];
                let diff = if e != 0 {
                    bits.consume((e & 15) as u32);
                    e >> 12
                } else {
                    let s = bits.decode(dc)? as u32;
                    if s > 11 {
                        return None;
                    }
                    extend(bits.bits(s), s)
                };
                pred[si] = pred[si].wrapping_add(diff);
            }
            if n > 1 {
                // Sequential only (checked at the frame header).
                let stride = c.bw * n;
                let out = planes.get_mut(ci)?.get_mut(by * n * stride + bx * n..)?;
                let q = tables.q.get(si)?;
                return reduced_block(bits, tables.ac[si], pred[si], q, n, out, stride);
            }
            let dc = dcs.get_mut(ci)?.get_mut(by * c.bw + bx)?;
            if ah == 0 {
                *dc = pred[si].wrapping_shl(al);
            } else if bits.bits(1) == 1 {
                *dc |= 1 << al;
            }
            if !progressive {
                skip_ac(bits, tables.ac[si], 1)?;
            }
            Some(())
        };
    let mut done = 0usize;
    let check_restart = |bits: &mut Bits<'_>, done: &mut usize, total: usize, pred: &mut [i32]| {
        *done += 1;
        if restart_interval > 0 && done.is_multiple_of(restart_interval) && *done < total {
            bits.restart()?;
            pred.iter_mut().for_each(|p| *p = 0);
        }
        Some(())
    };
    if scomps.len() == 1 {
        let (ci, _, _) = scomps[0];
        let c = comps[ci];
        let total = c.bw_real * c.bh_real;
        for by in 0..c.bh_real {
            for bx in 0..c.bw_real {
                block(bits, 0, ci, bx, by, &mut pred)?;
                check_restart(bits, &mut done, total, &mut pred)?;
            }
        }
    } else {
        let total = f.mcux * f.mcuy;
        for my in 0..f.mcuy {
            for mx in 0..f.mcux {
                for (si, &(ci, _, _)) in scomps.iter().enumerate() {
                    let c = comps[ci];
                    for v in 0..c.v {
                        for h in 0..c.h {
                            block(bits, si, ci, mx * c.h + h, my * c.v + v, &mut pred)?;
                        }
                    }
                }
                check_restart(bits, &mut done, total, &mut pred)?;
            }
        }
    }
    Some(())
}

fn clamp(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

fn render(f: &Frame, q: &[u32]) -> DcImage {
    let ow = f.width.div_ceil(8);
    let oh = f.height.div_ceil(8);
    // Block means as 8-bit planes: mean = DC·q/8 + 128.
    let plane = |ci: usize| -> Vec<i32> {
        let qv = q[ci] as i32;
        f.dc[ci]
            .iter()
            .map(|&c| {
                let v = c.wrapping_mul(qv);
                // Round to nearest.
                (v + if v >= 0 { 4 } else { -4 }) / 8 + 128
            })
            .collect()
    };
    if f.comps.len() == 1 {
        let c = f.comps[0];
        let p = plane(0);
        let mut data = Vec::with_capacity(ow * oh);
        for y in 0..oh {
            for x in 0..ow {
                data.push(clamp(p[y.min(c.bh - 1) * c.bw + x.min(c.bw - 1)]));
            }
        }
        return DcImage {
            width: ow as u32,
            height: oh as u32,
            channels: 1,
            data,
        };
    }
    let planes: Vec<Vec<i32>> = (0..3).map(plane).collect();
    let mut data = vec![0u8; ow * oh * 3];
    // Output pixel (x, y) is one luma-resolution block; each component's sample is the
    // block of its own grid that covers it.
    let cols: Vec<Vec<usize>> = f
        .comps
        .iter()
        .map(|c| (0..ow).map(|x| (x * c.h / f.hmax).min(c.bw - 1)).collect())
        .collect();
    for (y, row) in data.chunks_exact_mut(ow * 3).enumerate() {
        let line = |ci: usize| {
            let c = f.comps[ci];
            let cy = (y * c.v / f.vmax).min(c.bh - 1);
            &planes[ci][cy * c.bw..(cy + 1) * c.bw]
        };
        let (l0, l1, l2) = (line(0), line(1), line(2));
        let idx = cols[0].iter().zip(&cols[1]).zip(&cols[2]);
        for (o, ((&x0, &x1), &x2)) in row.chunks_exact_mut(3).zip(idx) {
            let (yy, cb, cr) = (
                l0[x0].clamp(0, 255),
                l1[x1].clamp(0, 255),
                l2[x2].clamp(0, 255),
            );
            ycc_to_rgb(yy, cb, cr, o);
        }
    }
    DcImage {
        width: ow as u32,
        height: oh as u32,
        channels: 3,
        data,
    }
}

/// YCbCr → RGB in 20-bit fixed point, rounded as `jpeg-decoder` does.
#[inline(always)]
fn ycc_to_rgb(yy: i32, cb: i32, cr: i32, o: &mut [u8]) {
    const R: i32 = fix20(1.402);
    const GB: i32 = fix20(0.34414);
    const GR: i32 = fix20(0.71414);
    const B: i32 = fix20(1.772);
    let px = |v: i32| (v >> 20).clamp(0, 255) as u8;
    let yy = (yy << 20) + (1 << 19);
    let (cb, cr) = (cb - 128, cr - 128);
    o[0] = px(yy + R * cr);
    o[1] = px(yy - GB * cb - GR * cr);
    o[2] = px(yy + B * cb);
}

/// One output row of a component at the image's full (reduced) resolution: rows and
/// columns subsampled by 2 are upsampled with the triangle ("fancy") filter, ¾ of the
/// nearest sample and ¼ of the next nearest, edges repeated, in fixed point exactly as
/// `jpeg-decoder` and libjpeg do.
fn upsample_row(
    plane: &[u8],
    stride: usize,
    (cw, ch): (usize, usize),
    (rx, ry): (usize, usize),
    y: usize,
    (t, wide): (&mut Vec<u32>, &mut Vec<u8>),
    out: &mut [u8],
) -> Option<()> {
    let near = (y / ry).min(ch - 1);
    let far = match (ry, y % 2) {
        (1, _) => near,
        (_, 0) => near.saturating_sub(1),
        _ => (near + 1).min(ch - 1),
    };
    let near = plane.get(near * stride..near * stride + cw)?;
    let far = plane.get(far * stride..far * stride + cw)?;
    if rx == 1 && ry == 1 {
        out.copy_from_slice(near.get(..out.len())?);
        return Some(());
    }
    // Vertical pass, ×4.
    t.clear();
    t.extend(near.iter().zip(far).map(|(&n, &f)| 3 * n as u32 + f as u32));
    if rx == 1 {
        let len = out.len();
        for (o, &v) in out.iter_mut().zip(t.get(..len)?) {
            *o = ((v + 2) >> 2) as u8;
        }
        return Some(());
    }
    // Horizontal: output 2i takes ¾ of t[i] and ¼ of t[i-1], 2i+1 ¾ of t[i] and ¼ of t[i+1].
    wide.clear();
    wide.resize(2 * cw, 0);
    let edge = |v: u32| ((v + 2) >> 2) as u8;
    wide[0] = edge(t[0]);
    wide[2 * cw - 1] = edge(t[cw - 1]);
    for (o, p) in wide[1..2 * cw - 1].chunks_exact_mut(2).zip(t.windows(2)) {
        o[0] = ((3 * p[0] + p[1] + 8) >> 4) as u8;
        o[1] = ((3 * p[1] + p[0] + 8) >> 4) as u8;
    }
    out.copy_from_slice(wide.get(..out.len())?);
    Some(())
}

/// `x` in 20-bit fixed point, as `jpeg-decoder`'s colour conversion rounds it.
const fn fix20(x: f64) -> i32 {
    (x * 1048576.0 + 0.5) as i32
}

fn render_scaled(f: &Frame) -> Option<DcImage> {
    let n = f.n;
    let ow = (f.width * n).div_ceil(8);
    let oh = (f.height * n).div_ceil(8);
    let nc = f.comps.len();
    let mut lines = vec![vec![0u8; ow]; nc];
    let (mut t, mut wide) = (Vec::new(), Vec::new());
    let mut data = vec![0u8; ow * oh * nc];
    let mut rows = data.chunks_exact_mut(ow * nc);
    for y in 0..oh {
        for (ci, line) in lines.iter_mut().enumerate() {
            let c = f.comps[ci];
            // This component's size at the reduced scale, as `jpeg-decoder` counts it.
            let cw = (f.width * c.h * n).div_ceil(f.hmax * 8);
            let ch = (f.height * c.v * n).div_ceil(f.vmax * 8);
            let ratio = (f.hmax / c.h, f.vmax / c.v);
            let bufs = (&mut t, &mut wide);
            upsample_row(f.planes.get(ci)?, c.bw * n, (cw, ch), ratio, y, bufs, line)?;
        }
        let row = rows.next()?;
        if nc == 1 {
            row.copy_from_slice(&lines[0]);
            continue;
        }
        let ycc = lines[0].iter().zip(&lines[1]).zip(&lines[2]);
        for (o, ((&yy, &cb), &cr)) in row.chunks_exact_mut(3).zip(ycc) {
            ycc_to_rgb(yy as i32, cb as i32, cr as i32, o);
        }
    }
    Some(DcImage {
        width: ow as u32,
        height: oh as u32,
        channels: nc as u8,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/fixtures/thumbnail/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn reference(data: &[u8]) -> (u32, u32, Vec<u8>, usize) {
        reference_scaled(data, 8)
    }

    fn reference_scaled(data: &[u8], den: u16) -> (u32, u32, Vec<u8>, usize) {
        let mut d = jpeg_decoder::Decoder::new(data);
        d.read_info().unwrap();
        let i = d.info().unwrap();
        let (w, h) = d
            .scale(i.width.div_ceil(den), i.height.div_ceil(den))
            .unwrap();
        let px = d.decode().unwrap();
        let ch = px.len() / (w as usize * h as usize);
        (w as u32, h as u32, px, ch)
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
    }

    #[test]
    fn matches_scaled_full_decode() {
        for name in [
            "photo.jpg",
            "progressive.jpg",
            "gray.jpg",
            "restart.jpg",
            "restart-progressive.jpg",
        ] {
            let data = fixture(name);
            let dc = decode(&data, usize::MAX).unwrap_or_else(|| panic!("{name}: fell back"));
            let (w, h, px, ch) = reference(&data);
            assert_eq!(
                (dc.width, dc.height, dc.channels as usize),
                (w, h, ch),
                "{name}"
            );
            let p = psnr(&dc.data, &px);
            eprintln!("{name}: DC-only vs jpeg-decoder 1/8: PSNR {p:.1} dB");
            assert!(p > 30.0, "{name}: PSNR {p:.1} dB vs jpeg-decoder 1/8");
        }
    }

    #[test]
    fn reduced_idct_matches_scaled_full_decode() {
        // Baseline 4:2:0 (also with restart markers and partial MCUs), 4:4:4, 4:2:2 and
        // grey, at 1/4 and 1/2: the same transform, upsampling and colour conversion as
        // jpeg-decoder's scale(), so equal within rounding.
        for name in [
            "photo.jpg",
            "restart.jpg",
            "photo-444.jpg",
            "photo-422.jpg",
            "gray.jpg",
            "orient-1.jpg",
            "orient-6.jpg",
            "adobergb.jpg",
        ] {
            let data = fixture(name);
            for den in [4u16, 2] {
                let img = decode_scaled(&data, den as u32, usize::MAX)
                    .unwrap_or_else(|| panic!("{name} 1/{den}: fell back"));
                let (w, h, px, ch) = reference_scaled(&data, den);
                assert_eq!(
                    (img.width, img.height, img.channels as usize),
                    (w, h, ch),
                    "{name} 1/{den}"
                );
                let p = psnr(&img.data, &px);
                let max = img.data.iter().zip(&px).map(|(a, b)| a.abs_diff(*b)).max();
                eprintln!("{name}: 1/{den} vs jpeg-decoder: PSNR {p:.1} dB, max diff {max:?}");
                assert!(p > 45.0, "{name} 1/{den}: PSNR {p:.1} dB vs jpeg-decoder");
            }
        }
    }

    /// Natural (row-major) index of the first 25 zig-zag positions: they cover the top-left
    /// 4×4 of the block (the first 5 cover the top-left 2×2).
    const ZIGZAG: [u8; 25] = [
        0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
    ];

    #[test]
    fn picks_follow_zigzag() {
        for (n, picks) in [(2usize, &PICK_2X2[..]), (4, &PICK_4X4[..])] {
            let want: Vec<(u8, u8)> = ZIGZAG
                .iter()
                .enumerate()
                .filter(|(_, nat)| (**nat as usize / 8) < n && (**nat as usize % 8) < n)
                .map(|(k, nat)| (k as u8, ((*nat as usize / 8) * n + *nat as usize % 8) as u8))
                .collect();
            assert_eq!(picks, &want[..]);
        }
    }

    #[test]
    fn reduced_idct_only_for_baseline() {
        for name in ["progressive.jpg", "restart-progressive.jpg", "cmyk.jpg"] {
            let data = fixture(name);
            for den in [4, 2] {
                assert!(decode_scaled(&data, den, usize::MAX).is_none(), "{name}");
            }
        }
        let data = fixture("photo.jpg");
        assert!(decode_scaled(&data, 3, usize::MAX).is_none());
        assert!(decode_scaled(&data, 1, usize::MAX).is_none());
        assert!(decode_scaled(&data, 2, 10).is_none());
        assert_eq!(
            decode_scaled(&data, 8, usize::MAX),
            decode(&data, usize::MAX)
        );
    }

    #[test]
    fn reduced_idct_broken_input_falls_back() {
        for den in [4, 2] {
            assert!(decode_scaled(&fixture("truncated.jpg"), den, usize::MAX).is_none());
            let _ = decode_scaled(&fixture("corrupt.jpg"), den, usize::MAX);
            for name in ["photo-444.jpg", "restart.jpg"] {
                let data = fixture(name);
                for cut in (0..data.len()).step_by(401) {
                    assert!(decode_scaled(&data[..cut], den, usize::MAX).is_none());
                }
                // Flipped bytes in the header and the entropy-coded data: no panic, and a
                // decoded image always has the right size.
                let mut rng = 0x9E37_79B9_7F4A_7C15u64;
                for _ in 0..100 {
                    let mut d = data.clone();
                    for _ in 0..3 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let i = (rng % d.len() as u64) as usize;
                        d[i] ^= (rng >> 32) as u8 | 1;
                    }
                    if let Some(img) = decode_scaled(&d, den, 1 << 22) {
                        assert_eq!(
                            img.data.len(),
                            img.width as usize * img.height as usize * img.channels as usize
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn hard_edges_exact() {
        // orient-1.jpg: 96x64 quadrants red / green / blue / yellow, 4:2:0, aligned to
        // 16 px: the DC image is 12x8 with exact quadrant colours (jpeg-decoder's scaled
        // decode blurs the chroma across the edges instead).
        let dc = decode(&fixture("orient-1.jpg"), usize::MAX).unwrap();
        assert_eq!((dc.width, dc.height, dc.channels), (12, 8, 3));
        let px = |x: usize, y: usize| &dc.data[(y * 12 + x) * 3..][..3];
        for (x, y, want) in [
            (0, 0, [255, 0, 0]),
            (11, 0, [0, 255, 0]),
            (0, 7, [0, 0, 255]),
            (11, 7, [255, 255, 0]),
        ] {
            let got = px(x, y);
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| (*a as i32 - b).abs() <= 6),
                "({x},{y}): {got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn unusual_or_broken_falls_back() {
        assert!(decode(&fixture("cmyk.jpg"), usize::MAX).is_none());
        assert!(decode(&fixture("truncated.jpg"), usize::MAX).is_none());
        assert!(decode(&fixture("photo.jpg"), 10).is_none());
        let data = fixture("photo.jpg");
        for cut in (0..data.len()).step_by(997) {
            let _ = decode(&data[..cut], usize::MAX);
        }
    }

    #[test]
    fn junk_before_a_restart_marker_falls_back() {
        let data = fixture("restart.jpg");
        assert!(decode_scaled(&data, 8, usize::MAX).is_some());
        // Twenty bytes that are not 0xFF before the second restart marker: the blocks of
        // that interval end long before it, which only a corrupt file does.
        let rst = data
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1]))
            .nth(1)
            .map(|(i, _)| i)
            .expect("restart markers");
        let mut bad = data[..rst].to_vec();
        bad.extend_from_slice(&[0x55; 20]);
        bad.extend_from_slice(&data[rst..]);
        for den in [8, 4, 2] {
            assert!(decode_scaled(&bad, den, usize::MAX).is_none(), "1/{den}");
        }
    }
}
