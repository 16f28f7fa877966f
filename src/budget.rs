//! A byte budget shared by everything that holds client-sized data in memory at once
//! (request bodies in flight: `api.max_inflight_body_bytes`).
//!
//! Whoever is about to hold `n` bytes reserves them first and holds the returned
//! [`BudgetGuard`] for as long as it holds the bytes; dropping the guard gives them
//! back. A reservation that does not fit is refused ([`ByteBudget::try_acquire`]) or
//! waits until it fits or a deadline passes ([`ByteBudget::acquire`]): the budget is
//! never overdrawn.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A fixed number of bytes, shared by clones (cheap: one `Arc`).
#[derive(Clone, Debug)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    total: u64,
    used: Mutex<u64>,
    /// Woken whenever bytes are given back.
    released: Notify,
}

/// Bytes reserved from a [`ByteBudget`]; given back when dropped.
#[derive(Debug)]
#[must_use = "the reservation is given back as soon as the guard is dropped"]
pub struct BudgetGuard {
    inner: Arc<Inner>,
    bytes: u64,
}

impl ByteBudget {
    /// A budget of `total` bytes, none reserved.
    pub fn new(total: u64) -> ByteBudget {
        ByteBudget {
            inner: Arc::new(Inner {
                total,
                used: Mutex::new(0),
                released: Notify::new(),
            }),
        }
    }

    /// The budget's size.
    pub fn total(&self) -> u64 {
        self.inner.total
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        *self.inner.lock()
    }

    /// Reserves `bytes` if they fit now, else `None` (at once: never waits). Zero bytes
    /// always fit.
    pub fn try_acquire(&self, bytes: u64) -> Option<BudgetGuard> {
        self.inner.take(bytes).then(|| BudgetGuard {
            inner: self.inner.clone(),
            bytes,
        })
    }

    /// Reserves `bytes`, waiting for others to give bytes back until `deadline`; `None`
    /// at the deadline, or at once when `bytes` is over the whole budget (it could
    /// never fit). Waiters are not queued in order: a small reservation may pass a
    /// large one that is still waiting.
    pub async fn acquire(&self, bytes: u64, deadline: tokio::time::Instant) -> Option<BudgetGuard> {
        if bytes > self.inner.total {
            return None;
        }
        loop {
            // Registered before the attempt, so that a release between the attempt
            // and the wait is not missed.
            let released = self.inner.released.notified();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            if let Some(g) = self.try_acquire(bytes) {
                return Some(g);
            }
            tokio::select! {
                _ = released => {}
                _ = tokio::time::sleep_until(deadline) => return self.try_acquire(bytes),
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, bytes: u64) -> bool {
        let mut used = self.lock();
        match used.checked_add(bytes) {
            Some(n) if n <= self.total => {
                *used = n;
                true
            }
            _ => false,
        }
    }
}

impl BudgetGuard {
    /// Bytes this guard holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserves `more` bytes into this guard if they fit now (for data whose size is
    /// learnt as it arrives, such as a chunked request body); `false` leaves the guard
    /// as it was.
    pub fn try_grow(&mut self, more: u64) -> bool {
        if !self.inner.take(more) {
            return false;
        }
        self.bytes += more;
        true
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        *self.inner.lock() -= self.bytes;
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reservations_never_overdraw_and_are_given_back_on_drop() {
        let b = ByteBudget::new(10);
        let a = b.try_acquire(6).expect("6 of 10 fit");
        assert_eq!((a.bytes(), b.used()), (6, 6));
        assert!(b.try_acquire(5).is_none(), "6 + 5 > 10");
        let c = b.try_acquire(4).expect("6 + 4 = 10 fits");
        assert_eq!(b.used(), 10);
        assert!(b.try_acquire(1).is_none());
        assert!(b.try_acquire(0).is_some(), "zero bytes always fit");
        drop(a);
        assert_eq!(b.used(), 4);
        assert!(b.try_acquire(6).is_some());
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(b.try_acquire(11).is_none(), "more than the whole budget");
        assert!(b.try_acquire(u64::MAX).is_none(), "no overflow");
        assert_eq!(b.total(), 10);
    }

    #[test]
    fn a_guard_grows_only_within_the_budget() {
        let b = ByteBudget::new(10);
        let mut g = b.try_acquire(0).unwrap();
        assert!(g.try_grow(4));
        assert!(g.try_grow(4));
        assert!(!g.try_grow(4), "12 > 10");
        assert_eq!((g.bytes(), b.used()), (8, 8));
        let clone = b.clone();
        assert!(clone.try_acquire(3).is_none(), "clones share one budget");
        drop(g);
        assert_eq!(clone.used(), 0);
    }

    #[tokio::test]
    async fn acquire_waits_for_a_release_or_the_deadline() {
        let b = ByteBudget::new(10);
        let held = b.try_acquire(8).unwrap();
        // Nothing is given back: the deadline ends the wait with nothing.
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(b.acquire(5, soon).await.is_none());
        // Over the whole budget: refused at once, whatever the deadline.
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let t = std::time::Instant::now();
        assert!(b.acquire(11, far).await.is_none());
        assert!(t.elapsed() < Duration::from_secs(60));
        // A release lets a waiter in.
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(5, far).await.map(|g| g.bytes()) })
        };
        tokio::task::yield_now().await;
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter got in after the release")
            .unwrap();
        assert_eq!(got, Some(5));
        assert_eq!(b.used(), 0, "the waiter's guard was dropped with its task");
    }
}
