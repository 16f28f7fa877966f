//! Log set-up: `log.format` (`plain`, `logfmt`, `json` lines) and `log.level`, on
//! stderr. A write to a closed stderr is dropped, never a panic.
//!
//! **Control characters never reach the log raw.** Field values carry client text
//! (a job's `url` and `aggr_id`, a request's path, config keys), and a raw `\n` in
//! one would start a forged line, an ESC a terminal escape sequence. In `plain` and
//! `logfmt` every C0 control character (`\n`, `\r`, `\t`, ESC, ...), DEL and every C1
//! control (U+0080 to U+009F) is written as an escape (`\n`, `\r`, `\t`, else
//! `\u{1b}` with the code point in hex); each event still ends with its one real
//! newline. `json` lines escape control characters already (serde_json); its
//! strings keep C1 controls raw, which is valid JSON and cannot break a line.
//!
//! How: two layers of escaping, because the plain format colours its output with
//! ANSI escapes of its own when stderr is a terminal.
//! - [`EscapedFields`], the plain format's field formatter, escapes inside every
//!   field value (event and span fields alike: the message, `url`, `request_id` ...).
//!   It is what makes ANSI colouring safe: the formatter's own colours sit outside
//!   the values, so an ESC inside a value is always a client's.
//! - [`EscapingWriter`] wraps the writer of `plain` and `logfmt`: the fmt layer formats
//!   each event into one buffer and writes it with one `write_all` (tracing-subscriber
//!   0.3's `fmt_layer.rs`, `on_event`), so the writer sees whole lines and escapes
//!   every control character but the final `\n`. That catches whatever a formatter
//!   might let through (tracing-logfmt quotes and escapes values itself; the writer
//!   does not depend on it). When ANSI colouring is on it leaves ESC alone: those
//!   are the formatter's colours, and values' ESCs were escaped by `EscapedFields`.
//!   Escaping ESC in the writer instead would turn the colours into visible
//!   `\u{1b}[2m` garbage on a terminal; recognising "our" colour sequences in the
//!   writer cannot work, as a client's `\x1b[31m` looks exactly like one.
//!
//! A backslash is not escaped: `\n` in a log line is either an escaped newline or
//! the client's own two characters, never a line break.

use std::fmt::{self, Write as _};
use std::io;

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
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
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = subscriber(cfg.format, filter, std::io::stderr, ansi).try_init();
}

/// The subscriber of `format` writing to `make`; `ansi` colours the plain format.
fn subscriber<M>(
    format: LogFormat,
    filter: EnvFilter,
    make: M,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    M: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // The fmt layer's own report of a failed write is an eprintln!, which panics on
    // a closed stderr: turn it off. Rust ignores SIGPIPE, so EPIPE is just an error.
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Plain => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(EscapingWriter::new(make, ansi))
                    .with_ansi(ansi)
                    .fmt_fields(EscapedFields)
                    .log_internal_errors(false),
            ),
        ),
        LogFormat::Logfmt => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(EscapingWriter::new(make, false))
                    .event_format(tracing_logfmt::EventsFormatter::default())
                    .fmt_fields(tracing_logfmt::FieldsFormatter::default())
                    .log_internal_errors(false),
            ),
        ),
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_writer(make)
                    .log_internal_errors(false)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true),
            ),
        ),
    }
}

/// Whether `c` is written escaped: C0 controls, DEL and C1 controls.
pub fn is_escaped(c: char) -> bool {
    matches!(c, '\0'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}')
}

/// The escape of a control character: `\n`, `\r`, `\t`, else `\u{<hex>}`.
fn write_escape(out: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    }
}

