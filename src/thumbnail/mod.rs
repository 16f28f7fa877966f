//! Thumbnails: decode untrusted images with pure-Rust decoders, resize, encode.
//!
//! Pipeline (see [`pipeline`]): sniff the format from the bytes, read only the header and
//! refuse inputs over the limits ([`Config`]), decode (JPEG through `jpeg-decoder` with
//! DCT-domain "shrink on load" at 1/2, 1/4 or 1/8 when the target is small enough; every
//! other format through the `image` crate with `image::Limits`), resize with
//! `fast_image_resize` (Lanczos3), convert an embedded ICC profile to sRGB (`moxcms`),
//! flatten alpha for formats without it, apply the EXIF orientation, encode
//! (`jpeg-encoder` 4:2:0 for JPEG, `image` for the rest). Metadata is never copied.
//!
//! Resizing is done on the gamma-encoded (sRGB) values, as libvips and Pillow do by
//! default: it is cheaper, and the reference thumbnails we compare against are made
//! the same way. Linear-light resizing would be more correct for high-contrast edges.
//!
//! All decoding runs behind `catch_unwind`; a caught panic is a `Corrupt` error and is
//! counted in [`Stats::panics`].

pub mod bmp_decode;
#[cfg(feature = "service")]
pub mod cli;
pub mod gif_decode;
mod gif_frames;
#[cfg(feature = "service")]
pub mod http;
pub mod jpeg_dc;
pub mod pipeline;
mod spec;
pub mod tiff_lzw;

pub use spec::{Fit, Format, OutputFormat, Spec, parse_color};

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use serde::{Deserialize, Serialize};

/// The `"thumbnail"` section of the JSON configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Config {
    /// Refuse images with more pixels than this (width × height from the header).
    pub max_pixels: u64,
    /// Refuse inputs larger than this many bytes.
    pub max_input_bytes: u64,
    /// Refuse animations with more frames than this.
    pub max_frames: u64,
    /// Allocation bound handed to the decoders (`image::Limits::max_alloc`).
    pub max_alloc_bytes: u64,
    /// Size of the CPU pool (at most this many images decoded at once).
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_pixels: 50_000_000,
            max_input_bytes: 100 * 1024 * 1024,
            max_frames: 1000,
            max_alloc_bytes: 1024 * 1024 * 1024,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// A finished thumbnail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub format: Format,
}

/// What went wrong, coarse enough to pick an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// 400: the request itself is wrong.
    BadParams,
    /// 413: the input is over a limit.
    TooLarge,
    /// 415: not an image format we decode (or a variant we do not support).
    Unsupported,
    /// 422: the image is damaged or truncated.
    Corrupt,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadParams => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unsupported => 415,
            ErrorKind::Corrupt => 422,
        }
    }
}

/// A thumbnailing error; the message says why.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("bad parameters: {0}")]
    BadParams(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Corrupt(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::BadParams(_) => ErrorKind::BadParams,
            Error::TooLarge(_) => ErrorKind::TooLarge,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Corrupt(_) => ErrorKind::Corrupt,
        }
    }
}

/// Counters since the `Thumbnailer` was made.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Thumbnails made.
    pub made: u64,
    /// Inputs refused (any error).
    pub refused: u64,
    /// Panics caught in a decoder/encoder (also counted in `refused`).
    pub panics: u64,
}

#[derive(Default)]
struct Counters {
    made: AtomicU64,
    refused: AtomicU64,
    panics: AtomicU64,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

thread_local! {
    /// A rayon pool whose one thread is this thread (made on first use, kept for the
    /// thread's life: rayon leaks such a pool's registry, so never one per call).
    static ONE_THREAD: Option<rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .ok();
}

/// Run `f` so that the decoders' parallel work stays on the calling thread.
///
/// `jpeg-decoder` 0.3 has no switch for its single-threaded worker: for any image wider
/// than 128 px it picks its "multithreaded" worker, which without its `rayon` feature
/// starts a thread per colour component for the IDCT of every decode (so N pool threads
/// could keep up to 4N cores busy). With the `rayon` feature it hands that work to the
/// current rayon pool instead; installing a one-thread pool made of the calling thread
/// runs all of it here, inline. If this thread is already a rayon worker (no pool can
/// be made of it), `f` runs in that pool.
pub(crate) fn one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    ONE_THREAD.with(|pool| match pool {
        Some(p) => p.install(f),
        None => f(),
    })
}

struct Shared {
    config: Config,
    counters: Counters,
}

impl Shared {
    /// One decode, one thumbnail per spec; counts each result.
    fn run(&self, input: &[u8], specs: &[Spec]) -> Vec<Result<Thumbnail, Error>> {
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
            one_thread(|| pipeline::make_many(input, specs, &self.config))
        }));
        let res = match res {
            Ok(r) => r,
            Err(p) => {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                tracing::warn!(panic = %msg, "thumbnail decoder panicked");
                let e = Error::Corrupt(format!(
                    "the image could not be decoded (decoder failure: {msg})"
                ));
                vec![Err(e); specs.len()]
            }
        };
        for r in &res {
            match r {
                Ok(_) => self.counters.made.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.counters.refused.fetch_add(1, Ordering::Relaxed),
            };
        }
        res
    }
}

