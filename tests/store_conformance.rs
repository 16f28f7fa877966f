//! One suite of store cases, run against both backends: Redis (each test under its own
//! random key prefix, deleted at the end) and the embedded redb store (a temporary
//! file). Plus embedded-only cases: crash recovery and exclusive opening.

use std::sync::Arc;
use std::time::{Duration, Instant};

use downloader::config::RedisConfig;
use downloader::job::{Callback, JobSpec, new_id};
use downloader::store::embedded::EmbeddedStore;
use downloader::store::redis::RedisStore;
use downloader::store::{
    AggrFilter, AggrSettings, Claim, ClaimShares, Claimed, DownloadResult, Queue, RetryCallback,
    Store,
};

const REDIS_ADDR: &str = "127.0.0.1:6379";
const LONG: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

// ------------------------------------------------------------------ backends

/// Deletes the test's keys (only those under its prefix) when dropped, even when the
/// test panicked.
struct RedisCleanup {
    prefix: String,
}

impl Drop for RedisCleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(format!("redis://{REDIS_ADDR}/")) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let pattern = format!("{}:*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn);
            let Ok((next, keys)) = r else { return };
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// A store under test and what must outlive it (key cleanup or the temp directory).
struct Backend {
    store: Arc<dyn Store>,
    _keep: Box<dyn std::any::Any + Send>,
}

fn require_redis() {
    let client = redis::Client::open(format!("redis://{REDIS_ADDR}/")).unwrap();
    match client.get_connection_with_timeout(Duration::from_secs(2)) {
        Ok(mut c) => {
            let pong: String = redis::cmd("PING").query(&mut c).expect("Redis PING");
            assert_eq!(pong, "PONG");
        }
        Err(e) => panic!(
            "the Redis half of the store conformance suite needs Redis on {REDIS_ADDR} ({e}); \
             start one with:\n  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
             --save '' --appendonly no"
        ),
    }
}

async fn redis_backend() -> Backend {
    require_redis();
    let prefix = format!("dl-conformance-{}", new_id());
    let cleanup = RedisCleanup {
        prefix: prefix.clone(),
    };
    let store = RedisStore::connect(&RedisConfig {
        key_prefix: prefix,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot connect to Redis on {REDIS_ADDR}: {e}"));
    Backend {
        store: Arc::new(store),
        _keep: Box::new(cleanup),
    }
}

fn embedded_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("sub/store.redb")).unwrap();
    Backend {
        store: Arc::new(store),
        _keep: Box::new(dir),
    }
}

/// Runs every case against both backends: `redis_backend::<case>` and
/// `embedded_backend::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redis_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::redis_backend().await;
                    super::cases::$case(b.store.clone()).await;
                }
            )*
        }
        mod embedded_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::embedded_backend();
                    super::cases::$case(b.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    submit_claim_finish_callback_flow,
    job_without_callback_is_scheduled_for_deletion,
    aggregation_limit_caps_claims,
    later_submit_changes_limit_and_proxy,
    fifo_within_aggregation,
    renew_needs_the_right_token,
    expired_lease_is_recovered_by_next_claim,
    too_many_lost_leases_fail_the_job,
    release_hands_the_job_back,
    retry_download_is_delayed,
    callback_retry_fail_and_requeue,
    due_deletions_and_forget,
    aggregations_lists_pending_counts,
    stats_expire,
    wait_wakes_on_submit_and_times_out,
    concurrent_claims_respect_the_limit,
    worker_loop_runs_jobs_through_both_queues,
    claim_many_takes_at_most_max_in_fifo_order,
    claim_many_respects_the_limit_within_one_call,
    claim_many_callbacks_in_queue_order,
    concurrent_submits_with_a_duplicate_id,
    aggr_rate_spaces_claims_without_holding_slots,
    aggr_burst_allows_that_many_at_once,
    host_rate_books_slots_across_aggregations,
    host_concurrency_caps_and_frees,
    host_concurrency_parks_until_a_slot_is_freed,
    host_pause_defers_without_spending_an_attempt,
    claim_holds_back_jobs_of_a_paused_host,
    first_settings_stay_until_the_aggregation_drains,
    tenants_have_their_own_aggregations,
    failed_callbacks_are_listed_paged_filtered_and_expire,
    pending_counts_are_kept_and_pages_go_busiest_first,
    an_aggregation_with_no_job_left_is_removed,
    claim_shares_skip_what_has_no_room,
    claim_shares_find_others_past_a_full_tenants_many_aggregations,
    deferred_callbacks_park_on_their_destination_until_woken,
);

// ------------------------------------------------------------------ helpers

fn tenant_spec(tenant: &str, aggr: &str, limit: u32) -> JobSpec {
    JobSpec {
        tenant: Some(tenant.into()),
        ..spec(aggr, limit, None)
    }
}

/// Claims with `shares` until nothing is left to claim, counting what each claim took
/// against the shares as a processor does (a zero `next_due` means the claim had more
/// to look at: asked again at once); the jobs' aggregations, and how many claims it
/// took.
async fn claim_all_shared(
    s: &Arc<dyn Store>,
    max: usize,
    shares: &ClaimShares,
) -> (Vec<String>, usize) {
    let mut shares = shares.clone();
    let mut got = Vec::new();
    for calls in 1..=100 {
        let (jobs, due) = s
            .claim_shared(Queue::Download, LONG, max, &shares)
            .await
            .unwrap();
        if jobs.is_empty() && due != Some(Duration::ZERO) {
            return (got, calls);
        }
        for c in jobs {
            let a = c.job.spec.aggr_key();
            for (name, room) in shares.aggregations.iter_mut() {
                if *name == a {
                    *room = room.checked_sub(1).expect("a claim past the room");
                }
            }
            for (name, room) in shares.tenants.iter_mut() {
                if c.job.spec.tenant.as_deref() == Some(name.as_str()) {
                    *room = room.checked_sub(1).expect("a claim past the tenant's room");
                }
            }
            got.push(a);
        }
    }
    panic!("shared claims did not come to an end in 100 calls (a busy loop)");
}

fn spec(aggr: &str, limit: u32, proxy: Option<&str>) -> JobSpec {
    JobSpec {
        url: "http://origin.test/file".into(),
        aggr_id: aggr.into(),
        aggr_limit: limit,
        aggr_proxy: proxy.map(str::to_string),
        callback: Some(Callback {
            kind: "http".into(),
            dst: "http://cb.test/".into(),
        }),
        extra: "extra-data".into(),
        mime_type: String::new(),
        max_retries: 2,
        extract_image_size: false,
        download_timeout: None,
        request_headers: Default::default(),
        thumbnails: Vec::new(),
        aggr_rate: None,
        aggr_burst: None,
        tenant: None,
    }
}

fn rated(aggr: &str, limit: u32, rate: f64, burst: u32) -> JobSpec {
    JobSpec {
        aggr_rate: Some(rate),
        aggr_burst: Some(burst),
        ..spec(aggr, limit, None)
    }
}

fn no_callback(aggr: &str) -> JobSpec {
    JobSpec {
        callback: None,
        ..spec(aggr, 5, None)
    }
}

fn ok_result() -> DownloadResult {
    DownloadResult {
        success: true,
        error: String::new(),
        response_code: 200,
        image_size: "10x20".into(),
        thumbnails: r#"[{"name":"s","url":"abc/abcdef.s.jpg","width":1,"height":1,"format":"jpeg","bytes":3}]"#.into(),
    }
}

async fn claim(s: &Arc<dyn Store>, q: Queue, lease: Duration) -> Claimed {
    match s.claim(q, lease).await.unwrap() {
        Claim::Job(c) => *c,
        Claim::Empty { next_due } => panic!("expected a job in {q:?}, found none ({next_due:?})"),
    }
}

async fn empty(s: &Arc<dyn Store>, q: Queue) -> Option<Duration> {
    match s.claim(q, LONG).await.unwrap() {
        Claim::Empty { next_due } => next_due,
        Claim::Job(c) => panic!("expected nothing claimable in {q:?}, got job {}", c.job.id),
    }
}

/// Claims until a job comes (with a deadline, never a fixed sleep).
async fn claim_eventually(s: &Arc<dyn Store>, q: Queue, lease: Duration, secs: u64) -> Claimed {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Claim::Job(c) = s.claim(q, lease).await.unwrap() {
            return *c;
        }
        assert!(
            Instant::now() < deadline,
            "nothing became claimable in {q:?} within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The dashboard's list as (aggregation, pending) pairs.
async fn aggrs(s: &Arc<dyn Store>) -> Vec<(String, u64)> {
    s.aggregations()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.pending))
        .collect()
}

async fn job(s: &Arc<dyn Store>, id: &str) -> downloader::job::JobRecord {
    s.get_job(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("job {id} not found"))
}

// ------------------------------------------------------------------ cases

mod cases {
    pub use super::share_cases::*;
    use super::*;
    use downloader::store::{HostLimits, HostPermit, WaitReason};