/// Writes `s` to `out` with every control character escaped.
pub fn write_escaped(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(i) = rest.find(is_escaped) {
        out.write_str(&rest[..i])?;
        let c = rest[i..].chars().next().expect("found at i");
        write_escape(out, c)?;
        rest = &rest[i + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// A [`MakeWriter`] whose writers escape every control character but a write's
/// final `\n` (each write is one whole event: see the module's comment). With
/// `keep_esc` (ANSI colouring on) ESC passes: the formatter's colours.
pub struct EscapingWriter<M> {
    make: M,
    keep_esc: bool,
}

impl<M> EscapingWriter<M> {
    pub fn new(make: M, keep_esc: bool) -> Self {
        EscapingWriter { make, keep_esc }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapingWriter<M> {
    type Writer = Escaping<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping {
            inner: self.make.make_writer(),
            keep_esc: self.keep_esc,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        Escaping {
            inner: self.make.make_writer_for(meta),
            keep_esc: self.keep_esc,
        }
    }
}

/// The writer of [`EscapingWriter`]. Each `write` takes all of its buffer and
/// hands the escaped bytes to the inner writer with one `write_all` (a line stays
/// one write to stderr); an error of the inner writer is returned, never a panic.
pub struct Escaping<W> {
    inner: W,
    keep_esc: bool,
}

impl<W> Escaping<W> {
    /// Byte `b`'s escape, if it needs one: `next` is the byte after it (a C1 control
    /// is `0xC2 0x80..=0x9F` in UTF-8; 0xC2 is never a continuation byte, so the pair
    /// cannot be the tail of another character).
    fn control_at(&self, b: u8, next: Option<u8>) -> Option<(char, usize)> {
        match b {
            0x1b if self.keep_esc => None,
            0x00..=0x1f | 0x7f => Some((b as char, 1)),
            0xc2 => match next {
                Some(n @ 0x80..=0x9f) => Some((char::from_u32(n as u32).expect("C1"), 2)),
                _ => None,
            },
            _ => None,
        }
    }

    fn escape(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut start = 0;
        let mut i = 0;
        while i < body.len() {
            match self.control_at(body[i], body.get(i + 1).copied()) {
                Some((c, len)) => {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(body.len() + 16));
                    o.extend_from_slice(&body[start..i]);
                    let mut e = String::new();
                    let _ = write_escape(&mut e, c);
                    o.extend_from_slice(e.as_bytes());
                    i += len;
                    start = i;
                }
                None => i += 1,
            }
        }
        if let Some(o) = &mut out {
            o.extend_from_slice(&body[start..]);
        }
        out
    }
}

impl<W: io::Write> io::Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, true),
            None => (buf, false),
        };
        match self.escape(body) {
            None => self.inner.write_all(buf)?,
            Some(mut out) => {
                if newline {
                    out.push(b'\n');
                }
                self.inner.write_all(&out)?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The plain format's field formatter: `DefaultFields`' layout (the message bare,
/// then `name=value`, italic names and dimmed `=` with ANSI on), every value escaped.
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = EscapedVisitor {
            ansi: writer.has_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
            buf: String::new(),
        };
        fields.record(&mut v);
        v.result
    }
}

struct EscapedVisitor<'w> {
    writer: Writer<'w>,
    ansi: bool,
    first: bool,
    result: fmt::Result,
    buf: String,
}

impl EscapedVisitor<'_> {
    fn write(&mut self, name: &str) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            if self.ansi {
                write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?;
            } else {
                write!(self.writer, "{name}=")?;
            }
        }
        write_escaped(&mut self.writer, &self.buf)
    }
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As `DefaultFields`: a `&str` value is quoted, the message is not.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = crate::errors::error_chain(value);
        self.record_debug(field, &format_args!("{text}"))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `log.*` fields are the `log` crate's metadata, already in the line.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.buf.clear();
        let _ = write!(self.buf, "{value:?}");
        self.result = self.write(field.name());
    }
}

