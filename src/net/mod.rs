//! Which addresses downloads and callbacks may reach. A merchant URL (or an
//! aggregation's proxy) or a client's `callback_url` must never make us connect to an
//! internal service, so every address we connect to is judged here: each address a
//! host name resolves to (`resolver`), each IP-literal URL, redirects included, and
//! each proxy (`proxy`). `classify` holds the ranges and the IPv6 forms that carry an
//! IPv4 address. Downloads use `processor.allowed_networks` (public addresses only by
//! default), callbacks `notifier.allowed_networks` ([`NetGuard::callbacks`]: private
//! networks too by default, since callback receivers usually live there).
//! `origin` parses the web origins of `api.allowed_origins` and of requests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

pub mod classify;
pub mod origin;
pub mod proxy;
pub mod resolver;

pub use proxy::{ProxyPolicy, ProxyRefused, ProxyVerdict};
pub use resolver::GuardedResolver;

/// What a localhost name means (RFC 6761), answered without asking DNS.
pub const LOOPBACK: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

/// A connection the guard refused. Found again in the error chain to fail the job at
/// once instead of retrying it.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.message())]
pub struct AddressRefused {
    pub host: String,
    /// `None` for a localhost name, refused by name.
    pub ip: Option<IpAddr>,
    pub why: String,
    /// The config key that would open it (`processor.allowed_networks`, ...).
    pub key: &'static str,
}

impl AddressRefused {
    fn message(&self) -> String {
        match self.ip {
            Some(ip) => format!(
                "address {ip} of {} is not allowed: {} (not a public address; see {})",
                self.host, self.why, self.key
            ),
            None => format!(
                "host {} is not allowed: {} (see {})",
                self.host, self.why, self.key
            ),
        }
    }
}

/// The config key of the downloads' guard.
pub const DOWNLOADS_KEY: &str = "processor.allowed_networks";
/// The config key of the callbacks' guard.
pub const CALLBACKS_KEY: &str = "notifier.allowed_networks";

/// What callbacks may reach besides public addresses while `notifier.allowed_networks`
/// is not set: the private networks, where receivers of an operator's own services
/// live. Not loopback (the notifier's own machine: Redis, admin listeners), not
/// link-local (cloud metadata at 169.254.169.254), not shared address space
/// (100.64.0.0/10: Alibaba Cloud's metadata is 100.100.100.200), nor anything else
/// `classify` lists.
pub const DEFAULT_CALLBACK_NETWORKS: [&str; 4] =
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"];

/// Addresses inside [`DEFAULT_CALLBACK_NETWORKS`] that the default still refuses:
/// AWS's instance metadata service (with its DNS and NTP servers) on IPv6.
pub const DEFAULT_CALLBACK_EXCEPTIONS: [(&str, &str); 1] = [(
    "fd00:ec2::/32",
    "AWS instance metadata, DNS and NTP on IPv6 (fd00:ec2::/32), left out of the default",
)];

#[derive(Debug, Clone)]
pub struct NetGuard {
    allowed: Vec<IpNet>,
    /// Refused even inside `allowed` (the default callback networks' exceptions).
    except: Vec<(IpNet, &'static str)>,
    /// The config key named in refusals.
    key: &'static str,
}

impl Default for NetGuard {
    fn default() -> NetGuard {
        NetGuard::new(Vec::new())
    }
}

impl NetGuard {
    /// The downloads' guard: public addresses and `allowed`
    /// (`processor.allowed_networks`).
    pub fn new(allowed: Vec<IpNet>) -> NetGuard {
        NetGuard {
            allowed,
            except: Vec::new(),
            key: DOWNLOADS_KEY,
        }
    }

    /// The callbacks' guard: public addresses and `configured`
    /// (`notifier.allowed_networks`, taken as it is), or without it
    /// [`DEFAULT_CALLBACK_NETWORKS`] but [`DEFAULT_CALLBACK_EXCEPTIONS`].
    pub fn callbacks(configured: Option<Vec<IpNet>>) -> NetGuard {
        let parse = |s: &str| s.parse::<IpNet>().expect("a valid built-in network");
        match configured {
            Some(allowed) => NetGuard {
                allowed,
                except: Vec::new(),
                key: CALLBACKS_KEY,
            },
            None => NetGuard {
                allowed: DEFAULT_CALLBACK_NETWORKS.iter().map(|s| parse(s)).collect(),
                except: DEFAULT_CALLBACK_EXCEPTIONS
                    .iter()
                    .map(|(n, why)| (parse(n), *why))
                    .collect(),
                key: CALLBACKS_KEY,
            },
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(&ip))
    }

