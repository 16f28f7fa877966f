//! Secrets of the config file: [`Secret`], which never shows itself in `Debug`, and
//! the webhook signing keys' `whsec_<base64>` form (`notifier.signing_secrets`),
//! decoded here so that the config's validation and the notifier's signer read them
//! the same way.

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;

/// A secret from the config file: its `Debug` form never shows it, so that a config
/// that is printed or logged does not carry it along.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How a key is written: `whsec_` and the key's bytes in base64.
pub const SECRET_PREFIX: &str = "whsec_";
/// The specification's bounds on a key ("between 24 bytes (192 bits) and 64 bytes
/// (512 bits)").
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;

/// Standard base64 with or without its `=` padding (the specification's libraries
/// accept both).
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The key bytes of a `whsec_<base64>` secret. Errors never repeat the secret, nor
/// any byte of it.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| format!("must start with {SECRET_PREFIX} (whsec_<base64 key>)"))?;
    let key = BASE64_LENIENT.decode(b64.trim_end()).map_err(|_| {
        format!("is not {SECRET_PREFIX} followed by standard base64 (A-Z a-z 0-9 + /)")
    })?;
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
        return Err(format!(
            "is a key of {} bytes; the specification wants {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} \
             random bytes (make one with: echo whsec_$(head -c 32 /dev/urandom | base64))",
            key.len()
        ));
    }
    Ok(key)
}

/// The key bytes of each of `notifier.signing_secrets`, in order; a bad one is named
/// by its index (`notifier.signing_secrets[1]`).
pub fn signing_keys(secrets: &[Secret]) -> Result<Vec<Vec<u8>>, String> {
    secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            decode_secret(s.expose())
                .map_err(|why| format!("key `notifier.signing_secrets[{i}]`: {why}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    #[test]
    fn bad_secrets_are_refused_without_showing_them() {
        let secret_part = "c2VjcmV0IHNlY3JldCBzZWNyZXQgc2Vj";
        for (s, says) in [
            (secret_part.to_string(), "must start with whsec_"),
            (format!("whsec_{secret_part}!"), "standard base64"),
            ("whsec_".to_string(), "0 bytes"),
            ("whsec_c2hvcnQ=".to_string(), "5 bytes"),
            (format!("whsec_{}", STANDARD.encode([1u8; 65])), "65 bytes"),
        ] {
            let e = decode_secret(&s).unwrap_err();
            assert!(e.contains(says), "{s}: {e}");
            assert!(!e.contains(secret_part) && !e.contains("c2hvcnQ"), "{e}");
        }
        // Padding is optional; 24 and 64 bytes are the bounds.
        let padded = STANDARD.encode([9u8; 25]);
        assert!(padded.ends_with("=="));
        assert_eq!(
            decode_secret(&format!("whsec_{padded}")).unwrap(),
            decode_secret(&format!("whsec_{}", padded.trim_end_matches('='))).unwrap()
        );
        assert_eq!(
            decode_secret(&format!("whsec_{}", STANDARD.encode([1u8; 64])))
                .unwrap()
                .len(),
            64
        );
        let e = signing_keys(&[
            Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Secret::new("nope"),
        ])
        .unwrap_err();
        assert!(e.contains("notifier.signing_secrets[1]"), "{e}");
        assert!(!e.contains("nope"), "{e}");
        assert_eq!(
            format!(
                "{:?}",
                Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            ),
            "Secret(<redacted>)"
        );
    }
}
