//! The callbacks' address guard (`notifier.allowed_networks`): refused at submit when
//! the URL alone says so, refused at delivery (without a connection) for every address
//! a receiver resolves to, never through a redirect; on Redis (three processes) and
//! under `serve` (embedded store).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::serve::Serve;
use common::*;
use serde_json::{Value, json};

/// Loopback spellings a callback URL may use for the listener on port `p` (IPv4) and
/// `p6` (IPv6): the URL parser reads the first ones as 127.0.0.1 (decimal, hex, octal,
/// short forms), then IPv6 forms carrying 127.0.0.1, then names that are the loopback
/// whatever DNS says (RFC 6761), with trailing dots and in capitals.
fn loopback_spellings(p: u16, p6: u16) -> Vec<String> {
    [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:0:127.0.0.1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "localhost",
        "localhost.",
        "LocalHost.",
        "api.localhost",
        "api.localhost.",
    ]
    .iter()
    .map(|h| format!("http://{h}:{p}/cb"))
    .chain([format!("http://[::1]:{p6}/cb")])
    .collect()
}

/// A listener that counts the connections it accepts (and answers 200, so that a
/// connection the guard let through would also show as a delivered callback).
async fn counting_listener(bind: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            seen.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                        .await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, n)
}

/// Serves `app` on `bind` (such as 127.0.0.2:0) for the rest of the test.
async fn serve_on(bind: &str, app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A receiver whose `/ok/{key}` answers 200 and whose `/redirect/{code}/{to}` answers
/// `code` with `Location: http://{to}/moved`; counts requests per path.
#[derive(Default)]
struct Redirector {
    hits: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

async fn redirector(bind: &str) -> (SocketAddr, Arc<Redirector>) {
    async fn ok(State(s): State<Arc<Redirector>>, UrlPath(key): UrlPath<String>) -> StatusCode {
        *s.hits
            .lock()
            .unwrap()
            .entry(format!("/ok/{key}"))
            .or_default() += 1;
        StatusCode::OK
    }
    async fn redirect(
        State(s): State<Arc<Redirector>>,
        UrlPath((code, to)): UrlPath<(u16, String)>,
    ) -> Response {
        *s.hits
            .lock()
            .unwrap()
            .entry(format!("/redirect/{code}/{to}"))
            .or_default() += 1;
        (
            StatusCode::from_u16(code).unwrap(),
            [("location", format!("http://{to}/moved"))],
        )
            .into_response()
    }
    let state = Arc::new(Redirector::default());
    let app = Router::new()
        .route("/ok/{key}", post(ok))
        .route("/redirect/{code}/{to}", post(redirect))
        .with_state(state.clone());
    (serve_on(bind, app).await, state)
}

impl Redirector {
    fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn job_to(origin: &Origin, cb: &str) -> Value {
    job(origin, "/file/f", cb, "cbguard", 8)
}

async fn submit_status(http: &reqwest::Client, base: &str, body: &Value) -> (u16, Value) {
    let r = http
        .post(format!("{base}/download"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Asserts a 400 naming `field` and the notifier's key.
fn assert_refused(st: u16, v: &Value, field: &str, what: &str) {
    assert_eq!(st, 400, "{what}: {v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with(&format!("{field}: ")) && e.contains("not allowed"),
        "{what}: {e}"
    );
    assert!(e.contains("notifier.allowed_networks"), "{what}: {e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn callback_urls_the_notifier_would_refuse_are_a_400_at_submit() {
    // Web alone, with the default callback networks (the base config opens loopback).
    let svc = Service::start_with(json!({"notifier": {"allowed_networks": null}}), &[]).await;
    let base = svc.url("");
    let body = |cb: &str| json!({"aggr_id": "g", "aggr_limit": 1, "url": "http://files.example/f", "callback_url": cb});
    let mut refused = loopback_spellings(8080, 8080);
    refused.extend(
        [
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:169.254.169.254]/",
            "http://[fd00:ec2::254]/latest/meta-data/",
            "http://100.100.100.200/latest/meta-data/",
            "http://0.0.0.0/",
            "http://[::]/",
            "http://[fe80::1]/",
            "http://224.0.0.1/",
            "http://[ff02::1]/",
            "http://192.0.2.1/",
            "http://[2001:db8::1]/",
            "http://240.0.0.1/",
            "https://127.0.0.1/",
        ]
        .map(String::from),
    );
    for cb in &refused {
        let (st, v) = submit_status(&svc.http, &base, &body(cb)).await;
        assert_refused(st, &v, "callback_url", cb);
    }
    // The other spelling of the destination is named as given.
    let (st, v) = submit_status(
        &svc.http,
        &base,
        &json!({"aggr_id": "g", "aggr_limit": 1, "url": "http://files.example/f",
                "callback_type": "http", "callback_dst": "http://0x7f000001:81/"}),
    )
    .await;
    assert_refused(st, &v, "callback_dst", "callback_dst");
    // Private networks are where receivers live: accepted by default (nothing runs
    // these jobs: no processor, no notifier). Names are judged when they are resolved.
    for cb in [
        "http://10.1.2.3/cb",
        "http://172.16.5.4:8080/cb",
        "http://192.168.0.10/cb",
        "http://[fd12:3456::1]/cb",
        "https://receiver.example.com/cb",
    ] {
        let (st, v) = submit_status(&svc.http, &base, &body(cb)).await;
        assert_eq!(st, 201, "{cb}: {v}");
    }
    drop(svc);

    // Web judges with the notifier's list, not the processor's (which opens loopback
    // in the base config): `[]` is public addresses only.
    let svc = Service::start_with(json!({"notifier": {"allowed_networks": []}}), &[]).await;
    let base = svc.url("");
    for cb in ["http://10.1.2.3/cb", "http://127.0.0.1:9/cb"] {
        let (st, v) = submit_status(&svc.http, &base, &body(cb)).await;
        assert_refused(st, &v, "callback_url", cb);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_callbacks_fail_at_once_without_a_connection() {
    // Web and the processor run with the base config (callbacks may reach loopback);
    // the notifier with the default callback networks, as after a config change: it
    // judges every callback again when it connects.
    let mut svc =
        Service::start_with(json!({"notifier": {"callback_retries": 2}}), &["processor"]).await;
    let mut ncfg = svc.config_json();
    ncfg["notifier"]
        .as_object_mut()
        .unwrap()
        .remove("allowed_networks");
    svc.spawn_with_config("notifier", &["notifier"], &ncfg);
    let origin = start_origin().await;
    origin.add_file("f", b"downloaded, then its callback refused".to_vec());
    let (v4, hits4) = counting_listener("127.0.0.1:0").await;
    let (v6, hits6) = counting_listener("[::1]:0").await;
    let mut ids = Vec::new();
    for cb in loopback_spellings(v4.port(), v6.port()) {
        ids.push((svc.submit(job_to(&origin, &cb)).await, cb));
    }
    for (id, cb) in &ids {
        let j = eventually(30, &format!("the callback to {cb} to end"), async || {
            let j = svc.job(id).await;
            (j["callback_state"] == "Failed" || j["callback_state"] == "Success").then_some(j)
        })
        .await;
        assert_eq!(j["callback_state"], "Failed", "{cb}: {j}");
        assert_eq!(j["download_state"], "Success", "{cb}: {j}");
        assert_eq!(j["callback_attempts"], 1, "{cb}: not retried: {j}");
        let e = j["callback_error"].as_str().unwrap();
        assert!(
            e.contains("not allowed") && e.contains("notifier.allowed_networks"),
            "{cb}: {e}"
        );
    }
    assert_eq!(hits4.load(SeqCst), 0, "no connection to the IPv4 loopback");
    assert_eq!(hits6.load(SeqCst), 0, "no connection to the IPv6 loopback");
    // Each is a dead letter with its reason.
    let (st, page) = svc.get("/callbacks/failed?limit=1000").await;
    assert_eq!(st, 200, "{page}");
    let listed = page["callbacks"].as_array().unwrap();
    assert_eq!(listed.len(), ids.len(), "{page}");
    for c in listed {
        assert!(
            c["error"].as_str().unwrap().contains("is not allowed"),
            "{c}"
        );
        assert_eq!(c["attempts"], 1, "{c}");
    }
    let logs = svc.logs();
    assert!(logs.contains("callback failed; not retried"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_networks_open_one_loopback_address_and_redirects_are_not_followed() {
    // Only 127.0.0.2 is open to callbacks; 127.0.0.1 (where the target of the
    // redirects listens) and localhost names are not.
    let svc = Service::start(json!({
        "notifier": {"allowed_networks": ["127.0.0.2/32"], "callback_retries": 1}
    }))
    .await;
    let origin = start_origin().await;
    origin.add_file("f", b"x".to_vec());
    let (secret, secret_hits) = counting_listener("127.0.0.1:0").await;
    let (rx, redir) = redirector("127.0.0.2:0").await;
    assert_eq!(rx.ip().to_string(), "127.0.0.2");

    let ok = svc
        .submit(job_to(&origin, &format!("http://{rx}/ok/first")))
        .await;
    eventually(20, "the allowed receiver's callback", async || {
        (svc.job(&ok).await["callback_state"] == "Success").then_some(())
    })
    .await;
    assert_eq!(redir.hits("/ok/first"), 1);

    let targets = [
        (307, secret.to_string()),
        (308, format!("localhost:{}", secret.port())),
        (302, format!("127.0.0.1:{}", secret.port())),
        // Not even to an allowed address.
        (301, rx.to_string()),
    ];
    let mut ids = Vec::new();
    for (code, to) in &targets {
        let cb = format!("http://{rx}/redirect/{code}/{to}");
        ids.push((svc.submit(job_to(&origin, &cb)).await, *code, to.clone()));
    }
    for (id, code, to) in &ids {
        let j = eventually(30, &format!("the {code} callback to end"), async || {
            let j = svc.job(id).await;
            (j["callback_state"] == "Failed" || j["callback_state"] == "Success").then_some(j)
        })
        .await;
        assert_eq!(j["callback_state"], "Failed", "{code}: {j}");
        let e = j["callback_error"].as_str().unwrap();
        assert!(
            e.contains(&format!("status code {code}")) && e.contains("redirects are not followed"),
            "{code}: {e}"
        );
        // An ordinary failed attempt: retried (callback_retries 1).
        assert_eq!(j["callback_attempts"], 2, "{j}");
        assert_eq!(redir.hits(&format!("/redirect/{code}/{to}")), 2);
    }
    assert_eq!(secret_hits.load(SeqCst), 0, "a redirect target was reached");
    assert_eq!(redir.hits("/moved"), 0);

    // At submit, under this list: 127.0.0.1 and localhost names are refused.
    let base = svc.url("");
    for cb in [
        format!("http://{secret}/cb"),
        format!("http://localhost:{}/cb", secret.port()),
        format!("http://[::1]:{}/cb", secret.port()),
    ] {
        let (st, v) = submit_status(&svc.http, &base, &job_to(&origin, &cb)).await;
        assert_refused(st, &v, "callback_url", &cb);
    }
}

/// The embedded store: a config that allows loopback callbacks delivers (and fails)
/// them; after a restart with the default networks the same callbacks, retried, are
/// refused at delivery without a connection; submits are judged with the new list;
/// redirects are not followed.
#[tokio::test(flavor = "multi_thread")]
async fn serve_judges_callbacks_at_submit_and_at_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let origin = start_origin().await;
    origin.add_file("f", b"x".to_vec());
    let rx = start_receiver().await;
    let (secret, secret_hits) = counting_listener("127.0.0.1:0").await;
    let (redir_rx, redir) = redirector("127.0.0.2:0").await;
    let config = |notifier: Value| {
        json!({
            "store": {"type": "embedded", "path": dir.path().join("data/store.redb")},
            "processor": {"storage_dir": dir.path().join("data/files"), "allowed_networks": ["127.0.0.0/8"],
                          "lease_secs": 2},
            "notifier": notifier
        })
    };
    let open = config(
        json!({"allowed_networks": ["127.0.0.0/8"], "callback_retries": 0, "lease_secs": 2}),
    );
    let mut s = Serve::start(dir.path(), Some(&open)).await;
    // The receiver answers 500 to each of these: they fail and are kept.
    let port = rx.addr.port();
    let rx_hits = |cb: &str| {
        let path = cb.split_once(&format!(":{port}")).unwrap().1;
        rx.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    };
    let mut ids = Vec::new();
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "[::ffff:127.0.0.1]",
        "localhost.",
        "api.localhost",
    ] {
        let cb = format!("http://{host}:{port}/cb/1000/{}", downloader::job::new_id());
        ids.push((s.submit(job_to(&origin, &cb)).await, cb));
    }
    let redirected = s
        .submit(job_to(
            &origin,
            &format!("http://{redir_rx}/redirect/307/{secret}"),
        ))
        .await;
    // The job once its callback has ended (failed or delivered).
    let failed = async |s: &Serve, id: &str| -> Value {
        eventually(30, &format!("job {id}'s callback to end"), async || {
            let j: Value = s
                .http
                .get(s.url(&format!("/jobs/{id}")))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (j["callback_state"] == "Failed" || j["callback_state"] == "Success").then_some(j)
        })
        .await
    };
    for (id, cb) in &ids {
        let j = failed(&s, id).await;
        assert!(
            j["callback_error"].as_str().unwrap().contains("500"),
            "{cb}: {j}"
        );
        assert_eq!(rx_hits(cb), 1, "{cb} was reached while loopback was open");
    }
    let j = failed(&s, &redirected).await;
    assert!(
        j["callback_error"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed"),
        "{j}"
    );
    assert_eq!(secret_hits.load(SeqCst), 0, "the redirect was followed");
    assert_eq!(redir.hits(&format!("/redirect/307/{secret}")), 1);

    // Restarted with the default callback networks.
    s.kill();
    let closed = config(json!({"callback_retries": 2, "lease_secs": 2}));
    let s = Serve::start(dir.path(), Some(&closed)).await;
    for (cb, field) in [
        (format!("http://127.0.0.1:{port}/cb"), "callback_url"),
        (format!("http://localhost.:{port}/cb"), "callback_url"),
    ] {
        let (st, v) = submit_status(&s.http, &s.url(""), &job_to(&origin, &cb)).await;
        assert_refused(st, &v, field, &cb);
    }
    let r: Value = s
        .http
        .post(s.url("/callbacks/retry"))
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["requeued"], ids.len() + 1, "{r}");
    for (id, cb) in &ids {
        // Until the retried attempt has ended (its error replaces the 500's).
        let j = eventually(30, &format!("{cb}'s retried callback to end"), async || {
            let j = failed(&s, id).await;
            (j["callback_state"] == "Success" || !j["callback_error"].as_str()?.contains("500"))
                .then_some(j)
        })
        .await;
        assert_eq!(j["callback_state"], "Failed", "{cb}: {j}");
        assert!(
            j["callback_error"]
                .as_str()
                .unwrap()
                .contains("not allowed"),
            "{cb}: {j}"
        );
        assert_eq!(j["callback_attempts"], 1, "{cb}: not retried: {j}");
        assert!(
            j["callback_error"]
                .as_str()
                .unwrap()
                .contains("notifier.allowed_networks"),
            "{j}"
        );
        assert_eq!(rx_hits(cb), 1, "{cb} was reached after the restart");
    }
}
