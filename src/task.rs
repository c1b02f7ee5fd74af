//! The task model: ids, states, timestamps, the stored task record, errors, and the typed
//! [`Task`] trait that lets programs enqueue plain structs.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::retry::Backoff;

/// How many past errors a task keeps (the newest are kept). `last_error` is always the newest.
pub const ERROR_HISTORY_LIMIT: usize = 16;

/// A task's unique id: a UUIDv7, so ids sort by creation time. Printed as a plain UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub(crate) Uuid);

impl TaskId {
    /// A new, time-ordered id.
    pub(crate) fn generate() -> TaskId {
        TaskId(Uuid::now_v7())
    }

    /// The id's 16 bytes (big-endian, as stored in keys).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Rebuilds an id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> TaskId {
        TaskId(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0.hyphenated())
    }
}

impl FromStr for TaskId {
    type Err = Error;
    fn from_str(s: &str) -> Result<TaskId> {
        Uuid::parse_str(s.trim())
            .map(TaskId)
            .map_err(|e| Error::Invalid {
                what: "task id",
                reason: format!("{s:?} is not a UUID ({e})"),
            })
    }
}

/// The lifecycle state of a task.
///
/// `Pending` covers both "due now" and "scheduled for later" (see `next_run_at`).
/// `Completed`, `Failed` and `Cancelled` are terminal: a terminal task never runs again
/// unless an operator calls [`Queue::retry`](crate::Queue::retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Status {
    /// Waiting to run (now or at `next_run_at`).
    Pending,
    /// Claimed by a worker; its attempt has been counted.
    Running,
    /// Finished successfully.
    Completed,
    /// Failed for good: a permanent error, or the retry budget was spent.
    Failed,
    /// Cancelled before it ran.
    Cancelled,
}

impl Status {
    /// All states, in lifecycle order.
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    /// True for `Completed`, `Failed` and `Cancelled`.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// The byte used for this state in storage keys. Part of the on-disk format.
    pub(crate) fn code(self) -> u8 {
        match self {
            Status::Pending => 1,
            Status::Running => 2,
            Status::Completed => 3,
            Status::Failed => 4,
            Status::Cancelled => 5,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The upper-case name (`"COMPLETED"`), as printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Running => "RUNNING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = Error;
    fn from_str(s: &str) -> Result<Status> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::Invalid {
                what: "status",
                reason: format!(
                    "{s:?} is not a status (expected one of pending, running, completed, failed, cancelled)"
                ),
            })
    }
}

/// A point in time: milliseconds since the Unix epoch, UTC.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }

    /// Converts a `SystemTime` (times before 1970 become 0).
    pub fn from_system_time(t: SystemTime) -> Timestamp {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }

    /// This time plus `d` (saturating).
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// This time minus `d` (saturating at the epoch).
    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// How long after `earlier` this is (zero if it is not after).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.plus(d)
    }
}

impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        self.minus(d)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.to_system_time())
        )
    }
}

/// Why an execution failed, as stored in a task's error history.
///
/// Handlers build one with [`TaskError::transient`] or [`TaskError::permanent`], or just use `?`
/// on any `std::error::Error` (which becomes a transient error). The engine fills in
/// `retry_count` and `timestamp` when it records the failure.
///
/// ```
/// use omniq::TaskError;
/// let e = TaskError::permanent("not_found", "no such user 42");
/// assert!(e.permanent);
/// let e: TaskError = std::io::Error::other("connection reset").into();
/// assert!(!e.permanent);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// A short machine-readable category: `"timeout"`, `"network"`, `"panic"`, `"crash"`,
    /// `"unregistered"`, `"decode"`, or any string the handler chose.
    pub error_type: String,
    /// A human-readable message.
    pub message: String,
    /// Retries already used when this failure happened (= attempts - 1).
    pub retry_count: u32,
    /// When the failure was recorded (UTC).
    pub timestamp: Timestamp,
    /// Permanent errors are never retried.
    pub permanent: bool,
}

impl TaskError {
    /// A failure that should be retried while the budget lasts.
    pub fn transient(error_type: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError {
            error_type: error_type.into(),
            message: message.into(),
            retry_count: 0,
            timestamp: Timestamp(0),
            permanent: false,
        }
    }

