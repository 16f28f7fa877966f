//! Web origins (`scheme://host:port`) as browsers send them in `Origin`: parsed and
//! compared for the API's refusal of cross-site requests (`api.allowed_origins`,
//! checked by the config at load and by `web::guard` on each request).

/// An origin, `scheme://host:port`, for comparing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

/// Parses an origin as browsers send it (`https://shop.example`, `http://127.0.0.1:8000`).
pub fn parse_origin(s: &str) -> Result<Origin, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not an origin: {e}"))?;
    let host = u.host_str().filter(|h| !h.is_empty());
    let (Some(host), Some(port)) = (host, u.port_or_known_default()) else {
        return Err(format!(
            "{s:?} is not an origin such as https://admin.example.com"
        ));
    };
    if !matches!(u.scheme(), "http" | "https")
        || !u.username().is_empty()
        || u.password().is_some()
        || u.path() != "/"
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!(
            "{s:?} is not an origin: only scheme, host and port, such as https://admin.example.com"
        ));
    }
    Ok(Origin {
        scheme: u.scheme().to_string(),
        host: host.to_ascii_lowercase(),
        port,
    })
}

impl Origin {
    /// Whether this is the origin of a request sent to `host` (its `Host` header).
    pub fn is_host(&self, host: &str) -> bool {
        match url::Url::parse(&format!("{}://{host}", self.scheme)) {
            Ok(u) => {
                u.host_str().map(str::to_ascii_lowercase).as_deref() == Some(self.host.as_str())
                    && u.port_or_known_default() == Some(self.port)
                    && u.path() == "/"
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_and_compare() {
        assert_eq!(
            parse_origin("https://Admin.Example.com").unwrap(),
            parse_origin("https://admin.example.com:443").unwrap()
        );
        for bad in [
            "admin.example.com",
            "https://a.example/path",
            "https://u:p@a.example",
            "ftp://a.example",
            "https://a.example/?q",
            "null",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        let o = parse_origin("http://127.0.0.1:8000").unwrap();
        assert!(o.is_host("127.0.0.1:8000"));
        assert!(!o.is_host("127.0.0.1:8001") && !o.is_host("127.0.0.1:8000/x"));
    }
}
