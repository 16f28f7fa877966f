//! Jobs: what a client submits, how it is validated, what the store keeps of it, and
//! the callback payload the client receives when it ends.

use std::collections::BTreeMap;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Retries of a download when the job does not say (reference default).
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// What a client asked for. Stored as JSON in the job record; immutable after submit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub url: String,
    pub aggr_id: String,
    pub aggr_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggr_proxy: Option<String>,
    /// Requests per second the aggregation may start (GCRA, across processors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggr_rate: Option<f64>,
    /// Requests the aggregation may start at once after an idle spell (with a rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggr_burst: Option<u32>,
    /// Where the callback goes; `None` only for jobs with their own S3 bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    #[serde(default)]
    pub extra: String,
    #[serde(default)]
    pub mime_type: String,
    pub max_retries: u32,
    #[serde(default)]
    pub extract_image_size: bool,
    /// Seconds the whole transfer may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub request_headers: BTreeMap<String, String>,
    /// Thumbnail specs as submitted (validated with `thumbnail::Spec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thumbnails: Vec<Value>,
    /// The name of the API token that submitted the job (`api.tokens`); never taken
    /// from the request body. Its aggregations are its own (see [`JobSpec::aggr_key`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Highest `aggr_rate` accepted (requests per second).
pub const MAX_RATE: f64 = 100_000.0;
/// Lowest `aggr_rate` accepted: one request in about 17 minutes.
pub const MIN_RATE: f64 = 0.001;
/// Highest `aggr_burst` accepted.
pub const MAX_BURST: u64 = 100_000;

/// Thumbnails one job may ask for.
pub const MAX_THUMBNAILS: usize = 8;

/// Marks a tenant's aggregation key: `@<tenant>/<aggr_id>`. Token names cannot
/// contain `/`, so two tenants' keys never meet.
pub const TENANT_MARK: char = '@';

impl JobSpec {
    /// The aggregation in the store: `aggr_id` itself for a job without a tenant,
    /// else `@<tenant>/<aggr_id>`, so that one token's jobs can neither change nor
    /// see another's aggregation of the same name.
    pub fn aggr_key(&self) -> String {
        match &self.tenant {
            Some(t) => format!("{TENANT_MARK}{t}/{}", self.aggr_id),
            None => self.aggr_id.clone(),
        }
    }

    /// The tenant whose aggregation `aggr_key` is (see [`JobSpec::aggr_key`]), if any.
    pub fn tenant_of(aggr_key: &str) -> Option<&str> {
        aggr_key
            .strip_prefix(TENANT_MARK)
            .and_then(|rest| rest.split_once('/'))
            .map(|(t, _)| t)
    }

    /// The URL's host (lower case): the key of per-host limits and pauses.
    pub fn host(&self) -> String {
        url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default()
    }

    /// The job's thumbnail specs, parsed (they were validated at submit).
    pub fn thumbnail_specs(&self) -> Result<Vec<crate::thumbnail::Spec>, String> {
        self.thumbnails
            .iter()
            .enumerate()
            .map(|(i, v)| crate::thumbnail::Spec::from_json_at(v, &format!("thumbnails[{i}]")))
            .collect()
    }
}

/// A thumbnail made for a job, as recorded and reported in the callback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThumbnailInfo {
    pub name: String,
    /// Path relative to the storage root (`<id[0:3]>/<id>.<name>.<ext>`); the
    /// callback carries it as a URL under `download_url`.
    #[serde(rename = "url")]
    pub path: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Callback {
    #[serde(rename = "type")]
    pub kind: String,
    pub dst: String,
}

/// A field that failed validation; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError(msg.into())
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ValidationError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

fn http_url(key: &str, s: &str) -> Result<url::Url, ValidationError> {
    let u = url::Url::parse(s).map_err(|e| invalid(format!("{key} is not a valid URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!(
            "{key} must be an absolute http or https URL, got {s:?}"
        )));
    }
    Ok(u)
}

fn positive_int(key: &str, v: &Value, min: u64) -> Result<u64, ValidationError> {
    let n = v.as_u64().filter(|n| *n >= min).or_else(|| {
        // Accept 3.0 (JSON numbers from some clients) but not 3.5.
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= min as f64 && *f <= u32::MAX as f64)
            .map(|f| f as u64)
    });
    n.ok_or_else(|| {
        invalid(format!(
            "{key} must be an integer >= {min}, got {}",
            short(v)
        ))
    })
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.floor_char_boundary(60)])
    } else {
        s
    }
}

