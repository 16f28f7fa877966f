//! Dead letters: callbacks that failed for good, kept for `notifier.failed_retention`.
//! `GET /callbacks/failed` lists them (paged, by aggregation), `POST /callbacks/retry`
//! queues them again in bounded batches. A tenant sees and retries only its own.
//! `downloader callbacks list|retry` ([`run_cli`]) does the same from the command line,
//! through the same functions ([`list_page`], [`requeue`]), as an operator who sees
//! every tenant.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, AppState, Caller, body_error, job_seen_by, shown_callback_state};
use crate::job::is_valid_id;
use crate::store::{FailedCursor, RetryCallback, Store, StoreError};

/// Most items of one page, and most callbacks one retry call requeues.
pub const MAX_BATCH: usize = 1000;
const DEFAULT_PAGE: usize = 100;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn batch_size(field: &str, v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_BATCH).contains(n))
        .ok_or_else(|| {
            bad(format!(
                "{field} must be an integer from 1 to {MAX_BATCH}, got {v:?}"
            ))
        })
}

/// One page of failed callbacks to list: after `cursor`, at most `limit` (1 to
/// [`MAX_BATCH`]), of one aggregation (as the caller names it) or all the caller's.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: usize,
    pub cursor: Option<FailedCursor>,
    pub aggr: Option<String>,
}

/// One page of the caller's failed callbacks, oldest first, each as the endpoint shows
/// it (`job_id`, `aggr_id` as the caller knows it, `failed_at`, `error`, `attempts`),
/// and where the next page starts (`None` at the end).
pub async fn list_page(
    store: &dyn Store,
    caller: &Caller,
    q: &ListQuery,
) -> Result<(Vec<Value>, Option<FailedCursor>), StoreError> {
    let page = store
        .failed_callbacks(
            q.cursor.as_ref(),
            q.limit.clamp(1, MAX_BATCH),
            &caller.aggr_filter(q.aggr.as_deref()),
        )
        .await?;
    let items = page
        .items
        .into_iter()
        .filter_map(|f| {
            Some(json!({
                "job_id": f.id,
                "aggr_id": caller.shown_aggr(&f.aggr)?,
                "failed_at": f.failed_at,
                "error": f.error,
                "attempts": f.attempts,
            }))
        })
        .collect();
    Ok((items, page.next))
}

/// `GET /callbacks/failed?limit=&cursor=&aggr_id=`: oldest first.
pub async fn failed(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let mut q = ListQuery {
        limit: DEFAULT_PAGE,
        ..Default::default()
    };
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "limit" => q.limit = batch_size("limit", &v)?,
            "cursor" => {
                q.cursor = Some(FailedCursor::decode(&v).ok_or_else(|| {
                    bad("cursor: not a cursor from a previous page's next_cursor")
                })?)
            }
            "aggr_id" if !v.is_empty() => q.aggr = Some(v.into_owned()),
            "aggr_id" => return Err(bad("aggr_id cannot be empty")),
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?} (limit, cursor, aggr_id)"
                )));
            }
        }
    }
    let (items, next) = list_page(&*s.store, &caller, &q).await?;
    Ok(axum::Json(json!({
        "callbacks": items,
        "next_cursor": next.map(|c| c.encode()),
    }))
    .into_response())
}

/// What to requeue: the body of `POST /callbacks/retry`, or the CLI's flags.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// These jobs' callbacks (at most [`MAX_BATCH`]).
    Ids(Vec<String>),
    /// Failed callbacks of one aggregation (as the caller names it), or of all the
    /// caller's (`None`), at most `limit` (1 to [`MAX_BATCH`]).
    Listed { aggr: Option<String>, limit: usize },
}

