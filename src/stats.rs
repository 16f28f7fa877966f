//! Counters each component reports to the store every `stats_interval`, read back
//! by `GET /stats/<component>`. Names follow the reference service.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

#[derive(Debug, Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<String, i64>>,
}

impl Stats {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, i64>) -> R) -> R {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn add(&self, key: &str, n: i64) {
        self.with(|c| *c.entry(key.to_string()).or_default() += n);
    }

    /// Sets a gauge, raising the high-water mark `max_key` with it.
    pub fn gauge(&self, key: &str, value: i64, max_key: &str) {
        self.with(|c| {
            c.insert(key.to_string(), value);
            let m = c.entry(max_key.to_string()).or_default();
            *m = (*m).max(value);
        });
    }

    pub fn set(&self, key: &str, value: i64) {
        self.with(|c| c.insert(key.to_string(), value));
    }

    pub fn get(&self, key: &str) -> i64 {
        self.with(|c| c.get(key).copied().unwrap_or(0))
    }

    pub fn to_json(&self) -> String {
        self.with(|c| serde_json::to_string(c).unwrap_or_else(|_| "{}".into()))
    }

    /// Reports every `interval` until `stop`, each report expiring after two intervals.
    pub async fn report(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        component: &'static str,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = store
                .put_stats(component, &self.to_json(), interval * 2)
                .await
            {
                tracing::warn!(component, error = %e, "cannot report stats");
            }
        }
    }
}
