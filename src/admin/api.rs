//! The JSON API under `/api/v1`. Every route reads or acts through the public [`Queue`] API;
//! inputs are validated before anything is touched, so a bad request changes nothing.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::server::{App, Method, Req, Resp};
use crate::inspect::ListFilter;
use crate::log::{Cause, LogEntry};
use crate::queue::Queue;
use crate::task::{Status, TaskError, TaskId, TaskInfo};

/// Largest page `GET /tasks` returns.
pub(crate) const MAX_PAGE: usize = 1000;
/// Most tasks a bulk action touches in one request.
pub(crate) const MAX_BULK: usize = 10_000;
/// Most tasks a text search examines per page.
const MAX_SEARCH_SCAN: usize = 5_000;

pub(crate) fn handle(app: &App<'_>, req: &Req) -> Resp {
    let rest = req.path.trim_start_matches("/api/v1");
    let segments: Vec<String> = match rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(super::server::percent_decode)
        .collect::<Option<Vec<_>>>()
    {
        Some(s) => s,
        None => {
            return Resp::error(
                400,
                "bad_path",
                "the path is not valid percent-encoded UTF-8",
            )
        }
    };
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let q = &app.queue;
    let result = match (req.method, seg.as_slice()) {
        (Method::Get, ["health"]) => Ok(health(app)),
        (Method::Get, ["csrf"]) => Ok(json!({"token": app.csrf})),
        (Method::Get, ["stats"]) => stats(q),
        (Method::Get, ["queues"]) => queues(q),
        (Method::Post, ["queues", name, "pause"]) => q
            .pause(name)
            .map(|()| json!({"queue": name, "paused": true}))
            .map_err(|e| Resp::from_error(&e)),
        (Method::Post, ["queues", name, "resume"]) => q
            .resume(name)
            .map(|()| json!({"queue": name, "paused": false}))
            .map_err(|e| Resp::from_error(&e)),
        (Method::Get, ["tasks"]) => list(q, req),
        (Method::Get, ["tasks", id]) => detail(q, id),
        (Method::Post, ["tasks", "retry"]) => bulk(q, req, Bulk::Retry),
        (Method::Post, ["tasks", "cancel"]) => bulk(q, req, Bulk::Cancel),
        (Method::Post, ["tasks", id, "retry"]) => one(q, req, id, Bulk::Retry),
        (Method::Post, ["tasks", id, "cancel"]) => one(q, req, id, Bulk::Cancel),
        (Method::Post, ["purge"]) => purge(q, req),
        (Method::Post, ["compact"]) => engine(q.compact()).map(|r| json!(r)),
        (Method::Get, ["check"]) => check(q),
        (Method::Get, ["activity"]) => Ok(app.metrics.activity_json(app.queue.now())),
        (Method::Get, ["limits"]) => engine(q.limits()).map(|l| json!(l)),
        (Method::Get, ["schedules"]) => engine(q.schedules()).map(|s| json!(s)),
        (Method::Get, ["tasks", id, "extras"]) => {
            parse_id(id).and_then(|id| engine(q.extras(id)).map(|e| json!(e)))
        }
        (
            _,
            ["health" | "csrf" | "stats" | "queues" | "tasks" | "purge" | "compact" | "check"
            | "activity" | "limits" | "schedules", ..],
        ) => Err(Resp::error(
            405,
            "method_not_allowed",
            format!("{} is not allowed on {}", method_name(req.method), req.path),
        )),
        _ => Err(Resp::error(
            404,
            "no_route",
            format!("no API route {}; see the README's API section", req.path),
        )),
    };
    match result {
        Ok(v) => Resp::json(200, &v),
        Err(r) => r,
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Post => "POST",
    }
}

fn health(app: &App<'_>) -> Value {
    json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "directory": app.queue.path().display().to_string(),
        "read_only": app.read_only,
        "recovery": app.queue.recovery_report(),
    })
}

