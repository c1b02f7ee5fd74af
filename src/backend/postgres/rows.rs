//! Rows <-> records: how a [`TaskInfo`] and a [`LogEntry`] are laid out in SQL columns, and
//! decoding that never panics on what the database holds.

use postgres::types::FromSql;
use postgres::Row;
use serde::de::DeserializeOwned;

use super::Target;
use crate::error::{Error, Result};
use crate::log::{Cause, LogEntry};
use crate::task::{Status, TaskError, TaskId, TaskInfo, Timestamp};

/// Every task column, in the order [`TaskParams`] binds them (a macro, so SQL built with
/// `concat!` stays `&'static str` and can be prepared once per connection).
macro_rules! task_cols {
    () => {
        "id, kind, queue, payload, state, attempts, max_retries, priority, created_at, run_at, \
         started_at, finished_at, timeout_ms, backoff, result, last_error, errors, lease, node"
    };
}
pub(crate) use task_cols;

macro_rules! log_cols {
    () => {
        "seq, task_id, from_state, to_state, attempt, cause, at, run_id"
    };
}
pub(crate) use log_cols;

/// A state's name in the `state` column.
pub(crate) fn state_name(s: Status) -> &'static str {
    match s {
        Status::Pending => "pending",
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

pub(crate) fn parse_state(s: &str) -> Option<Status> {
    Status::ALL.into_iter().find(|st| state_name(*st) == s)
}

/// `u64` as stored (`bigint`): values past `i64::MAX` are clamped (no engine time or lease
/// gets there).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn corrupt(target: &Target, what: &'static str, key: String, reason: String) -> Error {
    Error::Corrupt {
        what,
        key: format!("{}.{key}", target.label()),
        reason,
    }
}

struct Decoder<'a> {
    row: &'a Row,
    target: &'a Target,
    what: &'static str,
    key: String,
}

impl Decoder<'_> {
    fn get<'r, T: FromSql<'r>>(&'r self, col: &str) -> Result<T> {
        self.row
            .try_get(col)
            .map_err(|e| self.fail(col, e.to_string()))
    }

    fn fail(&self, col: &str, reason: String) -> Error {
        corrupt(
            self.target,
            self.what,
            self.key.clone(),
            format!("column {col}: {reason}"),
        )
    }

    fn u64(&self, col: &str) -> Result<u64> {
        let v: i64 = self.get(col)?;
        u64::try_from(v).map_err(|_| self.fail(col, format!("negative value {v}")))
    }

    fn opt_u64(&self, col: &str) -> Result<Option<u64>> {
        let v: Option<i64> = self.get(col)?;
        v.map(|v| u64::try_from(v).map_err(|_| self.fail(col, format!("negative value {v}"))))
            .transpose()
    }

    fn u32(&self, col: &str) -> Result<u32> {
        let v: i32 = self.get(col)?;
        u32::try_from(v).map_err(|_| self.fail(col, format!("negative value {v}")))
    }

    fn state(&self, col: &str) -> Result<Status> {
        let s: &str = self.get(col)?;
        parse_state(s).ok_or_else(|| self.fail(col, format!("unknown state {s:?}")))
    }

    fn json<T: DeserializeOwned>(&self, col: &str) -> Result<Option<T>> {
        let v: Option<serde_json::Value> = self.get(col)?;
        v.map(|v| serde_json::from_value(v).map_err(|e| self.fail(col, e.to_string())))
            .transpose()
    }
}

/// Decodes a row holding the task columns.
pub(crate) fn task_from_row(row: &Row, target: &Target) -> Result<TaskInfo> {
    let id: uuid::Uuid = row.try_get("id").map_err(|e| {
        corrupt(
            target,
            "task row",
            "omniq_tasks".into(),
            format!("column id: {e}"),
        )
    })?;
    let d = Decoder {
        row,
        target,
        what: "task row",
        key: format!("omniq_tasks id={id}"),
    };
    let priority: i16 = d.get("priority")?;
    Ok(TaskInfo {
        id: TaskId(id),
        kind: d.get("kind")?,
        queue: d.get("queue")?,
        payload: d.get("payload")?,
        status: d.state("state")?,
        attempts: d.u32("attempts")?,
        max_retries: d.u32("max_retries")?,
        priority: i8::try_from(priority)
            .map_err(|_| d.fail("priority", format!("{priority} is not an i8")))?,
        created_at: Timestamp(d.u64("created_at")?),
        next_run_at: Timestamp(d.u64("run_at")?),
        started_at: d.opt_u64("started_at")?.map(Timestamp),
        finished_at: d.opt_u64("finished_at")?.map(Timestamp),
        timeout_ms: d.opt_u64("timeout_ms")?,
        backoff: d.json("backoff")?,
        result: d.get("result")?,
        last_error: d.json::<TaskError>("last_error")?,
        errors: d.json::<Vec<TaskError>>("errors")?.unwrap_or_default(),
        lease: d.u64("lease")?,
    })
}

