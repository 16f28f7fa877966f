//! The address classifier: which IPv4 and IPv6 addresses are not on the public
//! internet, and which IPv6 forms carry an IPv4 address that must be judged instead.
//!
//! The ranges follow the IANA IPv4 and IPv6 special-purpose address registries: every
//! block that is not globally reachable is here, plus multicast, and for IPv6
//! everything outside global unicast (2000::/3). README.md ("Addresses and proxies")
//! has the same list as a table; keep both in step.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A range that downloads (callbacks) may not reach unless `processor.allowed_networks`
/// (`notifier.allowed_networks`) opens it.
pub struct Range<A> {
    pub addr: A,
    pub prefix: u8,
    pub what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8, what: &'static str) -> Range<Ipv4Addr> {
    Range {
        addr: Ipv4Addr::new(a, b, c, d),
        prefix,
        what,
    }
}

const fn v6(s: [u16; 8], prefix: u8, what: &'static str) -> Range<Ipv6Addr> {
    Range {
        addr: Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
        what,
    }
}

/// IPv4 blocks that are not globally reachable. The first match names the reason, so
/// narrower blocks come before the ones that contain them.
pub const V4_INTERNAL: &[Range<Ipv4Addr>] = &[
    v4(0, 0, 0, 0, 8, "\"this network\" (0.0.0.0/8)"),
    v4(10, 0, 0, 0, 8, "private (10.0.0.0/8)"),
    v4(
        100,
        64,
        0,
        0,
        10,
        "shared address space, CGNAT (100.64.0.0/10)",
    ),
    v4(127, 0, 0, 0, 8, "loopback (127.0.0.0/8)"),
    v4(
        169,
        254,
        0,
        0,
        16,
        "link-local, cloud metadata (169.254.0.0/16)",
    ),
    v4(172, 16, 0, 0, 12, "private (172.16.0.0/12)"),
    // Whole /24: its two globally reachable anycast addresses (PCP, TURN) serve no files.
    v4(192, 0, 0, 0, 24, "IETF protocol assignments (192.0.0.0/24)"),
    v4(192, 0, 2, 0, 24, "documentation, TEST-NET-1 (192.0.2.0/24)"),
    v4(
        192,
        88,
        99,
        0,
        24,
        "deprecated 6to4 relay anycast (192.88.99.0/24)",
    ),
    v4(192, 168, 0, 0, 16, "private (192.168.0.0/16)"),
    v4(198, 18, 0, 0, 15, "benchmarking (198.18.0.0/15)"),
    v4(
        198,
        51,
        100,
        0,
        24,
        "documentation, TEST-NET-2 (198.51.100.0/24)",
    ),
    v4(
        203,
        0,
        113,
        0,
        24,
        "documentation, TEST-NET-3 (203.0.113.0/24)",
    ),
    v4(224, 0, 0, 0, 4, "multicast (224.0.0.0/4)"),
    v4(
        255,
        255,
        255,
        255,
        32,
        "limited broadcast (255.255.255.255/32)",
    ),
    v4(240, 0, 0, 0, 4, "reserved (240.0.0.0/4)"),
];

/// Teredo (2001::/32), inside 2001::/23 but judged by the IPv4 addresses it carries.
const TEREDO: Range<Ipv6Addr> = v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo (2001::/32)");

