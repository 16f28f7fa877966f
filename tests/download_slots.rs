//! Download slots, tried as a hostile origin and a greedy client would: a job may not
//! ask for more than `processor.max_download_timeout`, an origin that stops sending
//! fails the download after `processor.read_idle_timeout`, and one aggregation (or one
//! tenant) stalling its downloads keeps only its share of the processor's slots —
//! with Redis (web + processor + notifier) and with `serve` (embedded store).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::serve::Serve;
use common::{Receiver, Service, eventually, start_origin, start_receiver};
use downloader::auth::{Scope, new_token};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ------------------------------------------------------------------ origins

/// How an origin that stalls behaves once it has read a request.
#[derive(Clone, Copy)]
enum Stall {
    /// Sends a response header promising a body, then nothing.
    AfterHeader,
    /// Never answers.
    Silent,
}

/// A TCP origin that stalls every request; counts the connections open (with a
/// request read) now and at most.
struct Staller {
    addr: std::net::SocketAddr,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Staller {
    async fn start(how: Stall) -> Staller {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, m) = (open.clone(), most.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (o, m) = (o.clone(), m.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if !matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {
                        return;
                    }
                    let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    if let Stall::AfterHeader = how {
                        let _ = sock
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nabc")
                            .await;
                    }
                    // Until the client gives up (EOF or reset).
                    while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Staller { addr, open, most }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
}

// ------------------------------------------------------------------ setups

/// The service under test: three processes on Redis, or one `serve` on the embedded
/// store.
enum Setup {
    Redis(Box<Service>),
    // The directory outlives the process (dropped after it).
    Serve(Serve, #[allow(dead_code)] tempfile::TempDir),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Serve,
}

impl Setup {
    /// Starts `kind` with `extra` merged over the test config, section by section.
    async fn start(kind: Kind, extra: Value) -> Setup {
        match kind {
            Kind::Redis => Setup::Redis(Box::new(Service::start(extra).await)),
            Kind::Serve => {
                let dir = tempfile::tempdir().unwrap();
                let d = dir.path();
                let mut cfg = json!({
                    "store": {"type": "embedded", "path": d.join("data/store.redb")},
                    "processor": {"storage_dir": d.join("data/files"),
                                  "download_url": "http://files.test/dl",
                                  "allowed_networks": ["127.0.0.0/8"], "lease_secs": 4},
                    "notifier": {"deletion_interval": 60, "lease_secs": 4,
                                 "allowed_networks": ["127.0.0.0/8"]},
                    "backends": {"http": {"timeout": 5}}
                });
                for (section, over) in extra.as_object().unwrap() {
                    for (k, v) in over.as_object().unwrap() {
                        cfg[section][k] = v.clone();
                    }
                }
                let s = Serve::start(d, Some(&cfg)).await;
                Setup::Serve(s, dir)
            }
        }
    }

    fn url(&self, path: &str) -> String {
        match self {
            Setup::Redis(s) => s.url(path),
            Setup::Serve(s, _) => s.url(path),
        }
    }

    /// POSTs a job (with a bearer token when given): status and JSON body.
    async fn post(&self, job: &Value, token: Option<&str>) -> (u16, Value) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut req = http.post(self.url("/download")).json(job);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    async fn submit(&self, job: &Value, token: Option<&str>) -> String {
        let (st, body) = self.post(job, token).await;
        assert_eq!(st, 201, "submit {job}: {body}");
        body["id"].as_str().unwrap().to_string()
    }
}

fn job(url: &str, cb: &str, aggr: &str) -> Value {
    json!({"aggr_id": aggr, "aggr_limit": 100, "url": url, "callback_url": cb, "max_retries": 0})
}

// ------------------------------------------------------------------ download_timeout

async fn download_timeout_above_the_cap_is_refused(kind: Kind) {
    let s = Setup::start(kind, json!({"processor": {"max_download_timeout": 100}})).await;
    let mut j = job("http://127.0.0.1:9/f", "http://127.0.0.1:9/cb", "a");
    for t in [json!(101), json!(u64::MAX), json!(1e30)] {
        j["download_timeout"] = t.clone();
        let (st, body) = s.post(&j, None).await;
        assert_eq!(st, 400, "{kind:?} download_timeout {t}: {body}");
        let e = body["error"].as_str().unwrap();
        assert!(e.starts_with("download_timeout"), "{kind:?}: {e}");
    }
    j["download_timeout"] = json!(100);
    s.submit(&j, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn download_timeout_above_the_cap_is_refused_by_web() {
    download_timeout_above_the_cap_is_refused(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn download_timeout_above_the_cap_is_refused_by_serve() {
    download_timeout_above_the_cap_is_refused(Kind::Serve).await;
}

#[test]
fn bad_timeout_and_share_keys_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    for (processor, key) in [
        (
            json!({"download_timeout": 120, "max_download_timeout": 60}),
            "processor.download_timeout",
        ),
        (
            json!({"read_idle_timeout": 0}),
            "processor.read_idle_timeout",
        ),
        (
            json!({"max_slots_per_aggregation": "0%"}),
            "processor.max_slots_per_aggregation",
        ),
        (
            json!({"max_slots_per_tenant": 0}),
            "processor.max_slots_per_tenant",
        ),
    ] {
        let mut text = json!({"processor": {"storage_dir": dir.path().join("f")}});
        for (k, v) in processor.as_object().unwrap() {
            text["processor"][k] = v.clone();
        }
        std::fs::write(&cfg, text.to_string()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args(["processor", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{processor}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{processor}: {err}");
    }
}

/// An origin that trickles: a header, then one byte every 300 ms, never idle long.
async fn start_trickler() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
                if sock.write_all(head).await.is_err() {
                    return;
                }
                // Ends when the client hangs up (or after 100 s).
                for _ in 0..330 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if sock.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A job stored before the cap existed (straight into the store, past `web`) that asks
/// for 1000 s is clamped to `max_download_timeout` by the processor.
#[tokio::test(flavor = "multi_thread")]
async fn a_stored_job_asking_more_than_the_cap_is_clamped() {
    let rx = start_receiver().await;
    let s = Service::start(json!({"processor": {
        "max_download_timeout": 3, "download_timeout": 3, "read_idle_timeout": 1
    }}))
    .await;
    let store = downloader::store::redis::RedisStore::connect(&downloader::config::RedisConfig {
        key_prefix: s.prefix.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let origin = start_trickler().await;
    let mut spec = downloader::job::JobSpec::from_json(
        job(&format!("http://{origin}/f"), &rx.url(0), "old")
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    spec.download_timeout = Some(1000);
    let id = downloader::job::new_id();
    let started = Instant::now();
    downloader::store::Store::submit(&store, &id, &spec)
        .await
        .unwrap();
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["error"], "download timed out after 3s", "{cb}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------ stalls

/// Both kinds of stall fail their job within `read_idle_timeout` (1 s; the job's
/// transfer timeout is 60 s), as stalled.
async fn a_stalled_download_fails_as_stalled(kind: Kind) {
    let rx = start_receiver().await;
    let s = Setup::start(kind, json!({"processor": {"read_idle_timeout": 1}})).await;
    let header_only = Staller::start(Stall::AfterHeader).await;
    let silent = Staller::start(Stall::Silent).await;
    let started = Instant::now();
    let a = s
        .submit(&job(&header_only.url("/f"), &rx.url(0), "a"), None)
        .await;
    let b = s
        .submit(&job(&silent.url("/f"), &rx.url(0), "b"), None)
        .await;
    for (id, after) in [(a, "after 3 bytes"), (b, "before the response header")] {
        let cb = rx.wait_for(&id, 20).await;
        assert_eq!(cb["success"], false, "{cb}");
        let e = cb["error"].as_str().unwrap();
        assert!(
            e.starts_with("download stalled: nothing received for 1s") && e.contains(after),
            "{kind:?}: {e}"
        );
    }
    // Well within the 60 s transfer timeout: the idle timeout cut them off.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    eventually(10, "the stalled connections to be closed", async || {
        (header_only.open() == 0 && silent.open() == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_download_fails_as_stalled_on_redis() {
    a_stalled_download_fails_as_stalled(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_download_fails_as_stalled_in_serve() {
    a_stalled_download_fails_as_stalled(Kind::Serve).await;
}

// ------------------------------------------------------------------ fair shares

/// 8 slots, shares of half of them (the defaults' 50 %), and downloads that stall for
/// a minute: the greedy side holds exactly 4, and another side's job is done in time.
const SLOTS: usize = 8;

fn share_config(extra: Value) -> Value {
    let mut cfg = json!({"processor": {
        "max_concurrent_downloads": SLOTS,
        "read_idle_timeout": 60
    }});
    for (section, over) in extra.as_object().unwrap() {
        for (k, v) in over.as_object().unwrap() {
            cfg[section][k] = v.clone();
        }
    }
    cfg
}

/// Submits `jobs` (with their tokens) to the stalling origin, waits until they hold
/// their share, then times `victim`: it must finish while they keep holding it.
async fn victim_keeps_its_latency(
    s: &Setup,
    rx: &Receiver,
    staller: &Staller,
    greedy: Vec<(Value, Option<String>)>,
    victim: (Value, Option<String>),
) {
    for (j, token) in &greedy {
        s.submit(j, token.as_deref()).await;
    }
    let share = SLOTS / 2;
    eventually(20, "the greedy jobs to fill their share", async || {
        (staller.open() >= share).then_some(())
    })
    .await;
    let started = Instant::now();
    let id = s.submit(&victim.0, victim.1.as_deref()).await;
    let cb = rx.wait_for(&id, 10).await;
    assert_eq!(cb["success"], true, "{cb}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "victim took {took:?}");
    // The greedy side kept its share, and never more.
    assert_eq!(staller.open(), share);
    assert_eq!(staller.most(), share);
}

async fn one_aggregation_keeps_to_its_share(kind: Kind) {
    let origin = start_origin().await;
    origin.add_file("f", b"victim's file".to_vec());
    let rx = start_receiver().await;
    let staller = Staller::start(Stall::AfterHeader).await;
    let s = Setup::start(kind, share_config(json!({}))).await;
    let greedy = (0..3 * SLOTS)
        .map(|i| {
            (
                job(&staller.url(&format!("/{i}")), &rx.url(0), "greedy"),
                None,
            )
        })
        .collect();
    let victim = (job(&origin.url("/file/f"), &rx.url(0), "victim"), None);
    victim_keeps_its_latency(&s, &rx, &staller, greedy, victim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_aggregation_keeps_to_its_share_on_redis() {
    one_aggregation_keeps_to_its_share(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_aggregation_keeps_to_its_share_in_serve() {
    one_aggregation_keeps_to_its_share(Kind::Serve).await;
}

/// A tenant spreading its jobs over aggregations (each under the aggregation share,
/// which is off here) still holds only the tenant share.
async fn one_tenant_keeps_to_its_share(kind: Kind) {
    let origin = start_origin().await;
    origin.add_file("f", b"victim's file".to_vec());
    let rx = start_receiver().await;
    let staller = Staller::start(Stall::AfterHeader).await;
    let (greedy_token, greedy_entry) = new_token("greedy", &[Scope::Submit]).unwrap();
    let (victim_token, victim_entry) = new_token("victim", &[Scope::Submit]).unwrap();
    let s = Setup::start(
        kind,
        share_config(json!({
            "api": {"tokens": [greedy_entry, victim_entry]},
            "processor": {"max_slots_per_aggregation": "100%"}
        })),
    )
    .await;
    let greedy = (0..3 * SLOTS)
        .map(|i| {
            let j = job(
                &staller.url(&format!("/{i}")),
                &rx.url(0),
                &format!("feed-{}", i % 6),
            );
            (j, Some(greedy_token.clone()))
        })
        .collect();
    // The same aggregation name as one of the greedy tenant's: still its own.
    let victim = (
        job(&origin.url("/file/f"), &rx.url(0), "feed-0"),
        Some(victim_token),
    );
    victim_keeps_its_latency(&s, &rx, &staller, greedy, victim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenant_keeps_to_its_share_on_redis() {
    one_tenant_keeps_to_its_share(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenant_keeps_to_its_share_in_serve() {
    one_tenant_keeps_to_its_share(Kind::Serve).await;
}
