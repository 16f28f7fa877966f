//! Rate limits measured at the origin: `aggr_rate` across processors, bursts,
//! per-host rate across aggregations, Retry-After pauses, and limiter keys expiring.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Requests per second over the span of `times` (first to last).
fn rate(times: &[Instant]) -> f64 {
    let span = (*times.last().unwrap() - times[0]).as_secs_f64();
    (times.len() - 1) as f64 / span
}

/// Runs one job first so that the processor's HTTP client exists (its first request
/// also builds the client) and only the limiter shapes the measured requests.
async fn warm_up(svc: &Service, origin: &Origin, rx: &Receiver) {
    let id = svc
        .submit(job(origin, "/file/f?warm-up", &rx.url(0), "warm-up", 1))
        .await;
    rx.wait_for(&id, 20).await;
    origin.state.times.lock().unwrap().clear();
}

fn rated(origin: &Origin, rx: &Receiver, i: usize, aggr: &str, rate: f64, burst: u32) -> Value {
    let mut j = job(origin, &format!("/file/f?{aggr}-{i}"), &rx.url(0), aggr, 50);
    j["aggr_rate"] = json!(rate);
    j["aggr_burst"] = json!(burst);
    j
}

#[tokio::test(flavor = "multi_thread")]
async fn three_processors_hold_an_aggregation_to_its_rate() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start(json!({})).await;
    svc.spawn("processor-2", &["processor"]);
    svc.spawn("processor-3", &["processor"]);
    origin.add_file("f", b"x".to_vec());
    warm_up(&svc, &origin, &rx).await;
    // 201 requests at 20/s, burst 1: 200 intervals of 50 ms, about 10 s.
    let mut ids = Vec::new();
    for i in 0..201 {
        ids.push(svc.submit(rated(&origin, &rx, i, "r20", 20.0, 1)).await);
    }
    // While it runs, the dashboard and a queued job say they wait for the rate.
    eventually(5, "the dashboard to show the rate wait", async || {
        let (_, dash) = svc.get("/dashboard/aggregations").await;
        dash.as_array()?
            .iter()
            .any(|a| a["name"] == "jobs:r20" && a["waiting_for"] == "aggr_rate")
            .then_some(())
    })
    .await;
    let last = ids.last().unwrap();
    eventually(5, "the last job to show its rate wait", async || {
        (svc.job(last).await["waiting_for"] == "aggr_rate").then_some(())
    })
    .await;
    for id in &ids {
        rx.wait_for(id, 40).await;
    }
    let times = origin.all_times();
    assert_eq!(times.len(), 201);
    let r = rate(&times);
    assert!(
        (18.0..=22.0).contains(&r),
        "{r:.2} requests/s, want 20 ± 10 %"
    );
    // And no second within the run holds much more than its share: the limiter spaces
    // claims, but requests reach the origin with the processors' scheduling jitter
    // (a download delayed 100 ms by a busy machine bunches with the next ones).
    for (i, t) in times.iter().enumerate() {
        let in_a_second = times[i..]
            .iter()
            .take_while(|u| **u - *t < Duration::from_secs(1))
            .count();
        assert!(in_a_second <= 26, "{in_a_second} requests within 1 s");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_goes_at_once_then_the_rate_holds() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("f", b"x".to_vec());
    warm_up(&svc, &origin, &rx).await;
    // 2/s with a burst of 5: five at once, then one every 500 ms.
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(svc.submit(rated(&origin, &rx, i, "burst", 2.0, 5)).await);
    }
    for id in &ids {
        rx.wait_for(id, 30).await;
    }
    let t = origin.all_times();
    assert_eq!(t.len(), 9);
    let since = |i: usize| (t[i] - t[0]).as_secs_f64();
    assert!(since(4) < 0.3, "the burst took {:.3} s", since(4));
    // 500 ms less the scheduling slack (a fifth of an interval).
    assert!(
        since(5) >= 0.35,
        "the 6th came {:.3} s after the first",
        since(5)
    );
    assert!(since(8) >= 1.7, "9 requests took {:.3} s, want 2", since(8));
    let after = (t[8] - t[5]).as_secs_f64();
    assert!(
        (1.3..=1.8).contains(&after),
        "3 intervals took {after:.3} s, want 1.5"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn per_host_rate_holds_across_aggregations_and_processors() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start(json!({"processor": {"per_host_rate": 20}})).await;
    svc.spawn("processor-2", &["processor"]);
    origin.add_file("f", b"x".to_vec());
    let mut ids = Vec::new();
    for i in 0..30 {
        for aggr in ["host-a", "host-b"] {
            let j = job(
                &origin,
                &format!("/file/f?{aggr}-{i}"),
                &rx.url(0),
                aggr,
                20,
            );
            ids.push(svc.submit(j).await);
        }
    }
    for id in &ids {
        let cb = rx.wait_for(id, 30).await;
        assert_eq!(cb["success"], true, "{cb}");
    }
    let times = origin.all_times();
    assert_eq!(times.len(), 60, "each job asked the origin once");
    let r = rate(&times);
    assert!(
        (18.0..=22.0).contains(&r),
        "{r:.2} requests/s to one host, want 20 ± 10 %"
    );
    // Deferred jobs spent no attempt.
    for id in &ids {
        assert_eq!(svc.job(id).await["download_attempts"], 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_pauses_the_host_without_spending_a_retry() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("f", b"x".to_vec());
    // No retries allowed: the pause must not spend one.
    let mut j = job(&origin, "/pause/2/1/k", &rx.url(0), "pause-a", 5);
    j["max_retries"] = json!(0);
    let paused = svc.submit(j).await;
    eventually(10, "the 429", async || {
        (origin.hits("/pause/2/1/k") == 1).then_some(())
    })
    .await;
    // Another aggregation's job to the same host waits for the pause too.
    let other = svc
        .submit(job(&origin, "/file/f", &rx.url(0), "pause-b", 5))
        .await;
    let first_429 = origin.times("/pause/2/1/k")[0];
    // The claim holds it back for the paused host, spending nothing.
    let rec = eventually(2, "the other job to wait for the paused host", async || {
        let rec = svc.job(&other).await;
        (rec["waiting_for"] == "host_paused").then_some(rec)
    })
    .await;
    assert_eq!(rec["download_attempts"], 0, "{rec}");
    let cb = rx.wait_for(&paused, 20).await;
    assert_eq!(cb["success"], true, "{cb}");
    rx.wait_for(&other, 20).await;
    let after: Vec<Duration> = origin
        .all_times()
        .into_iter()
        .filter(|t| *t > first_429)
        .map(|t| t - first_429)
        .collect();
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.iter().all(|d| *d >= Duration::from_millis(1950)),
        "a request reached the paused host after {after:?}"
    );
    let rec_after = svc.job(&paused).await;
    assert_eq!(rec_after["download_attempts"], 1, "{rec_after}");
    // The pause is counted in the processor's stats and logged.
    eventually(10, "the pause in the processor's stats", async || {
        let (_, v) = svc.get("/stats/processor").await;
        (v["hostPauses"] == 1 && v["deferred.host_paused"] == 1).then_some(())
    })
    .await;
    assert!(
        svc.logs().contains("pausing its host"),
        "no log line about the pause"
    );
    // Limiter keys expire by themselves.
    let keys = svc.keys_with_ttl("host*");
    assert!(
        keys.iter().all(|(_, ttl)| *ttl != -1),
        "a key without expiry: {keys:?}"
    );
    eventually(10, "limiter keys to expire", async || {
        svc.keys_with_ttl("host*").is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_keys_expire_and_bad_rates_are_refused() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc =
        Service::start(json!({"processor": {"per_host_rate": 50, "per_host_concurrency": 2}}))
            .await;
    origin.add_file("f", b"x".to_vec());
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(svc.submit(rated(&origin, &rx, i, "keys", 10.0, 2)).await);
    }
    for id in &ids {
        rx.wait_for(id, 20).await;
    }
    let keys = svc.keys_with_ttl("*rate:*");
    assert!(!keys.is_empty(), "the limiters wrote state");
    assert!(
        keys.iter().all(|(_, ttl)| *ttl != -1),
        "a key without expiry: {keys:?}"
    );
    eventually(10, "limiter keys to expire", async || {
        let left: Vec<_> = [
            "rate:*",
            "hostrate:*",
            "hostslots:*",
            "hostpause:*",
            "hostwait:*",
        ]
        .iter()
        .flat_map(|p| svc.keys_with_ttl(p))
        .collect();
        left.is_empty().then_some(())
    })
    .await;
    for (field, value, says) in [
        ("aggr_rate", json!(0), "aggr_rate"),
        ("aggr_rate", json!(-1.5), "aggr_rate"),
        ("aggr_rate", json!("fast"), "aggr_rate"),
        ("aggr_burst", json!(0), "aggr_burst"),
        ("aggr_burst", json!(2.5), "aggr_burst"),
    ] {
        let mut j = rated(&origin, &rx, 0, "bad", 1.0, 1);
        j[field] = value.clone();
        let (st, body) = svc.post_raw("/download", &j.to_string()).await;
        assert_eq!(st, 400, "{field}={value}: {body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn max_concurrent_downloads_caps_one_processor_over_all_aggregations() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"processor": {"max_concurrent_downloads": 2}})).await;
    // Six aggregations with room for 5 each: the processor still runs 2 at a time.
    let mut ids = Vec::new();
    for a in 0..6 {
        for _ in 0..2 {
            let j = job(&origin, "/aggr/all/300", &rx.url(0), &format!("cap-{a}"), 5);
            ids.push(svc.submit(j).await);
        }
    }
    for id in &ids {
        assert_eq!(rx.wait_for(id, 30).await["success"], true);
    }
    let most = origin.max_concurrency("all");
    assert!((1..=2).contains(&most), "{most} downloads at once");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_host_concurrency_holds_across_processors() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start(json!({"processor": {"per_host_concurrency": 2}})).await;
    svc.spawn("processor-2", &["processor"]);
    // Three aggregations with room for 4 each, one host: at most 2 at once. Waiting
    // jobs are parked and woken as slots free, so this takes well under the 2 s
    // fallback per wave.
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for a in 0..3 {
        for _ in 0..4 {
            let j = job(
                &origin,
                "/aggr/onehost/1",
                &rx.url(0),
                &format!("hc-{a}"),
                4,
            );
            ids.push(svc.submit(j).await);
        }
    }
    for id in &ids {
        assert_eq!(rx.wait_for(id, 30).await["success"], true);
    }
    let most = origin.max_concurrency("onehost");
    assert!(
        (1..=2).contains(&most),
        "{most} downloads from one host at once"
    );
    for id in &ids {
        assert_eq!(svc.job(id).await["download_attempts"], 1);
    }
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_after_a_redirect_pauses_the_host_that_answered() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("f", b"x".to_vec());
    // 127.0.0.1 redirects to localhost, which answers 429 with Retry-After: 2.
    let id = svc
        .submit(job(
            &origin,
            "/via-localhost/pause/2/1/r",
            &rx.url(0),
            "redir",
            5,
        ))
        .await;
    eventually(10, "the 429", async || {
        (origin.hits("/pause/2/1/r") == 1).then_some(())
    })
    .await;
    let t429 = origin.times("/pause/2/1/r")[0];
    // The job's own host was not paused: its other jobs go at once.
    let direct = svc
        .submit(job(&origin, "/file/f", &rx.url(0), "redir-2", 5))
        .await;
    rx.wait_for(&direct, 10).await;
    let direct_at = origin.times("/file/f")[0];
    assert!(
        direct_at - t429 < Duration::from_millis(1500),
        "a job to the redirecting host waited {:?}",
        direct_at - t429
    );
    assert_eq!(rx.wait_for(&id, 20).await["success"], true);
    let again = origin.times("/pause/2/1/r")[1];
    assert!(
        again - t429 >= Duration::from_millis(1950),
        "{:?}",
        again - t429
    );
}