/// Decodes a row holding the log columns.
pub(crate) fn log_from_row(row: &Row, target: &Target) -> Result<LogEntry> {
    let seq: i64 = row.try_get("seq").map_err(|e| {
        corrupt(
            target,
            "log row",
            "omniq_log".into(),
            format!("column seq: {e}"),
        )
    })?;
    let d = Decoder {
        row,
        target,
        what: "log row",
        key: format!("omniq_log seq={seq}"),
    };
    let from: Option<&str> = d.get("from_state")?;
    let from = match from {
        None => None,
        Some(s) => Some(
            parse_state(s).ok_or_else(|| d.fail("from_state", format!("unknown state {s:?}")))?,
        ),
    };
    let task: uuid::Uuid = d.get("task_id")?;
    Ok(LogEntry {
        seq: d.u64("seq")?,
        task_id: TaskId(task),
        from,
        to: d.state("to_state")?,
        attempt: d.u32("attempt")?,
        cause: d
            .json::<Cause>("cause")?
            .ok_or_else(|| d.fail("cause", "null".into()))?,
        at: Timestamp(d.u64("at")?),
        run_id: d.u64("run_id")?,
    })
}

/// JSON for a jsonb column.
pub(crate) fn to_json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Encode {
        what,
        reason: e.to_string(),
    })
}

/// A task's columns as owned SQL parameters, in `task_cols!()` order.
pub(crate) struct TaskParams {
    pub id: uuid::Uuid,
    pub kind: String,
    pub queue: String,
    pub payload: Vec<u8>,
    pub state: &'static str,
    pub attempts: i32,
    pub max_retries: i32,
    pub priority: i16,
    pub created_at: i64,
    pub run_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub backoff: Option<serde_json::Value>,
    pub result: Option<Vec<u8>>,
    pub last_error: Option<serde_json::Value>,
    pub errors: serde_json::Value,
    pub lease: i64,
    pub node: Option<i64>,
}

impl TaskParams {
    pub(crate) fn new(t: &TaskInfo, node: Option<u64>) -> Result<TaskParams> {
        Ok(TaskParams {
            id: t.id.0,
            kind: t.kind.clone(),
            queue: t.queue.clone(),
            payload: t.payload.clone(),
            state: state_name(t.status),
            attempts: to_i32(t.attempts),
            max_retries: to_i32(t.max_retries),
            priority: i16::from(t.priority),
            created_at: to_i64(t.created_at.0),
            run_at: to_i64(t.next_run_at.0),
            started_at: t.started_at.map(|x| to_i64(x.0)),
            finished_at: t.finished_at.map(|x| to_i64(x.0)),
            timeout_ms: t.timeout_ms.map(to_i64),
            backoff: t
                .backoff
                .as_ref()
                .map(|b| to_json("backoff", b))
                .transpose()?,
            result: t.result.clone(),
            last_error: t
                .last_error
                .as_ref()
                .map(|e| to_json("task error", e))
                .transpose()?,
            errors: to_json("error history", &t.errors)?,
            lease: to_i64(t.lease),
            node: node.map(to_i64),
        })
    }

    pub(crate) fn all(&self) -> [&(dyn postgres::types::ToSql + Sync); 19] {
        [
            &self.id,
            &self.kind,
            &self.queue,
            &self.payload,
            &self.state,
            &self.attempts,
            &self.max_retries,
            &self.priority,
            &self.created_at,
            &self.run_at,
            &self.started_at,
            &self.finished_at,
            &self.timeout_ms,
            &self.backoff,
            &self.result,
            &self.last_error,
            &self.errors,
            &self.lease,
            &self.node,
        ]
    }
}
