//! How a download attempt failed: [`DownloadError`], made where the failure happens
//! (the fetcher, the thumbnails, the file's storage). It carries its
//! [`FailureReason`] (the metrics' label, one of a fixed set), the origin's HTTP
//! status, and the message the callback and `GET /jobs/{id}` show, so that nothing
//! downstream has to guess the reason from the message.

/// Why a download failed: the `reason` label of `downloader_jobs_failed_total` and
/// `downloader_download_retries_total`. A fixed set, so label cardinality stays
/// bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The thumbnails could not be made, or not stored.
    Thumbnail,
    /// The file's type is not one the job's `mime_type` allows.
    Mime,
    /// Over `processor.max_download_bytes`.
    TooLarge,
    /// The TLS handshake or session failed.
    Tls,
    /// The address guard refused the origin (or a redirect's target), or the proxy
    /// policy the job's proxy.
    AddressRefused,
    /// The transfer took longer than its timeout, the origin sent nothing for
    /// `processor.read_idle_timeout`, or the name's DNS lookup timed out.
    Timeout,
    /// The body ended before its announced length, or broke off.
    Truncated,
    /// The file could not be written.
    Storage,
    /// The origin answered 429.
    Http429,
    /// The origin answered another 4xx.
    Http4xx,
    /// The origin answered a 5xx.
    Http5xx,
    /// No connection (DNS, refused, unreachable), or it broke before an answer.
    Connection,
    /// Anything else.
    Other,
}

impl FailureReason {
    /// Every reason, in the order the metrics register their series.
    pub const ALL: [FailureReason; 13] = [
        FailureReason::Thumbnail,
        FailureReason::Mime,
        FailureReason::TooLarge,
        FailureReason::Tls,
        FailureReason::AddressRefused,
        FailureReason::Timeout,
        FailureReason::Truncated,
        FailureReason::Storage,
        FailureReason::Http429,
        FailureReason::Http4xx,
        FailureReason::Http5xx,
        FailureReason::Connection,
        FailureReason::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Thumbnail => "thumbnail",
            FailureReason::Mime => "mime",
            FailureReason::TooLarge => "too_large",
            FailureReason::Tls => "tls",
            FailureReason::AddressRefused => "address_refused",
            FailureReason::Timeout => "timeout",
            FailureReason::Truncated => "truncated",
            FailureReason::Storage => "storage",
            FailureReason::Http429 => "http_429",
            FailureReason::Http4xx => "http_4xx",
            FailureReason::Http5xx => "http_5xx",
            FailureReason::Connection => "connection",
            FailureReason::Other => "other",
        }
    }

    /// The reason of an answer with status `code`, which is not a success (a 3xx
    /// that was not followed is `Other`).
    pub fn of_status(code: u16) -> FailureReason {
        match code {
            429 => FailureReason::Http429,
            400..=499 => FailureReason::Http4xx,
            500.. => FailureReason::Http5xx,
            _ => FailureReason::Other,
        }
    }
}

/// A failed download attempt: why ([`FailureReason`]), the origin's HTTP status (0
/// when none came), and the message the job records as its `download_error` and the
/// callback carries as `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DownloadError {
    pub reason: FailureReason,
    pub code: u16,
    pub message: String,
}

impl DownloadError {
    /// A failure before or without an answer of the origin (`code` 0).
    pub fn new(reason: FailureReason, message: impl Into<String>) -> DownloadError {
        DownloadError {
            reason,
            code: 0,
            message: message.into(),
        }
    }

    /// The origin answered `code`, which is not a success (the reference's message).
    pub fn status(code: u16) -> DownloadError {
        DownloadError {
            code,
            ..DownloadError::new(
                FailureReason::of_status(code),
                format!("Received status code {code}"),
            )
        }
    }

    /// The same failure, after the origin answered `code` (one found in the body).
    pub fn answered(self, code: u16) -> DownloadError {
        DownloadError { code, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels are part of the metrics' interface: dashboards and alerts name
    /// them. Changing one is changing the interface, not a refactoring.
    #[test]
    fn every_reason_has_its_fixed_label() {
        let labels: Vec<&str> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "thumbnail",
                "mime",
                "too_large",
                "tls",
                "address_refused",
                "timeout",
                "truncated",
                "storage",
                "http_429",
                "http_4xx",
                "http_5xx",
                "connection",
                "other",
            ]
        );
    }

    #[test]
    fn a_status_is_its_reason_code_and_the_references_message() {
        for (code, reason) in [
            (400, FailureReason::Http4xx),
            (404, FailureReason::Http4xx),
            (429, FailureReason::Http429),
            (499, FailureReason::Http4xx),
            (500, FailureReason::Http5xx),
            (503, FailureReason::Http5xx),
            (599, FailureReason::Http5xx),
            (304, FailureReason::Other),
        ] {
            let e = DownloadError::status(code);
            assert_eq!((e.reason, e.code), (reason, code), "{code}");
            assert_eq!(e.to_string(), format!("Received status code {code}"));
        }
        let e = DownloadError::new(FailureReason::Mime, "Expected mime-type").answered(200);
        assert_eq!(
            (e.reason, e.code, e.message.as_str()),
            (FailureReason::Mime, 200, "Expected mime-type")
        );
    }
}
