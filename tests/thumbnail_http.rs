//! The HTTP entry point, in process.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use downloader::thumbnail::{Config, Thumbnailer};
use downloader::web::thumbnail as http;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/fixtures/thumbnail/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn app(cfg: Config) -> axum::Router {
    http::router(Arc::new(Thumbnailer::new(cfg)))
}

fn cfg() -> Config {
    Config {
        threads: 2,
        ..Config::default()
    }
}

async fn post(app: axum::Router, query: &str, body: Vec<u8>) -> (StatusCode, String, Vec<u8>) {
    let req = Request::post(format!("/thumbnail?{query}"))
        .body(Body::from(body))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, ct, bytes)
}

fn error_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["error"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn ok_jpeg_and_png() {
    let (s, ct, body) = post(app(cfg()), "width=100&height=100", fixture("photo.jpg")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ct, "image/jpeg");
    let img = image::load_from_memory(&body).unwrap();
    assert_eq!((img.width(), img.height()), (100, 75));
    let q = "width=50&height=50&fit=cover&format=png&quality=70&progressive=false&enlarge=true&background=%23000000";
    let (s, ct, body) = post(app(cfg()), q, fixture("rgba.png")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ct, "image/png");
    let img = image::load_from_memory(&body).unwrap();
    assert_eq!((img.width(), img.height()), (50, 50));
    let (s, ct, _) = post(
        app(cfg()),
        "width=50&height=50&format=same",
        fixture("photo.webp"),
    )
    .await;
    assert_eq!((s, ct.as_str()), (StatusCode::OK, "image/webp"));
}

#[tokio::test]
async fn bad_params_400() {
    for q in [
        "",
        "width=100",
        "width=0&height=10",
        "width=10&height=10&fit=zoom",
        "width=10&height=10&quality=0",
        "width=10&height=10&format=heic",
        "width=10&height=10&bogus=1",
    ] {
        let (s, ct, body) = post(app(cfg()), q, fixture("photo.jpg")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(ct, "application/json");
        assert!(!error_of(&body).is_empty());
    }
}

#[tokio::test]
async fn too_large_413() {
    let (s, _, body) = post(app(cfg()), "width=10&height=10", fixture("bomb.png")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_of(&body).contains("megapixels"));
    // Body over max_input_bytes: refused by the body limit.
    let small = Config {
        max_input_bytes: 10_000,
        ..cfg()
    };
    let (s, ct, body) = post(app(small), "width=10&height=10", fixture("photo.jpg")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(ct, "application/json");
    assert!(error_of(&body).contains("limit"));
}

#[tokio::test]
async fn unsupported_415_and_corrupt_422() {
    let (s, _, body) = post(
        app(cfg()),
        "width=10&height=10",
        fixture("not-an-image.txt"),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_of(&body).contains("unsupported"));
    let (s, _, body) = post(app(cfg()), "width=10&height=10", fixture("truncated.jpg")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_of(&body).contains("truncated JPEG"));
}

#[tokio::test]
async fn stats_endpoint() {
    let t = Arc::new(Thumbnailer::new(cfg()));
    let app = http::router(t.clone());
    let (s, _, _) = post(app.clone(), "width=10&height=10", fixture("photo.bmp")).await;
    assert_eq!(s, StatusCode::OK);
    let resp = app
        .oneshot(
            Request::get("/thumbnail/stats")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["made"], 1);
}

#[tokio::test]
async fn timeout_503() {
    let app =
        http::router_with_timeout(Arc::new(Thumbnailer::new(cfg())), std::time::Duration::ZERO);
    let (s, ct, body) = post(app, "width=10&height=10", fixture("photo.jpg")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ct, "application/json");
    assert!(error_of(&body).contains("not ready"));
}
