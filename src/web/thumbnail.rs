//! `POST /thumbnail?width=&height=&fit=&format=&quality=&progressive=&enlarge=&background=`
//! with the image as the body; answers the thumbnail bytes with their Content-Type, or
//! `{"error": "..."}` with 400 / 413 / 415 / 422 (503 when the work takes too long or
//! the thumbnail memory budget has no room for it in that time).
//! `GET /thumbnail/stats` answers the [`Stats`](crate::thumbnail::Stats) as JSON.
//! The thumbnails themselves are made by [`crate::thumbnail`]; this is its HTTP face.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::thumbnail::{Spec, Thumbnailer};

/// How long one request may wait for its thumbnail (queueing included).
pub const WORK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    thumbnailer: Arc<Thumbnailer>,
    timeout: Duration,
}

/// The router, with the request body bounded to `max_input_bytes`.
pub fn router(thumbnailer: Arc<Thumbnailer>) -> Router {
    router_with_timeout(thumbnailer, WORK_TIMEOUT)
}

/// As [`router`], with another bound on the time of one request.
pub fn router_with_timeout(thumbnailer: Arc<Thumbnailer>, timeout: Duration) -> Router {
    let limit = usize::try_from(thumbnailer.config().max_input_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/thumbnail", post(make))
        .route("/thumbnail/stats", get(stats))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(AppState {
            thumbnailer,
            timeout,
        })
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": msg.into() });
    (status, axum::Json(body)).into_response()
}

async fn stats(State(st): State<AppState>) -> Response {
    axum::Json(st.thumbnailer.stats()).into_response()
}

async fn make(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let query = query.unwrap_or_default();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let spec = match Spec::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = spec.validate_against(st.thumbnailer.config()) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let body = match body {
        Ok(b) => b,
        Err(rej) => {
            let status = rej.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                let limit = st.thumbnailer.config().max_input_bytes;
                let msg = format!("request body is over the limit of {limit} bytes");
                return error(status, msg);
            }
            return super::body_error(rej).into_response();
        }
    };
    // Memory is waited for until the request's own deadline; then 503.
    let deadline = std::time::Instant::now() + st.timeout;
    let work = st.thumbnailer.make_until(body, spec, deadline);
    match tokio::time::timeout(st.timeout, work).await {
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "thumbnail not ready within {} s (server busy or image too slow to decode)",
                st.timeout.as_secs_f64()
            ),
        ),
        Ok(Err(e)) => {
            let status = StatusCode::from_u16(e.kind().http_status())
                .unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
            error(status, e.to_string())
        }
        Ok(Ok(t)) => {
            let mut resp = t.bytes.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(t.format.mime()),
            );
            resp.headers_mut().insert(
                "x-image-width",
                HeaderValue::from_str(&t.width.to_string()).expect("digits"),
            );
            resp.headers_mut().insert(
                "x-image-height",
                HeaderValue::from_str(&t.height.to_string()).expect("digits"),
            );
            resp
        }
    }
}
