//! Each kind of download failure, provoked through the real fetcher (a real HTTP
//! client against real servers on loopback): the `DownloadError` it makes carries
//! the reason the metrics count, the origin's status and the message the callback
//! shows. The processor's side (thumbnails, and the metrics the reasons reach) is in
//! tests/ops.rs.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use downloader::config::Config;
use downloader::job::{DownloadError, FailureReason, JobRecord, new_id};
use downloader::processor::fetch::{Fetcher, Outcome, Timeouts};
use serde_json::{Value, json};

use common::{start_origin, start_truncating_origin};

/// The `processor` section `more` plus loopback in `allowed_networks` (where the
/// test servers are).
fn loopback(more: Value) -> Value {
    let mut p = json!({"allowed_networks": ["127.0.0.0/8"]});
    if let (Value::Object(base), Value::Object(over)) = (&mut p, more) {
        base.extend(over);
    }
    p
}

/// A fetcher of the config's `processor` section, storing under `root`.
fn fetcher(processor: Value, root: PathBuf, max_bytes: u64, idle: Duration) -> Fetcher {
    let text = json!({ "processor": processor }).to_string();
    let cfg = Config::parse(Path::new("failures.json"), &text).unwrap();
    let timeouts = Timeouts {
        default: Duration::from_secs(20),
        max: Duration::from_secs(60),
        idle,
    };
    downloader::install_crypto_provider();
    Fetcher::new(
        cfg.proxy_policy().unwrap(),
        &BTreeMap::new(),
        max_bytes,
        timeouts,
        root,
    )
    .unwrap()
}

fn plain_fetcher(root: &Path) -> Fetcher {
    fetcher(
        loopback(json!({})),
        root.to_path_buf(),
        1 << 20,
        Duration::from_secs(20),
    )
}

/// A job for `url`; `more` adds spec fields (`mime_type`, `download_timeout`, ...).
fn job(url: &str, more: Value) -> JobRecord {
    let mut spec = json!({"url": url, "aggr_id": "f", "aggr_limit": 1, "max_retries": 0});
    if let (Value::Object(base), Value::Object(over)) = (&mut spec, more) {
        base.extend(over);
    }
    let fields = BTreeMap::from([("spec".to_string(), spec.to_string())]);
    downloader::store::schema::record(&new_id(), &fields).unwrap()
}

/// The failure, whether final (`false`) or retried (`true`); panics on a success.
fn failure(o: Outcome) -> (bool, DownloadError) {
    match o {
        Outcome::Fail(e) => (false, e),
        Outcome::Retry { error, .. } => (true, error),
        Outcome::Success { code, .. } => panic!("succeeded with {code}"),
    }
}

/// What fetching `url` (a job with the spec fields `more`) with [`plain_fetcher`]
/// failed with.
async fn fail_plain(url: &str, more: Value) -> (bool, DownloadError) {
    let dir = tempfile::tempdir().unwrap();
    failure(plain_fetcher(dir.path()).fetch(&job(url, more), None).await)
}

