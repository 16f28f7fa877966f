//! The DNS resolver every download client uses (reqwest's `dns_resolver`): the system
//! resolver, keeping only the addresses the guard permits. reqwest also resolves
//! proxy host names through it (see `proxy`), so a proxy named in a job is judged
//! like any other host unless the operator trusts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{AddressRefused, NetGuard, classify};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A lookup that got no answer within the resolver's timeout. A type of its own so
/// that the fetcher, finding it in a request's error, counts a timeout.
#[derive(Debug, thiserror::Error)]
#[error("DNS lookup of {0} timed out")]
pub struct DnsTimeout(pub String);

#[derive(Clone)]
pub struct GuardedResolver {
    guard: Arc<NetGuard>,
    timeout: Duration,
    /// The host name of a proxy listed in `processor.allowed_proxies` (normalized):
    /// its addresses are not judged, since the operator runs it (often on 10.x).
    trusted: Option<String>,
}

impl GuardedResolver {
    pub fn new(guard: Arc<NetGuard>, timeout: Duration) -> GuardedResolver {
        GuardedResolver {
            guard,
            timeout,
            trusted: None,
        }
    }

    /// Trusts the addresses of `host` (a proxy the operator listed). A download client
    /// is built per proxy, so this only widens that proxy's client. The target of a
    /// `socks5` job is resolved here too: a target with the proxy's own name reaches
    /// the proxy's address, which the proxy could reach anyway.
    pub fn trusting(mut self, host: Option<&str>) -> GuardedResolver {
        self.trusted = host.map(classify::normalize_name);
        self
    }

    /// The permitted addresses of `host` (with port `port`). A localhost name is
    /// answered without DNS; a refusal is an `AddressRefused` in the error.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, BoxError> {
        let name = classify::normalize_name(host);
        let trusted = self.trusted.as_deref() == Some(name.as_str());
        if classify::is_localhost_name(&name) {
            let ips = if trusted {
                super::LOOPBACK.to_vec()
            } else {
                self.guard.localhost(host)?
            };
            return Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect());
        }
        // The name as given: a trailing dot makes it absolute (no search domains).
        let addrs: Vec<SocketAddr> =
            tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| DnsTimeout(host.to_string()))??
                .collect();
        if trusted {
            return Ok(addrs);
        }
        let mut refused: Option<AddressRefused> = None;
        let permitted: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.guard.check(host, a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    refused.get_or_insert(e);
                    false
                }
            })
            .collect();
        match (permitted.is_empty(), refused) {
            (true, Some(e)) => Err(Box::new(e)),
            (true, None) => Err(format!("{host} has no address").into()),
            (false, _) => Ok(permitted),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let me = self.clone();
        Box::pin(async move {
            let addrs = me.lookup(name.as_str(), 0).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ips(addrs: &[SocketAddr]) -> Vec<IpAddr> {
        addrs.iter().map(SocketAddr::ip).collect()
    }

    fn find_refused(e: &BoxError) -> &AddressRefused {
        e.downcast_ref::<AddressRefused>()
            .unwrap_or_else(|| panic!("not a refusal: {e}"))
    }

    #[tokio::test]
    async fn localhost_names_are_refused_without_dns() {
        let r = GuardedResolver::new(Arc::default(), Duration::from_secs(2));
        for n in ["localhost", "localhost.", "api.localhost", "x.localhost."] {
            let e = r.lookup(n, 80).await.unwrap_err();
            let refused = find_refused(&e);
            assert_eq!(refused.ip, None, "{n}: refused by name");
            assert!(e.to_string().contains("not allowed"), "{e}");
        }
        // `nothing.localhost` has no DNS record anywhere: answered as the loopback.
        let allowed = Arc::new(NetGuard::new(vec!["127.0.0.0/8".parse().unwrap()]));
        let r = GuardedResolver::new(allowed, Duration::from_secs(2));
        let a = r.lookup("nothing.localhost.", 8080).await.unwrap();
        assert_eq!(a, vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn internal_addresses_of_a_name_are_dropped() {
        // An IP literal goes through the system resolver as itself: no network needed.
        let r = GuardedResolver::new(Arc::default(), Duration::from_secs(2));
        let e = r.lookup("127.0.0.1", 80).await.unwrap_err();
        assert_eq!(find_refused(&e).ip, Some("127.0.0.1".parse().unwrap()));
        let e = r.lookup("::ffff:169.254.169.254", 80).await.unwrap_err();
        assert!(find_refused(&e).why.contains("IPv4-mapped"), "{e}");
        let ok = r.lookup("8.8.8.8", 53).await.unwrap();
        assert_eq!(ips(&ok), vec!["8.8.8.8".parse::<IpAddr>().unwrap()]);
    }

    /// What `net::proxy` relies on: reqwest resolves the host name of an HTTP proxy
    /// (plain and CONNECT for https) and of a SOCKS proxy through the client's
    /// `dns_resolver`. If an upgrade changed that, a proxy name would escape the guard:
    /// the listener below would be reached through the system resolver.
    #[tokio::test]
    async fn reqwest_resolves_proxy_names_through_this_resolver() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        super::super::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let server = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                a.fetch_add(1, SeqCst);
                drop(sock);
            }
        });
        let get = async |scheme: &str, target: &str, trusted: Option<&str>| {
            let resolver =
                GuardedResolver::new(Arc::default(), Duration::from_secs(2)).trusting(trusted);
            let client = reqwest::Client::builder()
                .no_proxy()
                .proxy(reqwest::Proxy::all(format!("{scheme}://localhost:{port}")).unwrap())
                .dns_resolver(Arc::new(resolver))
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let e = client.get(target).send().await.unwrap_err();
            let mut chain = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                chain.push_str(&format!(": {c}"));
                cur = c.source();
            }
            chain
        };
        for scheme in ["http", "https", "socks5", "socks5h"] {
            // IP targets: `socks5` resolves the target (through this resolver too) first.
            for target in ["http://93.184.216.34/f", "https://93.184.216.34/f"] {
                let chain = get(scheme, target, None).await;
                // hyper-util's SOCKS connector drops the cause; the count below is the proof.
                if !scheme.starts_with("socks") {
                    assert!(
                        chain.contains("host localhost is not allowed"),
                        "{scheme} {target}: {chain}"
                    );
                }
                assert_eq!(accepted.load(SeqCst), 0, "{scheme} {target}: proxy reached");
                // Trusted, the same proxy is reached: the listener does see connections.
                get(scheme, target, Some("localhost")).await;
                assert_eq!(accepted.swap(0, SeqCst), 1, "{scheme} {target} trusted");
            }
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_trusted_proxy_name_keeps_its_internal_addresses() {
        let r = GuardedResolver::new(Arc::default(), Duration::from_secs(2))
            .trusting(Some("LocalHost."));
        let a = r.lookup("localhost", 3128).await.unwrap();
        assert_eq!(ips(&a), super::super::LOOPBACK.to_vec());
        let r = GuardedResolver::new(Arc::default(), Duration::from_secs(2))
            .trusting(Some("127.0.0.1"));
        assert_eq!(r.lookup("127.0.0.1", 1).await.unwrap().len(), 1);
        // Another name is still judged.
        assert!(r.lookup("localhost", 1).await.is_err());
    }
}
