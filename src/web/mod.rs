//! The HTTP API (`downloader web`): job submission, callback retries, heartbeat,
//! stats, the aggregation dashboard and job state.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::job::{JobSpec, is_valid_id, new_id};
use crate::store::{AggrSettings, RetryCallback, Store};

pub mod bounds;
pub mod callbacks;
pub mod files;
pub mod guard;
pub mod ops;
pub use guard::{Caller, Guard};
pub mod server;
pub use server::{Limits, serve};
pub mod thumbnail;

/// Largest `POST /download` body accepted by default.
const DEFAULT_MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub heartbeat_path: Option<PathBuf>,
    pub info: Arc<Info>,
    /// Tokens, public endpoints and allowed origins (`api.*`).
    pub guard: Arc<Guard>,
    /// `api.aggregation_settings`.
    pub aggr_settings: AggrSettings,
    /// `request_headers` caps of `POST /download` (`api.max_request_headers*`).
    pub submit_limits: crate::job::SubmitLimits,
    /// Which `aggr_proxy`s a job may name (the processor applies the same).
    pub proxies: Arc<crate::net::ProxyPolicy>,
    /// Which addresses a `callback_url` may name: the notifier's guard
    /// (`notifier.allowed_networks`), which judges every address again at delivery.
    pub callback_guard: Arc<crate::net::NetGuard>,
}

/// What `GET /info` reports about this process.
#[derive(Debug)]
pub struct Info {
    pub components: Vec<&'static str>,
    /// `redis` or `embedded`.
    pub store: &'static str,
    pub started: std::time::SystemTime,
    pub started_mono: std::time::Instant,
    pub host: String,
}

impl Info {
    pub fn new(components: Vec<&'static str>, store: &'static str) -> Info {
        Info {
            components,
            store,
            started: std::time::SystemTime::now(),
            started_mono: std::time::Instant::now(),
            host: crate::logging::hostname(),
        }
    }
}

/// A JSON error: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// A request body that could not be read: 408 when it stalled, else the rejection's own status.
/// A body over its total deadline is a 408 too, and one that outgrew the body budget
/// a 503 (the connection is closed after either: see [`bounds::Bounded`]).
pub fn body_error(e: BytesRejection) -> ApiError {
    match bounds::body_failure(&e) {
        Some(bounds::BodyFailure::Stalled) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            "request body timed out: the client stopped sending".into(),
        ),
        Some(bounds::BodyFailure::Deadline) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            "request body timed out: not complete within api.body_total_timeout_secs".into(),
        ),
        Some(bounds::BodyFailure::Budget) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}; retry later", bounds::BodyBudgetSpent),
        ),
        None => ApiError(e.status(), format!("cannot read request body: {e}")),
    }
}

/// The API's routes and `POST /thumbnail`; with `files`, also serves that directory
/// at `/files/` (for `serve`, so that callbacks' `download_url`s work out of the box).
pub fn router(
    state: AppState,
    max_body: Option<usize>,
    files: Option<PathBuf>,
    thumbnailer: Arc<crate::thumbnail::Thumbnailer>,
) -> Router {
    let api = Router::new()
        .route("/download", post(submit))
        .route("/retry/{id}", post(retry))
        .route("/hb", get(heartbeat))
        .route("/stats/{component}", get(stats))
        .route("/dashboard/aggregations", get(aggregations))
        .route("/jobs/{id}", get(job))
        .route("/callbacks/failed", get(callbacks::failed))
        .route("/callbacks/retry", post(callbacks::retry))
        .layer(DefaultBodyLimit::max(max_body.unwrap_or(DEFAULT_MAX_BODY)));
    let ops = ops::OpsState::new(
        state.info.clone(),
        state.store.clone(),
        Some(thumbnailer.clone()),
    );
    let guard = state.guard.clone();
    // POST /thumbnail brings its own state and body limit.
    let mut r = api
        .with_state(state)
        .merge(ops::router(ops))
        .merge(thumbnail::router(thumbnailer));
    if let Some(root) = files {
        // Refuses `..`, encoded or not, and symlinks out of `root`.
        r = r.nest_service("/files", files::service(root));
    }
    logged(guarded(r, guard))
}

/// The admin listener's routes (`/metrics`, `/healthz`, `/info`) of `processor` and
/// `notifier`, guarded and logged like the API's.
pub fn admin_router(state: ops::OpsState, guard: Arc<Guard>) -> Router {
    logged(guarded(ops::router(state), guard))
}

/// Adds JSON 404/405 fallbacks and puts every route, the fallbacks included, behind
/// the guard (inside the logging layers, so that refusals are logged with their
/// request id). Layers wrap only what exists when they are added: fallbacks first.
fn guarded(r: Router, guard: Arc<Guard>) -> Router {
    r.method_not_allowed_fallback(|| async {
        ApiError(
            StatusCode::METHOD_NOT_ALLOWED,
            "Invalid request method".into(),
        )
    })
    .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
    .layer(axum::middleware::from_fn_with_state(guard, guard::check))
}

