//! Signed callbacks, as the Standard Webhooks specification says
//! (<https://www.standardwebhooks.com/>, symmetric scheme `v1`): each key of
//! `notifier.signing_secrets` signs `<webhook-id>.<webhook-timestamp>.<body>` with
//! HMAC-SHA256, and `webhook-signature` carries one `v1,<base64>` per key, separated by
//! spaces, so that a receiver can move from an old key to a new one without a gap.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

use crate::secret::{Secret, signing_keys};

/// The header with the message's id: the same for every attempt of one callback.
pub const HEADER_ID: &str = "webhook-id";
/// The header with the attempt's time, unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header with the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// Signs callbacks with every configured key. Holds only `ring`'s keys, whose `Debug`
/// shows the algorithm, never the key.
#[derive(Debug)]
pub struct Signer {
    keys: Vec<hmac::Key>,
}

impl Signer {
    /// The signer of `notifier.signing_secrets`, `None` when there are none. A bad key
    /// is named by its index (`notifier.signing_secrets[1]`).
    pub fn from_config(secrets: &[Secret]) -> Result<Option<Signer>, String> {
        let keys = signing_keys(secrets)?;
        Ok((!keys.is_empty()).then(|| Signer::new(&keys)))
    }

    pub fn new(keys: &[Vec<u8>]) -> Signer {
        Signer {
            keys: keys
                .iter()
                .map(|k| hmac::Key::new(hmac::HMAC_SHA256, k))
                .collect(),
        }
    }

    /// How many keys sign.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `webhook-signature` for the message `msg_id` sent at `timestamp` (unix seconds)
    /// with exactly `body`: `v1,<base64>` per key, space-separated, in config order.
    pub fn signature(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> String {
        let ts = timestamp.to_string();
        let mut out = String::new();
        for key in &self.keys {
            let mut ctx = hmac::Context::with_key(key);
            ctx.update(msg_id.as_bytes());
            ctx.update(b".");
            ctx.update(ts.as_bytes());
            ctx.update(b".");
            ctx.update(body);
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("v1,");
            out.push_str(&STANDARD.encode(ctx.sign().as_ref()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::decode_secret;

    /// The specification's published test vector: the `TestWebhookSign` case of the
    /// standard-webhooks repository's libraries (libraries/go/webhook_test.go; the
    /// Python, Java, C# and JavaScript libraries test the same values).
    #[test]
    fn the_specifications_test_vector() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signer = Signer::new(&[key]);
        assert_eq!(
            signer.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn one_signature_per_key_in_config_order() {
        let old = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new = vec![7u8; 32];
        let both = Signer::new(&[old.clone(), new.clone()]).signature("m", 1, b"{}");
        let one = |k: &Vec<u8>| Signer::new(std::slice::from_ref(k)).signature("m", 1, b"{}");
        assert_eq!(both, format!("{} {}", one(&old), one(&new)));
        assert_ne!(one(&old), one(&new));
        // Every part of the signed content counts.
        let s = Signer::new(&[new]);
        let base = s.signature("m", 1, b"{}");
        assert_ne!(base, s.signature("n", 1, b"{}"));
        assert_ne!(base, s.signature("m", 2, b"{}"));
        assert_ne!(base, s.signature("m", 1, b"{ }"));
    }

    #[test]
    fn a_signer_of_the_config_names_a_bad_key_and_never_shows_one() {
        let e = Signer::from_config(&[
            Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Secret::new("nope"),
        ])
        .unwrap_err();
        assert!(e.contains("notifier.signing_secrets[1]"), "{e}");
        assert!(Signer::from_config(&[]).unwrap().is_none());
        let signer = Signer::from_config(&[Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")])
            .unwrap()
            .unwrap();
        assert!(!format!("{signer:?}").contains("MfKQ"), "{signer:?}");
        assert_eq!(signer.len(), 1);
    }
}
