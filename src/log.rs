//! The write-ahead transition log: one entry per state change, written in the same atomic
//! write as the change itself. It is a task's history, what operators read, and the evidence
//! the property and crash tests check.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::task::{Status, TaskId, Timestamp};

/// Why a transition happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// The task was enqueued.
    Enqueued,
    /// A worker claimed it (attempts + 1).
    Claimed,
    /// The handler returned `Ok`.
    Succeeded,
    /// An execution failed. `to` tells whether a retry was scheduled (`Pending`) or the task
    /// failed for good (`Failed`). Crash recovery records `error_type = "crash"`, a timeout
    /// `"timeout"`.
    Failed {
        /// The error's category.
        error_type: String,
        /// Whether the error was permanent.
        permanent: bool,
    },
    /// Cancelled by a user: before it ran (from `Pending`), or while it ran
    /// ([`Queue::cancel_running`](crate::Queue::cancel_running), from `Running`).
    Cancelled,
    /// Re-queued by [`Queue::retry`](crate::Queue::retry) after it had failed or been cancelled.
    ManualRetry,
    /// Handed back to `Pending` without running: a worker pool claimed it ahead
    /// ([`WorkerPoolBuilder::claim_ahead`](crate::WorkerPoolBuilder::claim_ahead)) and stopped
    /// gracefully before starting it. The claim's attempt is given back (`attempts - 1`).
    Released,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Enqueued => f.write_str("enqueued"),
            Cause::Claimed => f.write_str("claimed"),
            Cause::Succeeded => f.write_str("succeeded"),
            Cause::Failed {
                error_type,
                permanent: true,
            } => write!(f, "failed ({error_type}, permanent)"),
            Cause::Failed { error_type, .. } => write!(f, "failed ({error_type})"),
            Cause::Cancelled => f.write_str("cancelled"),
            Cause::ManualRetry => f.write_str("manual retry"),
            Cause::Released => f.write_str("released unstarted"),
        }
    }
}

/// One transition of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Store-wide, strictly increasing sequence number.
    pub seq: u64,
    /// The task.
    pub task_id: TaskId,
    /// The state before (`None` when the task was created).
    pub from: Option<Status>,
    /// The state after.
    pub to: Status,
    /// The task's `attempts` after the transition.
    pub attempt: u32,
    /// Why.
    pub cause: Cause,
    /// When (by the queue's clock).
    pub at: Timestamp,
    /// The process run (one per `Queue::open`) that made the transition.
    pub run_id: u64,
}
