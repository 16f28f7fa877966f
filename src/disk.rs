//! Disk watch: the processor claims no new downloads while the storage filesystem is
//! fuller than `processor.disk_high_watermark_percent`, and claims again once it is
//! below `processor.disk_low_watermark_percent`. Running downloads go on either way.
//!
//! The watcher looks at the filesystem (statvfs) every `disk_check_interval_ms` and
//! publishes "may claim" on a `watch` channel that the claim loop waits on; each
//! transition is logged once and shown by `downloader_claims_paused`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;

/// How long one statvfs may take (a hung network filesystem) before the check is
/// counted as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Used space of the filesystem holding `path`, in percent, as `df` computes it: space
/// reserved for root counts as neither used nor available.
pub fn used_percent(path: &Path) -> std::io::Result<f64> {
    let st = rustix::fs::statvfs(path)?;
    let used = st.f_blocks.saturating_sub(st.f_bfree);
    let usable = used + st.f_bavail;
    if usable == 0 {
        return Ok(0.0);
    }
    Ok(used as f64 * 100.0 / usable as f64)
}

/// The pause/resume decision with hysteresis.
#[derive(Debug, Clone, Copy)]
pub struct Hysteresis {
    pub high: f64,
    pub low: f64,
    paused: bool,
}

impl Hysteresis {
    pub fn new(high: f64, low: f64) -> Hysteresis {
        Hysteresis {
            high,
            low,
            paused: false,
        }
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Takes a new usage reading; `Some(paused)` when the state changed.
    pub fn update(&mut self, used_percent: f64) -> Option<bool> {
        let next = if self.paused {
            used_percent >= self.low
        } else {
            used_percent > self.high
        };
        (next != self.paused).then(|| {
            self.paused = next;
            next
        })
    }
}

pub struct DiskWatch {
    pub path: PathBuf,
    pub high: f64,
    pub low: f64,
    pub interval: Duration,
}

impl DiskWatch {
    pub fn from_config(cfg: &crate::config::Config, path: PathBuf) -> DiskWatch {
        DiskWatch {
            path,
            high: cfg.processor.disk_high_watermark_percent,
            low: cfg.processor.disk_low_watermark_percent,
            interval: Duration::from_millis(cfg.processor.disk_check_interval_ms),
        }
    }

    /// Checks now and every `interval` until `stop`, sending `true` on `may_claim`
    /// while claiming is allowed (the first check's decision is always sent, so a
    /// caller can wait for it). A failed check keeps the last decision. At most one
    /// check runs at a time: a statvfs stuck on a hung mount is waited for, not
    /// joined by a new blocked thread every tick.
    pub async fn run(self, may_claim: watch::Sender<bool>, stop: CancellationToken) {
        let mut state = Hysteresis::new(self.high, self.low);
        let mut failing = false;
        let mut first = true;
        let mut running: Option<tokio::task::JoinHandle<std::io::Result<f64>>> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            metrics().disk_checks.inc();
            let mut check = match running.take() {
                // The last check is still blocked: wait on it rather than start another.
                Some(h) if !h.is_finished() => h,
                _ => {
                    let path = self.path.clone();
                    tokio::task::spawn_blocking(move || used_percent(&path))
                }
            };
            let used = match tokio::time::timeout(CHECK_TIMEOUT, &mut check).await {
                Ok(Ok(Ok(p))) => Ok(p),
                Ok(Ok(Err(e))) => Err(e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => {
                    running = Some(check);
                    Err(format!("no answer within {CHECK_TIMEOUT:?}"))
                }
            };
            let used = match used {
                Ok(p) => p,
                Err(error) => {
                    if !failing {
                        tracing::warn!(path = %self.path.display(), error, "cannot read the storage filesystem's usage; keeping the last decision");
                    }
                    failing = true;
                    if std::mem::take(&mut first) {
                        may_claim.send_replace(!state.paused());
                    }
                    continue;
                }
            };
            failing = false;
            metrics().storage_used_percent.set(used);
            if let Some(paused) = state.update(used) {
                let used = (used * 100.0).round() / 100.0;
                if paused {
                    tracing::warn!(
                        path = %self.path.display(),
                        used_percent = used,
                        high_watermark_percent = self.high,
                        "storage filesystem above the high watermark: claiming no new downloads"
                    );
                } else {
                    tracing::info!(
                        path = %self.path.display(),
                        used_percent = used,
                        low_watermark_percent = self.low,
                        "storage filesystem below the low watermark: claiming downloads again"
                    );
                }
                metrics().claims_paused.set(i64::from(paused));
                may_claim.send_replace(!paused);
            } else if std::mem::take(&mut first) {
                may_claim.send_replace(!state.paused());
            }
            first = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_above_high_and_resumes_only_below_low() {
        let mut h = Hysteresis::new(95.0, 90.0);
        assert_eq!(h.update(50.0), None);
        assert_eq!(h.update(95.0), None, "at the mark is not above it");
        assert_eq!(h.update(95.1), Some(true));
        assert_eq!(h.update(99.0), None);
        assert_eq!(h.update(93.0), None, "between the marks: still paused");
        assert_eq!(h.update(90.0), None, "at the low mark: still paused");
        assert!(h.paused());
        assert_eq!(h.update(89.9), Some(false));
        assert_eq!(h.update(93.0), None, "between the marks: still claiming");
        assert!(!h.paused());
        assert_eq!(h.update(96.0), Some(true));
    }

    #[test]
    fn usage_of_a_real_filesystem_is_a_percentage() {
        let dir = tempfile::tempdir().unwrap();
        let p = used_percent(dir.path()).unwrap();
        assert!((0.0..=100.0).contains(&p), "{p}");
        assert!(used_percent(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn the_watcher_closes_the_gate_on_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let used = used_percent(dir.path()).unwrap();
        assert!(used > 0.02, "this filesystem is empty ({used} %)");
        let (tx, mut rx) = watch::channel(true);
        let stop = CancellationToken::new();
        let w = DiskWatch {
            path: dir.path().to_path_buf(),
            high: used / 2.0,
            low: used / 4.0,
            interval: Duration::from_millis(10),
        };
        let task = tokio::spawn(w.run(tx, stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|may| !*may))
            .await
            .expect("the gate closes")
            .unwrap();
        stop.cancel();
        task.await.unwrap();
    }
}
