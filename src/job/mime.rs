//! A job's `mime_type` patterns ([`MimePattern`]) and the sniffing of a file's type
//! from its first bytes, which the processor checks against them.

use super::validate::{ValidationError, invalid};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