    /// A failure that must not be retried (bad input, not found, forbidden...).
    pub fn permanent(error_type: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError {
            permanent: true,
            ..TaskError::transient(error_type, message)
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{} ({kind}): {}", self.error_type, self.message)
    }
}

/// Any standard error becomes a transient `TaskError` whose `error_type` is the error's type
/// name, so handlers can use `?` freely. (This is why `TaskError` itself does not implement
/// `std::error::Error`.)
impl<E: std::error::Error> From<E> for TaskError {
    fn from(e: E) -> TaskError {
        let full = std::any::type_name::<E>();
        TaskError::transient(short_type_name(full), e.to_string())
    }
}

/// `std::io::error::Error` -> `io::Error`, `core::num::error::ParseIntError` ->
/// `num::ParseIntError`: readable but still specific (private `error` modules are skipped).
fn short_type_name(full: &str) -> String {
    let base = full.split('<').next().unwrap_or(full);
    let parts: Vec<&str> = base.split("::").collect();
    let mut parts = parts.into_iter().rev();
    let last = parts.next().unwrap_or(base);
    match parts.find(|m| !matches!(*m, "error" | "errors")) {
        Some(module) => format!("{module}::{last}"),
        None => last.to_string(),
    }
}

/// A job type. Implement it on a serde-serializable argument struct; enqueue the struct; register
/// a handler for it. `NAME` is stored with every task and must stay stable across releases.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct SendEmail { to: String, subject: String }
///
/// impl omniq::Task for SendEmail {
///     const NAME: &'static str = "send_email";
///     type Output = String; // e.g. the provider's message id
/// }
/// ```
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// Stable kind name stored with each task; handlers are looked up by it.
    const NAME: &'static str;
    /// What a successful run returns; stored and readable with [`TaskInfo::result`].
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

/// Everything stored about one task. Returned by [`Queue::get`](crate::Queue::get) and friends.
///
/// Changing this struct changes on-disk format version 1: the golden-byte tests in
/// `tests/format.rs` fail, and a new schema version with a conversion is needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Unique id (UUIDv7).
    pub id: TaskId,
    /// The task kind (`Task::NAME`).
    pub kind: String,
    /// The queue it belongs to (default `"default"`).
    pub queue: String,
    /// The arguments, JSON-encoded (readable by operators, tolerant of added optional fields).
    pub payload: Vec<u8>,
    /// Current state.
    pub status: Status,
    /// Executions started so far (incremented, durably, before the handler is called).
    pub attempts: u32,
    /// Retries allowed after the first execution: at most `max_retries + 1` executions.
    pub max_retries: u32,
    /// Higher runs first among due tasks.
    pub priority: i8,
    /// When it was enqueued.
    pub created_at: Timestamp,
    /// When it is (or was) due.
    pub next_run_at: Timestamp,
    /// When the latest execution started.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
    /// Per-execution time limit in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Backoff for this task (falls back to its queue's policy when `None`).
    pub backoff: Option<Backoff>,
    /// The JSON-encoded output of the successful execution.
    pub result: Option<Vec<u8>>,
    /// The most recent error.
    pub last_error: Option<TaskError>,
    /// Past errors, oldest first, at most [`ERROR_HISTORY_LIMIT`].
    pub errors: Vec<TaskError>,
    /// Fencing token of the current/latest execution: the log sequence number of its claim.
    /// A completion carrying any other lease is rejected as stale.
    pub lease: u64,
}

impl TaskInfo {
    /// Decodes the payload as `T`.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Payload {
            what: "payload",
            id: self.id,
            kind: self.kind.clone(),
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }

    /// Decodes the result as `T` (`Ok(None)` while there is no result).
    pub fn result<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        let Some(bytes) = &self.result else {
            return Ok(None);
        };
        serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|e| Error::Payload {
                what: "result",
                id: self.id,
                kind: self.kind.clone(),
                type_name: std::any::type_name::<T>(),
                reason: e.to_string(),
            })
    }

    /// The payload as a JSON value, for display.
    pub fn payload_json(&self) -> serde_json::Value {
        json_or_hex(&self.payload)
    }

    /// The result as a JSON value, for display.
    pub fn result_json(&self) -> Option<serde_json::Value> {
        self.result.as_deref().map(json_or_hex)
    }

    /// The timeout as a `Duration`.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }
}

