//! Which proxies (`aggr_proxy`) downloads may go through. A proxy connects wherever
//! it is told, so the guard cannot judge the target behind it (only a literal IP in
//! the job's URL); what it can do is keep the choice of proxies under the operator's
//! control:
//!
//! - `processor.allowed_proxies` non-empty: a proxy must match an entry, and its own
//!   address is then trusted (operators run internal squids on 10.x).
//! - empty (the default): a proxy's own address must pass the guard, like any host a
//!   download connects to: a literal IP is judged here, a localhost name is judged by
//!   name, another name when it is resolved.
//!
//! Both `web` (at submit: a 400) and the processor (at fetch: the job fails) apply the
//! policy. How the processor makes the name check happen: reqwest 0.13 resolves an
//! HTTP or HTTPS proxy's host name, and a SOCKS proxy's, through the client's
//! `dns_resolver` (each is a `connect_with_maybe_proxy`/`Tunnel`/`SocksV5` call on the
//! client's `HttpConnector<DynResolver>`), so the `GuardedResolver` sees it and no
//! lookup of our own is needed (nor would one help: reqwest would look again). For a
//! `socks5` (not `socks5h`) proxy the target name is resolved through it too, so
//! its addresses are judged. `resolver::tests` pins this down against upgrades. A
//! literal-IP proxy host is never resolved: `ProxyPolicy::check` judges it.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use url::Host;

use super::{NetGuard, classify};

/// The schemes reqwest can use as a proxy and `aggr_proxy` accepts.
pub const SCHEMES: &[&str] = &["http", "https", "socks5", "socks5h"];

/// A proxy the policy refuses. The message starts with `aggr_proxy:` (it is the
/// submit's 400 and the job's error).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("aggr_proxy: {proxy}: {why}")]
pub struct ProxyRefused {
    /// The proxy as `scheme://host:port`, without credentials.
    pub proxy: String,
    pub why: String,
}

/// A proxy the policy accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyVerdict {
    /// Listed in `processor.allowed_proxies`: its addresses are not judged. Else its
    /// address passed the guard, or (a host name) is judged when resolved.
    pub trusted: bool,
    /// Its host: a normalized name, or an IP literal without brackets.
    pub host: String,
    /// `scheme://host:port`, without credentials, for messages.
    pub proxy: String,
}

impl ProxyVerdict {
    /// The refusal of this proxy for `why` (found when connecting to it).
    pub fn refused(&self, why: impl std::fmt::Display) -> ProxyRefused {
        ProxyRefused {
            proxy: self.proxy.clone(),
            why: format!(
                "{why}; a proxy needs a public address (or one in processor.allowed_networks) \
                 unless it is listed in processor.allowed_proxies"
            ),
        }
    }
}

/// A proxy URL's parts that matter: scheme, host (names normalized) and port.
#[derive(Debug, Clone, PartialEq)]
struct Endpoint {
    scheme: String,
    host: Host<String>,
    port: u16,
}

impl Endpoint {
    fn parse(s: &str) -> Result<Endpoint, String> {
        let u = url::Url::parse(s).map_err(|e| format!("not a valid URL: {e}"))?;
        if !SCHEMES.contains(&u.scheme()) {
            return Err("must be an http, https, socks5 or socks5h URL".into());
        }
        let host = match u.host() {
            // `socks5` is not a special scheme: its host is opaque, so `127.0.0.1` or
            // `2130706433` arrive here as names. Parsed as an http host they are the
            // IPv4 addresses the system resolver would make of them too.
            Some(Host::Domain(d)) => match Host::parse(d).map_err(|e| format!("bad host: {e}"))? {
                Host::Domain(d) => {
                    let d = classify::normalize_name(&d);
                    if d.is_empty() {
                        return Err("has no host".into());
                    }
                    Host::Domain(d)
                }
                ip => ip,
            },
            Some(Host::Ipv4(v4)) => Host::Ipv4(v4),
            Some(Host::Ipv6(v6)) => Host::Ipv6(v6),
            None => return Err("has no host".into()),
        };
        // The ports reqwest connects to when the URL has none.
        let port = u.port().unwrap_or(match u.scheme() {
            "http" => 80,
            "https" => 443,
            _ => 1080,
        });
        Ok(Endpoint {
            scheme: u.scheme().to_string(),
            host,
            port,
        })
    }

    fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            Host::Domain(_) => None,
        }
    }

    fn host_str(&self) -> String {
        match &self.host {
            Host::Domain(d) => d.clone(),
            Host::Ipv4(v4) => v4.to_string(),
            Host::Ipv6(v6) => v6.to_string(),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum HostPattern {
    /// One host: a name or an IP address.
    Exact(Host<String>),
    /// `*.example.com`: any name under `.example.com` (not the name itself).
    Under(String),
}

impl HostPattern {
    fn parse(s: &str) -> Result<HostPattern, String> {
        if let Some(rest) = s.strip_prefix("*.") {
            return match Host::parse(rest) {
                Ok(Host::Domain(d)) if !d.is_empty() => Ok(HostPattern::Under(format!(
                    ".{}",
                    classify::normalize_name(&d)
                ))),
                _ => Err(format!("{rest:?} after `*.` is not a host name")),
            };
        }
        match Host::parse(s).map_err(|e| format!("not a host: {e}"))? {
            Host::Domain(d) => {
                let d = classify::normalize_name(&d);
                if d.is_empty() || d.contains(['/', '@', '*', '?', '#']) {
                    return Err("not a host name".into());
                }
                Ok(HostPattern::Exact(Host::Domain(d)))
            }
            ip => Ok(HostPattern::Exact(ip)),
        }
    }

    fn matches(&self, host: &Host<String>) -> bool {
        match (self, host) {
            (HostPattern::Exact(h), host) => h == host,
            (HostPattern::Under(suffix), Host::Domain(d)) => d.ends_with(suffix.as_str()),
            (HostPattern::Under(_), _) => false,
        }
    }
}

/// One `processor.allowed_proxies` entry.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// `http://proxy.corp:3128`: scheme, host and port (userinfo ignored).
    Url(Endpoint),
    /// `proxy.corp`, `proxy.corp:3128`, `*.proxies.example.com`, `10.0.0.5`,
    /// `[fd00::5]:3128`: any scheme.
    Host(HostPattern, Option<u16>),
    /// `10.20.0.0/16`: a proxy given as a literal IP inside it (a name is not
    /// resolved to be matched).
    Net(IpNet),
}

impl Rule {
    fn parse(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty".into());
        }
        if s.contains("://") {
            let u = url::Url::parse(s).map_err(|e| format!("not a valid URL: {e}"))?;
            if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
                return Err("a proxy URL has no path, query or fragment".into());
            }
            return Endpoint::parse(s).map(Rule::Url);
        }
        if s.contains('/') {
            return s
                .parse::<IpNet>()
                .map(Rule::Net)
                .map_err(|_| "not a CIDR network".into());
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Rule::Host(HostPattern::Exact(ip_host(ip)), None));
        }
        // `host:port` or `[v6]:port`.
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("port {p} is out of range"))?;
                (h, Some(port))
            }
            _ => (s, None),
        };
        Ok(Rule::Host(HostPattern::parse(host)?, port))
    }

    fn matches(&self, p: &Endpoint) -> bool {
        match self {
            Rule::Url(e) => e == p,
            Rule::Host(h, port) => h.matches(&p.host) && port.is_none_or(|port| port == p.port),
            Rule::Net(net) => p.ip().is_some_and(|ip| {
                net.contains(&ip)
                    || matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| net.contains(&IpAddr::V4(v4))))
            }),
        }
    }
}

fn ip_host(ip: IpAddr) -> Host<String> {
    match ip {
        IpAddr::V4(v4) => Host::Ipv4(v4),
        IpAddr::V6(v6) => Host::Ipv6(v6),
    }
}

/// The proxy rules of one process, built from `processor.allowed_proxies` and
/// `processor.allowed_networks`.
#[derive(Debug, Clone, Default)]
pub struct ProxyPolicy {
    guard: Arc<NetGuard>,
    allowed: Vec<Rule>,
}

impl ProxyPolicy {
    /// `Err((i, why))` names the entry of `allowed_proxies` that is not valid.
    pub fn new(
        guard: Arc<NetGuard>,
        allowed_proxies: &[String],
    ) -> Result<ProxyPolicy, (usize, String)> {
        let allowed = allowed_proxies
            .iter()
            .enumerate()
            .map(|(i, s)| Rule::parse(s).map_err(|why| (i, why)))
            .collect::<Result<_, _>>()?;
        Ok(ProxyPolicy { guard, allowed })
    }

    pub fn guard(&self) -> &Arc<NetGuard> {
        &self.guard
    }

    /// Whether a job may use `proxy`, and how far it is trusted.
    pub fn check(&self, proxy: &str) -> Result<ProxyVerdict, ProxyRefused> {
        let p = Endpoint::parse(proxy).map_err(|why| ProxyRefused {
            proxy: redacted(proxy),
            why,
        })?;
        let mut verdict = ProxyVerdict {
            trusted: false,
            host: p.host_str(),
            proxy: p.to_string(),
        };
        if !self.allowed.is_empty() {
            if !self.allowed.iter().any(|r| r.matches(&p)) {
                return Err(ProxyRefused {
                    proxy: verdict.proxy,
                    why: "not listed in processor.allowed_proxies".into(),
                });
            }
            verdict.trusted = true;
            return Ok(verdict);
        }
        let judged = match (&p.host, p.ip()) {
            (_, Some(ip)) => self.guard.check(&p.host.to_string(), ip),
            (Host::Domain(d), None) if classify::is_localhost_name(d) => {
                self.guard.localhost(d).map(|_| ())
            }
            // Judged when the processor resolves it (GuardedResolver).
            _ => Ok(()),
        };
        judged.map_err(|e| verdict.refused(e))?;
        Ok(verdict)
    }
}

