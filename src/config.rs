//! The JSON configuration file, compatible with skroutz/downloader's `config.json`.
//!
//! Every key of the reference service is accepted; keys we add have defaults, so a
//! reference config works unchanged. Unknown keys are logged and ignored (reference
//! configs carry backend settings we do not use, such as Kafka's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::secret::Secret;

/// Environment variable that shortens every retry backoff to 200 ms (reference behaviour,
/// used by test suites).
pub const TEST_TIME_ENV: &str = "DOWNLOADER_TEST_TIME";

/// A config file that could not be used. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Which store: `{"type": "redis"}` or `{"type": "embedded", "path": ...}`. Without
    /// it, a `redis` section selects Redis and no `redis` section the embedded store.
    pub store: Option<StoreConfig>,
    pub redis: RedisConfig,
    pub api: ApiConfig,
    pub processor: ProcessorConfig,
    pub notifier: NotifierConfig,
    pub backends: Backends,
    pub thumbnail: crate::thumbnail::Config,
    pub log: crate::logging::LogConfig,
    #[serde(skip)]
    has_redis_section: bool,
    /// Keys of the file that were ignored (unknown), for the component to log once
    /// its logging is set up: `parse` runs before that.
    #[serde(skip)]
    pub ignored_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    Redis,
    Embedded { path: Option<PathBuf> },
}

/// The store a config selects, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreKind {
    Redis,
    Embedded(PathBuf),
}

impl StoreKind {
    pub fn name(&self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Embedded(_) => "embedded",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    pub addr: String,
    /// Reference key: Sentinel addresses. Not supported yet; rejected when set.
    pub sentinel: serde_json::Value,
    pub master_name: Option<String>,
    /// Logical database number.
    pub db: i64,
    pub password: Option<Secret>,
    /// Every key this service writes starts with `<key_prefix>:`.
    pub key_prefix: String,
    /// Timeout of one Redis command, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            addr: "127.0.0.1:6379".into(),
            sentinel: serde_json::Value::Null,
            master_name: None,
            db: 0,
            password: None,
            key_prefix: "downloader".into(),
            timeout_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// While this file exists `GET /hb` answers 503 (load-balancer drain).
    pub heartbeat_path: Option<PathBuf>,
    /// Largest accepted `POST /download` body, in bytes.
    pub max_body_bytes: Option<usize>,
    /// Seconds a connection may take to send a request's header; also bounds an idle
    /// keep-alive connection (slowloris clients are cut off).
    pub header_timeout_secs: f64,
    /// Seconds a request body may stall between two chunks.
    pub body_timeout_secs: f64,
    /// Seconds from a request's header to the end of its body, however steadily it
    /// trickles in.
    pub body_total_timeout_secs: f64,
    /// Seconds a response write may wait for the client to read before the connection
    /// is dropped.
    pub response_timeout_secs: f64,
    /// Bytes of request bodies held at once by the whole process; a body that does not
    /// fit is refused (503) before a byte of it is read.
    pub max_inflight_body_bytes: u64,
    /// Connections per listener that serve requests; default from the open-file limit.
    pub max_connections: Option<usize>,
    /// Seconds shutdown waits for open connections to finish.
    pub shutdown_grace_secs: f64,
    /// Bearer tokens (`downloader token new`). Empty: the API is open to whoever
    /// reaches it, as the reference's is (a warning says so at start).
    pub tokens: Vec<crate::auth::TokenConfig>,
    /// Endpoints that need no token even when tokens are configured: any of
    /// `metrics`, `info`, `stats`, `files`.
    pub public_endpoints: Vec<String>,
    /// Origins (`https://admin.example.com`) whose pages may call the API from a
    /// browser; a request from any other site is refused.
    pub allowed_origins: Vec<String>,
    /// Whose settings an aggregation keeps: `last` (every job's, the reference's) or
    /// `first` (the first job's, until the aggregation has no job left).
    pub aggregation_settings: AggrSettings,
    /// Most `request_headers` entries one job may set.
    pub max_request_headers: usize,
    /// Most bytes of `request_headers` names and values one job may set.
    pub max_request_headers_bytes: usize,
    /// Most bytes of a job's `extra`.
    pub max_extra_bytes: usize,
}

/// `api.max_inflight_body_bytes`'s default.
pub const DEFAULT_BODY_BUDGET: u64 = 256 << 20;

/// Endpoints `api.public_endpoints` may open.
pub const PUBLIC_ENDPOINTS: [&str; 4] = ["metrics", "info", "stats", "files"];

/// What a submit does to the settings (limit, proxy, rate, burst) of an aggregation
/// that already has jobs (`api.aggregation_settings`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggrSettings {
    /// The last job's settings win (the reference's behaviour).
    #[default]
    Last,
    /// The first job's settings stay until the aggregation has no job left in its
    /// download phase (pending, delayed or in flight); later jobs' settings are
    /// ignored until then.
    First,
}

