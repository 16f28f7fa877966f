//! Who may call what: bearer tokens and their scopes (`api.tokens`), the endpoints
//! left open (`api.public_endpoints`), and the refusal of requests that a browser
//! sends on behalf of another site's page (`api.allowed_origins`).
//!
//! One middleware in front of every route (the API's and the admin listener's)
//! decides, from the path alone, what a request needs; handlers that show or change
//! jobs then ask the [`Caller`] it leaves in the request's extensions whose jobs the
//! caller may see.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::auth::{Scope, Tokens};
use crate::config::ApiConfig;
use crate::job::TENANT_MARK;
use crate::net::origin::{Origin, parse_origin};
use crate::store::AggrFilter;

/// Who is calling, as far as the handlers need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: jobs it submits belong to this tenant. `None` without
    /// tokens (the open API) or on a public endpoint.
    pub tenant: Option<String>,
    /// Sees and may retry every tenant's jobs (an `admin` token, or the open API).
    pub all_tenants: bool,
}

impl Caller {
    /// The open API's caller (no tokens configured): sees everything, as the
    /// reference's clients do.
    pub fn open() -> Caller {
        Caller {
            tenant: None,
            all_tenants: true,
        }
    }

    /// Whether a job of `tenant` is this caller's to see or retry.
    pub fn sees(&self, tenant: Option<&str>) -> bool {
        self.all_tenants || self.tenant.as_deref() == tenant
    }

    /// An aggregation's name as this caller knows it: the store's name for callers
    /// that see every tenant, the `aggr_id` a tenant gave for its own, `None` for
    /// another tenant's.
    pub fn shown_aggr(&self, store_name: &str) -> Option<String> {
        if self.all_tenants {
            return Some(store_name.to_string());
        }
        let own = format!("{TENANT_MARK}{}/", self.tenant.as_deref()?);
        store_name.strip_prefix(own.as_str()).map(str::to_string)
    }

    /// The aggregations a listing by this caller covers: its own (all, or the one
    /// named as it knows it).
    pub fn aggr_filter(&self, aggr_id: Option<&str>) -> AggrFilter {
        match (self.all_tenants, &self.tenant, aggr_id) {
            (true, _, None) => AggrFilter::All,
            (true, _, Some(a)) => AggrFilter::Is(a.to_string()),
            (false, Some(t), None) => AggrFilter::Prefix(format!("{TENANT_MARK}{t}/")),
            (false, Some(t), Some(a)) => AggrFilter::Is(format!("{TENANT_MARK}{t}/{a}")),
            // A public endpoint's anonymous caller: no tenant's data.
            (false, None, _) => AggrFilter::Is(String::new()),
        }
    }
}

/// What a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Load balancers and supervisors: never a token, never refused.
    Open,
    /// A token with this scope, unless the endpoint (named) is in
    /// `api.public_endpoints`.
    Scope(Scope, Option<&'static str>),
    /// Any valid token (paths we do not serve: no probing without one).
    AnyToken,
}

fn need(path: &str) -> Need {
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    match path {
        "/hb" | "/healthz" => Need::Open,
        "/download" | "/thumbnail" => Need::Scope(Scope::Submit, None),
        "/thumbnail/stats" => Need::Scope(Scope::Read, Some("stats")),
        "/info" => Need::Scope(Scope::Read, Some("info")),
        "/metrics" => Need::Scope(Scope::Read, Some("metrics")),
        _ if under("/retry") || path == "/callbacks/retry" => Need::Scope(Scope::Submit, None),
        "/callbacks/failed" => Need::Scope(Scope::Read, None),
        _ if under("/jobs") || under("/dashboard") => Need::Scope(Scope::Read, None),
        _ if under("/stats") => Need::Scope(Scope::Read, Some("stats")),
        _ if under("/files") => Need::Scope(Scope::Read, Some("files")),
        _ => Need::AnyToken,
    }
}

/// The request policy of one listener.
#[derive(Debug, Default)]
pub struct Guard {
    tokens: Tokens,
    public: Vec<String>,
    origins: Vec<Origin>,
}

