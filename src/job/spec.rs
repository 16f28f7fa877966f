//! What a client asks for: [`JobSpec`], stored as JSON in the job record and
//! immutable after submit, and what follows from it (its aggregation's key in the
//! store, its host, its thumbnail specs). How a submitted body becomes one is
//! `validate.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Callback {
    #[serde(rename = "type")]
    pub kind: String,
    pub dst: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_of_an_aggregation_key() {
        assert_eq!(JobSpec::tenant_of("@shop-1/feed"), Some("shop-1"));
        assert_eq!(JobSpec::tenant_of("@shop-1/a/b"), Some("shop-1"));
        assert_eq!(JobSpec::tenant_of("feed"), None);
        assert_eq!(JobSpec::tenant_of("@no-slash"), None);
    }
}
