//! Validation of a `POST /download` body into a [`JobSpec`], field by field, under
//! the [`SubmitLimits`] (`api.*`, `processor.max_download_timeout`); every error
//! names its field.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{
    Callback, DEFAULT_MAX_RETRIES, JobSpec, MAX_BURST, MAX_RATE, MAX_THUMBNAILS, MIN_RATE,
    MimePattern,
};

/// A field that failed validation; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

pub(super) fn invalid(msg: impl Into<String>) -> ValidationError {
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
}