impl Guard {
    /// From the validated config (`Config::load` checked every key).
    pub fn from_config(api: &ApiConfig) -> Result<Guard, String> {
        Ok(Guard {
            tokens: Tokens::from_config(&api.tokens)?,
            public: api.public_endpoints.clone(),
            origins: api
                .allowed_origins
                .iter()
                .map(|o| parse_origin(o))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether every caller is trusted (no `api.tokens`).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Logs, once at start, that anyone who reaches `what` may use all of it.
    pub fn warn_if_open(&self, what: &str) {
        if self.is_open() {
            tracing::warn!(
                listener = what,
                "no api.tokens configured: anyone who can reach this port may submit jobs, \
                 retry callbacks and read every job (as skroutz/downloader); see README, Security"
            );
        }
    }

    /// `Err` when a browser sent the request for a page of another site: its `Origin`
    /// is neither this server's (the `Host` it was sent to) nor allowed, or it says
    /// `Sec-Fetch-Site: cross-site` without an allowed origin.
    fn same_site(&self, h: &HeaderMap) -> Result<(), String> {
        let refused = |why: String| {
            Err(format!(
                "cross-site request refused: {why}; a browser page may call this API only from an origin in api.allowed_origins"
            ))
        };
        let Some(origin) = h.get(header::ORIGIN) else {
            return match h.get("sec-fetch-site").map(HeaderValue::as_bytes) {
                Some(b"cross-site") => refused("Sec-Fetch-Site: cross-site".into()),
                _ => Ok(()),
            };
        };
        let text = String::from_utf8_lossy(origin.as_bytes());
        let Ok(o) = parse_origin(&text) else {
            return refused(format!("Origin {text:?}"));
        };
        if self.origins.contains(&o) || is_host_of(&o, h) {
            return Ok(());
        }
        refused(format!("Origin {text:?}"))
    }

    /// The caller a request's `Authorization` names, or the error to answer.
    fn caller(&self, path: &str, h: &HeaderMap) -> Result<Caller, ApiError> {
        let need = need(path);
        if self.is_open() || need == Need::Open {
            return Ok(Caller::open());
        }
        if let Need::Scope(_, Some(name)) = need
            && self.public.iter().any(|p| p == name)
        {
            return Ok(Caller {
                tenant: None,
                all_tenants: false,
            });
        }
        let secret = match h.get(header::AUTHORIZATION).map(|v| bearer(v.as_bytes())) {
            None => {
                return Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "{path} needs a token: send Authorization: Bearer <token> (see api.tokens)"
                    ),
                ));
            }
            Some(None) => {
                return Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    "Authorization: only \"Bearer <token>\" is accepted".into(),
                ));
            }
            Some(Some(s)) => s,
        };
        let Some(token) = self.tokens.verify(secret) else {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "Authorization: unknown token".into(),
            ));
        };
        if let Need::Scope(scope, _) = need
            && !token.has(scope)
        {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "token {:?} lacks the scope {:?} that {path} needs",
                    token.name,
                    scope.as_str()
                ),
            ));
        }
        Ok(Caller {
            tenant: Some(token.name.clone()),
            all_tenants: token.has(Scope::Admin),
        })
    }
}

/// The secret of `Bearer <secret>` (the scheme in any case), or `None`.
fn bearer(v: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(v).ok()?;
    let (scheme, secret) = v.split_once(' ')?;
    let secret = secret.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty()).then_some(secret)
}

/// Whether `o` is the origin the request was sent to (its `Host`).
fn is_host_of(o: &Origin, h: &HeaderMap) -> bool {
    h.get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|host| o.is_host(host))
}

