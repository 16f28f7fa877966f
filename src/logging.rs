//! Log set-up: `log.format` (`plain`, `logfmt`, `json` lines) and `log.level`, on
//! stderr. A write to a closed stderr is dropped, never a panic.

use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable that overrides `log.level` (an `EnvFilter` directive).
pub const LEVEL_ENV: &str = "DOWNLOADER_LOG";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or a filter such as
    /// `info,downloader::processor=debug`.
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Logfmt,
    Json,
}

impl LogConfig {
    pub fn filter(&self) -> Result<EnvFilter, String> {
        if let Ok(f) = EnvFilter::try_from_env(LEVEL_ENV) {
            return Ok(f);
        }
        let level = self.level.as_deref().unwrap_or("info");
        EnvFilter::try_new(level).map_err(|e| format!("key `log.level`: {level:?}: {e}"))
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(cfg: &LogConfig) {
    let filter = cfg.filter().unwrap_or_else(|_| EnvFilter::new("info"));
    // The fmt layer's own report of a failed write is an eprintln!, which panics on
    // a closed stderr: turn it off. Rust ignores SIGPIPE, so EPIPE is just an error.
    let base = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match cfg.format {
        LogFormat::Plain => registry
            .with(base.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .try_init(),
        LogFormat::Logfmt => registry
            .with(
                base.event_format(tracing_logfmt::EventsFormatter::default())
                    .fmt_fields(tracing_logfmt::FieldsFormatter::default()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                base.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true),
            )
            .try_init(),
    };
}

/// This machine's host name, for log fields and `/info`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
