//! Failed callbacks (dead letters): listed, retried one by one or in bulk, kept for
//! `notifier.failed_retention` and then deleted with their files.

mod common;

use common::*;
use downloader::auth::{Scope, new_token};
use serde_json::{Value, json};

async fn get(svc: &Service, path: &str, secret: Option<&str>) -> (u16, Value) {
    let mut r = svc.http.get(svc.url(path));
    if let Some(s) = secret {
        r = r.bearer_auth(s);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn post(svc: &Service, path: &str, secret: Option<&str>, body: Value) -> (u16, Value) {
    let mut r = svc.http.post(svc.url(path)).json(&body);
    if let Some(s) = secret {
        r = r.bearer_auth(s);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The ids `GET /callbacks/failed` lists (one page of up to 1000).
async fn listed(svc: &Service, query: &str, secret: Option<&str>) -> Vec<String> {
    let (st, v) = get(svc, &format!("/callbacks/failed?limit=1000{query}"), secret).await;
    assert_eq!(st, 200, "{v}");
    v["callbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["job_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_callbacks_are_listed_retried_and_expire_with_their_files() {
    // 0.00003 days: about 2.6 s.
    let svc = Service::start(json!({
        "notifier": {"callback_retries": 0, "failed_retention": 0.00003}
    }))
    .await;
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"kept until the dead letter expires".to_vec());
    let cb = rx.url(1);
    let id = svc.submit(job(&origin, "/file/f", &cb, "dl", 1)).await;
    eventually(20, "the callback to fail", async || {
        (svc.job(&id).await["callback_state"] == "Failed").then_some(())
    })
    .await;
    let (st, page) = get(&svc, "/callbacks/failed", None).await;
    assert_eq!(st, 200, "{page}");
    let item = &page["callbacks"][0];
    assert_eq!(item["job_id"], id.as_str());
    assert_eq!(item["aggr_id"], "dl");
    assert_eq!(item["attempts"], 1);
    assert!(item["error"].as_str().unwrap().contains("500"), "{item}");
    assert!(page["next_cursor"].is_null());

    // Retried by id: its second attempt succeeds (the receiver failed only once).
    let (st, r) = post(&svc, "/callbacks/retry", None, json!({"ids": [id]})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["requeued"], 1);
    let delivered = rx.wait_for(&id, 20).await;
    assert_eq!(delivered["success"], true);
    assert!(listed(&svc, "", None).await.is_empty());

    // One that fails for good is deleted, file and record, once the retention passed.
    let id2 = svc
        .submit(job(&origin, "/file/f", &rx.url(1000), "dl", 1))
        .await;
    eventually(20, "the second callback to fail", async || {
        listed(&svc, "", None).await.contains(&id2).then_some(())
    })
    .await;
    let file = svc.storage().join(&id2[..3]).join(&id2);
    assert!(file.exists());
    eventually(30, "the dead letter to expire", async || {
        (svc.get(&format!("/jobs/{id2}")).await.0 == 404).then_some(())
    })
    .await;
    assert!(!file.exists(), "its file went with it");
    assert!(listed(&svc, "", None).await.is_empty());
    let (st, r) = post(&svc, &format!("/retry/{id2}"), None, json!({})).await;
    assert_eq!(st, 404, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_retry_is_bounded_and_tenants_see_their_own() {
    let (a, a_entry) = new_token("a", &[Scope::Submit, Scope::Read]).unwrap();
    let (b, b_entry) = new_token("b", &[Scope::Submit, Scope::Read]).unwrap();
    let (ops, ops_entry) = new_token("ops", &[Scope::Admin]).unwrap();
    let (viewer, viewer_entry) = new_token("viewer", &[Scope::Read]).unwrap();
    let svc = Service::start(json!({
        "api": {"tokens": [a_entry, b_entry, ops_entry, viewer_entry]},
        "notifier": {"callback_retries": 0, "concurrency": 20}
    }))
    .await;
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"x".to_vec());
    let mut a_ids = Vec::new();
    for i in 0..30 {
        let aggr = if i < 25 { "bulk" } else { "other" };
        // Fails once: a retried callback is delivered and leaves the list.
        let (st, v) = post(
            &svc,
            "/download",
            Some(&a),
            job(&origin, "/file/f", &rx.url(1), aggr, 10),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        a_ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (st, v) = post(
        &svc,
        "/download",
        Some(&b),
        job(&origin, "/file/f", &rx.url(1000), "bulk", 10),
    )
    .await;
    assert_eq!(st, 201);
    let b_id = v["id"].as_str().unwrap().to_string();
    eventually(30, "31 failed callbacks", async || {
        (listed(&svc, "", Some(&ops)).await.len() == 31).then_some(())
    })
    .await;

    // Each tenant lists its own, under its own aggregation names.
    assert_eq!(listed(&svc, "", Some(&a)).await.len(), 30);
    assert_eq!(listed(&svc, "&aggr_id=bulk", Some(&a)).await.len(), 25);
    assert_eq!(
        listed(&svc, "&aggr_id=bulk", Some(&b)).await,
        vec![b_id.clone()]
    );
    assert_eq!(listed(&svc, "&aggr_id=@a/bulk", Some(&ops)).await.len(), 25);
    let (_, page) = get(&svc, "/callbacks/failed?limit=100&aggr_id=bulk", Some(&b)).await;
    assert_eq!(page["callbacks"][0]["aggr_id"], "bulk");
    // Pages of 7 cover the 30 once each.
    let mut seen = Vec::new();
    let mut next = String::new();
    loop {
        let (st, page) = get(&svc, &format!("/callbacks/failed?limit=7{next}"), Some(&a)).await;
        assert_eq!(st, 200, "{page}");
        for c in page["callbacks"].as_array().unwrap() {
            seen.push(c["job_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => next = format!("&cursor={c}"),
            None => break,
        }
    }
    seen.sort();
    let mut want = a_ids.clone();
    want.sort();
    assert_eq!(seen, want);

    // B cannot retry A's; a bounded bulk retry says there is more.
    let (st, r) = post(
        &svc,
        "/callbacks/retry",
        Some(&b),
        json!({"ids": [a_ids[0]]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(r["requeued"], 0);
    assert_eq!(r["skipped"][0]["reason"], "not found");
    let (st, r) = post(
        &svc,
        "/callbacks/retry",
        Some(&a),
        json!({"aggr_id": "bulk", "limit": 20}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["requeued"], 20);
    assert_eq!(r["more"], true);
    assert_eq!(
        listed(&svc, "&aggr_id=bulk", Some(&b)).await,
        vec![b_id],
        "B's untouched"
    );
    let (_, r) = post(&svc, "/callbacks/retry", Some(&a), json!({"all": true})).await;
    assert_eq!(r["requeued"], 10, "the 5 left of bulk and the 5 of other");
    assert_eq!(r["more"], false);

    // Bad input names the field.
    for (q, says) in [
        ("?limit=0", "limit"),
        ("?limit=x", "limit"),
        ("?cursor=zzz", "cursor"),
        ("?aggr_id=", "aggr_id"),
        ("?page=2", "page"),
    ] {
        let (st, v) = get(&svc, &format!("/callbacks/failed{q}"), Some(&a)).await;
        assert_eq!(st, 400, "{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{q}: {v}");
    }
    let (st, v) = post(&svc, "/callbacks/retry", Some(&a), json!({"ids": ["x"]})).await;
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("ids[0]"), "{v}");
    // Scopes: listing needs read, retrying submit.
    assert_eq!(get(&svc, "/callbacks/failed", None).await.0, 401);
    assert_eq!(get(&svc, "/callbacks/failed", Some(&viewer)).await.0, 200);
    assert_eq!(
        post(
            &svc,
            "/callbacks/retry",
            Some(&viewer),
            json!({"all": true})
        )
        .await
        .0,
        403
    );
}
