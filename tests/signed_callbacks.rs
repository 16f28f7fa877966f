//! Signed callbacks (Standard Webhooks): every HTTP callback carries `webhook-id`,
//! `webhook-timestamp` and `webhook-signature`, checked here by an independent
//! verifier, the specification authors' `standardwebhooks` crate, on the bytes the
//! receiver got: through retries, `POST /retry/{id}`, and a key rotation; secrets are
//! never shown by `/info` or the logs, and a bad one stops every component (exit 2).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use common::serve::Serve;
use common::*;
use serde_json::{Value, json};
use standardwebhooks::Webhook;

/// The specification's test key (its libraries' tests sign with it).
const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The base64 part of a secret: what must never show anywhere.
fn key_part(secret: &str) -> &str {
    secret.strip_prefix("whsec_").unwrap()
}

/// What a receiver got: every request, failed or not, with its exact body.
#[derive(Default)]
struct RawState {
    requests: Mutex<Vec<(String, HeaderMap, Bytes)>>,
    hits: Mutex<HashMap<String, u32>>,
}

struct RawReceiver {
    addr: std::net::SocketAddr,
    state: Arc<RawState>,
}

impl RawReceiver {
    /// A URL whose first `fails` requests answer 500.
    fn url(&self, fails: u32) -> String {
        format!("http://{}/{fails}/{}", self.addr, downloader::job::new_id())
    }

    /// The requests to `url`, in arrival order.
    fn requests(&self, url: &str) -> Vec<(HeaderMap, Bytes)> {
        let path = url.split_once(&self.addr.to_string()).unwrap().1;
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, h, b)| (h.clone(), b.clone()))
            .collect()
    }

    async fn wait_for(&self, url: &str, n: usize) -> Vec<(HeaderMap, Bytes)> {
        eventually(30, &format!("{n} requests to {url}"), async || {
            let r = self.requests(url);
            (r.len() >= n).then_some(r)
        })
        .await
    }
}