fn parse_target(body: &[u8]) -> Result<Target, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(bad("request body must be a JSON object"));
    };
    for k in obj.keys() {
        if !matches!(k.as_str(), "ids" | "aggr_id" | "all" | "limit") {
            return Err(bad(format!(
                "unknown field {k:?} (ids, aggr_id, all, limit)"
            )));
        }
    }
    let limit = match obj.get("limit") {
        None | Some(Value::Null) => MAX_BATCH,
        Some(l) => batch_size("limit", &l.to_string())?,
    };
    let all = match obj.get("all") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(bad("all must be a boolean")),
    };
    let target = match (obj.get("ids"), obj.get("aggr_id"), all) {
        (Some(ids), None, false) => {
            if obj.contains_key("limit") {
                return Err(bad("limit applies to aggr_id or all, not to ids"));
            }
            let Value::Array(list) = ids else {
                return Err(bad("ids must be an array of job ids"));
            };
            if list.is_empty() || list.len() > MAX_BATCH {
                return Err(bad(format!("ids must hold 1 to {MAX_BATCH} job ids")));
            }
            let ids = list
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some(id) if is_valid_id(id) => Ok(id.to_string()),
                    _ => Err(bad(format!("ids[{i}] is not a job id"))),
                })
                .collect::<Result<_, _>>()?;
            Target::Ids(ids)
        }
        (None, Some(Value::String(a)), false) if !a.is_empty() => Target::Listed {
            aggr: Some(a.clone()),
            limit,
        },
        (None, Some(_), false) => return Err(bad("aggr_id must be a non-empty string")),
        (None, None, true) => Target::Listed { aggr: None, limit },
        _ => {
            return Err(bad(
                "give exactly one of ids (a list), aggr_id (an aggregation) or all (true)",
            ));
        }
    };
    Ok(target)
}

/// What one [`requeue`] did: `POST /callbacks/retry`'s answer, and for the CLI where
/// its listing stopped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Requeued {
    pub requeued: usize,
    /// `{"job_id", "reason"}` of ids that were not requeued.
    pub skipped: Vec<Value>,
    /// More failed callbacks are listed after these: call again for the rest.
    pub more: bool,
    /// The last callback a listed batch looked at: the next batch starts after it.
    pub last: Option<FailedCursor>,
}

impl Requeued {
    pub fn to_json(&self) -> Value {
        json!({"requeued": self.requeued, "skipped": self.skipped, "more": self.more})
    }
}

/// Queues the caller's failed callbacks of `target` again: one bounded batch. A
/// listed batch starts after `after` (the start when `None`) and takes only callbacks
/// that failed before `before` (ms), when given: a callback that fails again at once
/// comes back at the end of the list, and a caller that goes on batch after batch must
/// not take it twice.
pub async fn requeue(
    store: &dyn Store,
    caller: &Caller,
    target: &Target,
    after: Option<FailedCursor>,
    before: Option<u64>,
) -> Result<Requeued, StoreError> {
    let mut out = Requeued::default();
    match target {
        Target::Ids(ids) => {
            for id in ids.iter().take(MAX_BATCH) {
                let visible = caller.all_tenants || job_seen_by(store, caller, id).await?.is_some();
                if !visible {
                    out.skipped
                        .push(json!({"job_id": id, "reason": "not found"}));
                    continue;
                }
                match store.requeue_callback(id).await? {
                    RetryCallback::Requeued => out.requeued += 1,
                    RetryCallback::NotFound => out
                        .skipped
                        .push(json!({"job_id": id, "reason": "not found"})),
                    RetryCallback::NotFailed(st) => out.skipped.push(json!({
                        "job_id": id,
                        "reason": format!("callback not failed (state: {:?})", shown_callback_state(&st)),
                    })),
                }
            }
            tracing::info!(
                requeued = out.requeued,
                skipped = out.skipped.len(),
                "failed callbacks requeued"
            );
        }
        Target::Listed { aggr, limit } => {
            let limit = (*limit).clamp(1, MAX_BATCH);
            let filter = caller.aggr_filter(aggr.as_deref());
            // The whole batch is listed before any is requeued: one that fails again
            // at once comes back at the end of the list and must not be taken twice.
            let (mut ids, mut cursor) = (Vec::new(), after);
            out.more = 'list: loop {
                let want = limit - ids.len();
                let page = store
                    .failed_callbacks(cursor.as_ref(), want, &filter)
                    .await?;
                for f in page.items {
                    if before.is_some_and(|b| f.failed_at >= b) {
                        break 'list false;
                    }
                    out.last = Some(FailedCursor {
                        failed_at: f.failed_at,
                        id: f.id.clone(),
                    });
                    ids.push(f.id);
                }
                match page.next {
                    None => break false,
                    Some(_) if ids.len() >= limit => break true,
                    next => cursor = next,
                }
            };
            for id in &ids {
                if store.requeue_callback(id).await? == RetryCallback::Requeued {
                    out.requeued += 1;
                }
            }
            tracing::info!(
                requeued = out.requeued,
                more = out.more,
                aggr_id = aggr.as_deref().unwrap_or_default(),
                "failed callbacks requeued"
            );
        }
    }
    Ok(out)
}