impl AggrSettings {
    pub fn as_str(self) -> &'static str {
        match self {
            AggrSettings::Last => "last",
            AggrSettings::First => "first",
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            heartbeat_path: None,
            max_body_bytes: None,
            header_timeout_secs: 30.0,
            body_timeout_secs: 30.0,
            body_total_timeout_secs: 120.0,
            response_timeout_secs: 30.0,
            max_inflight_body_bytes: DEFAULT_BODY_BUDGET,
            max_connections: None,
            shutdown_grace_secs: 30.0,
            tokens: Vec::new(),
            public_endpoints: Vec::new(),
            allowed_origins: Vec::new(),
            aggregation_settings: AggrSettings::Last,
            max_request_headers: crate::job::DEFAULT_MAX_REQUEST_HEADERS,
            max_request_headers_bytes: crate::job::DEFAULT_MAX_REQUEST_HEADERS_BYTES,
            max_extra_bytes: crate::job::DEFAULT_MAX_EXTRA_BYTES,
        }
    }
}

impl ApiConfig {
    /// What `POST /download` accepts besides the body size.
    pub fn submit_limits(&self) -> crate::job::SubmitLimits {
        crate::job::SubmitLimits {
            max_request_headers: self.max_request_headers,
            max_request_headers_bytes: self.max_request_headers_bytes,
            max_extra_bytes: self.max_extra_bytes,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileStorage {
    #[serde(rename = "type")]
    pub kind: String,
    pub rootdir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProcessorConfig {
    pub storage_dir: Option<PathBuf>,
    pub filestorage: Option<FileStorage>,
    pub download_url: Option<String>,
    pub request_headers: BTreeMap<String, String>,
    /// Older reference configs set the User-Agent here.
    pub user_agent: Option<String>,
    /// Milliseconds between two stats reports.
    pub stats_interval: u64,
    pub allowed_networks: Vec<String>,
    /// Proxies jobs may name in `aggr_proxy` (URLs, host patterns, IPs or CIDRs),
    /// trusted to reach internal addresses. Empty: a proxy must pass the address guard.
    pub allowed_proxies: Vec<String>,
    pub retry_backoff_ms: u64,
    pub max_download_bytes: u64,
    pub lease_secs: u64,
    /// Transfer timeout of a job that sets no `download_timeout`, in seconds.
    pub download_timeout: u64,
    /// Largest `download_timeout` a job may ask (web refuses more; the processor
    /// clamps stored jobs that ask more), in seconds.
    pub max_download_timeout: u64,
    /// Seconds a download may go without receiving a byte (response headers included)
    /// before it fails as stalled (retryable).
    pub read_idle_timeout: f64,
    /// Most of this processor's download slots one aggregation may hold.
    pub max_slots_per_aggregation: SlotShare,
    /// Most of this processor's download slots one tenant (API token) may hold, over
    /// all its aggregations.
    pub max_slots_per_tenant: SlotShare,
    /// Downloads one processor runs at once, over all aggregations.
    pub max_concurrent_downloads: usize,
    /// Seconds that in-flight downloads get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Downloads from one origin host at once, over every processor (0: no limit).
    pub per_host_concurrency: u32,
    /// Requests per second to one origin host, over every processor (0: no limit).
    pub per_host_rate: f64,
    /// Requests to one host that may start at once after an idle spell (with a rate).
    pub per_host_burst: u32,
    /// Longest pause an origin's Retry-After (on 429 or 503) may impose on its host.
    pub max_host_pause_secs: f64,
    /// `host:port` of the admin listener (`/metrics`, `/info`, `/healthz`); off when unset.
    pub admin_addr: Option<String>,
    /// Claims stop while the storage filesystem is fuller than this (percent).
    pub disk_high_watermark_percent: f64,
    /// Claims resume once the storage filesystem is below this again (percent).
    pub disk_low_watermark_percent: f64,
    /// Milliseconds between two looks at the storage filesystem's usage.
    pub disk_check_interval_ms: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            storage_dir: None,
            filestorage: None,
            download_url: None,
            request_headers: BTreeMap::new(),
            user_agent: None,
            stats_interval: 5000,
            allowed_networks: Vec::new(),
            allowed_proxies: Vec::new(),
            retry_backoff_ms: 120_000,
            max_download_bytes: 1 << 30,
            lease_secs: 15,
            download_timeout: 60,
            max_download_timeout: crate::job::DEFAULT_MAX_DOWNLOAD_TIMEOUT,
            read_idle_timeout: 30.0,
            max_slots_per_aggregation: SlotShare::Percent(50.0),
            max_slots_per_tenant: SlotShare::Percent(50.0),
            max_concurrent_downloads: 1024,
            shutdown_grace_secs: 30,
            per_host_concurrency: 0,
            per_host_rate: 0.0,
            per_host_burst: 1,
            max_host_pause_secs: 600.0,
            admin_addr: None,
            disk_high_watermark_percent: 95.0,
            disk_low_watermark_percent: 90.0,
            disk_check_interval_ms: 5000,
        }
    }
}

/// A share of the processor's download slots: a number of slots, or a percentage of
/// `processor.max_concurrent_downloads` (`"50%"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlotShare {
    Slots(usize),
    Percent(f64),
}

impl SlotShare {
    /// The share as a number of slots out of `total`: at least 1, at most `total`.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            SlotShare::Slots(n) => n,
            SlotShare::Percent(p) => (total as f64 * p / 100.0).ceil() as usize,
        };
        n.clamp(1, total.max(1))
    }
}

