//! Dead letters: callbacks that failed for good, kept for `notifier.failed_retention`.
//! `GET /callbacks/failed` lists them (paged, by aggregation), `POST /callbacks/retry`
//! queues them again in bounded batches. A tenant sees and retries only its own.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, AppState, Caller, body_error, visible_job};
use crate::job::is_valid_id;
use crate::store::{FailedCursor, RetryCallback};

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

/// `GET /callbacks/failed?limit=&cursor=&aggr_id=`: oldest first.
pub async fn failed(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> ApiResult {
    let (mut limit, mut cursor, mut aggr) = (DEFAULT_PAGE, None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "limit" => limit = batch_size("limit", &v)?,
            "cursor" => {
                cursor = Some(FailedCursor::decode(&v).ok_or_else(|| {
                    bad("cursor: not a cursor from a previous page's next_cursor")
                })?)
            }
            "aggr_id" if !v.is_empty() => aggr = Some(v.into_owned()),
            "aggr_id" => return Err(bad("aggr_id cannot be empty")),
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?} (limit, cursor, aggr_id)"
                )));
            }
        }
    }
    let page = s
        .store
        .failed_callbacks(cursor.as_ref(), limit, &caller.aggr_filter(aggr.as_deref()))
        .await?;
    let items: Vec<Value> = page
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
    Ok(axum::Json(json!({
        "callbacks": items,
        "next_cursor": page.next.map(|c| c.encode()),
    }))
    .into_response())
}

/// What `POST /callbacks/retry` was asked to requeue.
enum Target {
    Ids(Vec<String>),
    /// Failed callbacks of one aggregation (as the caller names it), or of all the
    /// caller's (`None`), at most `limit`.
    Listed {
        aggr: Option<String>,
        limit: usize,
    },
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

/// `POST /callbacks/retry` with `{"ids": [...]}`, `{"aggr_id": "..."}` or
/// `{"all": true}` (these two with an optional `limit`, at most 1000).
pub async fn retry(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(body_error)?;
    match parse_target(&body)? {
        Target::Ids(ids) => {
            let mut requeued = 0;
            let mut skipped = Vec::new();
            for id in ids {
                if !caller.all_tenants && visible_job(&s, &caller, &id).await.is_err() {
                    skipped.push(json!({"job_id": id, "reason": "not found"}));
                    continue;
                }
                match s.store.requeue_callback(&id).await? {
                    RetryCallback::Requeued => requeued += 1,
                    RetryCallback::NotFound => {
                        skipped.push(json!({"job_id": id, "reason": "not found"}))
                    }
                    RetryCallback::NotFailed(st) => skipped.push(json!({
                        "job_id": id,
                        "reason": format!("callback not failed (state: {:?})", if st.is_empty() { "none yet" } else { &st }),
                    })),
                }
            }
            tracing::info!(
                requeued,
                skipped = skipped.len(),
                "failed callbacks requeued"
            );
            Ok(
                axum::Json(json!({"requeued": requeued, "skipped": skipped, "more": false}))
                    .into_response(),
            )
        }
        Target::Listed { aggr, limit } => {
            let filter = caller.aggr_filter(aggr.as_deref());
            // The whole batch is listed before any is requeued: one that fails again
            // at once comes back at the end of the list and must not be taken twice.
            let (mut ids, mut cursor) = (Vec::new(), None);
            let more = loop {
                let want = (limit - ids.len()).min(DEFAULT_PAGE);
                let page = s
                    .store
                    .failed_callbacks(cursor.as_ref(), want, &filter)
                    .await?;
                ids.extend(page.items.into_iter().map(|f| f.id));
                match page.next {
                    None => break false,
                    Some(_) if ids.len() >= limit => break true,
                    next => cursor = next,
                }
            };
            let mut requeued = 0usize;
            for id in &ids {
                if s.store.requeue_callback(id).await? == RetryCallback::Requeued {
                    requeued += 1;
                }
            }
            tracing::info!(
                requeued,
                more,
                aggr_id = aggr.as_deref().unwrap_or_default(),
                "failed callbacks requeued"
            );
            Ok(
                axum::Json(json!({"requeued": requeued, "skipped": [], "more": more}))
                    .into_response(),
            )
        }
    }
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
