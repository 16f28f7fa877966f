//! The two stores are one state machine: random sequences of store operations run
//! against the Redis store and the embedded store side by side, on one manual clock,
//! and every answer and the visible state after every step must be equal.
//!
//! The operations cover the whole job lifecycle: submits with random limits, rates,
//! bursts, tenants and settings; download and callback claims (with and without
//! shares); renewals; finishes, retries and deferrals; host permits with rates and
//! concurrency; host pauses; releases; callback retries, failures, parking and
//! wake-ups; `/retry`; failed-callback expiry; deletions; and the clock moving by
//! anything from nothing to past every lease. The visible state is each job's record
//! (`get_job`), the dashboard's aggregation page, the pending summary and the failed
//! callbacks' listing. A failure prints the shrunk sequence.
//!
//! Redis is our own server, started by the test on a free port (so that each case
//! may start from an empty database); the embedded store lives under /dev/shm when
//! there is one (its fsyncs then cost nothing). Cases: `PROPTEST_CASES` (default
//! 1000), each up to 64 steps.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use downloader::config::RedisConfig;
use downloader::job::{Callback, JobRecord, JobSpec};
use downloader::store::embedded::EmbeddedStore;
use downloader::store::redis::RedisStore;
use downloader::store::{
    AggrFilter, AggrSettings, ClaimShares, Claimed, Clock, DownloadResult, HostLimits, Queue,
    Store, StoreError, WaitReason,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

// ------------------------------------------------------------------ the Redis server

/// A redis-server of this test's own, killed when dropped.
struct OwnRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> OwnRedis {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "the store differential test starts its own redis-server ({e}); install it \
                 with `apt-get install redis-server`"
            )
        });
    let mut redis = OwnRedis {
        child,
        port,
        _dir: dir,
    };
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            return redis;
        }
        if let Ok(Some(status)) = redis.child.try_wait() {
            panic!("redis-server on port {port} exited at start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------ operations

const IDS: usize = 8;
const AGGRS: [&str; 4] = ["a", "b", "c", "shop"];
const HOSTS: [&str; 2] = ["one.test", "two.test"];
const DESTS: [&str; 2] = ["cb-one.test", "cb-two.test"];
/// Time steps: nothing, a little, about a rate interval, a lease, past every lease.
const ADVANCES: [u64; 8] = [0, 1, 7, 100, 333, 1_000, 5_000, 61_000];
const LEASES: [u64; 2] = [1_000, 5_000];
const DELAYS: [u64; 4] = [0, 10, 500, 3_000];

#[derive(Debug, Clone)]
struct Submit {
    id: usize,
    aggr: usize,
    tenant: bool,
    limit: u32,
    rate: Option<f64>,
    burst: Option<u32>,
    callback: bool,
    host: usize,
    first: bool,
    proxy: bool,
}

/// One store operation; `lease` indexes the leases handed out so far (wrapping), so
/// that finished, expired and stolen leases are used too.
#[derive(Debug, Clone)]
enum Op {
    Submit(Submit),
    ClaimDownloads {
        max: usize,
        lease: usize,
        share: Option<(usize, u32, bool)>,
    },
    ClaimCallbacks {
        max: usize,
        lease: usize,
    },
    Renew {
        queue: bool,
        lease: usize,
        ms: usize,
    },
    FinishDownload {
        lease: usize,
        success: bool,
        keep: usize,
    },
    RetryDownload {
        lease: usize,
        delay: usize,
    },
    DeferDownload {
        lease: usize,
        delay: usize,
        reason: usize,
    },
    HostPermit {
        lease: usize,
        host: usize,
        rate: u8,
        burst: u32,
        concurrency: u32,
    },
    PauseHost {
        host: usize,
        ms: usize,
    },
    Release {
        queue: bool,
        lease: usize,
    },
    FinishCallback {
        lease: usize,
        keep: usize,
    },
    RetryCallback {
        lease: usize,
        delay: usize,
    },
    FailCallback {
        lease: usize,
    },
    DeferCallback {
        lease: usize,
        dest: usize,
        delay: usize,
    },
    WakeCallbacks {
        dest: usize,
        max: usize,
    },
    RequeueCallback {
        id: usize,
    },
    ExpireFailed {
        retention: usize,
        limit: usize,
    },
    Deletions {
        limit: usize,
        forget: bool,
    },
    Advance(usize),
}

fn submit() -> impl Strategy<Value = Submit> {
    (
        (0..IDS, 0..AGGRS.len(), any::<bool>(), 1..4u32),
        (
            prop_oneof![
                Just(None),
                Just(Some(2.0)),
                Just(Some(10.0)),
                Just(Some(3.0))
            ],
            prop_oneof![Just(None), Just(Some(1u32)), Just(Some(3u32))],
        ),
        (any::<bool>(), 0..HOSTS.len(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |((id, aggr, tenant, limit), (rate, burst), (callback, host, first, proxy))| Submit {
                id,
                aggr,
                tenant: tenant && aggr == 3,
                limit,
                rate,
                burst,
                callback: callback || id % 4 != 0,
                host,
                first,
                proxy,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly one of the latest leases.
    let l = prop_oneof![4 => 0..3usize, 1 => 0..16usize];
    prop_oneof![
        6 => submit().prop_map(Op::Submit),
        6 => (1..4usize, 0..LEASES.len(), prop::option::of((0..AGGRS.len(), 0..3u32, any::<bool>())))
            .prop_map(|(max, lease, share)| Op::ClaimDownloads { max, lease, share }),
        4 => (1..3usize, 0..LEASES.len()).prop_map(|(max, lease)| Op::ClaimCallbacks { max, lease }),
        1 => (any::<bool>(), l.clone(), 0..LEASES.len()).prop_map(|(queue, lease, ms)| Op::Renew { queue, lease, ms }),
        3 => (l.clone(), any::<bool>(), 0..DELAYS.len()).prop_map(|(lease, success, keep)| Op::FinishDownload { lease, success, keep }),
        2 => (l.clone(), 0..DELAYS.len()).prop_map(|(lease, delay)| Op::RetryDownload { lease, delay }),
        1 => (l.clone(), 0..DELAYS.len(), 0..3usize).prop_map(|(lease, delay, reason)| Op::DeferDownload { lease, delay, reason }),
        4 => (l.clone(), 0..HOSTS.len(), 0..3u8, 1..3u32, 0..3u32).prop_map(|(lease, host, rate, burst, concurrency)| Op::HostPermit { lease, host, rate, burst, concurrency }),
        1 => (0..HOSTS.len(), 0..DELAYS.len()).prop_map(|(host, ms)| Op::PauseHost { host, ms }),
        1 => (any::<bool>(), l.clone()).prop_map(|(queue, lease)| Op::Release { queue, lease }),
        2 => (l.clone(), 0..DELAYS.len()).prop_map(|(lease, keep)| Op::FinishCallback { lease, keep }),
        2 => (l.clone(), 0..DELAYS.len()).prop_map(|(lease, delay)| Op::RetryCallback { lease, delay }),
        1 => l.clone().prop_map(|lease| Op::FailCallback { lease }),
        2 => (l.clone(), 0..DESTS.len(), 0..DELAYS.len()).prop_map(|(lease, dest, delay)| Op::DeferCallback { lease, dest, delay }),
        1 => (0..DESTS.len(), 1..3usize).prop_map(|(dest, max)| Op::WakeCallbacks { dest, max }),
        1 => (0..IDS).prop_map(|id| Op::RequeueCallback { id }),
        1 => (0..DELAYS.len(), 1..3usize).prop_map(|(retention, limit)| Op::ExpireFailed { retention, limit }),
        1 => (1..4usize, any::<bool>()).prop_map(|(limit, forget)| Op::Deletions { limit, forget }),
        5 => (0..ADVANCES.len()).prop_map(Op::Advance),
    ]
}

// ------------------------------------------------------------------ running a case

fn id(i: usize) -> String {
    format!("job{i:02}")
}

fn spec(s: &Submit) -> JobSpec {
    JobSpec {
        url: format!("http://{}/f/{}", HOSTS[s.host], s.id),
        aggr_id: AGGRS[s.aggr].into(),
        aggr_limit: s.limit,
        aggr_proxy: s.proxy.then(|| "http://proxy.test:3128".into()),
        aggr_rate: s.rate,
        aggr_burst: s.rate.and(s.burst),
        callback: s.callback.then(|| Callback {
            kind: "http".into(),
            dst: format!("http://{}/cb", DESTS[s.id % 2]),
        }),
        extra: String::new(),
        mime_type: String::new(),
        max_retries: 3,
        extract_image_size: false,
        download_timeout: None,
        request_headers: BTreeMap::new(),
        thumbnails: Vec::new(),
        tenant: s.tenant.then(|| "t1".into()),
    }
}

/// A lease as each store handed it out.
struct Lease {
    queue: Queue,
    id: String,
    tokens: [String; 2],
}

struct Pair {
    stores: [Arc<dyn Store>; 2],
    clock: Clock,
    leases: Vec<Lease>,
    /// Each submitted job's host.
    hosts: BTreeMap<String, String>,
}

fn normalize_err(e: &StoreError) -> String {
    match e {
        StoreError::Backend(m) if m.contains("already exists") => "exists".into(),
        e => format!("error: {e}"),
    }
}

fn show<T: std::fmt::Debug>(r: &Result<T, StoreError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => normalize_err(e),
    }
}

fn record(r: &JobRecord) -> String {
    serde_json::to_string(r).unwrap()
}

/// A claim's answer, tokens aside; the leases it handed out go to `leases`.
fn claims(
    r: &Result<(Vec<Claimed>, Option<Duration>), StoreError>,
    q: Queue,
    leases: &mut Vec<(Queue, String, String)>,
) -> String {
    if let Ok((jobs, _)) = r {
        leases.extend(jobs.iter().map(|c| (q, c.job.id.clone(), c.token.clone())));
    }
    match r {
        Ok((jobs, due)) => {
            let jobs: Vec<String> = jobs
                .iter()
                .map(|c| format!("{} proxy={:?}", record(&c.job), c.proxy))
                .collect();
            format!("{jobs:?} due={due:?}")
        }
        Err(e) => normalize_err(e),
    }
}

impl Pair {
    /// The `i`th most recent lease of `q` (wrapping): mostly live ones, as workers
    /// use them, and older (finished, expired or stolen) ones too.
    fn lease(&self, i: usize, q: Option<Queue>) -> Option<&Lease> {
        let of: Vec<&Lease> = self
            .leases
            .iter()
            .rev()
            .filter(|l| q.is_none_or(|q| l.queue == q))
            .collect();
        (!of.is_empty()).then(|| of[i % of.len()])
    }

    /// Runs `op` on both stores; their answers, normalized, must be equal.
    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let mut answers = [String::new(), String::new()];
        let mut new_leases: [Vec<(Queue, String, String)>; 2] = [Vec::new(), Vec::new()];
        for (n, s) in self.stores.iter().enumerate() {
            let s = s.as_ref();
            answers[n] = match op {
                Op::Submit(sub) => {
                    let settings = if sub.first {
                        AggrSettings::First
                    } else {
                        AggrSettings::Last
                    };
                    show(&s.submit_with(&id(sub.id), &spec(sub), settings).await)
                }
                Op::ClaimDownloads { max, lease, share } => {
                    let shares = match share {
                        None => ClaimShares::default(),
                        Some((a, room, tenant)) => ClaimShares {
                            aggregations: vec![(AGGRS[*a].into(), *room)],
                            tenants: if *tenant {
                                vec![("t1".into(), *room)]
                            } else {
                                Vec::new()
                            },
                        },
                    };
                    let r = s
                        .claim_shared(
                            Queue::Download,
                            Duration::from_millis(LEASES[*lease]),
                            *max,
                            &shares,
                        )
                        .await;
                    claims(&r, Queue::Download, &mut new_leases[n])
                }
                Op::ClaimCallbacks { max, lease } => {
                    let r = s
                        .claim_many(Queue::Callback, Duration::from_millis(LEASES[*lease]), *max)
                        .await;
                    claims(&r, Queue::Callback, &mut new_leases[n])
                }
                Op::Renew { queue, lease, ms } => {
                    let q = if *queue {
                        Queue::Download
                    } else {
                        Queue::Callback
                    };
                    match self.lease(*lease, Some(q)) {
                        None => "no lease".into(),
                        Some(l) => {
                            let held = vec![(l.id.clone(), l.tokens[n].clone())];
                            show(&s.renew(q, &held, Duration::from_millis(LEASES[*ms])).await)
                        }
                    }
                }
                Op::FinishDownload {
                    lease,
                    success,
                    keep,
                } => match self.lease(*lease, Some(Queue::Download)) {
                    None => "no lease".into(),
                    Some(l) => {
                        let r = DownloadResult {
                            success: *success,
                            error: if *success {
                                String::new()
                            } else {
                                "Received status code 404".into()
                            },
                            response_code: if *success { 200 } else { 404 },
                            image_size: if *success {
                                "10x20".into()
                            } else {
                                String::new()
                            },
                            thumbnails: String::new(),
                        };
                        show(
                            &s.finish_download(
                                &l.id,
                                &l.tokens[n],
                                &r,
                                Duration::from_millis(DELAYS[*keep]),
                            )
                            .await,
                        )
                    }
                },
                Op::RetryDownload { lease, delay } => {
                    match self.lease(*lease, Some(Queue::Download)) {
                        None => "no lease".into(),
                        Some(l) => {
                            let r = DownloadResult {
                                success: false,
                                error: "Received status code 503".into(),
                                response_code: 503,
                                image_size: String::new(),
                                thumbnails: String::new(),
                            };
                            show(
                                &s.retry_download(
                                    &l.id,
                                    &l.tokens[n],
                                    &r,
                                    Duration::from_millis(DELAYS[*delay]),
                                )
                                .await,
                            )
                        }
                    }
                }
                Op::DeferDownload {
                    lease,
                    delay,
                    reason,
                } => match self.lease(*lease, Some(Queue::Download)) {
                    None => "no lease".into(),
                    Some(l) => {
                        let reason = [
                            WaitReason::HostPaused,
                            WaitReason::HostRate,
                            WaitReason::HostConcurrency,
                        ][*reason];
                        show(
                            &s.defer_download(
                                &l.id,
                                &l.tokens[n],
                                None,
                                Duration::from_millis(DELAYS[*delay]),
                                reason,
                            )
                            .await,
                        )
                    }
                },
                Op::HostPermit {
                    lease,
                    host,
                    rate,
                    burst,
                    concurrency,
                } => match self.lease(*lease, Some(Queue::Download)) {
                    None => "no lease".into(),
                    Some(l) => {
                        let limits = HostLimits {
                            rate: [0.0, 2.0, 5.0][*rate as usize],
                            burst: *burst,
                            concurrency: *concurrency,
                        };
                        // Mostly the job's own host, as the processor asks.
                        let h = match self.hosts.get(&l.id) {
                            Some(h) if *host == 0 => h.as_str(),
                            _ => HOSTS[*host],
                        };
                        show(
                            &s.host_permit(
                                &l.id,
                                &l.tokens[n],
                                h,
                                limits,
                                Duration::from_millis(LEASES[0]),
                            )
                            .await,
                        )
                    }
                },
                Op::PauseHost { host, ms } => show(
                    &s.pause_host(HOSTS[*host], Duration::from_millis(DELAYS[*ms].max(1)))
                        .await,
                ),
                Op::Release { queue, lease } => {
                    let q = if *queue {
                        Queue::Download
                    } else {
                        Queue::Callback
                    };
                    match self.lease(*lease, Some(q)) {
                        None => "no lease".into(),
                        Some(l) => show(&s.release(q, &l.id, &l.tokens[n]).await),
                    }
                }
                Op::FinishCallback { lease, keep } => {
                    match self.lease(*lease, Some(Queue::Callback)) {
                        None => "no lease".into(),
                        Some(l) => show(
                            &s.finish_callback(
                                &l.id,
                                &l.tokens[n],
                                Duration::from_millis(DELAYS[*keep]),
                            )
                            .await,
                        ),
                    }
                }
                Op::RetryCallback { lease, delay } => {
                    match self.lease(*lease, Some(Queue::Callback)) {
                        None => "no lease".into(),
                        Some(l) => show(
                            &s.retry_callback(
                                &l.id,
                                &l.tokens[n],
                                "status 500",
                                Duration::from_millis(DELAYS[*delay]),
                            )
                            .await,
                        ),
                    }
                }
                Op::FailCallback { lease } => match self.lease(*lease, Some(Queue::Callback)) {
                    None => "no lease".into(),
                    Some(l) => show(&s.fail_callback(&l.id, &l.tokens[n], "status 410").await),
                },
                Op::DeferCallback { lease, dest, delay } => {
                    match self.lease(*lease, Some(Queue::Callback)) {
                        None => "no lease".into(),
                        Some(l) => show(
                            &s.defer_callback(
                                &l.id,
                                &l.tokens[n],
                                DESTS[*dest],
                                Duration::from_millis(DELAYS[*delay]),
                            )
                            .await,
                        ),
                    }
                }
                Op::WakeCallbacks { dest, max } => {
                    show(&s.wake_callbacks(DESTS[*dest], *max).await)
                }
                Op::RequeueCallback { id: i } => show(&s.requeue_callback(&id(*i)).await),
                Op::ExpireFailed { retention, limit } => show(
                    &s.expire_failed(Duration::from_millis(DELAYS[*retention]), *limit)
                        .await,
                ),
                Op::Deletions { limit, forget } => {
                    let r = s.due_deletions(*limit).await;
                    if *forget && let Ok(ids) = &r {
                        s.forget(ids)
                            .await
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                    show(&r)
                }
                Op::Advance(_) => String::new(),
            };
        }
        if let Op::Submit(sub) = op
            && answers[0] == "()"
        {
            self.hosts.insert(id(sub.id), HOSTS[sub.host].to_string());
        }
        if let Op::Advance(i) = op {
            self.clock.advance(Duration::from_millis(ADVANCES[*i]));
        }
        prop_assert_eq!(
            &answers[0],
            &answers[1],
            "answers to {:?} (redis, embedded)",
            op
        );
        let [r, e] = new_leases;
        prop_assert_eq!(r.len(), e.len());
        for ((q, id, tr), (_, _, te)) in r.into_iter().zip(e) {
            self.leases.push(Lease {
                queue: q,
                id,
                tokens: [tr, te],
            });
        }
        Ok(())
    }

    /// Everything a client or an operator can see, as one text per store.
    async fn visible(&self, n: usize) -> Result<String, TestCaseError> {
        let s = self.stores[n].as_ref();
        let fail = |e: StoreError| TestCaseError::fail(format!("store {n}: {e}"));
        let mut out = String::new();
        for i in 0..IDS {
            let j = s.get_job(&id(i)).await.map_err(fail)?;
            out += &format!(
                "{}: {}\n",
                id(i),
                j.as_ref().map(record).unwrap_or_default()
            );
        }
        let (page, total) = s.aggregations_page(0, 100).await.map_err(fail)?;
        out += &format!("aggregations {total}: {page:?}\n");
        out += &format!("pending {:?}\n", s.pending_summary(10).await.map_err(fail)?);
        let failed = s
            .failed_callbacks(None, 100, &AggrFilter::All)
            .await
            .map_err(fail)?;
        out += &format!("failed {failed:?}\n");
        Ok(out)
    }
}

/// The lines of two listings that differ, as `redis:` / `embedded:` pairs.
fn diff(r: &str, e: &str) -> String {
    let mut out = String::new();
    for (a, b) in r.lines().zip(e.lines()) {
        if a != b {
            out += &format!("  redis:    {a}\n  embedded: {b}\n");
        }
    }
    out
}

async fn run_case(redis: &OwnRedis, ops: &[Op]) -> Result<(), TestCaseError> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port)).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    // Our own server: each case starts from an empty one.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let clock = Clock::manual(1_800_000_000_000);
    let r = RedisStore::connect_with_clock(
        &RedisConfig {
            addr: format!("127.0.0.1:{}", redis.port),
            key_prefix: "diff".into(),
            ..Default::default()
        },
        clock.clone(),
    )
    .await
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let e = EmbeddedStore::open_with_clock(&dir.path().join("store.redb"), clock.clone())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut pair = Pair {
        stores: [Arc::new(r), Arc::new(e)],
        clock,
        leases: Vec::new(),
        hosts: BTreeMap::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        pair.step(op).await?;
        let (r, e) = (pair.visible(0).await?, pair.visible(1).await?);
        if r != e {
            return Err(TestCaseError::fail(format!(
                "visible state after step {i} ({op:?}) differs:\n{}",
                diff(&r, &e)
            )));
        }
    }
    Ok(())
}

#[test]
fn redis_and_embedded_stores_are_one_state_machine() {
    let redis = start_redis();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 2_000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..64), |ops| {
        rt.block_on(run_case(&redis, &ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
