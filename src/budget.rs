//! A byte budget: a counting semaphore of bytes, for memory that is reserved before it
//! is held — request bodies in flight (`api.max_inflight_body_bytes`, which never
//! waits: [`ByteBudget::try_acquire`] and [`Reservation::try_grow`]) and decodes
//! (`thumbnail.max_memory_bytes`, which wait with [`ByteBudget::acquire`]).
//!
//! Reservations are granted in arrival order: a waiter is never overtaken by a later
//! request, however small, so a large reservation cannot be starved by a stream of
//! small ones. A request larger than the whole budget is refused at once; every wait
//! has a deadline. Plain `std` (no runtime), so it works on the thumbnail pool's
//! threads and in the CLI.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Why a reservation was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The request is larger than the whole budget: it could never be granted.
    #[error("{wanted} bytes is more than the whole budget of {total} bytes")]
    TooLarge { wanted: u64, total: u64 },
    /// Not enough was free (now, or before the deadline).
    #[error("{wanted} bytes not free in time ({free} of {total} bytes free)")]
    Busy { wanted: u64, free: u64, total: u64 },
}

struct State {
    free: u64,
    /// Tickets of the waiters, oldest first.
    queue: VecDeque<u64>,
    next_ticket: u64,
}

struct Inner {
    total: u64,
    state: Mutex<State>,
    cond: Condvar,
}

/// A budget of `total` bytes; cheap to clone (shared).
#[derive(Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

/// A granted reservation; gives its bytes back when dropped.
#[must_use = "the reservation is released as soon as it is dropped"]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserves `more` bytes into this reservation if they are free now and nobody is
    /// waiting (for data whose size is learnt as it arrives, such as a chunked request
    /// body); `false` leaves it as it was.
    pub fn try_grow(&mut self, more: u64) -> bool {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.queue.is_empty() && st.free >= more {
            st.free -= more;
            self.bytes += more;
            return true;
        }
        false
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.free += self.bytes;
        drop(st);
        self.inner.cond.notify_all();
    }
}

impl std::fmt::Debug for ByteBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteBudget")
            .field("total", &self.total())
            .field("free", &self.free())
            .finish()
    }
}

impl ByteBudget {
    pub fn new(total: u64) -> ByteBudget {
        ByteBudget {
            inner: Arc::new(Inner {
                total,
                state: Mutex::new(State {
                    free: total,
                    queue: VecDeque::new(),
                    next_ticket: 0,
                }),
                cond: Condvar::new(),
            }),
        }
    }

    pub fn total(&self) -> u64 {
        self.inner.total
    }

    /// Bytes not reserved right now.
    pub fn free(&self) -> u64 {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
    }

    /// Bytes reserved right now.
    pub fn used(&self) -> u64 {
        self.total() - self.free()
    }

    /// Requests waiting for their bytes.
    pub fn waiters(&self) -> usize {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue
            .len()
    }

    fn grant(&self, n: u64) -> Reservation {
        Reservation {
            inner: self.inner.clone(),
            bytes: n,
        }
    }

    /// Reserve `n` bytes if they are free now and nobody is waiting before us.
    pub fn try_acquire(&self, n: u64) -> Result<Reservation, BudgetError> {
        let total = self.inner.total;
        if n > total {
            return Err(BudgetError::TooLarge { wanted: n, total });
        }
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.queue.is_empty() && st.free >= n {
            st.free -= n;
            return Ok(self.grant(n));
        }
        Err(BudgetError::Busy {
            wanted: n,
            free: st.free,
            total,
        })
    }