impl<'de> Deserialize<'de> for SlotShare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SlotShare, D::Error> {
        let bad = || {
            serde::de::Error::custom(
                "must be a number of slots (an integer >= 1) or a percentage such as \"50%\" (above 0, at most 100)",
            )
        };
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(n) if n >= 1 => Ok(SlotShare::Slots(n as usize)),
                _ => Err(bad()),
            },
            serde_json::Value::String(s) => match s.trim().strip_suffix('%') {
                Some(p) => match p.trim().parse::<f64>() {
                    Ok(p) if p > 0.0 && p <= 100.0 => Ok(SlotShare::Percent(p)),
                    _ => Err(bad()),
                },
                None => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// Per-host politeness (`processor.per_host_*`, [`Config::host_limits`]), the same in
/// every processor's config: `rate` requests per second to one host (0: off) with
/// `burst`, and at most `concurrency` downloads from one host at once (0: off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLimits {
    pub rate: f64,
    pub burst: u32,
    pub concurrency: u32,
}

impl HostLimits {
    pub const OFF: HostLimits = HostLimits {
        rate: 0.0,
        burst: 1,
        concurrency: 0,
    };
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NotifierConfig {
    pub download_url: Option<String>,
    pub concurrency: usize,
    pub stats_interval: u64,
    /// Minutes between a job's callback and the deletion of its file and record.
    /// Fractions are accepted (tests use them).
    pub deletion_interval: f64,
    pub retry_backoff_ms: u64,
    /// Attempts of a callback in all (the first one included) before it is marked
    /// failed. Default [`DEFAULT_CALLBACK_ATTEMPTS`], the reference's.
    pub callback_attempts: Option<u32>,
    /// The older name, counted differently: retries after the first attempt
    /// (attempts = retries + 1). At most one of the two may be set.
    pub callback_retries: Option<u32>,
    /// Callbacks in flight at once to one receiver (`host:port`) in this process;
    /// default: 40% of `concurrency`, rounded up ([`Config::callback_per_host`]).
    pub per_host_concurrency: Option<usize>,
    pub lease_secs: u64,
    pub shutdown_grace_secs: u64,
    /// `host:port` of the admin listener (`/metrics`, `/info`, `/healthz`); off when unset.
    pub admin_addr: Option<String>,
    /// Days a failed callback (a dead letter) is kept, listed and retryable, before
    /// it is deleted with its files.
    pub failed_retention: f64,
    /// CIDRs callbacks may reach besides public addresses. Unset: the private networks
    /// ([`crate::net::DEFAULT_CALLBACK_NETWORKS`]); set, it is taken as it is.
    pub allowed_networks: Option<Vec<String>>,
    /// `whsec_<base64>` keys every HTTP callback is signed with (Standard Webhooks),
    /// one signature each: several while a key is rotated.
    #[serde(deserialize_with = "secrets")]
    pub signing_secrets: Vec<Secret>,
}

/// A list of secrets whose errors never quote a value (serde's own would).
fn secrets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                serde_json::Value::String(s) => Ok(Secret::new(s)),
                _ => Err(D::Error::custom(format!(
                    "entry {i} must be a string (whsec_<base64>)"
                ))),
            })
            .collect(),
        _ => Err(D::Error::custom("must be a list of whsec_<base64> strings")),
    }
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            download_url: None,
            concurrency: 10,
            stats_interval: 5000,
            deletion_interval: 180.0,
            retry_backoff_ms: 600_000,
            callback_attempts: None,
            callback_retries: None,
            per_host_concurrency: None,
            lease_secs: 15,
            shutdown_grace_secs: 30,
            admin_addr: None,
            failed_retention: 7.0,
            allowed_networks: None,
            signing_secrets: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Backends {
    pub http: HttpBackend,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpBackend {
    /// Seconds one callback may take.
    pub timeout: u64,
}

impl Default for HttpBackend {
    fn default() -> Self {
        HttpBackend { timeout: 30 }
    }
}

fn err(file: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.display().to_string(),
        message: message.into(),
    }
}

impl Config {
    /// What `POST /download` accepts besides the body size: the `api.*` caps and the
    /// largest thumbnail box (`thumbnail.max_output_pixels`).
    pub fn submit_limits(&self) -> crate::job::SubmitLimits {
        crate::job::SubmitLimits {
            max_thumbnail_pixels: self.thumbnail.max_output_pixels,
            max_download_timeout: self.processor.max_download_timeout,
            ..self.api.submit_limits()
        }
    }

    /// Logs a warning for each ignored key of the file at `path`. Call once logging is set up.
    pub fn warn_ignored_keys(&self, path: &Path) {
        for key in &self.ignored_keys {
            tracing::warn!(file = %path.display(), key = %key, "unknown config key ignored");
        }
    }