/// IPv6 blocks that are not globally reachable, judged on the IPv6 address itself.
/// Addresses outside 2000::/3 that are not listed are refused too (see `GLOBAL_UNICAST`).
pub const V6_INTERNAL: &[Range<Ipv6Addr>] = &[
    v6([0; 8], 128, "unspecified (::/128)"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback (::1/128)"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (100::/64)"),
    v6(
        [0x100, 0, 0, 1, 0, 0, 0, 0],
        64,
        "dummy prefix (100:0:0:1::/64)",
    ),
    v6(
        [0x2001, 2, 0, 0, 0, 0, 0, 0],
        48,
        "benchmarking (2001:2::/48)",
    ),
    v6(
        [0x2001, 0x10, 0, 0, 0, 0, 0, 0],
        28,
        "deprecated ORCHID (2001:10::/28)",
    ),
    v6(
        [0x2001, 0x20, 0, 0, 0, 0, 0, 0],
        28,
        "ORCHIDv2 (2001:20::/28)",
    ),
    // Whole /23 but Teredo (checked before this list): its few globally reachable
    // blocks (anycast, AMT, AS112, DETs) serve no files.
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments (2001::/23)",
    ),
    v6(
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        "documentation (2001:db8::/32)",
    ),
    v6(
        [0x3fff, 0, 0, 0, 0, 0, 0, 0],
        20,
        "documentation (3fff::/20)",
    ),
    v6(
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "segment routing SIDs (5f00::/16)",
    ),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (fc00::/7)"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local (fe80::/10)"),
    v6(
        [0xfec0, 0, 0, 0, 0, 0, 0, 0],
        10,
        "deprecated site-local (fec0::/10)",
    ),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast (ff00::/8)"),
];

/// Global unicast: the only IPv6 space allocated for the public internet.
const GLOBAL_UNICAST: Range<Ipv6Addr> = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3, "");

fn v4_in(ip: Ipv4Addr, r: &Range<Ipv4Addr>) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(r.prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(r.addr) & mask
}

fn v6_in(ip: Ipv6Addr, r: &Range<Ipv6Addr>) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(r.prefix))
        .unwrap_or(0);
    u128::from(ip) & mask == u128::from(r.addr) & mask
}

/// Why an IPv4 address is not public, or `None` when it is.
pub fn v4_internal(ip: Ipv4Addr) -> Option<&'static str> {
    V4_INTERNAL.iter().find(|r| v4_in(ip, r)).map(|r| r.what)
}

/// Why an IPv6 address, taken as itself (not the IPv4 address it may carry), is not
/// public, or `None` when it is.
pub fn v6_internal(ip: Ipv6Addr) -> Option<&'static str> {
    if v6_in(ip, &TEREDO) {
        return None;
    }
    if let Some(r) = V6_INTERNAL.iter().find(|r| v6_in(ip, r)) {
        return Some(r.what);
    }
    if !v6_in(ip, &GLOBAL_UNICAST) {
        return Some("not global unicast (outside 2000::/3)");
    }
    None
}

/// The IPv4 addresses an IPv6 address carries, with the form's name.
#[derive(Debug, Default, PartialEq)]
pub struct Embedded {
    pub v4: Vec<(&'static str, Ipv4Addr)>,
    /// The IPv6 address must also pass on its own: its prefix is routed as IPv6
    /// (6to4, ISATAP). The other forms mean nothing but the IPv4 address inside.
    pub judge_v6: bool,
}

fn last32(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from(u128::from(ip) as u32)
}

/// Every IPv4 address `ip` carries. Several forms may apply at once (ISATAP on a 6to4
/// prefix); each address found is judged, so an accidental match only refuses more.
pub fn embedded_v4(ip: Ipv6Addr) -> Embedded {
    let s = ip.segments();
    let mut e = Embedded {
        v4: Vec::new(),
        judge_v6: true,
    };
    // Forms outside global unicast: nothing but a way to write an IPv4 address.
    if s[..5] == [0; 5] && s[5] == 0xffff {
        e.v4.push(("IPv4-mapped", last32(ip)));
        e.judge_v6 = false;
    } else if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        e.v4.push(("IPv4-translated", last32(ip)));
        e.judge_v6 = false;
    } else if s[..6] == [0; 6] && u128::from(ip) > 1 {
        // IPv4-compatible (deprecated); :: and ::1 are themselves.
        e.v4.push(("IPv4-compatible", last32(ip)));
        e.judge_v6 = false;
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        e.v4.push(("NAT64", last32(ip)));
        e.judge_v6 = false;
    } else if s[..3] == [0x64, 0xff9b, 1] {
        e.v4.push(("local-use NAT64", last32(ip)));
        e.judge_v6 = false;
    }
    if s[0] == 0x2002 {
        let v = (u128::from(ip) >> 80) as u32;
        e.v4.push(("6to4", Ipv4Addr::from(v)));
    }
    if v6_in(ip, &TEREDO) {
        let server = (u128::from(ip) >> 64) as u32;
        let client = !(u128::from(ip) as u32);
        e.v4.push(("Teredo server", Ipv4Addr::from(server)));
        e.v4.push(("Teredo client", Ipv4Addr::from(client)));
    }
    if (s[4] == 0 || s[4] == 0x0200) && s[5] == 0x5efe {
        e.v4.push(("ISATAP", last32(ip)));
    }
    e
}

