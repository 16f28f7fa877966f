//! The HTTP server's bounds against hostile clients, on the real `web` binary: the body
//! budget (`api.max_inflight_body_bytes`), the total body deadline, the response write
//! deadline and the connection cap (`api.max_connections`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every socket operation of these tests gives up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

async fn connect(svc: &Service) -> TcpStream {
    tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(svc.web_addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn send(s: &mut TcpStream, bytes: &[u8]) {
    tokio::time::timeout(IO_TIMEOUT, s.write_all(bytes))
        .await
        .expect("write in time")
        .expect("write");
}

/// Reads until the server closes the connection (failing after `IO_TIMEOUT`).
async fn read_until_closed(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {IO_TIMEOUT:?}"
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// Log lines of `web` containing every one of `needles`.
fn web_lines(svc: &Service, needles: &[&str]) -> usize {
    svc.logs()
        .lines()
        .filter(|l| l.starts_with("[web] ") && needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Waits until `web` has logged the start of `n` requests to `path`.
async fn wait_requests_started(svc: &Service, path: &str, n: usize) {
    let field = format!("path={path}");
    eventually(
        15,
        &format!("{n} requests to {path} in the service"),
        async || (web_lines(svc, &["request started", &field]) >= n).then_some(()),
    )
    .await;
}

/// Waits until `web` has logged the accept of the connection whose local end is `s`.
async fn wait_accepted(svc: &Service, s: &TcpStream) {
    let needle = format!("connection accepted peer={}", s.local_addr().unwrap());
    eventually(15, "the connection to be accepted", async || {
        (web_lines(svc, &[&needle]) > 0).then_some(())
    })
    .await;
}

fn refused(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("downloader_http_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no {reason} refusals series in\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_body_budget_refuses_at_once_and_is_given_back_when_bodies_are_dropped() {
    const BODY: usize = 2 << 20;
    let svc = Service::start_with(json!({"api": {"max_inflight_body_bytes": 3 * BODY}}), &[]).await;
    let head = format!(
        "POST /thumbnail?width=10&height=10 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {BODY}\r\n\r\n"
    );
    // Three bodies that take the whole budget, half sent, then silence.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = connect(&svc).await;
        send(&mut s, head.as_bytes()).await;
        send(&mut s, &vec![0u8; BODY / 2]).await;
        stalled.push(s);
    }
    wait_requests_started(&svc, "/thumbnail", 3).await;

    // A fourth is refused at once, not after a body timeout (30 s).
    let t = Instant::now();
    let mut s = connect(&svc).await;
    send(&mut s, head.as_bytes()).await;
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    let lower = got.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1\r\n"), "{got}");
    assert!(lower.contains("connection: close\r\n"), "{got}");
    assert!(got.contains("api.max_inflight_body_bytes"), "{got}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refused after {:?}",
        t.elapsed()
    );
    // A body that could never fit is a 413, not a 503 to retry.
    let mut s = connect(&svc).await;
    let huge = head.replace(&BODY.to_string(), &(4 * BODY).to_string());
    send(&mut s, huge.as_bytes()).await;
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");

    // Once the stalled clients are gone, their bytes are back: a whole body is taken
    // (it is no image: the thumbnailer, not the budget, refuses it).
    drop(stalled);
    let http = reqwest::Client::builder()
        .timeout(IO_TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = svc.url("/thumbnail?width=10&height=10");
    let (status, body) = eventually(15, "a body accepted again", async || {
        let r = http.post(&url).body(vec![0u8; BODY]).send().await.ok()?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.ok()?;
        (status != 503).then_some((status, body))
    })
    .await;
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(
        !body["error"]
            .as_str()
            .unwrap()
            .contains("max_inflight_body_bytes"),
        "{body}"
    );
    let m = scrape(&svc.url("/metrics")).await;
    assert!(refused(&m, "body_budget") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickling_body_is_cut_off_at_its_total_deadline() {
    // A byte a second never stalls past the per-gap timeout (30 s), but the whole
    // body must be in within 2 s.
    let svc = Service::start_with(json!({"api": {"body_total_timeout_secs": 2}}), &[]).await;
    let s = connect(&svc).await;
    let (mut rd, mut wr) = s.into_split();
    tokio::time::timeout(
        IO_TIMEOUT,
        wr.write_all(
            b"POST /download HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match tokio::time::timeout(IO_TIMEOUT, wr.write_all(b" ")).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
    let t = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(IO_TIMEOUT, rd.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the server kept the trickling body for {IO_TIMEOUT:?}"
    );
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("api.body_total_timeout_secs"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close\r\n"),
        "{got}"
    );
    // Closed well before the per-gap timeout could have fired.
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    trickle.abort();
    let _ = trickle.await;
    let m = scrape(&svc.url("/metrics")).await;
    assert_eq!(refused(&m, "body_deadline"), 1.0, "{m}");
}

/// A small PNG.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_read_its_response_is_dropped() {
    let svc = Service::start_with(json!({"api": {"response_timeout_secs": 2}}), &[]).await;
    let metrics = svc.url("/metrics");
    // Open now: the scrape's own, and the harness's pooled one if it is still there.
    let before = sample(&scrape(&metrics).await, "downloader_http_connections_open").unwrap();
    // Small receive buffer: the client's kernel takes little of the response for it.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 << 10).unwrap();
    let mut s = tokio::time::timeout(IO_TIMEOUT, sock.connect(svc.web_addr))
        .await
        .unwrap()
        .unwrap();
    // A 3000x3000 BMP: 27 MB of response for 64x64 pixels of request.
    let img = png();
    let head = format!(
        "POST /thumbnail?width=3000&height=3000&fit=fill&format=bmp&enlarge=true HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        img.len()
    );
    send(&mut s, head.as_bytes()).await;
    send(&mut s, &img).await;
    // Nothing read: the server gives up on the write and closes.
    eventually(60, "the response write to time out", async || {
        let m = scrape(&metrics).await;
        let open = sample(&m, "downloader_http_connections_open")?;
        (refused(&m, "write_deadline") == 1.0 && open <= before).then_some(())
    })
    .await;
    // The socket is closed (reset): reading ends at once, well short of the response.
    let got = read_until_closed(&mut s).await;
    assert!(got.len() < 27_000_000, "{} bytes came", got.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_closes_idle_connections_keeps_hb_and_refuses_beyond() {
    let svc = Service::start_with(json!({"api": {"max_connections": 8}}), &[]).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        let s = connect(&svc).await;
        wait_accepted(&svc, &s).await;
        idle.push(s);
    }
    // All slots hold idle connections: a new one takes the slot of the oldest.
    let mut s = connect(&svc).await;
    send(
        &mut s,
        b"GET /jobs/AAAAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    let oldest = read_until_closed(&mut idle[0]).await;
    assert!(oldest.is_empty(), "{oldest}");
    drop(idle);
    let metrics = svc.url("/metrics");
    let m = eventually(15, "the idle connections to close", async || {
        let m = scrape(&metrics).await;
        (sample(&m, "downloader_http_connections_open")? == 1.0).then_some(m)
    })
    .await;
    assert!(
        sample(&m, "downloader_http_idle_closed_total").unwrap() >= 1.0,
        "{m}"
    );

    // Every slot busy with a request (bodies that stall): a new connection may only ask
    // for /hb or /healthz.
    let mut busy = Vec::new();
    for _ in 0..8 {
        let mut s = connect(&svc).await;
        send(
            &mut s,
            b"POST /download HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await;
        busy.push(s);
    }
    wait_requests_started(&svc, "/download", 8).await;
    let mut s = connect(&svc).await;
    send(
        &mut s,
        b"GET /dashboard/aggregations HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("answers only /hb and /healthz"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{got}"
    );
    let t = Instant::now();
    let mut s = connect(&svc).await;
    send(&mut s, b"GET /hb HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("OK"), "{got}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // The health reserve held too (8 silent connections): the next one is told so
    // on its socket at once and closed.
    let mut reserve = Vec::new();
    for _ in 0..8 {
        let s = connect(&svc).await;
        wait_accepted(&svc, &s).await;
        reserve.push(s);
    }
    let mut s = connect(&svc).await;
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("api.max_connections"), "{got}");
    drop(reserve);
    drop(busy);
    let m = eventually(
        15,
        "every connection but the scrape's to close",
        async || {
            let m = scrape(&metrics).await;
            (sample(&m, "downloader_http_connections_open")? == 1.0).then_some(m)
        },
    )
    .await;
    assert!(refused(&m, "connections") >= 2.0, "{m}");
}
