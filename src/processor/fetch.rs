//! One download: request, status, MIME check, streaming to a temporary file, atomic
//! rename into place.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tokio::io::AsyncWriteExt;

use crate::errors::{error_chain, find_in_chain};
use crate::job::{DownloadError, FailureReason, JobRecord, MimePattern, relative_path, sniff_mime};
use crate::net::resolver::DnsTimeout;
use crate::net::{AddressRefused, GuardedResolver, NetGuard, ProxyPolicy, ProxyVerdict, classify};

/// Bytes sniffed for the MIME type before the check runs.
const SNIFF_BYTES: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 10;
/// Client pools kept for distinct proxies before the cache starts over.
const MAX_CLIENTS: usize = 256;

/// How a download attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Success {
        code: u16,
        image_size: String,
        bytes: u64,
        /// The body, when it was held in memory (small) and the job wants thumbnails.
        body: Option<bytes::Bytes>,
    },
    /// Final: retrying would not help.
    Fail(DownloadError),
    /// Worth another attempt; `after` is the origin's Retry-After, `host` the host
    /// that answered (after redirects).
    Retry {
        error: DownloadError,
        after: Option<Duration>,
        host: Option<String>,
    },
}

impl Outcome {
    /// A failure worth another attempt, with no word from the origin on when.
    fn retry(error: DownloadError) -> Outcome {
        Outcome::Retry {
            error,
            after: None,
            host: None,
        }
    }

    /// The same outcome, the origin having answered `code` (a failure found in the
    /// body keeps the status that came before it).
    fn answered(self, code: u16) -> Outcome {
        match self {
            Outcome::Fail(e) => Outcome::Fail(e.answered(code)),
            Outcome::Retry { error, after, host } => Outcome::Retry {
                error: error.answered(code),
                after,
                host,
            },
            success => success,
        }
    }
}

/// How long a download may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The whole transfer, for a job without `download_timeout`.
    pub default: Duration,
    /// The most a job's `download_timeout` may give it (a larger one, stored before the
    /// cap, is clamped).
    pub max: Duration,
    /// The longest the origin may send nothing: from the request until the response's
    /// header, and between two pieces of the body.
    pub idle: Duration,
}

pub struct Fetcher {
    guard: Arc<NetGuard>,
    proxies: ProxyPolicy,
    clients: Mutex<HashMap<Option<String>, reqwest::Client>>,
    headers: HeaderMap,
    max_bytes: u64,
    timeouts: Timeouts,
    root: PathBuf,
}

impl Fetcher {
    pub fn new(
        proxies: ProxyPolicy,
        headers: &BTreeMap<String, String>,
        max_bytes: u64,
        timeouts: Timeouts,
        root: PathBuf,
    ) -> anyhow::Result<Fetcher> {
        crate::net::install_crypto_provider();
        Ok(Fetcher {
            guard: proxies.guard().clone(),
            proxies,
            clients: Mutex::new(HashMap::new()),
            headers: header_map(headers)?,
            max_bytes,
            timeouts,
            root,
        })
    }