/// `POST /callbacks/retry` with `{"ids": [...]}`, `{"aggr_id": "..."}` or
/// `{"all": true}` (these two with an optional `limit`, at most 1000).
pub async fn retry(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(body_error)?;
    let target = parse_target(&body)?;
    let done = requeue(&*s.store, &caller, &target, None, None).await?;
    Ok(axum::Json(done.to_json()).into_response())
}

// ------------------------------------------------------------------ the CLI

/// `downloader callbacks ...`: the dead letters of the store a config selects, seen as
/// an operator sees them (every tenant, aggregations under their store names).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print failed callbacks, oldest first, one JSON object a line (the items of
    /// GET /callbacks/failed).
    List {
        #[arg(short = 'c', long = "config", default_value = "config.json")]
        config: PathBuf,
        /// Only this aggregation's (its store name: `@<tenant>/<aggr_id>` for a job
        /// submitted with a token).
        #[arg(long = "aggr-id", allow_hyphen_values = true)]
        aggr_id: Option<String>,
        /// Print at most this many (default: all); the cursor to go on from is then
        /// printed on stderr.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Start after this cursor (from a previous list or GET /callbacks/failed).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Queue failed callbacks again, in batches of at most 1000, and print
    /// {"requeued", "skipped", "more"} as POST /callbacks/retry does.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["ids", "aggr_id", "all"])))]
    Retry {
        #[arg(short = 'c', long = "config", default_value = "config.json")]
        config: PathBuf,
        /// This job's callback (repeat the flag for several; an id may start with `-`).
        #[arg(long = "id", allow_hyphen_values = true)]
        ids: Vec<String>,
        /// Those of this aggregation (its store name, as for list).
        #[arg(long = "aggr-id", allow_hyphen_values = true)]
        aggr_id: Option<String>,
        /// All of them.
        #[arg(long)]
        all: bool,
        /// With --aggr-id or --all: requeue at most this many (default: every one that
        /// failed before the command started).
        #[arg(long, conflicts_with = "ids", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
}

impl Command {
    pub fn config(&self) -> &std::path::Path {
        match self {
            Command::List { config, .. } | Command::Retry { config, .. } => config,
        }
    }
}

/// Bad flags: a message naming the flag, exit code 2.
fn usage(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "downloader: {msg}");
    ExitCode::from(2)
}

