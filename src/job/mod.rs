//! Jobs: what a client submits ([`JobSpec`], `spec.rs`) and how it is validated
//! (`validate.rs`), what the store keeps of it ([`JobRecord`], `record.rs`), its
//! `mime_type` patterns and the sniffing they judge (`mime.rs`), the callback payload
//! the client receives when it ends (`callback.rs`), how a download failed
//! ([`DownloadError`], `failure.rs`), and ids (`id.rs`).
//!
//! Everything is re-exported here: callers name `crate::job::JobSpec`, never a file.

mod callback;
mod failure;
mod id;
mod mime;
mod record;
mod spec;
mod validate;

pub use callback::{CallbackPayload, download_url};
pub use failure::{DownloadError, FailureReason};
pub use id::{is_valid_id, new_id, relative_path};
pub use mime::{MimePattern, sniff_mime};
pub use record::{CALLBACK_DESTINATION_WAIT, JobRecord, ThumbnailInfo, WaitReason, state};
pub use spec::{
    Callback, DEFAULT_MAX_RETRIES, JobSpec, MAX_BURST, MAX_RATE, MAX_THUMBNAILS, MIN_RATE,
    TENANT_MARK,
};
pub use validate::{
    DEFAULT_MAX_DOWNLOAD_TIMEOUT, DEFAULT_MAX_EXTRA_BYTES, DEFAULT_MAX_REQUEST_HEADERS,
    DEFAULT_MAX_REQUEST_HEADERS_BYTES, FORBIDDEN_REQUEST_HEADERS, SubmitLimits, ValidationError,
    is_forbidden_request_header,
};