    /// The client for `proxy` (none, or one the policy accepted). One per proxy: its
    /// resolver trusts the proxy's host name when the operator listed the proxy.
    fn client(&self, proxy: Option<(&str, &ProxyVerdict)>) -> Result<reqwest::Client, String> {
        let key = proxy.map(|(p, _)| p.to_string());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let guard = self.guard.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("stopped after {MAX_REDIRECTS} redirects"));
            }
            match guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        });
        let mut b = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(policy)
            .no_proxy()
            .dns_resolver(Arc::new(
                GuardedResolver::new(self.guard.clone(), CONNECT_TIMEOUT).trusting(
                    proxy
                        .filter(|(_, v)| v.trusted)
                        .map(|(_, v)| v.host.as_str()),
                ),
            ))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        if let Some((p, _)) = proxy {
            b = b.proxy(reqwest::Proxy::all(p).map_err(|e| format!("invalid proxy {p}: {e}"))?);
        }
        let c = b
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// The storage root files and thumbnails go under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn final_path(&self, id: &str) -> PathBuf {
        self.root.join(relative_path(id))
    }

    /// Downloads the job's URL to its final path.
    pub async fn fetch(&self, job: &JobRecord, proxy: Option<&str>) -> Outcome {
        use FailureReason::{AddressRefused as Refused, Other};
        let fail = |reason, error: String| Outcome::Fail(DownloadError::new(reason, error));
        let url = match url::Url::parse(&job.spec.url) {
            Ok(u) => u,
            Err(e) => return fail(Other, format!("invalid URL: {e}")),
        };
        // Also behind a proxy: it would resolve a name itself, but it would reach a
        // literal internal address (or localhost) just the same.
        if let Err(e) = self.guard.check_url(&url) {
            return fail(Refused, e.to_string());
        }
        // Again here, not only at submit: the config may have changed since, or an
        // older web accepted the job. Refused: final, retrying would not help.
        let proxy = match proxy.map(|p| self.proxies.check(p).map(|v| (p, v))) {
            None => None,
            Some(Ok(pv)) => Some(pv),
            Some(Err(e)) => return fail(Refused, e.to_string()),
        };
        let proxy = proxy.as_ref().map(|(p, v)| (*p, v));
        let mime = match MimePattern::parse(&job.spec.mime_type) {
            Ok(m) => m,
            Err(e) => return fail(Other, e.0),
        };
        let client = match self.client(proxy) {
            Ok(c) => c,
            Err(e) => return fail(Other, e),
        };
        let mut headers = self.headers.clone();
        match header_map(&job.spec.request_headers) {
            Ok(h) => headers.extend(h),
            Err(e) => return fail(Other, e.to_string()),
        }
        let timeout = job
            .spec
            .download_timeout
            .map(Duration::from_secs)
            .unwrap_or(self.timeouts.default)
            .min(self.timeouts.max);
        let idle = self.timeouts.idle;

        let request = client.get(url).headers(headers).timeout(timeout).send();
        // An origin that accepts the connection (or the request) and never answers.
        let resp = match tokio::time::timeout(idle.min(timeout), request).await {
            Err(_) if idle < timeout => return stalled(idle, "before the response header"),
            Err(_) => return timed_out(timeout),
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if let Some((_, v)) = proxy
                    && let Some(r) = find_in_chain::<AddressRefused>(&e)
                    && classify::normalize_name(&r.host) == v.host
                {
                    // The proxy's own name resolved to no permitted address.
                    return fail(Refused, v.refused(r).to_string());
                }
                return classify(&e, timeout);
            }
        };
        let code = resp.status().as_u16();
        if !resp.status().is_success() {
            let error = DownloadError::status(code);
            return if code == 429 || resp.status().is_server_error() {
                Outcome::Retry {
                    error,
                    after: retry_after(resp.headers()),
                    host: resp.url().host_str().map(str::to_ascii_lowercase),
                }
            } else {
                Outcome::Fail(error)
            };
        }
        if let Some(len) = resp.content_length()
            && len > self.max_bytes
        {
            return Outcome::Fail(too_large(len, self.max_bytes).answered(code));
        }

        let dest = self.final_path(&job.id);
        let tmp = TempFile::new(&dest);
        match self
            .store_body(resp, &tmp.path, &dest, &mime, timeout, idle)
            .await
        {
            Ok((bytes, held)) => {
                tmp.keep();
                // Spare the thumbnailer a read of the file it would make from these bytes.
                let body = match held {
                    Some(parts) if !job.spec.thumbnails.is_empty() => Some(match &parts[..] {
                        [one] => one.clone(),
                        _ => bytes::Bytes::from(parts.concat()),
                    }),
                    _ => None,
                };
                let image_size = if job.spec.extract_image_size {
                    image_size(dest).await
                } else {
                    String::new()
                };
                Outcome::Success {
                    code,
                    image_size,
                    bytes,
                    body,
                }
            }
            Err(o) => o.answered(code),
        }
    }

    /// Streams the body to `tmp`, checking the MIME type on the first bytes and the
    /// size on every chunk, `fsync`s it and renames it to `dest`. Small bodies stay
    /// in memory and are written in one blocking call: most files are small, and each
    /// trip to the blocking pool costs more than the write. Returns the size, and the
    /// chunks of a body that was held in memory.
    async fn store_body(
        &self,
        resp: reqwest::Response,
        tmp: &Path,
        dest: &Path,
        mime: &MimePattern,
        timeout: Duration,
        idle: Duration,
    ) -> Result<(u64, Option<Vec<bytes::Bytes>>), Outcome> {
        let expected = resp.content_length();
        let mut body = resp.bytes_stream();
        let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
        let mut checked = false;
        let mut total: u64 = 0;
        let mut held: Vec<bytes::Bytes> = Vec::new();
        let mut file: Option<tokio::fs::File> = None;
        loop {
            // The transfer's own deadline (`timeout`) is the client's; this is the gap.
            let Ok(next) = tokio::time::timeout(idle, body.next()).await else {
                return Err(stalled(idle, &format!("after {total} bytes")));
            };
            let chunk = match next {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    let mut o = classify(&e, timeout);
                    if let Outcome::Retry { error, .. } = &mut o
                        && !e.is_timeout()
                    {
                        *error = DownloadError::new(
                            FailureReason::Truncated,
                            match expected {
                                Some(n) => format!("unexpected EOF: got {total} of {n} bytes"),
                                None => format!(
                                    "unexpected EOF after {total} bytes: {}",
                                    error_chain(&e)
                                ),
                            },
                        );
                    }
                    return Err(o);
                }
                None => break,
            };
            total += chunk.len() as u64;
            if total > self.max_bytes {
                return Err(Outcome::Fail(too_large(total, self.max_bytes)));
            }
            if !checked {
                let take = (SNIFF_BYTES - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                if head.len() >= SNIFF_BYTES {
                    check_mime(mime, &head)?;
                    checked = true;
                }
            }
            match file.as_mut() {
                Some(f) => f.write_all(&chunk).await.map_err(write_error)?,
                None if total <= IN_MEMORY_BYTES => held.push(chunk),
                None => {
                    held.push(chunk);
                    let (t, parts) = (tmp.to_path_buf(), std::mem::take(&mut held));
                    let f = blocking(move || write_parts(&t, &parts)).await?;
                    file = Some(tokio::fs::File::from_std(f));
                }
            }
        }
        if !checked {
            check_mime(mime, &head)?;
        }
        let (t, d) = (tmp.to_path_buf(), dest.to_path_buf());
        match file {
            Some(mut f) => {
                f.flush().await.map_err(write_error)?;
                let f = f.into_std().await;
                blocking(move || sync_and_rename(f, &t, &d)).await?;
                Ok((total, None))
            }
            None => {
                let parts = held.clone();
                blocking(move || sync_and_rename(write_parts(&t, &parts)?, &t, &d)).await?;
                Ok((total, Some(held)))
            }
        }
    }
}

