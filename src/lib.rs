//! # omniq — an embedded, durable task queue
//!
//! Link the crate, open a directory, enqueue jobs, run them on OS-thread workers. Every state
//! change is durable before it is acknowledged; a task that was running when the process died is
//! found at the next open, charged the attempt it used, and retried or failed by the same exact
//! rule as any other failure.
//!
//! ```
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use omniq::{EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail { to: String }
//! impl Task for SendEmail {
//!     const NAME: &'static str = "send_email";
//!     type Output = String;
//! }
//!
//! # fn main() -> omniq::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let queue = Queue::open(dir.path().join("omniq_data"))?;
//! queue.register(|email: SendEmail, ctx: &TaskContext| -> Result<String, TaskError> {
//!     if email.to.is_empty() {
//!         return Err(TaskError::permanent("invalid", "no recipient"));
//!     }
//!     Ok(format!("sent to {} on attempt {}", email.to, ctx.attempt()))
//! });
//!
//! let id = queue.enqueue_with(
//!     SendEmail { to: "ada@example.com".into() },
//!     EnqueueOptions::new().max_retries(5),
//! )?;
//!
//! let pool = queue.workers().concurrency(4).start()?;
//! let task = queue.wait(id, Duration::from_secs(10))?;
//! pool.stop();
//! assert_eq!(task.status, Status::Completed);
//! assert_eq!(task.result::<String>()?.unwrap(), "sent to ada@example.com on attempt 1");
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - **Exact budgets.** `max_retries = N` allows at most `N + 1` executions. The attempt is
//!   counted durably *before* the handler runs, so a crash can never yield an uncounted
//!   execution. Transient errors (including panics, timeouts and crashes) are retried with
//!   exponential backoff and jitter ([`RetryPolicy`], [`Backoff`]); permanent ones never.
//! - **Durability** is chosen per queue with [`Durability`]: `Immediate` and `Group` (default)
//!   fsync before a call returns, and [`Queue::wait`], [`Queue::wait_all`] and
//!   [`Queue::subscribe`] report only durable state; `Relaxed` acknowledges from memory and
//!   syncs its write-ahead log in the background (a power loss can lose its last
//!   `flush_every`).
//! - **At-least-once delivery.** A process that dies mid-handler is found at the next open: the
//!   task is charged a `crash` failure and retried or failed by the same rule. A handler's side
//!   effects can therefore repeat; make handlers idempotent (key external effects by
//!   [`TaskContext::task_id`]).
//! - **Fenced completions.** A late result from an attempt that timed out or was recovered is
//!   rejected: every finish carries the lease its claim was given.
//!
//! ## Unique jobs, limits, schedules
//!
//! - **Unique jobs** ([`Unique`], [`EnqueueOptions::unique`], [`Queue::insert_with`]): a
//!   duplicate of a task holding the same key is refused atomically with the insert and
//!   answered with the holder's id; no two live tasks ever share a key.
//! - **Rate and concurrency limits** per queue or kind ([`Queue::set_limit`], [`Limit`],
//!   [`LimitScope`]): enforced when claiming, so a held-back task is never claimed nor charged;
//!   pools sleep until a window frees a slot.
//! - **Recurring schedules** ([`Queue::schedule`], [`Spec`], [`Missed`]): 5-field cron in an IANA
//!   zone or intervals; each tick's task is inserted in the same atomic commit that advances the
//!   schedule, so a tick fires exactly once across crashes.
//!
//! The rules themselves are pure functions in [`rules`], shared by every backend.
//!
//! ## Handlers and shutdown
//!
//! A handler gets a [`TaskContext`]: its attempt, deadline, cooperative cancellation, and a
//! handle to enqueue follow-up work ([`TaskContext::enqueue`]) that does not keep the queue
//! open. Never capture a [`Queue`] clone in a handler. [`WorkerPool::stop`] stops claiming and
//! lets running handlers finish within the grace period; whatever is still running after it is
//! recovered at the next open. [`WorkerPool::stop_on_signals`] makes the first `SIGINT` /
//! `SIGTERM` that same graceful stop (a second one exits at once), so a deploy or a Ctrl-C costs
//! no task an attempt; [`WorkerPool::stopper`] gives programs with their own signal handling a
//! [`ShutdownHandle`]. See [`shutdown`]. [`Queue::close`] returns `Ok` once the directory is
//! released.
//!
//! ## Allocator
//!
//! sled allocates on one thread and frees on others; with glibc's allocator its arena locks cost
//! the commit writer about 30 % of its throughput. Applications should set mimalloc (or
//! jemalloc) as their global allocator:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
//! # fn main() {}
//! ```
//!
//! ## The `omniq` command
//!
//! With the default feature `cli`, the crate builds the `omniq` binary: `omniq demo` (a
//! workload that resumes after a kill), `stats`, `list`, `show`, `retry`, `cancel`, `purge`,
//! `check` and `bench`, each with `--data DIR` and `--json`. Library users can turn it off with
//! `default-features = false`.
//!
//! ## Testing
//!
//! [`testing`] provides a manual clock, seeded jitter and step-by-step execution, so a whole
//! retry schedule runs in a unit test without sleeping.
//!
//! The repository's `ARCHITECTURE.md` describes the key layout, the value format, the commit
//! protocol and recovery; `README.md` states every guarantee precisely.

#![deny(unsafe_code, missing_docs)]

mod backend;
mod clock;
#[doc(hidden)]
pub mod codec;
mod commit;
mod error;
mod events;
mod extras;
mod handler;
mod histogram;
mod inspect;
#[doc(hidden)]
pub mod keys;
mod lifecycle;
mod limiter;
mod log;
mod queue;
#[doc(hidden)]
pub mod record;
mod recovery;
pub mod retry;
pub mod rules;
pub mod shutdown;
mod store;
mod task;
pub mod testing;
mod worker;

#[cfg(feature = "admin")]
pub mod admin;
#[doc(hidden)]
pub mod bench;

/// The PostgreSQL backend (feature `postgres`, on by default): schema migrations and the
/// backend's options. Several processes share one queue in one database schema; see the
/// repository's `ARCHITECTURE.md` for the claim, fencing, notification and rescue protocol.
#[cfg(feature = "postgres")]
pub mod postgres {
    #[doc(hidden)]
    pub use crate::backend::postgres::harness;
    pub use crate::backend::postgres::{
        migrate, schema_version, Liveness, MigrateReport, PgOptions, SCHEMA_VERSION,
    };
}
#[doc(hidden)]
pub mod fuzzing;
/// The write-ahead log's record layout and fault points (for the format and crash tests).
#[doc(hidden)]
pub mod wal {
    pub use crate::store::hook::FAULT_ENV;
    pub use crate::store::wal::{
        decode_payload, encode_record, parse_segment_name, segment_name, Op, HEADER_BYTES,
        SEGMENT_PREFIX,
    };
}

pub use clock::{Clock, SystemClock};
pub use error::{Error, Result};
pub use events::TransitionEvent;
pub use extras::{
    Inserted, LimitStatus, ScheduleInfo, ScheduledFrom, ScheduledTaskOptions, TaskExtras,
};
pub use handler::TaskContext;
pub use inspect::{
    CompactReport, ConsistencyReport, CorruptEntry, ListFilter, Page, PurgePreview, PurgeReport,
    RecoveryReport, Stats,
};
pub use log::{Cause, LogEntry};
pub use queue::{AutoCompact, Durability, Queue, QueueBuilder, WeakQueue, DEFAULT_QUEUE};
pub use retry::{Backoff, RetryPolicy};
pub use rules::limit::{Limit, LimitScope};
pub use rules::schedule::{Missed, Spec};
pub use rules::unique::Unique;
pub use shutdown::{ShutdownHandle, Signal};
pub use store::sled_store::FORMAT_VERSION;
pub use task::{
    EnqueueOptions, Status, Task, TaskError, TaskId, TaskInfo, Timestamp, ERROR_HISTORY_LIMIT,
};
pub use worker::{StopReport, WorkerPool, WorkerPoolBuilder};