/// Runs `downloader callbacks ...` against the store of `cfg`: JSON on stdout,
/// messages on stderr; exit code 2 for bad flags, 1 when the store fails.
pub async fn run_cli(command: Command, cfg: &crate::config::Config) -> ExitCode {
    // Flags first: bad input exits 2 without touching the store.
    enum Plan {
        List(ListQuery, Option<u64>),
        Retry(Target, Option<u64>),
    }
    let plan = match command {
        Command::List {
            aggr_id,
            limit,
            cursor,
            ..
        } => {
            if aggr_id.as_deref() == Some("") {
                return usage("--aggr-id cannot be empty");
            }
            let cursor = match cursor.as_deref().map(FailedCursor::decode) {
                None => None,
                Some(Some(c)) => Some(c),
                Some(None) => {
                    return usage(
                        "--cursor: not a cursor from a previous list or GET /callbacks/failed",
                    );
                }
            };
            let q = ListQuery {
                limit: MAX_BATCH,
                cursor,
                aggr: aggr_id,
            };
            Plan::List(q, limit)
        }
        Command::Retry {
            ids,
            aggr_id,
            all,
            limit,
            ..
        } => {
            if let Some(bad) = ids.iter().find(|id| !is_valid_id(id)) {
                return usage(format!("--id {bad:?} is not a job id"));
            }
            if aggr_id.as_deref() == Some("") {
                return usage("--aggr-id cannot be empty");
            }
            let target = if !ids.is_empty() {
                Target::Ids(ids)
            } else {
                debug_assert!(all || aggr_id.is_some());
                Target::Listed {
                    aggr: aggr_id,
                    limit: MAX_BATCH,
                }
            };
            Plan::Retry(target, limit)
        }
    };
    let store = match crate::connect::connect_store(cfg).await {
        Ok(s) => s,
        Err(e) => {
            let hint = match cfg.store_kind() {
                crate::config::StoreKind::Embedded(p) => format!(
                    " (the embedded store {} can be open in one process only: stop `downloader serve`, or use its GET /callbacks/failed and POST /callbacks/retry)",
                    p.display()
                ),
                crate::config::StoreKind::Redis => String::new(),
            };
            let _ = writeln!(
                std::io::stderr(),
                "downloader: cannot open the store: {e:#}{hint}"
            );
            return ExitCode::FAILURE;
        }
    };
    let caller = Caller::open();
    let out = std::io::stdout();
    let result = match plan {
        Plan::List(q, limit) => print_list(&*store, &caller, q, limit, &mut out.lock()).await,
        Plan::Retry(target, limit) => {
            retry_all(&*store, &caller, target, limit)
                .await
                .map(|done| {
                    let _ = writeln!(out.lock(), "{}", done.to_json());
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "downloader: store error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the listed callbacks as JSON lines, page after page (at most [`MAX_BATCH`]
/// held at once), until the end or `limit`.
async fn print_list(
    store: &dyn Store,
    caller: &Caller,
    mut q: ListQuery,
    limit: Option<u64>,
    out: &mut impl Write,
) -> Result<(), StoreError> {
    let mut left = limit.unwrap_or(u64::MAX);
    loop {
        q.limit = left.min(MAX_BATCH as u64) as usize;
        let (items, next) = list_page(store, caller, &q).await?;
        for item in &items {
            // A closed stdout (`| head`) ends the listing quietly.
            if writeln!(out, "{item}").is_err() {
                return Ok(());
            }
        }
        left -= items.len() as u64;
        match next {
            None => return Ok(()),
            Some(c) if left == 0 => {
                let _ = writeln!(
                    std::io::stderr(),
                    "downloader: more may follow: --cursor {}",
                    c.encode()
                );
                return Ok(());
            }
            next => q.cursor = next,
        }
    }
}

/// Requeues `target` in batches of at most [`MAX_BATCH`] (each listed before it is
/// requeued, the next starting after the last), up to `limit` for a listed target;
/// only callbacks that failed before the command started are taken (by this machine's
/// clock), so that callbacks failing again meanwhile do not keep it going.
async fn retry_all(
    store: &dyn Store,
    caller: &Caller,
    target: Target,
    limit: Option<u64>,
) -> Result<Requeued, StoreError> {
    let mut total = Requeued::default();
    match target {
        Target::Ids(ids) => {
            for chunk in ids.chunks(MAX_BATCH) {
                let done = requeue(store, caller, &Target::Ids(chunk.to_vec()), None, None).await?;
                total.requeued += done.requeued;
                total.skipped.extend(done.skipped);
            }
        }
        Target::Listed { aggr, .. } => {
            let started = crate::store::clock::wall_ms();
            let mut left = limit.unwrap_or(u64::MAX);
            let mut after = None;
            while left > 0 {
                let batch = Target::Listed {
                    aggr: aggr.clone(),
                    limit: left.min(MAX_BATCH as u64) as usize,
                };
                let done = requeue(store, caller, &batch, after, Some(started)).await?;
                total.requeued += done.requeued;
                left = left.saturating_sub(done.requeued as u64);
                total.more = done.more;
                match done.last {
                    Some(last) if done.more => after = Some(last),
                    _ => break,
                }
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_bodies_name_the_bad_field() {
        for (body, says) in [
            ("[]", "JSON object"),
            ("{}", "exactly one"),
            (r#"{"ids": [], "all": true}"#, "exactly one"),
            (r#"{"ids": []}"#, "ids must hold"),
            (r#"{"ids": "x"}"#, "ids must be an array"),
            (r#"{"ids": ["../x"]}"#, "ids[0]"),
            (
                r#"{"ids": ["AAAAAAAAAAAAAAAAAAAAAA"], "limit": 5}"#,
                "limit applies",
            ),
            (r#"{"aggr_id": ""}"#, "aggr_id"),
            (r#"{"aggr_id": 3}"#, "aggr_id"),
            (r#"{"all": "yes"}"#, "all must be"),
            (r#"{"all": true, "limit": 0}"#, "limit"),
            (r#"{"all": true, "limit": 1001}"#, "limit"),
            (r#"{"everything": true}"#, "everything"),
        ] {
            let e = parse_target(body.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{body}"));
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
            assert!(e.1.contains(says), "{body}: {}", e.1);
        }
        let many: Vec<String> = (0..1001).map(|_| crate::job::new_id()).collect();
        let body = json!({ "ids": many }).to_string();
        assert!(parse_target(body.as_bytes()).is_err());
        assert!(matches!(
            parse_target(br#"{"all": true, "limit": 10}"#),
            Ok(Target::Listed {
                aggr: None,
                limit: 10
            })
        ));
    }
}