    pub async fn aggr_rate_spaces_claims_without_holding_slots(s: Arc<dyn Store>) {
        // 2/s, burst 1, limit 10: one claim now, the next about 500 ms later.
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &rated("rate", 10, 2.0, 1)).await.unwrap();
        }
        let t0 = Instant::now();
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        assert_eq!(got.len(), 1, "one claim within the first interval");
        let due = empty(&s, Queue::Download)
            .await
            .expect("a due time for the rate");
        // One interval, less the scheduling slack (50 ms at most).
        assert!(
            due <= Duration::from_millis(450) && due >= Duration::from_millis(300),
            "{due:?}"
        );
        // The waiting aggregation is shown, and so is its jobs' reason.
        let list = s.aggregations().await.unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].rate_wait_until.is_some(), "{list:?}");
        let rec = job(&s, &ids[1]).await;
        assert_eq!(rec.waiting_for, "aggr_rate");
        // Another job with the same rate does not cut the wait short.
        let more = new_id();
        s.submit(&more, &rated("rate", 10, 2.0, 1)).await.unwrap();
        assert!(s.aggregations().await.unwrap()[0].rate_wait_until.is_some());
        assert_eq!(job(&s, &more).await.waiting_for, "aggr_rate");
        assert!(rec.next_attempt_at > 0);
        // Finishing the running job frees a slot but not the rate.
        s.finish_download(&got[0].job.id, &got[0].token, &ok_result(), HOUR)
            .await
            .unwrap();
        if t0.elapsed() < Duration::from_millis(300) {
            empty(&s, Queue::Download).await;
        }
        let second = claim_eventually(&s, Queue::Download, LONG, 5).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(380),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(second.job.id, ids[1], "FIFO within the aggregation");
        assert_eq!(job(&s, &ids[2]).await.waiting_for, "aggr_rate");
        // A later job without a rate lifts it.
        s.submit(&new_id(), &spec("rate", 10, None)).await.unwrap();
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        assert_eq!(got.len(), 3, "no rate any more");
    }

    pub async fn aggr_burst_allows_that_many_at_once(s: Arc<dyn Store>) {
        for _ in 0..6 {
            s.submit(&new_id(), &rated("burst", 10, 1.0, 3))
                .await
                .unwrap();
        }
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        assert_eq!(got.len(), 3, "the burst");
        let due = empty(&s, Queue::Download).await.expect("a due time");
        // One interval, less the scheduling slack (50 ms at most).
        assert!(
            due <= Duration::from_millis(950) && due >= Duration::from_millis(850),
            "{due:?}"
        );
        assert_eq!(aggrs(&s).await, vec![("burst".to_string(), 3)]);
    }

    const RATE: HostLimits = HostLimits {
        rate: 4.0,
        burst: 1,
        concurrency: 0,
    };

    pub async fn host_rate_books_slots_across_aggregations(s: Arc<dyn Store>) {
        // One host at 4/s shared by two aggregations: the first goes, the next two
        // are booked 250 ms apart and deferred until then.
        for aggr in ["h-a", "h-b", "h-a"] {
            s.submit(&new_id(), &spec(aggr, 5, None)).await.unwrap();
        }
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        assert_eq!(got.len(), 3);
        let mut delays = Vec::new();
        for c in &got {
            match s
                .host_permit(&c.job.id, &c.token, "origin.test", RATE, LONG)
                .await
                .unwrap()
            {
                HostPermit::Granted => delays.push(Duration::ZERO),
                HostPermit::Wait { delay, reason } => {
                    assert_eq!(reason, WaitReason::HostRate);
                    assert!(
                        s.defer_download(&c.job.id, &c.token, None, delay, reason)
                            .await
                            .unwrap()
                    );
                    delays.push(delay);
                }
                HostPermit::Lost => panic!("lease lost"),
            }
        }
        assert_eq!(delays[0], Duration::ZERO);
        assert!(
            delays[1] > Duration::from_millis(150) && delays[1] <= Duration::from_millis(250),
            "{delays:?}"
        );
        assert!(
            delays[2] > Duration::from_millis(400) && delays[2] <= Duration::from_millis(500),
            "{delays:?}"
        );
        let deferred = job(&s, &got[1].job.id).await;
        assert_eq!(deferred.waiting_for, "host_rate");
        assert_eq!(deferred.download_attempts, 0, "deferring spends no attempt");
        // Back at its booked time, the job goes without asking the rate again.
        let c = claim_eventually(&s, Queue::Download, LONG, 5).await;
        assert_eq!(
            s.host_permit(&c.job.id, &c.token, "origin.test", RATE, LONG)
                .await
                .unwrap(),
            HostPermit::Granted
        );
        assert_eq!(job(&s, &c.job.id).await.download_attempts, 1);
        // Another host is not limited by this one.
        s.submit(&new_id(), &spec("h-c", 5, None)).await.unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(
            s.host_permit(&c.job.id, &c.token, "other.test", RATE, LONG)
                .await
                .unwrap(),
            HostPermit::Granted
        );
    }

    pub async fn host_concurrency_caps_and_frees(s: Arc<dyn Store>) {
        let one = HostLimits {
            rate: 0.0,
            burst: 1,
            concurrency: 1,
        };
        for _ in 0..2 {
            s.submit(&new_id(), &spec("hc", 5, None)).await.unwrap();
        }
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        let permit = |c: &Claimed| {
            let (s, id, token) = (s.clone(), c.job.id.clone(), c.token.clone());
            async move {
                s.host_permit(&id, &token, "one.test", one, LONG)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(permit(&got[0]).await, HostPermit::Granted);
        assert_eq!(
            permit(&got[0]).await,
            HostPermit::Granted,
            "asking again holds one slot"
        );
        assert!(matches!(
            permit(&got[1]).await,
            HostPermit::Wait {
                reason: WaitReason::HostConcurrency,
                ..
            }
        ));
        s.finish_download(&got[0].job.id, &got[0].token, &ok_result(), HOUR)
            .await
            .unwrap();
        assert_eq!(
            permit(&got[1]).await,
            HostPermit::Granted,
            "the slot was freed"
        );
        // A released job frees its host slot too.
        assert!(
            s.release(Queue::Download, &got[1].job.id, &got[1].token)
                .await
                .unwrap()
        );
        let again = claim(&s, Queue::Download, LONG).await;
        assert_eq!(permit(&again).await, HostPermit::Granted);
        assert_eq!(
            s.host_permit(&again.job.id, "not-the-token", "one.test", one, LONG)
                .await
                .unwrap(),
            HostPermit::Lost
        );
        // A lease that expires frees the host slot with it.
        s.finish_download(&again.job.id, &again.token, &ok_result(), HOUR)
            .await
            .unwrap();
        for _ in 0..2 {
            s.submit(&new_id(), &spec("hc", 5, None)).await.unwrap();
        }
        let short = Duration::from_millis(300);
        let lost = claim(&s, Queue::Download, short).await;
        let t0 = Instant::now();
        let p = s.host_permit(&lost.job.id, &lost.token, "one.test", one, short);
        assert_eq!(p.await.unwrap(), HostPermit::Granted);
        let other = claim(&s, Queue::Download, LONG).await;
        assert_ne!(permit(&other).await, HostPermit::Granted);
        // The worker holding `lost` dies: its slot goes with its lease.
        let deadline = Instant::now() + Duration::from_secs(5);
        while permit(&other).await != HostPermit::Granted {
            assert!(
                Instant::now() < deadline,
                "the dead worker's host slot was never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
    }

    pub async fn host_concurrency_parks_until_a_slot_is_freed(s: Arc<dyn Store>) {
        let one = HostLimits {
            rate: 0.0,
            burst: 1,
            concurrency: 1,
        };
        for _ in 0..3 {
            s.submit(&new_id(), &spec("park", 5, None)).await.unwrap();
        }
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        let host = "park.test";
        assert_eq!(
            s.host_permit(&got[0].job.id, &got[0].token, host, one, LONG)
                .await
                .unwrap(),
            HostPermit::Granted
        );
        for c in &got[1..] {
            let HostPermit::Wait { delay, reason } = s
                .host_permit(&c.job.id, &c.token, host, one, LONG)
                .await
                .unwrap()
            else {
                panic!("the host is full");
            };
            assert_eq!(reason, WaitReason::HostConcurrency);
            assert!(
                delay >= Duration::from_secs(1),
                "a fallback, not a poll: {delay:?}"
            );
            assert!(
                s.defer_download(&c.job.id, &c.token, None, delay, reason)
                    .await
                    .unwrap()
            );
        }
        // Parked: nothing to claim until the slot is freed.
        assert!(empty(&s, Queue::Download).await.is_some());
        let t0 = Instant::now();
        s.finish_download(&got[0].job.id, &got[0].token, &ok_result(), HOUR)
            .await
            .unwrap();
        // Freeing the slot wakes exactly one, at once (not at its fallback).
        let next = claim(&s, Queue::Download, LONG).await;
        assert_eq!(next.job.id, got[1].job.id, "the oldest parked one");
        assert!(
            t0.elapsed() < Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(job(&s, &next.job.id).await.download_attempts, 1);
        assert!(
            empty(&s, Queue::Download).await.is_some(),
            "the other stays parked"
        );
        assert_eq!(
            s.host_permit(&next.job.id, &next.token, host, one, LONG)
                .await
                .unwrap(),
            HostPermit::Granted
        );
        // Handing it back (shutdown) frees the slot and wakes the last one.
        assert!(
            s.release(Queue::Download, &next.job.id, &next.token)
                .await
                .unwrap()
        );
        let (woken, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        let ids: Vec<_> = woken.iter().map(|c| c.job.id.clone()).collect();
        assert!(ids.contains(&got[2].job.id), "{ids:?}");
    }

    pub async fn claim_holds_back_jobs_of_a_paused_host(s: Arc<dyn Store>) {
        // spec()'s URL is on origin.test.
        s.pause_host("origin.test", Duration::from_millis(400))
            .await
            .unwrap();
        let (paused, other) = (new_id(), new_id());
        s.submit(&paused, &spec("ph", 5, None)).await.unwrap();
        let elsewhere = JobSpec {
            url: "http://elsewhere.test/f".into(),
            ..spec("ph", 5, None)
        };
        s.submit(&other, &elsewhere).await.unwrap();
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        let ids: Vec<_> = got.iter().map(|c| c.job.id.clone()).collect();
        assert_eq!(ids, vec![other.clone()], "only the job of the other host");
        let rec = job(&s, &paused).await;
        assert_eq!(
            (rec.download_attempts, rec.waiting_for.as_str()),
            (0, "host_paused")
        );
        let due = empty(&s, Queue::Download)
            .await
            .expect("due after the pause");
        assert!(due <= Duration::from_millis(400), "{due:?}");
        let c = claim_eventually(&s, Queue::Download, LONG, 5).await;
        assert_eq!(c.job.id, paused);
        assert_eq!(c.job.download_attempts, 1);
    }

    pub async fn host_pause_defers_without_spending_an_attempt(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("hp", 5, None)).await.unwrap();
        s.pause_host("paused.test", Duration::from_millis(400))
            .await
            .unwrap();
        // A shorter pause does not cut a longer one short.
        s.pause_host("paused.test", Duration::from_millis(10))
            .await
            .unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        let HostPermit::Wait { delay, reason } = s
            .host_permit(&id, &c.token, "paused.test", HostLimits::OFF, LONG)
            .await
            .unwrap()
        else {
            panic!("the host is paused");
        };
        assert_eq!(reason, WaitReason::HostPaused);
        assert!(
            delay > Duration::from_millis(200) && delay <= Duration::from_millis(400),
            "{delay:?}"
        );
        let answer = DownloadResult {
            success: false,
            error: "Received status code 429".into(),
            response_code: 429,
            ..Default::default()
        };
        assert!(
            s.defer_download(&id, &c.token, Some(&answer), delay, reason)
                .await
                .unwrap()
        );
        let rec = job(&s, &id).await;
        assert_eq!(
            (rec.download_attempts, rec.waiting_for.as_str()),
            (0, "host_paused")
        );
        // The origin's answer is kept, and the pause counted.
        assert_eq!(rec.download_error, "Received status code 429");
        assert_eq!((rec.response_code, rec.download_pauses), (429, 1));
        let c = claim_eventually(&s, Queue::Download, LONG, 5).await;
        assert_eq!(
            s.host_permit(&id, &c.token, "paused.test", HostLimits::OFF, LONG)
                .await
                .unwrap(),
            HostPermit::Granted
        );
        assert_eq!(job(&s, &id).await.download_attempts, 1);
        assert_eq!(job(&s, &id).await.waiting_for, "");
    }

    pub async fn submit_claim_finish_callback_flow(s: Arc<dyn Store>) {
        let id = new_id();
        let sp = spec("flow", 2, Some("http://proxy.test:3128"));
        s.submit(&id, &sp).await.unwrap();
        assert!(
            s.submit(&id, &sp).await.is_err(),
            "a duplicate id is refused"
        );

        let r = job(&s, &id).await;
        assert_eq!(r.spec, sp);
        assert_eq!(r.download_state, "Pending");
        assert_eq!(r.download_attempts, 0);
        assert_eq!(r.callback_state, "");
        assert!(r.created_at > 0);
        assert_eq!((r.started_at, r.finished_at, r.callback_at), (0, 0, 0));

        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c.job.id, id);
        assert!(!c.token.is_empty());
        assert_eq!(c.proxy.as_deref(), Some("http://proxy.test:3128"));
        assert_eq!(c.job.download_state, "InProgress");
        assert_eq!(c.job.download_attempts, 1);
        assert!(c.job.started_at >= r.created_at);
        assert_eq!(empty(&s, Queue::Download).await, None);
        assert_eq!(empty(&s, Queue::Callback).await, None);

        assert!(
            !s.finish_download(&id, "wrong", &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert!(
            s.finish_download(&id, &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert!(
            !s.finish_download(&id, &c.token, &ok_result(), HOUR)
                .await
                .unwrap(),
            "the lease ends with the first finish"
        );
        let r = job(&s, &id).await;
        assert_eq!(r.download_state, "Success");
        assert_eq!(r.response_code, 200);
        assert_eq!(r.image_size, "10x20");
        assert_eq!(r.download_error, "");
        assert!(r.finished_at >= r.started_at);
        assert_eq!(r.callback_state, "Pending");
        assert_eq!(r.callback_attempts, 0);

        let cb = claim(&s, Queue::Callback, LONG).await;
        assert_eq!(cb.job.id, id);
        assert_eq!(cb.proxy, None);
        assert_eq!(cb.job.callback_state, "InProgress");
        assert_eq!(cb.job.callback_attempts, 1);
        assert_eq!(cb.job.download_state, "Success");
        assert_eq!(empty(&s, Queue::Callback).await, None);

        assert!(!s.finish_callback(&id, "wrong", HOUR).await.unwrap());
        assert!(s.finish_callback(&id, &cb.token, HOUR).await.unwrap());
        assert!(!s.finish_callback(&id, &cb.token, HOUR).await.unwrap());
        let r = job(&s, &id).await;
        assert_eq!(r.callback_state, "Success");
        assert!(r.callback_at >= r.finished_at);
        assert!(
            s.due_deletions(10).await.unwrap().is_empty(),
            "kept for an hour"
        );
        assert_eq!(empty(&s, Queue::Download).await, None);
        assert_eq!(empty(&s, Queue::Callback).await, None);
    }

    /// Callbacks whose downloads have finished, claimed from the callback queue in
    /// submit order.
    async fn claimed_callbacks(s: &Arc<dyn Store>, n: usize) -> Vec<Claimed> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = new_id();
            s.submit(&id, &spec("defer", 10, None)).await.unwrap();
            ids.push(id);
        }
        for _ in 0..n {
            let c = claim(s, Queue::Download, LONG).await;
            assert!(
                s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
        }
        let (got, _) = s.claim_many(Queue::Callback, LONG, n).await.unwrap();
        let got_ids: Vec<_> = got.iter().map(|c| c.job.id.clone()).collect();
        assert_eq!(got_ids, ids);
        got
    }

    pub async fn deferred_callbacks_park_on_their_destination_until_woken(s: Arc<dyn Store>) {
        let dest = "cb.test:80";
        let got = claimed_callbacks(&s, 3).await;
        let (c1, c2, c3) = (&got[0], &got[1], &got[2]);
        let id = |c: &Claimed| c.job.id.clone();
        assert!(
            !s.defer_callback(&c1.job.id, "wrong", dest, LONG)
                .await
                .unwrap()
        );
        for c in [c1, c2] {
            assert!(
                s.defer_callback(&c.job.id, &c.token, dest, LONG)
                    .await
                    .unwrap()
            );
        }
        assert!(
            !s.defer_callback(&c1.job.id, &c1.token, dest, LONG)
                .await
                .unwrap(),
            "the lease ended with the deferral"
        );
        let r = job(&s, &c1.job.id).await;
        assert_eq!(r.callback_state, "Pending");
        assert_eq!(r.callback_attempts, 0, "not an attempt");
        assert_eq!(r.callback_defers, 1);
        assert_eq!(r.waiting_for, "callback_destination");
        assert!(r.next_attempt_at > 0);
        // Parked: nothing claimable before the fallback, which is what the claim says.
        let due = empty(&s, Queue::Callback).await.expect("a fallback time");
        assert!(due > Duration::from_secs(50) && due <= LONG, "{due:?}");

        // A wake-up for another receiver finds nothing; one for this receiver puts the
        // oldest at the head of the queue, at once.
        assert_eq!(s.wake_callbacks("other.test:80", 5).await.unwrap(), 0);
        assert_eq!(s.wake_callbacks(dest, 1).await.unwrap(), 1);
        let again = claim(&s, Queue::Callback, LONG).await;
        assert_eq!(id(&again), id(c1), "the oldest parked one");
        assert_eq!(again.job.callback_attempts, 1);
        assert_eq!(again.job.callback_defers, 0, "reset when woken");
        assert_eq!(again.job.next_attempt_at, 0);
        assert_eq!(again.job.waiting_for, "");
        // Deferred again it queues up behind c2; c3 behind both, with a short fallback.
        assert!(
            s.defer_callback(&again.job.id, &again.token, dest, LONG)
                .await
                .unwrap()
        );
        let short = Duration::from_millis(300);
        let t0 = Instant::now();
        assert!(
            s.defer_callback(&c3.job.id, &c3.token, dest, short)
                .await
                .unwrap()
        );
        // c3 comes back by itself at its fallback time.
        let back = claim_eventually(&s, Queue::Callback, LONG, 10).await;
        assert_eq!(id(&back), id(c3));
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(back.job.callback_defers, 1);
        assert_eq!(back.job.callback_attempts, 1);
        // Deferred once more, it keeps its place (it never left the receiver's list).
        assert!(
            s.defer_callback(&back.job.id, &back.token, dest, LONG)
                .await
                .unwrap()
        );
        assert_eq!(job(&s, &back.job.id).await.callback_defers, 2);
        assert_eq!(s.wake_callbacks(dest, 2).await.unwrap(), 2);
        let (woken, _) = s.claim_many(Queue::Callback, LONG, 10).await.unwrap();
        let woken_ids: Vec<_> = woken.iter().map(id).collect();
        assert_eq!(woken_ids, vec![id(c2), id(c1)], "oldest first");
        assert_eq!(s.wake_callbacks(dest, 5).await.unwrap(), 1);
        let last = claim(&s, Queue::Callback, LONG).await;
        assert_eq!(id(&last), id(c3));
        assert_eq!(s.wake_callbacks(dest, 5).await.unwrap(), 0, "none left");

        // An attempt that ends (here a retry) unparks the callback: a later wake-up
        // leaves its retry delay alone.
        assert!(
            s.defer_callback(&last.job.id, &last.token, dest, short)
                .await
                .unwrap()
        );
        let back = claim_eventually(&s, Queue::Callback, LONG, 10).await;
        assert_eq!(id(&back), id(c3));
        assert!(
            s.retry_callback(&back.job.id, &back.token, "receiver said 500", HOUR)
                .await
                .unwrap()
        );
        let r = job(&s, &back.job.id).await;
        assert_eq!((r.callback_defers, r.waiting_for.as_str()), (0, ""));
        assert_eq!(s.wake_callbacks(dest, 5).await.unwrap(), 0);
        for c in &woken {
            assert!(s.finish_callback(&c.job.id, &c.token, HOUR).await.unwrap());
        }
        let due = empty(&s, Queue::Callback).await.expect("c3's retry");
        assert!(due > Duration::from_secs(3000), "{due:?}");
    }

    pub async fn job_without_callback_is_scheduled_for_deletion(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &no_callback("nocb")).await.unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        assert!(
            s.finish_download(&id, &c.token, &ok_result(), Duration::ZERO)
                .await
                .unwrap()
        );
        let r = job(&s, &id).await;
        assert_eq!(r.download_state, "Success");
        assert_eq!(r.callback_state, "");
        assert_eq!(empty(&s, Queue::Callback).await, None);
        assert_eq!(s.due_deletions(10).await.unwrap(), vec![id.clone()]);
    }

    pub async fn aggregation_limit_caps_claims(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &spec("limited", 2, None)).await.unwrap();
        }
        let a = claim(&s, Queue::Download, LONG).await;
        let b = claim(&s, Queue::Download, LONG).await;
        assert_eq!([&a.job.id, &b.job.id], [&ids[0], &ids[1]]);
        assert_eq!(empty(&s, Queue::Download).await, None, "limit 2 reached");
        assert_eq!(aggrs(&s).await, vec![("limited".to_string(), 1)]);
        assert!(
            s.finish_download(&a.job.id, &a.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c.job.id, ids[2]);
        assert_eq!(empty(&s, Queue::Download).await, None);
    }

    pub async fn later_submit_changes_limit_and_proxy(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..4).map(|_| new_id()).collect();
        s.submit(&ids[0], &spec("chg", 1, Some("http://p1.test:1")))
            .await
            .unwrap();
        s.submit(&ids[1], &spec("chg", 1, Some("http://p1.test:1")))
            .await
            .unwrap();
        let c0 = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c0.job.id, ids[0]);
        assert_eq!(c0.proxy.as_deref(), Some("http://p1.test:1"));
        assert_eq!(empty(&s, Queue::Download).await, None, "limit 1");

        // Raising the limit frees two more slots at once; the proxy follows too.
        s.submit(&ids[2], &spec("chg", 3, Some("http://p2.test:2")))
            .await
            .unwrap();
        let c1 = claim(&s, Queue::Download, LONG).await;
        let c2 = claim(&s, Queue::Download, LONG).await;
        assert_eq!([&c1.job.id, &c2.job.id], [&ids[1], &ids[2]]);
        assert_eq!(c1.proxy.as_deref(), Some("http://p2.test:2"));
        assert_eq!(empty(&s, Queue::Download).await, None);

        // Lowering it to 1 (and clearing the proxy): with three in flight, nothing
        // more is claimable until all three have finished.
        s.submit(&ids[3], &spec("chg", 1, None)).await.unwrap();
        assert_eq!(empty(&s, Queue::Download).await, None);
        for c in [&c0, &c1] {
            assert!(
                s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
            assert_eq!(
                empty(&s, Queue::Download).await,
                None,
                "still at or over the lowered limit"
            );
        }
        assert!(
            s.finish_download(&c2.job.id, &c2.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        let c3 = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c3.job.id, ids[3]);
        assert_eq!(c3.proxy, None);
    }

    pub async fn fifo_within_aggregation(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..6).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &spec("fifo", 10, None)).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(claim(&s, Queue::Download, LONG).await.job.id);
        }
        assert_eq!(got, ids);
    }

    pub async fn renew_needs_the_right_token(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("renew", 1, None)).await.unwrap();
        let lease = Duration::from_millis(800);
        let c = claim(&s, Queue::Download, lease).await;
        assert_eq!(
            s.renew(Queue::Download, &[], lease).await.unwrap(),
            Vec::<bool>::new()
        );
        let held = vec![
            (id.clone(), c.token.clone()),
            (id.clone(), "wrong".to_string()),
            ("no-such-job".to_string(), c.token.clone()),
        ];
        assert_eq!(
            s.renew(Queue::Download, &held, lease).await.unwrap(),
            vec![true, false, false]
        );
        assert_eq!(
            s.renew(Queue::Callback, &held[..1], lease).await.unwrap(),
            vec![false],
            "a download lease is not a callback lease"
        );
        // Renewed every 100 ms, an 800 ms lease outlives two seconds: no claim
        // recovers it.
        let until = Instant::now() + Duration::from_millis(2000);
        while Instant::now() < until {
            assert_eq!(
                s.renew(Queue::Download, &held[..1], lease).await.unwrap(),
                vec![true]
            );
            assert_eq!(empty(&s, Queue::Download).await, None);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = job(&s, &id).await;
        assert_eq!(r.download_state, "InProgress");
        assert_eq!(r.download_attempts, 1);
        assert!(
            s.finish_download(&id, &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
    }

    pub async fn expired_lease_is_recovered_by_next_claim(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("expire", 1, None)).await.unwrap();
        // Measured from before the claim: the lease cannot end sooner than 200 ms later.
        let taken = Instant::now();
        let first = claim(&s, Queue::Download, Duration::from_millis(200)).await;
        assert_eq!(first.job.download_attempts, 1);
        let second = claim_eventually(&s, Queue::Download, LONG, 10).await;
        assert!(
            taken.elapsed() >= Duration::from_millis(190),
            "recovered only after the lease expired ({:?})",
            taken.elapsed()
        );
        assert_eq!(second.job.id, id);
        assert_ne!(second.token, first.token);
        assert_eq!(second.job.download_state, "InProgress");
        assert_eq!(
            second.job.download_attempts, 1,
            "a lost lease does not count as an attempt"
        );
        assert_eq!(
            s.renew(Queue::Download, &[(id.clone(), first.token.clone())], LONG)
                .await
                .unwrap(),
            vec![false]
        );
        assert!(
            !s.finish_download(&id, &first.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert!(!s.release(Queue::Download, &id, &first.token).await.unwrap());
        assert!(
            s.finish_download(&id, &second.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert_eq!(job(&s, &id).await.download_state, "Success");
    }

    pub async fn too_many_lost_leases_fail_the_job(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("lost", 1, None)).await.unwrap();
        let lease = Duration::from_millis(100);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut claims = 0;
        loop {
            match s.claim(Queue::Download, lease).await.unwrap() {
                Claim::Job(c) => {
                    assert_eq!(c.job.id, id);
                    assert_eq!(c.job.download_attempts, 1);
                    claims += 1;
                }
                Claim::Empty { .. } => {
                    if job(&s, &id).await.download_state == "Failed" {
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "the job was never failed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(claims, 6, "failed when the sixth lease was lost");
        let r = job(&s, &id).await;
        assert_eq!(r.download_attempts, 0);
        assert_eq!(
            r.download_error,
            "download abandoned: the worker running it was lost 6 times"
        );
        assert!(r.finished_at > 0);
        assert_eq!(r.callback_state, "Pending");
        let cb = claim(&s, Queue::Callback, LONG).await;
        assert_eq!(cb.job.id, id);
        assert_eq!(empty(&s, Queue::Download).await, None);
        assert!(s.aggregations().await.unwrap().is_empty());
    }

    pub async fn release_hands_the_job_back(s: Arc<dyn Store>) {
        let (a, b) = (new_id(), new_id());
        s.submit(&a, &spec("rel", 1, None)).await.unwrap();
        s.submit(&b, &spec("rel", 1, None)).await.unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c.job.id, a);
        assert!(!s.release(Queue::Download, &a, "wrong").await.unwrap());
        assert!(
            !s.release(Queue::Callback, &a, &c.token).await.unwrap(),
            "wrong queue"
        );
        assert!(s.release(Queue::Download, &a, &c.token).await.unwrap());
        assert!(!s.release(Queue::Download, &a, &c.token).await.unwrap());
        let r = job(&s, &a).await;
        assert_eq!(r.download_state, "Pending");
        assert_eq!(r.download_attempts, 0, "a released attempt is not counted");
        assert_eq!(aggrs(&s).await, vec![("rel".to_string(), 2)]);

        // Back at the head of its aggregation, and its slot is free again.
        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c.job.id, a);
        assert_eq!(c.job.download_attempts, 1);
        assert!(
            s.finish_download(&a, &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );

        let cb = claim(&s, Queue::Callback, LONG).await;
        assert!(!s.release(Queue::Callback, &a, "wrong").await.unwrap());
        assert!(s.release(Queue::Callback, &a, &cb.token).await.unwrap());
        let r = job(&s, &a).await;
        assert_eq!(r.callback_state, "Pending");
        assert_eq!(r.callback_attempts, 0);
        let cb = claim(&s, Queue::Callback, LONG).await;
        assert_eq!(cb.job.id, a);
        assert_eq!(cb.job.callback_attempts, 1);

        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c.job.id, b);
    }

    pub async fn retry_download_is_delayed(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("retry", 1, None)).await.unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        let failed = DownloadResult {
            success: false,
            error: "boom".into(),
            response_code: 503,
            image_size: String::new(),
            thumbnails: String::new(),
        };
        let delay = Duration::from_millis(500);
        assert!(
            !s.retry_download(&id, "wrong", &failed, delay)
                .await
                .unwrap()
        );
        let retried = Instant::now();
        assert!(
            s.retry_download(&id, &c.token, &failed, delay)
                .await
                .unwrap()
        );
        assert!(
            !s.retry_download(&id, &c.token, &failed, delay)
                .await
                .unwrap()
        );
        let r = job(&s, &id).await;
        assert_eq!(r.download_state, "Pending");
        assert_eq!(r.download_error, "boom");
        assert_eq!(r.response_code, 503);
        assert!(r.next_attempt_at > 0);
        assert_eq!(r.download_attempts, 1);
        assert!(
            s.aggregations().await.unwrap().is_empty(),
            "delayed, not pending"
        );

        let due = empty(&s, Queue::Download)
            .await
            .expect("a delayed entry reports when it is due");
        assert!(due <= delay, "{due:?}");
        assert_eq!(empty(&s, Queue::Callback).await, None);

        let c2 = claim_eventually(&s, Queue::Download, LONG, 10).await;
        assert!(
            retried.elapsed() >= Duration::from_millis(490),
            "claimable only when due ({:?})",
            retried.elapsed()
        );
        assert_eq!(c2.job.id, id);
        assert_eq!(c2.job.download_attempts, 2);
        assert_eq!(c2.job.next_attempt_at, 0);
        assert_eq!(c2.job.download_error, "boom");
        assert_eq!(empty(&s, Queue::Download).await, None);
    }

    pub async fn callback_retry_fail_and_requeue(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("cbs", 1, None)).await.unwrap();
        assert_eq!(
            s.requeue_callback(&id).await.unwrap(),
            RetryCallback::NotFailed(String::new())
        );
        let c = claim(&s, Queue::Download, LONG).await;
        let failed = DownloadResult {
            success: false,
            error: "404 Not Found".into(),
            response_code: 404,
            image_size: String::new(),
            thumbnails: String::new(),
        };
        assert!(
            s.finish_download(&id, &c.token, &failed, HOUR)
                .await
                .unwrap()
        );
        assert_eq!(job(&s, &id).await.download_state, "Failed");

        let cb = claim(&s, Queue::Callback, LONG).await;
        let delay = Duration::from_millis(300);
        assert!(
            !s.retry_callback(&id, "wrong", "cb down", delay)
                .await
                .unwrap()
        );
        assert!(
            s.retry_callback(&id, &cb.token, "cb down", delay)
                .await
                .unwrap()
        );
        let r = job(&s, &id).await;
        assert_eq!(r.callback_state, "Pending");
        assert_eq!(r.callback_error, "cb down");
        assert!(r.next_attempt_at > 0);
        let due = empty(&s, Queue::Callback)
            .await
            .expect("a delayed callback");
        assert!(due <= delay, "{due:?}");
        assert_eq!(empty(&s, Queue::Download).await, None);

        let cb = claim_eventually(&s, Queue::Callback, LONG, 10).await;
        assert_eq!(cb.job.id, id);
        assert_eq!(cb.job.callback_attempts, 2);
        assert_eq!(cb.job.next_attempt_at, 0);
        assert_eq!(
            s.requeue_callback(&id).await.unwrap(),
            RetryCallback::NotFailed("InProgress".into())
        );

        assert!(!s.fail_callback(&id, "wrong", "gone").await.unwrap());
        assert!(s.fail_callback(&id, &cb.token, "gone").await.unwrap());
        assert!(!s.fail_callback(&id, &cb.token, "gone").await.unwrap());
        let r = job(&s, &id).await;
        assert_eq!(r.callback_state, "Failed");
        assert_eq!(r.callback_error, "gone");
        assert!(r.callback_at > 0);
        assert_eq!(empty(&s, Queue::Callback).await, None);
        assert!(s.due_deletions(10).await.unwrap().is_empty());

        assert_eq!(
            s.requeue_callback("no-such-job").await.unwrap(),
            RetryCallback::NotFound
        );
        assert_eq!(
            s.requeue_callback(&id).await.unwrap(),
            RetryCallback::Requeued
        );
        assert_eq!(
            s.requeue_callback(&id).await.unwrap(),
            RetryCallback::NotFailed("Pending".into())
        );
        let r = job(&s, &id).await;
        assert_eq!(r.callback_attempts, 0);
        let cb = claim(&s, Queue::Callback, LONG).await;
        assert_eq!(cb.job.id, id);
        assert_eq!(cb.job.callback_attempts, 1);
        assert!(
            s.finish_callback(&id, &cb.token, Duration::ZERO)
                .await
                .unwrap()
        );
        assert_eq!(s.due_deletions(10).await.unwrap(), vec![id.clone()]);
        assert_eq!(
            s.requeue_callback(&id).await.unwrap(),
            RetryCallback::NotFailed("Success".into())
        );
    }

    pub async fn due_deletions_and_forget(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        for (i, id) in ids.iter().enumerate() {
            s.submit(id, &no_callback("del")).await.unwrap();
            let c = claim(&s, Queue::Download, LONG).await;
            assert_eq!(&c.job.id, id);
            let keep = if i == 2 { HOUR } else { Duration::ZERO };
            assert!(
                s.finish_download(id, &c.token, &ok_result(), keep)
                    .await
                    .unwrap()
            );
        }
        let mut due = s.due_deletions(10).await.unwrap();
        due.sort();
        let mut want = ids[..2].to_vec();
        want.sort();
        assert_eq!(due, want);
        assert_eq!(s.due_deletions(1).await.unwrap().len(), 1);
        assert!(s.due_deletions(0).await.unwrap().is_empty());

        s.forget(&[]).await.unwrap();
        s.forget(&[ids[0].clone(), "no-such-job".into()])
            .await
            .unwrap();
        assert!(s.get_job(&ids[0]).await.unwrap().is_none());
        assert_eq!(s.due_deletions(10).await.unwrap(), vec![ids[1].clone()]);
        s.forget(&ids[1..2]).await.unwrap();
        assert!(s.due_deletions(10).await.unwrap().is_empty());
        assert!(s.get_job(&ids[1]).await.unwrap().is_none());
        assert!(
            s.get_job(&ids[2]).await.unwrap().is_some(),
            "not due, not forgotten"
        );
    }

    pub async fn aggregations_lists_pending_counts(s: Arc<dyn Store>) {
        assert!(s.aggregations().await.unwrap().is_empty());
        for aggr in ["b-aggr", "b-aggr", "a-aggr"] {
            s.submit(&new_id(), &spec(aggr, 1, None)).await.unwrap();
        }
        assert_eq!(
            aggrs(&s).await,
            vec![("a-aggr".to_string(), 1), ("b-aggr".to_string(), 2)]
        );
        // Limit 1 each: two claims take one job from each aggregation.
        let x = claim(&s, Queue::Download, LONG).await;
        let y = claim(&s, Queue::Download, LONG).await;
        let mut taken = [x.job.spec.aggr_id.clone(), y.job.spec.aggr_id.clone()];
        taken.sort();
        assert_eq!(taken, ["a-aggr", "b-aggr"]);
        assert_eq!(empty(&s, Queue::Download).await, None);
        assert_eq!(
            aggrs(&s).await,
            vec![("b-aggr".to_string(), 1)],
            "only aggregations with pending jobs"
        );
    }

    pub async fn stats_expire(s: Arc<dyn Store>) {
        assert_eq!(s.get_stats("nobody").await.unwrap(), None);
        assert!(
            s.put_stats("proc", "{}", Duration::ZERO).await.is_err(),
            "a zero TTL is refused (Redis PSETEX)"
        );
        s.put_stats("proc", r#"{"n":1}"#, Duration::from_secs(30))
            .await
            .unwrap();
        let start = Instant::now();
        s.put_stats("proc", r#"{"n":2}"#, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(
            s.get_stats("proc").await.unwrap().as_deref(),
            Some(r#"{"n":2}"#)
        );
        loop {
            if s.get_stats("proc").await.unwrap().is_none() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "stats never expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(290));
    }

    pub async fn concurrent_claims_respect_the_limit(s: Arc<dyn Store>) {
        use std::collections::HashSet;
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};

        const LIMIT: usize = 3;
        const JOBS: usize = 24;
        let ids: Vec<String> = (0..JOBS).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &spec("conc", LIMIT as u32, None))
                .await
                .unwrap();
        }
        // Claims minus finishes begun, as seen by the workers: never above what the
        // store counts in flight, so never above the limit.
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (s, running, peak, seen) = (s.clone(), running.clone(), peak.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if seen.lock().unwrap().len() == JOBS {
                        return;
                    }
                    assert!(Instant::now() < deadline, "jobs were lost");
                    let Claim::Job(c) = s.claim(Queue::Download, LONG).await.unwrap() else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(
                        seen.lock().unwrap().insert(c.job.id.clone()),
                        "job {} handed out twice",
                        c.job.id
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    assert!(
                        s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                            .await
                            .unwrap()
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=LIMIT).contains(&peak), "peak in flight {peak}");
        assert_eq!(seen.lock().unwrap().len(), JOBS);
        assert!(s.aggregations().await.unwrap().is_empty());
        assert_eq!(empty(&s, Queue::Download).await, None);
    }

    /// The processor/notifier claim loop on top of the store, with handlers that
    /// finish at once.
    pub async fn worker_loop_runs_jobs_through_both_queues(s: Arc<dyn Store>) {
        use downloader::worker::{self, Handler, WorkerConfig};
        use tokio_util::sync::CancellationToken;

        struct Finish(Arc<dyn Store>);
        #[async_trait::async_trait]
        impl Handler for Finish {
            async fn handle(&self, job: Claimed, _cancel: CancellationToken) {
                let id = &job.job.id;
                let ok = match job.job.callback_state.as_str() {
                    "InProgress" => self.0.finish_callback(id, &job.token, HOUR).await,
                    _ => {
                        self.0
                            .finish_download(id, &job.token, &ok_result(), HOUR)
                            .await
                    }
                };
                assert!(ok.unwrap());
            }
        }

        let shutdown = CancellationToken::new();
        let mut loops = Vec::new();
        for queue in [Queue::Download, Queue::Callback] {
            let cfg = WorkerConfig {
                queue,
                lease: Duration::from_secs(30),
                max_in_flight: 4,
                grace: Duration::from_secs(5),
                may_claim: None,
            };
            loops.push(tokio::spawn(worker::run(
                s.clone(),
                cfg,
                Arc::new(Finish(s.clone())),
                shutdown.clone(),
            )));
        }
        // Let both loops go idle first, so that the jobs are picked up by wake-ups.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ids: Vec<String> = (0..8).map(|_| new_id()).collect();
        for (i, id) in ids.iter().enumerate() {
            s.submit(id, &spec(&format!("w{}", i % 3), 2, None))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for id in &ids {
            while job(&s, id).await.callback_state != "Success" {
                assert!(Instant::now() < deadline, "job {id} never completed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(job(&s, id).await.download_attempts, 1);
        }
        shutdown.cancel();
        for l in loops {
            l.await.unwrap();
        }
    }

    pub async fn wait_wakes_on_submit_and_times_out(s: Arc<dyn Store>) {
        // Nothing happened yet: the wait runs to its timeout.
        let t = Instant::now();
        s.wait(Queue::Download, Duration::from_millis(400))
            .await
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "returned early: {:?}",
            t.elapsed()
        );

        let other = s.clone();
        let id = new_id();
        let submitter = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            other.submit(&id, &spec("wake", 1, None)).await.unwrap();
        });
        let t = Instant::now();
        s.wait(Queue::Download, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not woken by the submit: {:?}",
            t.elapsed()
        );
        submitter.await.unwrap();

        // The callback queue is woken when a finished download queues its callback.
        let c = claim(&s, Queue::Download, LONG).await;
        let other = s.clone();
        let finisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                other
                    .finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
        });
        let t = Instant::now();
        s.wait(Queue::Callback, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not woken by the callback: {:?}",
            t.elapsed()
        );
        finisher.await.unwrap();
    }

    pub async fn claim_many_takes_at_most_max_in_fifo_order(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..10).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &spec("many", 20, Some("http://p.test:1")))
                .await
                .unwrap();
        }
        let (first, due) = s.claim_many(Queue::Download, LONG, 4).await.unwrap();
        assert_eq!(due, None);
        let got: Vec<&String> = first.iter().map(|c| &c.job.id).collect();
        assert_eq!(got, ids[..4].iter().collect::<Vec<_>>());
        for c in &first {
            assert_eq!(c.job.download_state, "InProgress");
            assert_eq!(c.job.download_attempts, 1);
            assert_eq!(c.proxy.as_deref(), Some("http://p.test:1"));
        }
        let (rest, _) = s.claim_many(Queue::Download, LONG, 32).await.unwrap();
        let got: Vec<&String> = rest.iter().map(|c| &c.job.id).collect();
        assert_eq!(got, ids[4..].iter().collect::<Vec<_>>());
        let (none, due) = s.claim_many(Queue::Download, LONG, 32).await.unwrap();
        assert!(none.is_empty());
        assert_eq!(due, None);
        // Every lease of the batch is valid on its own.
        for c in first.iter().chain(&rest) {
            assert!(
                s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
        }
        assert!(s.aggregations().await.unwrap().is_empty());
    }

    pub async fn claim_many_respects_the_limit_within_one_call(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..8).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &spec("capped", 3, None)).await.unwrap();
        }
        let other = new_id();
        s.submit(&other, &spec("other", 1, None)).await.unwrap();
        let (got, _) = s.claim_many(Queue::Download, LONG, 32).await.unwrap();
        let mut capped: Vec<String> = got
            .iter()
            .filter(|c| c.job.spec.aggr_id == "capped")
            .map(|c| c.job.id.clone())
            .collect();
        let others: Vec<&String> = got
            .iter()
            .filter(|c| c.job.spec.aggr_id == "other")
            .map(|c| &c.job.id)
            .collect();
        assert_eq!(
            got.len(),
            4,
            "3 of capped (limit 3) and 1 of other (limit 1)"
        );
        assert_eq!(others, vec![&other]);
        assert_eq!(capped, ids[..3].to_vec());
        let (none, _) = s.claim_many(Queue::Download, LONG, 32).await.unwrap();
        assert!(none.is_empty(), "both limits reached");
        let done = &got.iter().find(|c| c.job.id == ids[0]).unwrap();
        assert!(
            s.finish_download(&done.job.id, &done.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        let (next, _) = s.claim_many(Queue::Download, LONG, 32).await.unwrap();
        capped = next.iter().map(|c| c.job.id.clone()).collect();
        assert_eq!(capped, vec![ids[3].clone()], "one slot freed");
    }

    pub async fn claim_many_callbacks_in_queue_order(s: Arc<dyn Store>) {
        let ids: Vec<String> = (0..5).map(|_| new_id()).collect();
        for id in &ids {
            s.submit(id, &spec("cbs", 10, None)).await.unwrap();
        }
        let (dl, _) = s.claim_many(Queue::Download, LONG, 5).await.unwrap();
        assert_eq!(dl.len(), 5);
        for c in &dl {
            assert!(
                s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
        }
        let (cb, due) = s.claim_many(Queue::Callback, LONG, 3).await.unwrap();
        assert_eq!(due, None);
        let got: Vec<&String> = cb.iter().map(|c| &c.job.id).collect();
        assert_eq!(got, ids[..3].iter().collect::<Vec<_>>());
        let (cb2, _) = s.claim_many(Queue::Callback, LONG, 32).await.unwrap();
        let got: Vec<&String> = cb2.iter().map(|c| &c.job.id).collect();
        assert_eq!(got, ids[3..].iter().collect::<Vec<_>>());
        for c in cb.iter().chain(&cb2) {
            assert_eq!(c.job.callback_state, "InProgress");
            assert!(s.finish_callback(&c.job.id, &c.token, HOUR).await.unwrap());
        }
        let (none, _) = s.claim_many(Queue::Callback, LONG, 32).await.unwrap();
        assert!(none.is_empty());
    }

    /// Many submits at once (on the embedded store, in shared commits), one id
    /// submitted several times: exactly one of those succeeds, and a refused
    /// duplicate changes nothing for the others.
    pub async fn concurrent_submits_with_a_duplicate_id(s: Arc<dyn Store>) {
        let dup = new_id();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (s, dup) = (s.clone(), dup.clone());
            tasks.push(tokio::spawn(async move {
                let id = if i % 8 == 0 { dup } else { new_id() };
                let r = s.submit(&id, &spec("dups", 100, None)).await;
                (id, r.is_ok())
            }));
        }
        let mut ok = Vec::new();
        let mut refused = 0;
        for t in tasks {
            let (id, done) = t.await.unwrap();
            if done {
                ok.push(id);
            } else {
                assert_eq!(id, dup, "only the duplicate may be refused");
                refused += 1;
            }
        }
        assert_eq!(refused, 4);
        assert_eq!(ok.len(), 36);
        assert_eq!(aggrs(&s).await, vec![("dups".to_string(), 36)]);
        let (got, _) = s.claim_many(Queue::Download, LONG, 64).await.unwrap();
        let mut got: Vec<String> = got.into_iter().map(|c| c.job.id).collect();
        got.sort();
        ok.sort();
        assert_eq!(got, ok);
    }

    /// Runs `n` jobs of aggregation `aggr` (of `tenant`) to a failed callback; their
    /// ids, in the order they failed.
    async fn fail_callbacks(
        s: &Arc<dyn Store>,
        aggr: &str,
        tenant: Option<&str>,
        n: usize,
    ) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = new_id();
            let spec = JobSpec {
                tenant: tenant.map(str::to_string),
                ..spec(aggr, 1, None)
            };
            s.submit(&id, &spec).await.unwrap();
            let c = claim(s, Queue::Download, LONG).await;
            assert!(
                s.finish_download(&id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
            let cb = claim(s, Queue::Callback, LONG).await;
            assert!(
                s.fail_callback(&id, &cb.token, &format!("receiver down {id}"))
                    .await
                    .unwrap()
            );
            ids.push(id);
        }
        ids
    }

    pub async fn failed_callbacks_are_listed_paged_filtered_and_expire(s: Arc<dyn Store>) {
        let a = fail_callbacks(&s, "dl-a", None, 5).await;
        let b = fail_callbacks(&s, "dl-b", Some("t"), 3).await;
        // Everything, two at a time, oldest first, each once.
        let mut seen = Vec::new();
        let mut cursor = None;
        for _ in 0..20 {
            let page = s
                .failed_callbacks(cursor.as_ref(), 2, &AggrFilter::All)
                .await
                .unwrap();
            assert!(page.items.len() <= 2);
            seen.extend(page.items.iter().map(|f| (f.failed_at, f.id.clone())));
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        // Oldest first (ids break ties), each once.
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        let mut ids: Vec<String> = seen.into_iter().map(|(_, id)| id).collect();
        ids.sort();
        let mut want: Vec<String> = a.iter().chain(&b).cloned().collect();
        want.sort();
        assert_eq!(ids, want);
        let all = s
            .failed_callbacks(None, 100, &AggrFilter::All)
            .await
            .unwrap();
        assert_eq!(all.next, None);
        let first = all.items.iter().find(|f| f.id == a[0]).unwrap();
        assert_eq!(first.aggr, "dl-a");
        assert_eq!(first.error, format!("receiver down {}", a[0]));
        assert_eq!(first.attempts, 1);
        assert!(first.failed_at > 0);
        // Filters: one aggregation, one tenant's.
        let only_b = s
            .failed_callbacks(None, 100, &AggrFilter::Is("@t/dl-b".into()))
            .await
            .unwrap();
        assert_eq!(
            only_b
                .items
                .iter()
                .map(|f| f.id.clone())
                .collect::<Vec<_>>(),
            b
        );
        let tenant = s
            .failed_callbacks(None, 100, &AggrFilter::Prefix("@t/".into()))
            .await
            .unwrap();
        assert_eq!(tenant.items.len(), 3);
        // A filter matching nothing looks at a bounded number of entries per call.
        let none = s
            .failed_callbacks(None, 1, &AggrFilter::Is("nothing".into()))
            .await
            .unwrap();
        assert!(none.items.is_empty());
        // A retried one leaves the list; the rest expire into deletions.
        assert_eq!(
            s.requeue_callback(&a[0]).await.unwrap(),
            RetryCallback::Requeued
        );
        let page = s
            .failed_callbacks(None, 100, &AggrFilter::All)
            .await
            .unwrap();
        assert_eq!(page.items.len(), 7);
        assert_eq!(
            s.expire_failed(HOUR, 100).await.unwrap(),
            0,
            "none an hour old"
        );
        assert_eq!(
            s.expire_failed(Duration::ZERO, 4).await.unwrap(),
            4,
            "bounded"
        );
        assert_eq!(s.expire_failed(Duration::ZERO, 100).await.unwrap(), 3);
        assert!(
            s.failed_callbacks(None, 100, &AggrFilter::All)
                .await
                .unwrap()
                .items
                .is_empty()
        );
        let mut due = s.due_deletions(100).await.unwrap();
        due.sort();
        let mut want: Vec<String> = a[1..].iter().chain(&b).cloned().collect();
        want.sort();
        assert_eq!(due, want);
        // Expired: no longer retryable; forgetting it leaves nothing behind.
        assert_eq!(
            s.requeue_callback(&a[1]).await.unwrap(),
            RetryCallback::NotFailed("Expired".into())
        );
        s.forget(&due).await.unwrap();
        assert!(s.get_job(&a[1]).await.unwrap().is_none());
        assert!(s.due_deletions(100).await.unwrap().is_empty());
    }

    pub async fn pending_counts_are_kept_and_pages_go_busiest_first(s: Arc<dyn Store>) {
        let empty_summary = s.pending_summary(10).await.unwrap();
        assert_eq!((empty_summary.jobs, empty_summary.aggregations), (0, 0));
        for (aggr, n) in [("p-one", 1), ("p-three", 3), ("p-two", 2)] {
            for _ in 0..n {
                s.submit(&new_id(), &spec(aggr, 1, None)).await.unwrap();
            }
        }
        let sum = s.pending_summary(2).await.unwrap();
        assert_eq!((sum.jobs, sum.aggregations), (6, 3));
        assert_eq!(
            sum.top,
            vec![("p-three".to_string(), 3), ("p-two".to_string(), 2)]
        );
        let (page, total) = s.aggregations_page(1, 5).await.unwrap();
        assert_eq!(total, 3);
        let names: Vec<&str> = page.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["p-two", "p-one"]);
        // Claims take one of each (limit 1): the counts follow.
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        assert_eq!(got.len(), 3);
        let sum = s.pending_summary(10).await.unwrap();
        assert_eq!((sum.jobs, sum.aggregations), (3, 2));
        for c in &got {
            assert!(
                s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
        }
        let (got, _) = s.claim_many(Queue::Download, LONG, 10).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(s.pending_summary(10).await.unwrap().jobs, 1);
    }

    pub async fn an_aggregation_with_no_job_left_is_removed(s: Arc<dyn Store>) {
        let id = new_id();
        s.submit(&id, &spec("gone", 2, Some("http://p.test:1")))
            .await
            .unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        // A retried job keeps its aggregation (and its proxy).
        assert!(
            s.retry_download(&id, &c.token, &DownloadResult::default(), Duration::ZERO)
                .await
                .unwrap()
        );
        let c = claim_eventually(&s, Queue::Download, LONG, 5).await;
        assert_eq!(c.proxy.as_deref(), Some("http://p.test:1"));
        assert!(
            s.finish_download(&id, &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert!(aggrs(&s).await.is_empty());
        let sum = s.pending_summary(10).await.unwrap();
        assert_eq!((sum.jobs, sum.aggregations), (0, 0));
        // A new job of the name starts from its own settings.
        let id2 = new_id();
        s.submit(&id2, &spec("gone", 1, None)).await.unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c.job.id, id2);
        assert_eq!(c.proxy, None);
        assert_eq!(empty(&s, Queue::Download).await, None);
    }

    pub async fn first_settings_stay_until_the_aggregation_drains(s: Arc<dyn Store>) {
        let first = AggrSettings::First;
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        s.submit_with(&ids[0], &spec("fst", 1, Some("http://p1.test:1")), first)
            .await
            .unwrap();
        // A later job cannot raise the limit nor swap the proxy while jobs remain.
        s.submit_with(&ids[1], &spec("fst", 3, Some("http://p2.test:2")), first)
            .await
            .unwrap();
        let c0 = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c0.job.id, ids[0]);
        assert_eq!(c0.proxy.as_deref(), Some("http://p1.test:1"));
        assert_eq!(empty(&s, Queue::Download).await, None, "limit still 1");
        // A retried job still counts: the settings stay.
        assert!(
            s.retry_download(
                &c0.job.id,
                &c0.token,
                &DownloadResult::default(),
                Duration::ZERO
            )
            .await
            .unwrap()
        );
        // Both jobs run, one at a time, with the first job's proxy.
        let mut ran = Vec::new();
        for _ in 0..2 {
            let c = claim_eventually(&s, Queue::Download, LONG, 5).await;
            assert_eq!(
                c.proxy.as_deref(),
                Some("http://p1.test:1"),
                "first job's proxy"
            );
            let (more, _) = s.claim_many(Queue::Download, LONG, 8).await.unwrap();
            assert!(more.is_empty(), "limit still 1");
            assert!(
                s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                    .await
                    .unwrap()
            );
            ran.push(c.job.id);
        }
        ran.sort();
        let mut want = ids[..2].to_vec();
        want.sort();
        assert_eq!(ran, want);
        // Drained: the next job's settings are taken.
        s.submit_with(&ids[2], &spec("fst", 2, Some("http://p3.test:3")), first)
            .await
            .unwrap();
        let c2 = claim(&s, Queue::Download, LONG).await;
        assert_eq!(c2.proxy.as_deref(), Some("http://p3.test:3"));
    }

    pub async fn tenants_have_their_own_aggregations(s: Arc<dyn Store>) {
        let of = |tenant: &str, limit, proxy| JobSpec {
            tenant: Some(tenant.into()),
            ..spec("shared", limit, proxy)
        };
        let a: Vec<String> = (0..2).map(|_| new_id()).collect();
        for id in &a {
            s.submit(id, &of("a", 1, None)).await.unwrap();
        }
        // Another tenant's job of the same aggr_id changes nothing of a's.
        let b = new_id();
        s.submit(&b, &of("b", 5, Some("http://evil.test:1")))
            .await
            .unwrap();
        let mut names: Vec<(String, u64)> = aggrs(&s).await;
        names.sort();
        assert_eq!(
            names,
            vec![("@a/shared".to_string(), 2), ("@b/shared".to_string(), 1)]
        );
        let (got, _) = s.claim_many(Queue::Download, LONG, 8).await.unwrap();
        let mut got: Vec<(String, Option<String>)> =
            got.into_iter().map(|c| (c.job.id, c.proxy)).collect();
        got.sort();
        let mut want = vec![
            (a[0].clone(), None),
            (b.clone(), Some("http://evil.test:1".to_string())),
        ];
        want.sort();
        assert_eq!(got, want, "a's limit 1 and no proxy; b's own");
        let rec = job(&s, &a[1]).await;
        assert_eq!(rec.spec.aggr_id, "shared");
        assert_eq!(rec.spec.tenant.as_deref(), Some("a"));
    }
}

// ------------------------------------------------------------------ timing

/// Not a correctness case: claim cost with many aggregations and jobs. Run with
/// `cargo nextest run --test store_conformance --run-ignored only --no-capture timing`.
async fn timing(name: &str, s: Arc<dyn Store>) {
    const AGGRS: usize = 500;
    const JOBS: usize = 2000;
    let t = Instant::now();
    for i in 0..JOBS {
        s.submit(&new_id(), &spec(&format!("t{}", i % AGGRS), 2, None))
            .await
            .unwrap();
    }
    let submit = t.elapsed();
    let t = Instant::now();
    let mut held = Vec::new();
    for _ in 0..AGGRS * 2 {
        held.push(claim(&s, Queue::Download, LONG).await);
    }
    let claims = t.elapsed();
    let t = Instant::now();
    for _ in 0..100 {
        assert_eq!(empty(&s, Queue::Download).await, None);
    }
    let empties = t.elapsed();
    let t = Instant::now();
    for c in &held[..AGGRS] {
        assert!(
            s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
    }
    let finishes = t.elapsed();
    let per = |d: Duration, n: usize| d / u32::try_from(n).unwrap();
    println!(
        "{name}: {JOBS} jobs in {AGGRS} aggregations: submit {:?}/op, claim {:?}/op, \
         empty claim {:?}/op, finish {:?}/op",
        per(submit, JOBS),
        per(claims, AGGRS * 2),
        per(empties, 100),
        per(finishes, AGGRS),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, run by hand"]
async fn timing_redis() {
    let b = redis_backend().await;
    timing("redis", b.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, run by hand"]
async fn timing_embedded() {
    // On the target disk rather than a tmpfs, so that the fsyncs are real.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let s = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    timing("embedded", Arc::new(s)).await;
}

/// Not a correctness case: end-to-end store throughput. `TASKS` concurrent tasks each
/// run whole jobs: submit, claim the download, finish it, claim the callback, finish
/// it (5 store writes). Run with
/// `cargo test --release --test store_conformance throughput -- --ignored --nocapture`;
/// `DL_TP_TASKS=64,256` sets the concurrencies tried (default 64, 256), `DL_TP_JOBS`
/// the jobs per run (default 6400, at least 10 per task).
async fn throughput(name: &str, s: Arc<dyn Store>, tasks: usize) -> (f64, Duration, Duration) {
    let total: usize = std::env::var("DL_TP_JOBS").map_or(6400, |n| n.parse().expect("DL_TP_JOBS"));
    let jobs_per_task = (total / tasks).max(10);
    // Warm up (connections, file growth).
    for _ in 0..2 {
        let id = new_id();
        s.submit(&id, &spec("warm", 100, None)).await.unwrap();
        let c = claim(&s, Queue::Download, LONG).await;
        s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
            .await
            .unwrap();
        let c = claim(&s, Queue::Callback, LONG).await;
        s.finish_callback(&c.job.id, &c.token, HOUR).await.unwrap();
    }
    async fn claim_retry(s: &Arc<dyn Store>, q: Queue) -> Claimed {
        loop {
            if let Claim::Job(c) = s.claim(q, LONG).await.unwrap() {
                return *c;
            }
            tokio::task::yield_now().await;
        }
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(jobs_per_task);
            let sp = spec(&format!("tp{t}"), 1000, None);
            for _ in 0..jobs_per_task {
                let t0 = Instant::now();
                s.submit(&new_id(), &sp).await.unwrap();
                let c = claim_retry(&s, Queue::Download).await;
                assert!(
                    s.finish_download(&c.job.id, &c.token, &ok_result(), HOUR)
                        .await
                        .unwrap()
                );
                let c = claim_retry(&s, Queue::Callback).await;
                assert!(s.finish_callback(&c.job.id, &c.token, HOUR).await.unwrap());
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    let jobs = lat.len();
    let ops = (jobs * 5) as f64 / elapsed.as_secs_f64();
    let p50 = lat[jobs / 2];
    let p99 = lat[jobs * 99 / 100];
    println!(
        "{name:>8}: {tasks:>4} tasks, {jobs} jobs in {elapsed:.2?}: {ops:.0} writes/s, \
         {:.0} jobs/s, per job p50 {p50:.2?} p99 {p99:.2?}",
        jobs as f64 / elapsed.as_secs_f64()
    );
    (ops, p50, p99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput, run by hand in release mode"]
async fn throughput_embedded_vs_redis() {
    let counts: Vec<usize> = std::env::var("DL_TP_TASKS")
        .unwrap_or_else(|_| "64,256".into())
        .split(',')
        .map(|n| n.trim().parse().expect("DL_TP_TASKS: numbers"))
        .collect();
    for tasks in counts {
        let r = redis_backend().await;
        let redis = throughput("redis", r.store.clone(), tasks).await;
        // On the target disk rather than a tmpfs, so that the fsyncs are real.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let s = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let embedded = throughput("embedded", Arc::new(s), tasks).await;
        println!(
            "{tasks:>4} tasks: embedded/redis writes/s {:.2}",
            embedded.0 / redis.0
        );
    }
}

// ------------------------------------------------------------------ embedded only

mod embedded_only {
    use super::*;

    const CHILD_ENV: &str = "DL_CONFORMANCE_CRASH_STORE";

    /// Run by `crash_mid_lease_recovers_after_expiry` in a child process: claims a job
    /// and aborts while holding its lease. A no-op in the normal test run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_child_helper() {
        let Ok(path) = std::env::var(CHILD_ENV) else {
            return;
        };
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(path.as_ref()).unwrap());
        s.submit("crashjob", &spec("crash", 1, None)).await.unwrap();
        let c = claim(&s, Queue::Download, Duration::from_millis(300)).await;
        println!("CLAIMED {}", c.job.id);
        std::process::abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_mid_lease_recovers_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "embedded_only::crash_child_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("CLAIMED crashjob") && !out.status.success(),
            "the child should claim and abort: {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );

        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let r = job(&s, "crashjob").await;
        assert_eq!(r.download_state, "InProgress", "the claim was committed");
        assert_eq!(r.download_attempts, 1);
        let c = claim_eventually(&s, Queue::Download, LONG, 10).await;
        assert_eq!(c.job.id, "crashjob");
        assert_eq!(c.job.download_attempts, 1);
        assert!(
            s.finish_download("crashjob", &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert_eq!(claim(&s, Queue::Callback, LONG).await.job.id, "crashjob");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_after_drop_mid_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let id = new_id();
        let token = {
            let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
            s.submit(&id, &spec("reopen", 1, None)).await.unwrap();
            s.put_stats("proc", "{}", HOUR).await.unwrap();
            claim(&s, Queue::Download, Duration::from_millis(200))
                .await
                .token
        };
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
        assert_eq!(s.get_stats("proc").await.unwrap().as_deref(), Some("{}"));
        assert_eq!(job(&s, &id).await.download_state, "InProgress");
        let c = claim_eventually(&s, Queue::Download, LONG, 10).await;
        assert_eq!(c.job.id, id);
        assert_eq!(c.job.download_attempts, 1);
        assert!(
            !s.finish_download(&id, &token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
        assert!(
            s.finish_download(&id, &c.token, &ok_result(), HOUR)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn second_open_of_the_same_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let first = EmbeddedStore::open(&path).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "store file {} is in use by another process",
                path.display()
            )) && err.contains("separate processes need Redis, or run `downloader serve`"),
            "{err}"
        );
        drop(first);
        EmbeddedStore::open(&path).expect("free again once closed");
    }
}

mod share_cases {
    use super::*;

    pub async fn claim_shares_skip_what_has_no_room(s: Arc<dyn Store>) {
        for _ in 0..3 {
            for spec in [
                spec("a", 10, None),
                spec("b", 10, None),
                tenant_spec("t", "x", 10),
                tenant_spec("t", "y", 10),
                tenant_spec("u", "x", 10),
            ] {
                s.submit(&new_id(), &spec).await.unwrap();
            }
        }
        let shares = ClaimShares {
            aggregations: vec![("a".into(), 1), ("b".into(), 0)],
            tenants: vec![("t".into(), 2)],
        };
        let (got, _) = claim_all_shared(&s, 32, &shares).await;
        let n = |k: &str| got.iter().filter(|a| a.as_str() == k).count();
        assert_eq!(n("a"), 1, "{got:?}");
        assert_eq!(n("b"), 0, "{got:?}");
        assert_eq!(n("@t/x") + n("@t/y"), 2, "{got:?}");
        assert_eq!(n("@u/x"), 3, "{got:?}");
        assert_eq!(got.len(), 6, "{got:?}");
        // What was skipped is still pending, for a claimer with room.
        let mut rest = Vec::new();
        while let Claim::Job(c) = s.claim(Queue::Download, LONG).await.unwrap() {
            rest.push(c.job.spec.aggr_key());
        }
        let r = |k: &str| rest.iter().filter(|a| a.starts_with(k)).count();
        assert_eq!(
            (r("a"), r("b"), r("@t/"), r("@u/")),
            (2, 3, 4, 0),
            "{rest:?}"
        );
    }

    pub async fn claim_shares_find_others_past_a_full_tenants_many_aggregations(s: Arc<dyn Store>) {
        // 600 ready aggregations of a full tenant, and one job of another: more than
        // one scan window (Redis) or claim budget (embedded) holds.
        let submits = (0..600).map(|i| {
            let s = s.clone();
            async move {
                s.submit(&new_id(), &tenant_spec("big", &format!("a{i}"), 5))
                    .await
                    .unwrap()
            }
        });
        futures_util::future::join_all(submits).await;
        s.submit(&new_id(), &tenant_spec("small", "z", 5))
            .await
            .unwrap();
        let shares = ClaimShares {
            aggregations: Vec::new(),
            tenants: vec![("big".into(), 0)],
        };
        let (got, calls) = claim_all_shared(&s, 4, &shares).await;
        assert_eq!(got, ["@small/z"], "after {calls} claims");
        assert!(calls <= 6, "{calls} claims to find the other tenant's job");
        // Without shares the full tenant's jobs are claimable as before.
        let (jobs, _) = s.claim_many(Queue::Download, LONG, 32).await.unwrap();
        assert_eq!(jobs.len(), 32);
    }
}