/// `request_headers` entries a job may set by default (`api.max_request_headers`).
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 32;
/// Bytes of `request_headers` names and values a job may set by default
/// (`api.max_request_headers_bytes`).
pub const DEFAULT_MAX_REQUEST_HEADERS_BYTES: usize = 8192;
/// Default most bytes of `extra`: room for the ids and JSON clients echo through it,
/// while a job record (stored until its callback is done) stays small.
pub const DEFAULT_MAX_EXTRA_BYTES: usize = 64 * 1024;

/// Default longest `download_timeout` a job may ask (`processor.max_download_timeout`),
/// in seconds: the largest file allowed by default (`processor.max_download_bytes`,
/// 1 GiB) arrives at 5 Mbit/s, while a slot held by a trickling origin is given back
/// within half an hour.
pub const DEFAULT_MAX_DOWNLOAD_TIMEOUT: u64 = 1800;

/// Limits on a `POST /download` body besides its size: the `api.*` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitLimits {
    /// Most `request_headers` entries.
    pub max_request_headers: usize,
    /// Most bytes of `request_headers` names and values together.
    pub max_request_headers_bytes: usize,
    /// Most bytes of `extra`.
    pub max_extra_bytes: usize,
    /// Largest `thumbnails[i]` box, width × height (`thumbnail.max_output_pixels`).
    pub max_thumbnail_pixels: u64,
    /// Largest `download_timeout`, in seconds (`processor.max_download_timeout`).
    pub max_download_timeout: u64,
}

impl Default for SubmitLimits {
    fn default() -> Self {
        SubmitLimits {
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            max_request_headers_bytes: DEFAULT_MAX_REQUEST_HEADERS_BYTES,
            max_extra_bytes: DEFAULT_MAX_EXTRA_BYTES,
            max_thumbnail_pixels: crate::thumbnail::Config::default().max_output_pixels,
            max_download_timeout: DEFAULT_MAX_DOWNLOAD_TIMEOUT,
        }
    }
}

/// Download request headers that neither a job's `request_headers` nor the config's
/// `processor.request_headers` may set (lower case): the hop-by-hop headers, which
/// belong to one connection and would confuse it or a proxy, and `Host` and
/// `Content-Length`, which the HTTP client derives from the URL and the request (an
/// override would send the request to one virtual host under another's name).
pub const FORBIDDEN_REQUEST_HEADERS: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Whether `name` is one of [`FORBIDDEN_REQUEST_HEADERS`], in any case.
pub fn is_forbidden_request_header(name: &str) -> bool {
    FORBIDDEN_REQUEST_HEADERS
        .iter()
        .any(|f| f.eq_ignore_ascii_case(name))
}

impl JobSpec {
    /// Validates a `POST /download` body under the default [`SubmitLimits`].
    pub fn from_json(body: &[u8]) -> Result<JobSpec, ValidationError> {
        JobSpec::from_json_with(body, &SubmitLimits::default())
    }

