//! The address guard and `aggr_proxy`: a job's proxy must be one the operator listed
//! in `processor.allowed_proxies` or, without a list, have an address the guard
//! permits; a literal internal URL is refused behind a proxy too. Against the real
//! binary, Redis, a local origin and a small forwarding proxy written here.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Every step of the proxy gives up after this.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);

/// A forward HTTP proxy: reads `GET http://host:port/path HTTP/1.1` and its headers,
/// connects to `host:port` (or to the address its own `hosts` table gives the host,
/// like a proxy with its own DNS), sends the request in origin form and streams the
/// answer back.
struct ForwardProxy {
    addr: SocketAddr,
    /// The absolute URIs asked for, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl ForwardProxy {
    async fn start(hosts: HashMap<String, SocketAddr>) -> ForwardProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, hosts) = (seen.clone(), Arc::new(hosts));
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (s, hosts) = (s.clone(), hosts.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(PROXY_TIMEOUT, forward(sock, &s, &hosts)).await;
                });
            }
        });
        ForwardProxy { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn forward(
    sock: tokio::net::TcpStream,
    seen: &Mutex<Vec<String>>,
    hosts: &HashMap<String, SocketAddr>,
) -> std::io::Result<()> {
    let mut client = BufReader::new(sock);
    let mut line = String::new();
    client.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if client.read_line(&mut h).await? == 0 || h == "\r\n" {
            break;
        }
        let name = h.split(':').next().unwrap_or_default().to_ascii_lowercase();
        if !matches!(
            name.as_str(),
            "connection" | "proxy-connection" | "keep-alive"
        ) {
            headers.push(h);
        }
    }
    seen.lock().unwrap().push(target.clone());
    let url = url::Url::parse(&target).map_err(std::io::Error::other)?;
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let mut upstream = match hosts.get(&host) {
        Some(a) => tokio::net::TcpStream::connect(a).await?,
        None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    headers.iter().for_each(|h| req.push_str(h));
    req.push_str("Connection: close\r\n\r\n");
    upstream.write_all(req.as_bytes()).await?;
    // The origin closes after its answer (Connection: close); so do we.
    let mut sock = client.into_inner();
    tokio::io::copy(&mut upstream, &mut sock).await?;
    sock.shutdown().await
}

/// A SOCKS5 proxy (no authentication, CONNECT only) that looks names up in its own
/// `hosts` table. Returns its address and the destinations it was asked for.
async fn start_socks5(hosts: HashMap<String, SocketAddr>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s, hosts) = (seen.clone(), Arc::new(hosts));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (s, hosts) = (s.clone(), hosts.clone());
            tokio::spawn(tokio::time::timeout(PROXY_TIMEOUT, async move {
                let mut head = [0u8; 2];
                sock.read_exact(&mut head).await?;
                let mut methods = vec![0u8; head[1] as usize];
                sock.read_exact(&mut methods).await?;
                sock.write_all(&[5, 0]).await?;
                let mut req = [0u8; 4];
                sock.read_exact(&mut req).await?;
                let host = match req[3] {
                    1 => {
                        let mut a = [0u8; 4];
                        sock.read_exact(&mut a).await?;
                        std::net::Ipv4Addr::from(a).to_string()
                    }
                    3 => {
                        let mut n = vec![0u8; sock.read_u8().await? as usize];
                        sock.read_exact(&mut n).await?;
                        String::from_utf8_lossy(&n).into_owned()
                    }
                    _ => {
                        let mut a = [0u8; 16];
                        sock.read_exact(&mut a).await?;
                        std::net::Ipv6Addr::from(a).to_string()
                    }
                };
                let port = sock.read_u16().await?;
                s.lock().unwrap().push(format!("{host}:{port}"));
                let mut upstream = match hosts.get(&host) {
                    Some(a) => tokio::net::TcpStream::connect(a).await?,
                    None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
                };
                sock.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                tokio::io::copy_bidirectional(&mut sock, &mut upstream).await?;
                std::io::Result::Ok(())
            }));
        }
    });
    (addr, seen)
}

