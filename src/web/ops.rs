//! `GET /metrics`, `GET /healthz` and `GET /info`: on the API's port for `web` and
//! `serve`, on the admin listener (`processor.admin_addr`, `notifier.admin_addr`) for
//! the processor and the notifier.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::Info;
use crate::metrics::{self, Sources};
use crate::store::Store;

/// A store answer younger than this makes `/healthz` answer without asking again.
const FRESH: Duration = Duration::from_secs(5);

/// How long `/healthz` waits for the store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct OpsState {
    pub info: Arc<Info>,
    pub sources: Sources,
    pub health: Arc<Health>,
}

impl OpsState {
    pub fn new(
        info: Arc<Info>,
        store: Arc<dyn Store>,
        thumbnailer: Option<Arc<crate::thumbnail::Thumbnailer>>,
    ) -> OpsState {
        OpsState {
            info,
            sources: Sources {
                store: Some(store.clone()),
                thumbnailer,
            },
            health: Arc::new(Health::new(store)),
        }
    }
}

/// Liveness: the process answers and its store answered within the last few seconds
/// (asked again, with a timeout, when its last answer is older). Every component needs
/// the store for all it does, so a process that cannot reach it is not doing its job.
pub struct Health {
    store: Arc<dyn Store>,
    last_ok: Mutex<Option<Instant>>,
}

impl Health {
    pub fn new(store: Arc<dyn Store>) -> Health {
        Health {
            store,
            last_ok: Mutex::new(None),
        }
    }

    fn last_ok(&self) -> Option<Instant> {
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Ok(age of the store's last answer)` or why the process is not healthy.
    pub async fn check(&self) -> Result<Duration, String> {
        if let Some(t) = self.last_ok()
            && t.elapsed() < FRESH
        {
            return Ok(t.elapsed());
        }
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.get_stats("processor")).await {
            Ok(Ok(_)) => {
                *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Ok(Duration::ZERO)
            }
            Ok(Err(e)) => Err(format!("the store failed: {e}")),
            Err(_) => Err(format!(
                "the store did not answer within {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The three routes, with their state.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/info", get(info))
        .with_state(state)
}

async fn metrics_text(State(s): State<OpsState>) -> Response {
    let text = metrics::render(&s.sources).await;
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn healthz(State(s): State<OpsState>) -> Response {
    match s.health.check().await {
        Ok(age) => axum::Json(json!({
            "status": "ok",
            "store_answered_ms_ago": age.as_millis() as u64,
        }))
        .into_response(),
        Err(error) => {
            tracing::warn!(error, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "status": "unhealthy", "error": error })),
            )
                .into_response()
        }
    }
}

async fn info(State(s): State<OpsState>) -> Response {
    let i = &s.info;
    let started = i
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": env!("DOWNLOADER_COMMIT"),
        "build_date": env!("DOWNLOADER_BUILD_DATE"),
        "started_at": started,
        "uptime_secs": i.started_mono.elapsed().as_secs(),
        "components": i.components,
        "host": i.host,
        "store": i.store,
    }))
    .into_response()
}
