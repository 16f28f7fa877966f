//! Operability: log formats and fields, request ids, `/info`, signals.

mod common;

use common::*;
use serde_json::{Value, json};

/// Waits (at most `secs`) until a log line of `component` contains `needle`.
async fn wait_for_log(svc: &Service, component: &str, needle: &str, secs: u64, what: &str) {
    eventually(secs, what, async || {
        lines_of(svc, component)
            .iter()
            .any(|l| l.contains(needle))
            .then_some(())
    })
    .await;
}

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
    wait_for_log(
        &svc,
        "processor",
        "processor started",
        10,
        "the processor to start",
    )
    .await;
    svc.signal("processor", 1);
    wait_for_log(&svc, "processor", "SIGHUP", 10, "SIGHUP to be logged").await;
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
    wait_for_log(&svc, "web", &accepted, 10, "web to accept the connection").await;
    svc.signal("web", 15);
    wait_for_log(
        &svc,
        "web",
        "draining open connections",
        10,
        "web to start draining",
    )
    .await;
    s.write_all(b"GET /hb HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(svc.sigterm("web").success());
}

/// Config with admin listeners for the processor and the notifier; their base URLs.
fn admin_config(extra_processor: Value) -> (Value, String, String) {
    let (p, n) = (free_port(), free_port());
    let mut processor = json!({"admin_addr": format!("127.0.0.1:{p}")});
    if let (Value::Object(base), Value::Object(more)) = (&mut processor, extra_processor) {
        base.extend(more);
    }
    (
        json!({"processor": processor, "notifier": {"admin_addr": format!("127.0.0.1:{n}")}}),
        format!("http://127.0.0.1:{p}"),
        format!("http://127.0.0.1:{n}"),
    )
}

