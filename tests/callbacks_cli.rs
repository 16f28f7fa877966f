//! `downloader callbacks list|retry`: the dead letters of the store a config selects,
//! listed as JSON lines and retried in bounded batches, on Redis (beside running
//! components) and on the embedded store (while `serve` is stopped); 1,000 of them at
//! once; bad flags exit 2 naming the flag.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::serve::Serve;
use common::*;
use serde_json::{Value, json};

const BULK: usize = 1000;

/// JSON lines of a listing.
fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|v| v["job_id"].as_str().unwrap().to_string())
        .collect()
}

/// Submits `n` jobs, `split` of them in aggregation `bulk` and the rest in `rest`,
/// whose callbacks fail once each (they are kept failed with `callback_retries` 0).
async fn submit_many(
    http: &reqwest::Client,
    base: &str,
    origin: &Origin,
    rx: &Receiver,
    n: usize,
    split: usize,
) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let posts = chunk.iter().map(|i| {
            let aggr = if *i < split { "bulk" } else { "rest" };
            let body = job(origin, "/file/f", &rx.url(1), aggr, 50);
            async move {
                let r = http
                    .post(format!("{base}/download"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        });
        out.extend(futures_util::future::join_all(posts).await);
    }
    out
}

/// How many failed callbacks `GET /callbacks/failed` lists (pages of 1000).
async fn failed_count(http: &reqwest::Client, base: &str) -> usize {
    let mut n = 0;
    let mut cursor = String::new();
    loop {
        let v: Value = http
            .get(format!("{base}/callbacks/failed?limit=1000{cursor}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        n += v["callbacks"].as_array().unwrap().len();
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return n,
        }
    }
}

/// The cursor `list --limit` leaves on stderr.
fn cursor_hint(err: &str) -> String {
    err.split("--cursor ")
        .nth(1)
        .unwrap_or_else(|| panic!("no cursor in {err:?}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_bulk_retry_on_redis() {
    let svc = Service::start(json!({
        "notifier": {"callback_retries": 0, "concurrency": 64}
    }))
    .await;
    let origin = start_origin().await;
    origin.add_file("f", b"dead letter".to_vec());
    let rx = start_receiver().await;
    let base = svc.url("");
    let all_ids = submit_many(&svc.http, &base, &origin, &rx, BULK, 700).await;
    eventually(120, "1000 failed callbacks", async || {
        (failed_count(&svc.http, &base).await == BULK).then_some(())
    })
    .await;

    // Pages: the same items, in the same order, as GET /callbacks/failed.
    let (code, out, err) = svc.run_cli(&["callbacks", "list", "--limit", "5"]);
    assert_eq!(code, 0, "{err}");
    let first = lines(&out);
    assert_eq!(first.len(), 5);
    let (_, api) = svc.get("/callbacks/failed?limit=5").await;
    assert_eq!(&first, api["callbacks"].as_array().unwrap());
    assert_eq!(first[0]["attempts"], 1);
    assert!(
        first[0]["error"].as_str().unwrap().contains("500"),
        "{}",
        first[0]
    );
    let cursor = cursor_hint(&err);
    let (code, out, err) = svc.run_cli(&["callbacks", "list", "--cursor", &cursor, "--limit", "3"]);
    assert_eq!(code, 0, "{err}");
    let (_, api) = svc
        .get(&format!("/callbacks/failed?limit=3&cursor={cursor}"))
        .await;
    assert_eq!(&lines(&out), api["callbacks"].as_array().unwrap());
    // Everything, oldest first, each once.
    let (code, out, err) = svc.run_cli(&["callbacks", "list"]);
    assert_eq!(code, 0, "{err}");
    let listed = lines(&out);
    assert_eq!(listed.len(), BULK);
    assert!(!err.contains("--cursor"), "{err}");
    let times: Vec<u64> = listed
        .iter()
        .map(|v| v["failed_at"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    let unique: HashSet<String> = ids(&listed).into_iter().collect();
    assert_eq!(unique, all_ids.iter().cloned().collect::<HashSet<_>>());
    let (code, out, _) = svc.run_cli(&["callbacks", "list", "--aggr-id", "rest"]);
    assert_eq!(code, 0);
    let rest = lines(&out);
    assert_eq!(rest.len(), 300);
    assert!(rest.iter().all(|v| v["aggr_id"] == "rest"));

    // Bulk replay: a bounded part, then the rest.
    let (code, out, err) =
        svc.run_cli(&["callbacks", "retry", "--aggr-id", "bulk", "--limit", "300"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r, json!({"requeued": 300, "skipped": [], "more": true}));
    let (code, out, err) = svc.run_cli(&["callbacks", "retry", "--all"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["requeued"], 700, "{r}");
    assert_eq!(r["more"], false, "{r}");
    eventually(120, "every requeued callback delivered", async || {
        (rx.callbacks().len() == BULK).then_some(())
    })
    .await;
    assert_eq!(failed_count(&svc.http, &base).await, 0);

    // By id: a delivered one and an unknown one are skipped, saying why.
    let unknown = downloader::job::new_id();
    let (code, out, err) =
        svc.run_cli(&["callbacks", "retry", "--id", &all_ids[0], "--id", &unknown]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["requeued"], 0, "{r}");
    assert_eq!(r["skipped"][0]["job_id"], all_ids[0].as_str());
    assert!(
        r["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("not failed"),
        "{r}"
    );
    assert_eq!(r["skipped"][1]["reason"], "not found");
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path(), "test:unused", json!({}));
    let path = dir.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let id = downloader::job::new_id();
    for (args, says) in [
        (vec!["retry"], "--id"),
        (vec!["retry", "--id", "x/../y"], "--id"),
        (vec!["retry", "--all", "--id", &id], "--all"),
        (vec!["retry", "--id", &id, "--limit", "3"], "--limit"),
        (vec!["retry", "--all", "--limit", "0"], "--limit"),
        (vec!["retry", "--aggr-id", ""], "--aggr-id"),
        (vec!["list", "--limit", "0"], "--limit"),
        (vec!["list", "--limit", "ten"], "--limit"),
        (vec!["list", "--cursor", "zzz"], "--cursor"),
        (vec!["list", "--aggr-id", ""], "--aggr-id"),
        (vec!["list", "--page", "2"], "--page"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"));
        cmd.arg("callbacks").args(&args).arg("-c").arg(&path);
        let (code, out, err) = run_to_end(cmd, Duration::from_secs(30));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    // A missing config is named, exit 2 too.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"));
    cmd.args(["callbacks", "list", "-c"])
        .arg(dir.path().join("missing.json"));
    let (code, _, err) = run_to_end(cmd, Duration::from_secs(30));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.json"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_bulk_retry_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let origin = start_origin().await;
    origin.add_file("f", b"dead letter".to_vec());
    let rx = start_receiver().await;
    let cfg = json!({
        "store": {"type": "embedded", "path": dir.path().join("data/store.redb")},
        "processor": {"storage_dir": dir.path().join("data/files"), "allowed_networks": ["127.0.0.0/8"]},
        "notifier": {"allowed_networks": ["127.0.0.0/8"], "callback_retries": 0, "concurrency": 64}
    });
    let mut s = Serve::start(dir.path(), Some(&cfg)).await;
    let base = s.url("");
    let all_ids = submit_many(&s.http, &base, &origin, &rx, BULK, 700).await;
    eventually(180, "1000 failed callbacks", async || {
        (failed_count(&s.http, &base).await == BULK).then_some(())
    })
    .await;
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_downloader"));
        cmd.arg("callbacks")
            .args(args)
            .arg("-c")
            .arg(dir.path().join("config.json"));
        run_to_end(cmd, Duration::from_secs(120))
    };
    // The store file is serve's while it runs: the CLI says so (and what to use).
    let (code, _, err) = cli(&["list"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("in use") && err.contains("POST /callbacks/retry"),
        "{err}"
    );

    s.kill();
    let (code, out, err) = cli(&["list", "--aggr-id", "bulk", "--limit", "10"]);
    assert_eq!(code, 0, "{err}");
    let page = lines(&out);
    assert_eq!(page.len(), 10);
    assert!(page.iter().all(|v| v["aggr_id"] == "bulk"));
    let (code, out, err) = cli(&["list"]);
    assert_eq!(code, 0, "{err}");
    let listed: HashSet<String> = ids(&lines(&out)).into_iter().collect();
    assert_eq!(listed, all_ids.iter().cloned().collect::<HashSet<_>>());
    let (code, out, err) = cli(&["retry", "--id", &all_ids[0], "--id", &all_ids[1]]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"requeued": 2, "skipped": [], "more": false})
    );
    let (code, out, err) = cli(&["retry", "--all"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["requeued"], BULK - 2, "{r}");
    assert_eq!(r["more"], false);

    // serve again: the requeued callbacks go out.
    let s = Serve::start(dir.path(), Some(&cfg)).await;
    eventually(180, "every requeued callback delivered", async || {
        (rx.callbacks().len() == BULK).then_some(())
    })
    .await;
    assert_eq!(failed_count(&s.http, &s.url("")).await, 0);
}