    /// Warns when `api.max_inflight_body_bytes` is smaller than a body a route takes
    /// (`api.max_body_bytes`, `thumbnail.max_input_bytes`): such bodies are refused with
    /// a 413 naming the budget. Call once logging is set up.
    pub fn warn_body_budget(&self) {
        let budget = self.api.max_inflight_body_bytes;
        for (key, limit) in [
            (
                "api.max_body_bytes",
                self.api.max_body_bytes.unwrap_or(1 << 20) as u64,
            ),
            ("thumbnail.max_input_bytes", self.thumbnail.max_input_bytes),
        ] {
            if limit > budget {
                tracing::warn!(
                    key,
                    limit,
                    max_inflight_body_bytes = budget,
                    "api.max_inflight_body_bytes is below this body limit: larger bodies are refused (413)"
                );
            }
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path, format!("cannot read config file: {e}")))?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(path, format!("invalid JSON: {e}")))?;
        let mut ignored = Vec::new();
        let mut note = |p: serde_ignored::Path<'_>| {
            let p = p.to_string();
            if !p.starts_with("backends.") {
                ignored.push(p)
            }
        };
        let de = serde_ignored::Deserializer::new(&value, &mut note);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            err(path, format!("key `{key}`: {}", e.inner()))
        })?;
        cfg.ignored_keys = ignored;
        cfg.has_redis_section = value.get("redis").is_some();
        cfg.validate().map_err(|m| err(path, m))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !self.redis.sentinel.is_null() || self.redis.master_name.is_some() {
            return Err(
                "key `redis.sentinel`: Redis Sentinel is not supported yet; set `redis.addr` to the master's address".into(),
            );
        }
        if self.redis.addr.is_empty() {
            return Err("key `redis.addr`: must not be empty".into());
        }
        if self.redis.key_prefix.is_empty() {
            return Err("key `redis.key_prefix`: must not be empty".into());
        }
        if !(self.notifier.deletion_interval > 0.0 && self.notifier.deletion_interval < 1e8) {
            return Err(
                "key `notifier.deletion_interval`: must be a number of minutes greater than 0"
                    .into(),
            );
        }
        for (key, v) in [
            ("api.header_timeout_secs", self.api.header_timeout_secs),
            ("api.body_timeout_secs", self.api.body_timeout_secs),
            (
                "api.body_total_timeout_secs",
                self.api.body_total_timeout_secs,
            ),
            ("api.response_timeout_secs", self.api.response_timeout_secs),
            ("api.shutdown_grace_secs", self.api.shutdown_grace_secs),
        ] {
            if !(v > 0.0 && v < 1e6) {
                return Err(format!(
                    "key `{key}`: must be a number of seconds greater than 0"
                ));
            }
        }
        if !(self.notifier.failed_retention > 0.0 && self.notifier.failed_retention <= 36_500.0) {
            return Err(
                "key `notifier.failed_retention`: must be a number of days greater than 0 (at most 36500)"
                    .into(),
            );
        }
        if self.notifier.concurrency == 0 {
            return Err("key `notifier.concurrency`: must be greater than 0".into());
        }
        if let Some(n) = self.notifier.per_host_concurrency
            && !(1..=self.notifier.concurrency).contains(&n)
        {
            return Err(format!(
                "key `notifier.per_host_concurrency`: must be from 1 to `notifier.concurrency` ({})",
                self.notifier.concurrency
            ));
        }
        match (
            self.notifier.callback_attempts,
            self.notifier.callback_retries,
        ) {
            (Some(_), Some(_)) => {
                return Err(
                    "keys `notifier.callback_attempts` and `notifier.callback_retries`: set only one \
                     (`callback_retries` is the older name, counting retries after the first \
                     attempt: attempts = retries + 1)"
                        .into(),
                );
            }
            (Some(n), None) if !(1..=MAX_CALLBACK_ATTEMPTS).contains(&n) => {
                return Err(format!(
                    "key `notifier.callback_attempts`: must be from 1 to {MAX_CALLBACK_ATTEMPTS}"
                ));
            }
            (None, Some(n)) if n >= MAX_CALLBACK_ATTEMPTS => {
                return Err(format!(
                    "key `notifier.callback_retries`: must be from 0 to {}",
                    MAX_CALLBACK_ATTEMPTS - 1
                ));
            }
            _ => {}
        }
        if self.api.max_inflight_body_bytes == 0 {
            return Err("key `api.max_inflight_body_bytes`: must be greater than 0".into());
        }
        if self.api.max_connections == Some(0) {
            return Err("key `api.max_connections`: must be greater than 0".into());
        }
        for (key, v) in [
            ("processor.stats_interval", self.processor.stats_interval),
            ("notifier.stats_interval", self.notifier.stats_interval),
            ("processor.lease_secs", self.processor.lease_secs),
            ("notifier.lease_secs", self.notifier.lease_secs),
            (
                "processor.download_timeout",
                self.processor.download_timeout,
            ),
            (
                "processor.max_download_bytes",
                self.processor.max_download_bytes,
            ),
            ("backends.http.timeout", self.backends.http.timeout),
            (
                "processor.disk_check_interval_ms",
                self.processor.disk_check_interval_ms,
            ),
        ] {
            if v == 0 {
                return Err(format!("key `{key}`: must be greater than 0"));
            }
        }
        self.log.filter()?;
        for (key, v) in [
            ("thumbnail.threads", self.thumbnail.threads as u64),
            (
                "thumbnail.max_output_pixels",
                self.thumbnail.max_output_pixels,
            ),
            (
                "thumbnail.max_output_bytes",
                self.thumbnail.max_output_bytes,
            ),
            (
                "thumbnail.max_memory_bytes",
                self.thumbnail.max_memory_bytes,
            ),
        ] {
            if v == 0 {
                return Err(format!("key `{key}`: must be greater than 0"));
            }
        }
        let p = &self.processor;
        if !(p.per_host_rate == 0.0
            || (crate::job::MIN_RATE..=crate::job::MAX_RATE).contains(&p.per_host_rate))
        {
            return Err(format!(
                "key `processor.per_host_rate`: must be 0 (off) or a number of requests per second from {} to {}",
                crate::job::MIN_RATE,
                crate::job::MAX_RATE
            ));
        }
        if p.per_host_burst == 0 {
            return Err("key `processor.per_host_burst`: must be greater than 0".into());
        }
        if !(p.max_host_pause_secs > 0.0 && p.max_host_pause_secs <= 86_400.0) {
            return Err(
                "key `processor.max_host_pause_secs`: must be a number of seconds from 0 to 86400 (exclusive of 0)"
                    .into(),
            );
        }
        if self.processor.max_concurrent_downloads == 0 {
            return Err("key `processor.max_concurrent_downloads`: must be greater than 0".into());
        }
        let max_timeout = p.max_download_timeout;
        if max_timeout == 0 || max_timeout > 86_400 * 7 {
            return Err(
                "key `processor.max_download_timeout`: must be a number of seconds from 1 to 604800 (a week)"
                    .into(),
            );
        }
        if p.download_timeout > max_timeout {
            return Err(format!(
                "key `processor.download_timeout`: {} is above processor.max_download_timeout ({max_timeout})",
                p.download_timeout
            ));
        }
        if !(p.read_idle_timeout > 0.0 && p.read_idle_timeout <= max_timeout as f64) {
            return Err(format!(
                "key `processor.read_idle_timeout`: must be a number of seconds greater than 0 and at most processor.max_download_timeout ({max_timeout})"
            ));
        }
        if let Some(fs) = &self.processor.filestorage {
            if fs.kind != "filesystem" {
                return Err(format!(
                    "key `processor.filestorage.type`: {:?} is not supported yet (only \"filesystem\")",
                    fs.kind
                ));
            }
            if fs.rootdir.is_none() && self.processor.storage_dir.is_none() {
                return Err("key `processor.filestorage.rootdir`: required".into());
            }
        }
        self.allowed_networks()?;
        self.callback_networks()?;
        crate::secret::signing_keys(&self.notifier.signing_secrets)?;
        crate::auth::Tokens::from_config(&self.api.tokens)?;
        for (i, e) in self.api.public_endpoints.iter().enumerate() {
            if !PUBLIC_ENDPOINTS.contains(&e.as_str()) {
                return Err(format!(
                    "key `api.public_endpoints[{i}]`: {e:?} is not one of {PUBLIC_ENDPOINTS:?}"
                ));
            }
        }
        for (i, o) in self.api.allowed_origins.iter().enumerate() {
            crate::net::origin::parse_origin(o)
                .map_err(|e| format!("key `api.allowed_origins[{i}]`: {e}"))?;
        }
        self.proxy_policy()?;
        let (high, low) = (
            self.processor.disk_high_watermark_percent,
            self.processor.disk_low_watermark_percent,
        );
        if !(high > 0.0 && high <= 100.0) {
            return Err(
                "key `processor.disk_high_watermark_percent`: must be a percentage greater than 0 and at most 100".into(),
            );
        }
        if !(low > 0.0 && low < high) {
            return Err(format!(
                "key `processor.disk_low_watermark_percent`: must be a percentage greater than 0 and below processor.disk_high_watermark_percent ({high})"
            ));
        }
        for (key, addr) in [
            ("processor.admin_addr", &self.processor.admin_addr),
            ("notifier.admin_addr", &self.notifier.admin_addr),
        ] {
            if let Some(a) = addr {
                a.parse::<std::net::SocketAddr>().map_err(|e| {
                    format!("key `{key}`: {a:?} is not an address such as 127.0.0.1:9101: {e}")
                })?;
            }
        }
        for (key, url) in [
            ("processor.download_url", &self.processor.download_url),
            ("notifier.download_url", &self.notifier.download_url),
        ] {
            if let Some(u) = url {
                url::Url::parse(u).map_err(|e| format!("key `{key}`: invalid URL {u:?}: {e}"))?;
            }
        }
        for (name, value) in &self.processor.request_headers {
            if crate::job::is_forbidden_request_header(name) {
                return Err(format!(
                    "key `processor.request_headers.{name}`: may not be set (a hop-by-hop header, or one the HTTP client sets itself)"
                ));
            }
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(value).is_err()
            {
                return Err(format!(
                    "key `processor.request_headers.{name}`: not a valid HTTP header"
                ));
            }
        }
        Ok(())
    }

    /// The networks downloads may reach beyond the public internet.
    pub fn allowed_networks(&self) -> Result<Vec<IpNet>, String> {
        parse_networks(
            "processor.allowed_networks",
            &self.processor.allowed_networks,
        )
    }

    /// The networks callbacks may reach beyond the public internet, as configured
    /// (`None`: not set, the default applies).
    pub fn callback_networks(&self) -> Result<Option<Vec<IpNet>>, String> {
        self.notifier
            .allowed_networks
            .as_ref()
            .map(|l| parse_networks("notifier.allowed_networks", l))
            .transpose()
    }

    /// The address guard: public addresses and `processor.allowed_networks`.
    pub fn net_guard(&self) -> Result<crate::net::NetGuard, String> {
        Ok(crate::net::NetGuard::new(self.allowed_networks()?))
    }

    /// The callbacks' address guard (`notifier.allowed_networks`): the notifier judges
    /// every address it connects to with it, and `web` a `callback_url` at submit.
    pub fn callback_guard(&self) -> Result<crate::net::NetGuard, String> {
        Ok(crate::net::NetGuard::callbacks(self.callback_networks()?))
    }

    /// Which `aggr_proxy`s jobs may use (`processor.allowed_proxies`, and the guard for
    /// proxies when that is empty). `web` and the processor both apply it.
    pub fn proxy_policy(&self) -> Result<crate::net::ProxyPolicy, String> {
        let guard = std::sync::Arc::new(self.net_guard()?);
        crate::net::ProxyPolicy::new(guard, &self.processor.allowed_proxies).map_err(|(i, why)| {
            format!(
                "key `processor.allowed_proxies[{i}]`: {:?} is not a proxy URL, host pattern, IP or CIDR: {why}",
                self.processor.allowed_proxies[i]
            )
        })
    }

    /// The store this config selects. The embedded store's file defaults to
    /// `store.redb` beside the storage directory.
    pub fn store_kind(&self) -> StoreKind {
        match &self.store {
            Some(StoreConfig::Redis) => StoreKind::Redis,
            None if self.has_redis_section => StoreKind::Redis,
            Some(StoreConfig::Embedded { path: Some(p) }) => StoreKind::Embedded(p.clone()),
            Some(StoreConfig::Embedded { path: None }) | None => {
                let root = self
                    .storage_root()
                    .unwrap_or_else(|_| PathBuf::from("data/files"));
                let dir = root.parent().map(Path::to_path_buf).unwrap_or_default();
                StoreKind::Embedded(dir.join("store.redb"))
            }
        }
    }

    /// The defaults of `downloader serve` without a config file: embedded store and
    /// files under `./data`, files served by the same server.
    pub fn serve_defaults(base_url: &str) -> Config {
        let mut cfg = Config::default();
        cfg.processor.storage_dir = Some(PathBuf::from("data/files"));
        cfg.processor.download_url = Some(format!("{base_url}/files"));
        cfg.store = Some(StoreConfig::Embedded {
            path: Some(PathBuf::from("data/store.redb")),
        });
        cfg
    }

    /// Where downloaded files are stored: `filestorage.rootdir`, else `storage_dir`.
    pub fn storage_root(&self) -> Result<PathBuf, String> {
        self.processor
            .filestorage
            .as_ref()
            .and_then(|f| f.rootdir.clone())
            .or_else(|| self.processor.storage_dir.clone())
            .ok_or_else(|| {
                "key `processor.storage_dir` (or `processor.filestorage.rootdir`): required".into()
            })
    }

    /// Base URL that clients download stored files from.
    pub fn download_url(&self) -> Result<String, String> {
        self.processor
            .download_url
            .clone()
            .or_else(|| self.notifier.download_url.clone())
            .ok_or_else(|| {
                "key `processor.download_url` (or `notifier.download_url`): required".into()
            })
    }

    /// Default request headers for downloads. `user_agent` is the older spelling of
    /// the `User-Agent` header; an explicit header wins.
    pub fn default_headers(&self) -> BTreeMap<String, String> {
        let mut h = self.processor.request_headers.clone();
        if let Some(ua) = &self.processor.user_agent
            && !h.keys().any(|k| k.eq_ignore_ascii_case("user-agent"))
        {
            h.insert("User-Agent".into(), ua.clone());
        }
        h
    }

    /// How long a download may take at most (`processor.max_download_timeout`).
    pub fn max_download_timeout(&self) -> Duration {
        Duration::from_secs(self.processor.max_download_timeout)
    }

    /// How long a download may receive nothing (`processor.read_idle_timeout`).
    pub fn read_idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.processor.read_idle_timeout)
    }

    /// Per-host politeness (`processor.per_host_*`).
    pub fn host_limits(&self) -> HostLimits {
        HostLimits {
            rate: self.processor.per_host_rate,
            burst: self.processor.per_host_burst,
            concurrency: self.processor.per_host_concurrency,
        }
    }

    /// How long a finished job's file and record are kept.
    pub fn deletion_delay(&self) -> Duration {
        Duration::from_secs_f64(self.notifier.deletion_interval * 60.0)
    }

    /// How long a failed callback is kept (`notifier.failed_retention`, days).
    pub fn failed_retention(&self) -> Duration {
        Duration::from_secs_f64(self.notifier.failed_retention * 86_400.0)
    }

    pub fn processor_backoff(&self) -> Duration {
        backoff(self.processor.retry_backoff_ms)
    }

    pub fn notifier_backoff(&self) -> Duration {
        backoff(self.notifier.retry_backoff_ms)
    }

    /// Attempts of one callback in all: `notifier.callback_attempts`, or
    /// `notifier.callback_retries` + 1, or the reference's 2.
    pub fn callback_attempts(&self) -> u32 {
        match (
            self.notifier.callback_attempts,
            self.notifier.callback_retries,
        ) {
            (Some(n), _) => n,
            (None, Some(r)) => r.saturating_add(1),
            (None, None) => DEFAULT_CALLBACK_ATTEMPTS,
        }
    }

    /// Callbacks in flight at once to one receiver in one notifier:
    /// `notifier.per_host_concurrency`, by default 40% of `notifier.concurrency`
    /// rounded up (4 of 10): one receiver that hangs cannot hold every slot.
    pub fn callback_per_host(&self) -> usize {
        let c = self.notifier.concurrency.max(1);
        self.notifier
            .per_host_concurrency
            .unwrap_or_else(|| c.saturating_mul(2).div_ceil(5))
            .clamp(1, c)
    }
}