/// Waits until `series` at `url` satisfies `ok`; returns the whole scrape.
async fn wait_metric(url: &str, series: &str, ok: impl Fn(f64) -> bool) -> String {
    eventually(30, &format!("{series} at {url}"), async || {
        let text = scrape(url).await;
        sample(&text, series).filter(|v| ok(*v)).map(|_| text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_jobs_callbacks_and_failures_per_process() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let (extra, processor, notifier) = admin_config(json!({}));
    let svc = Service::start(extra).await;
    origin.add_file("a", vec![7u8; 1000]);
    origin.add_file("b", vec![7u8; 234]);
    let mut ids = Vec::new();
    for path in ["/file/a", "/file/b", "/status/404"] {
        ids.push(
            svc.submit(job(&origin, path, &rx.url(0), "metrics", 2))
                .await,
        );
    }
    for id in &ids {
        rx.wait_for(id, 30).await;
    }

    let web = scrape(&svc.url("/metrics")).await;
    assert_eq!(sample(&web, "downloader_jobs_submitted_total"), Some(3.0));
    assert_eq!(sample(&web, "downloader_jobs_started_total"), Some(0.0));

    let p = wait_metric(
        &format!("{processor}/metrics"),
        "downloader_download_duration_seconds_count",
        |v| v == 3.0,
    )
    .await;
    for (series, want) in [
        ("downloader_jobs_submitted_total", 0.0),
        ("downloader_jobs_started_total", 3.0),
        ("downloader_jobs_succeeded_total", 2.0),
        ("downloader_jobs_failed_total{reason=\"http_4xx\"}", 1.0),
        ("downloader_jobs_failed_total{reason=\"mime\"}", 0.0),
        ("downloader_downloaded_bytes_total", 1234.0),
        ("downloader_claims_paused", 0.0),
    ] {
        assert_eq!(sample(&p, series), Some(want), "{series} in\n{p}");
    }
    // A download leaves the gauge after it recorded its result (which the
    // callback may already have followed).
    wait_metric(
        &format!("{processor}/metrics"),
        "downloader_downloads_in_flight",
        |v| v == 0.0,
    )
    .await;
    assert!(sample(&p, "downloader_process_open_fds").unwrap() > 3.0);
    assert!(sample(&p, "downloader_process_resident_memory_bytes").unwrap() > 1e6);
    assert!(sample(&p, "downloader_tasks_live").unwrap() >= 1.0);
    assert!(sample(&p, "downloader_storage_used_percent").unwrap() > 0.0);

    let n = wait_metric(
        &format!("{notifier}/metrics"),
        "downloader_callbacks_delivered_total",
        |v| v == 3.0,
    )
    .await;
    assert_eq!(
        sample(&n, "downloader_callback_duration_seconds_count"),
        Some(3.0)
    );
    assert_eq!(sample(&n, "downloader_callbacks_failed_total"), Some(0.0));
    // The delivery is counted before it is recorded; the in-flight guard goes after.
    wait_metric(
        &format!("{notifier}/metrics"),
        "downloader_callbacks_in_flight",
        |v| v == 0.0,
    )
    .await;

    // The admin listeners also answer /healthz and /info.
    for (base, component) in [(&processor, "processor"), (&notifier, "notifier")] {
        let get = async |path: &str| -> Value {
            let r = svc.http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{base}{path}");
            r.json().await.unwrap()
        };
        let h = get("/healthz").await;
        assert_eq!(h["status"], "ok", "{h}");
        let i = get("/info").await;
        assert_eq!(i["components"], json!([component]), "{i}");
    }
    let (st, h) = svc.get("/healthz").await;
    assert_eq!((st, &h["status"]), (200, &json!("ok")), "{h}");
}

/// The reason a failed download is counted under is the one the failure was made
/// with, through the whole processor: a thumbnail failure (made by the processor, not
/// the fetcher), a MIME failure, a 5xx that ran out of retries and one that was
/// retried.
#[tokio::test(flavor = "multi_thread")]
async fn each_failed_download_is_counted_under_its_reason() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let (extra, processor, _) = admin_config(json!({"retry_backoff_ms": 100}));
    let svc = Service::start(extra).await;
    origin.add_file("doc.txt", b"plain text, not an image".to_vec());
    let mut thumbs = job(&origin, "/file/doc.txt", &rx.url(0), "reasons", 4);
    thumbs["thumbnails"] = json!([{"name": "s", "width": 100, "height": 100}]);
    let mut mime = job(&origin, "/file/doc.txt", &rx.url(0), "reasons", 4);
    mime["mime_type"] = json!("image/*");
    let mut failing = job(&origin, "/flaky/100/reasons", &rx.url(0), "reasons", 4);
    failing["max_retries"] = json!(0);
    let mut flaky = job(&origin, "/flaky/1/reasons", &rx.url(0), "reasons", 4);
    flaky["max_retries"] = json!(1);
    let mut ids = Vec::new();
    for j in [thumbs, mime, failing, flaky] {
        ids.push(svc.submit(j).await);
    }
    let mut errors = Vec::new();
    for id in &ids {
        errors.push(rx.wait_for(id, 30).await["error"].clone());
    }
    assert!(
        errors[0].as_str().unwrap().starts_with("thumbnail s: "),
        "{errors:?}"
    );
    assert_eq!(
        errors[1..],
        [
            json!("Expected mime-type to be (image/*), found (text/plain)"),
            json!("Received status code 500"),
            json!(""),
        ]
    );
    let p = wait_metric(
        &format!("{processor}/metrics"),
        "downloader_jobs_succeeded_total",
        |v| v == 1.0,
    )
    .await;
    for (series, want) in [
        ("downloader_jobs_failed_total{reason=\"thumbnail\"}", 1.0),
        ("downloader_jobs_failed_total{reason=\"mime\"}", 1.0),
        ("downloader_jobs_failed_total{reason=\"http_5xx\"}", 1.0),
        (
            "downloader_download_retries_total{reason=\"http_5xx\"}",
            1.0,
        ),
        ("downloader_jobs_failed_total{reason=\"other\"}", 0.0),
        (
            "downloader_download_retries_total{reason=\"thumbnail\"}",
            0.0,
        ),
    ] {
        assert_eq!(sample(&p, series), Some(want), "{series} in\n{p}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_stops_claims_until_it_is_below_the_low_watermark() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    // Marks below this filesystem's usage: to the processor the disk is "full".
    let probe = tempfile::tempdir().unwrap();
    let used = downloader::disk::used_percent(probe.path()).unwrap();
    assert!(used > 0.1, "the test filesystem is empty ({used} %)");
    let (extra, processor, _) = admin_config(json!({
        "disk_high_watermark_percent": used / 2.0,
        "disk_low_watermark_percent": used / 4.0,
        "disk_check_interval_ms": 100,
    }));
    let mut svc = Service::start(extra).await;
    let metrics = format!("{processor}/metrics");
    wait_metric(&metrics, "downloader_claims_paused", |v| v == 1.0).await;
    wait_for_log(
        &svc,
        "processor",
        "above the high watermark: claiming no new downloads",
        10,
        "the pause to be logged",
    )
    .await;

    origin.add_file("f", b"x".to_vec());
    let mut ids = Vec::new();
    for i in 0..12 {
        let aggr = format!("full-{i:02}");
        ids.push(
            svc.submit(job(&origin, "/file/f", &rx.url(0), &aggr, 1))
                .await,
        );
    }
    // The processor looks at the disk three more times; nothing is claimed meanwhile.
    let checks = sample(&scrape(&metrics).await, "downloader_disk_checks_total").unwrap();
    wait_metric(&metrics, "downloader_disk_checks_total", |v| {
        v >= checks + 3.0
    })
    .await;
    for id in &ids {
        let j = svc.job(id).await;
        assert_eq!(j["download_state"], "Pending", "{j}");
    }
    assert_eq!(origin.hits("/file/f"), 0);
    assert_eq!(
        sample(&scrape(&metrics).await, "downloader_jobs_started_total"),
        Some(0.0)
    );

    // Pending jobs are store-wide and only the ten busiest aggregations get a series.
    let web = scrape(&svc.url("/metrics")).await;
    assert_eq!(sample(&web, "downloader_jobs_pending"), Some(12.0), "{web}");
    assert_eq!(sample(&web, "downloader_aggregations_pending"), Some(12.0));
    let per_aggr = web
        .lines()
        .filter(|l| l.starts_with("downloader_jobs_pending_by_aggregation{"))
        .count();
    assert_eq!(per_aggr, 10, "{web}");

    // Below the low watermark again (a restart with higher marks): claims resume.
    assert!(svc.sigterm("processor").success());
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&svc.config).unwrap()).unwrap();
    let p = cfg["processor"].as_object_mut().unwrap();
    // Marks no real filesystem is above (the defaults would fail on a full CI disk).
    p.insert("disk_high_watermark_percent".into(), json!(100.0));
    p.insert("disk_low_watermark_percent".into(), json!(99.9));
    std::fs::write(&svc.config, serde_json::to_vec(&cfg).unwrap()).unwrap();
    svc.spawn("processor", &["processor"]);
    for id in &ids {
        assert_eq!(rx.wait_for(id, 30).await["success"], true);
    }
    assert_eq!(
        sample(&scrape(&metrics).await, "downloader_claims_paused"),
        Some(0.0)
    );
}

/// Process gauges that must come back to their idle values after a load.
fn idle_gauges(text: &str) -> [f64; 3] {
    [
        "downloader_tasks_live",
        "downloader_process_open_fds",
        "downloader_http_connections_open",
    ]
    .map(|s| sample(text, s).unwrap_or_else(|| panic!("{s} missing in\n{text}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_tasks_fds_or_connections_leak_under_load() {
    use axum::http::header::CONNECTION;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    // Origin and receiver close every connection after answering: a client pool that
    // keeps idle connections (bounded by its idle timeout) is not a leak, and would
    // blur one.
    let origin = serve_local(axum::Router::new().route(
        "/f/{n}",
        axum::routing::get(|| async { ([(CONNECTION, "close")], vec![1u8; 2048]) }),
    ))
    .await;
    let delivered = Arc::new(Mutex::new(HashSet::<String>::new()));
    let receiver = {
        let d = delivered.clone();
        serve_local(axum::Router::new().route(
            "/cb",
            axum::routing::post(move |body: axum::Json<Value>| {
                let d = d.clone();
                async move {
                    let id = body["job_id"].as_str().unwrap_or_default().to_string();
                    d.lock().unwrap().insert(id);
                    [(CONNECTION, "close")]
                }
            }),
        ))
        .await
    };
    let (mut extra, processor, notifier) = admin_config(json!({}));
    // Idle keep-alive connections (the harness's own client keeps one) are closed after
    // the header timeout: a short one lets the test expect exactly the scrape's own.
    extra["api"] = json!({"header_timeout_secs": 2});
    let svc = Service::start(extra).await;
    let endpoints = [
        svc.url("/metrics"),
        format!("{processor}/metrics"),
        format!("{notifier}/metrics"),
    ];
    // Idle: no connection but the scrape's own.
    for e in &endpoints {
        wait_metric(e, "downloader_http_connections_open", |v| v == 1.0).await;
    }
    // Idle baseline: the lowest of a few scrapes (each on its own connection).
    let mut baseline = Vec::new();
    for e in &endpoints {
        let mut low = [f64::MAX; 3];
        for _ in 0..3 {
            let g = idle_gauges(&scrape(e).await);
            for k in 0..3 {
                low[k] = low[k].min(g[k]);
            }
        }
        // Connections: only the scrape's own, whatever the scrapes above left behind.
        low[2] = 1.0;
        baseline.push(low);
    }

    // Load: 150 jobs over 6 aggregations, API clients on keep-alive connections,
    // connections that never send a byte and connections that stop mid-header.
    let jobs = 150;
    let submitter = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..jobs {
        let r = submitter
            .post(svc.url("/download"))
            .json(&json!({
                "aggr_id": format!("leak-{}", i % 6),
                "aggr_limit": 4,
                "url": format!("http://{origin}/f/{i}"),
                "callback_url": format!("http://{receiver}/cb"),
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let mut clients = tokio::task::JoinSet::new();
    for id in ids.iter().take(30) {
        let urls: Vec<String> = [
            svc.url(&format!("/jobs/{id}")),
            svc.url("/hb"),
            svc.url("/info"),
            svc.url("/dashboard/aggregations"),
            format!("{processor}/healthz"),
            format!("{notifier}/info"),
        ]
        .into();
        clients.spawn(async move {
            let http = reqwest::Client::new();
            for _ in 0..5 {
                for u in &urls {
                    assert!(http.get(u).send().await.unwrap().status().is_success());
                }
            }
        });
    }
    let mut raw = Vec::new();
    for i in 0..30 {
        let mut s = tokio::net::TcpStream::connect(svc.web_addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /hb HTTP/1.1\r\nHo").await.unwrap();
        }
        raw.push(s);
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    eventually(60, "every callback", async || {
        (delivered.lock().unwrap().len() == jobs).then_some(())
    })
    .await;
    drop(raw);
    drop(submitter);

    for (e, base) in endpoints.iter().zip(&baseline) {
        let mut last = [0.0; 3];
        let settled = eventually(
            30,
            &format!("{e} back to its idle baseline {base:?}"),
            async || {
                last = idle_gauges(&scrape(e).await);
                (0..3).all(|k| last[k] <= base[k]).then_some(last)
            },
        )
        .await;
        assert!(settled[2] >= 1.0, "the scrape's own connection is counted");
    }
    // And the service still works.
    let p = scrape(&format!("{processor}/metrics")).await;
    assert_eq!(
        sample(&p, "downloader_jobs_succeeded_total"),
        Some(jobs as f64)
    );
}

/// A private Redis, killed when dropped.
struct PrivateRedis(std::process::Child);

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (the tests need Redis installed)");
        PrivateRedis(child)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_fails_while_the_store_is_unreachable() {
    let port = free_port();
    let redis = PrivateRedis::start(port);
    let addr = format!("127.0.0.1:{port}");
    eventually(10, "the private Redis to listen", async || {
        tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ())
    })
    .await;
    let svc = Service::start_with(json!({"redis": {"addr": addr, "timeout_ms": 1000}}), &[]).await;
    let (st, h) = svc.get("/healthz").await;
    assert_eq!(st, 200, "{h}");
    drop(redis);
    let h = eventually(20, "/healthz to say unhealthy", async || {
        let (st, h) = svc.get("/healthz").await;
        (st == 503).then_some(h)
    })
    .await;
    assert_eq!(h["status"], "unhealthy", "{h}");
    assert!(h["error"].as_str().unwrap().contains("store"), "{h}");
    let _redis = PrivateRedis::start(port);
    eventually(20, "/healthz to recover with the store", async || {
        (svc.get("/healthz").await.0 == 200).then_some(())
    })
    .await;
}

#[test]
fn bad_admin_and_disk_keys_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.json");
    for (text, key) in [
        (
            r#"{"redis": {}, "processor": {"admin_addr": "nowhere"}}"#,
            "processor.admin_addr",
        ),
        (
            r#"{"redis": {}, "processor": {"disk_high_watermark_percent": 0}}"#,
            "processor.disk_high_watermark_percent",
        ),
        (
            r#"{"redis": {}, "processor": {"disk_high_watermark_percent": 80, "disk_low_watermark_percent": 85}}"#,
            "processor.disk_low_watermark_percent",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args(["processor", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not named in {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_pooled_connection_does_not_hold_shutdown() {
    let mut svc = Service::start_with(json!({}), &[]).await;
    // A client pool opened it ahead of need and never sent a byte.
    let s = tokio::net::TcpStream::connect(svc.web_addr).await.unwrap();
    let accepted = format!("connection accepted peer={}", s.local_addr().unwrap());
    wait_for_log(&svc, "web", &accepted, 10, "web to accept the connection").await;
    let t = std::time::Instant::now();
    assert!(svc.sigterm("web").success());
    // Not the 30 s header timeout: a second after its accept it is closed.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    drop(s);
}