fn bad(code: &str, msg: impl Into<String>) -> Resp {
    Resp::error(400, code, msg)
}

fn engine<T>(r: crate::Result<T>) -> Result<T, Resp> {
    r.map_err(|e| Resp::from_error(&e))
}

/// Counts as `{"PENDING": n, ...}` with every status present.
pub(crate) fn counts_json(count: impl Fn(Status) -> u64) -> Value {
    let mut m = serde_json::Map::new();
    for s in Status::ALL {
        m.insert(s.as_str().to_string(), json!(count(s)));
    }
    Value::Object(m)
}

fn stats(q: &Queue) -> Result<Value, Resp> {
    let s = engine(q.stats())?;
    let by_queue: serde_json::Map<String, Value> = s
        .by_queue
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                counts_json(|st| c.get(&st).copied().unwrap_or(0)),
            )
        })
        .collect();
    Ok(json!({
        "total": s.total,
        "by_status": counts_json(|st| s.count(st)),
        "by_queue": by_queue,
        "paused": q.paused_queues(),
    }))
}

fn queues(q: &Queue) -> Result<Value, Resp> {
    let s = engine(q.stats())?;
    let paused = q.paused_queues();
    let mut names: Vec<String> = s.by_queue.keys().cloned().collect();
    for p in &paused {
        if !names.contains(p) {
            names.push(p.clone());
        }
    }
    names.sort();
    let list: Vec<Value> = names
        .iter()
        .map(|n| {
            let c = s.by_queue.get(n);
            json!({
                "name": n,
                "paused": paused.contains(n),
                "counts": counts_json(|st| c.and_then(|c| c.get(&st)).copied().unwrap_or(0)),
            })
        })
        .collect();
    Ok(json!({ "queues": list }))
}

fn parse_id(s: &str) -> Result<TaskId, Resp> {
    s.parse::<TaskId>()
        .map_err(|_| bad("bad_id", format!("{s:?} is not a task id (a UUID)")))
}

fn parse_status(s: &str) -> Result<Status, Resp> {
    s.parse::<Status>().map_err(|_| {
        bad(
            "bad_filter",
            format!("{s:?} is not a status (pending, running, completed, failed, cancelled)"),
        )
    })
}

fn check_name(what: &'static str, s: &str) -> Result<(), Resp> {
    crate::queue::validate_name(what, s).map_err(|e| bad("bad_filter", e.to_string()))
}

/// The filter of `GET /tasks` from its query (unknown parameters are refused).
pub(crate) fn filter_from_query(req: &Req) -> Result<(ListFilter, Option<String>), Resp> {
    let mut f = ListFilter::new().limit(100);
    let mut text = None;
    for (k, v) in &req.query {
        match k.as_str() {
            "status" | "state" if !v.is_empty() => f.status = Some(parse_status(v)?),
            "queue" if !v.is_empty() => {
                check_name("queue name", v)?;
                f.queue = Some(v.clone());
            }
            "kind" if !v.is_empty() => {
                check_name("task kind", v)?;
                f.kind = Some(v.clone());
            }
            "limit" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| bad("bad_filter", format!("limit {v:?} is not a number")))?;
                if !(1..=MAX_PAGE).contains(&n) {
                    return Err(bad("bad_filter", format!("limit must be 1..={MAX_PAGE}")));
                }
                f.limit = n;
            }
            "cursor" if !v.is_empty() => f.cursor = Some(parse_id(v)?),
            "q" if !v.is_empty() => text = Some(v.clone()),
            "status" | "state" | "queue" | "kind" | "cursor" | "q" => {}
            other => {
                return Err(bad(
                    "bad_filter",
                    format!(
                    "unknown parameter {other:?} (expected status, queue, kind, limit, cursor, q)"
                ),
                ))
            }
        }
    }
    Ok((f, text))
}