/// Adds request ids and a log line at each request's start and end.
fn logged(mut r: Router) -> Router {
    let request_id = axum::http::HeaderName::from_static("x-request-id");
    // Connections run in tasks of their own: parent request spans explicitly on the
    // component's span so their lines carry component and host.
    let root = tracing::Span::current();
    r = r
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &axum::http::Request<_>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        parent: &root,
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id = %id
                    )
                })
                .on_request(|_: &axum::http::Request<_>, _: &tracing::Span| {
                    tracing::info!("request started")
                })
                .on_response(
                    |res: &Response, latency: std::time::Duration, _: &tracing::Span| {
                        tracing::info!(
                            status = res.status().as_u16(),
                            duration_ms = latency.as_secs_f64() * 1000.0,
                            "request finished"
                        )
                    },
                ),
        )
        // An incoming X-Request-Id is kept, else one is made (a UUID)...
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        // ...but outermost, one we would not keep is dropped first.
        .layer(tower::util::MapRequestLayer::new(
            drop_unacceptable_request_id::<axum::body::Body>,
        ));
    r
}
/// Longest `X-Request-Id` kept from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's `X-Request-Id` is kept (logged with each of the request's lines
/// and echoed): 1 to [`MAX_REQUEST_ID_LEN`] characters from `A-Z a-z 0-9 - _ . : + / =`,
/// enough for UUIDs, ULIDs, base64 and `host:pid:n` ids, with nothing a log line or
/// header would need to quote or escape. Anything else is replaced by a new id.
pub fn is_acceptable_request_id(v: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(&b))
}

/// Removes the request's `X-Request-Id` unless it is one acceptable value (two
/// values are ambiguous), so that `SetRequestIdLayer` makes a new one.
fn drop_unacceptable_request_id<B>(mut req: axum::http::Request<B>) -> axum::http::Request<B> {
    let mut values = req.headers().get_all("x-request-id").iter();
    let keep = matches!(
        (values.next(), values.next()),
        (Some(v), None) if is_acceptable_request_id(v.as_bytes())
    );
    if !keep {
        req.headers_mut().remove("x-request-id");
    }
    req
}

async fn submit(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(body_error)?;
    let mut spec = JobSpec::from_json_with(&body, &s.submit_limits)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.0))?;
    spec.tenant = caller.tenant;
    check_proxy(&s.proxies, &spec)?;
    check_callback(&s.callback_guard, &spec, &body)?;
    let id = new_id();
    s.store.submit_with(&id, &spec, s.aggr_settings).await?;
    crate::metrics::metrics().jobs_submitted.inc();
    tracing::info!(
        job_id = %id,
        aggr_id = %spec.aggr_id,
        tenant = spec.tenant.as_deref().unwrap_or_default(),
        url = %spec.url,
        "job submitted"
    );
    Ok((StatusCode::CREATED, axum::Json(json!({ "id": id }))).into_response())
}

/// A job's `aggr_proxy` that the proxy rules refuse is a 400 naming the field.
fn check_proxy(policy: &crate::net::ProxyPolicy, spec: &JobSpec) -> Result<(), ApiError> {
    match &spec.aggr_proxy {
        Some(p) => policy
            .check(p)
            .map(|_| ())
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        None => Ok(()),
    }
}

/// A callback URL whose host the notifier would refuse without asking DNS (an IP
/// literal, in any spelling the URL parser reads as one, or a localhost name) is a 400
/// naming the field the client used. Other names are judged on their addresses when
/// the notifier connects.
fn check_callback(
    guard: &crate::net::NetGuard,
    spec: &JobSpec,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(cb) = &spec.callback else {
        return Ok(());
    };
    // `JobSpec` validated the URL: a parse error here cannot happen, and the
    // notifier would fail such a callback at once anyway.
    let Ok(url) = url::Url::parse(&cb.dst) else {
        return Ok(());
    };
    guard.check_url(&url).map_err(|e| {
        // `callback_url` wins over `callback_dst` when both are given.
        let legacy = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| Some(!v.get("callback_url")?.as_str()?.is_empty()))
            .unwrap_or(false);
        let field = if legacy {
            "callback_url"
        } else {
            "callback_dst"
        };
        ApiError(StatusCode::BAD_REQUEST, format!("{field}: {e}"))
    })
}

/// The job, if it exists and is the caller's to see (another tenant's job is as
/// unknown as one that never existed).
pub(crate) async fn visible_job(
    s: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<crate::job::JobRecord, ApiError> {
    job_seen_by(&*s.store, caller, id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("job {id} not found")))
}

/// The job, if `id` is one and the caller may see it (`None` otherwise).
pub(crate) async fn job_seen_by(
    store: &dyn Store,
    caller: &Caller,
    id: &str,
) -> Result<Option<crate::job::JobRecord>, crate::store::StoreError> {
    if !is_valid_id(id) {
        return Ok(None);
    }
    Ok(store
        .get_job(id)
        .await?
        .filter(|rec| caller.sees(rec.spec.tenant.as_deref())))
}

/// A callback state for messages: `"none yet"` before the first one.
pub(crate) fn shown_callback_state(state: &str) -> &str {
    if state.is_empty() { "none yet" } else { state }
}

