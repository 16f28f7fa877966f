//! Job ids and the storage paths built from them.

use rand::RngCore;

/// A new URL-safe random job id: 16 random bytes, base64url without padding (22 chars).
pub fn new_id() -> String {
    use base64::Engine;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Whether `id` could be one of ours; guards file paths built from ids.
pub fn is_valid_id(id: &str) -> bool {
    id.len() >= 3
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Path of a job's file relative to the storage root: `<id[0:3]>/<id>`.
pub fn relative_path(id: &str) -> String {
    format!("{}/{}", &id[..3], id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_and_distinct() {
        let a = new_id();
        assert!(is_valid_id(&a) && a.len() == 22);
        assert_ne!(a, new_id());
        assert!(!is_valid_id("../etc"));
        assert_eq!(
            crate::job::download_url("http://h/d/", "abcdef"),
            "http://h/d/abc/abcdef"
        );
    }
}