/// Writes `data` to `dest` through a fsynced temporary file beside it and a rename,
/// so `dest` never holds a partial file.
pub async fn write_atomic(dest: PathBuf, data: Vec<u8>) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        let tmp = TempFile::new(&dest);
        sync_and_rename(write_parts(&tmp.path, &[data])?, &tmp.path, &dest)?;
        tmp.keep();
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Bodies up to this size are written in one blocking call.
const IN_MEMORY_BYTES: u64 = 256 * 1024;

fn write_error(e: std::io::Error) -> Outcome {
    Outcome::retry(DownloadError::new(
        FailureReason::Storage,
        format!("cannot write file: {e}"),
    ))
}

/// Creates `path` (and its directory) holding `parts`, in order.
fn write_parts(path: &Path, parts: &[impl AsRef<[u8]>]) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(path)?;
    for p in parts {
        std::io::Write::write_all(&mut f, p.as_ref())?;
    }
    Ok(f)
}

/// Makes `f` (written at `tmp`) durable, then puts it at `dest` in one step.
fn sync_and_rename(f: std::fs::File, tmp: &Path, dest: &Path) -> std::io::Result<()> {
    f.sync_all()?;
    std::fs::rename(tmp, dest)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Outcome> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(write_error),
        Err(e) => Err(write_error(std::io::Error::other(e))),
    }
}