async fn start_raw_receiver() -> RawReceiver {
    async fn receive(
        State(s): State<Arc<RawState>>,
        UrlPath((fails, key)): UrlPath<(u32, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let path = format!("/{fails}/{key}");
        s.requests
            .lock()
            .unwrap()
            .push((path.clone(), headers, body));
        let mut hits = s.hits.lock().unwrap();
        let n = hits.entry(path).or_default();
        *n += 1;
        if *n <= fails {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    }
    let state = Arc::new(RawState::default());
    let app = Router::new()
        .route("/{fails}/{key}", post(receive))
        .with_state(state.clone());
    RawReceiver {
        addr: serve_local(app).await,
        state,
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Checks one received callback: the headers say what the specification says, and a
/// verifier holding each of `accepted` accepts it while one holding each of `refused`
/// (or a changed body) does not. Returns its id and timestamp.
fn check_signed(
    job_id: &str,
    headers: &HeaderMap,
    body: &Bytes,
    accepted: &[&str],
    refused: &[&str],
) -> (String, i64) {
    let id = headers["webhook-id"].to_str().unwrap().to_string();
    assert_eq!(id, job_id, "webhook-id is the job's id");
    let ts: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((ts - now_secs()).abs() < 60, "timestamp {ts}");
    let sig = headers["webhook-signature"].to_str().unwrap();
    let parts: Vec<&str> = sig.split(' ').collect();
    assert_eq!(parts.len(), accepted.len(), "one signature per key: {sig}");
    assert!(parts.iter().all(|p| p.starts_with("v1,")), "{sig}");
    assert_eq!(headers["content-type"], "application/json");
    let payload: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["job_id"], job_id);
    for (i, key) in accepted.iter().enumerate() {
        Webhook::new(key)
            .unwrap()
            .verify(body, headers)
            .unwrap_or_else(|e| panic!("a verifier with accepted key {i} refused it: {e:?}"));
    }
    for (i, key) in refused.iter().enumerate() {
        assert!(
            Webhook::new(key).unwrap().verify(body, headers).is_err(),
            "a verifier with refused key {i} accepted it"
        );
    }
    let mut tampered = body.to_vec();
    tampered.insert(1, b' ');
    assert!(
        Webhook::new(accepted[0])
            .unwrap()
            .verify(&tampered, headers)
            .is_err(),
        "a changed body still verified"
    );
    (id, ts)
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_are_signed_through_retries_and_a_key_rotation() {
    let new = new_secret();
    let other = new_secret();
    let admin_port = free_port();
    // Phase 0: no keys, no signature headers.
    let mut svc = Service::start(json!({
        "notifier": {"callback_retries": 3, "admin_addr": format!("127.0.0.1:{admin_port}")}
    }))
    .await;
    let origin = start_origin().await;
    origin.add_file("f", b"signed file".to_vec());
    let rx = start_raw_receiver().await;
    let cb = rx.url(0);
    let id = svc.submit(job(&origin, "/file/f", &cb, "signed", 4)).await;
    let (h, _) = rx.wait_for(&cb, 1).await.remove(0);
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        assert!(!h.contains_key(name), "unsigned callbacks carry no {name}");
    }
    drop(id);

    // Phase 1: the old key only.
    let mut cfg = svc.config_json();
    cfg["notifier"]["signing_secrets"] = json!([OLD]);
    svc.spawn_with_config("notifier", &["notifier"], &cfg);
    let cb = rx.url(0);
    let id = svc.submit(job(&origin, "/file/f", &cb, "signed", 4)).await;
    let (h, b) = rx.wait_for(&cb, 1).await.remove(0);
    check_signed(&id, &h, &b, &[OLD], &[&new]);

    // Phase 2: both keys while receivers move to the new one. A callback that fails
    // twice keeps its webhook-id across attempts, each signed with its own timestamp.
    cfg["notifier"]["signing_secrets"] = json!([OLD, new]);
    svc.spawn_with_config("notifier", &["notifier"], &cfg);
    let cb = rx.url(2);
    let id = svc.submit(job(&origin, "/file/f", &cb, "signed", 4)).await;
    let got = rx.wait_for(&cb, 3).await;
    let mut last_ts = 0;
    for (h, b) in &got {
        let (_, ts) = check_signed(&id, h, b, &[OLD, &new], &[&other]);
        assert!(ts >= last_ts, "timestamps of later attempts are later");
        last_ts = ts;
    }
    assert_eq!(got[0].1, got[2].1, "the same body each attempt");
    // Failed for good (4 attempts), then retried by POST /retry/{id}: the same id.
    let cb = rx.url(4);
    let id = svc.submit(job(&origin, "/file/f", &cb, "signed", 4)).await;
    eventually(30, "the callback to fail", async || {
        (svc.job(&id).await["callback_state"] == "Failed").then_some(())
    })
    .await;
    let (st, v) = svc.post_raw(&format!("/retry/{id}"), "").await;
    assert_eq!(st, 204, "{v}");
    let got = rx.wait_for(&cb, 5).await;
    for (h, b) in &got {
        check_signed(&id, h, b, &[OLD, &new], &[&other]);
    }
    eventually(30, "the retried callback to be delivered", async || {
        (svc.job(&id).await["callback_state"] == "Success").then_some(())
    })
    .await;

    // Phase 3: the new key only; the old one no longer verifies.
    cfg["notifier"]["signing_secrets"] = json!([new]);
    svc.spawn_with_config("notifier", &["notifier"], &cfg);
    let cb = rx.url(0);
    let id = svc.submit(job(&origin, "/file/f", &cb, "signed", 4)).await;
    let (h, b) = rx.wait_for(&cb, 1).await.remove(0);
    check_signed(&id, &h, &b, &[&new], &[OLD, &other]);

    // Never shown: /info (web's and the notifier's admin listener) and the logs.
    let admin = format!("http://127.0.0.1:{admin_port}");
    let notifier_info = eventually(15, "the notifier's /info", async || {
        let r = svc.http.get(format!("{admin}/info")).send().await.ok()?;
        r.text().await.ok()
    })
    .await;
    let web_info = svc.http.get(svc.url("/info")).send().await.unwrap();
    assert_eq!(web_info.status(), 200);
    let web_info = web_info.text().await.unwrap();
    assert!(notifier_info.contains("notifier"), "{notifier_info}");
    let logs = svc.logs();
    assert!(
        logs.contains("callbacks are signed"),
        "the notifier says it signs: {logs}"
    );
    for shown in [&web_info, &notifier_info, &logs] {
        for secret in [OLD, &new] {
            assert!(
                !shown.contains(key_part(secret)),
                "a secret is shown: {shown}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_signs_callbacks_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_secret();
    let origin = start_origin().await;
    origin.add_file("f", b"x".to_vec());
    let rx = start_raw_receiver().await;
    let cfg = json!({
        "store": {"type": "embedded", "path": dir.path().join("data/store.redb")},
        "processor": {"storage_dir": dir.path().join("data/files"), "allowed_networks": ["127.0.0.0/8"]},
        "notifier": {"allowed_networks": ["127.0.0.0/8"], "signing_secrets": [key], "callback_retries": 1}
    });
    let s = Serve::start(dir.path(), Some(&cfg)).await;
    let cb = rx.url(1);
    let id = s.submit(job(&origin, "/file/f", &cb, "signed", 1)).await;
    let got = rx.wait_for(&cb, 2).await;
    for (h, b) in &got {
        check_signed(&id, h, b, &[&key], &[OLD]);
    }
    let info = s
        .http
        .get(s.url("/info"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(info.contains("embedded"), "{info}");
    assert!(!info.contains(key_part(&key)), "{info}");
}

#[test]
fn a_bad_signing_secret_stops_every_component_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let short = "whsec_c2hvcnQgYnV0IHNlY3JldA==";
    for (secrets, says) in [
        (json!([OLD, short]), "notifier.signing_secrets[1]"),
        (
            json!(["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]),
            "must start with whsec_",
        ),
        (json!(["whsec_not base64!"]), "base64"),
        (json!("whsec_x"), "notifier.signing_secrets"),
    ] {
        let cfg = base_config(
            dir.path(),
            "test:unused",
            json!({"notifier": {"signing_secrets": secrets}}),
        );
        let path = dir.path().join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        for component in ["web", "processor", "notifier"] {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"));
            cmd.args([component, "-c"]).arg(&path);
            let (code, _, err) = run_to_end(cmd, Duration::from_secs(30));
            assert_eq!(code, 2, "{component} {secrets}: {err}");
            assert!(err.contains(says), "{component}: {err}");
            assert!(
                !err.contains("c2hvcnQ") && !err.contains("MfKQ9r8"),
                "the secret is shown: {err}"
            );
        }
    }
}