async fn retry(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    if !caller.all_tenants {
        visible_job(&s, &caller, &id).await?;
    }
    match s.store.requeue_callback(&id).await? {
        RetryCallback::Requeued => {
            tracing::info!(job_id = %id, "callback requeued");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        RetryCallback::NotFound => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("job {id} not found"),
        )),
        RetryCallback::NotFailed(state) => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "job {id}'s callback has not failed (callback state: {:?})",
                shown_callback_state(&state)
            ),
        )),
    }
}

async fn heartbeat(State(s): State<AppState>) -> Response {
    if let Some(p) = &s.heartbeat_path
        && tokio::fs::try_exists(p).await.unwrap_or(false)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Service disabled, '{}' exists!", p.display()),
        )
            .into_response();
    }
    "OK".into_response()
}

async fn stats(State(s): State<AppState>, Path(component): Path<String>) -> ApiResult {
    if !matches!(component.as_str(), "processor" | "notifier") {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no stats for {component:?} (processor or notifier)"),
        ));
    }
    match s.store.get_stats(&component).await? {
        Some(json) => Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("Could not find stats for entity {component}"),
        )),
    }
}

/// Aggregations one `GET /dashboard/aggregations` lists unless `limit` says otherwise.
pub const DEFAULT_AGGR_PAGE: usize = 1000;

/// `GET /dashboard/aggregations?limit=&offset=`: busiest first. The answer is the
/// reference's array; `X-Total-Count` says how many aggregations have pending jobs
/// store-wide and `X-Next-Offset`, when present, where the next page starts.
async fn aggregations(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult {
    let (mut limit, mut offset) = (DEFAULT_AGGR_PAGE, 0usize);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let n = v.parse::<usize>().ok();
        match (&*k, n) {
            ("limit", Some(n)) if (1..=crate::store::MAX_AGGR_PAGE).contains(&n) => limit = n,
            ("offset", Some(n)) => offset = n,
            ("limit" | "offset", _) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{k} must be an integer{}, got {v:?}",
                        if k == "limit" {
                            format!(" from 1 to {}", crate::store::MAX_AGGR_PAGE)
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {k:?} (limit, offset)"),
                ));
            }
        }
    }
    // A tenant sees its own aggregations, under the names it gave them: pages of
    // everyone's are filtered, looking at no more than 10 pages' worth per request.
    let mut list = Vec::new();
    let mut at = offset;
    let mut total = 0;
    let mut next = None;
    while list.len() < limit {
        let (page, all) = s.store.aggregations_page(at, limit).await?;
        total = all;
        let n = page.len();
        for a in page {
            at += 1;
            let Some(name) = caller.shown_aggr(&a.name) else {
                continue;
            };
            let mut v = json!({ "name": format!("jobs:{name}"), "size": a.pending });
            if let Some(until) = a.rate_wait_until {
                v["waiting_for"] = json!("aggr_rate");
                v["rate_wait_until"] = json!(until);
            }
            list.push(v);
            if list.len() == limit {
                break;
            }
        }
        if list.len() == limit || at - offset >= limit.saturating_mul(10) {
            next = Some(at);
            break;
        }
        if n < limit || (at as u64) >= total {
            break;
        }
    }
    let mut resp = axum::Json(list).into_response();
    let h = resp.headers_mut();
    h.insert("x-total-count", total.into());
    if let Some(n) = next.filter(|n| (*n as u64) < total) {
        h.insert("x-next-offset", n.into());
    }
    Ok(resp)
}

async fn job(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let rec = visible_job(&s, &caller, &id).await?;
    Ok(axum::Json(rec).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_rule() {
        for ok in [
            "a",
            "0b5c9e0e-6f5e-4c7a-9b1e-2f4d6c8a0e1f",
            "01HZX3J4K5M6N7P8Q9R0S1T2V3",
            "tGnfn2eSHqMyMmJ4lumHxA==",
            "web-1:4242:17",
            "a.b_c/d+e",
        ] {
            assert!(is_acceptable_request_id(ok.as_bytes()), "{ok}");
        }
        assert!(is_acceptable_request_id("x".repeat(128).as_bytes()));
        for bad in [
            String::new(),
            "x".repeat(129),
            "x".repeat(1024),
            "a b".into(),
            "a\nb".into(),
            "a\x1b[31m".into(),
            "a\"b".into(),
            "ä".into(),
            "a;b".into(),
        ] {
            assert!(!is_acceptable_request_id(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn unacceptable_or_repeated_request_ids_are_dropped() {
        let req = |ids: &[&str]| {
            let mut b = axum::http::Request::builder();
            for id in ids {
                b = b.header("x-request-id", *id);
            }
            drop_unacceptable_request_id(b.body(()).unwrap())
        };
        let ids = |r: &axum::http::Request<()>| r.headers().get_all("x-request-id").iter().count();
        let r = req(&["abc-123"]);
        assert_eq!(r.headers()["x-request-id"], "abc-123");
        assert_eq!(ids(&req(&[&"x".repeat(200)])), 0);
        assert_eq!(ids(&req(&["a", "b"])), 0);
        assert_eq!(ids(&req(&[])), 0);
    }
}
