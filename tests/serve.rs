//! `downloader serve`: the whole service in one process on the embedded store.

mod common;

use std::path::Path;
use std::process::Command;

use common::serve::Serve;
use common::*;
use serde_json::{Value, json};

fn embedded_config(dir: &Path) -> Value {
    json!({
        "store": {"type": "embedded", "path": dir.join("data/store.redb")},
        "processor": {"storage_dir": dir.join("data/files"), "allowed_networks": ["127.0.0.0/8"],
                      "lease_secs": 2},
        "notifier": {"deletion_interval": 60, "lease_secs": 2, "allowed_networks": ["127.0.0.0/8"]}
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_without_config_runs_on_the_embedded_store_and_guards_callbacks() {
    let dir = tempfile::tempdir().unwrap();
    let rx = start_receiver().await;
    let s = Serve::start(dir.path(), None).await;
    // Defaults refuse loopback callbacks (and origins): a job calling back to the
    // loopback is refused at submit, naming the field. (A job with an allowed callback
    // would call a private or public address, which tests never do.)
    let r = s
        .http
        .post(s.url("/download"))
        .json(&json!({"aggr_id": "a", "aggr_limit": 1, "url": "http://127.0.0.1:9/x", "callback_url": rx.url(0)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    let e = e["error"].as_str().unwrap();
    assert!(
        e.starts_with("callback_url: ") && e.contains("not allowed"),
        "{e}"
    );
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(dir.path().join("data/store.redb").exists());
    assert_eq!(rx.callbacks().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_downloads_and_serves_files_but_nothing_outside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "top secret").unwrap();
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"file body".to_vec());
    let s = Serve::start(dir.path(), Some(&embedded_config(dir.path()))).await;
    let id = s.submit(job(&origin, "/file/f", &rx.url(0), "a", 2)).await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], true, "{cb}");
    let url = cb["download_url"].as_str().unwrap();
    assert_eq!(url, s.url(&format!("/files/{}/{id}", &id[..3])));
    let body = s.http.get(url).send().await.unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(body.bytes().await.unwrap().as_ref(), b"file body");

    for path in [
        "/files/../secret.txt",
        "/files/..%2fsecret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/files//etc/passwd",
        "/files/%2fetc%2fpasswd",
        "/files/..%5csecret.txt",
        "/files/../../../../etc/passwd",
    ] {
        // Sent raw: the client must not normalise the path first.
        let r = raw_get(s.port, path).await;
        assert!(
            !r.contains("top secret") && !r.contains("root:"),
            "{path} leaked a file outside the root: {r}"
        );
        assert!(!r.starts_with("HTTP/1.1 200"), "{path}: {r}");
    }
}

/// A GET with the path exactly as given.
async fn raw_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_survives_sigkill_mid_load() {
    let dir = tempfile::tempdir().unwrap();
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let cfg = embedded_config(dir.path());
    let mut s = Serve::start(dir.path(), Some(&cfg)).await;
    let mut ids = Vec::new();
    for n in 0..100 {
        let aggr = format!("load{}", n % 4 + 1);
        ids.push(
            s.submit(job(
                &origin,
                &format!("/aggr/{aggr}/{n}"),
                &rx.url(0),
                &aggr,
                2,
            ))
            .await,
        );
    }
    eventually(30, "some callbacks", async || {
        (rx.callbacks().len() >= 10).then_some(())
    })
    .await;
    s.kill();
    let s = Serve::start(dir.path(), Some(&cfg)).await;
    eventually(60, "every job's callback after the restart", async || {
        let got: std::collections::HashSet<String> = rx
            .callbacks()
            .iter()
            .map(|c| c["job_id"].as_str().unwrap().to_string())
            .collect();
        ids.iter().all(|id| got.contains(id)).then_some(())
    })
    .await;
    for c in rx.callbacks() {
        assert_eq!(c["success"], true, "{c}");
    }
    for aggr in ["load1", "load2", "load3", "load4"] {
        assert!(origin.max_concurrency(aggr) <= 2, "{aggr} over its limit");
    }
    drop(s);
}

#[test]
fn separate_components_refuse_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, embedded_config(dir.path()).to_string()).unwrap();
    for component in ["web", "processor", "notifier"] {
        let out = Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args([component, "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{component}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("embedded store") && err.contains("serve"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_holds_rates_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"x".to_vec());
    let mut cfg = embedded_config(dir.path());
    cfg["processor"]["per_host_concurrency"] = json!(4);
    let s = Serve::start(dir.path(), Some(&cfg)).await;
    let warm = s
        .submit(job(&origin, "/file/f?warm", &rx.url(0), "warm", 1))
        .await;
    rx.wait_for(&warm, 20).await;
    origin.state.times.lock().unwrap().clear();
    // 10/s, burst 1: 31 requests take about 3 s.
    let mut ids = Vec::new();
    for i in 0..31 {
        let mut j = job(&origin, &format!("/file/f?{i}"), &rx.url(0), "emb-rate", 8);
        j["aggr_rate"] = json!(10);
        ids.push(s.submit(j).await);
    }
    for id in &ids {
        assert_eq!(rx.wait_for(id, 30).await["success"], true);
    }
    let t = origin.all_times();
    assert_eq!(t.len(), 31);
    let rate = 30.0 / (t[30] - t[0]).as_secs_f64();
    assert!(
        (9.0..=11.0).contains(&rate),
        "{rate:.2} requests/s, want 10 ± 10 %"
    );
}
