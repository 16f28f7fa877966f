//! API tokens: named bearer secrets with scopes, kept in the config as SHA-256
//! hashes (`api.tokens`), made by `downloader token new`.
//!
//! A secret is 32 random bytes, so a plain SHA-256 is enough to keep a leaked config
//! from revealing it (nothing to brute-force); a slow password hash would only cost
//! every request time. Lookups compare every configured hash in constant time.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// What a token may do. `admin` may do everything, across every tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum Scope {
    /// `POST /download`, `POST /thumbnail`, `POST /retry/{id}` of its own jobs.
    Submit,
    /// Its own jobs and aggregations, stats, `/info`, `/metrics`, `/files/`.
    Read,
    /// Everything, every tenant's jobs and aggregations included.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `api.tokens`, as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token's name: its tenant (aggregations are namespaced by it) and what logs
    /// show. 1–64 characters from `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// `sha256:<64 hex digits>` of the secret.
    pub hash: String,
    pub scopes: Vec<Scope>,
}

/// Prefix of every secret, so that one found in a log or a repository is recognised.
pub const SECRET_PREFIX: &str = "dl_";
const HASH_PREFIX: &str = "sha256:";
const MAX_NAME: usize = 64;

/// A token that presented a configured secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Token {
    /// Whether it has `scope` (admin has every scope).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }
}

/// The configured tokens, ready to check secrets against.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Token)>,
}

/// Why a token name is not acceptable, or `None`.
pub fn name_error(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Some(format!("must be 1 to {MAX_NAME} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some(format!(
            "{name:?} may only contain letters, digits, '.', '_' and '-'"
        ));
    }
    None
}

fn sha256(secret: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let h = s.strip_prefix(HASH_PREFIX)?;
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Tokens {
    /// Validates `api.tokens`; errors name the entry and its key.
    pub fn from_config(list: &[TokenConfig]) -> Result<Tokens, String> {
        let mut entries: Vec<([u8; 32], Token)> = Vec::new();
        for (i, t) in list.iter().enumerate() {
            if let Some(e) = name_error(&t.name) {
                return Err(format!("key `api.tokens[{i}].name`: {e}"));
            }
            if entries.iter().any(|(_, o)| o.name == t.name) {
                return Err(format!(
                    "key `api.tokens[{i}].name`: {:?} is used by another token",
                    t.name
                ));
            }
            let hash = parse_hash(&t.hash).ok_or_else(|| {
                format!(
                    "key `api.tokens[{i}].hash`: must be \"sha256:\" and 64 hex digits (make one with `downloader token new`)"
                )
            })?;
            if entries.iter().any(|(h, _)| *h == hash) {
                return Err(format!(
                    "key `api.tokens[{i}].hash`: the same secret as another token"
                ));
            }
            if t.scopes.is_empty() {
                return Err(format!(
                    "key `api.tokens[{i}].scopes`: at least one of \"submit\", \"read\", \"admin\""
                ));
            }
            let mut scopes = t.scopes.clone();
            scopes.sort();
            scopes.dedup();
            entries.push((
                hash,
                Token {
                    name: t.name.clone(),
                    scopes,
                },
            ));
        }
        Ok(Tokens { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The token whose secret this is. Every entry is compared, in constant time,
    /// so the time taken says nothing about which (or whether one) matched.
    pub fn verify(&self, secret: &str) -> Option<&Token> {
        let h = sha256(secret.as_bytes());
        let mut found = None;
        for (hash, token) in &self.entries {
            if bool::from(hash.ct_eq(&h)) {
                found = Some(token);
            }
        }
        found
    }
}

/// A new secret and the `api.tokens` entry that accepts it.
pub fn new_token(name: &str, scopes: &[Scope]) -> Result<(String, TokenConfig), String> {
    if let Some(e) = name_error(name) {
        return Err(format!("token name: {e}"));
    }
    if scopes.is_empty() {
        return Err("--scope: at least one of submit, read, admin".into());
    }
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    use base64::Engine;
    let secret = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let mut scopes = scopes.to_vec();
    scopes.sort();
    scopes.dedup();
    let entry = TokenConfig {
        name: name.to_string(),
        hash: format!("{HASH_PREFIX}{}", hex(&sha256(secret.as_bytes()))),
        scopes,
    };
    Ok((secret, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_verifies_and_others_do_not() {
        let (secret, entry) = new_token("shop-1", &[Scope::Read, Scope::Submit]).unwrap();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == 3 + 43);
        let (other, other_entry) = new_token("admin", &[Scope::Admin]).unwrap();
        let tokens = Tokens::from_config(&[entry, other_entry]).unwrap();
        let t = tokens.verify(&secret).unwrap();
        assert_eq!(t.name, "shop-1");
        assert!(t.has(Scope::Submit) && t.has(Scope::Read) && !t.has(Scope::Admin));
        let a = tokens.verify(&other).unwrap();
        assert!(a.has(Scope::Submit) && a.has(Scope::Read) && a.has(Scope::Admin));
        assert!(tokens.verify("dl_wrong").is_none());
        assert!(tokens.verify("").is_none());
        assert!(tokens.verify(&secret[..secret.len() - 1]).is_none());
    }

    #[test]
    fn bad_entries_are_named() {
        let (_, good) = new_token("a", &[Scope::Read]).unwrap();
        let bad = |f: &dyn Fn(&mut TokenConfig)| {
            let mut t = good.clone();
            f(&mut t);
            Tokens::from_config(&[t]).unwrap_err()
        };
        assert!(bad(&|t| t.name = "a/b".into()).contains("api.tokens[0].name"));
        assert!(bad(&|t| t.name = String::new()).contains("api.tokens[0].name"));
        assert!(bad(&|t| t.hash = "md5:00".into()).contains("api.tokens[0].hash"));
        assert!(bad(&|t| t.hash.push('0')).contains("api.tokens[0].hash"));
        assert!(bad(&|t| t.scopes.clear()).contains("api.tokens[0].scopes"));
        let (_, other) = new_token("a", &[Scope::Read]).unwrap();
        let e = Tokens::from_config(&[good.clone(), other]).unwrap_err();
        assert!(e.contains("api.tokens[1].name"), "{e}");
        let mut same = good.clone();
        same.name = "b".into();
        let e = Tokens::from_config(&[good, same]).unwrap_err();
        assert!(e.contains("api.tokens[1].hash"), "{e}");
        assert!(new_token("", &[Scope::Read]).is_err());
        assert!(new_token("x", &[]).is_err());
    }
}