/// The middleware: refuses cross-site requests and requests without the token
/// their path needs; else runs the route with the [`Caller`] in its extensions.
pub async fn check(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if need(&path) != Need::Open
        && let Err(msg) = g.same_site(req.headers())
    {
        tracing::warn!(error = %msg, "request refused");
        return ApiError(StatusCode::FORBIDDEN, msg).into_response();
    }
    match g.caller(&path, req.headers()) {
        Ok(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        Err(e) => {
            tracing::warn!(status = e.0.as_u16(), error = %e.1, "request refused");
            let unauthorized = e.0 == StatusCode::UNAUTHORIZED;
            let mut r = e.into_response();
            if unauthorized {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"downloader\""),
                );
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::new_token;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn guard(origins: &[&str], public: &[&str]) -> (Guard, Vec<String>) {
        let (s1, t1) = new_token("shop", &[Scope::Submit, Scope::Read]).unwrap();
        let (s2, t2) = new_token("ops", &[Scope::Admin]).unwrap();
        let (s3, t3) = new_token("viewer", &[Scope::Read]).unwrap();
        let api = ApiConfig {
            tokens: vec![t1, t2, t3],
            public_endpoints: public.iter().map(|s| s.to_string()).collect(),
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..ApiConfig::default()
        };
        (Guard::from_config(&api).unwrap(), vec![s1, s2, s3])
    }

    #[test]
    fn origins_compare_with_the_allowed_and_the_host() {
        let (g, _) = guard(&["https://admin.example.com"], &[]);
        let host = ("host", "127.0.0.1:8000");
        assert!(g.same_site(&headers(&[host])).is_ok());
        assert!(
            g.same_site(&headers(&[host, ("origin", "http://127.0.0.1:8000")]))
                .is_ok()
        );
        assert!(
            g.same_site(&headers(&[host, ("origin", "https://admin.example.com")]))
                .is_ok()
        );
        for evil in ["https://evil.example", "http://127.0.0.1:8001", "null", "x"] {
            let e = g
                .same_site(&headers(&[host, ("origin", evil)]))
                .unwrap_err();
            assert!(e.contains("api.allowed_origins"), "{e}");
        }
        assert!(
            g.same_site(&headers(&[host, ("sec-fetch-site", "cross-site")]))
                .is_err()
        );
        assert!(
            g.same_site(&headers(&[host, ("sec-fetch-site", "same-origin")]))
                .is_ok()
        );
        assert!(
            g.same_site(&headers(&[
                ("host", "[::1]:80"),
                ("origin", "http://[::1]")
            ]))
            .is_ok()
        );
    }

    #[test]
    fn scopes_decide_per_path() {
        let (g, s) = guard(&[], &["metrics"]);
        let auth = |secret: &str| headers(&[("authorization", &format!("Bearer {secret}"))]);
        let status = |path: &str, h: &HeaderMap| g.caller(path, h).map_err(|e| e.0.as_u16());
        let none = HeaderMap::new();
        assert_eq!(status("/hb", &none), Ok(Caller::open()));
        assert_eq!(status("/healthz", &none), Ok(Caller::open()));
        assert_eq!(status("/download", &none), Err(401));
        assert_eq!(status("/nothing-here", &none), Err(401));
        assert_eq!(status("/download", &auth("dl_wrong")), Err(401));
        assert_eq!(
            status("/download", &headers(&[("authorization", "Basic eDp5")])),
            Err(401)
        );
        let shop = status("/download", &auth(&s[0])).unwrap();
        assert_eq!(shop.tenant.as_deref(), Some("shop"));
        assert!(!shop.all_tenants);
        assert_eq!(status("/download", &auth(&s[2])), Err(403));
        assert_eq!(status("/retry/x", &auth(&s[2])), Err(403));
        assert!(status("/jobs/x", &auth(&s[2])).is_ok());
        assert!(status("/files/abc/abcdef", &auth(&s[2])).is_ok());
        assert_eq!(status("/files/abc/abcdef", &none), Err(401));
        assert_eq!(status("/info", &none), Err(401));
        // Public: no token needed, and the caller sees no tenant's jobs.
        let anon = status("/metrics", &none).unwrap();
        assert!(anon.tenant.is_none() && !anon.all_tenants);
        let ops = status("/dashboard/aggregations", &auth(&s[1])).unwrap();
        assert!(ops.all_tenants);
        assert!(ops.sees(Some("shop")) && ops.sees(None));
        assert!(shop.sees(Some("shop")) && !shop.sees(Some("ops")) && !shop.sees(None));
    }

    #[test]
    fn no_tokens_is_the_open_api() {
        let g = Guard::default();
        assert!(g.is_open());
        assert_eq!(
            g.caller("/download", &HeaderMap::new()).unwrap(),
            Caller::open()
        );
    }
}