/// This machine's host name, for log fields and `/info`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, recording each write separately.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().concat()).unwrap()
        }
    }

    /// What one write through an escaping writer hands on.
    fn through(buf: &[u8], keep_esc: bool) -> Vec<u8> {
        let sink = Sink::default();
        let mut w = EscapingWriter::new(sink.clone(), keep_esc).make_writer();
        io::Write::write_all(&mut w, buf).unwrap();
        let writes = sink.0.lock().unwrap().clone();
        assert_eq!(writes.len(), 1, "one write per event");
        writes.concat()
    }

    const NASTY: &str = "a\nFORGED line\r\x1b[31mred\x7f\u{85}\u{9b}\u{9f}\t\0 \u{a0}é日本🦀";
    const ESCAPED: &str =
        "a\\nFORGED line\\r\\u{1b}[31mred\\u{7f}\\u{85}\\u{9b}\\u{9f}\\t\\u{0} \u{a0}é日本🦀";

    #[test]
    fn escaping_of_each_control_character_keeps_other_text_intact() {
        let mut s = String::new();
        write_escaped(&mut s, NASTY).unwrap();
        assert_eq!(s, ESCAPED);
        for c in ['\u{1f}', '\u{7f}', '\u{80}', '\u{9f}', '\0'] {
            assert!(is_escaped(c), "{c:?}");
        }
        for c in [' ', '~', '\u{a0}', 'é', '\u{7e}', '\u{2028}'] {
            assert!(!is_escaped(c), "{c:?}");
        }
    }

    #[test]
    fn writer_escapes_all_but_the_final_newline() {
        let line = format!("{NASTY}\n");
        assert_eq!(
            through(line.as_bytes(), false),
            format!("{ESCAPED}\n").as_bytes()
        );
        // Without a final newline nothing is kept raw.
        assert_eq!(through(b"x\ny", false), b"x\\ny");
        assert_eq!(through(b"\n\n", false), b"\\n\n");
        // Clean lines pass unchanged.
        assert_eq!(
            through("plain é line\n".as_bytes(), false),
            "plain é line\n".as_bytes()
        );
        // With ANSI on, ESC passes (the formatter's colours) and the rest is escaped.
        assert_eq!(
            through(b"\x1b[2mx\x1b[0m\ny\n", true),
            b"\x1b[2mx\x1b[0m\\ny\n"
        );
    }

    #[test]
    fn writer_leaves_invalid_utf8_and_multibyte_characters_alone() {
        // 0xC2 0xA0 is U+00A0 (not a control); 0xE6 0x97 0xA5 is 日, whose 0x97 is a
        // continuation byte in the C1 range; a lone 0xC2 at the end stays.
        let bytes = b"\xc2\xa0\xe6\x97\xa5\xff\xc2\x85\xc2";
        assert_eq!(
            through(bytes, false),
            b"\xc2\xa0\xe6\x97\xa5\xff\\u{85}\xc2"
        );
    }

    #[test]
    fn a_failing_inner_writer_is_an_error_not_a_panic() {
        struct Closed;
        impl io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Escaping {
            inner: Closed,
            keep_esc: false,
        };
        assert!(io::Write::write_all(&mut w, b"a\nb\n").is_err());
        assert!(io::Write::write_all(&mut w, b"clean\n").is_err());
    }

    /// The lines `format` writes for one span and event carrying `NASTY`.
    fn log_lines(format: LogFormat, ansi: bool) -> String {
        let sink = Sink::default();
        let sub = subscriber(format, EnvFilter::new("trace"), sink.clone(), ansi);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("request", request_id = %NASTY);
            let _e = span.enter();
            tracing::info!(url = %NASTY, aggr_id = NASTY, n = 3, "job {NASTY} submitted");
        });
        sink.text()
    }

    #[test]
    fn plain_and_logfmt_lines_cannot_be_forged() {
        for (format, ansi) in [
            (LogFormat::Plain, false),
            (LogFormat::Plain, true),
            (LogFormat::Logfmt, false),
        ] {
            let out = log_lines(format, ansi);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 1, "{format:?} ansi={ansi}: {out:?}");
            assert!(out.ends_with('\n'));
            assert!(!out.contains('\r') && !out.contains('\u{85}') && !out.contains('\u{7f}'));
            assert!(out.contains("FORGED"), "{out:?}");
            assert!(out.contains("日本🦀"), "{out:?}");
            // The client's ESC is escaped everywhere; with ANSI on the only raw ESCs
            // are the formatter's own colours (`ESC [ digits m`), never `ESC[31m`.
            assert!(!out.contains("\x1b[31m"), "{format:?} ansi={ansi}: {out:?}");
            assert_eq!(
                out.contains('\x1b'),
                ansi,
                "{format:?} ansi={ansi}: {out:?}"
            );
        }
        let plain = log_lines(LogFormat::Plain, false);
        assert!(plain.contains(&format!("url={ESCAPED}")), "{plain}");
        assert!(plain.contains(&format!("request_id={ESCAPED}")), "{plain}");
        assert!(
            plain.contains(&format!("job {ESCAPED} submitted")),
            "{plain}"
        );
        assert!(plain.contains(" n=3"), "{plain}");
        let coloured = log_lines(LogFormat::Plain, true);
        assert!(
            coloured.contains(&format!("\x1b[3murl\x1b[0m\x1b[2m=\x1b[0m{ESCAPED}")),
            "{coloured:?}"
        );
    }

    #[test]
    fn json_lines_stay_json() {
        let out = log_lines(LogFormat::Json, false);
        assert_eq!(out.lines().count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["url"], NASTY);
        assert_eq!(v["spans"][0]["request_id"], NASTY);
    }
}
