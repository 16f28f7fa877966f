//! Fair shares of one processor's download slots: one aggregation, or one tenant over
//! all its aggregations, holds at most its share of `max_concurrent_downloads`, so
//! that an origin that stalls every download of an aggregation leaves the other
//! slots to the others.
//!
//! The processor counts the downloads it holds per aggregation and per tenant from
//! the moment they are claimed until their task ends, and every claim tells the
//! store how many more of each it may take ([`ClaimShares`]): the store skips those
//! with no room left and leaves their jobs pending, so nothing is claimed only to be
//! handed back, and no attempt is spent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::job::JobSpec;
use crate::store::ClaimShares;

pub struct Shares {
    /// Slots one aggregation may hold; `None`: all of them (no share to keep).
    per_aggregation: Option<usize>,
    per_tenant: Option<usize>,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    aggregations: HashMap<String, usize>,
    tenants: HashMap<String, usize>,
}

impl Held {
    fn add(&mut self, aggr: &str, tenant: Option<&str>) {
        *self.aggregations.entry(aggr.to_string()).or_default() += 1;
        if let Some(t) = tenant {
            *self.tenants.entry(t.to_string()).or_default() += 1;
        }
    }

    fn remove(&mut self, aggr: &str, tenant: Option<&str>) {
        fn dec(map: &mut HashMap<String, usize>, key: &str) {
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
        dec(&mut self.aggregations, aggr);
        if let Some(t) = tenant {
            dec(&mut self.tenants, t);
        }
    }
}

impl Shares {
    /// Shares of `per_aggregation` and `per_tenant` of `slots` download slots (a share
    /// of all the slots limits nothing).
    pub fn new(per_aggregation: usize, per_tenant: usize, slots: usize) -> Shares {
        let share = |n: usize| (n < slots).then_some(n.max(1));
        Shares {
            per_aggregation: share(per_aggregation),
            per_tenant: share(per_tenant),
            held: Mutex::new(Held::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a claim of up to `max` jobs may take: only the aggregations and tenants
    /// that this many more jobs could take past their share are listed, so the list
    /// stays short (a share of half the slots lists at most two of each).
    pub fn claim_shares(&self, max: usize) -> ClaimShares {
        fn near_full(
            map: &HashMap<String, usize>,
            share: Option<usize>,
            max: usize,
        ) -> Vec<(String, u32)> {
            let Some(share) = share else {
                return Vec::new();
            };
            map.iter()
                .filter(|(_, n)| **n + max > share)
                .map(|(k, n)| (k.clone(), share.saturating_sub(*n) as u32))
                .collect()
        }
        let held = self.lock();
        ClaimShares {
            aggregations: near_full(&held.aggregations, self.per_aggregation, max),
            tenants: near_full(&held.tenants, self.per_tenant, max),
        }
    }

    /// Counts a claimed job of `spec` until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, spec: &JobSpec) -> ShareSlot {
        let aggr = spec.aggr_key();
        let tenant = spec.tenant.clone();
        self.lock().add(&aggr, tenant.as_deref());
        ShareSlot {
            shares: self.clone(),
            aggr,
            tenant,
        }
    }

    /// Downloads held now by aggregation `aggr` (its store key) and by `tenant`.
    pub fn held(&self, aggr: &str, tenant: Option<&str>) -> (usize, usize) {
        let held = self.lock();
        (
            held.aggregations.get(aggr).copied().unwrap_or(0),
            tenant
                .and_then(|t| held.tenants.get(t).copied())
                .unwrap_or(0),
        )
    }
}

/// One claimed job counted in its shares; dropping it gives the slot back.
pub struct ShareSlot {
    shares: Arc<Shares>,
    aggr: String,
    tenant: Option<String>,
}

impl Drop for ShareSlot {
    fn drop(&mut self) {
        self.shares
            .lock()
            .remove(&self.aggr, self.tenant.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(aggr: &str, tenant: Option<&str>) -> JobSpec {
        let mut s = JobSpec::from_json(
            format!(
                r#"{{"aggr_id":"{aggr}","aggr_limit":100,"url":"http://x.test/f","callback_url":"http://cb.test/"}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        s.tenant = tenant.map(str::to_string);
        s
    }

    #[test]
    fn lists_only_what_a_claim_could_fill() {
        let shares = Arc::new(Shares::new(4, 6, 16));
        assert!(shares.claim_shares(32).is_empty());
        let a: Vec<_> = (0..3).map(|_| shares.hold(&job("a", None))).collect();
        // 3 held of 4: a claim of 1 could not pass the share, a claim of 2 could.
        assert!(shares.claim_shares(1).is_empty());
        assert_eq!(shares.claim_shares(2).aggregations, [("a".to_string(), 1)]);
        let _b = shares.hold(&job("a", None));
        assert_eq!(shares.claim_shares(1).aggregations, [("a".to_string(), 0)]);
        drop(a);
        assert_eq!(shares.held("a", None), (1, 0));
        assert!(shares.claim_shares(3).is_empty());
    }

    #[test]
    fn a_tenant_is_counted_over_its_aggregations() {
        let shares = Arc::new(Shares::new(4, 6, 16));
        let held: Vec<_> = (0..6)
            .map(|i| shares.hold(&job(&format!("a{}", i % 3), Some("t1"))))
            .collect();
        let s = shares.claim_shares(32);
        assert_eq!(s.tenants, [("t1".to_string(), 0)]);
        // Each aggregation holds 2 of its 4: listed, with room 2.
        assert_eq!(s.aggregations.len(), 3);
        assert!(
            s.aggregations
                .iter()
                .all(|(a, n)| a.starts_with("@t1/") && *n == 2)
        );
        assert_eq!(shares.held("@t1/a0", Some("t1")), (2, 6));
        drop(held);
        assert!(shares.claim_shares(32).is_empty());
        assert_eq!(shares.held("@t1/a0", Some("t1")), (0, 0));
    }

    #[test]
    fn a_share_of_every_slot_limits_nothing() {
        let shares = Arc::new(Shares::new(16, 16, 16));
        let _held: Vec<_> = (0..16).map(|_| shares.hold(&job("a", Some("t")))).collect();
        assert!(shares.claim_shares(32).is_empty());
    }
}
