//! The store's schema, defined once for both backends: the names of the Redis keys,
//! the fields of a stored job (the Redis hash and the embedded store's JSON map are
//! the same map), the states and wait reasons written into it, and the limits of
//! the state machine's steps.
//!
//! The Rust backend uses these constants; the Redis scripts get them as Lua tables
//! (`K`, `F`, `A`, `S`, `W`, `C`, `Q`: [`lua_header`]) in front of every script, so that a
//! name or a limit is changed here and nowhere else. `.luacheckrc` lists the same
//! names for the Lua linter (a unit test checks that it does), so a script that uses
//! a name the schema lacks fails CI.
//!
//! A job goes through two phases, each with its own state field: the download
//! (`dl_state`) and then the callback (`cb_state`), each `Pending` → `InProgress` →
//! `Success` | `Failed` (or back to `Pending` on a retry, a deferral, a release or a
//! lost lease). ARCHITECTURE.md draws the diagram and names the step of each arrow.

use std::collections::BTreeMap;

use crate::job::{JobRecord, JobSpec, state};

/// Declares a module of `&str` constants and `ALL`, the (name, value) pairs that
/// become a Lua table.
macro_rules! names {
    ($(#[$doc:meta])* $module:ident { $($(#[$m:meta])* $name:ident = $value:expr,)* }) => {
        $(#[$doc])*
        pub mod $module {
            $($(#[$m])* pub const $name: &str = $value;)*
            /// Every name of this table with its value, in declaration order.
            pub const ALL: &[(&str, &str)] = &[$((stringify!($name), $value)),*];
        }
    };
}

names! {
    /// Redis keys, after `<key_prefix>:`; those ending in `:` are followed by a job
    /// id, an aggregation, a host, a queue or a destination. ARCHITECTURE.md says
    /// what each holds.
    key {
        /// Hash: a job's fields ([`super::field`]).
        JOB = "job:",
        /// Hash: an aggregation's settings and counts ([`super::aggr`]).
        AGGR = "aggr:",
        /// List: an aggregation's pending job ids, FIFO.
        PENDING = "pending:",
        /// Sorted set (all scores 0, taken round robin by name): aggregations with
        /// pending jobs, a free slot and no rate wait.
        READY = "ready",
        /// Sorted set: aggregations waiting for their rate, by when.
        RATEWAIT = "ratewait",
        /// Sorted set: aggregations with pending jobs, by how many.
        PENDING_N = "pending_n",
        /// String: the sum of `pending_n`'s scores.
        PENDING_TOTAL = "pending_total",
        /// List: wake-up tokens of a queue (`wake:dl`, `wake:cb`) for BLPOP.
        WAKE = "wake:",
        /// String: an aggregation's GCRA state (theoretical arrival time, ms).
        RATE = "rate:",
        /// Sorted set: delayed downloads by due time.
        DL_DELAYED = "dl:delayed",
        /// Sorted set: download leases by expiry.
        DL_LEASES = "dl:leases",
        /// Sorted set: delayed callbacks by due time.
        CB_DELAYED = "cb:delayed",
        /// Sorted set: callback leases by expiry.
        CB_LEASES = "cb:leases",
        /// List: callbacks ready to send, FIFO.
        CB_QUEUE = "cb:queue",
        /// Sorted set: failed callbacks (dead letters) by when they failed.
        CB_FAILED = "cb:failed",
        /// Sorted set: jobs to delete, by when.
        DELETIONS = "deletions",
        /// String: until when (ms) an origin asked us to leave a host alone.
        HOST_PAUSE = "hostpause:",
        /// String: the latest end of any host's pause (claims look hosts up only
        /// while it is ahead).
        HOST_PAUSES = "hostpauses",
        /// Sorted set: downloads holding a host's slots, by lease expiry.
        HOST_SLOTS = "hostslots:",
        /// List: downloads parked for a free slot of a host.
        HOST_WAIT = "hostwait:",
        /// String: a host's GCRA state.
        HOST_RATE = "hostrate:",
        /// List: callbacks parked on a busy receiver.
        CB_WAIT = "cbwait:",
        /// String: a component's stats (JSON), expiring.
        STATS = "stats:",
    }
}

names! {
    /// The fields of a stored job.
    field {
        /// The job's spec as submitted (JSON).
        SPEC = "spec",
        /// Its aggregation's store name.
        AGGR = "aggr",
        /// "1" when it has a callback.
        HAS_CB = "has_cb",
        /// The URL's host, for per-host limits and pauses.
        URL_HOST = "url_host",
        CREATED_AT = "created_at",
        DL_STATE = "dl_state",
        DL_ATTEMPTS = "dl_attempts",
        /// The token of the download lease's holder.
        DL_LEASE = "dl_lease",
        /// Download leases lost to dead workers.
        DL_LOST = "dl_lost",
        DL_ERROR = "dl_error",
        /// Deferrals for a host's pause.
        DL_PAUSES = "dl_pauses",
        STARTED_AT = "started_at",
        FINISHED_AT = "finished_at",
        RESPONSE_CODE = "response_code",
        IMAGE_SIZE = "image_size",
        /// The thumbnails made (JSON array).
        THUMBS = "thumbs",
        /// When a delayed download or callback is due (0: not delayed).
        NEXT_AT = "next_at",
        /// Why a delayed download waits ([`super::wait`]).
        WAIT = "wait",
        /// The host whose slot the download holds.
        HOST = "host",
        /// The host whose concurrency refused it (parked on that host when deferred).
        HOST_WAIT = "host_wait",
        /// The host rate slot booked for it (ms).
        HOST_SLOT = "host_slot",
        CB_STATE = "cb_state",
        CB_ATTEMPTS = "cb_attempts",
        CB_LEASE = "cb_lease",
        CB_LOST = "cb_lost",
        CB_ERROR = "cb_error",
        /// When the callback ended (delivered or failed).
        CB_AT = "cb_at",
        /// The receiver the callback is parked on.
        CB_WAIT = "cb_wait",
        /// Deferrals for a busy receiver since its last attempt.
        CB_DEFERS = "cb_defers",
        /// Embedded store only: the scores of the sorted entries the job is in, so an
        /// entry is found without a scan.
        DL_LEASE_EXP = "dl_lease_exp",
        CB_LEASE_EXP = "cb_lease_exp",
        DL_DELAYED_AT = "dl_delayed_at",
        CB_DELAYED_AT = "cb_delayed_at",
        DEL_AT = "del_at",
        FAILED_AT = "failed_at",
        CB_WAIT_SEQ = "cb_wait_seq",
    }
}

names! {
    /// The fields of an aggregation (the Redis hash `aggr:<a>`; the embedded store
    /// keeps the same values in a typed record).
    aggr {
        LIMIT = "limit",
        INFLIGHT = "inflight",
        PROXY = "proxy",
        RATE = "rate",
        BURST = "burst",
        /// Its jobs still in their download phase.
        JOBS = "jobs",
    }
}

names! {
    /// The states of each phase (`dl_state`, `cb_state`).
    states {
        PENDING = super::state::PENDING,
        IN_PROGRESS = super::state::IN_PROGRESS,
        SUCCESS = super::state::SUCCESS,
        FAILED = super::state::FAILED,
    }
}

/// Why a delayed download waits (`wait`): [`WaitReason`]'s names.
pub mod wait {
    use super::super::WaitReason;
    /// Every reason with its name, for the Lua table `W`.
    pub const ALL: &[(&str, &str)] = &[
        ("AGGR_RATE", WaitReason::AggrRate.as_str()),
        ("HOST_PAUSED", WaitReason::HostPaused.as_str()),
        ("HOST_RATE", WaitReason::HostRate.as_str()),
        ("HOST_CONCURRENCY", WaitReason::HostConcurrency.as_str()),
    ];
}

/// The limits of the state machine's steps (numbers; the Lua table `C`).
pub mod limit {
    /// Leases a job may lose to dead workers before it is failed instead of retried,
    /// so that a file that crashes the processor cannot loop forever.
    pub const MAX_LOST_LEASES: i64 = 5;
    /// Due delayed entries promoted, and expired leases recovered, per claim.
    pub const BATCH: usize = 100;
    /// Ready aggregations a download claim tries beyond the jobs it asks for.
    pub const READY_TRIES: usize = 16;
    /// Deletion delay of a job without callback whose download was abandoned.
    pub const ABANDONED_KEEP_MS: u64 = 86_400_000;
    /// Added to every Redis expiry under a manual (test) clock: a key's value says
    /// until when it holds; the expiry only lets it go some time after, never before
    /// (the server's own clock, which expiries follow, lags a test's clock).
    pub const EXPIRY_SLACK_MS: u64 = 60_000;
    /// Wake-up tokens a queue keeps at most.
    pub const WAKE_TOKENS: usize = 16;
    /// Entries of a host's parked list looked at to wake one download.
    pub const UNPARK_TRIES: usize = 16;
    /// Entries of a receiver's parked list looked at per callback woken.
    pub const WAKE_LOOK_FACTOR: usize = 16;
    /// Shortest life of a host's parked list (ms; ten fallback delays when longer).
    pub const HOST_WAIT_TTL_MS: u64 = 60_000;
    /// Shortest life of a receiver's parked list (ms; ten fallback delays when longer).
    pub const CB_WAIT_TTL_MS: u64 = 600_000;
    /// Failed callbacks read per round of a listing.
    pub const FAILED_BATCH: usize = 100;

    /// Every limit with its value, for the Lua table `C`.
    pub fn all() -> Vec<(&'static str, String)> {
        vec![
            ("MAX_LOST_LEASES", MAX_LOST_LEASES.to_string()),
            ("BATCH", BATCH.to_string()),
            ("READY_TRIES", READY_TRIES.to_string()),
            ("ABANDONED_KEEP_MS", ABANDONED_KEEP_MS.to_string()),
            ("EXPIRY_SLACK_MS", EXPIRY_SLACK_MS.to_string()),
            ("WAKE_TOKENS", WAKE_TOKENS.to_string()),
            ("UNPARK_TRIES", UNPARK_TRIES.to_string()),
            ("WAKE_LOOK_FACTOR", WAKE_LOOK_FACTOR.to_string()),
            ("HOST_WAIT_TTL_MS", HOST_WAIT_TTL_MS.to_string()),
            ("CB_WAIT_TTL_MS", CB_WAIT_TTL_MS.to_string()),
            ("FAILED_BATCH", FAILED_BATCH.to_string()),
            ("GCRA_SLACK", super::super::GCRA_SLACK.to_string()),
            (
                "GCRA_SLACK_MAX_MS",
                super::super::GCRA_SLACK_MAX_MS.to_string(),
            ),
        ]
    }
}

/// The names one queue's phase uses (the Lua table `Q`, by queue name).
#[derive(Debug)]
pub struct PerQueue {
    /// [`super::Queue::name`].
    pub name: &'static str,
    /// Its leases (Redis key).
    pub leases: &'static str,
    pub lease: &'static str,
    pub attempts: &'static str,
    pub state: &'static str,
    /// Embedded store: the score of its lease entry.
    pub lease_exp: &'static str,
    /// Embedded store: the score of its delayed entry.
    pub delayed_at: &'static str,
}

pub const DOWNLOAD: PerQueue = PerQueue {
    name: "dl",
    leases: key::DL_LEASES,
    lease: field::DL_LEASE,
    attempts: field::DL_ATTEMPTS,
    state: field::DL_STATE,
    lease_exp: field::DL_LEASE_EXP,
    delayed_at: field::DL_DELAYED_AT,
};

pub const CALLBACK: PerQueue = PerQueue {
    name: "cb",
    leases: key::CB_LEASES,
    lease: field::CB_LEASE,
    attempts: field::CB_ATTEMPTS,
    state: field::CB_STATE,
    lease_exp: field::CB_LEASE_EXP,
    delayed_at: field::CB_DELAYED_AT,
};

/// The names of the queue called `q` ("dl" or "cb").
pub fn per_queue(q: &str) -> &'static PerQueue {
    if q == DOWNLOAD.name {
        &DOWNLOAD
    } else {
        &CALLBACK
    }
}

/// The Lua tables every script starts with: `K` keys, `F` job fields, `A` aggregation
/// fields, `S` states, `W` wait reasons, `C` limits, `Q` the names per queue.
pub fn lua_header() -> String {
    fn table(out: &mut String, name: &str, items: &[(&str, &str)], quote: bool) {
        out.push_str(&format!("local {name} = {{"));
        for (i, (k, v)) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            if quote {
                out.push_str(&format!("{k} = '{v}'"));
            } else {
                out.push_str(&format!("{k} = {v}"));
            }
        }
        out.push_str("}\n");
    }
    let mut out = String::new();
    table(&mut out, "K", key::ALL, true);
    table(&mut out, "F", field::ALL, true);
    table(&mut out, "A", aggr::ALL, true);
    table(&mut out, "S", states::ALL, true);
    table(&mut out, "W", wait::ALL, true);
    let limits = limit::all();
    let limits: Vec<(&str, &str)> = limits.iter().map(|(k, v)| (*k, v.as_str())).collect();
    table(&mut out, "C", &limits, false);
    out.push_str("local Q = {");
    for (i, q) in [DOWNLOAD, CALLBACK].iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&format!(
            "{} = {{leases = '{}', lease = '{}', attempts = '{}', state = '{}'}}",
            q.name, q.leases, q.lease, q.attempts, q.state
        ));
    }
    out.push_str("}\n");
    out
}