/// CIDRs (or single addresses) of the config list `key`; a bad one is named with its index.
fn parse_networks(key: &str, list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("key `{key}[{i}]`: {s:?} is not a CIDR network"))
        })
        .collect()
}

/// The reference's `maxCallbackRetries` (which counts attempts).
pub const DEFAULT_CALLBACK_ATTEMPTS: u32 = 2;
/// Most attempts `notifier.callback_attempts` may ask for.
pub const MAX_CALLBACK_ATTEMPTS: u32 = 100;

fn backoff(ms: u64) -> Duration {
    if std::env::var_os(TEST_TIME_ENV).is_some() {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.json"), s)
    }

    #[test]
    fn reference_sample_config_is_accepted() {
        let cfg = parse(
            r#"{"redis":{"addr":"127.0.0.1:6379"},"api":{"heartbeat_path":"/tmp/disable_api"},
            "processor":{"storage_dir":"/tmp/","request_headers":{"Accept":"*/*","User-Agent":"Downloader v1"},"stats_interval":5000},
            "notifier":{"download_url":"http://localhost/foo","concurrency":10,"stats_interval":5000,"deletion_interval":180},
            "backends":{"http":{"timeout":30},"kafka":{"bootstrap.servers":"localhost:9092","go.delivery.reports":true}}}"#,
        )
        .unwrap();
        assert_eq!(cfg.storage_root().unwrap(), PathBuf::from("/tmp/"));
        assert_eq!(cfg.download_url().unwrap(), "http://localhost/foo");
        assert_eq!(cfg.backends.http.timeout, 30);
        assert_eq!(cfg.processor.lease_secs, 15);
    }

    #[test]
    fn the_redis_password_is_not_in_debug_output() {
        let c = parse(r#"{"redis":{"password":"hunter2-secret"}}"#).unwrap();
        assert_eq!(
            c.redis.password.as_ref().map(Secret::expose),
            Some("hunter2-secret")
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn callback_attempts_and_the_older_retries_key() {
        // The reference's maxCallbackRetries = 2 counts attempts.
        assert_eq!(parse("{}").unwrap().callback_attempts(), 2);
        let attempts = |s: &str| parse(s).unwrap().callback_attempts();
        assert_eq!(attempts(r#"{"notifier":{"callback_attempts":5}}"#), 5);
        // callback_retries counts retries after the first attempt.
        assert_eq!(attempts(r#"{"notifier":{"callback_retries":0}}"#), 1);
        assert_eq!(attempts(r#"{"notifier":{"callback_retries":2}}"#), 3);
        let e = parse(r#"{"notifier":{"callback_attempts":2,"callback_retries":1}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("notifier.callback_attempts") && e.contains("notifier.callback_retries"),
            "{e}"
        );
        for bad in [
            r#"{"notifier":{"callback_attempts":0}}"#,
            r#"{"notifier":{"callback_attempts":101}}"#,
            r#"{"notifier":{"callback_attempts":-1}}"#,
            r#"{"notifier":{"callback_attempts":"two"}}"#,
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("notifier.callback_attempts"), "{bad}: {e}");
        }
        let e = parse(r#"{"notifier":{"callback_retries":100}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("notifier.callback_retries"), "{e}");
    }

    #[test]
    fn per_host_concurrency_defaults_below_concurrency_and_is_checked() {
        let per_host = |s: &str| parse(s).unwrap().callback_per_host();
        assert_eq!(per_host("{}"), 4, "4 of the default 10");
        assert_eq!(per_host(r#"{"notifier":{"concurrency":1}}"#), 1);
        assert_eq!(per_host(r#"{"notifier":{"concurrency":3}}"#), 2);
        assert_eq!(per_host(r#"{"notifier":{"concurrency":100}}"#), 40);
        assert_eq!(
            per_host(r#"{"notifier":{"concurrency":10,"per_host_concurrency":10}}"#),
            10
        );
        assert_eq!(per_host(r#"{"notifier":{"per_host_concurrency":1}}"#), 1);
        for bad in [
            r#"{"notifier":{"per_host_concurrency":0}}"#,
            r#"{"notifier":{"per_host_concurrency":11}}"#,
            r#"{"notifier":{"concurrency":2,"per_host_concurrency":3}}"#,
            r#"{"notifier":{"per_host_concurrency":"four"}}"#,
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("notifier.per_host_concurrency"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_key_is_named() {
        let e = parse(r#"{"notifier":{"concurrency":"ten"}}"#).unwrap_err();
        assert!(e.to_string().contains("notifier.concurrency"), "{e}");
        assert!(e.to_string().starts_with("test.json: "), "{e}");
        let e = parse(r#"{"notifier":{"deletion_interval":0}}"#).unwrap_err();
        assert!(e.to_string().contains("notifier.deletion_interval"), "{e}");
        let e = parse(r#"{"processor":{"allowed_networks":["10.0.0.0/8","nope"]}}"#).unwrap_err();
        assert!(e.to_string().contains("allowed_networks[1]"), "{e}");
        let e =
            parse(r#"{"notifier":{"allowed_networks":["127.0.0.1","10.0.0.0/33"]}}"#).unwrap_err();
        assert!(
            e.to_string().contains("notifier.allowed_networks[1]"),
            "{e}"
        );
        let e = parse(r#"{"notifier":{"allowed_networks":"10.0.0.0/8"}}"#).unwrap_err();
        assert!(e.to_string().contains("notifier.allowed_networks"), "{e}");
        let e = parse(r#"{"processor":{"allowed_proxies":["http://squid.corp:3128","ftp://x"]}}"#)
            .unwrap_err();
        assert!(
            e.to_string().contains("processor.allowed_proxies[1]"),
            "{e}"
        );
        let cfg =
            parse(r#"{"processor":{"allowed_proxies":["squid.corp:3128","10.0.0.0/8"]}}"#).unwrap();
        assert!(
            cfg.proxy_policy()
                .unwrap()
                .check("http://squid.corp:3128")
                .is_ok()
        );
        let e = parse(r#"{"redis":{"sentinel":["a:26379"],"master_name":"m"}}"#).unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
        let e = parse(r#"{"processor":{"filestorage":{"type":"s3"}}}"#).unwrap_err();
        assert!(e.to_string().contains("filestorage.type"), "{e}");
        let e = parse(r#"{"processor":{"disk_high_watermark_percent":101}}"#).unwrap_err();
        assert!(e.to_string().contains("disk_high_watermark_percent"), "{e}");
        let e = parse(r#"{"processor":{"disk_low_watermark_percent":96}}"#).unwrap_err();
        assert!(e.to_string().contains("disk_low_watermark_percent"), "{e}");
        let e = parse(r#"{"processor":{"disk_check_interval_ms":0}}"#).unwrap_err();
        assert!(e.to_string().contains("disk_check_interval_ms"), "{e}");
        for name in ["Host", "connection", "Transfer-Encoding", "Content-Length"] {
            let e = parse(&format!(
                r#"{{"processor":{{"request_headers":{{"{name}":"x"}}}}}}"#
            ))
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("processor.request_headers.{name}")),
                "{e}"
            );
        }
        let e = parse(r#"{"notifier":{"admin_addr":"localhost"}}"#).unwrap_err();
        assert!(e.to_string().contains("notifier.admin_addr"), "{e}");
        let ok = parse(
            r#"{"processor":{"admin_addr":"127.0.0.1:9101","disk_high_watermark_percent":1,"disk_low_watermark_percent":0.5}}"#,
        )
        .unwrap();
        assert_eq!(ok.processor.admin_addr.as_deref(), Some("127.0.0.1:9101"));
    }

    #[test]
    fn slot_shares_are_counts_or_percentages() {
        let cfg = parse("{}").unwrap();
        assert_eq!(cfg.processor.max_slots_per_aggregation.of(1024), 512);
        assert_eq!(cfg.processor.max_slots_per_tenant.of(7), 4);
        let cfg = parse(
            r#"{"processor":{"max_slots_per_aggregation":10,"max_slots_per_tenant":"12.5%"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.processor.max_slots_per_aggregation.of(1024), 10);
        assert_eq!(cfg.processor.max_slots_per_aggregation.of(4), 4);
        assert_eq!(cfg.processor.max_slots_per_tenant.of(1024), 128);
        assert_eq!(SlotShare::Percent(0.01).of(8), 1);
        for bad in [r#""50""#, r#""150%""#, "0", "1.5", r#""x%""#, "true"] {
            let e = parse(&format!(
                r#"{{"processor":{{"max_slots_per_tenant":{bad}}}}}"#
            ))
            .unwrap_err();
            assert!(
                e.to_string().contains("processor.max_slots_per_tenant"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_kept_for_the_log() {
        let cfg =
            parse(r#"{"api":{"max_request_header":3},"procesor":{},"backends":{"kafka":{"x":1}}}"#)
                .unwrap();
        assert_eq!(cfg.ignored_keys, ["api.max_request_header", "procesor"]);
        assert!(parse("{}").unwrap().ignored_keys.is_empty());
    }

    #[test]
    fn store_selection() {
        let redis = parse(r#"{"redis":{"addr":"10.0.0.1:6379"}}"#).unwrap();
        assert_eq!(redis.store_kind(), StoreKind::Redis);
        let none = parse(r#"{"processor":{"storage_dir":"/srv/dl/files"}}"#).unwrap();
        assert_eq!(
            none.store_kind(),
            StoreKind::Embedded("/srv/dl/store.redb".into())
        );
        let explicit =
            parse(r#"{"redis":{},"store":{"type":"embedded","path":"/x/s.redb"}}"#).unwrap();
        assert_eq!(
            explicit.store_kind(),
            StoreKind::Embedded("/x/s.redb".into())
        );
        let e = parse(r#"{"store":{"type":"etcd"}}"#).unwrap_err();
        assert!(e.to_string().contains("store"), "{e}");
    }

    #[test]
    fn filestorage_rootdir_wins_over_storage_dir() {
        let cfg = parse(
            r#"{"processor":{"storage_dir":"/a","filestorage":{"type":"filesystem","rootdir":"/b"}}}"#,
        )
        .unwrap();
        assert_eq!(cfg.storage_root().unwrap(), PathBuf::from("/b"));
    }
}
