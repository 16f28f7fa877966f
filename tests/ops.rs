//! Operability: log formats and fields, request ids, `/info`, signals.

mod common;

use common::*;
use serde_json::{Value, json};

/// Log lines of one component, without the harness's `[name] ` tag.
fn lines_of(svc: &Service, component: &str) -> Vec<String> {
    let tag = format!("[{component}] ");
    svc.logs()
        .lines()
        .filter_map(|l| l.strip_prefix(&tag).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_component_host_and_job_id() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"log": {"format": "json"}})).await;
    origin.add_file("f", b"x".to_vec());
    let id = svc
        .submit(job(&origin, "/file/f", &rx.url(0), "logs", 1))
        .await;
    rx.wait_for(&id, 20).await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lines = eventually(10, "the processor's log line about the job", async || {
        let lines = lines_of(&svc, "processor");
        lines.iter().any(|l| l.contains(&id)).then_some(lines)
    })
    .await;
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
    }
    let about_job: Vec<Value> = lines
        .iter()
        .filter(|l| l.contains(&id))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let v = &about_job[0];
    let spans = v["spans"].as_array().unwrap();
    assert_eq!(spans[0]["component"], "processor", "{v}");
    assert_eq!(spans[0]["host"], host.trim(), "{v}");
    assert!(
        spans
            .iter()
            .any(|s| s["job_id"] == id.as_str() && s["aggr_id"] == "logs"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logfmt_logs() {
    let svc = Service::start_with(json!({"log": {"format": "logfmt"}}), &[]).await;
    svc.get("/hb").await;
    let lines = eventually(10, "web log lines", async || {
        let l = lines_of(&svc, "web");
        l.iter()
            .any(|l| l.contains("request finished"))
            .then_some(l)
    })
    .await;
    let l = lines
        .iter()
        .find(|l| l.contains("request finished"))
        .unwrap();
    for field in [
        "level=info",
        "component=web",
        "status=200",
        "request_id=",
        "path=/hb",
    ] {
        assert!(l.contains(field), "{field} missing in {l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_kept_or_made_and_echoed() {
    let svc = Service::start_with(json!({}), &[]).await;
    let r = svc
        .http
        .get(svc.url("/hb"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let a = svc.http.get(svc.url("/hb")).send().await.unwrap();
    let b = svc.http.get(svc.url("/hb")).send().await.unwrap();
    let (a, b) = (&a.headers()["x-request-id"], &b.headers()["x-request-id"]);
    assert!(!a.is_empty() && a != b, "{a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn info_reports_version_components_and_store() {
    let svc = Service::start_with(json!({}), &[]).await;
    let (st, v) = svc.get("/info").await;
    assert_eq!(st, 200);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["commit"].as_str().unwrap().len() >= 7, "{v}");
    assert!(v["build_date"].as_str().unwrap().len() == 10, "{v}");
    assert_eq!(v["components"], json!(["web"]));
    assert_eq!(v["store"], "redis");
    assert!(v["host"].is_string() && v["uptime_secs"].is_u64() && v["started_at"].is_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_is_logged_and_ignored() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start(json!({})).await;
    eventually(10, "the processor to start", async || {
        lines_of(&svc, "processor")
            .iter()
            .any(|l| l.contains("processor started"))
            .then_some(())
    })
    .await;
    svc.signal("processor", 1);
    eventually(10, "SIGHUP to be logged", async || {
        lines_of(&svc, "processor")
            .iter()
            .any(|l| l.contains("SIGHUP"))
            .then_some(())
    })
    .await;
    assert!(svc.alive("processor"));
    origin.add_file("f", b"x".to_vec());
    let id = svc
        .submit(job(&origin, "/file/f", &rx.url(0), "hup", 1))
        .await;
    assert_eq!(rx.wait_for(&id, 20).await["success"], true);
}

#[test]
fn a_bad_log_level_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.json");
    std::fs::write(&cfg, r#"{"redis": {}, "log": {"level": "loud=="}}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"))
        .args(["processor", "-c"])
        .arg(&cfg)
        .env_remove("DOWNLOADER_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log.level"));
    std::fs::write(&cfg, r#"{"redis": {}, "log": {"format": "xml"}}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"))
        .args(["processor", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log.format"));
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_on_an_activated_socket_loses_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let mut svc = Service::start_with(json!({}), &[]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hb", listener.local_addr().unwrap());
    svc.spawn_activated("web-a", &["web"], &listener);

    let (ok, failed, stop) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let client = {
        let (ok, failed, stop, url) = (ok.clone(), failed.clone(), stop.clone(), url.clone());
        tokio::spawn(async move {
            // A new connection per request, as most load balancers' health checks.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(std::time::Duration::from_secs(15))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    eventually(15, "requests to succeed", async || {
        (ok.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    assert!(svc.sigterm("web-a").success());
    let before = ok.load(Ordering::Relaxed);
    svc.spawn_activated("web-b", &["web"], &listener);
    eventually(15, "the new server to answer", async || {
        (ok.load(Ordering::Relaxed) >= before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the restart"
    );
}

/// Reads from `s` until the server closes the connection (or 15 s pass); returns what came.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open for 15 s");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let svc = Service::start_with(
        json!({"api": {"header_timeout_secs": 1, "body_timeout_secs": 1}}),
        &[],
    )
    .await;
    let connect = || tokio::net::TcpStream::connect(svc.web_addr);

    // Slowloris: half a header, then silence.
    let mut s = connect().await.unwrap();
    let t = std::time::Instant::now();
    s.write_all(b"GET /hb HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    read_until_closed(&mut s).await;
    assert!(t.elapsed().as_secs_f64() >= 0.9, "{:?}", t.elapsed());

    // An idle keep-alive connection after one answered request.
    let mut s = connect().await.unwrap();
    s.write_all(b"GET /hb HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // A body that stalls: 408 with a JSON error.
    let mut s = connect().await.unwrap();
    s.write_all(
        b"POST /download HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"aggr_id\"",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains(r#"{"error":"request body timed out"#), "{got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_answers_a_connection_accepted_before_its_request() {
    use tokio::io::AsyncWriteExt;
    let mut svc = Service::start_with(json!({}), &[]).await;
    // Connected (and accepted) but not a byte sent when SIGTERM arrives: the request
    // that follows must still be answered, not dropped with the connection.
    let mut s = tokio::net::TcpStream::connect(svc.web_addr).await.unwrap();
    let accepted = format!("connection accepted peer={}", s.local_addr().unwrap());
    eventually(10, "web to accept the connection", async || {
        lines_of(&svc, "web")
            .iter()
            .any(|l| l.contains(&accepted))
            .then_some(())
    })
    .await;
    svc.signal("web", 15);
    eventually(10, "web to start draining", async || {
        lines_of(&svc, "web")
            .iter()
            .any(|l| l.contains("draining open connections"))
            .then_some(())
    })
    .await;
    s.write_all(b"GET /hb HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(svc.sigterm("web").success());
}
