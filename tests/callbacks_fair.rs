//! Fair delivery: a callback receiver that never answers holds at most
//! `notifier.per_host_concurrency` of the notifier's slots, and the others' callbacks
//! keep arriving; on Redis (three processes) and under `serve` (embedded store). Also
//! the reference's callback attempts (2 in all) and the notifier keys' validation.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::serve::Serve;
use common::*;
use serde_json::{Value, json};

/// The default `notifier.per_host_concurrency` for `notifier.concurrency` 10.
const SHARE: usize = 4;

// ------------------------------------------------------------------ receivers

/// Accepts connections, reads whatever comes and never answers; counts the
/// connections open now, the most ever open, and all it accepted.
struct Tarpit {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl Tarpit {
    async fn start() -> Tarpit {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, max, accepted) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (o, m, a) = (open.clone(), max.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // Until the client gives up and closes.
                    while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Tarpit {
            addr,
            open,
            max,
            accepted,
        }
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}/cb/{i}", self.addr)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Answers every callback 200 after `delay`, counting requests in flight.
struct SlowReceiver {
    addr: SocketAddr,
    state: Arc<SlowState>,
}

#[derive(Default)]
struct SlowState {
    delay: Duration,
    now: AtomicUsize,
    max: AtomicUsize,
    done: AtomicUsize,
}

async fn slow_receive(State(s): State<Arc<SlowState>>) -> StatusCode {
    let n = s.now.fetch_add(1, Ordering::SeqCst) + 1;
    s.max.fetch_max(n, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    s.now.fetch_sub(1, Ordering::SeqCst);
    s.done.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

impl SlowReceiver {
    async fn start(delay: Duration) -> SlowReceiver {
        let state = Arc::new(SlowState {
            delay,
            ..Default::default()
        });
        let app = Router::new()
            .route("/slow", post(slow_receive))
            .with_state(state.clone());
        SlowReceiver {
            addr: serve_local(app).await,
            state,
        }
    }
}

// ------------------------------------------------------------------ setups

/// The service under test, three processes on Redis or `serve`.
trait Api {
    async fn submit_job(&self, job: Value) -> String;
    async fn job_state(&self, id: &str) -> Value;
}

impl Api for Service {
    async fn submit_job(&self, job: Value) -> String {
        self.submit(job).await
    }
    async fn job_state(&self, id: &str) -> Value {
        self.job(id).await
    }
}

impl Api for Serve {
    async fn submit_job(&self, job: Value) -> String {
        self.submit(job).await
    }
    async fn job_state(&self, id: &str) -> Value {
        let r = self
            .http
            .get(self.url(&format!("/jobs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

fn serve_config(dir: &Path) -> Value {
    json!({
        "store": {"type": "embedded", "path": dir.join("data/store.redb")},
        "processor": {"storage_dir": dir.join("data/files"), "allowed_networks": ["127.0.0.0/8"]},
        "notifier": {"deletion_interval": 60, "allowed_networks": ["127.0.0.0/8"]},
        // Longer than the test: the tarpit holds its connections throughout.
        "backends": {"http": {"timeout": 120}}
    })
}

/// 20 callbacks to a tarpit, then 10 to a healthy receiver: the tarpit gets its share
/// of connections and never more, the healthy callbacks all arrive meanwhile.
async fn tarpit_beside_a_healthy_receiver(api: &impl Api) {
    let origin = start_origin().await;
    origin.add_file("f", b"callback me".to_vec());
    let tarpit = Tarpit::start().await;
    let rx = start_receiver().await;
    let mut stuck = Vec::new();
    for i in 0..20 {
        let j = job(
            &origin,
            &format!("/file/f?t{i}"),
            &tarpit.url(i),
            "tarpit",
            20,
        );
        stuck.push(api.submit_job(j).await);
    }
    eventually(30, "the tarpit to hold its share", async || {
        (tarpit.open() == SHARE).then_some(())
    })
    .await;
    // The others wait parked, shown as such.
    eventually(30, "a callback parked on the tarpit", async || {
        for id in &stuck {
            if api.job_state(id).await["waiting_for"] == "callback_destination" {
                return Some(());
            }
        }
        None
    })
    .await;

    let t0 = Instant::now();
    let mut healthy = Vec::new();
    for i in 0..10 {
        let j = job(&origin, &format!("/file/f?h{i}"), &rx.url(0), "healthy", 10);
        healthy.push(api.submit_job(j).await);
    }
    for id in &healthy {
        let cb = rx.wait_for(id, 15).await;
        assert_eq!(cb["success"], true, "{cb}");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "healthy callbacks took {took:?}"
    );
    assert_eq!(
        tarpit.max.load(Ordering::SeqCst),
        SHARE,
        "the tarpit never held more than its share"
    );
    assert_eq!(tarpit.open(), SHARE, "and still holds it");
    assert_eq!(
        tarpit.accepted.load(Ordering::SeqCst),
        SHARE,
        "parked callbacks did not try the tarpit"
    );
    // Parking is not an attempt.
    let mut attempts = 0;
    for id in &stuck {
        attempts += api.job_state(id).await["callback_attempts"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(
        attempts, SHARE as u64,
        "only the callbacks in flight count one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tarpit_holds_only_its_share_on_redis() {
    let svc = Service::start(json!({"backends": {"http": {"timeout": 120}}})).await;
    tarpit_beside_a_healthy_receiver(&svc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tarpit_holds_only_its_share_under_serve() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path(), Some(&serve_config(dir.path()))).await;
    tarpit_beside_a_healthy_receiver(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_receiver_is_kept_at_its_share_and_drains() {
    let svc = Service::start(json!({})).await;
    let origin = start_origin().await;
    origin.add_file("f", b"x".to_vec());
    let slow = SlowReceiver::start(Duration::from_millis(300)).await;
    let url = format!("http://{}/slow", slow.addr);
    let mut ids = Vec::new();
    for i in 0..16 {
        ids.push(
            svc.submit(job(&origin, &format!("/file/f?{i}"), &url, "slow", 16))
                .await,
        );
    }
    eventually(30, "16 callbacks to the slow receiver", async || {
        (slow.state.done.load(Ordering::SeqCst) == 16).then_some(())
    })
    .await;
    assert_eq!(slow.state.max.load(Ordering::SeqCst), SHARE);
    for id in &ids {
        let j = svc.job(id).await;
        assert_eq!(j["callback_state"], "Success", "{j}");
        assert_eq!(j["callback_attempts"], 1, "{j}");
    }
}

// ------------------------------------------------------------------ attempts

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_always_fails_gets_two_attempts_by_default() {
    let svc = Service::start(json!({})).await;
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"x".to_vec());
    let cb = rx.url(u32::MAX);
    let id = svc.submit(job(&origin, "/file/f", &cb, "fails", 1)).await;
    eventually(30, "the callback to fail for good", async || {
        (svc.job(&id).await["callback_state"] == "Failed").then_some(())
    })
    .await;
    // Failed is final: no attempt can follow.
    assert_eq!(rx.hits(&cb), 2, "the reference's maxCallbackRetries = 2");
    let (st, page) = svc.get("/callbacks/failed").await;
    assert_eq!(st, 200, "{page}");
    let listed = page["callbacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["job_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not listed: {page}"))
        .clone();
    assert_eq!(listed["attempts"], 2, "{listed}");
    assert!(
        listed["error"].as_str().unwrap().contains("500"),
        "{listed}"
    );
}

// ------------------------------------------------------------------ validation

#[test]
fn notifier_keys_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    for (notifier, keys) in [
        (
            json!({"per_host_concurrency": 0}),
            &["notifier.per_host_concurrency"][..],
        ),
        (
            json!({"concurrency": 10, "per_host_concurrency": 11}),
            &["notifier.per_host_concurrency"],
        ),
        (
            json!({"per_host_concurrency": "4"}),
            &["notifier.per_host_concurrency"],
        ),
        (
            json!({"callback_attempts": 0}),
            &["notifier.callback_attempts"],
        ),
        (
            json!({"callback_attempts": 2, "callback_retries": 1}),
            &["notifier.callback_attempts", "notifier.callback_retries"],
        ),
    ] {
        let cfg = base_config(dir.path(), "unused", json!({ "notifier": notifier }));
        let path = dir.path().join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        for component in ["notifier", "serve"] {
            let out = Command::new(env!("CARGO_BIN_EXE_downloader"))
                .args([component, "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{component} {notifier}");
            let err = String::from_utf8_lossy(&out.stderr);
            for key in keys {
                assert!(err.contains(key), "{component} {notifier}: {err}");
            }
        }
    }
}