/// The status and error message of a submit of a job for `url` through `proxy`.
async fn submit_via(svc: &Service, url: &str, proxy: &str) -> (u16, String) {
    let body = json!({"aggr_id": "px", "aggr_limit": 1, "url": url,
        "aggr_proxy": proxy, "callback_url": "http://cb.test/x"});
    let (st, v) = svc.post_raw("/download", &body.to_string()).await;
    (st, v["error"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_internal_proxy_is_refused_at_submit() {
    // Only web: nothing is downloaded. No allowed networks: loopback is internal.
    let svc = Service::start_with(json!({"processor": {"allowed_networks": []}}), &[]).await;
    let port = free_port();
    for proxy in [
        format!("http://127.0.0.1:{port}"),
        format!("http://[::1]:{port}"),
        format!("http://2130706433:{port}"),
        format!("http://[::127.0.0.1]:{port}"),
        format!("http://[::ffff:169.254.169.254]:{port}"),
        format!("socks5://127.0.0.1:{port}"),
        format!("socks5h://[::1]:{port}"),
        format!("http://localhost.:{port}"),
        format!("http://localhost:{port}"),
        format!("https://user:secret@10.0.0.1:{port}"),
    ] {
        let (st, e) = submit_via(&svc, "http://merchant.test/f", &proxy).await;
        assert_eq!(st, 400, "{proxy}: {e}");
        assert!(e.starts_with("aggr_proxy: "), "{proxy}: {e}");
        assert!(e.contains("not allowed"), "{proxy}: {e}");
        assert!(e.contains("processor.allowed_proxies"), "{proxy}: {e}");
        assert!(!e.contains("secret"), "credentials in {e}");
    }
    // A proxy by (public) name is judged when it is resolved: accepted here.
    let (st, e) = submit_via(
        &svc,
        "http://merchant.test/f",
        "http://proxy.example.com:3128",
    )
    .await;
    assert_eq!(st, 201, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unlisted_proxy_is_refused_when_allowed_proxies_is_set() {
    let svc = Service::start_with(
        json!({"processor": {"allowed_proxies": ["http://squid.corp:3128", "*.egress.corp"]}}),
        &[],
    )
    .await;
    for proxy in [
        "http://other.example.com:3128",
        "http://squid.corp:3129",
        "https://squid.corp:3128",
        "socks5://squid.corp:3128",
        "http://egress.corp:3128",
        // Loopback is in the base config's allowed_networks: a list still decides.
        "http://127.0.0.1:3128",
    ] {
        let (st, e) = submit_via(&svc, "http://merchant.test/f", proxy).await;
        assert_eq!(st, 400, "{proxy}: {e}");
        assert!(
            e.starts_with("aggr_proxy: ") && e.contains("not listed in processor.allowed_proxies"),
            "{proxy}: {e}"
        );
    }
    for proxy in [
        "http://squid.corp:3128",
        "http://u:p@SQUID.corp.:3128",
        "socks5h://a.egress.corp:1080",
    ] {
        let (st, e) = submit_via(&svc, "http://merchant.test/f", proxy).await;
        assert_eq!(st, 201, "{proxy}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_proxy_carries_the_download() {
    let origin = start_origin().await;
    origin.add_file("f", b"through the proxy".to_vec());
    // `merchant.test` only exists in the proxy's own table.
    let proxy =
        ForwardProxy::start(HashMap::from([("merchant.test".to_string(), origin.addr)])).await;
    let rx = start_receiver().await;
    let port = proxy.addr.port();
    // No allowed networks: the proxy (on loopback, by IP and by name) is reachable only
    // because it is listed.
    let svc = Service::start(json!({"processor": {
        "allowed_networks": [],
        "allowed_proxies": [proxy.url(), format!("localhost:{port}")]
    }}))
    .await;
    let url = format!("http://merchant.test:{}/file/f", origin.addr.port());
    let mut ids = Vec::new();
    for p in [proxy.url(), format!("http://localhost.:{port}")] {
        let id = svc
            .submit(
                json!({"aggr_id": format!("px-{}", ids.len()), "aggr_limit": 1, "url": url,
                "aggr_proxy": p, "callback_url": rx.url(0), "max_retries": 0}),
            )
            .await;
        ids.push(id);
    }
    for id in &ids {
        let cb = rx.wait_for(id, 20).await;
        assert_eq!(cb["success"], true, "{cb}");
        let stored = std::fs::read(svc.storage().join(&id[..3]).join(id)).unwrap();
        assert_eq!(stored, b"through the proxy");
    }
    assert_eq!(proxy.seen(), vec![url.clone(), url]);
    assert_eq!(origin.hits("/file/f"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_socks5h_proxy_carries_the_download() {
    let origin = start_origin().await;
    origin.add_file("f", b"through socks".to_vec());
    let (addr, seen) =
        start_socks5(HashMap::from([("merchant.test".to_string(), origin.addr)])).await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"processor": {
        "allowed_networks": [], "allowed_proxies": [format!("localhost:{}", addr.port())]
    }}))
    .await;
    let id = svc
        .submit(json!({"aggr_id": "socks", "aggr_limit": 1, "max_retries": 0,
            "url": format!("http://merchant.test:{}/file/f", origin.addr.port()),
            "aggr_proxy": format!("socks5h://localhost:{}", addr.port()), "callback_url": rx.url(0)}))
        .await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], true, "{cb}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![format!("merchant.test:{}", origin.addr.port())]
    );
    // The same proxy is refused when it is not listed.
    let (st, e) = submit_via(
        &svc,
        "http://merchant.test/f",
        &format!("socks5h://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert_eq!(st, 400, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_literal_internal_url_fails_behind_an_allowed_proxy() {
    let origin = start_origin().await;
    origin.add_file("f", b"secret".to_vec());
    let proxy = ForwardProxy::start(HashMap::new()).await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"processor": {
        "allowed_networks": [], "allowed_proxies": [proxy.url()]
    }}))
    .await;
    let port = origin.addr.port();
    let mut ids = Vec::new();
    for url in [
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://[::127.0.0.1]:{port}/file/f"),
        format!("http://2130706433:{port}/file/f"),
        format!("http://localhost.:{port}/file/f"),
    ] {
        let id = svc
            .submit(json!({"aggr_id": "px", "aggr_limit": 4, "url": url,
                "aggr_proxy": proxy.url(), "callback_url": rx.url(0)}))
            .await;
        ids.push((id, url));
    }
    for (id, url) in &ids {
        let cb = rx.wait_for(id, 20).await;
        assert_eq!(cb["success"], false, "{url}: {cb}");
        let e = cb["error"].as_str().unwrap();
        assert!(e.contains("not allowed"), "{url}: {e}");
        assert_eq!(
            svc.job(id).await["download_attempts"],
            1,
            "{url}: refused at once, not retried"
        );
    }
    assert_eq!(proxy.seen(), Vec::<String>::new());
    assert_eq!(origin.hits("/file/f"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_refuses_a_proxy_its_config_does_not_allow() {
    let proxy = ForwardProxy::start(HashMap::new()).await;
    let rx = start_receiver().await;
    // web accepts the loopback proxy (the base config allows 127.0.0.0/8) ...
    let mut svc = Service::start_with(json!({}), &[]).await;
    let id = svc
        .submit(
            json!({"aggr_id": "px", "aggr_limit": 1, "url": "http://merchant.test/f",
            "aggr_proxy": proxy.url(), "callback_url": rx.url(0)}),
        )
        .await;
    // ... the processor, started with a config that does not, fails the job.
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&svc.config).unwrap()).unwrap();
    cfg["processor"]["allowed_networks"] = json!([]);
    std::fs::write(&svc.config, serde_json::to_vec(&cfg).unwrap()).unwrap();
    svc.spawn("processor", &["processor"]);
    svc.spawn("notifier", &["notifier"]);
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], false, "{cb}");
    let e = cb["error"].as_str().unwrap();
    assert!(
        e.starts_with("aggr_proxy: ") && e.contains("127.0.0.1") && e.contains("not allowed"),
        "{e}"
    );
    assert_eq!(svc.job(&id).await["download_attempts"], 1, "not retried");
    assert_eq!(proxy.seen(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_allowed_proxies_entry_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(
        dir.path(),
        "test:unused",
        json!({"processor": {"allowed_proxies": ["squid.corp:3128", "ftp://nope"]}}),
    );
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args(["processor", "-c"])
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the processor exits at once")
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("processor.allowed_proxies[1]"), "{err}");
}