    /// Validates a `POST /download` body. `supports_s3` and callback types other than
    /// `http` are refused with a message saying this server cannot serve them.
    pub fn from_json_with(body: &[u8], limits: &SubmitLimits) -> Result<JobSpec, ValidationError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(invalid("request body must be a JSON object"));
        };

        let url = opt_str(&obj, "url")?.ok_or_else(|| invalid("url is required"))?;
        http_url("url", url)?;

        let aggr_id = opt_str(&obj, "aggr_id")?.ok_or_else(|| invalid("aggr_id is required"))?;
        if aggr_id.is_empty() {
            return Err(invalid("aggr_id cannot be empty"));
        }
        if aggr_id.len() > 256 {
            return Err(invalid("aggr_id must be at most 256 bytes"));
        }
        let aggr_limit = match obj.get("aggr_limit") {
            None | Some(Value::Null) => return Err(invalid("aggr_limit is required")),
            Some(v) => positive_int("aggr_limit", v, 1)?,
        };
        let aggr_limit =
            u32::try_from(aggr_limit).map_err(|_| invalid("aggr_limit is too large"))?;
        let aggr_proxy = match opt_str(&obj, "aggr_proxy")? {
            None | Some("") => None,
            Some(p) => {
                let u = url::Url::parse(p)
                    .map_err(|e| invalid(format!("aggr_proxy is not a valid URL: {e}")))?;
                if !crate::net::proxy::SCHEMES.contains(&u.scheme()) {
                    return Err(invalid(
                        "aggr_proxy must be an http, https, socks5 or socks5h URL",
                    ));
                }
                Some(p.to_string())
            }
        };

        let aggr_rate = match obj.get("aggr_rate") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .filter(|r| (MIN_RATE..=MAX_RATE).contains(r))
                    .ok_or_else(|| {
                        invalid(format!(
                            "aggr_rate must be a number of requests per second from {MIN_RATE} to {MAX_RATE}, got {}",
                            short(v)
                        ))
                    })?,
            ),
        };
        let aggr_burst = match obj.get("aggr_burst") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let b = positive_int("aggr_burst", v, 1)?;
                if b > MAX_BURST {
                    return Err(invalid(format!("aggr_burst must be at most {MAX_BURST}")));
                }
                if aggr_rate.is_none() {
                    return Err(invalid("aggr_burst needs an aggr_rate"));
                }
                Some(b as u32)
            }
        };

        let s3_bucket = opt_str(&obj, "s3_bucket")?.unwrap_or("");
        let s3_region = opt_str(&obj, "s3_region")?.unwrap_or("");
        match (s3_bucket.is_empty(), s3_region.is_empty()) {
            (true, false) => return Err(invalid("s3_region provided without an s3_bucket")),
            (false, true) => return Err(invalid("s3_bucket provided without an s3_region")),
            (false, false) => {
                return Err(invalid(
                    "s3_bucket: S3 storage is not supported by this server yet",
                ));
            }
            (true, true) => {}
        }

        let callback = match opt_str(&obj, "callback_url")? {
            Some(cb) if !cb.is_empty() => {
                http_url("callback_url", cb)?;
                Callback {
                    kind: "http".into(),
                    dst: cb.to_string(),
                }
            }
            _ => {
                let kind = opt_str(&obj, "callback_type")?.unwrap_or("");
                let dst = opt_str(&obj, "callback_dst")?.unwrap_or("");
                if kind.is_empty() || dst.is_empty() {
                    return Err(invalid(format!(
                        "callback_url, or both callback_type ({kind:?}) and callback_dst ({dst:?}), are required"
                    )));
                }
                if kind != "http" {
                    return Err(invalid(format!(
                        "callback_type {kind:?} is not supported by this server (only \"http\")"
                    )));
                }
                http_url("callback_dst", dst)?;
                Callback {
                    kind: kind.into(),
                    dst: dst.into(),
                }
            }
        };

        let extra = match obj.get("extra") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.len() > limits.max_extra_bytes => {
                return Err(invalid(format!(
                    "extra must be at most {} bytes (api.max_extra_bytes), got {}",
                    limits.max_extra_bytes,
                    s.len()
                )));
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(invalid("extra must be a string")),
        };

        let mime_type = opt_str(&obj, "mime_type")?.unwrap_or("").to_string();
        MimePattern::parse(&mime_type)?;

        let max_retries = match obj.get("max_retries") {
            None | Some(Value::Null) => DEFAULT_MAX_RETRIES,
            Some(v) => u32::try_from(positive_int("max_retries", v, 0)?)
                .map_err(|_| invalid("max_retries is too large"))?,
        };
        if max_retries > 100 {
            return Err(invalid("max_retries must be at most 100"));
        }

        let extract_image_size = match obj.get("extract_image_size") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("extract_image_size must be a boolean")),
        };

        let download_timeout = match obj.get("download_timeout") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let t = positive_int("download_timeout", v, 1)?;
                if t > limits.max_download_timeout {
                    return Err(invalid(format!(
                        "download_timeout must be at most {} seconds (processor.max_download_timeout), got {t}",
                        limits.max_download_timeout
                    )));
                }
                Some(t)
            }
        };

        let mut request_headers = BTreeMap::new();
        match obj.get("request_headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(h)) => {
                if h.len() > limits.max_request_headers {
                    return Err(invalid(format!(
                        "request_headers: at most {} headers, got {}",
                        limits.max_request_headers,
                        h.len()
                    )));
                }
                let mut bytes = 0;
                for (k, v) in h {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                        _ => {
                            return Err(invalid(format!(
                                "request_headers.{k} must be a string or an integer"
                            )));
                        }
                    };
                    if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        return Err(invalid(format!(
                            "request_headers: {k:?} is not a valid header name"
                        )));
                    }
                    if reqwest::header::HeaderValue::from_str(&v).is_err() {
                        return Err(invalid(format!(
                            "request_headers.{k}: not a valid header value"
                        )));
                    }
                    if is_forbidden_request_header(k) {
                        return Err(invalid(format!(
                            "request_headers: {k:?} may not be set (a hop-by-hop header, or one the HTTP client sets itself)"
                        )));
                    }
                    bytes += k.len() + v.len();
                    request_headers.insert(k.clone(), v);
                }
                if bytes > limits.max_request_headers_bytes {
                    return Err(invalid(format!(
                        "request_headers: at most {} bytes of names and values, got {bytes}",
                        limits.max_request_headers_bytes
                    )));
                }
            }
            Some(_) => return Err(invalid("request_headers must be an object")),
        }

        let thumbnails = match obj.get("thumbnails") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => {
                if list.len() > MAX_THUMBNAILS {
                    return Err(invalid(format!(
                        "thumbnails: at most {MAX_THUMBNAILS} specs, got {}",
                        list.len()
                    )));
                }
                let mut names = std::collections::HashSet::new();
                for (i, v) in list.iter().enumerate() {
                    let spec = crate::thumbnail::Spec::from_json_at(v, &format!("thumbnails[{i}]"))
                        .map_err(invalid)?;
                    spec.check_output_pixels(
                        limits.max_thumbnail_pixels,
                        &format!("thumbnails[{i}]."),
                    )
                    .map_err(invalid)?;
                    if !names.insert(spec.name.clone()) {
                        return Err(invalid(format!(
                            "thumbnails[{i}].name {:?} is used twice",
                            spec.name
                        )));
                    }
                }
                list.clone()
            }
            Some(_) => return Err(invalid("thumbnails must be an array of thumbnail specs")),
        };

        Ok(JobSpec {
            url: url.to_string(),
            aggr_id: aggr_id.to_string(),
            aggr_limit,
            aggr_proxy,
            aggr_rate,
            aggr_burst,
            callback: Some(callback),
            extra,
            mime_type,
            max_retries,
            extract_image_size,
            download_timeout,
            request_headers,
            thumbnails,
            tenant: None,
        })
    }
}

