//! The claim loop shared by the processor and the notifier: claim a job from a queue,
//! run it as a task holding a lease, renew the leases of all running tasks, and on
//! shutdown let them finish within a grace period before handing the rest back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store::{ClaimShares, Claimed, Queue, Store};

/// The longest an idle worker waits before it looks at the queue again without being
/// woken (recovers expired leases of dead workers and missed wake-ups).
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Jobs claimed in one store round trip.
const CLAIM_BATCH: usize = 32;

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one claimed job to its end and records the result in the store. When
    /// `cancel` fires (lease lost, or shutdown past the grace period) it must stop and
    /// hand the job back with `Store::release`.
    async fn handle(&self, job: Claimed, cancel: CancellationToken);

    /// What the next claim of up to `max` jobs may take (the processor's fair shares
    /// of its slots). Default: anything.
    fn claim_shares(&self, _max: usize) -> ClaimShares {
        ClaimShares::default()
    }

    /// Called for each claimed job before the next claim; what it returns is dropped
    /// when the job's task ends (the processor counts the job in its shares with it).
    fn claimed(&self, _job: &Claimed) -> Box<dyn Send> {
        Box::new(())
    }
}

pub struct WorkerConfig {
    pub queue: Queue,
    pub lease: Duration,
    pub max_in_flight: usize,
    pub grace: Duration,
    /// When set, claims wait while it holds `false` (the processor's disk watch).
    pub may_claim: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Leases held by this process: (job id, lease token) → the task's cancel token.
/// Keyed by the token too: a job handed back (deferred, released) may be claimed again
/// by this process while its first task is still ending, and each lease must be
/// renewed, lost and removed on its own.
#[derive(Default)]
struct Leases(Mutex<HashMap<(String, String), CancellationToken>>);

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), CancellationToken>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub async fn run(
    store: Arc<dyn Store>,
    mut cfg: WorkerConfig,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let leases = Arc::new(Leases::default());
    let background = CancellationToken::new();
    let woken = Arc::new(Notify::new());
    let mut helpers = JoinSet::new();
    // Tasks carry the caller's span (component, host) into their log lines.
    helpers.spawn(
        renew_leases(
            store.clone(),
            cfg.queue,
            cfg.lease,
            leases.clone(),
            background.clone(),
        )
        .in_current_span(),
    );
    helpers.spawn(
        listen_for_wakeups(store.clone(), cfg.queue, woken.clone(), background.clone())
            .in_current_span(),
    );

    let mut tasks = JoinSet::new();
    let mut error_backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        while let Some(r) = tasks.try_join_next() {
            log_panic(r);
        }
        if tasks.len() >= cfg.max_in_flight {
            tokio::select! {
                r = tasks.join_next() => if let Some(r) = r { log_panic(r) },
                _ = shutdown.cancelled() => {}
            }
            continue;
        }
        if let Some(gate) = &mut cfg.may_claim
            && !*gate.borrow_and_update()
        {
            let closed = tokio::select! {
                r = gate.changed() => r.is_err(),
                Some(r) = tasks.join_next(), if !tasks.is_empty() => { log_panic(r); false }
                _ = shutdown.cancelled() => false,
            };
            if closed {
                cfg.may_claim = None;
            }
            continue;
        }
        let room = (cfg.max_in_flight - tasks.len()).min(CLAIM_BATCH);
        let shares = handler.claim_shares(room);
        match store
            .claim_shared(cfg.queue, cfg.lease, room, &shares)
            .await
        {
            Ok((claimed, _)) if !claimed.is_empty() => {
                error_backoff = Duration::from_millis(100);
                for c in claimed {
                    let cancel = CancellationToken::new();
                    let key = (c.job.id.clone(), c.token.clone());
                    leases.lock().insert(key.clone(), cancel.clone());
                    let (h, l) = (handler.clone(), leases.clone());
                    let ticket = handler.claimed(&c);
                    tasks.spawn(
                        async move {
                            h.handle(c, cancel).await;
                            l.lock().remove(&key);
                            drop(ticket);
                        }
                        .in_current_span(),
                    );
                }
            }
            Ok((_, next_due)) => {
                let wait = next_due.map_or(IDLE_WAIT, |d| d.min(IDLE_WAIT));
                tokio::select! {
                    _ = woken.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    Some(r) = tasks.join_next(), if !tasks.is_empty() => log_panic(r),
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::error!(queue = cfg.queue.name(), error = %e, "cannot claim from the store");
                tokio::select! {
                    _ = tokio::time::sleep(error_backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    let running = tasks.len();
    if running > 0 {
        tracing::info!(queue = cfg.queue.name(), running, grace = ?cfg.grace, "shutting down: waiting for running jobs");
    }
    let drained = tokio::time::timeout(cfg.grace, async {
        while let Some(r) = tasks.join_next().await {
            log_panic(r);
        }
    })
    .await;
    if drained.is_err() {
        let n = tasks.len();
        tracing::warn!(
            queue = cfg.queue.name(),
            jobs = n,
            "grace period over: handing running jobs back"
        );
        for cancel in leases.lock().values() {
            cancel.cancel();
        }
        while let Some(r) = tasks.join_next().await {
            log_panic(r);
        }
    }
    background.cancel();
    while helpers.join_next().await.is_some() {}
}

fn log_panic(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "job task panicked");
    }
}

async fn renew_leases(
    store: Arc<dyn Store>,
    queue: Queue,
    lease: Duration,
    leases: Arc<Leases>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let held: Vec<(String, String)> = leases.lock().keys().cloned().collect();
        match store.renew(queue, &held, lease).await {
            Ok(alive) => {
                let map = leases.lock();
                for (key, ok) in held.iter().zip(alive) {
                    if !ok && let Some(cancel) = map.get(key) {
                        let id = &key.0;
                        tracing::warn!(job_id = %id, queue = queue.name(), "lease lost: another worker owns the job now");
                        cancel.cancel();
                    }
                }
            }
            Err(e) => tracing::warn!(queue = queue.name(), error = %e, "cannot renew leases"),
        }
    }
}

/// Turns the store's wake-ups (a job was queued, a slot was freed) into a local
/// notification, so the claim loop never sleeps while work is waiting.
async fn listen_for_wakeups(
    store: Arc<dyn Store>,
    queue: Queue,
    woken: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            r = store.wait(queue, IDLE_WAIT) => r,
            _ = stop.cancelled() => return,
        };
        if let Err(e) = r {
            tracing::warn!(queue = queue.name(), error = %e, "cannot wait for wake-ups");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
        woken.notify_one();
    }
}

/// Retries a store write a few times: a result that cannot be written is redone by
/// another worker once the lease expires, so this only smooths over short blips.
pub async fn persist<F, Fut>(what: &str, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::Result<bool>>,
{
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match f().await {
            Ok(true) => return true,
            Ok(false) => {
                tracing::warn!(
                    what,
                    "lease lost before the result was recorded; another worker redoes the job"
                );
                return false;
            }
            Err(e) => {
                tracing::warn!(what, attempt, error = %e, "cannot record result");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    false
}