    /// Why `ip` may not be reached, or `None` when it may. Public addresses are always
    /// permitted; internal ones only inside an allowed network. An IPv6 address that
    /// carries IPv4 addresses is permitted only when each of them is (an allowed
    /// network containing the IPv6 address itself also permits it).
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        if let Some((_, why)) = self.except.iter().find(|(n, _)| n.contains(&ip)) {
            return Some(why.to_string());
        }
        if self.allowed(ip) {
            return None;
        }
        let v6 = match ip {
            IpAddr::V4(v4) => return classify::v4_internal(v4).map(str::to_string),
            IpAddr::V6(v6) => v6,
        };
        let e = classify::embedded_v4(v6);
        if e.judge_v6
            && let Some(why) = classify::v6_internal(v6)
        {
            return Some(why.to_string());
        }
        e.v4.into_iter().find_map(|(form, v4)| {
            let why = classify::v4_internal(v4)?;
            (!self.allowed(IpAddr::V4(v4))).then(|| format!("{form} form of {v4}, {why}"))
        })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        self.refusal(ip).is_none()
    }

    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), AddressRefused> {
        match self.refusal(ip) {
            None => Ok(()),
            Some(why) => Err(AddressRefused {
                host: host.to_string(),
                ip: Some(ip),
                why,
                key: self.key,
            }),
        }
    }

    /// The loopback addresses a localhost name may use, or the refusal when there are
    /// none (the default: the guard's allowed networks open 127.0.0.0/8 or ::1).
    pub fn localhost(&self, host: &str) -> Result<Vec<IpAddr>, AddressRefused> {
        let ok: Vec<IpAddr> = LOOPBACK
            .into_iter()
            .filter(|ip| self.permits(*ip))
            .collect();
        if ok.is_empty() {
            return Err(AddressRefused {
                host: host.to_string(),
                ip: None,
                why: "a localhost name is the loopback (RFC 6761)".into(),
                key: self.key,
            });
        }
        Ok(ok)
    }

    /// What can be judged of a host without DNS: an IP literal, or a localhost name.
    /// Other names pass (their addresses are judged when they are resolved).
    pub fn check_host(&self, host: &url::Host<&str>) -> Result<(), AddressRefused> {
        match *host {
            url::Host::Ipv4(v4) => self.check(&v4.to_string(), IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => self.check(&format!("[{v6}]"), IpAddr::V6(v6)),
            url::Host::Domain(d) if classify::is_localhost_name(d) => self.localhost(d).map(|_| ()),
            url::Host::Domain(_) => Ok(()),
        }
    }

    /// For a URL's host before connecting: IP literals (no resolver runs for those)
    /// and localhost names. Also checked behind a proxy, which would resolve names
    /// itself but would reach a literal internal address just the same.
    pub fn check_url(&self, url: &url::Url) -> Result<(), AddressRefused> {
        match url.host() {
            Some(h) => self.check_host(&h),
            None => Ok(()),
        }
    }
}