/// A new URL-safe random job id: 16 random bytes, base64url without padding (22 chars).
pub fn new_id() -> String {
    use base64::Engine;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Whether `id` could be one of ours; guards file paths built from ids.
pub fn is_valid_id(id: &str) -> bool {
    id.len() >= 3
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Path of a job's file relative to the storage root: `<id[0:3]>/<id>`.
pub fn relative_path(id: &str) -> String {
    format!("{}/{}", &id[..3], id)
}

/// The job's `mime_type`: comma-separated glob patterns, `!` negates; all must hold.
#[derive(Debug, Clone)]
pub struct MimePattern {
    checks: Vec<(glob::Pattern, bool)>,
}

impl MimePattern {
    pub fn parse(s: &str) -> Result<MimePattern, ValidationError> {
        let mut checks = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (pat, negate) = match part.strip_prefix('!') {
                Some(p) => (p.trim(), true),
                None => (part, false),
            };
            let p = glob::Pattern::new(pat)
                .map_err(|e| invalid(format!("mime_type: invalid pattern {part:?}: {e}")))?;
            checks.push((p, negate));
        }
        Ok(MimePattern { checks })
    }

    /// `Err` names the first failing check and the type found.
    pub fn check(&self, mime: &str) -> Result<(), String> {
        for (pat, negate) in &self.checks {
            if pat.matches(mime) == *negate {
                return Err(if *negate {
                    format!(
                        "Expected mime-type not to be ({}), found ({mime})",
                        pat.as_str()
                    )
                } else {
                    format!(
                        "Expected mime-type to be ({}), found ({mime})",
                        pat.as_str()
                    )
                });
            }
        }
        Ok(())
    }
}

/// The MIME type of a file from its first bytes.
pub fn sniff_mime(head: &[u8]) -> String {
    if head.is_empty() {
        return "application/x-empty".into();
    }
    if let Some(t) = infer::get(head) {
        return t.mime_type().to_string();
    }
    if looks_like_text(head) {
        "text/plain".into()
    } else {
        "application/octet-stream".into()
    }
}

fn looks_like_text(head: &[u8]) -> bool {
    // A UTF-8 sequence may be cut at the end of the sniffed window.
    let valid = match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    };
    valid
        && head
            .iter()
            .all(|&b| b >= 0x20 || matches!(b, b'\n' | b'\r' | b'\t' | 0x0c | 0x1b))
}

