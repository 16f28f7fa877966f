//! Fair delivery: at most `notifier.per_host_concurrency` callbacks in flight to one
//! receiver (its `host:port`) in this process, so a receiver that hangs or crawls
//! holds its share of `notifier.concurrency` and no more.
//!
//! A claimed callback whose receiver is at its cap does not wait in a slot: it is
//! handed back to the store unattempted and parked on the receiver
//! ([`Store::defer_callback`]). When one of the receiver's callbacks here ends, the
//! oldest parked one is put at the head of the queue ([`Store::wake_callbacks`]); a
//! parked callback also comes back by itself after a fallback that doubles with each
//! deferral ([`park_delay`]), so a callback parked on a receiver that never answers
//! costs a claim and a deferral a minute at most once it has waited a minute, not a
//! poll.
//!
//! [`Store::defer_callback`]: crate::store::Store::defer_callback
//! [`Store::wake_callbacks`]: crate::store::Store::wake_callbacks

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The first fallback of a parked callback; doubled for each further deferral.
pub const PARK_FALLBACK_FIRST: Duration = Duration::from_secs(2);
/// The longest fallback of a parked callback.
pub const PARK_FALLBACK_MAX: Duration = Duration::from_secs(60);

/// Receivers remembered without a callback in flight (only as "callbacks are parked
/// there"); beyond this many the oldest such notes are dropped (their callbacks then
/// come back at their fallback time).
const MAX_IDLE_NOTES: usize = 4096;

/// How long a callback deferred `defers` times before (since its last attempt) stays
/// parked at most: 2 s, 4 s, 8 s, ... up to 60 s.
pub fn park_delay(defers: u32) -> Duration {
    PARK_FALLBACK_FIRST
        .saturating_mul(1u32 << defers.min(16))
        .min(PARK_FALLBACK_MAX)
}

/// The receiver a callback URL goes to: `host:port`, the scheme's port when none is
/// given, the host in lower case (IPv6 in brackets). Empty for a URL without a host
/// (its delivery fails anyway).
pub fn destination(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else {
        return String::new();
    };
    let Some(host) = u.host_str() else {
        return String::new();
    };
    match u.port_or_known_default() {
        Some(port) => format!("{}:{port}", host.to_ascii_lowercase()),
        None => host.to_ascii_lowercase(),
    }
}

#[derive(Debug, Default)]
struct Dest {
    running: usize,
    /// Callbacks may be parked on it: this process deferred one, or the last wake-up
    /// found some.
    parked: bool,
    /// When it last had nothing in flight (an order for dropping idle notes).
    idle_since: u64,
}

/// This process's callbacks in flight per receiver.
#[derive(Debug)]
pub struct Destinations {
    cap: usize,
    map: Mutex<HashMap<String, Dest>>,
    /// Ticks for `idle_since`.
    clock: std::sync::atomic::AtomicU64,
}

/// One of a receiver's slots, held while a callback is being delivered. Dropping it
/// (a cancelled delivery) frees the slot; [`Destinations::leave`] frees it and says
/// whether parked callbacks should be woken.
#[derive(Debug)]
pub struct Slot {
    dests: Arc<Destinations>,
    key: String,
    held: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.dests.release(&self.key);
        }
    }
}