fn check_mime(mime: &MimePattern, head: &[u8]) -> Result<(), Outcome> {
    mime.check(&sniff_mime(head))
        .map_err(|error| Outcome::Fail(DownloadError::new(FailureReason::Mime, error)))
}

fn too_large(len: u64, max: u64) -> DownloadError {
    DownloadError::new(
        FailureReason::TooLarge,
        format!("file is larger than the limit of {max} bytes ({len} bytes or more)"),
    )
}

async fn image_size(path: PathBuf) -> String {
    tokio::task::spawn_blocking(move || {
        image::ImageReader::open(&path)
            .and_then(|r| r.with_guessed_format())
            .ok()
            .and_then(|r| r.into_dimensions().ok())
            .map(|(w, h)| format!("{w}x{h}"))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// A temporary file beside its destination (same filesystem, so the rename is
/// atomic), removed on drop unless kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn new(dest: &Path) -> TempFile {
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let path = dest.with_file_name(format!(".{name}.{}.tmp", crate::job::new_id()));
        TempFile { path, keep: false }
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The headers as a map, without the forbidden ones: `web` refuses them at submit,
/// but a job stored by an older version may still carry one.
fn header_map(h: &BTreeMap<String, String>) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (k, v) in h {
        if crate::job::is_forbidden_request_header(k) {
            continue;
        }
        map.insert(
            HeaderName::from_bytes(k.as_bytes())?,
            HeaderValue::from_str(v)?,
        );
    }
    Ok(map)
}

/// `Retry-After` as seconds or an HTTP date, capped at an hour.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(d.min(Duration::from_secs(3600)))
}

/// The transfer took longer than `timeout`: retried.
fn timed_out(timeout: Duration) -> Outcome {
    Outcome::retry(DownloadError::new(
        FailureReason::Timeout,
        format!("download timed out after {}s", timeout.as_secs()),
    ))
}

/// The origin sent nothing for `idle` (`processor.read_idle_timeout`): retried, as a
/// timeout is.
fn stalled(idle: Duration, when: &str) -> Outcome {
    Outcome::retry(DownloadError::new(
        FailureReason::Timeout,
        format!(
            "download stalled: nothing received for {}s {when} (processor.read_idle_timeout)",
            secs(idle)
        ),
    ))
}

/// Seconds for messages: `30`, `0.5`.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s:.3}").trim_end_matches('0').to_string()
    }
}

/// A request that failed without an answer (or a body that broke off): refused and
/// TLS failures are final, the rest is retried.
fn classify(e: &reqwest::Error, timeout: Duration) -> Outcome {
    let fail = |reason, error: String| Outcome::Fail(DownloadError::new(reason, error));
    if let Some(r) = find_in_chain::<AddressRefused>(e) {
        return fail(FailureReason::AddressRefused, r.to_string());
    }
    if let Some(t) = find_in_chain::<rustls::Error>(e) {
        return fail(FailureReason::Tls, format!("TLS error: {t}"));
    }
    if e.is_timeout() {
        return timed_out(timeout);
    }
    if e.is_redirect() || e.is_builder() || e.is_request() && e.source().is_none() {
        return fail(FailureReason::Other, error_chain(e));
    }
    Outcome::retry(DownloadError::new(transport_reason(e), error_chain(e)))
}

/// Why a request that may work next time failed: our resolver's lookup timed out
/// (reqwest's `is_timeout` does not know that error), no connection came about, or
/// the connection broke before the answer; else `Other`.
fn transport_reason(e: &reqwest::Error) -> FailureReason {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if find_in_chain::<DnsTimeout>(e).is_some() {
        return FailureReason::Timeout;
    }
    let broke = find_in_chain::<hyper::Error>(e)
        .is_some_and(|h| h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        || find_in_chain::<std::io::Error>(e).is_some_and(|io| {
            matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            )
        });
    if e.is_connect() || broke {
        FailureReason::Connection
    } else {
        FailureReason::Other
    }
}
