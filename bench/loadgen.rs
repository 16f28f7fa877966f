//! Load generator for `bench/load`: drives a running downloader with jobs against a
//! local origin and callback receiver (both in this process), and prints jobs/s and
//! submit-to-callback latency. As a peer in the same run it measures a plain fetch
//! loop (same origin, same concurrency, files written and fsynced the same way)
//! without any queue, and prints the service's ratio to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::Notify;

#[derive(Default)]
struct Receiver {
    /// job id → when its callback arrived
    arrived: Mutex<HashMap<String, Instant>>,
    failures: Mutex<u64>,
    notify: Notify,
}

struct Args {
    api: String,
    jobs: usize,
    aggrs: usize,
    limit: u32,
    concurrency: usize,
    light: usize,
    size: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        api: "http://127.0.0.1:8000".into(),
        jobs: 5000,
        aggrs: 20,
        limit: 50,
        concurrency: 64,
        light: 200,
        size: 4096,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        let num = || {
            v.parse::<usize>()
                .unwrap_or_else(|_| panic!("{}: not a number: {v}", pair[0]))
        };
        match pair[0].as_str() {
            "--api" => a.api = v.clone(),
            "--jobs" => a.jobs = num(),
            "--aggrs" => a.aggrs = num(),
            "--limit" => a.limit = num() as u32,
            "--concurrency" => a.concurrency = num(),
            "--light" => a.light = num(),
            "--size" => a.size = num(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

struct Run {
    jobs_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// Submits `n` jobs with `concurrency` submitters; returns throughput and latency.
/// What every run shares.
struct Ctx {
    a: Args,
    http: reqwest::Client,
    origin: String,
    cb: String,
    rx: Arc<Receiver>,
}

async fn run_service(ctx: &Ctx, n: usize, concurrency: usize, wait_each: bool) -> Run {
    let (a, http, origin, cb, rx) = (
        &ctx.a,
        &ctx.http,
        ctx.origin.as_str(),
        ctx.cb.as_str(),
        &ctx.rx,
    );
    let submitted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, api, origin, cb) = (
            http.clone(),
            a.api.clone(),
            origin.to_string(),
            cb.to_string(),
        );
        let (submitted, next, rx) = (submitted.clone(), next.clone(), rx.clone());
        let (aggrs, limit) = (a.aggrs, a.limit);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let body = json!({
                    "aggr_id": format!("bench{}", i % aggrs),
                    "aggr_limit": limit,
                    "url": format!("{origin}/f/{i}"),
                    "callback_url": cb,
                });
                let t = Instant::now();
                let r = http
                    .post(format!("{api}/download"))
                    .json(&body)
                    .send()
                    .await
                    .expect("submit");
                assert_eq!(r.status(), 201, "submit failed");
                let id = r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                submitted.lock().unwrap().insert(id.clone(), t);
                if wait_each {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !rx.arrived.lock().unwrap().contains_key(&id) {
                        assert!(Instant::now() < deadline, "callback of {id} never came");
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), rx.notify.notified())
                                .await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = {
            let arrived = rx.arrived.lock().unwrap();
            submitted
                .lock()
                .unwrap()
                .keys()
                .all(|id| arrived.contains_key(id))
        };
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "callbacks missing after 600 s");
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.notify.notified()).await;
    }
    let arrived = rx.arrived.lock().unwrap();
    let sub = submitted.lock().unwrap();
    let last = sub.keys().map(|id| arrived[id]).max().unwrap();
    let mut lat: Vec<Duration> = sub.iter().map(|(id, t)| arrived[id] - *t).collect();
    lat.sort();
    Run {
        jobs_per_sec: n as f64 / (last - start).as_secs_f64(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

/// The peer: the same downloads without the service (no queue, no callbacks).
async fn run_direct(origin: &str, n: usize, concurrency: usize, dir: &std::path::Path) -> f64 {
    use tokio::io::AsyncWriteExt;
    let http = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, origin, next, dir) = (
            http.clone(),
            origin.to_string(),
            next.clone(),
            dir.to_path_buf(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let body = http
                    .get(format!("{origin}/f/{i}"))
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                let tmp = dir.join(format!(".{i}.tmp"));
                let mut f = tokio::fs::File::create(&tmp).await.unwrap();
                f.write_all(&body).await.unwrap();
                f.sync_all().await.unwrap();
                tokio::fs::rename(&tmp, dir.join(i.to_string()))
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    downloader::install_crypto_provider();
    let a = parse_args();
    let payload = bytes::Bytes::from(vec![b'x'; a.size]);
    let origin = serve(Router::new().route(
        "/f/{i}",
        get(move || {
            let p = payload.clone();
            async move { p }
        }),
    ))
    .await;
    let rx = Arc::new(Receiver::default());
    let cb = serve(
        Router::new()
            .route(
                "/cb",
                post(
                    |State(rx): State<Arc<Receiver>>, body: axum::Json<Value>| async move {
                        if body["success"] != true {
                            *rx.failures.lock().unwrap() += 1;
                        }
                        let id = body["job_id"].as_str().unwrap_or_default().to_string();
                        rx.arrived.lock().unwrap().insert(id, Instant::now());
                        rx.notify.notify_waiters();
                    },
                ),
            )
            .with_state(rx.clone()),
    )
    .await;
    let cb = format!("{cb}/cb");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency)
        .build()
        .unwrap();

    let ctx = Ctx {
        a,
        http,
        origin,
        cb,
        rx,
    };
    // Warm up connections and the store's scripts.
    run_service(&ctx, 50, 8, false).await;
    let light = run_service(&ctx, ctx.a.light, 1, true).await;
    let heavy = run_service(&ctx, ctx.a.jobs, ctx.a.concurrency, false).await;
    let (a, origin, rx) = (&ctx.a, &ctx.origin, &ctx.rx);
    let dir = tempfile::tempdir().unwrap();
    let direct = run_direct(origin, a.jobs, a.concurrency, dir.path()).await;
    let failures = *rx.failures.lock().unwrap();

    println!();
    println!("| run | jobs | jobs/s | p50 submit→callback | p99 submit→callback |");
    println!("|---|---|---|---|---|");
    println!(
        "| light load (one job at a time) | {} | {:.0} | {:.1} ms | {:.1} ms |",
        a.light,
        light.jobs_per_sec,
        light.p50.as_secs_f64() * 1e3,
        light.p99.as_secs_f64() * 1e3
    );
    println!(
        "| full load ({} submitters, {} aggregations × limit {}) | {} | {:.0} | {:.1} ms | {:.1} ms |",
        a.concurrency,
        a.aggrs,
        a.limit,
        a.jobs,
        heavy.jobs_per_sec,
        heavy.p50.as_secs_f64() * 1e3,
        heavy.p99.as_secs_f64() * 1e3
    );
    println!(
        "| peer: plain fetch loop, no service ({} workers) | {} | {:.0} | | |",
        a.concurrency, a.jobs, direct
    );
    println!();
    println!(
        "service / plain fetch loop: {:.2}×   ({} byte files, {} failed callbacks)",
        heavy.jobs_per_sec / direct,
        a.size,
        failures
    );
    assert_eq!(failures, 0, "some downloads failed");
}
