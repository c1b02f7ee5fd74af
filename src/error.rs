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
    /// An admin server (see `Queue::admin`) refused a request or could not be reached. Its
    /// message is the server's, which for engine errors is the engine error's own message.
    #[error("{message}")]
    Remote {
        /// The HTTP status (0 when the server could not be reached or answered garbage).
        status: u16,
        /// The machine-readable error code (`not_found`, `invalid_state`, `bad_request`, ...).
        code: String,
        /// What went wrong.
        message: String,
    },

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

    /// The directory exists but is not an omniq queue directory (no `OMNIQ` marker and not a
    /// queue written by an earlier omniq). Nothing in it was read by sled, changed, created or
    /// removed.
    #[error(
        "{path} is not an omniq queue directory ({found}); nothing in it was changed (point at \
         an omniq queue directory, or at a missing or empty directory to create one)"
    )]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// What was found there, e.g. "it holds a 102400-byte file `db` that is not sled's data
        /// file, and no `OMNIQ` marker".
        found: String,
    },

    /// The storage of an omniq queue directory is damaged (a truncated or overwritten data
    /// file, a snapshot pointing past the end of the log, ...): the storage engine cannot read
    /// it back. `detail` says what was found and whether the files were left as they were.
    #[error("{}", damaged_message(path.as_deref(), detail))]
    Damaged {
        /// The queue directory, when known.
        path: Option<PathBuf>,
        /// What is damaged, in words.
        detail: String,
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

    /// A PostgreSQL schema was migrated by a newer omniq than this build (feature `postgres`).
    #[error(
        "PostgreSQL schema {schema} is at omniq schema version {found}, but this build of omniq \
         knows version {supported} at most; upgrade omniq to use it"
    )]
    SchemaTooNew {
        /// The database and schema, as `database/schema`.
        schema: String,
        /// The version recorded in the schema's `omniq_schema` table.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },

    /// A PostgreSQL schema is older than this build and may not be migrated here (feature
    /// `postgres`): the queue was opened with `auto_migrate: false` or read-only. Run
    /// `omniq migrate` (or open once with `auto_migrate`) first.
    #[error(
        "PostgreSQL schema {schema} is at omniq schema version {found}, older than the version \
         {needed} this build needs; run `omniq migrate --url URL --schema {schema_name}` first"
    )]
    SchemaTooOld {
        /// The database and schema, as `database/schema`.
        schema: String,
        /// The schema's name alone (what `--schema` takes).
        schema_name: String,
        /// The version recorded in the schema's `omniq_schema` table.
        found: u32,
        /// The version this build needs.
        needed: u32,
    },

    /// This process lost its PostgreSQL session (feature `postgres`): the node row and
    /// advisory lock that mark it alive are gone, so other processes rescue its executions.
    /// It claims nothing any more; finishes of executions it still runs are accepted only while
    /// no rescuer has charged them (the lease fences them). Reconnect with a new backend.
    #[error(
        "node {node} lost its PostgreSQL session on {schema} ({reason}); it no longer claims \
         tasks, and its running executions are rescued by the other processes"
    )]
    SessionLost {
        /// The database and schema, as `database/schema`.
        schema: String,
        /// The node id this process had.
        node: u64,
        /// What happened.
        reason: String,
    },

    /// A manual retry would bring a task back into its unique key's hold set while another
    /// task holds the key (two live tasks would share it). Retry or cancel the holder instead,
    /// or wait until it leaves its hold set.
    #[error(
        "cannot retry task {id}: its unique key {key:?} is held by task {holder} (two live \
         tasks may not share a unique key)"
    )]
    UniqueConflict {
        /// The task whose retry was refused.
        id: TaskId,
        /// The task holding the key.
        holder: TaskId,
        /// The key, readable.
        key: String,
    },

    /// No schedule has this name.
    #[error("no schedule named {name:?}")]
    NoSuchSchedule {
        /// The name asked for.
        name: String,
    },
}

fn damaged_message(path: Option<&std::path::Path>, detail: &str) -> String {
    match path {
        Some(p) => format!(
            "queue directory {p} is damaged: {detail}; restore the directory from a backup (when \
             it still opens, `omniq check --data {p}` lists what is unreadable)",
            p = p.display()
        ),
        None => format!(
            "the queue's storage is damaged: {detail}; restore the queue directory from a backup \
             (when it still opens, `omniq check` lists what is unreadable)"
        ),
    }
}

impl Error {
    /// Errors shared by every waiter of a failed group commit must be re-creatable.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Storage(s) => Error::Storage(s.clone()),
            Error::Closed => Error::Closed,
            Error::Damaged { path, detail } => Error::Damaged {
                path: path.clone(),
                detail: detail.clone(),
            },
            Error::SessionLost {
                schema,
                node,
                reason,
            } => Error::SessionLost {
                schema: schema.clone(),
                node: *node,
                reason: reason.clone(),
            },
            Error::UniqueConflict { id, holder, key } => Error::UniqueConflict {
                id: *id,
                holder: *holder,
                key: key.clone(),
            },
            Error::NoSuchSchedule { name } => Error::NoSuchSchedule { name: name.clone() },
            other => Error::Storage(other.to_string()),
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            // sled's own words ("Read corrupted data at file offset Some(Inline(581985))
            // backtrace ()") tell an operator nothing they can act on.
            sled::Error::Corruption { at, .. } => Error::Damaged {
                path: None,
                detail: match at {
                    Some(ptr) => format!(
                        "the storage engine found unreadable data in its data file `db` \
                         (sled location {ptr})"
                    ),
                    None => "the storage engine found unreadable data in its files".into(),
                },
            },
            other => Error::Storage(other.to_string()),
        }
    }
}

impl Error {
    /// Names the queue directory in a [`Error::Damaged`] raised below the layer that knows it.
    pub(crate) fn in_dir(self, dir: &std::path::Path) -> Error {
        match self {
            Error::Damaged { path: None, detail } => Error::Damaged {
                path: Some(dir.to_path_buf()),
                detail,
            },
            other => other,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