fn json_or_hex(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        serde_json::json!({ "undecodable_hex": hex })
    })
}

/// Per-task options for [`Queue::enqueue_with`](crate::Queue::enqueue_with).
///
/// ```
/// use std::time::Duration;
/// let opts = omniq::EnqueueOptions::new()
///     .queue("emails")
///     .delay(Duration::from_secs(30))
///     .max_retries(5)
///     .priority(10)
///     .timeout(Duration::from_secs(60));
/// # let _ = opts;
/// ```
#[derive(Clone, Debug, Default)]
pub struct EnqueueOptions {
    pub(crate) queue: Option<String>,
    pub(crate) delay: Option<Duration>,
    pub(crate) run_at: Option<Timestamp>,
    pub(crate) max_retries: Option<u32>,
    pub(crate) priority: i8,
    pub(crate) timeout: Option<Duration>,
    pub(crate) backoff: Option<Backoff>,
    pub(crate) unique: Option<crate::rules::unique::Unique>,
}

impl EnqueueOptions {
    /// Defaults: queue `"default"`, due now, the queue's retry policy, priority 0, no timeout.
    pub fn new() -> EnqueueOptions {
        EnqueueOptions::default()
    }
    /// The queue to put the task on.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queue = Some(name.into());
        self
    }
    /// Run no earlier than `d` from now.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self.run_at = None;
        self
    }
    /// Run no earlier than `at`.
    pub fn run_at(mut self, at: Timestamp) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }
    /// Retries allowed after the first execution (`0` = run once).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = Some(n);
        self
    }
    /// Higher runs first among due tasks (default 0).
    pub fn priority(mut self, p: i8) -> Self {
        self.priority = p;
        self
    }
    /// Per-execution time limit; an execution that outlives it fails with `"timeout"`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    /// Backoff for this task's retries, overriding its queue's.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = Some(b);
        self
    }
    /// Makes the task unique: refused as a duplicate while a task with the same key is in the
    /// key's hold set (see [`Unique`](crate::Unique) and [`Queue::insert_with`](crate::Queue::insert_with)).
    pub fn unique(mut self, u: crate::rules::unique::Unique) -> Self {
        self.unique = Some(u);
        self
    }
}

/// A never-run task due at the epoch on the default queue, for unit tests across the crate.
#[cfg(test)]
pub(crate) fn test_task(max_retries: u32) -> TaskInfo {
    TaskInfo {
        id: TaskId::generate(),
        kind: "k".into(),
        queue: "default".into(),
        payload: b"{}".to_vec(),
        status: Status::Pending,
        attempts: 0,
        max_retries,
        priority: 0,
        created_at: Timestamp(0),
        next_run_at: Timestamp(0),
        started_at: None,
        finished_at: None,
        timeout_ms: None,
        backoff: None,
        result: None,
        last_error: None,
        errors: vec![],
        lease: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_errors_become_transient_with_a_readable_type() {
        let e: TaskError = std::io::Error::other("boom").into();
        assert_eq!(e.error_type, "io::Error");
        assert_eq!(e.message, "boom");
        assert!(!e.permanent);
        let e: TaskError = "x".parse::<i32>().unwrap_err().into();
        assert_eq!(e.error_type, "num::ParseIntError");
    }

    #[test]
    fn status_parses_case_insensitively_and_rejects_junk() {
        assert_eq!("failed".parse::<Status>().unwrap(), Status::Failed);
        assert_eq!("COMPLETED".parse::<Status>().unwrap(), Status::Completed);
        let err = "done".parse::<Status>().unwrap_err().to_string();
        assert!(err.contains("\"done\""), "{err}");
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
    }

    #[test]
    fn task_id_round_trips_through_text() {
        let id = TaskId::generate();
        assert_eq!(id.to_string().parse::<TaskId>().unwrap(), id);
        assert!("nope".parse::<TaskId>().is_err());
    }
}
