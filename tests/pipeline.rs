//! End-to-end tests of the download pipeline: the real binary's `web`, `processor` and
//! `notifier` against Redis, a local origin and a local callback receiver.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::{Value, json};

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_file_byte_for_byte_and_calls_back() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    origin.add_file("data.bin", body.clone());

    let mut j = job(&origin, "/file/data.bin", &rx.url(0), "a1", 3);
    j["extra"] = json!("opaque-extra");
    let id = svc.submit(j).await;
    let cb = rx.wait_for(&id, 20).await;

    assert_eq!(cb["success"], true, "{cb}");
    assert_eq!(cb["error"], "");
    assert_eq!(cb["extra"], "opaque-extra");
    assert_eq!(cb["resource_url"], origin.url("/file/data.bin"));
    assert_eq!(
        cb["download_url"],
        format!("http://files.test/dl/{}/{id}", &id[..3])
    );
    assert_eq!(cb["job_id"], id.as_str());
    assert_eq!(cb["response_code"], 200);
    assert_eq!(cb["delivered"], true);
    assert_eq!(cb["delivery_error"], "");
    assert_eq!(cb["image_size"], "");
    assert!(
        cb.get("thumbnails").is_none(),
        "no thumbnails asked, no field: {cb}"
    );
    let stored = std::fs::read(svc.storage().join(&id[..3]).join(&id)).unwrap();
    assert!(stored == body, "stored file differs from the origin's");
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(svc.storage().join(&id[..3]))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    // The receiver answers before the notifier records the delivery.
    let state = eventually(10, "the delivery to be recorded", async || {
        let state = svc.job(&id).await;
        (state["callback_state"] == "Success").then_some(state)
    })
    .await;
    assert_eq!(state["download_state"], "Success");
    assert_eq!(state["download_attempts"], 1);
    assert!(state["finished_at"].as_u64().unwrap() >= state["created_at"].as_u64().unwrap());
    assert_eq!(rx.for_job(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn not_found_fails_at_once() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let id = svc
        .submit(job(&origin, "/status/404", &rx.url(0), "a", 1))
        .await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], false);
    assert_eq!(cb["error"], "Received status code 404");
    assert_eq!(cb["response_code"], 404);
    assert_eq!(cb["download_url"], "");
    assert_eq!(origin.hits("/status/404"), 1, "a 404 is not retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn mime_type_patterns_and_negation() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("img.png", png(4, 3));
    origin.add_file("text.txt", b"just some text\n".to_vec());

    let cases = [
        ("/file/img.png", "image/*", true),
        ("/file/img.png", "image/*,!image/png", false),
        ("/file/img.png", "!image/gif", true),
        ("/file/text.txt", "image/*", false),
        ("/file/text.txt", "text/plain", true),
    ];
    let mut ids = Vec::new();
    for (path, pattern, _) in &cases {
        let mut j = job(&origin, path, &rx.url(0), "mime", 5);
        j["mime_type"] = json!(pattern);
        ids.push(svc.submit(j).await);
    }
    for ((path, pattern, ok), id) in cases.iter().zip(&ids) {
        let cb = rx.wait_for(id, 20).await;
        assert_eq!(cb["success"], *ok, "{path} against {pattern}: {cb}");
        if !ok {
            let e = cb["error"].as_str().unwrap();
            assert!(e.starts_with("Expected mime-type"), "{e}");
            let found = if path.ends_with(".png") {
                "image/png"
            } else {
                "text/plain"
            };
            assert!(e.contains(found), "{e}");
            assert!(!svc.storage().join(&id[..3]).join(id).exists());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn extracts_image_size_and_leaves_it_empty_for_other_files() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("img.png", png(37, 21));
    origin.add_file("doc.txt", b"not an image".to_vec());
    let mut a = job(&origin, "/file/img.png", &rx.url(0), "img", 2);
    a["extract_image_size"] = json!(true);
    let mut b = job(&origin, "/file/doc.txt", &rx.url(0), "img", 2);
    b["extract_image_size"] = json!(true);
    let (a, b) = (svc.submit(a).await, svc.submit(b).await);
    assert_eq!(rx.wait_for(&a, 20).await["image_size"], "37x21");
    let cb = rx.wait_for(&b, 20).await;
    assert_eq!(cb["success"], true);
    assert_eq!(cb["image_size"], "");
}

#[tokio::test(flavor = "multi_thread")]
async fn thumbnails_are_made_stored_and_reported() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("photo.png", png(400, 300));
    let mut j = job(&origin, "/file/photo.png", &rx.url(0), "thumbs", 1);
    j["thumbnails"] = json!([
        {"name": "s", "width": 100, "height": 100},
        {"name": "sq", "width": 50, "height": 50, "fit": "cover", "format": "png"}
    ]);
    let id = svc.submit(j).await;
    let cb = rx.wait_for(&id, 30).await;
    assert_eq!(cb["success"], true, "{cb}");
    let thumbs = cb["thumbnails"].as_array().unwrap();
    assert_eq!(thumbs.len(), 2, "{cb}");
    for (t, (name, ext, w, h, format)) in thumbs
        .iter()
        .zip([("s", "jpg", 100, 75, "jpeg"), ("sq", "png", 50, 50, "png")])
    {
        assert_eq!(t["name"], name);
        assert_eq!(t["format"], format);
        assert_eq!(
            (t["width"].as_u64().unwrap(), t["height"].as_u64().unwrap()),
            (w, h)
        );
        let rel = format!("{}/{id}.{name}.{ext}", &id[..3]);
        assert_eq!(t["url"], format!("http://files.test/dl/{rel}"));
        let bytes = std::fs::read(svc.storage().join(&rel)).unwrap();
        assert_eq!(t["bytes"].as_u64().unwrap(), bytes.len() as u64);
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (w as u32, h as u32));
    }
    // The job's state shows them too.
    assert_eq!(
        svc.job(&id).await["thumbnails_made"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// A body held in memory (small) is thumbnailed from memory, a larger one from the stored
/// file: both give what the thumbnailer makes from the original bytes.
#[tokio::test(flavor = "multi_thread")]
async fn thumbnails_from_memory_and_from_disk_match_the_original() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let mut bmp = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_fn(400, 300, |x, y| image::Rgb([x as u8, y as u8, 90]))
        .write_to(&mut bmp, image::ImageFormat::Bmp)
        .unwrap();
    let files = [
        ("small.png", png(400, 300)),
        ("large.bmp", bmp.into_inner()),
    ];
    // One under and one over the 256 KiB the fetcher keeps in memory.
    assert!(files[0].1.len() < 256 * 1024 && files[1].1.len() > 256 * 1024);
    let t = downloader::thumbnail::Thumbnailer::new(Default::default());
    for (name, body) in files {
        origin.add_file(name, body.clone());
        let mut j = job(&origin, &format!("/file/{name}"), &rx.url(0), "thumbs", 1);
        j["thumbnails"] = json!([{"name": "s", "width": 100, "height": 100, "format": "png"}]);
        let id = svc.submit(j).await;
        let cb = rx.wait_for(&id, 30).await;
        assert_eq!(cb["success"], true, "{name}: {cb}");
        let stored = std::fs::read(svc.storage().join(format!("{}/{id}.s.png", &id[..3]))).unwrap();
        let mut spec = downloader::thumbnail::Spec::new(100, 100);
        spec.name = "s".into();
        spec.format = downloader::thumbnail::OutputFormat::Png;
        assert_eq!(
            stored,
            t.make_blocking(&body, &spec).unwrap().bytes,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_cannot_be_thumbnailed_fails_the_job_at_once() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    origin.add_file("doc.txt", b"plain text, not an image".to_vec());
    let mut j = job(&origin, "/file/doc.txt", &rx.url(0), "thumbs", 1);
    j["thumbnails"] = json!([{"name": "s", "width": 100, "height": 100}]);
    let id = svc.submit(j).await;
    let cb = rx.wait_for(&id, 30).await;
    assert_eq!(cb["success"], false);
    let e = cb["error"].as_str().unwrap();
    assert!(e.starts_with("thumbnail s: "), "{e}");
    assert_eq!(cb["thumbnails"], json!([]));
    assert_eq!(svc.job(&id).await["download_attempts"], 1, "not retried");
    assert_eq!(origin.hits("/file/doc.txt"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn web_serves_post_thumbnail() {
    let svc = Service::start_with(json!({}), &[]).await;
    let r = svc
        .http
        .post(svc.url("/thumbnail?width=20&height=20&format=png"))
        .body(png(80, 40))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (20, 10));
    let r = svc
        .http
        .post(svc.url("/thumbnail?width=20&height=20"))
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_errors_fail_at_once() {
    // Plain HTTP where TLS is expected: the handshake fails.
    let plain = start_truncating_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let id = svc
        .submit(
            json!({"aggr_id": "tls", "aggr_limit": 1, "url": format!("https://{plain}/x"),
            "callback_url": rx.url(0)}),
        )
        .await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], false);
    assert!(
        cb["error"].as_str().unwrap().starts_with("TLS error"),
        "{cb}"
    );
    assert_eq!(svc.job(&id).await["download_attempts"], 1, "not retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_go_through_the_aggregations_proxy() {
    use std::sync::{Arc, Mutex};
    // A forward proxy that records the absolute URIs it is asked for.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let proxy = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = s2.clone();
        async move {
            seen.lock().unwrap().push(req.uri().to_string());
            "via proxy"
        }
    });
    let proxy_addr = serve_local(proxy).await;

    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let id = svc
        .submit(
            json!({"aggr_id": "px", "aggr_limit": 1, "aggr_proxy": format!("http://{proxy_addr}"),
            "url": "http://merchant.invalid/feed.xml", "callback_url": rx.url(0)}),
        )
        .await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], true, "{cb}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["http://merchant.invalid/feed.xml".to_string()]
    );
    let stored = std::fs::read(svc.storage().join(&id[..3]).join(&id)).unwrap();
    assert_eq!(stored, b"via proxy");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried_until_success() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let id = svc
        .submit(job(&origin, "/flaky/2/x", &rx.url(0), "r", 1))
        .await;
    let cb = rx.wait_for(&id, 30).await;
    assert_eq!(cb["success"], true, "{cb}");
    assert_eq!(origin.hits("/flaky/2/x"), 3);
    assert_eq!(svc.job(&id).await["download_attempts"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_requests_honours_retry_after() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let id = svc
        .submit(job(&origin, "/ratelimited/1/k", &rx.url(0), "429", 1))
        .await;
    let cb = rx.wait_for(&id, 30).await;
    assert_eq!(cb["success"], true, "{cb}");
    let times = origin.times("/ratelimited/1/k");
    assert_eq!(times.len(), 2);
    let gap = times[1] - times[0];
    assert!(
        gap >= std::time::Duration::from_millis(950),
        "retried after {gap:?}, Retry-After said 1 s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_files_fail_at_once() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"processor": {"max_download_bytes": 1000}})).await;
    origin.add_file("big", vec![b'a'; 5000]);
    origin.add_file("small", vec![b'a'; 1000]);
    let big = svc
        .submit(job(&origin, "/file/big", &rx.url(0), "size", 2))
        .await;
    let small = svc
        .submit(job(&origin, "/file/small", &rx.url(0), "size", 2))
        .await;
    let cb = rx.wait_for(&big, 20).await;
    assert_eq!(cb["success"], false);
    assert!(
        cb["error"]
            .as_str()
            .unwrap()
            .contains("limit of 1000 bytes"),
        "{cb}"
    );
    assert_eq!(origin.hits("/file/big"), 1);
    assert_eq!(rx.wait_for(&small, 20).await["success"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_retries_bounds_origin_hits() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let mut ids = Vec::new();
    for (retries, key) in [(0, "zero"), (1, "one")] {
        let mut j = job(&origin, &format!("/flaky/100/{key}"), &rx.url(0), "mr", 2);
        j["max_retries"] = json!(retries);
        ids.push((svc.submit(j).await, retries, key));
    }
    for (id, retries, key) in ids {
        let cb = rx.wait_for(&id, 30).await;
        assert_eq!(cb["success"], false);
        assert_eq!(cb["error"], "Received status code 500");
        assert_eq!(cb["response_code"], 500);
        assert_eq!(origin.hits(&format!("/flaky/100/{key}")), retries + 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_body_is_an_unexpected_eof_and_retried() {
    let truncating = start_truncating_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let id = svc
        .submit(json!({
            "aggr_id": "t", "aggr_limit": 1, "max_retries": 1,
            "url": format!("http://{truncating}/file"), "callback_url": rx.url(0),
        }))
        .await;
    let cb = rx.wait_for(&id, 30).await;
    assert_eq!(cb["success"], false);
    let e = cb["error"].as_str().unwrap();
    assert!(e.contains("unexpected EOF"), "{e}");
    assert_eq!(svc.job(&id).await["download_attempts"], 2);
    assert!(
        !svc.storage().join(&id[..3]).join(&id).exists(),
        "no partial file at the final path"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_headers_reach_the_origin() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({
        "processor": {"request_headers": {"User-Agent": "Downloader-Test", "X-Default": "d", "X-Over": "config"}}
    }))
    .await;
    origin.add_file("h", b"x".to_vec());
    let mut j = job(&origin, "/file/h", &rx.url(0), "h", 1);
    j["request_headers"] = json!({"X-Over": "job", "X-Number": 42});
    let id = svc.submit(j).await;
    rx.wait_for(&id, 20).await;
    let h = origin.last_headers("/file/h");
    assert_eq!(h["user-agent"], "Downloader-Test");
    assert_eq!(h["x-default"], "d");
    assert_eq!(h["x-over"], "job");
    assert_eq!(h["x-number"], "42");
}

#[tokio::test(flavor = "multi_thread")]
async fn download_timeout_bounds_the_transfer() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let mut j = job(&origin, "/slow/5000", &rx.url(0), "slow", 1);
    j["download_timeout"] = json!(1);
    j["max_retries"] = json!(0);
    let started = std::time::Instant::now();
    let id = svc.submit(j).await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], false);
    assert!(cb["error"].as_str().unwrap().contains("timed out"), "{cb}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn callback_is_retried_after_a_failing_receiver() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    // Three attempts: two fail, the third is delivered.
    let svc = Service::start(json!({"notifier": {"callback_attempts": 3}})).await;
    origin.add_file("f", b"x".to_vec());
    let cb_url = rx.url(2);
    let id = svc.submit(job(&origin, "/file/f", &cb_url, "cb", 1)).await;
    let cb = rx.wait_for(&id, 30).await;
    assert_eq!(cb["success"], true);
    assert_eq!(rx.hits(&cb_url), 3);
    assert_eq!(rx.for_job(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_callback_is_kept_for_retry_endpoint() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"notifier": {"callback_retries": 1}})).await;
    origin.add_file("f", b"x".to_vec());
    // Fails its first 2 deliveries: both attempts fail, then the retry endpoint works.
    let cb_url = rx.url(2);
    let id = svc.submit(job(&origin, "/file/f", &cb_url, "rt", 1)).await;
    eventually(30, "callback to be marked failed", async || {
        (svc.job(&id).await["callback_state"] == "Failed").then_some(())
    })
    .await;
    let state = svc.job(&id).await;
    assert!(
        state["callback_error"].as_str().unwrap().contains("500"),
        "{state}"
    );
    assert_eq!(rx.hits(&cb_url), 2);

    let (st, _) = svc.post_raw(&format!("/retry/{id}"), "").await;
    assert_eq!(st, 204);
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], true);
    assert_eq!(svc.job(&id).await["callback_state"], "Success");

    // Delivered now: nothing to retry.
    let (st, body) = svc.post_raw(&format!("/retry/{id}"), "").await;
    assert_eq!(st, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("has not failed"));
    let (st, body) = svc.post_raw("/retry/nosuchjob", "").await;
    assert_eq!(st, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_follows_the_drain_file() {
    let svc = Service::start_with(json!({}), &[]).await;
    let (st, body) = svc.get("/hb").await;
    assert_eq!((st, body), (200, Value::String("OK".into())));
    std::fs::write(svc.dir.path().join("disable_api"), "").unwrap();
    let (st, body) = svc.get("/hb").await;
    assert_eq!(st, 503);
    assert!(body.as_str().unwrap().contains("disable_api"));
    std::fs::remove_file(svc.dir.path().join("disable_api")).unwrap();
    assert_eq!(svc.get("/hb").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_and_dashboard_endpoints() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    // No processor yet: jobs stay pending and show on the dashboard.
    let mut svc = Service::start_with(json!({}), &[]).await;
    assert_eq!(svc.get("/stats/processor").await.0, 404);
    assert_eq!(svc.get("/stats/notifier").await.0, 404);
    assert_eq!(svc.get("/stats/nothing").await.0, 404);
    origin.add_file("f", b"x".to_vec());
    let mut ids = Vec::new();
    for (aggr, n) in [("dash-a", 3), ("dash-b", 1)] {
        for _ in 0..n {
            ids.push(
                svc.submit(job(&origin, "/file/f", &rx.url(0), aggr, 1))
                    .await,
            );
        }
    }
    let (st, dash) = svc.get("/dashboard/aggregations").await;
    assert_eq!(st, 200);
    assert_eq!(
        dash,
        json!([{"name": "jobs:dash-a", "size": 3}, {"name": "jobs:dash-b", "size": 1}])
    );
    assert_eq!(svc.job(&ids[0]).await["download_state"], "Pending");

    svc.spawn("processor", &["processor"]);
    svc.spawn("notifier", &["notifier"]);
    for id in &ids {
        rx.wait_for(id, 20).await;
    }
    assert_eq!(svc.get("/dashboard/aggregations").await.1, json!([]));
    let p = eventually(10, "processor stats", async || {
        let (st, v) = svc.get("/stats/processor").await;
        (st == 200 && v["spawnedWorkers"] == 4 && v["download.response.200"] == 4).then_some(v)
    })
    .await;
    for key in [
        "workers",
        "workerPools",
        "spawnedWorkerPools",
        "maxWorkers",
        "maxWorkerPools",
        "download.response.200",
    ] {
        assert!(p.get(key).is_some(), "processor stats lack {key}: {p}");
    }
    assert_eq!(p["download.response.200"], 4);
    let n = eventually(10, "notifier stats", async || {
        let (st, v) = svc.get("/stats/notifier").await;
        (st == 200 && v["successfulCallbacks"] == 4).then_some(v)
    })
    .await;
    assert_eq!(n["successfulCallbacks"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_validation_error_is_a_400_naming_the_field() {
    let svc = Service::start_with(json!({}), &[]).await;
    let ok = json!({"aggr_id": "v", "aggr_limit": 1, "url": "http://example.com/x", "callback_url": "http://cb.test/"});
    let with = |k: &str, v: Value| {
        let mut j = ok.clone();
        j[k] = v;
        j.to_string()
    };
    let without = |k: &str| {
        let mut j = ok.clone();
        j.as_object_mut().unwrap().remove(k);
        j.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "JSON"),
        ("[1,2]".into(), "object"),
        (without("aggr_id"), "aggr_id"),
        (with("aggr_id", json!("")), "aggr_id"),
        (with("aggr_id", json!(5)), "aggr_id"),
        (without("aggr_limit"), "aggr_limit"),
        (with("aggr_limit", json!(0)), "aggr_limit"),
        (with("aggr_limit", json!("3")), "aggr_limit"),
        (with("aggr_proxy", json!("not a url")), "aggr_proxy"),
        (without("url"), "url"),
        (with("url", json!("ftp://x/y")), "url"),
        (with("url", json!("/relative")), "url"),
        (without("callback_url"), "callback"),
        (with("callback_url", json!("nope")), "callback_url"),
        (with("extra", json!({"a": 1})), "extra"),
        // Over api.max_extra_bytes (64 KiB).
        (with("extra", json!("x".repeat(65 << 10))), "extra"),
        (with("mime_type", json!("image/[")), "mime_type"),
        (with("mime_type", json!(7)), "mime_type"),
        (with("max_retries", json!(-1)), "max_retries"),
        (with("max_retries", json!(1.5)), "max_retries"),
        (
            with("extract_image_size", json!("true")),
            "extract_image_size",
        ),
        (with("download_timeout", json!(0)), "download_timeout"),
        (with("download_timeout", json!("10")), "download_timeout"),
        (with("request_headers", json!(["a"])), "request_headers"),
        (
            with("request_headers", json!({"X": true})),
            "request_headers",
        ),
        (with("s3_bucket", json!("b")), "s3_region"),
        (with("s3_region", json!("r")), "s3_bucket"),
        (with("thumbnails", json!({"width": 1})), "thumbnails"),
        (
            with(
                "thumbnails",
                json!([{"name": "z", "width": 0, "height": 10}]),
            ),
            "thumbnails[0].width",
        ),
        (
            with(
                "thumbnails",
                json!([{"name": "a", "width": 5, "height": 5}, {"name": "b", "width": 5, "height": 5, "fit": "squash"}]),
            ),
            "thumbnails[1].fit",
        ),
        (
            with(
                "thumbnails",
                json!([{"name": "a", "width": 5, "height": 5}, {"name": "a", "width": 9, "height": 9}]),
            ),
            "thumbnails[1].name",
        ),
        (
            with(
                "thumbnails",
                json!(
                    (0..9)
                        .map(|i| json!({"name": format!("t{i}"), "width": 5, "height": 5}))
                        .collect::<Vec<_>>()
                ),
            ),
            "at most 8",
        ),
    ];
    for (body, field) in cases {
        let (st, v) = svc.post_raw("/download", &body).await;
        assert_eq!(st, 400, "{body} -> {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.contains(field),
            "{body}: error {e:?} does not name {field}"
        );
    }
    let mut cbt = ok.clone();
    cbt.as_object_mut().unwrap().remove("callback_url");
    cbt["callback_type"] = json!("kafka");
    cbt["callback_dst"] = json!("topic");
    let (st, v) = svc.post_raw("/download", &cbt.to_string()).await;
    assert_eq!(st, 400);
    assert!(
        v["error"].as_str().unwrap().contains("not supported"),
        "{v}"
    );
    let (st, v) = svc
        .post_raw(
            "/download",
            &with("s3_bucket", json!("b")).replace('}', r#","s3_region":"eu"}"#),
        )
        .await;
    assert_eq!(st, 400);
    assert!(
        v["error"].as_str().unwrap().contains("not supported"),
        "{v}"
    );

    let r = svc.http.get(svc.url("/download")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].is_string());
    assert_eq!(svc.get("/jobs/doesnotexist").await.0, 404);
    assert_eq!(svc.get("/jobs/..%2F..%2Fetc").await.0, 404);
    // callback_type + callback_dst (http) is the current form of callback_url.
    let mut modern = ok.clone();
    modern.as_object_mut().unwrap().remove("callback_url");
    modern["callback_type"] = json!("http");
    modern["callback_dst"] = json!("http://cb.test/x");
    assert_eq!(svc.post_raw("/download", &modern.to_string()).await.0, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_addresses_are_refused_without_allowed_networks() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({"processor": {"allowed_networks": null}})).await;
    origin.add_file("f", b"x".to_vec());
    let by_ip = svc
        .submit(job(&origin, "/file/f", &rx.url(0), "ssrf", 2))
        .await;
    let by_name = svc
        .submit(
            json!({"aggr_id": "ssrf", "aggr_limit": 2, "callback_url": rx.url(0),
            "url": format!("http://localhost:{}/file/f", origin.addr.port())}),
        )
        .await;
    for id in [by_ip, by_name] {
        let cb = rx.wait_for(&id, 20).await;
        assert_eq!(cb["success"], false);
        assert!(
            cb["error"].as_str().unwrap().contains("not allowed"),
            "{cb}"
        );
        assert_eq!(
            svc.job(&id).await["download_attempts"],
            1,
            "refused at once, not retried"
        );
    }
    assert_eq!(origin.hits("/file/f"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_to_internal_addresses_are_refused() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    // The origin (loopback) is allowed; its redirect to the cloud metadata address is not.
    let svc = Service::start(json!({})).await;
    let mut j = job(&origin, "/redirect", &rx.url(0), "redir", 1);
    j["max_retries"] = json!(0);
    let id = svc.submit(j).await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], false, "{cb}");
    let e = cb["error"].as_str().unwrap();
    assert!(
        e.contains("169.254.169.254") && e.contains("not allowed"),
        "{e}"
    );
    assert_eq!(origin.hits("/redirect"), 1);
}

/// Submits `per_aggr` jobs to each of four aggregations with limits 1–4.
async fn submit_load(
    svc: &Service,
    origin: &Origin,
    rx: &Receiver,
    per_aggr: u32,
) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for n in 0..per_aggr {
        for limit in 1..=4u32 {
            let aggr = format!("load{limit}");
            let j = job(
                origin,
                &format!("/aggr/{aggr}/{n}"),
                &rx.url(0),
                &aggr,
                limit,
            );
            ids.push((svc.submit(j).await, aggr));
        }
    }
    ids
}

/// Every job calls back; at most `duplicates` jobs more than once (a notifier killed
/// between delivering a callback and recording it delivers it again: at-least-once).
async fn assert_each_called_back(
    rx: &Receiver,
    ids: &[(String, String)],
    secs: u64,
    duplicates: usize,
) {
    eventually(secs, "every job's callback", async || {
        let got: std::collections::HashSet<String> = rx
            .callbacks()
            .iter()
            .map(|c| c["job_id"].as_str().unwrap().to_string())
            .collect();
        ids.iter().all(|(id, _)| got.contains(id)).then_some(())
    })
    .await;
    let mut per_job: HashMap<String, u32> = HashMap::new();
    for c in rx.callbacks() {
        assert_eq!(c["success"], true, "{c}");
        *per_job
            .entry(c["job_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let mut repeated = 0;
    for (id, _) in ids {
        let n = per_job.get(id).copied().unwrap_or(0);
        assert!(n >= 1, "job {id} never called back");
        if n > 1 {
            repeated += 1;
        }
    }
    assert!(
        repeated <= duplicates,
        "{repeated} jobs called back more than once"
    );
}

fn assert_limits(origin: &Origin) {
    for limit in 1..=4u32 {
        let aggr = format!("load{limit}");
        let max = origin.max_concurrency(&aggr);
        assert!(
            max <= limit,
            "{aggr}: {max} downloads at once, limit {limit}"
        );
        assert!(max >= 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn load_never_exceeds_aggregation_limits() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let svc = Service::start(json!({})).await;
    let ids = submit_load(&svc, &origin, &rx, 50).await;
    assert_eq!(ids.len(), 200);
    assert_each_called_back(&rx, &ids, 60, 0).await;
    assert_limits(&origin);
    // The limit was reached, not just respected, for the widest aggregation.
    assert!(origin.max_concurrency("load4") >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_processors_share_limits_and_survive_a_kill() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start_with(json!({}), &["notifier"]).await;
    for i in 1..=3 {
        svc.spawn(&format!("processor-{i}"), &["processor"]);
    }
    let ids = submit_load(&svc, &origin, &rx, 50).await;
    eventually(30, "some jobs done", async || {
        (rx.callbacks().len() >= 40).then_some(())
    })
    .await;
    svc.sigkill("processor-2");
    svc.spawn("processor-2", &["processor"]);
    assert_each_called_back(&rx, &ids, 90, 0).await;
    assert_limits(&origin);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_processor_and_notifier_loses_no_job() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start(json!({})).await;
    let ids = submit_load(&svc, &origin, &rx, 50).await;
    eventually(30, "some callbacks", async || {
        (rx.callbacks().len() >= 30).then_some(())
    })
    .await;
    svc.sigkill("processor");
    svc.sigkill("notifier");
    svc.spawn("processor", &["processor"]);
    svc.spawn("notifier", &["notifier"]);
    // Only callbacks in flight at the kill (at most notifier.concurrency) may repeat.
    assert_each_called_back(&rx, &ids, 90, 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_zero() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start(json!({})).await;
    let mut j = job(&origin, "/slow/700", &rx.url(0), "term", 1);
    j["max_retries"] = json!(0);
    let id = svc.submit(j).await;
    eventually(10, "download to start", async || {
        (origin.hits("/slow/700") == 1).then_some(())
    })
    .await;
    let st = svc.sigterm("processor");
    assert!(st.success(), "processor exit status {st}");
    // The in-flight download finished during the grace period and calls back.
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], true, "{cb}");
    assert!(svc.sigterm("notifier").success());
    assert!(svc.sigterm("web").success());
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_deleted_after_the_deletion_interval() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    // 0.01 minutes = 0.6 s.
    let svc = Service::start(json!({"notifier": {"deletion_interval": 0.01}})).await;
    origin.add_file("f", b"gone soon".to_vec());
    let id = svc
        .submit(job(&origin, "/file/f", &rx.url(0), "del", 1))
        .await;
    rx.wait_for(&id, 20).await;
    let path = svc.storage().join(&id[..3]).join(&id);
    eventually(20, "file and job record to be deleted", async || {
        (!path.exists() && svc.get(&format!("/jobs/{id}")).await.0 == 404).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stderr_does_not_stop_the_service() {
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut svc = Service::start_with(json!({}), &[]).await;
    svc.spawn_with_broken_stderr("processor", &["processor"]);
    svc.spawn_with_broken_stderr("notifier", &["notifier"]);
    origin.add_file("f", b"x".to_vec());
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            svc.submit(job(&origin, "/file/f", &rx.url(0), "epipe", 4))
                .await,
        );
    }
    for id in &ids {
        assert_eq!(rx.wait_for(id, 20).await["success"], true);
    }
    assert!(svc.alive("processor") && svc.alive("notifier"));
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_downloader");
    let missing = dir.path().join("missing.json");
    let out = std::process::Command::new(bin)
        .args(["processor", "-c"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.json"), "{err}");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"notifier": {"concurrency": "many"}}"#).unwrap();
    let out = std::process::Command::new(bin)
        .args(["web", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("notifier.concurrency"),
        "{err}"
    );

    let out = std::process::Command::new(bin)
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = std::process::Command::new(bin)
        .args(["api", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "api is an alias of web");
}
