//! Redis backend of [`Store`]. Every multi-key step is one Lua script, so each is
//! atomic across any number of processes sharing the server. Scripts read the clock
//! with `TIME` (so machines with skewed clocks still agree on lease expiry), unless
//! the store was given a manual [`Clock`] (tests), whose reading every call hands in.
//! Each script is `*.lua` here, after the schema's names (`schema::lua_header`) and
//! `prelude.lua`.
//!
//! Keys are listed in ARCHITECTURE.md and named in `schema::key`. Scripts build key names at run time, so this
//! backend needs a standalone Redis (not Redis Cluster).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use tokio::sync::Mutex;

use super::clock::Clock;
use super::schema::{self, key};
use super::{
    AggrFilter, AggrSettings, AggrSummary, ClaimShares, Claimed, DownloadResult,
    FAILED_SCAN_FACTOR, FailedCallback, FailedCursor, FailedPage, HOST_PARK_FALLBACK, HostLimits,
    HostPermit, MAX_AGGR_PAGE, PendingSummary, Queue, Result, RetryCallback, Store, StoreError,
    WaitReason, millis,
};
use crate::config::RedisConfig;
use crate::job::{JobRecord, JobSpec};

/// Shared by every script: key helpers, the clock, the ready-set rule and wake-ups.
const PRELUDE: &str = include_str!("prelude.lua");

/// The schema's names and limits (store/schema.rs), then the prelude, then `body`.
fn script(body: &str) -> Script {
    Script::new(&format!("{}{PRELUDE}\n{body}", schema::lua_header()))
}

static SUBMIT: LazyLock<Script> = LazyLock::new(|| script(include_str!("submit.lua")));

static CLAIM_DOWNLOAD: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("claim_download.lua")));

static CLAIM_CALLBACK: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("claim_callback.lua")));

static RENEW: LazyLock<Script> = LazyLock::new(|| script(include_str!("renew.lua")));

static FINISH_DOWNLOAD: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("finish_download.lua")));

/// Queues a claimed download again after a delay: a retry (`reason` empty: the
/// attempt counts) or a deferral (`reason` says why; not an attempt). With
/// `has_result`, the attempt's error and status are kept as the job's last ones.
static REQUEUE_DOWNLOAD: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("requeue_download.lua")));

static RELEASE: LazyLock<Script> = LazyLock::new(|| script(include_str!("release.lua")));

static HOST_PERMIT: LazyLock<Script> = LazyLock::new(|| script(include_str!("host_permit.lua")));

static PAUSE_HOST: LazyLock<Script> = LazyLock::new(|| script(include_str!("pause_host.lua")));

static FINISH_CALLBACK: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("finish_callback.lua")));

/// Parks a claimed callback on its destination (`cbwait:<dest>`, `cb_wait` in the job
/// marks its entry there) and delays it by the fallback; not an attempt.
static DEFER_CALLBACK: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("defer_callback.lua")));

/// Moves up to `ARGV[2]` callbacks parked on `ARGV[1]` from `cb:delayed` to the head
/// of `cb:queue`, oldest first; entries of callbacks no longer parked are dropped.
static WAKE_CALLBACKS: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("wake_callbacks.lua")));

static REQUEUE_CALLBACK: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("requeue_callback.lua")));

/// A page of `cb:failed` after the cursor (`ARGV[1]` ms, `ARGV[2]` id; -1 and ''
/// for the start), filtered by aggregation (`ARGV[5]`: all, is, prefix; `ARGV[6]`).
/// Returns the next cursor (or two empty strings) and the items.
static FAILED_LIST: LazyLock<Script> = LazyLock::new(|| script(include_str!("failed_list.lua")));

/// Moves failed callbacks older than the retention (`ARGV[1]` ms) into `deletions`.
static EXPIRE_FAILED: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("expire_failed.lua")));

static MIGRATE: LazyLock<Script> = LazyLock::new(|| script(include_str!("migrate.lua")));

static DUE_DELETIONS: LazyLock<Script> =
    LazyLock::new(|| script(include_str!("due_deletions.lua")));