/// `proxy` without its userinfo, for messages.
fn redacted(proxy: &str) -> String {
    match url::Url::parse(proxy) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(networks: &[&str], proxies: &[&str]) -> ProxyPolicy {
        let nets = networks.iter().map(|n| n.parse().unwrap()).collect();
        let proxies: Vec<String> = proxies.iter().map(|s| s.to_string()).collect();
        ProxyPolicy::new(Arc::new(NetGuard::new(nets)), &proxies).unwrap()
    }

    #[test]
    fn without_a_list_a_proxy_must_pass_the_guard() {
        let p = policy(&[], &[]);
        for proxy in [
            "http://127.0.0.1:9001",
            "http://[::1]:9001",
            "http://2130706433:9001",
            "http://[::127.0.0.1]:3128",
            "http://[::ffff:10.0.0.1]:3128",
            "socks5://127.0.0.1:1080",
            "socks5://2130706433:1080",
            "socks5h://0x7f.1",
            "socks5h://10.0.0.1",
            "https://169.254.169.254",
            "http://localhost:3128",
            "http://localhost.:3128",
            "socks5://proxy.localhost",
        ] {
            let e = p.check(proxy).unwrap_err().to_string();
            assert!(e.starts_with("aggr_proxy: "), "{proxy}: {e}");
            assert!(e.contains("processor.allowed_proxies"), "{proxy}: {e}");
            assert!(e.contains("not allowed"), "{proxy}: {e}");
        }
        assert_eq!(
            p.check("http://user:secret@Proxy.Example.com.:3128")
                .unwrap(),
            ProxyVerdict {
                trusted: false,
                host: "proxy.example.com".into(),
                proxy: "http://proxy.example.com:3128".into()
            }
        );
        let v = p.check("socks5://8.8.8.8").unwrap();
        assert_eq!((v.trusted, v.host.as_str()), (false, "8.8.8.8"));
        assert_eq!(v.proxy, "socks5://8.8.8.8:1080");
        // allowed_networks opens a proxy's address like any other.
        let p = policy(&["127.0.0.0/8"], &[]);
        assert!(p.check("http://127.0.0.1:9001").is_ok());
        assert!(p.check("http://localhost.:9001").is_ok());
        assert!(p.check("http://[::1]:9001").is_err());
    }

    #[test]
    fn refusals_name_the_proxy_without_credentials() {
        let p = policy(&[], &[]);
        let e = p.check("http://user:secret@127.0.0.1:9001").unwrap_err();
        assert_eq!(e.proxy, "http://127.0.0.1:9001");
        assert!(!e.to_string().contains("secret"));
        let e = p.check("ftp://user:secret@proxy:21").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.why.contains("socks5"), "{e}");
    }

    #[test]
    fn with_a_list_only_listed_proxies_pass_and_are_trusted() {
        let p = policy(
            &[],
            &[
                "http://squid.corp:3128",
                "socks.corp",
                "egress.corp:8080",
                "*.proxies.example.com",
                "10.20.0.0/16",
                "10.9.9.9",
                "[fd00::5]:3128",
                "http://user:pw@10.1.1.1:3128/",
            ],
        );
        let trusted = |s: &str| p.check(s).map(|v| v.trusted);
        for ok in [
            "http://squid.corp:3128",
            "http://SQUID.corp.:3128",
            "http://other:creds@squid.corp:3128",
            "socks5://socks.corp",
            "http://socks.corp:1234",
            "http://egress.corp:8080",
            "https://a.proxies.example.com",
            "socks5h://a.b.proxies.example.com:1080",
            "socks5://10.20.0.1",
            "http://10.20.3.4:3128",
            "http://[::ffff:10.20.3.4]:3128",
            "http://10.9.9.9:1",
            "http://[fd00::5]:3128",
            "http://10.1.1.1:3128",
        ] {
            assert_eq!(trusted(ok), Ok(true), "{ok}");
        }
        for no in [
            "https://squid.corp:3128",
            "http://squid.corp",
            "http://squid.corp:3129",
            "http://egress.corp:8081",
            "http://proxies.example.com",
            "http://evilproxies.example.com",
            "http://10.21.0.1:3128",
            "http://[fd00::5]:3129",
            "http://10.1.1.1:3129",
            // Names are not resolved to match a network.
            "http://public.example.org:3128",
            "http://127.0.0.1:3128",
        ] {
            let e = p.check(no).unwrap_err();
            assert!(
                e.why.contains("not listed in processor.allowed_proxies"),
                "{no}: {e}"
            );
        }
        assert_eq!(
            p.check("http://squid.corp.:3128").unwrap().host,
            "squid.corp"
        );
    }

    #[test]
    fn bad_entries_are_named() {
        for (entries, bad) in [
            (vec!["squid.corp", "http://"], 1),
            (vec!["ftp://proxy:21"], 0),
            (vec!["10.0.0.0/33"], 0),
            (vec!["proxy.corp:99999"], 0),
            (vec![""], 0),
            (vec!["ok", "*."], 1),
            (vec!["http://proxy:3128/path"], 0),
            (vec!["pro xy"], 0),
        ] {
            let entries: Vec<String> = entries.into_iter().map(String::from).collect();
            let (i, why) = ProxyPolicy::new(Arc::default(), &entries).unwrap_err();
            assert_eq!(i, bad, "{entries:?}: {why}");
        }
    }
}
