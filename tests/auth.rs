//! Who may call what, tried as a hostile client would: tokens and scopes on every
//! endpoint (API and admin listener), cross-site requests, tenants that cannot see
//! or change each other's jobs and aggregations (Redis and `serve`), and
//! `api.aggregation_settings`.

mod common;

use std::process::Command;

use common::serve::Serve;
use common::*;
use downloader::auth::{Scope, new_token};
use serde_json::{Value, json};

/// `(secret, config entry)` for a token.
fn token(name: &str, scopes: &[Scope]) -> (String, Value) {
    let (secret, entry) = new_token(name, scopes).unwrap();
    (secret, serde_json::to_value(entry).unwrap())
}

/// Sends a request with an optional bearer token and extra headers; answers the
/// status, the `WWW-Authenticate` header and the body (JSON when it is JSON).
async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    secret: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Option<String>, Value) {
    let mut r = http.request(method.parse().unwrap(), url);
    if let Some(s) = secret {
        r = r.bearer_auth(s);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, www, body)
}

/// Submits `job` with `secret`, asserting 201; returns the id.
async fn submit(http: &reqwest::Client, base: &str, secret: &str, job: &Value) -> String {
    let (st, _, body) = call(
        http,
        "POST",
        &format!("{base}/download"),
        Some(secret),
        &[],
        Some(job),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON error, got {body}"))
}

#[test]
fn token_cli_prints_a_secret_and_the_entry_that_accepts_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_downloader"))
        .args([
            "token", "new", "shop-1", "--scope", "submit", "--scope", "read",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let secret = lines.next().unwrap();
    let entry: downloader::auth::TokenConfig = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(entry.name, "shop-1");
    assert_eq!(entry.scopes, vec![Scope::Submit, Scope::Read]);
    let tokens = downloader::auth::Tokens::from_config(&[entry]).unwrap();
    assert_eq!(tokens.verify(secret).unwrap().name, "shop-1");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));

    for (args, says) in [
        (
            &["token", "new", "a/b", "--scope", "read"][..],
            "token name",
        ),
        (&["token", "new", "shop"][..], "--scope"),
        (&["token", "new", "shop", "--scope", "root"][..], "--scope"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn bad_token_config_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = token("shop", &[Scope::Read]);
    for (api, key) in [
        (
            json!({"tokens": [{"name": "shop", "hash": "sha256:00", "scopes": ["read"]}]}),
            "api.tokens[0].hash",
        ),
        (
            json!({"tokens": [good.clone(), good.clone()]}),
            "api.tokens[1].name",
        ),
        (
            json!({"tokens": [{"name": "x", "hash": good["hash"], "scopes": ["root"]}]}),
            "api.tokens",
        ),
        (
            json!({"public_endpoints": ["download"]}),
            "api.public_endpoints[0]",
        ),
        (
            json!({"allowed_origins": ["https://a.example/path"]}),
            "api.allowed_origins[0]",
        ),
        (
            json!({"aggregation_settings": "middle"}),
            "api.aggregation_settings",
        ),
    ] {
        let cfg = base_config(dir.path(), "unused", json!({ "api": api }));
        let path = dir.path().join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_downloader"))
            .args(["web", "--port", "0", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{api}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{api}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_scopes_guard_every_endpoint() {
    let (shop, shop_entry) = token("shop", &[Scope::Submit, Scope::Read]);
    let (writer, writer_entry) = token("writer", &[Scope::Submit]);
    let (viewer, viewer_entry) = token("viewer", &[Scope::Read]);
    let (ops, ops_entry) = token("ops", &[Scope::Admin]);
    let admin_port = free_port();
    let svc = Service::start(json!({
        "api": {"tokens": [shop_entry, writer_entry, viewer_entry, ops_entry]},
        "processor": {"admin_addr": format!("127.0.0.1:{admin_port}")}
    }))
    .await;
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"body".to_vec());
    let http = &svc.http;
    let u = |p: &str| svc.url(p);

    // Open: load balancers and supervisors.
    for p in ["/hb", "/healthz"] {
        let (st, _, body) = call(http, "GET", &u(p), None, &[], None).await;
        assert_eq!(st, 200, "{p}: {body}");
    }
    // No token, a wrong one, another scheme: 401 with a JSON error and a challenge.
    let j = job(&origin, "/file/f", &rx.url(0), "a1", 2);
    for (secret, says) in [
        (None, "needs a token"),
        (Some("dl_not-a-token"), "unknown token"),
    ] {
        let (st, www, body) = call(http, "POST", &u("/download"), secret, &[], Some(&j)).await;
        assert_eq!(st, 401, "{body}");
        assert!(www.unwrap().starts_with("Bearer"));
        assert!(error_of(&body).contains(says), "{body}");
    }
    let (st, _, body) = call(
        http,
        "POST",
        &u("/download"),
        None,
        &[("authorization", "Basic c2hvcDpzaG9w")],
        Some(&j),
    )
    .await;
    assert_eq!(st, 401, "{body}");
    // The wrong scope: 403 naming it.
    let (st, _, body) = call(http, "POST", &u("/download"), Some(&viewer), &[], Some(&j)).await;
    assert_eq!(st, 403, "{body}");
    assert!(error_of(&body).contains("\"submit\""), "{body}");

    let id = submit(http, &svc.url(""), &shop, &j).await;
    let cb = rx.wait_for(&id, 20).await;
    assert_eq!(cb["success"], true, "{cb}");

    let job_path = format!("/jobs/{id}");
    let retry_path = format!("/retry/{id}");
    // Reading needs `read`; a tenant's job is unknown to other tenants, not only
    // forbidden (its existence is not revealed).
    assert_eq!(
        call(http, "GET", &u(&job_path), None, &[], None).await.0,
        401
    );
    assert_eq!(
        call(http, "GET", &u(&job_path), Some(&writer), &[], None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(http, "GET", &u(&job_path), Some(&viewer), &[], None)
            .await
            .0,
        404
    );
    let (st, _, rec) = call(http, "GET", &u(&job_path), Some(&shop), &[], None).await;
    assert_eq!(st, 200, "{rec}");
    assert_eq!(rec["aggr_id"], "a1");
    assert_eq!(rec["tenant"], "shop");
    assert_eq!(
        call(http, "GET", &u(&job_path), Some(&ops), &[], None)
            .await
            .0,
        200
    );
    // Retry: another tenant's submit token gets a 404; the owner and admin reach the
    // job (409: its callback has not failed).
    assert_eq!(
        call(http, "POST", &u(&retry_path), None, &[], None).await.0,
        401
    );
    assert_eq!(
        call(http, "POST", &u(&retry_path), Some(&viewer), &[], None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(http, "POST", &u(&retry_path), Some(&writer), &[], None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(http, "POST", &u(&retry_path), Some(&shop), &[], None)
            .await
            .0,
        409
    );
    assert_eq!(
        call(http, "POST", &u(&retry_path), Some(&ops), &[], None)
            .await
            .0,
        409
    );

    // Operator endpoints need `read` (or admin) unless made public.
    for p in [
        "/metrics",
        "/info",
        "/stats/processor",
        "/dashboard/aggregations",
        "/thumbnail/stats",
    ] {
        assert_eq!(
            call(http, "GET", &u(p), None, &[], None).await.0,
            401,
            "{p}"
        );
        assert_eq!(
            call(http, "GET", &u(p), Some(&writer), &[], None).await.0,
            403,
            "{p}"
        );
        let want = if p == "/stats/processor" {
            // 200 once the processor has reported, 404 before: either is past the guard.
            [200, 404]
        } else {
            [200, 200]
        };
        let st = call(http, "GET", &u(p), Some(&viewer), &[], None).await.0;
        assert!(want.contains(&st), "{p}: {st}");
    }
    assert_eq!(
        call(http, "POST", &u("/thumbnail"), None, &[], None)
            .await
            .0,
        401
    );
    // Paths we do not serve: no probing without a token.
    assert_eq!(
        call(http, "GET", &u("/admin"), None, &[], None).await.0,
        401
    );
    assert_eq!(
        call(http, "GET", &u("/admin"), Some(&viewer), &[], None)
            .await
            .0,
        404
    );

    // The processor's admin listener: same rules.
    let admin = |p: &str| format!("http://127.0.0.1:{admin_port}{p}");
    let (st, _, body) = call(http, "GET", &admin("/healthz"), None, &[], None).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        call(http, "GET", &admin("/metrics"), None, &[], None)
            .await
            .0,
        401
    );
    assert_eq!(
        call(http, "GET", &admin("/info"), Some(&writer), &[], None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(http, "GET", &admin("/metrics"), Some(&viewer), &[], None)
            .await
            .0,
        200
    );
    assert!(!svc.logs().contains("no api.tokens configured"));
}

#[tokio::test(flavor = "multi_thread")]
async fn public_endpoints_and_the_open_api_warning() {
    let (viewer, viewer_entry) = token("viewer", &[Scope::Read]);
    let svc = Service::start_with(
        json!({"api": {"tokens": [viewer_entry], "public_endpoints": ["metrics"]}}),
        &[],
    )
    .await;
    let http = &svc.http;
    assert_eq!(
        call(http, "GET", &svc.url("/metrics"), None, &[], None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(http, "GET", &svc.url("/info"), None, &[], None)
            .await
            .0,
        401
    );
    assert_eq!(
        call(http, "GET", &svc.url("/info"), Some(&viewer), &[], None)
            .await
            .0,
        200
    );
    // A public endpoint's caller sees no tenant's data elsewhere.
    assert_eq!(
        call(
            http,
            "GET",
            &svc.url("/dashboard/aggregations"),
            None,
            &[],
            None
        )
        .await
        .0,
        401
    );

    // Without tokens the API is open, as the reference's, and says so at start.
    let open = Service::start_with(json!({}), &[]).await;
    eventually(10, "the open-API warning", async || {
        open.logs()
            .contains("no api.tokens configured")
            .then_some(())
    })
    .await;
    assert_eq!(
        call(&open.http, "GET", &open.url("/info"), None, &[], None)
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_site_requests_are_refused_with_or_without_tokens() {
    let (shop, shop_entry) = token("shop", &[Scope::Submit, Scope::Read]);
    let open = Service::start_with(
        json!({"api": {"allowed_origins": ["https://admin.example.com"]}}),
        &[],
    )
    .await;
    let guarded = Service::start_with(json!({"api": {"tokens": [shop_entry]}}), &[]).await;
    let j = json!({"aggr_id": "x", "aggr_limit": 1, "url": "http://127.0.0.1:9/f",
                   "callback_url": "http://127.0.0.1:9/cb"});
    for (svc, secret) in [(&open, None), (&guarded, Some(shop.as_str()))] {
        let url = svc.url("/download");
        for headers in [
            &[("origin", "https://evil.example")][..],
            &[("origin", "null")][..],
            &[("sec-fetch-site", "cross-site")][..],
            &[
                ("origin", "http://127.0.0.1:1"),
                ("sec-fetch-site", "same-site"),
            ][..],
        ] {
            let (st, _, body) = call(&svc.http, "POST", &url, secret, headers, Some(&j)).await;
            assert_eq!(st, 403, "{headers:?}: {body}");
            assert!(error_of(&body).contains("api.allowed_origins"), "{body}");
        }
        // A GET from another site's page is refused too (it could read the answer
        // through a CORS-lax proxy, or use it as an oracle).
        let (st, _, _) = call(
            &svc.http,
            "GET",
            &svc.url("/info"),
            secret,
            &[("origin", "https://evil.example")],
            None,
        )
        .await;
        assert_eq!(st, 403);
        // Plain clients (no Origin) and same-origin pages are fine; text/plain too.
        let same = format!("http://{}", svc.web_addr);
        for headers in [
            &[][..],
            &[("origin", same.as_str()), ("sec-fetch-site", "same-origin")][..],
        ] {
            let (st, _, body) = call(&svc.http, "POST", &url, secret, headers, Some(&j)).await;
            assert_eq!(st, 201, "{headers:?}: {body}");
        }
        let mut r = svc
            .http
            .post(&url)
            .header("content-type", "text/plain")
            .body(j.to_string());
        if let Some(s) = secret {
            r = r.bearer_auth(s);
        }
        assert_eq!(r.send().await.unwrap().status(), 201);
    }
    // An allowed origin.
    let (st, _, body) = call(
        &open.http,
        "POST",
        &open.url("/download"),
        None,
        &[
            ("origin", "https://admin.example.com"),
            ("sec-fetch-site", "cross-site"),
        ],
        Some(&j),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    // Health checks are never refused.
    let (st, _, _) = call(
        &open.http,
        "GET",
        &open.url("/hb"),
        None,
        &[("origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(st, 200);
}

/// Tenant A's aggregation "shop" runs one download at a time. Tenant B submits jobs
/// to an aggregation of the same name with a higher limit: A's limit holds, B sees
/// none of A's aggregations or jobs, and admin sees both.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_cannot_touch_or_see_each_others_aggregations() {
    let (a, a_entry) = token("tenant-a", &[Scope::Submit, Scope::Read]);
    let (b, b_entry) = token("tenant-b", &[Scope::Submit, Scope::Read]);
    let (ops, ops_entry) = token("ops", &[Scope::Admin]);
    let svc = Service::start(json!({"api": {"tokens": [a_entry, b_entry, ops_entry]}})).await;
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let http = &svc.http;
    let base = svc.url("");

    // A: one slow job holds the aggregation's only slot, so its others stay pending.
    let mut a_ids = vec![
        submit(
            http,
            &base,
            &a,
            &job(&origin, "/slow/1500", &rx.url(0), "shop", 1),
        )
        .await,
    ];
    for n in 0..4 {
        let j = job(
            &origin,
            &format!("/aggr/tenant-a/{n}"),
            &rx.url(0),
            "shop",
            1,
        );
        a_ids.push(submit(http, &base, &a, &j).await);
    }
    // B: same aggregation name, a higher limit.
    let mut b_ids = Vec::new();
    for n in 0..4 {
        let j = job(
            &origin,
            &format!("/aggr/tenant-b/{n}"),
            &rx.url(0),
            "shop",
            8,
        );
        b_ids.push(submit(http, &base, &b, &j).await);
    }
    let dash = async |secret: &str| {
        let (st, _, v) = call(
            http,
            "GET",
            &format!("{base}/dashboard/aggregations"),
            Some(secret),
            &[],
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    // While A's jobs wait behind the slow one, A sees its own "shop" (under the name
    // it gave), admin sees both tenants' (namespaced).
    assert_eq!(dash(&a).await, vec!["jobs:shop"]);
    let all = dash(&ops).await;
    assert!(all.contains(&"jobs:@tenant-a/shop".to_string()), "{all:?}");

    for id in a_ids.iter().chain(&b_ids) {
        let cb = rx.wait_for(id, 30).await;
        assert_eq!(cb["success"], true, "{cb}");
    }
    assert_eq!(
        origin.max_concurrency("tenant-a"),
        1,
        "B's job changed A's limit"
    );
    assert!(dash(&b).await.iter().all(|n| n == "jobs:shop"));
    // B cannot see or retry A's jobs; A cannot see B's.
    for id in &a_ids {
        assert_eq!(
            call(
                http,
                "GET",
                &svc.url(&format!("/jobs/{id}")),
                Some(&b),
                &[],
                None
            )
            .await
            .0,
            404
        );
        assert_eq!(
            call(
                http,
                "POST",
                &svc.url(&format!("/retry/{id}")),
                Some(&b),
                &[],
                None
            )
            .await
            .0,
            404
        );
    }
    let (st, _, rec) = call(
        http,
        "GET",
        &svc.url(&format!("/jobs/{}", b_ids[0])),
        Some(&ops),
        &[],
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(rec["tenant"], "tenant-b");
    assert_eq!(
        call(
            http,
            "GET",
            &svc.url(&format!("/jobs/{}", b_ids[0])),
            Some(&a),
            &[],
            None
        )
        .await
        .0,
        404
    );
}

/// The same isolation on the embedded store, and `/files` behind a token.
#[tokio::test(flavor = "multi_thread")]
async fn serve_keeps_tenants_apart_and_files_behind_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_entry) = token("a", &[Scope::Submit, Scope::Read]);
    let (b, b_entry) = token("b", &[Scope::Submit, Scope::Read]);
    let origin = start_origin().await;
    let rx = start_receiver().await;
    origin.add_file("f", b"tenant file".to_vec());
    let cfg = json!({
        "store": {"type": "embedded", "path": dir.path().join("data/store.redb")},
        "api": {"tokens": [a_entry, b_entry]},
        "processor": {"storage_dir": dir.path().join("data/files"), "allowed_networks": ["127.0.0.0/8"]},
        "notifier": {"deletion_interval": 60, "allowed_networks": ["127.0.0.0/8"]}
    });
    let s = Serve::start(dir.path(), Some(&cfg)).await;
    let base = s.url("");
    let mut a_ids = vec![
        submit(
            &s.http,
            &base,
            &a,
            &job(&origin, "/slow/1500", &rx.url(0), "shop", 1),
        )
        .await,
    ];
    for n in 0..3 {
        let j = job(
            &origin,
            &format!("/aggr/serve-a/{n}"),
            &rx.url(0),
            "shop",
            1,
        );
        a_ids.push(submit(&s.http, &base, &a, &j).await);
    }
    for n in 0..3 {
        let j = job(
            &origin,
            &format!("/aggr/serve-b/{n}"),
            &rx.url(0),
            "shop",
            8,
        );
        submit(&s.http, &base, &b, &j).await;
    }
    let (_, _, dash_a) = call(
        &s.http,
        "GET",
        &s.url("/dashboard/aggregations"),
        Some(&a),
        &[],
        None,
    )
    .await;
    assert_eq!(dash_a[0]["name"], "jobs:shop", "{dash_a}");
    for id in &a_ids {
        let cb = rx.wait_for(id, 30).await;
        assert_eq!(cb["success"], true, "{cb}");
    }
    assert_eq!(
        origin.max_concurrency("serve-a"),
        1,
        "B's jobs changed A's limit"
    );
    let id = &a_ids[0];
    assert_eq!(
        call(
            &s.http,
            "GET",
            &s.url(&format!("/jobs/{id}")),
            Some(&b),
            &[],
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(
            &s.http,
            "GET",
            &s.url(&format!("/jobs/{id}")),
            Some(&a),
            &[],
            None
        )
        .await
        .0,
        200
    );

    let file = rx.wait_for(&a_ids[1], 5).await["download_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(call(&s.http, "GET", &file, None, &[], None).await.0, 401);
    let r = s.http.get(&file).bearer_auth(&a).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// `api.aggregation_settings: first` over HTTP: a later job cannot raise the limit
/// of an aggregation that still has jobs.
#[tokio::test(flavor = "multi_thread")]
async fn first_jobs_settings_hold_while_the_aggregation_has_jobs() {
    let svc = Service::start(json!({"api": {"aggregation_settings": "first"}})).await;
    let origin = start_origin().await;
    let rx = start_receiver().await;
    let mut ids = vec![
        svc.submit(job(&origin, "/slow/800", &rx.url(0), "first", 1))
            .await,
    ];
    for n in 0..4 {
        ids.push(
            svc.submit(job(
                &origin,
                &format!("/aggr/first/{n}"),
                &rx.url(0),
                "first",
                6,
            ))
            .await,
        );
    }
    for id in &ids {
        assert_eq!(rx.wait_for(id, 30).await["success"], true);
    }
    assert_eq!(origin.max_concurrency("first"), 1);
}
