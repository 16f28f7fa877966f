//! Safe logs, request ids, request headers and `/files` symlinks, on the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{Value, json};

/// What a forged line would start with.
const FORGED: &str = "FORGED";

/// Submits a job whose `aggr_id` and `url` carry a newline, CR, NEL and an ANSI
/// escape, waits for its callback, and checks that every component's log has only
/// the escaped form.
async fn forged_lines_are_escaped(format: &str) {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"body".to_vec());
    let s = Service::start(json!({"log": {"format": format}})).await;
    let aggr = format!("a\n{FORGED} aggr\r\u{85}\x1b[31mred");
    let url = origin.url(&format!("/file/f?q=\n{FORGED} url\x1b[31m"));
    let mut j = job(&origin, "/file/f", &rx.url(0), &aggr, 1);
    j["url"] = json!(url);
    let id = s.submit(j).await;
    assert_eq!(rx.wait_for(&id, 20).await["success"], true);
    // The url and aggr_id as each format escapes them (logfmt quotes them too).
    let aggr_escaped = "a\\nFORGED aggr\\r\\u{85}\\u{1b}[31mred";
    let url_escaped = "?q=\\nFORGED url\\u{1b}[31m";
    let logs = eventually(10, "the job's lines in the processor's log", async || {
        let logs = s.logs();
        logs.lines()
            .any(|l| l.starts_with("[processor]") && l.contains(aggr_escaped))
            .then_some(logs)
    })
    .await;
    for line in logs.lines() {
        let text = line.split_once("] ").map_or(line, |(_, t)| t);
        assert!(
            !text.starts_with(FORGED) && !text.starts_with(" aggr") && !text.starts_with(" url"),
            "{format}: forged line {line:?}"
        );
        assert!(
            !line.contains(['\x1b', '\r', '\u{85}']),
            "{format}: raw control character in {line:?}"
        );
    }
    for what in [aggr_escaped, url_escaped] {
        assert!(
            logs.lines()
                .any(|l| l.starts_with("[web]") && l.contains("job submitted") && l.contains(what)),
            "{format}: no escaped {what:?} in web's log:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_log_lines_cannot_be_forged() {
    forged_lines_are_escaped("plain").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logfmt_log_lines_cannot_be_forged() {
    forged_lines_are_escaped("logfmt").await;
}

/// The `X-Request-Id` answered to a GET of `url` sending `id`.
async fn request_id(http: &reqwest::Client, url: &str, id: &str) -> String {
    let r = http
        .get(url)
        .header("x-request-id", id)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.headers()["x-request-id"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn long_request_ids_are_replaced_and_normal_ones_echoed() {
    let admin = format!("127.0.0.1:{}", free_port());
    let s = Service::start_with(json!({"processor": {"admin_addr": admin}}), &["processor"]).await;
    let admin_url = format!("http://{admin}/healthz");
    let http = s.http.clone();
    eventually(15, "the processor's admin listener", async || {
        http.get(&admin_url).send().await.ok().map(|_| ())
    })
    .await;
    let long = "x".repeat(1024);
    for url in [s.url("/hb"), admin_url.clone()] {
        assert_eq!(request_id(&s.http, &url, "req-42.a:b").await, "req-42.a:b");
        for bad in [long.as_str(), "has space", "semi;colon", "quo\"te"] {
            let got = request_id(&s.http, &url, bad).await;
            assert_ne!(got, bad, "{url}");
            assert!(
                !got.is_empty()
                    && got.len() <= 128
                    && downloader::web::is_acceptable_request_id(got.as_bytes()),
                "{url}: {got:?}"
            );
        }
        // Without one, one is made.
        let r = s.http.get(&url).send().await.unwrap();
        assert!(downloader::web::is_acceptable_request_id(
            r.headers()["x-request-id"].as_bytes()
        ));
    }
    let logs = eventually(10, "the echoed id in both logs", async || {
        let logs = s.logs();
        (logs.contains("[web]") && logs.matches("request_id=req-42.a:b").count() >= 4)
            .then_some(logs)
    })
    .await;
    assert!(!logs.contains(&"x".repeat(129)), "the long id was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_headers_are_capped_and_hop_by_hop_ones_refused() {
    let s = Service::start_with(json!({}), &[]).await;
    let body = |headers: Value| {
        json!({"aggr_id": "h", "aggr_limit": 1, "url": "http://example.com/x",
               "callback_url": "http://cb.test/", "request_headers": headers})
        .to_string()
    };
    let many = |n: usize| Value::Object((0..n).map(|i| (format!("X-H{i}"), json!("v"))).collect());

    let (st, v) = s.post_raw("/download", &body(many(32))).await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s.post_raw("/download", &body(many(33))).await;
    assert_eq!(st, 400, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("request_headers") && e.contains("32"), "{e}");

    let (st, v) = s
        .post_raw("/download", &body(json!({"Host": "internal.test"})))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"Host\""), "{v}");
    let (st, v) = s
        .post_raw("/download", &body(json!({"transfer-encoding": "chunked"})))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("transfer-encoding"),
        "{v}"
    );

    // 9 KiB over 9 headers.
    let big = Value::Object(
        (0..9)
            .map(|i| (format!("X-B{i}"), json!("v".repeat(1024))))
            .collect(),
    );
    let (st, v) = s.post_raw("/download", &body(big)).await;
    assert_eq!(st, 400, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("request_headers") && e.contains("8192"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_header_caps_follow_the_config() {
    let s = Service::start_with(
        json!({"api": {"max_request_headers": 2, "max_request_headers_bytes": 10}}),
        &[],
    )
    .await;
    let body = |headers: Value| {
        json!({"aggr_id": "h", "aggr_limit": 1, "url": "http://example.com/x",
               "callback_url": "http://cb.test/", "request_headers": headers})
        .to_string()
    };
    let (st, v) = s
        .post_raw("/download", &body(json!({"A": "1", "B": "2"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .post_raw("/download", &body(json!({"A": "1", "B": "2", "C": "3"})))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("at most 2 headers"),
        "{v}"
    );
    let (st, v) = s
        .post_raw("/download", &body(json!({"Accept": "image/png"})))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("at most 10 bytes"),
        "{v}"
    );

    // The config's own default headers refuse the same names.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let mut c = base_config(dir.path(), "test:unused", json!({}));
    c["processor"]["request_headers"] = json!({"Accept": "*/*", "Host": "internal.test"});
    std::fs::write(&cfg, c.to_string()).unwrap();
    for component in ["web", "processor"] {
        let out = Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args([component, "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{component}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("processor.request_headers.Host"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn misspelt_config_keys_are_logged_by_every_component() {
    let s = Service::start_with(
        json!({"api": {"max_request_header": 3}, "notifier": {"concurency": 3}}),
        &["processor", "notifier"],
    )
    .await;
    eventually(10, "the ignored keys' warnings", async || {
        let logs = s.logs();
        ["web", "processor", "notifier"]
            .iter()
            .all(|c| {
                let tag = format!("[{c}]");
                ["api.max_request_header", "notifier.concurency"]
                    .iter()
                    .all(|key| {
                        logs.lines().any(|l| {
                            l.starts_with(&tag)
                                && l.contains("WARN")
                                && l.contains("unknown config key ignored")
                                && l.contains(key)
                                && l.contains(&format!("component=\"{c}\""))
                        })
                    })
            })
            .then_some(())
    })
    .await;
}

/// `downloader serve` in `dir` with `config`, its log lines collected.
struct Serve {
    child: Child,
    port: u16,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    async fn start(dir: &Path, config: &Value) -> Serve {
        downloader::install_crypto_provider();
        let port = free_port();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_downloader"))
            .current_dir(dir)
            .args(["serve", "--port", &port.to_string(), "-c", "config.json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let s = Serve { child, port, logs };
        let url = s.url("/hb");
        eventually(15, "serve to answer /hb", async || {
            reqwest::get(&url).await.ok().map(|_| ())
        })
        .await;
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- serve logs ----\n{}", self.logs());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_never_follows_a_symlink_out_of_the_storage_root() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data/files");
    std::fs::create_dir_all(root.join("abc")).unwrap();
    std::fs::write(root.join("abc/abcdef"), "stored file").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "top secret").unwrap();
    std::fs::create_dir(dir.path().join("outside")).unwrap();
    std::fs::write(dir.path().join("outside/secret.txt"), "top secret").unwrap();
    symlink(dir.path().join("secret.txt"), root.join("abc/leak")).unwrap();
    symlink("/etc/passwd", root.join("passwd")).unwrap();
    symlink(dir.path().join("outside"), root.join("outdir")).unwrap();
    symlink("abcdef", root.join("abc/alias")).unwrap();
    let cfg = json!({
        "store": {"type": "embedded", "path": dir.path().join("data/store.redb")},
        "processor": {"storage_dir": root},
        // Misspelt: serve logs it too.
        "notifier": {"deletion_intervall": 5}
    });
    let s = Serve::start(dir.path(), &cfg).await;
    let http = reqwest::Client::new();

    for path in ["/files/abc/abcdef", "/files/abc/alias"] {
        let r = http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), "stored file");
    }
    for path in [
        "/files/abc/leak",
        "/files/passwd",
        "/files/outdir/secret.txt",
        "/files/outdir/",
        "/files/abc/",
        "/files/abc/missing",
    ] {
        let r = http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    eventually(10, "serve's warning about the misspelt key", async || {
        s.logs()
            .lines()
            .any(|l| {
                l.contains("unknown config key ignored")
                    && l.contains("notifier.deletion_intervall")
                    && l.contains("component=\"serve\"")
            })
            .then_some(())
    })
    .await;
}