/// The Lua linter's view of [`lua_header`]: the tables and their fields as
/// `.luacheckrc` declares them (checked against the file by a unit test).
pub fn luacheck_globals() -> String {
    let limits = limit::all();
    let limit_names: Vec<&str> = limits.iter().map(|(k, _)| *k).collect();
    let tables: [(&str, Vec<&str>); 6] = [
        ("K", key::ALL.iter().map(|(k, _)| *k).collect()),
        ("F", field::ALL.iter().map(|(k, _)| *k).collect()),
        ("A", aggr::ALL.iter().map(|(k, _)| *k).collect()),
        ("S", states::ALL.iter().map(|(k, _)| *k).collect()),
        ("W", wait::ALL.iter().map(|(k, _)| *k).collect()),
        ("C", limit_names),
    ];
    let mut out = String::new();
    for (name, fields) in tables {
        out.push_str(&format!("  {name} = {{ fields = {{ "));
        for f in fields {
            out.push_str(&format!("{f} = {{}}, "));
        }
        out.push_str("} },\n");
    }
    out
}

/// A job's record from its stored fields.
pub fn record(id: &str, f: &BTreeMap<String, String>) -> Result<JobRecord, String> {
    use field as k;
    let spec: JobSpec = serde_json::from_str(f.get(k::SPEC).ok_or("job has no spec")?)
        .map_err(|e| format!("job {id}: corrupt spec: {e}"))?;
    let s = |key: &str| f.get(key).cloned().unwrap_or_default();
    let n = |key: &str| f.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let delayed = n(k::NEXT_AT) > 0;
    Ok(JobRecord {
        id: id.to_string(),
        spec,
        download_state: s(k::DL_STATE),
        download_attempts: n(k::DL_ATTEMPTS) as u32,
        download_pauses: n(k::DL_PAUSES) as u32,
        download_error: s(k::DL_ERROR),
        response_code: n(k::RESPONSE_CODE) as u16,
        image_size: s(k::IMAGE_SIZE),
        callback_state: s(k::CB_STATE),
        callback_attempts: n(k::CB_ATTEMPTS) as u32,
        callback_defers: n(k::CB_DEFERS) as u32,
        callback_error: s(k::CB_ERROR),
        created_at: n(k::CREATED_AT),
        started_at: n(k::STARTED_AT),
        finished_at: n(k::FINISHED_AT),
        callback_at: n(k::CB_AT),
        next_attempt_at: n(k::NEXT_AT),
        waiting_for: if f.get(k::DL_STATE).is_some_and(|s| s == state::PENDING) && delayed {
            s(k::WAIT)
        } else if f.get(k::CB_STATE).is_some_and(|s| s == state::PENDING)
            && delayed
            && f.contains_key(k::CB_WAIT)
        {
            crate::job::CALLBACK_DESTINATION_WAIT.to_string()
        } else {
            String::new()
        },
        thumbnails_made: match f.get(k::THUMBS).map(String::as_str) {
            None | Some("") => Vec::new(),
            Some(j) => {
                serde_json::from_str(j).map_err(|e| format!("job {id}: corrupt thumbnails: {e}"))?
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lua_linter_knows_every_name_of_the_schema() {
        let rc = include_str!("../../.luacheckrc");
        let want = luacheck_globals();
        assert!(
            rc.contains(&want),
            ".luacheckrc is out of date with src/store/schema.rs; its read_globals must \
             contain:\n{want}"
        );
    }

    #[test]
    fn the_header_is_one_line_per_table_with_every_name() {
        let h = lua_header();
        assert_eq!(h.lines().count(), 7);
        assert!(h.contains("dl = {leases = 'dl:leases', lease = 'dl_lease'"));
        assert!(h.contains("JOB = 'job:'"));
        assert!(h.contains("DL_STATE = 'dl_state'"));
        assert!(h.contains("PENDING = 'Pending'"));
        assert!(h.contains("MAX_LOST_LEASES = 5"));
        assert!(h.contains("GCRA_SLACK = 0.2"));
    }

    #[test]
    fn wait_reasons_parse_back() {
        for (_, w) in wait::ALL {
            let r = crate::store::WaitReason::parse(w).expect(w);
            assert_eq!(r.as_str(), *w);
        }
    }
}