/// A server that answers every request with `response`, byte for byte.
async fn raw_origin(response: Vec<u8>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_status_is_its_reason_and_only_a_5xx_is_retried() {
    let origin = start_origin().await;
    for (code, reason, retried) in [
        (404, FailureReason::Http4xx, false),
        (500, FailureReason::Http5xx, true),
        // Neither a success nor an error (a 3xx without a Location to follow).
        (304, FailureReason::Other, false),
    ] {
        let url = origin.url(&format!("/status/{code}"));
        let (r, e) = fail_plain(&url, json!({})).await;
        assert_eq!((r, e.reason, e.code), (retried, reason, code), "{code}");
        assert_eq!(e.message, format!("Received status code {code}"));
    }
}

#[tokio::test]
async fn a_429_is_retried_with_its_retry_after() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let o = plain_fetcher(dir.path())
        .fetch(&job(&origin.url("/status/429"), json!({})), None)
        .await;
    let Outcome::Retry { error, after, host } = o else {
        panic!("{o:?}");
    };
    assert_eq!((error.reason, error.code), (FailureReason::Http429, 429));
    assert_eq!(error.message, "Received status code 429");
    assert_eq!(after, Some(Duration::ZERO));
    assert_eq!(host.as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_file_of_another_type_is_a_mime_failure_after_a_200() {
    let origin = start_origin().await;
    origin.add_file("doc.txt", b"plain text".to_vec());
    let url = origin.url("/file/doc.txt");
    let (retried, e) = fail_plain(&url, json!({"mime_type": "image/*"})).await;
    assert!(!retried);
    assert_eq!((e.reason, e.code), (FailureReason::Mime, 200));
    assert_eq!(
        e.message,
        "Expected mime-type to be (image/*), found (text/plain)"
    );
}

#[tokio::test]
async fn a_file_over_the_limit_is_too_large_by_its_length_or_as_it_streams() {
    let origin = start_origin().await;
    origin.add_file("big", vec![b'a'; 5000]);
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(
        loopback(json!({})),
        dir.path().to_path_buf(),
        1000,
        Duration::from_secs(20),
    );
    let (retried, e) = failure(
        f.fetch(&job(&origin.url("/file/big"), json!({})), None)
            .await,
    );
    assert!(!retried);
    assert_eq!((e.reason, e.code), (FailureReason::TooLarge, 200));
    assert_eq!(
        e.message,
        "file is larger than the limit of 1000 bytes (5000 bytes or more)"
    );

    // No Content-Length: counted as the body arrives.
    let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n".to_vec();
    chunked.extend([b'a'; 2000]);
    chunked.extend(b"\r\n0\r\n\r\n");
    let addr = raw_origin(chunked).await;
    let url = format!("http://{addr}/stream");
    let (retried, e) = failure(f.fetch(&job(&url, json!({})), None).await);
    assert!(!retried);
    assert_eq!((e.reason, e.code), (FailureReason::TooLarge, 200));
    assert!(
        e.message
            .starts_with("file is larger than the limit of 1000 bytes ("),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_failed_handshake_is_a_final_tls_failure() {
    let plain = start_truncating_origin().await;
    let url = format!("https://{plain}/x");
    let (retried, e) = fail_plain(&url, json!({})).await;
    assert!(!retried);
    assert_eq!((e.reason, e.code), (FailureReason::Tls, 0));
    assert!(e.message.starts_with("TLS error: "), "{}", e.message);
}

#[tokio::test]
async fn refused_addresses_redirects_and_proxies_are_address_refused() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    // The default guard: loopback is refused before any connection.
    let guarded = fetcher(
        json!({}),
        dir.path().to_path_buf(),
        1 << 20,
        Duration::from_secs(20),
    );
    let (retried, e) = failure(
        guarded
            .fetch(&job(&origin.url("/file/x"), json!({})), None)
            .await,
    );
    assert!(!retried);
    assert_eq!((e.reason, e.code), (FailureReason::AddressRefused, 0));
    assert!(
        e.message
            .starts_with("address 127.0.0.1 of 127.0.0.1 is not allowed")
            && e.message.contains("processor.allowed_networks"),
        "{}",
        e.message
    );

    // A redirect to the cloud metadata address.
    let (retried, e) = failure(
        plain_fetcher(dir.path())
            .fetch(&job(&origin.url("/redirect"), json!({})), None)
            .await,
    );
    assert!(!retried);
    assert_eq!(e.reason, FailureReason::AddressRefused);
    assert!(e.message.contains("169.254.169.254"), "{}", e.message);
    assert_eq!(origin.hits("/redirect"), 1);

    // A proxy that processor.allowed_proxies does not list.
    let listed = fetcher(
        loopback(json!({"allowed_proxies": ["http://proxy.test:3128"]})),
        dir.path().to_path_buf(),
        1 << 20,
        Duration::from_secs(20),
    );
    let (retried, e) = failure(
        listed
            .fetch(
                &job(&origin.url("/file/x"), json!({})),
                Some("http://other.test:3128"),
            )
            .await,
    );
    assert!(!retried);
    assert_eq!(e.reason, FailureReason::AddressRefused);
    assert_eq!(
        e.message,
        "aggr_proxy: http://other.test:3128: not listed in processor.allowed_proxies"
    );
}

#[tokio::test]
async fn the_transfer_timeout_and_a_silent_origin_are_timeouts() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&origin.url("/slow/5000"), json!({"download_timeout": 1}));
    let (retried, e) = failure(plain_fetcher(dir.path()).fetch(&j, None).await);
    assert!(retried);
    assert_eq!((e.reason, e.code), (FailureReason::Timeout, 0));
    assert_eq!(e.message, "download timed out after 1s");

    let quiet = fetcher(
        loopback(json!({})),
        dir.path().to_path_buf(),
        1 << 20,
        Duration::from_millis(300),
    );
    let j = job(&origin.url("/slow/5000"), json!({}));
    let (retried, e) = failure(quiet.fetch(&j, None).await);
    assert!(retried);
    assert_eq!((e.reason, e.code), (FailureReason::Timeout, 0));
    assert_eq!(
        e.message,
        "download stalled: nothing received for 0.3s before the response header (processor.read_idle_timeout)"
    );
}

#[tokio::test]
async fn a_body_shorter_than_announced_is_truncated_after_its_200() {
    let truncating = start_truncating_origin().await;
    let url = format!("http://{truncating}/file");
    let (retried, e) = fail_plain(&url, json!({})).await;
    assert!(retried);
    assert_eq!((e.reason, e.code), (FailureReason::Truncated, 200));
    assert_eq!(e.message, "unexpected EOF: got 5 of 1000 bytes");
}

#[tokio::test]
async fn a_file_that_cannot_be_written_is_a_storage_failure() {
    let origin = start_origin().await;
    origin.add_file("f", b"some bytes".to_vec());
    let dir = tempfile::tempdir().unwrap();
    // The storage root is a file: no directory can be made under it (root or not).
    let root = dir.path().join("root");
    std::fs::write(&root, b"not a directory").unwrap();
    let f = fetcher(loopback(json!({})), root, 1 << 20, Duration::from_secs(20));
    let (retried, e) = failure(f.fetch(&job(&origin.url("/file/f"), json!({})), None).await);
    assert!(retried);
    assert_eq!((e.reason, e.code), (FailureReason::Storage, 200));
    assert!(
        e.message.starts_with("cannot write file: "),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_connection_failure() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{closed}/f");
    let (retried, e) = fail_plain(&url, json!({})).await;
    assert!(retried);
    assert_eq!((e.reason, e.code), (FailureReason::Connection, 0));
    assert!(
        e.message.starts_with("error sending request"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn endless_redirects_are_a_final_other_failure() {
    let addr =
        raw_origin(b"HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n".to_vec())
            .await;
    let url = format!("http://{addr}/");
    let (retried, e) = fail_plain(&url, json!({})).await;
    assert!(!retried);
    assert_eq!((e.reason, e.code), (FailureReason::Other, 0));
    assert!(
        e.message.contains("stopped after 10 redirects"),
        "{}",
        e.message
    );
}
