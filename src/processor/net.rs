//! Which addresses downloads may reach. A merchant URL must never make us fetch an
//! internal service, so every resolved address of every connection, redirects
//! included, is checked here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A connection the guard refused. Found again in the error chain to fail the job at
/// once instead of retrying it.
#[derive(Debug, thiserror::Error)]
#[error(
    "address {ip} of {host} is not allowed (not a public address; see processor.allowed_networks)"
)]
pub struct AddressRefused {
    pub host: String,
    pub ip: IpAddr,
}

#[derive(Debug, Clone, Default)]
pub struct NetGuard {
    allowed: Vec<IpNet>,
}

impl NetGuard {
    pub fn new(allowed: Vec<IpNet>) -> NetGuard {
        NetGuard { allowed }
    }

    /// Public addresses are always permitted; internal ones only inside an allowed
    /// network.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !is_internal(ip) || self.allowed.iter().any(|n| n.contains(&ip))
    }

    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), AddressRefused> {
        if self.permits(ip) {
            Ok(())
        } else {
            Err(AddressRefused {
                host: host.to_string(),
                ip,
            })
        }
    }

    /// For URLs whose host is an IP literal (no resolver runs for those).
    pub fn check_url(&self, url: &url::Url) -> Result<(), AddressRefused> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        self.check(url.host_str().unwrap_or_default(), ip)
    }
}

/// IPv4-mapped and NAT64 IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_unspecified()
                || o[0] == 0
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared (CGNAT)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            let s0 = v6.segments()[0];
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s0 & 0xfe00) == 0xfc00 // unique local
                || (s0 & 0xffc0) == 0xfe80 // link local
                || (s0 & 0xffc0) == 0xfec0 // site local (deprecated)
                || v6 == Ipv6Addr::from(1u128) // ::1
        }
    }
}

/// DNS resolution through the system resolver, keeping only permitted addresses.
pub struct GuardedResolver {
    pub guard: Arc<NetGuard>,
    pub timeout: Duration,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), 0)))
                    .await
                    .map_err(|_| format!("DNS lookup of {host} timed out"))??
                    .collect();
            let mut refused = None;
            let permitted: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match guard.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e);
                        false
                    }
                })
                .collect();
            match (permitted.is_empty(), refused) {
                (true, Some(e)) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                (true, None) => Err(format!("{host} has no address").into()),
                (false, _) => Ok(Box::new(permitted.into_iter()) as Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let g = NetGuard::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!g.permits(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1", "8.8.8.8"] {
            assert!(g.permits(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allowed_networks_open_internal_ranges() {
        let g = NetGuard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(g.permits("127.0.0.1".parse().unwrap()));
        assert!(g.permits("::1".parse().unwrap()));
        assert!(g.permits("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!g.permits("10.0.0.1".parse().unwrap()));
        let u = url::Url::parse("http://169.254.169.254/latest").unwrap();
        assert!(g.check_url(&u).is_err());
    }
}