    /// Reserve `n` bytes, waiting (in arrival order) until they are free or `deadline`
    /// passes. Blocks the calling thread.
    pub fn acquire(&self, n: u64, deadline: Instant) -> Result<Reservation, BudgetError> {
        let total = self.inner.total;
        if n > total {
            return Err(BudgetError::TooLarge { wanted: n, total });
        }
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.queue.is_empty() && st.free >= n {
            st.free -= n;
            return Ok(self.grant(n));
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(ticket);
        loop {
            if st.queue.front() == Some(&ticket) && st.free >= n {
                st.queue.pop_front();
                st.free -= n;
                drop(st);
                // The next waiter may fit in what is left.
                self.inner.cond.notify_all();
                return Ok(self.grant(n));
            }
            let now = Instant::now();
            if now >= deadline {
                st.queue.retain(|&t| t != ticket);
                let free = st.free;
                drop(st);
                // Whoever was behind us may now be first.
                self.inner.cond.notify_all();
                return Err(BudgetError::Busy {
                    wanted: n,
                    free,
                    total,
                });
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grants_and_releases() {
        let b = ByteBudget::new(100);
        let r1 = b.try_acquire(60).unwrap();
        assert_eq!((r1.bytes(), b.free()), (60, 40));
        assert_eq!(
            b.try_acquire(41).err(),
            Some(BudgetError::Busy {
                wanted: 41,
                free: 40,
                total: 100
            })
        );
        let r2 = b.try_acquire(40).unwrap();
        assert_eq!(b.free(), 0);
        drop(r1);
        assert_eq!(b.free(), 60);
        drop(r2);
        assert_eq!(b.free(), 100);
        // Zero bytes are always granted and give nothing back.
        let z = b.try_acquire(0).unwrap();
        drop(z);
        assert_eq!(b.free(), 100);
    }

    #[test]
    fn larger_than_the_budget_is_refused_at_once() {
        let b = ByteBudget::new(100);
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            b.acquire(101, far).err(),
            Some(BudgetError::TooLarge {
                wanted: 101,
                total: 100
            })
        );
        assert!(matches!(
            b.try_acquire(u64::MAX),
            Err(BudgetError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_past_deadline_fails_without_waiting_and_leaves_nothing_queued() {
        let b = ByteBudget::new(100);
        let held = b.try_acquire(100).unwrap();
        let e = b.acquire(1, Instant::now()).unwrap_err();
        assert!(matches!(e, BudgetError::Busy { free: 0, .. }), "{e}");
        drop(held);
        // The failed waiter left the queue: try_acquire is not blocked by it.
        assert!(b.try_acquire(100).is_ok());
    }

    #[test]
    fn a_waiter_gets_the_bytes_when_they_are_released() {
        let b = ByteBudget::new(100);
        let held = b.try_acquire(80).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let r = b2.acquire(50, Instant::now() + Duration::from_secs(60));
            tx.send(r.map(|r| r.bytes())).unwrap();
        });
        // Not granted while 80 are held (the waiter is queued, so try_acquire of what is
        // free fails too: arrival order).
        wait_until(|| b.waiters() == 1);
        assert!(rx.try_recv().is_err());
        assert!(b.try_acquire(10).is_err());
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(50));
        t.join().unwrap();
        assert_eq!(b.free(), 100);
    }

    #[test]
    fn waiters_are_served_in_arrival_order() {
        let b = ByteBudget::new(100);
        let held = b.try_acquire(100).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        // A big one first, then a small one: the small one must not overtake. 90 + 20
        // is over the budget, so the second is granted only once the first gives back.
        for (i, n) in [(0, 90u64), (1, 20)] {
            let b2 = b.clone();
            let tx = tx.clone();
            threads.push(std::thread::spawn(move || {
                let r = b2
                    .acquire(n, Instant::now() + Duration::from_secs(60))
                    .unwrap();
                tx.send(i).unwrap();
                r
            }));
            wait_until(|| b.waiters() == i + 1);
        }
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), 0);
        let mut threads = threads.into_iter();
        drop(threads.next().unwrap().join().unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), 1);
        drop(threads.next().unwrap().join().unwrap());
        assert_eq!(b.free(), 100);
    }

    #[test]
    fn a_reservation_grows_only_within_the_budget() {
        let b = ByteBudget::new(10);
        let mut r = b.try_acquire(2).unwrap();
        assert!(r.try_grow(4));
        assert!(r.try_grow(4));
        assert!(!r.try_grow(1), "11 > 10");
        assert_eq!((r.bytes(), b.used()), (10, 10));
        drop(r);
        assert_eq!(b.used(), 0, "all of it given back");
    }

    /// Spin (with a deadline) until `f` holds.
    fn wait_until(f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < deadline, "condition not reached in 60 s");
            std::thread::yield_now();
        }
    }
}
