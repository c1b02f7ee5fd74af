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
//! Module map, for readers of the source: the retry rule is [`retry`]; the state machine is
//! `lifecycle.rs`; the key layout `keys.rs`; value encoding `codec.rs`; the commit protocol
//! (group commit) `commit.rs`; crash recovery `recovery.rs`; storage behind one trait in
//! `store/`; the worker pool `worker.rs`.

#![deny(unsafe_code, missing_docs)]

mod clock;
pub mod codec;
mod commit;
mod error;
mod events;
mod handler;
mod inspect;
pub mod keys;
mod lifecycle;
mod log;
mod queue;
mod recovery;
pub mod retry;
mod store;
mod task;
pub mod testing;
mod worker;

pub mod bench;
#[doc(hidden)]
pub mod fuzzing;

pub use clock::{Clock, SystemClock};
pub use error::{Error, Result};
pub use events::TransitionEvent;
pub use handler::TaskContext;
pub use inspect::{
    ConsistencyReport, CorruptEntry, ListFilter, Page, PurgeReport, RecoveryReport, Stats,
};
pub use log::{Cause, LogEntry};
pub use queue::{Durability, Queue, QueueBuilder, WeakQueue, DEFAULT_QUEUE};
pub use retry::{Backoff, RetryPolicy};
pub use store::sled_store::FORMAT_VERSION;
pub use task::{
    EnqueueOptions, Status, Task, TaskError, TaskId, TaskInfo, Timestamp, ERROR_HISTORY_LIMIT,
};
pub use worker::{StopReport, WorkerPool, WorkerPoolBuilder};