impl Destinations {
    pub fn new(cap: usize) -> Arc<Destinations> {
        Arc::new(Destinations {
            cap: cap.max(1),
            map: Mutex::new(HashMap::new()),
            clock: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Dest>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot of `key`'s, if it has fewer than the cap in flight. A refusal notes
    /// that a callback for `key` is about to be parked, so that the next slot freed
    /// wakes it (and [`Destinations::note_parked`] for a slot freed meanwhile).
    pub fn try_enter(self: &Arc<Self>, key: &str) -> Option<Slot> {
        let mut map = self.lock();
        let d = map.entry(key.to_string()).or_default();
        if d.running >= self.cap {
            d.parked = true;
            return None;
        }
        d.running += 1;
        Some(Slot {
            dests: self.clone(),
            key: key.to_string(),
            held: true,
        })
    }

    /// Notes that a callback for `key` was parked in the store. When `key` has a
    /// free slot by now (its callbacks ended while this one was being parked, and
    /// their wake-ups may have come too early), says so: the caller wakes it.
    pub fn note_parked(&self, key: &str) -> bool {
        let mut map = self.lock();
        let d = map.entry(key.to_string()).or_default();
        d.parked = true;
        let room = d.running < self.cap;
        self.trim(&mut map);
        room
    }

    /// Frees `slot`; true when callbacks may be parked on its receiver, so one
    /// should be woken.
    pub fn leave(&self, mut slot: Slot) -> bool {
        slot.held = false;
        self.release(&slot.key)
    }

    fn release(&self, key: &str) -> bool {
        let mut map = self.lock();
        let Some(d) = map.get_mut(key) else {
            return false;
        };
        d.running = d.running.saturating_sub(1);
        let parked = d.parked;
        if d.running == 0 {
            if parked {
                d.idle_since = self
                    .clock
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                map.remove(key);
            }
        }
        parked
    }

    /// Records what a wake-up for `key` found: none parked any more ends the note.
    pub fn note_woken(&self, key: &str, woken: usize) {
        if woken > 0 {
            return;
        }
        let mut map = self.lock();
        if let Some(d) = map.get_mut(key) {
            d.parked = false;
            if d.running == 0 {
                map.remove(key);
            }
        }
    }

    /// Callbacks in flight to `key` here.
    pub fn in_flight(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, |d| d.running)
    }

    /// Keeps the notes of idle receivers bounded: the oldest go first.
    fn trim(&self, map: &mut HashMap<String, Dest>) {
        // O(1) first: the idle notes are never more than the map holds.
        if map.len() <= MAX_IDLE_NOTES {
            return;
        }
        let idle = map.values().filter(|d| d.running == 0).count();
        if idle <= MAX_IDLE_NOTES {
            return;
        }
        let mut ages: Vec<u64> = map
            .values()
            .filter(|d| d.running == 0)
            .map(|d| d.idle_since)
            .collect();
        ages.sort_unstable();
        let cut = ages[idle - MAX_IDLE_NOTES / 2];
        map.retain(|_, d| d.running > 0 || d.idle_since >= cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_is_host_and_port() {
        assert_eq!(destination("http://Example.COM/cb?x=1"), "example.com:80");
        assert_eq!(destination("https://example.com/cb"), "example.com:443");
        assert_eq!(
            destination("http://u:p@example.com:8080/"),
            "example.com:8080"
        );
        assert_eq!(destination("http://[::1]:9000/cb"), "[::1]:9000");
        assert_eq!(destination("http://127.0.0.1/"), "127.0.0.1:80");
        // Same receiver, however the URL spells it.
        assert_eq!(
            destination("http://example.com:80/a"),
            destination("http://EXAMPLE.com/b")
        );
        assert_eq!(destination("not a url"), "");
    }

    #[test]
    fn park_delay_doubles_up_to_a_minute() {
        assert_eq!(park_delay(0), Duration::from_secs(2));
        assert_eq!(park_delay(1), Duration::from_secs(4));
        assert_eq!(park_delay(4), Duration::from_secs(32));
        assert_eq!(park_delay(5), PARK_FALLBACK_MAX);
        assert_eq!(park_delay(u32::MAX), PARK_FALLBACK_MAX);
    }

    #[test]
    fn slots_are_capped_per_destination_and_freed() {
        let d = Destinations::new(2);
        let a1 = d.try_enter("a:80").unwrap();
        let a2 = d.try_enter("a:80").unwrap();
        assert!(d.try_enter("a:80").is_none(), "a is at its cap");
        assert!(!d.note_parked("a:80"), "still full");
        let b = d.try_enter("b:80").expect("b has its own share");
        assert_eq!(d.in_flight("a:80"), 2);
        // Nothing was parked: no wake-up needed.
        d.note_woken("a:80", 0);
        assert!(!d.leave(a1), "the last wake-up found none");
        assert!(d.note_parked("a:80"), "a slot is free by now");
        // A dropped slot (a cancelled delivery) is freed too.
        drop(a2);
        assert_eq!(d.in_flight("a:80"), 0);
        let a3 = d.try_enter("a:80").unwrap();
        assert!(d.leave(a3), "callbacks are parked on a");
        d.note_woken("a:80", 0);
        let a4 = d.try_enter("a:80").unwrap();
        assert!(!d.leave(a4), "the last wake-up found none");
        assert!(!d.leave(b));
        assert!(
            d.lock().is_empty(),
            "nothing in flight, nothing parked: forgotten"
        );
    }

    #[test]
    fn idle_notes_are_bounded() {
        let d = Destinations::new(1);
        let busy = d.try_enter("busy:80").unwrap();
        for i in 0..(MAX_IDLE_NOTES + 10) {
            let key = format!("h{i}:80");
            let s = d.try_enter(&key).unwrap();
            d.note_parked(&key);
            d.leave(s);
        }
        let n = d.lock().len();
        assert!(n <= MAX_IDLE_NOTES + 1, "{n}");
        assert_eq!(d.in_flight("busy:80"), 1, "a receiver in flight is kept");
        drop(busy);
    }
}