/// The name without its trailing dot (the root), lowercased: `Example.COM.` and
/// `example.com` are one host for every check.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// `localhost` and `*.localhost` (RFC 6761: always the loopback, whatever DNS says),
/// with or without the trailing dot. Refused by name, before any DNS query.
pub fn is_localhost_name(name: &str) -> bool {
    let n = normalize_name(name);
    n == "localhost" || n.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_v4_range_is_internal_and_its_neighbours_are_not() {
        for r in V4_INTERNAL {
            assert!(v4_internal(r.addr).is_some(), "{}", r.what);
            // The last address of the range is inside too.
            let last = u32::from(r.addr) | (u32::MAX.checked_shr(u32::from(r.prefix)).unwrap_or(0));
            assert!(v4_internal(Ipv4Addr::from(last)).is_some(), "{}", r.what);
        }
        for ip in [
            "192.0.1.255",
            "192.0.3.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "11.0.0.1",
            "8.8.8.8",
            "93.184.216.34",
            "223.255.255.255",
        ] {
            assert_eq!(v4_internal(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn v4_reasons_name_the_range() {
        let why = |s: &str| v4_internal(s.parse().unwrap()).unwrap();
        assert!(why("192.0.2.7").contains("TEST-NET-1"));
        assert!(why("198.51.100.7").contains("TEST-NET-2"));
        assert!(why("203.0.113.7").contains("TEST-NET-3"));
        assert!(why("169.254.169.254").contains("link-local"));
        assert!(why("255.255.255.255").contains("broadcast"));
        assert!(why("0.1.2.3").contains("this network"));
        assert!(why("192.88.99.1").contains("6to4 relay"));
        assert!(why("192.0.0.9").contains("IETF"));
    }

    #[test]
    fn v6_ranges() {
        for (ip, what) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("100::1", "discard"),
            ("100:0:0:1::1", "dummy"),
            ("2001:2::1", "benchmarking"),
            ("2001:10::1", "ORCHID"),
            ("2001:1f::1", "ORCHID"),
            ("2001:20::1", "ORCHIDv2"),
            ("2001:2f:ffff::1", "ORCHIDv2"),
            ("2001:1::1", "IETF protocol"),
            ("2001:1ff::1", "IETF protocol"),
            ("2001:db8::1", "documentation"),
            ("2001:db8:ffff::1", "documentation"),
            ("3fff::1", "documentation"),
            ("3fff:fff::1", "documentation"),
            ("5f00::1", "segment routing"),
            ("fc00::1", "unique local"),
            ("fdff::1", "unique local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("1::", "outside 2000::/3"),
            ("4000::1", "outside 2000::/3"),
            ("e000::1", "outside 2000::/3"),
        ] {
            let why = v6_internal(ip.parse().unwrap());
            assert!(why.is_some_and(|w| w.contains(what)), "{ip}: {why:?}");
        }
        for ip in [
            "2001:200::1",
            "2001:db7:ffff::1",
            "2001:db9::1",
            "2001:4860:4860::8888",
            "2606:2800:220:1::1",
            "2a00:1450:4001::1",
            "3ffe:ffff::1",
            "3fff:1000::1",
            "2001::1",
        ] {
            assert_eq!(v6_internal(ip.parse().unwrap()), None, "{ip}");
        }
    }

    fn carried(ip: &str) -> Vec<(&'static str, Ipv4Addr)> {
        embedded_v4(ip.parse().unwrap()).v4
    }

    #[test]
    fn ipv4_in_ipv6_forms() {
        let lo: Ipv4Addr = "127.0.0.1".parse().unwrap();
        assert_eq!(carried("::ffff:127.0.0.1"), vec![("IPv4-mapped", lo)]);
        assert_eq!(carried("::ffff:0:127.0.0.1"), vec![("IPv4-translated", lo)]);
        assert_eq!(carried("::127.0.0.1"), vec![("IPv4-compatible", lo)]);
        assert_eq!(
            carried("::2"),
            vec![("IPv4-compatible", "0.0.0.2".parse().unwrap())]
        );
        assert_eq!(carried("64:ff9b::7f00:1"), vec![("NAT64", lo)]);
        assert_eq!(carried("64:ff9b:1::7f00:1"), vec![("local-use NAT64", lo)]);
        assert_eq!(carried("2002:7f00:1::"), vec![("6to4", lo)]);
        assert_eq!(
            carried("2002:c000:0201:1::1"),
            vec![("6to4", "192.0.2.1".parse().unwrap())]
        );
        // Teredo: server 65.54.227.120, client 192.0.2.45 (RFC 4380's example) with
        // the client XORed.
        assert_eq!(
            carried("2001:0:4136:e378:8000:63bf:3fff:fdd2"),
            vec![
                ("Teredo server", "65.54.227.120".parse().unwrap()),
                ("Teredo client", "192.0.2.45".parse().unwrap()),
            ]
        );
        assert_eq!(carried("2001:db8::0:5efe:7f00:1"), vec![("ISATAP", lo)]);
        assert_eq!(
            carried("fe80::200:5efe:a00:1"),
            vec![("ISATAP", "10.0.0.1".parse().unwrap())]
        );
        // ISATAP on a 6to4 prefix: both.
        assert_eq!(
            carried("2002:808:808:1:0:5efe:a00:1"),
            vec![
                ("6to4", "8.8.8.8".parse().unwrap()),
                ("ISATAP", "10.0.0.1".parse().unwrap())
            ]
        );
        // Not a form: no IPv4 inside.
        for ip in [
            "::",
            "::1",
            "2606:2800:220:1::1",
            "2001:db8::100:5efe:a00:1",
            "64:ff9b:2::1",
        ] {
            assert_eq!(carried(ip), vec![], "{ip}");
        }
        assert!(!embedded_v4("::ffff:1.2.3.4".parse().unwrap()).judge_v6);
        assert!(embedded_v4("2002:102:304::".parse().unwrap()).judge_v6);
    }

    #[test]
    fn the_readme_table_lists_every_range() {
        let readme = include_str!("../../README.md");
        let table = &readme[readme.find("### Addresses and proxies").unwrap()..];
        let cidrs = V4_INTERNAL
            .iter()
            .map(|r| (r.addr.to_string(), r.prefix, 32))
            .chain(
                V6_INTERNAL
                    .iter()
                    .map(|r| (r.addr.to_string(), r.prefix, 128)),
            );
        for (addr, prefix, full) in cidrs {
            let cidr = format!("{addr}/{prefix}");
            assert!(
                table.contains(&cidr) || (prefix == full && table.contains(&format!(" {addr} "))),
                "README.md's Addresses and proxies table lacks {cidr}"
            );
        }
    }

    #[test]
    fn localhost_names() {
        for n in [
            "localhost",
            "localhost.",
            "LocalHost",
            "a.localhost",
            "x.y.localhost.",
        ] {
            assert!(is_localhost_name(n), "{n}");
        }
        for n in [
            "localhost.example.com",
            "mylocalhost",
            "example.com.",
            "localhost-1",
        ] {
            assert!(!is_localhost_name(n), "{n}");
        }
        assert_eq!(normalize_name("Proxy.Corp."), "proxy.corp");
        assert_eq!(normalize_name("proxy.corp"), "proxy.corp");
    }
}