/// A Redis server shared by any number of components.
pub struct RedisStore {
    /// `<key_prefix>:`
    prefix: String,
    conn: ConnectionManager,
    /// One dedicated connection per queue for BLPOP, which would stall the
    /// multiplexed connection's other commands.
    waiters: [Mutex<Option<ConnectionManager>>; 2],
    client: redis::Client,
    timeout: Duration,
    worker: String,
    /// The ready aggregation this claimer's last download claim stopped at (claims
    /// take `ready` round robin by name).
    cursor: std::sync::Mutex<String>,
    /// Handed to every script: empty (the server's `TIME`) unless a test sets it.
    clock: Clock,
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisStore {
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore> {
        Self::connect_with_clock(cfg, Clock::system()).await
    }

    /// [`RedisStore::connect`] with the scripts' time taken from `clock` (tests that
    /// control it).
    pub async fn connect_with_clock(cfg: &RedisConfig, clock: Clock) -> Result<RedisStore> {
        let addr = if cfg.addr.contains("://") {
            cfg.addr.clone()
        } else {
            format!("redis://{}/{}", cfg.addr, cfg.db)
        };
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(addr.as_str())
                .map_err(|e| StoreError::Backend(format!("redis.addr {:?}: {e}", cfg.addr)))?;
        if let Some(pw) = &cfg.password {
            let settings = info.redis_settings().clone().set_password(pw.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(backend)?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let conn = Self::manager(&client, timeout, timeout).await?;
        let store = RedisStore {
            prefix: format!("{}:", cfg.key_prefix),
            conn,
            waiters: [Mutex::new(None), Mutex::new(None)],
            client,
            timeout,
            worker: crate::job::new_id(),
            cursor: std::sync::Mutex::new(String::new()),
            clock,
        };
        let _: i64 = store.run(&mut MIGRATE.key(&store.prefix)).await?;
        Ok(store)
    }

    async fn manager(
        client: &redis::Client,
        connect: Duration,
        response: Duration,
    ) -> Result<ConnectionManager> {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(response))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        tokio::time::timeout(connect * 2, client.get_connection_manager_with_config(cfg))
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "cannot connect to Redis at {}: timed out",
                    client.get_connection_info().addr()
                ))
            })?
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot connect to Redis at {}: {e}",
                    client.get_connection_info().addr()
                ))
            })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn token(&self) -> String {
        format!("{}:{}", self.worker, crate::job::new_id())
    }

    async fn requeue(
        &self,
        id: &str,
        token: &str,
        r: Option<&DownloadResult>,
        delay: Duration,
        reason: Option<WaitReason>,
    ) -> Result<bool> {
        let ok: i64 = self
            .run(
                REQUEUE_DOWNLOAD
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(millis(delay))
                    .arg(reason.map_or("", WaitReason::as_str))
                    .arg(if r.is_some() { "1" } else { "0" })
                    .arg(r.map_or("", |r| r.error.as_str()))
                    .arg(r.map_or(0, |r| r.response_code)),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        // Last: the prelude takes it off `ARGV` before the script reads its arguments.
        inv.arg(self.clock.script_arg());
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(backend)
    }
}