/// Makes thumbnails on a dedicated, bounded pool of CPU threads.
pub struct Thumbnailer {
    shared: Arc<Shared>,
    /// At most `threads` jobs are queued or running at once.
    permits: Arc<tokio::sync::Semaphore>,
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Thumbnailer {
    /// Start the pool (`config.threads` threads, at least one).
    pub fn new(config: Config) -> Self {
        let threads = config.threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("thumbnail-{i}"))
                    .spawn(move || {
                        loop {
                            let job = match rx.lock() {
                                Ok(guard) => guard.recv(),
                                Err(_) => return,
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => return,
                            }
                        }
                    })
                    .expect("spawn thumbnail worker thread")
            })
            .collect();
        Thumbnailer {
            shared: Arc::new(Shared {
                config,
                counters: Counters::default(),
            }),
            permits: Arc::new(tokio::sync::Semaphore::new(threads)),
            sender: Mutex::new(Some(tx)),
            workers,
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Make a thumbnail on the pool. Waits (asynchronously) for a free worker.
    pub async fn make(&self, input: bytes::Bytes, spec: Spec) -> Result<Thumbnail, Error> {
        self.make_many(input, vec![spec])
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::BadParams("no thumbnail spec".into())))
    }

    /// Make one thumbnail per spec from a single decode (at the JPEG shrink-on-load scale
    /// that suits the largest), on the pool, as one job. The outer `Err` is the pool being
    /// shut down; otherwise one result per spec, in order.
    pub async fn make_many(
        &self,
        input: bytes::Bytes,
        specs: Vec<Spec>,
    ) -> Result<Vec<Result<Thumbnail, Error>>, Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Unsupported("thumbnailer is shut down".into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let job: Job = Box::new(move || {
            let res = shared.run(&input, &specs);
            drop(permit);
            let _ = tx.send(res);
        });
        {
            let guard = self.sender.lock().unwrap_or_else(|e| e.into_inner());
            let sender = guard
                .as_ref()
                .ok_or_else(|| Error::Unsupported("thumbnailer is shut down".into()))?;
            sender
                .send(job)
                .map_err(|_| Error::Unsupported("thumbnailer is shut down".into()))?;
        }
        rx.await
            .map_err(|_| Error::Corrupt("thumbnail worker stopped unexpectedly".into()))
    }

    /// Make a thumbnail on the calling thread (for the CLI, which runs its own threads).
    pub fn make_blocking(&self, input: &[u8], spec: &Spec) -> Result<Thumbnail, Error> {
        self.make_many_blocking(input, std::slice::from_ref(spec))
            .pop()
            .unwrap_or_else(|| Err(Error::BadParams("no thumbnail spec".into())))
    }

    /// [`Thumbnailer::make_many`] on the calling thread.
    pub fn make_many_blocking(
        &self,
        input: &[u8],
        specs: &[Spec],
    ) -> Vec<Result<Thumbnail, Error>> {
        self.shared.run(input, specs)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            made: c.made.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Thumbnailer {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sender.lock() {
            s.take();
        }
        for w in self.workers.drain(..) {
            // A worker finishing its last job; never join ourselves.
            if w.thread().id() != std::thread::current().id() {
                let _ = w.join();
            }
        }
    }
}

/// Input for [`image_size`]: a file path or the bytes themselves.
pub enum ImageSource<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
}

impl<'a> From<&'a Path> for ImageSource<'a> {
    fn from(p: &'a Path) -> Self {
        ImageSource::Path(p)
    }
}
impl<'a> From<&'a std::path::PathBuf> for ImageSource<'a> {
    fn from(p: &'a std::path::PathBuf) -> Self {
        ImageSource::Path(p)
    }
}
impl<'a> From<&'a [u8]> for ImageSource<'a> {
    fn from(b: &'a [u8]) -> Self {
        ImageSource::Bytes(b)
    }
}
impl<'a> From<&'a Vec<u8>> for ImageSource<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        ImageSource::Bytes(b)
    }
}

/// Width and height as stored in the header (EXIF orientation not applied), reading only
/// the header. `None` if the format is not one we decode or the header is unreadable.
pub fn image_size<'a>(src: impl Into<ImageSource<'a>>) -> Option<(u32, u32)> {
    match src.into() {
        ImageSource::Bytes(b) => pipeline::probe(b).ok().map(|p| (p.width, p.height)),
        ImageSource::Path(p) => {
            use std::io::Read;
            // Headers (with EXIF/ICC segments before a JPEG's frame header) fit in 1 MiB
            // in practice; read no more than that.
            let mut buf = Vec::new();
            std::fs::File::open(p)
                .ok()?
                .take(1 << 20)
                .read_to_end(&mut buf)
                .ok()?;
            pipeline::probe(&buf).ok().map(|p| (p.width, p.height))
        }
    }
}
