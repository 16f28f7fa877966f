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
pub mod jpeg_dc;
pub mod lzw;
pub mod pipeline;
mod spec;
pub mod tiff_lzw;

pub use spec::{Fit, Format, OutputFormat, Spec, parse_color};

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

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
    /// Refuse a spec whose `width` × `height` box is over this many pixels (checked on
    /// the spec, before any decoding).
    pub max_output_pixels: u64,
    /// Most bytes of one encoded thumbnail: refused before decoding when the format's
    /// worst case is over it, and the encoder is stopped when its output reaches it.
    pub max_output_bytes: u64,
    /// The memory all decodes of this process may reserve together (from each one's
    /// estimate, made from the header before decoding).
    pub max_memory_bytes: u64,
}

/// `thumbnail.max_memory_bytes` by default: a quarter of the machine's memory, at most
/// 1 GiB, at least 256 MiB (1 GiB when the total cannot be read).
pub fn default_max_memory_bytes() -> u64 {
    const GIB: u64 = 1 << 30;
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match total {
        Some(t) => (t / 4).clamp(256 << 20, GIB),
        None => GIB,
    }
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
            max_output_pixels: 25_000_000,
            max_output_bytes: 64 * 1024 * 1024,
            max_memory_bytes: default_max_memory_bytes(),
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
    /// 503: the memory budget had no room for it before its deadline.
    Busy,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadParams => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unsupported => 415,
            ErrorKind::Corrupt => 422,
            ErrorKind::Busy => 503,
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
    #[error("{0}")]
    Busy(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::BadParams(_) => ErrorKind::BadParams,
            Error::TooLarge(_) => ErrorKind::TooLarge,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Busy(_) => ErrorKind::Busy,
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

/// Whose work a thumbnail is: the two classes share the pool fairly (see [`Thumbnailer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `POST /thumbnail`: waits for memory until its request's deadline, then 503.
    Api,
    /// A job's thumbnails (the processor): waits for memory up to [`JOB_MEMORY_WAIT`].
    Job,
}

/// How long a job's decode may wait for its memory reservation. Generous: a job's
/// thumbnail must not fail because the API is busy, and running decodes free their
/// reservations within seconds.
pub const JOB_MEMORY_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

struct Queues {
    api: std::collections::VecDeque<Job>,
    job: std::collections::VecDeque<Job>,
    /// The class the last job taken was of (to alternate when both wait).
    last: Class,
    closed: bool,
}

impl Queues {
    /// The next job: alternately from each class when both have work.
    fn take(&mut self) -> Option<Job> {
        let pick_job = match (self.api.is_empty(), self.job.is_empty()) {
            (true, true) => return None,
            (false, true) => false,
            (true, false) => true,
            (false, false) => self.last == Class::Api,
        };
        if pick_job {
            self.last = Class::Job;
            self.job.pop_front()
        } else {
            self.last = Class::Api;
            self.api.pop_front()
        }
    }
}

struct Shared {
    config: Config,
    counters: Counters,
    budget: crate::budget::ByteBudget,
    queues: Mutex<Queues>,
    ready: Condvar,
}

impl Shared {
    /// One decode (after reserving its estimate from the budget, waiting up to
    /// `deadline`), one thumbnail per spec handed to `each` as it is made; counts each.
    fn run(
        &self,
        input: &[u8],
        specs: &[Spec],
        deadline: Instant,
        each: &mut (dyn FnMut(usize, Result<Thumbnail, Error>) -> bool + Send),
    ) {
        let budget = &self.budget;
        let mut reserve = |n: u64| -> Result<Option<crate::budget::Reservation>, Error> {
            budget
                .acquire(n, deadline)
                .map(Some)
                .map_err(|e| match e {
                    crate::budget::BudgetError::TooLarge { wanted, total } => {
                        Error::TooLarge(format!(
                            "decoding this image needs an estimated {} MiB, more than the whole thumbnail memory budget of {} MiB (thumbnail.max_memory_bytes)",
                            wanted.div_ceil(1 << 20),
                            total / (1 << 20)
                        ))
                    }
                    crate::budget::BudgetError::Busy { wanted, free, total } => {
                        Error::Busy(format!(
                            "server busy: decoding this image needs an estimated {} MiB of the thumbnail memory budget, only {} of {} MiB were free in time",
                            wanted.div_ceil(1 << 20),
                            free / (1 << 20),
                            total / (1 << 20)
                        ))
                    }
                })
        };
        let mut seen = vec![false; specs.len()];
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
            one_thread(|| {
                pipeline::make_each(input, specs, &self.config, &mut reserve, &mut |i, r| {
                    seen[i] = true;
                    self.count(&r);
                    each(i, r)
                })
            })
        }));
        if let Err(p) = res {
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
            for (i, _) in seen.iter().enumerate().filter(|(_, s)| !**s) {
                let r = Err(e.clone());
                self.count(&r);
                if !each(i, r) {
                    break;
                }
            }
        }
    }

    fn count(&self, r: &Result<Thumbnail, Error>) {
        match r {
            Ok(_) => self.counters.made.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.refused.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Makes thumbnails on a dedicated, bounded pool of CPU threads.
///
/// Two classes of work ([`Class`]) share it: each has its own queue and at most
/// `threads` jobs queued or running, and a free worker takes from the two queues in
/// turn, so a flood of `POST /thumbnail` delays a job's thumbnail by at most one API
/// decode per worker (and the reverse). Every decode first reserves its estimated memory
/// from one [`ByteBudget`](crate::budget::ByteBudget) of `max_memory_bytes`, granted in
/// arrival order.
pub struct Thumbnailer {
    shared: Arc<Shared>,
    /// At most `threads` jobs of each class are queued or running at once.
    permits: [Arc<tokio::sync::Semaphore>; 2],
    workers: Vec<std::thread::JoinHandle<()>>,
}

type Item = (
    usize,
    Result<Thumbnail, Error>,
    std::sync::mpsc::SyncSender<bool>,
);

/// The thumbnails of one [`Thumbnailer::start`], one at a time.
pub struct Results {
    rx: tokio::sync::mpsc::Receiver<Item>,
    /// Tells the worker waiting on the result last handed over to go on.
    ack: Option<std::sync::mpsc::SyncSender<bool>>,
}

impl Results {
    /// The next thumbnail (index of its spec, result); `None` after the last. The worker
    /// starts on it only now, after the previous one has been dropped.
    pub async fn next(&mut self) -> Option<(usize, Result<Thumbnail, Error>)> {
        if let Some(ack) = self.ack.take() {
            // A worker that has stopped has dropped its receiver: nothing to tell.
            let _ = ack.send(true);
        }
        let (i, r, ack) = self.rx.recv().await?;
        self.ack = Some(ack);
        Some((i, r))
    }
}

impl Thumbnailer {
    /// Start the pool (`config.threads` threads, at least one).
    pub fn new(config: Config) -> Self {
        let threads = config.threads.max(1);
        let shared = Arc::new(Shared {
            budget: crate::budget::ByteBudget::new(config.max_memory_bytes),
            config,
            counters: Counters::default(),
            queues: Mutex::new(Queues {
                api: Default::default(),
                job: Default::default(),
                last: Class::Job,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let workers = (0..threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("thumbnail-{i}"))
                    .spawn(move || {
                        loop {
                            let mut q = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
                            let job = loop {
                                if let Some(j) = q.take() {
                                    break j;
                                }
                                if q.closed {
                                    return;
                                }
                                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                            };
                            drop(q);
                            job();
                        }
                    })
                    .expect("spawn thumbnail worker thread")
            })
            .collect();
        Thumbnailer {
            shared,
            permits: [
                Arc::new(tokio::sync::Semaphore::new(threads)),
                Arc::new(tokio::sync::Semaphore::new(threads)),
            ],
            workers,
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The memory budget every decode reserves from.
    pub fn budget(&self) -> &crate::budget::ByteBudget {
        &self.shared.budget
    }

    /// Make a thumbnail on the pool (class [`Class::Api`], memory waited for up to
    /// 30 s, as `POST /thumbnail`). Waits (asynchronously) for a free worker.
    pub async fn make(&self, input: bytes::Bytes, spec: Spec) -> Result<Thumbnail, Error> {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        self.make_until(input, spec, deadline).await
    }

    /// [`Thumbnailer::make`], memory waited for until `deadline`.
    pub async fn make_until(
        &self,
        input: bytes::Bytes,
        spec: Spec,
        deadline: Instant,
    ) -> Result<Thumbnail, Error> {
        let mut results = self.start(input, vec![spec], Class::Api, deadline).await?;
        match results.next().await {
            Some((_, r)) => r,
            None => Err(Error::Corrupt(
                "thumbnail worker stopped unexpectedly".into(),
            )),
        }
    }

    /// Start making one thumbnail per spec from a single decode (at the JPEG
    /// shrink-on-load scale that suits the largest), on the pool, as one job of `class`;
    /// memory is waited for until `deadline`. [`Results::next`] hands over each result in
    /// order, and the next thumbnail is made only when it is asked for: one output is
    /// held at a time. Dropping the [`Results`] stops the rest. The `Err` is the pool
    /// being shut down.
    pub async fn start(
        &self,
        input: bytes::Bytes,
        specs: Vec<Spec>,
        class: Class,
        deadline: Instant,
    ) -> Result<Results, Error> {
        let shut = || Error::Unsupported("thumbnailer is shut down".into());
        let permits = &self.permits[class as usize];
        let permit = permits.clone().acquire_owned().await.map_err(|_| shut())?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Item>(1);
        let shared = self.shared.clone();
        let job: Job = Box::new(move || {
            shared.run(&input, &specs, deadline, &mut |i, r| {
                // Hand the result over and wait until the next one is asked for, so that
                // this one is dropped (written) before the next one is made.
                let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
                if tx.blocking_send((i, r, ack_tx)).is_err() {
                    return false;
                }
                ack_rx.recv().unwrap_or(false)
            });
            drop(permit);
        });
        {
            let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            if q.closed {
                return Err(shut());
            }
            match class {
                Class::Api => q.api.push_back(job),
                Class::Job => q.job.push_back(job),
            }
        }
        self.shared.ready.notify_one();
        Ok(Results { rx, ack: None })
    }

    /// As [`Thumbnailer::start`] for a job ([`Class::Job`], [`JOB_MEMORY_WAIT`]), all
    /// results collected (one per spec, in order).
    pub async fn make_many(
        &self,
        input: bytes::Bytes,
        specs: Vec<Spec>,
    ) -> Result<Vec<Result<Thumbnail, Error>>, Error> {
        let deadline = Instant::now() + JOB_MEMORY_WAIT;
        self.make_many_until(input, specs, Class::Job, deadline)
            .await
    }

    /// As [`Thumbnailer::start`], all results collected (one per spec, in order).
    pub async fn make_many_until(
        &self,
        input: bytes::Bytes,
        specs: Vec<Spec>,
        class: Class,
        deadline: Instant,
    ) -> Result<Vec<Result<Thumbnail, Error>>, Error> {
        let mut results = self.start(input, specs, class, deadline).await?;
        let mut out = Vec::new();
        while let Some((_, r)) = results.next().await {
            out.push(r);
        }
        Ok(out)
    }

    /// Make a thumbnail on the calling thread (for the CLI, which runs its own threads).
    pub fn make_blocking(&self, input: &[u8], spec: &Spec) -> Result<Thumbnail, Error> {
        self.make_many_blocking(input, std::slice::from_ref(spec))
            .pop()
            .unwrap_or_else(|| Err(Error::BadParams("no thumbnail spec".into())))
    }

    /// [`Thumbnailer::make_many`] on the calling thread (memory waited for up to
    /// [`JOB_MEMORY_WAIT`]).
    pub fn make_many_blocking(
        &self,
        input: &[u8],
        specs: &[Spec],
    ) -> Vec<Result<Thumbnail, Error>> {
        let mut out = Vec::with_capacity(specs.len());
        let deadline = Instant::now() + JOB_MEMORY_WAIT;
        self.shared.run(input, specs, deadline, &mut |_, r| {
            out.push(r);
            true
        });
        out
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
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.ready.notify_all();
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