fn fields(v: Value) -> Result<BTreeMap<String, String>> {
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn text(v: &Value) -> Result<String> {
    redis::from_redis_value_ref(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// What a claim script answered: the jobs, when to come back, and (download claims)
/// the ready aggregation it stopped at.
type ClaimReply = (Vec<Claimed>, Option<Duration>, Option<String>);

/// Parses a claim script's reply: `{'jobs', {{id, fields, proxy}, ...}}` or
/// `{'empty', ms until the next delayed entry or -1}`, each with the cursor as a third
/// element after a download claim.
fn parse_claims(v: Value, token: &str) -> Result<ClaimReply> {
    let bad = || StoreError::Corrupt("unexpected claim reply".into());
    let Value::Array(mut parts) = v else {
        return Err(bad());
    };
    let cursor = match parts.len() {
        2 => None,
        3 => Some(text(&parts.pop().ok_or_else(bad)?)?),
        _ => return Err(bad()),
    };
    let body = parts.pop().ok_or_else(bad)?;
    match text(&parts[0])?.as_str() {
        "empty" => {
            let ms: i64 = text(&body)?.parse().unwrap_or(-1);
            Ok((
                Vec::new(),
                (ms >= 0).then(|| Duration::from_millis(ms as u64)),
                cursor,
            ))
        }
        "jobs" => {
            let Value::Array(jobs) = body else {
                return Err(bad());
            };
            let mut out = Vec::with_capacity(jobs.len());
            for j in jobs {
                let Value::Array(mut f) = j else {
                    return Err(bad());
                };
                if f.len() != 3 {
                    return Err(bad());
                }
                let proxy = text(&f[2])?;
                let id = text(&f[0])?;
                let map = fields(f.swap_remove(1))?;
                let job = schema::record(&id, &map).map_err(StoreError::Corrupt)?;
                out.push(Claimed {
                    job,
                    token: token.to_string(),
                    proxy: (!proxy.is_empty()).then_some(proxy),
                });
            }
            Ok((out, None, cursor))
        }
        _ => Err(bad()),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn submit_with(&self, id: &str, spec: &JobSpec, settings: AggrSettings) -> Result<()> {
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let created: i64 = self
            .run(
                SUBMIT
                    .key(&self.prefix)
                    .arg(id)
                    .arg(json)
                    .arg(spec.aggr_key())
                    .arg(spec.aggr_limit)
                    .arg(spec.aggr_proxy.as_deref().unwrap_or(""))
                    .arg(if spec.callback.is_some() { "1" } else { "0" })
                    .arg(spec.aggr_rate.unwrap_or(0.0))
                    .arg(spec.aggr_burst.unwrap_or(1))
                    .arg(spec.host())
                    .arg(if settings == AggrSettings::First {
                        "1"
                    } else {
                        "0"
                    }),
            )
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Backend(format!("job id {id} already exists")))
        }
    }

    async fn claim_shared(
        &self,
        queue: Queue,
        lease: Duration,
        max: usize,
        shares: &ClaimShares,
    ) -> Result<(Vec<Claimed>, Option<Duration>)> {
        // One token for the batch: each lease is still checked per job.
        let token = self.token();
        let reply: Value = match queue {
            Queue::Download => {
                let mut inv = CLAIM_DOWNLOAD.key(&self.prefix);
                inv.arg(millis(lease)).arg(&token).arg(max.max(1));
                for list in [&shares.aggregations, &shares.tenants] {
                    inv.arg(list.len());
                    for (name, room) in list {
                        inv.arg(name).arg(*room);
                    }
                }
                inv.arg(self.cursor.lock().map(|c| c.clone()).unwrap_or_default());
                self.run(&mut inv).await?
            }
            Queue::Callback => {
                self.run(
                    CLAIM_CALLBACK
                        .key(&self.prefix)
                        .arg(millis(lease))
                        .arg(&token)
                        .arg(max.max(1)),
                )
                .await?
            }
        };
        let (jobs, due, cursor) = parse_claims(reply, &token)?;
        if let (Some(c), Ok(mut at)) = (cursor, self.cursor.lock()) {
            *at = c;
        }
        Ok((jobs, due))
    }

    async fn wait(&self, queue: Queue, timeout: Duration) -> Result<()> {
        let slot = &self.waiters[queue as usize];
        let mut guard = slot.lock().await;
        if guard.is_none() {
            // BLPOP holds the connection for up to `timeout`; the response timeout
            // must outlast it.
            *guard =
                Some(Self::manager(&self.client, self.timeout, Duration::from_secs(3600)).await?);
        }
        let conn = guard.as_mut().expect("set above");
        let secs = timeout.as_secs_f64().max(0.01);
        let key = self.key(&format!("{}{}", key::WAKE, queue.name()));
        let fut = conn.blpop::<_, Option<(String, String)>>(key, secs);
        match tokio::time::timeout(timeout + self.timeout, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(backend(e)),
            Err(_) => {
                // The server did not answer in time: drop the connection so a stale
                // reply cannot be read by the next call.
                *guard = None;
                Err(StoreError::Backend("BLPOP timed out".into()))
            }
        }
    }

    async fn renew(
        &self,
        queue: Queue,
        held: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = RENEW.key(&self.prefix);
        inv.arg(queue.name()).arg(millis(lease));
        for (id, token) in held {
            inv.arg(id).arg(token);
        }
        let out: Vec<i64> = self.run(&mut inv).await?;
        Ok(out.into_iter().map(|v| v == 1).collect())
    }

    async fn finish_download(
        &self,
        id: &str,
        token: &str,
        r: &DownloadResult,
        keep: Duration,
    ) -> Result<bool> {
        let st = if r.success {
            crate::job::state::SUCCESS
        } else {
            crate::job::state::FAILED
        };
        let ok: i64 = self
            .run(
                FINISH_DOWNLOAD
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(st)
                    .arg(&r.error)
                    .arg(r.response_code)
                    .arg(&r.image_size)
                    .arg(millis(keep))
                    .arg(&r.thumbnails),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn retry_download(
        &self,
        id: &str,
        token: &str,
        r: &DownloadResult,
        delay: Duration,
    ) -> Result<bool> {
        self.requeue(id, token, Some(r), delay, None).await
    }

    async fn host_permit(
        &self,
        id: &str,
        token: &str,
        host: &str,
        limits: HostLimits,
        lease: Duration,
    ) -> Result<HostPermit> {
        let (what, ms): (String, String) = self
            .run(
                HOST_PERMIT
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(host)
                    .arg(limits.rate)
                    .arg(limits.burst.max(1))
                    .arg(limits.concurrency)
                    .arg(millis(lease))
                    .arg(millis(HOST_PARK_FALLBACK)),
            )
            .await?;
        let delay = Duration::from_millis(ms.parse().unwrap_or(0));
        Ok(match what.as_str() {
            "ok" => HostPermit::Granted,
            "lost" => HostPermit::Lost,
            r => HostPermit::Wait {
                delay,
                reason: WaitReason::parse(r)
                    .ok_or_else(|| StoreError::Corrupt(format!("host permit reply {r:?}")))?,
            },
        })
    }

    async fn pause_host(&self, host: &str, pause: Duration) -> Result<()> {
        let _: i64 = self
            .run(
                PAUSE_HOST
                    .key(&self.prefix)
                    .arg(host)
                    .arg(millis(pause).max(1)),
            )
            .await?;
        Ok(())
    }

    async fn defer_download(
        &self,
        id: &str,
        token: &str,
        r: Option<&DownloadResult>,
        delay: Duration,
        reason: WaitReason,
    ) -> Result<bool> {
        self.requeue(id, token, r, delay, Some(reason)).await
    }

    async fn release(&self, queue: Queue, id: &str, token: &str) -> Result<bool> {
        let ok: i64 = self
            .run(
                RELEASE
                    .key(&self.prefix)
                    .arg(queue.name())
                    .arg(id)
                    .arg(token),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn finish_callback(&self, id: &str, token: &str, keep: Duration) -> Result<bool> {
        self.end_callback(id, token, crate::job::state::SUCCESS, "", keep)
            .await
    }

    async fn retry_callback(
        &self,
        id: &str,
        token: &str,
        error: &str,
        delay: Duration,
    ) -> Result<bool> {
        self.end_callback(id, token, crate::job::state::PENDING, error, delay)
            .await
    }

    async fn fail_callback(&self, id: &str, token: &str, error: &str) -> Result<bool> {
        self.end_callback(id, token, crate::job::state::FAILED, error, Duration::ZERO)
            .await
    }

    async fn defer_callback(
        &self,
        id: &str,
        token: &str,
        dest: &str,
        delay: Duration,
    ) -> Result<bool> {
        let ok: i64 = self
            .run(
                DEFER_CALLBACK
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(dest)
                    .arg(millis(delay)),
            )
            .await?;
        Ok(ok == 1)
    }

    async fn wake_callbacks(&self, dest: &str, max: usize) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        self.run(
            WAKE_CALLBACKS
                .key(&self.prefix)
                .arg(dest)
                .arg(max.min(super::MAX_CALLBACK_WAKE)),
        )
        .await
    }

    async fn requeue_callback(&self, id: &str) -> Result<RetryCallback> {
        let r: String = self.run(REQUEUE_CALLBACK.key(&self.prefix).arg(id)).await?;
        Ok(match r.as_str() {
            "ok" => RetryCallback::Requeued,
            "notfound" => RetryCallback::NotFound,
            s => RetryCallback::NotFailed(s.trim_start_matches("state:").to_string()),
        })
    }

    async fn due_deletions(&self, limit: usize) -> Result<Vec<String>> {
        self.run(DUE_DELETIONS.key(&self.prefix).arg(limit)).await
    }

    async fn failed_callbacks(
        &self,
        cursor: Option<&FailedCursor>,
        limit: usize,
        filter: &AggrFilter,
    ) -> Result<FailedPage> {
        let limit = limit.max(1);
        let (mode, pattern) = match filter {
            AggrFilter::All => ("all", ""),
            AggrFilter::Is(a) => ("is", a.as_str()),
            AggrFilter::Prefix(p) => ("prefix", p.as_str()),
        };
        let (at, id) = match cursor {
            Some(c) => (c.failed_at as i64, c.id.as_str()),
            None => (-1, ""),
        };
        let (next_at, next_id, rows): (String, String, Vec<(String, String, u64, String, u32)>) =
            self.run(
                FAILED_LIST
                    .key(&self.prefix)
                    .arg(at)
                    .arg(id)
                    .arg(limit)
                    .arg(limit.saturating_mul(FAILED_SCAN_FACTOR))
                    .arg(mode)
                    .arg(pattern),
            )
            .await?;
        let next = match next_at.parse() {
            Ok(failed_at) => Some(FailedCursor {
                failed_at,
                id: next_id,
            }),
            Err(_) => None,
        };
        let items = rows
            .into_iter()
            .map(|(id, aggr, failed_at, error, attempts)| FailedCallback {
                id,
                aggr,
                failed_at,
                error,
                attempts,
            })
            .collect();
        Ok(FailedPage { items, next })
    }

    async fn expire_failed(&self, retention: Duration, limit: usize) -> Result<usize> {
        self.run(
            EXPIRE_FAILED
                .key(&self.prefix)
                .arg(millis(retention))
                .arg(limit.max(1)),
        )
        .await
    }

    async fn forget(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in ids {
            pipe.del(self.key(&format!("{}{id}", key::JOB))).ignore();
        }
        pipe.zrem(self.key(key::DELETIONS), ids).ignore();
        pipe.zrem(self.key(key::CB_FAILED), ids).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(backend)
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let mut conn = self.conn.clone();
        let map: BTreeMap<String, String> = conn
            .hgetall(self.key(&format!("{}{id}", key::JOB)))
            .await
            .map_err(backend)?;
        if map.is_empty() {
            return Ok(None);
        }
        let mut rec = schema::record(id, &map).map_err(StoreError::Corrupt)?;
        if rec.queued() {
            let wait: Option<f64> = conn
                .zscore(self.key(key::RATEWAIT), rec.spec.aggr_key())
                .await
                .map_err(backend)?;
            rec.note_aggr_rate_wait(wait.map(|w| w as u64));
        }
        Ok(Some(rec))
    }

    async fn aggregations_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<AggrSummary>, u64)> {
        let mut conn = self.conn.clone();
        let limit = limit.min(MAX_AGGR_PAGE);
        let key = self.key(key::PENDING_N);
        let (total, page): (u64, Vec<(String, u64)>) = if limit == 0 {
            (conn.zcard(&key).await.map_err(backend)?, Vec::new())
        } else {
            let stop = offset.saturating_add(limit - 1);
            redis::pipe()
                .zcard(&key)
                .zrevrange_withscores(
                    &key,
                    offset as isize,
                    stop.min(isize::MAX as usize) as isize,
                )
                .query_async(&mut conn)
                .await
                .map_err(backend)?
        };
        if page.is_empty() {
            return Ok((Vec::new(), total));
        }
        let mut pipe = redis::pipe();
        for (n, _) in &page {
            pipe.zscore(self.key(key::RATEWAIT), n);
        }
        let waits: Vec<Option<f64>> = pipe.query_async(&mut conn).await.map_err(backend)?;
        let out = page
            .into_iter()
            .zip(waits)
            .map(|((name, pending), wait)| AggrSummary {
                name,
                pending,
                rate_wait_until: wait.map(|w| w as u64),
            })
            .collect();
        Ok((out, total))
    }

    async fn pending_summary(&self, top: usize) -> Result<PendingSummary> {
        let mut conn = self.conn.clone();
        let key = self.key(key::PENDING_N);
        let mut pipe = redis::pipe();
        pipe.get(self.key(key::PENDING_TOTAL)).zcard(&key);
        if top > 0 {
            pipe.zrevrange_withscores(&key, 0, top as isize - 1);
        }
        let (jobs, aggregations, top): (Option<i64>, u64, Vec<(String, u64)>) = if top > 0 {
            pipe.query_async(&mut conn).await.map_err(backend)?
        } else {
            let (j, a): (Option<i64>, u64) = pipe.query_async(&mut conn).await.map_err(backend)?;
            (j, a, Vec::new())
        };
        Ok(PendingSummary {
            jobs: jobs.unwrap_or(0).max(0) as u64,
            aggregations,
            top,
        })
    }

    async fn put_stats(&self, component: &str, json: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.pset_ex::<_, _, ()>(
            self.key(&format!("{}{component}", key::STATS)),
            json,
            millis(ttl),
        )
        .await
        .map_err(backend)
    }

    async fn get_stats(&self, component: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.get(self.key(&format!("{}{component}", key::STATS)))
            .await
            .map_err(backend)
    }
}

impl RedisStore {
    async fn end_callback(
        &self,
        id: &str,
        token: &str,
        state: &str,
        error: &str,
        delay: Duration,
    ) -> Result<bool> {
        let ok: i64 = self
            .run(
                FINISH_CALLBACK
                    .key(&self.prefix)
                    .arg(id)
                    .arg(token)
                    .arg(state)
                    .arg(error)
                    .arg(millis(delay)),
            )
            .await?;
        Ok(ok == 1)
    }
}