/// Selects rustls' pure-Rust-verified `ring` provider for every TLS client (downloads,
/// callbacks), once; each client's builder calls it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The first [`AddressRefused`] in `e`'s chain (see [`crate::errors::find_in_chain`]).
pub fn find_refused<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a AddressRefused> {
    crate::errors::find_in_chain::<AddressRefused>(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let g = NetGuard::default();
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "100::1",
            "2001:10::1",
            "2001:20::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0:127.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            // Teredo with an internal server, then with an internal client (10.0.0.1
            // XORed: f5ff:fffe).
            "2001:0:7f00:1::",
            "2001:0:808:808::f5ff:fffe",
            "2606:2800:220:1:0:5efe:7f00:1",
            "2606:2800:220:1:200:5efe:a9fe:a9fe",
            // ISATAP with a public IPv4 address on an internal prefix.
            "fe80::5efe:808:808",
        ] {
            assert!(!g.permits(ip(a)), "{a}");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:2800:220:1::1",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            // Teredo: server 8.8.8.8, client 8.8.4.4 (f7f7:fbfb XORed).
            "2001:0:808:808::f7f7:fbfb",
            "2606:2800:220:1:0:5efe:808:808",
        ] {
            assert!(g.permits(ip(a)), "{a}");
        }
    }

    #[test]
    fn allowed_networks_open_internal_ranges() {
        let g = NetGuard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        for a in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.2",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            assert!(g.permits(ip(a)), "{a}");
        }
        for a in [
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "fe80::5efe:7f00:1",
        ] {
            assert!(!g.permits(ip(a)), "{a}");
        }
        // Teredo: both its addresses must pass.
        assert!(!g.permits(ip("2001:0:7f00:1::f5ff:fffe")));
        assert!(g.permits(ip("2001:0:7f00:1::80ff:fffe")));
        let u = url::Url::parse("http://169.254.169.254/latest").unwrap();
        assert!(g.check_url(&u).is_err());
        // An allowed IPv6 network containing the form itself opens it too.
        let g = NetGuard::new(vec![
            "fd00::/8".parse().unwrap(),
            "2002::/16".parse().unwrap(),
        ]);
        assert!(g.permits(ip("fd12::1")));
        assert!(g.permits(ip("2002:7f00:1::")));
    }

    #[test]
    fn literal_urls_are_judged_before_connecting() {
        let g = NetGuard::default();
        for u in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::1]:8080/",
            "http://[::127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://localhost/",
            "http://localhost./",
            "http://LOCALHOST:80/",
            "http://api.localhost/",
            "http://api.localhost./x",
            "http://169.254.169.254/",
        ] {
            let url = url::Url::parse(u).unwrap();
            let e = g.check_url(&url).expect_err(u);
            assert!(e.to_string().contains("not allowed"), "{u}: {e}");
        }
        // WHATWG: a decimal host is an IPv4 address.
        assert_eq!(
            url::Url::parse("http://2130706433/").unwrap().host(),
            Some(url::Host::Ipv4(Ipv4Addr::LOCALHOST))
        );
        for u in [
            "http://example.com/",
            "http://example.com./",
            "http://8.8.8.8/",
            "http://[2606:2800:220:1::1]/",
        ] {
            assert!(g.check_url(&url::Url::parse(u).unwrap()).is_ok(), "{u}");
        }
        // Loopback allowed: localhost names are too (they mean nothing else).
        let g = NetGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(
            g.check_url(&url::Url::parse("http://localhost./").unwrap())
                .is_ok()
        );
        assert_eq!(g.localhost("localhost").unwrap(), vec![ip("127.0.0.1")]);
    }

    #[test]
    fn refusals_say_why() {
        let g = NetGuard::default();
        let e = g.check("x", ip("::127.0.0.1")).unwrap_err().to_string();
        assert!(
            e.contains("IPv4-compatible form of 127.0.0.1, loopback"),
            "{e}"
        );
        let e = g.check("x", ip("2002:7f00:1::")).unwrap_err().to_string();
        assert!(e.contains("6to4 form of 127.0.0.1"), "{e}");
        let e = g.localhost("localhost.").unwrap_err().to_string();
        assert!(e.contains("localhost.") && e.contains("RFC 6761"), "{e}");
    }

    #[test]
    fn callbacks_reach_private_networks_by_default_but_no_loopback_or_metadata() {
        let g = NetGuard::callbacks(None);
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "fd12:3456::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "8.8.8.8",
            "2606:2800:220:1::1",
        ] {
            assert!(g.permits(ip(a)), "{a}");
        }
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::",
            "0.0.0.0",
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "100.100.100.200",
            "100.64.0.1",
            "224.0.0.1",
            "ff02::1",
            "192.0.2.1",
            "2001:db8::1",
            "240.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:0:7f00:1::",
        ] {
            assert!(!g.permits(ip(a)), "{a}");
        }
        let e = g.check("x", ip("fd00:ec2::254")).unwrap_err().to_string();
        assert!(
            e.contains("AWS instance metadata") && e.contains("notifier.allowed_networks"),
            "{e}"
        );
        let e = g.localhost("localhost.").unwrap_err().to_string();
        assert!(e.contains("notifier.allowed_networks"), "{e}");
        // A list that is set is taken as it is: [] is public addresses only, and a
        // listed network is open even where the default made an exception.
        let g = NetGuard::callbacks(Some(vec![]));
        assert!(!g.permits(ip("10.0.0.1")) && g.permits(ip("8.8.8.8")));
        let g = NetGuard::callbacks(Some(vec!["fd00::/8".parse().unwrap()]));
        assert!(g.permits(ip("fd00:ec2::254")));
        assert!(!g.permits(ip("10.0.0.1")));
        // Downloads' guard names its own key.
        let e = NetGuard::default().check("x", ip("10.0.0.1")).unwrap_err();
        assert!(e.to_string().contains("processor.allowed_networks"), "{e}");
    }
}