/// Whether a task matches a free-text search (id, kind, queue, payload, last error).
fn matches_text(t: &TaskInfo, needle: &str) -> bool {
    let needle = needle.to_lowercase();
    let has = |s: &str| s.to_lowercase().contains(&needle);
    has(&t.id.to_string())
        || has(&t.kind)
        || has(&t.queue)
        || has(&String::from_utf8_lossy(&t.payload))
        || t.last_error
            .as_ref()
            .is_some_and(|e| has(&e.message) || has(&e.error_type))
}

/// One page, filtered; a text search examines at most `MAX_SEARCH_SCAN` tasks per page.
pub(crate) fn page(
    q: &Queue,
    filter: &ListFilter,
    text: Option<&str>,
) -> crate::Result<crate::inspect::Page> {
    let Some(text) = text else {
        return q.list(filter);
    };
    let want = filter.limit.max(1);
    let mut out = crate::inspect::Page {
        tasks: Vec::new(),
        next_cursor: None,
        corrupt: Vec::new(),
    };
    let mut f = filter.clone();
    f.limit = 500;
    let mut examined = 0;
    loop {
        let p = q.list(&f)?;
        out.corrupt.extend(p.corrupt);
        for t in p.tasks {
            examined += 1;
            let id = t.id;
            if matches_text(&t, text) {
                out.tasks.push(t);
            }
            if out.tasks.len() >= want || examined >= MAX_SEARCH_SCAN {
                // More may follow: continue after the last task examined.
                out.next_cursor = Some(id);
                return Ok(out);
            }
        }
        match p.next_cursor {
            Some(c) => f.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

fn list(q: &Queue, req: &Req) -> Result<Value, Resp> {
    let (filter, text) = filter_from_query(req)?;
    let p = engine(page(q, &filter, text.as_deref()))?;
    Ok(json!({
        "tasks": p.tasks.iter().map(task_json).collect::<Vec<_>>(),
        "next_cursor": p.next_cursor.map(|c| c.to_string()),
        "corrupt": p.corrupt,
    }))
}

fn detail(q: &Queue, id: &str) -> Result<Value, Resp> {
    let id = parse_id(id)?;
    let t = engine(q.get(id))?
        .ok_or_else(|| Resp::error(404, "not_found", format!("task {id} not found")))?;
    let history = engine(q.history(id))?;
    let mut v = task_json(&t);
    if let Value::Object(m) = &mut v {
        m.insert(
            "history".into(),
            Value::Array(history.iter().map(log_json).collect()),
        );
    }
    Ok(v)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Retry,
    Cancel,
}

/// Applies one action to one task: retry (Failed | Cancelled), cancel (Pending, or Running:
/// cooperative, see `Queue::cancel_running`).
fn act(q: &Queue, id: TaskId, action: Bulk) -> crate::Result<TaskInfo> {
    match action {
        Bulk::Retry => q.retry(id),
        Bulk::Cancel => {
            let t = q.get(id)?.ok_or(crate::Error::NotFound(id))?;
            if t.status == Status::Running {
                q.cancel_running(id)
            } else {
                q.cancel(id)
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OneBody {
    #[serde(default)]
    dry_run: bool,
}

fn parse_body<T: serde::de::DeserializeOwned + Default>(req: &Req) -> Result<T, Resp> {
    if req.body.iter().all(u8::is_ascii_whitespace) || req.body.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(&req.body).map_err(|e| {
        bad(
            "bad_body",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

fn one(q: &Queue, req: &Req, id: &str, action: Bulk) -> Result<Value, Resp> {
    let id = parse_id(id)?;
    let body: OneBody = parse_body(req)?;
    if body.dry_run {
        let t = engine(q.get(id))?
            .ok_or_else(|| Resp::error(404, "not_found", format!("task {id} not found")))?;
        return Ok(json!({"dry_run": true, "task": task_json(&t)}));
    }
    let t = engine(act(q, id, action))?;
    Ok(task_json(&t))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BulkFilter {
    status: Option<String>,
    queue: Option<String>,
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    ids: Option<Vec<String>>,
    filter: Option<BulkFilter>,
    #[serde(default)]
    dry_run: bool,
    limit: Option<usize>,
}

fn bulk(q: &Queue, req: &Req, action: Bulk) -> Result<Value, Resp> {
    let body: BulkBody = parse_body(req)?;
    let (allowed, default_status) = match action {
        Bulk::Retry => (&[Status::Failed, Status::Cancelled][..], Status::Failed),
        Bulk::Cancel => (&[Status::Pending, Status::Running][..], Status::Pending),
    };
    let limit = body.limit.unwrap_or(1000);
    if !(1..=MAX_BULK).contains(&limit) {
        return Err(bad("bad_body", format!("limit must be 1..={MAX_BULK}")));
    }
    let ids: Vec<TaskId> = match (&body.ids, &body.filter) {
        (Some(_), Some(_)) => return Err(bad("bad_body", "give either ids or filter, not both")),
        (None, None) => return Err(bad("bad_body", "give ids or a filter")),
        (Some(ids), None) => {
            if ids.len() > MAX_PAGE {
                return Err(bad(
                    "bad_body",
                    format!("at most {MAX_PAGE} ids per request"),
                ));
            }
            let ids = ids
                .iter()
                .map(|s| parse_id(s))
                .collect::<Result<Vec<_>, _>>()?;
            for id in &ids {
                if engine(q.get(*id))?.is_none() {
                    return Err(Resp::error(
                        404,
                        "not_found",
                        format!("task {id} not found"),
                    ));
                }
            }
            ids
        }
        (None, Some(f)) => {
            let status = match f.status.as_deref() {
                Some(s) => parse_status(s)?,
                None => default_status,
            };
            if !allowed.contains(&status) {
                return Err(bad(
                    "bad_filter",
                    format!(
                        "this action applies to {} tasks, not {}",
                        allowed
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(" or "),
                        status.as_str()
                    ),
                ));
            }
            let mut filter = ListFilter::new().status(status).limit(MAX_PAGE.min(limit));
            if let Some(qn) = &f.queue {
                check_name("queue name", qn)?;
                filter.queue = Some(qn.clone());
            }
            if let Some(k) = &f.kind {
                check_name("task kind", k)?;
                filter.kind = Some(k.clone());
            }
            let mut ids = Vec::new();
            loop {
                let p = engine(q.list(&filter))?;
                ids.extend(p.tasks.iter().map(|t| t.id));
                match p.next_cursor {
                    Some(c) if ids.len() < limit => filter.cursor = Some(c),
                    _ => break,
                }
            }
            ids.truncate(limit);
            ids
        }
    };
    if body.dry_run {
        return Ok(json!({
            "dry_run": true,
            "matched": ids.len(),
            "ids": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        }));
    }
    let mut changed = Vec::new();
    let mut errors = Vec::new();
    for id in &ids {
        match act(q, *id, action) {
            Ok(t) => changed.push(t.id.to_string()),
            Err(e) => errors.push(json!({"id": id.to_string(), "message": e.to_string()})),
        }
    }
    Ok(json!({
        "dry_run": false,
        "matched": ids.len(),
        "changed": changed.len(),
        "ids": changed,
        "errors": errors,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    older_than: Option<String>,
    #[serde(default)]
    dry_run: bool,
    /// With `dry_run`: how many of the tasks to return in full (default 100).
    sample: Option<usize>,
}

fn purge(q: &Queue, req: &Req) -> Result<Value, Resp> {
    let body: PurgeBody = parse_body(req)?;
    let Some(given) = body.older_than else {
        return Err(bad("bad_body", "older_than is required (e.g. \"7d\")"));
    };
    let age: Duration = humantime::parse_duration(given.trim()).map_err(|e| {
        bad(
            "bad_body",
            format!("older_than {given:?} is not a duration ({e})"),
        )
    })?;
    let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    if body.dry_run {
        let sample = body.sample.unwrap_or(100);
        if sample > MAX_PAGE {
            return Err(bad("bad_body", format!("sample must be 0..={MAX_PAGE}")));
        }
        let p = engine(q.purge_preview(age, sample))?;
        return Ok(json!({
            "dry_run": true,
            "matched": p.tasks,
            "cutoff": p.cutoff.to_string(),
            "cutoff_ms": p.cutoff.0,
            "sample": p.sample.iter().map(task_json).collect::<Vec<_>>(),
            "older_than": given,
            "older_than_ms": age_ms,
        }));
    }
    let report = engine(q.purge(age))?;
    Ok(json!({
        "dry_run": false,
        "tasks_removed": report.tasks_removed,
        "compaction": report.compaction,
        "older_than": given,
        "older_than_ms": age_ms,
    }))
}

fn check(q: &Queue) -> Result<Value, Resp> {
    let r = engine(q.check_consistency())?;
    Ok(json!({
        "consistent": r.is_consistent(),
        "tasks": r.tasks,
        "log_entries": r.log_entries,
        "problems": r.problems,
    }))
}

/// One error record as JSON.
pub(crate) fn error_json(e: &TaskError) -> Value {
    json!({
        "error_type": e.error_type,
        "message": e.message,
        "retry_count": e.retry_count,
        "timestamp": e.timestamp.to_string(),
        "timestamp_ms": e.timestamp.0,
        "permanent": e.permanent,
    })
}

/// A task as the API shows it: every field, payload and result as JSON, times as RFC 3339
/// (with `_ms` twins for programs).
pub(crate) fn task_json(t: &TaskInfo) -> Value {
    json!({
        "id": t.id.to_string(),
        "kind": t.kind,
        "queue": t.queue,
        "status": t.status.as_str(),
        "attempts": t.attempts,
        "max_retries": t.max_retries,
        "priority": t.priority,
        "created_at": t.created_at.to_string(),
        "created_at_ms": t.created_at.0,
        "next_run_at": t.next_run_at.to_string(),
        "next_run_at_ms": t.next_run_at.0,
        "started_at": t.started_at.map(|x| x.to_string()),
        "started_at_ms": t.started_at.map(|x| x.0),
        "finished_at": t.finished_at.map(|x| x.to_string()),
        "finished_at_ms": t.finished_at.map(|x| x.0),
        "timeout_ms": t.timeout_ms,
        "backoff": t.backoff.map(|b| json!({"base_ms": b.base_ms, "cap_ms": b.cap_ms, "jitter": b.jitter})),
        "payload": t.payload_json(),
        "result": t.result_json(),
        "last_error": t.last_error.as_ref().map(error_json),
        "errors": t.errors.iter().map(error_json).collect::<Vec<_>>(),
        "lease": t.lease,
    })
}

/// One transition as JSON; `cause` is the readable form, `cause_detail` the structured one.
pub(crate) fn log_json(e: &LogEntry) -> Value {
    json!({
        "seq": e.seq,
        "from": e.from.map(Status::as_str),
        "to": e.to.as_str(),
        "attempt": e.attempt,
        "cause": e.cause.to_string(),
        "cause_detail": cause_detail(&e.cause),
        "at": e.at.to_string(),
        "at_ms": e.at.0,
        "run_id": e.run_id,
    })
}

fn cause_detail(c: &Cause) -> Value {
    match c {
        Cause::Enqueued => json!({"kind": "enqueued"}),
        Cause::Claimed => json!({"kind": "claimed"}),
        Cause::Succeeded => json!({"kind": "succeeded"}),
        Cause::Failed {
            error_type,
            permanent,
        } => json!({"kind": "failed", "error_type": error_type, "permanent": permanent}),
        Cause::Cancelled => json!({"kind": "cancelled"}),
        Cause::ManualRetry => json!({"kind": "manual_retry"}),
        Cause::Released => json!({"kind": "released"}),
    }
}