/// State of a download or a callback, with the reference's names.
pub mod state {
    pub const PENDING: &str = "Pending";
    pub const IN_PROGRESS: &str = "InProgress";
    pub const SUCCESS: &str = "Success";
    pub const FAILED: &str = "Failed";
}

/// `waiting_for` of a callback parked until its receiver has a free slot.
pub const CALLBACK_DESTINATION_WAIT: &str = "callback_destination";

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A job as the store keeps it: the spec plus its mutable state.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: String,
    #[serde(flatten)]
    pub spec: JobSpec,
    pub download_state: String,
    pub download_attempts: u32,
    /// Times the origin paused the job's host (429/503 with Retry-After); these
    /// retries spend no attempt.
    pub download_pauses: u32,
    pub download_error: String,
    pub response_code: u16,
    pub image_size: String,
    pub callback_state: String,
    pub callback_attempts: u32,
    /// Times the callback was handed back unattempted since its last attempt ended,
    /// because its receiver had `notifier.per_host_concurrency` callbacks in flight.
    #[serde(skip_serializing_if = "is_zero")]
    pub callback_defers: u32,
    pub callback_error: String,
    /// Milliseconds since the Unix epoch; 0 when it has not happened.
    pub created_at: u64,
    pub started_at: u64,
    pub finished_at: u64,
    pub callback_at: u64,
    pub next_attempt_at: u64,
    /// Why a pending download is not running yet (`aggr_rate`, `host_paused`,
    /// `host_rate`, `host_concurrency`), or a pending callback (`callback_destination`:
    /// parked until its receiver has a free slot); `next_attempt_at` says until when
    /// at the latest.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waiting_for: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub thumbnails_made: Vec<ThumbnailInfo>,
}

impl JobRecord {
    /// Pending in its aggregation's queue (not delayed, not running).
    pub fn queued(&self) -> bool {
        self.download_state == state::PENDING && self.next_attempt_at == 0
    }

    /// Notes that the job's aggregation waits for its rate until `until` (ms).
    pub fn note_aggr_rate_wait(&mut self, until: Option<u64>) {
        if let Some(until) = until {
            self.waiting_for = crate::store::WaitReason::AggrRate.as_str().to_string();
            self.next_attempt_at = until;
        }
    }

    /// The JSON body POSTed to the client's callback.
    pub fn callback_payload(&self, download_base: &str) -> CallbackPayload {
        let success = self.download_state == state::SUCCESS;
        CallbackPayload {
            success,
            error: self.download_error.clone(),
            extra: self.spec.extra.clone(),
            resource_url: self.spec.url.clone(),
            download_url: if success {
                download_url(download_base, &self.id)
            } else {
                String::new()
            },
            job_id: self.id.clone(),
            response_code: self.response_code,
            delivered: true,
            delivery_error: String::new(),
            image_size: self.image_size.clone(),
            // Only jobs that asked for thumbnails get the field: the reference's
            // payload stays identical for everyone else.
            thumbnails: (!self.spec.thumbnails.is_empty()).then(|| {
                self.thumbnails_made
                    .iter()
                    .map(|t| ThumbnailInfo {
                        path: format!("{}/{}", download_base.trim_end_matches('/'), t.path),
                        ..t.clone()
                    })
                    .collect()
            }),
        }
    }
}

/// `<base>/<id[0:3]>/<id>`.
pub fn download_url(base: &str, id: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), relative_path(id))
}

