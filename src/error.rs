//! The one error type of the engine. Every variant names the thing that went wrong
//! (a directory, a task id, a storage key) so an operator can act on it.

use std::path::PathBuf;
use std::time::Duration;

use crate::task::{Status, TaskId};

/// Result alias used throughout omniq.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when using a queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another process holds the directory.
    #[error(
        "queue directory {path} is locked by another process; stop that process (only one \
         program may open a queue directory at a time) or use a different directory"
    )]
    Locked {
        /// The directory that is in use.
        path: PathBuf,
    },

    /// This process already has the directory open (another `Queue` handle, a worker pool, or
    /// a handler holding a `Queue` clone keeps it open).
    #[error(
        "queue directory {path} is already open in this process; share that Queue (clones are \
         cheap) instead of opening it twice, or close every handle to it first (worker pools \
         and handlers that captured a Queue clone are handles too)"
    )]
    AlreadyOpen {
        /// The directory.
        path: PathBuf,
    },

    /// [`Queue::close`](crate::Queue::close) closed its handle, but others keep the queue open.
    #[error(
        "queue directory {path} stays open: {others} other handle(s) still use it (Queue clones, \
         running worker pools, or handlers that captured a Queue clone; handlers should use \
         TaskContext::queue_handle or TaskContext::enqueue instead)"
    )]
    StillOpen {
        /// The directory.
        path: PathBuf,
        /// How many other handles there were when `close` was called.
        others: usize,
    },

    /// The directory could not be opened or created.
    #[error("cannot open queue directory {path}: {reason}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// What the operating system or sled said.
        reason: String,
    },

    /// The directory was written by a newer omniq whose format this build cannot read.
    #[error(
        "queue directory {path} uses on-disk format {found}, but this build of omniq reads \
         format {supported} at most; upgrade omniq to open it"
    )]
    FormatTooNew {
        /// The directory.
        path: PathBuf,
        /// The format version found on disk.
        found: u32,
        /// The newest format this build understands.
        supported: u32,
    },

    /// Stored bytes failed to decode. Nothing is changed on disk when this is returned.
    #[error("corrupt {what} at key {key}: {reason}")]
    Corrupt {
        /// What kind of record was being read ("task record", "log entry", ...).
        what: &'static str,
        /// The storage key, printed readably (it contains the task id where there is one).
        key: String,
        /// Why decoding failed.
        reason: String,
    },

    /// No task with this id exists.
    #[error("task {0} not found")]
    NotFound(TaskId),

    /// The operation is not allowed in the task's current state.
    #[error("cannot {op} task {id}: it is {status}, and {op} needs a task that is {expected}")]
    InvalidState {
        /// The task.
        id: TaskId,
        /// Its current status.
        status: Status,
        /// The operation that was refused ("cancel", "retry").
        op: &'static str,
        /// The states the operation accepts.
        expected: &'static str,
    },

    /// An argument was out of range or malformed (queue name, kind name, payload size...).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// A task's payload or result could not be encoded or decoded as the requested type.
    #[error("{what} of task {id} (kind {kind}) does not decode as {type_name}: {reason}")]
    Payload {
        /// "payload" or "result".
        what: &'static str,
        /// The task.
        id: TaskId,
        /// The task's kind.
        kind: String,
        /// The Rust type that was requested.
        type_name: &'static str,
        /// What serde said.
        reason: String,
    },

    /// A value could not be serialized.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// What serde said.
        reason: String,
    },

    /// [`Queue::wait`](crate::Queue::wait) gave up before the task finished.
    #[error("task {id} did not finish within {timeout:?} (it is {status})")]
    WaitTimeout {
        /// The task.
        id: TaskId,
        /// How long we waited.
        timeout: Duration,
        /// Its status when we gave up.
        status: Status,
    },

    /// The storage engine reported an I/O or internal error.
    #[error("storage error: {0}")]
    Storage(String),

    /// `SIGINT` / `SIGTERM` handling could not be set up
    /// ([`WorkerPool::stop_on_signals`](crate::WorkerPool::stop_on_signals)).
    #[error("cannot stop on signals: {0}")]
    Signals(String),

    /// The queue has been closed (its writer thread has stopped).
    #[error("the queue is closed")]
    Closed,
}

impl Error {
    /// Errors shared by every waiter of a failed group commit must be re-creatable.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Storage(s) => Error::Storage(s.clone()),
            Error::Closed => Error::Closed,
            other => Error::Storage(other.to_string()),
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