/// The reference's callback body, field for field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallbackPayload {
    pub success: bool,
    pub error: String,
    pub extra: String,
    pub resource_url: String,
    pub download_url: String,
    pub job_id: String,
    pub response_code: u16,
    pub delivered: bool,
    pub delivery_error: String,
    pub image_size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnails: Option<Vec<ThumbnailInfo>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(body: &str) -> Result<JobSpec, ValidationError> {
        JobSpec::from_json(body.as_bytes())
    }

    const OK: &str = r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x.test/f","callback_url":"http://cb.test/"}"#;

    #[test]
    fn minimal_job_is_valid_with_defaults() {
        let s = spec(OK).unwrap();
        assert_eq!(s.max_retries, DEFAULT_MAX_RETRIES);
        assert_eq!(s.callback.unwrap().dst, "http://cb.test/");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                r#"{"aggr_limit":2,"url":"http://x/","callback_url":"http://c/"}"#,
                "aggr_id",
            ),
            (
                r#"{"aggr_id":"","aggr_limit":2,"url":"http://x/","callback_url":"http://c/"}"#,
                "aggr_id",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":0,"url":"http://x/","callback_url":"http://c/"}"#,
                "aggr_limit",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"ftp://x/","callback_url":"http://c/"}"#,
                "url",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/"}"#,
                "callback_url",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_type":"kafka","callback_dst":"t"}"#,
                "callback_type",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_url":"http://c/","mime_type":"image/["}"#,
                "mime_type",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_url":"http://c/","max_retries":-1}"#,
                "max_retries",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_url":"http://c/","download_timeout":0}"#,
                "download_timeout",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_url":"http://c/","extract_image_size":"yes"}"#,
                "extract_image_size",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_url":"http://c/","request_headers":{"A":true}}"#,
                "request_headers",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","callback_url":"http://c/","s3_bucket":"b"}"#,
                "s3_region",
            ),
            (
                r#"{"aggr_id":"a","aggr_limit":2,"url":"http://x/","s3_bucket":"b","s3_region":"r"}"#,
                "not supported",
            ),
        ];
        for (body, field) in cases {
            let e = spec(body).unwrap_err().0;
            assert!(e.contains(field), "{body}: {e}");
        }
    }

    #[test]
    fn extra_is_capped() {
        let with_extra = |n: usize, limits: &SubmitLimits| {
            let mut body: Value = serde_json::from_str(OK).unwrap();
            body["extra"] = Value::from("x".repeat(n));
            JobSpec::from_json_with(body.to_string().as_bytes(), limits)
        };
        let d = SubmitLimits::default();
        assert!(with_extra(DEFAULT_MAX_EXTRA_BYTES, &d).is_ok());
        let e = with_extra(DEFAULT_MAX_EXTRA_BYTES + 1, &d).unwrap_err().0;
        assert!(
            e.contains("extra") && e.contains("api.max_extra_bytes"),
            "{e}"
        );
        let tight = SubmitLimits {
            max_extra_bytes: 10,
            ..d
        };
        assert!(with_extra(10, &tight).is_ok());
        assert!(with_extra(11, &tight).is_err());
    }

    #[test]
    fn download_timeout_is_capped() {
        let with_timeout = |t: Value, limits: &SubmitLimits| {
            let mut body: Value = serde_json::from_str(OK).unwrap();
            body["download_timeout"] = t;
            JobSpec::from_json_with(body.to_string().as_bytes(), limits)
        };
        let d = SubmitLimits::default();
        let max = DEFAULT_MAX_DOWNLOAD_TIMEOUT;
        assert_eq!(
            with_timeout(max.into(), &d).unwrap().download_timeout,
            Some(max)
        );
        for t in [
            Value::from(max + 1),
            Value::from(u64::MAX),
            Value::from(1e300),
        ] {
            let e = with_timeout(t.clone(), &d).unwrap_err().0;
            assert!(e.starts_with("download_timeout"), "{t}: {e}");
        }
        let e = with_timeout((max + 1).into(), &d).unwrap_err().0;
        assert!(e.contains("processor.max_download_timeout"), "{e}");
        let tight = SubmitLimits {
            max_download_timeout: 5,
            ..d
        };
        assert!(with_timeout(5.into(), &tight).is_ok());
        assert!(with_timeout(6.into(), &tight).is_err());
    }

    #[test]
    fn tenant_of_an_aggregation_key() {
        assert_eq!(JobSpec::tenant_of("@shop-1/feed"), Some("shop-1"));
        assert_eq!(JobSpec::tenant_of("@shop-1/a/b"), Some("shop-1"));
        assert_eq!(JobSpec::tenant_of("feed"), None);
        assert_eq!(JobSpec::tenant_of("@no-slash"), None);
    }

    fn with_headers(headers: Value, limits: &SubmitLimits) -> Result<JobSpec, ValidationError> {
        let mut body: Value = serde_json::from_str(OK).unwrap();
        body["request_headers"] = headers;
        JobSpec::from_json_with(body.to_string().as_bytes(), limits)
    }

    #[test]
    fn request_headers_are_capped_in_count_and_bytes() {
        let d = SubmitLimits::default();
        let n = |count: usize| {
            Value::Object(
                (0..count)
                    .map(|i| (format!("X-H{i}"), Value::from("v")))
                    .collect(),
            )
        };
        assert_eq!(with_headers(n(32), &d).unwrap().request_headers.len(), 32);
        let e = with_headers(n(33), &d).unwrap_err().0;
        assert!(e.contains("request_headers") && e.contains("32"), "{e}");
        // 20,000 headers, as measured: refused by count.
        let e = with_headers(n(20_000), &d).unwrap_err().0;
        assert!(e.contains("at most 32 headers, got 20000"), "{e}");

        // Bytes: names and values together. "X-Big" (5) + 8187 = 8192 passes.
        let big = |len: usize| serde_json::json!({ "X-Big": "v".repeat(len) });
        assert!(with_headers(big(8187), &d).is_ok());
        let e = with_headers(big(8188), &d).unwrap_err().0;
        assert!(e.contains("request_headers") && e.contains("8192"), "{e}");
        // Integer values count as their digits.
        let tight = SubmitLimits {
            max_request_headers: 2,
            max_request_headers_bytes: 6,
            ..SubmitLimits::default()
        };
        assert!(with_headers(serde_json::json!({"A": 12345}), &tight).is_ok());
        assert!(with_headers(serde_json::json!({"A": 123456}), &tight).is_err());
        let e = with_headers(serde_json::json!({"A": "1", "B": "2", "C": "3"}), &tight)
            .unwrap_err()
            .0;
        assert!(e.contains("at most 2 headers"), "{e}");
        // The default-limits form is the same as the defaults passed.
        assert_eq!(
            JobSpec::from_json(OK.as_bytes()).unwrap(),
            JobSpec::from_json_with(OK.as_bytes(), &d).unwrap()
        );
    }

    #[test]
    fn hop_by_hop_host_and_content_length_headers_are_refused() {
        for name in [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "PROXY-AUTHENTICATE",
            "Proxy-Authorization",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Host",
            "host",
            "Content-Length",
        ] {
            let e = with_headers(serde_json::json!({ name: "x" }), &SubmitLimits::default())
                .unwrap_err()
                .0;
            assert!(
                e.contains("request_headers") && e.contains(&format!("{name:?}")),
                "{name}: {e}"
            );
        }
        for ok in [
            "Accept",
            "User-Agent",
            "Authorization",
            "Cookie",
            "X-Host",
            "Referer",
        ] {
            assert!(
                with_headers(serde_json::json!({ ok: "x" }), &SubmitLimits::default()).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn mime_patterns_and_negation() {
        let p = MimePattern::parse("image/*,!image/gif").unwrap();
        assert!(p.check("image/png").is_ok());
        let e = p.check("image/gif").unwrap_err();
        assert!(
            e.starts_with("Expected mime-type") && e.contains("image/gif"),
            "{e}"
        );
        let e = p.check("text/plain").unwrap_err();
        assert!(e.contains("image/*") && e.contains("text/plain"), "{e}");
        assert!(MimePattern::parse("").unwrap().check("anything").is_ok());
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff_mime(b""), "application/x-empty");
        assert_eq!(sniff_mime(b"hello world\n"), "text/plain");
        assert_eq!(
            sniff_mime(&[0u8, 1, 2, 3, 0xff]),
            "application/octet-stream"
        );
        assert_eq!(sniff_mime(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
    }

    #[test]
    fn ids_are_url_safe_and_distinct() {
        let a = new_id();
        assert!(is_valid_id(&a) && a.len() == 22);
        assert_ne!(a, new_id());
        assert!(!is_valid_id("../etc"));
        assert_eq!(
            download_url("http://h/d/", "abcdef"),
            "http://h/d/abc/abcdef"
        );
    }
}
