//! Tools for testing code that uses omniq — and omniq itself: a manual clock, seeded jitter,
//! and a way to run due tasks step by step on the current thread, so a whole retry schedule
//! runs in microseconds without sleeping.
//!
//! ```
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use omniq::testing::{self, ManualClock};
//! use omniq::{EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Flaky;
//! impl Task for Flaky { const NAME: &'static str = "flaky"; type Output = (); }
//!
//! # fn main() -> omniq::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000));
//! let queue = Queue::builder(dir.path()).clock(clock.clone()).jitter_seed(7).open()?;
//! queue.register(|_: Flaky, _: &TaskContext| -> Result<(), TaskError> {
//!     Err(TaskError::transient("network", "unreachable"))
//! });
//! let id = queue.enqueue_with(Flaky, EnqueueOptions::new().max_retries(2))?;
//! let report = testing::run_until_idle(&queue, &clock, 100)?;
//! let task = queue.get(id)?.unwrap();
//! assert_eq!(task.status, Status::Failed);
//! assert_eq!(task.attempts, 3);
//! assert_eq!(report.executions, 3);
//! # Ok(()) }
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::Clock;
use crate::commit::{Finished, Outcome};
use crate::error::Result;
use crate::handler::{self, TaskContext};
use crate::queue::Queue;
use crate::store::QueueSet;
use crate::task::{TaskError, TaskId, TaskInfo, Timestamp};

pub use crate::retry::{FixedJitter, RandomJitter};

type Callback = Box<dyn Fn() + Send + Sync>;

struct ManualInner {
    now: Mutex<Timestamp>,
    callbacks: Mutex<Vec<Callback>>,
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

impl ManualClock {
    /// A clock stopped at `t`.
    pub fn new(t: Timestamp) -> ManualClock {
        ManualClock {
            inner: Arc::new(ManualInner {
                now: Mutex::new(t),
                callbacks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A clock stopped at the Unix epoch plus `d`.
    pub fn starting_at_epoch_plus(d: Duration) -> ManualClock {
        ManualClock::new(Timestamp(0).plus(d))
    }

    /// A clock stopped at the current wall-clock time.
    pub fn starting_now() -> ManualClock {
        ManualClock::new(Timestamp::now())
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        *self.inner.now.lock()
    }

    /// Moves time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.inner.now.lock();
        *now = now.plus(d);
        drop(now);
        self.changed();
    }

    /// Sets the time (it may go backwards; the engine tolerates that but tests rarely want it).
    pub fn set(&self, t: Timestamp) {
        *self.inner.now.lock() = t;
        self.changed();
    }

    fn changed(&self) {
        for cb in self.inner.callbacks.lock().iter() {
            cb();
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.inner.now.lock()
    }
    fn on_change(&self, callback: Box<dyn Fn() + Send + Sync>) {
        self.inner.callbacks.lock().push(callback);
    }
}

/// One execution run by [`run_due`].
#[derive(Clone, Debug)]
pub struct Execution {
    /// The task.
    pub id: TaskId,
    /// Its attempt number (1-based).
    pub attempt: u32,
    /// `Ok(())` on success, the error otherwise.
    pub outcome: std::result::Result<(), TaskError>,
}

/// What [`run_due`] / [`run_until_idle`] did.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// Executions run.
    pub executions: usize,
    /// Each execution, in order.
    pub log: Vec<Execution>,
}

/// Runs every task that is due now, one at a time, on the calling thread, until none is due.
/// Each claim and outcome is committed exactly as a worker pool would. A handler counts as timed
/// out if the queue's clock passed its deadline while it ran (advance a `ManualClock` inside
/// the handler to simulate a slow one). Tasks rescheduled into the future are not run.
pub fn run_due(queue: &Queue) -> Result<RunReport> {
    let mut report = RunReport::default();
    let inner = &queue.inner;
    let never = Arc::new(AtomicBool::new(false));
    loop {
        let now = inner.clock.now();
        inner.backend.tick(now)?;
        let claimed = inner.backend.claim(QueueSet::All, 1, now)?;
        let Some(task) = claimed.into_iter().next() else {
            return Ok(report);
        };
        let deadline = task.timeout().map(|t| now.plus(t));
        let ctx = TaskContext::new(&task, deadline, never.clone(), queue.downgrade());
        let mut outcome = handler::execute(&inner.registry, &task, &ctx);
        if deadline.is_some_and(|d| inner.clock.now() > d) {
            outcome = Outcome::Failure(TaskError::transient(
                "timeout",
                format!("attempt {} exceeded its timeout", task.attempts),
            ));
        }
        report.executions += 1;
        report.log.push(Execution {
            id: task.id,
            attempt: task.attempts,
            outcome: match &outcome {
                Outcome::Success(_) => Ok(()),
                Outcome::Failure(e) => Err(e.clone()),
                Outcome::Cancelled => Err(TaskError::permanent("cancelled", "cancelled")),
                Outcome::Released => Err(TaskError::permanent("released", "released unstarted")),
            },
        });
        let id = task.id;
        let lease = task.lease;
        match inner.backend.finish(id, lease, outcome)? {
            Finished::Applied(_) | Finished::Stale => {}
        }
    }
}

/// Repeats [`run_due`], advancing `clock` to the next due time in between, until no task is
/// due or scheduled, or `max_rounds` rounds have run. Runs a whole retry schedule without
/// sleeping.
pub fn run_until_idle(queue: &Queue, clock: &ManualClock, max_rounds: usize) -> Result<RunReport> {
    let mut total = RunReport::default();
    for _ in 0..max_rounds {
        let r = run_due(queue)?;
        total.executions += r.executions;
        total.log.extend(r.log);
        let now = clock.now();
        let scan = queue.inner.backend.due_summary(&QueueSet::All, now, 1)?;
        if scan.ready > 0 {
            continue;
        }
        match scan.next_wake {
            Some(t) => clock.set(t.max(now)),
            None => return Ok(total),
        }
    }
    Ok(total)
}

/// A task claimed by [`claim_next`]: `Running` in the store, its attempt counted, waiting for
/// you to decide its outcome — or to [`abandon`](Claimed::abandon) it, as a crash would.
pub struct Claimed {
    queue: Queue,
    /// The task as claimed (status `Running`, `attempts` already incremented, `lease` set).
    pub task: TaskInfo,
}

impl Claimed {
    /// Records success with `output` as the result. Returns `false` if the attempt was no
    /// longer current (it timed out or was recovered) and the result was rejected.
    pub fn succeed<T: serde::Serialize>(self, output: &T) -> Result<bool> {
        let bytes = serde_json::to_vec(output).map_err(|e| crate::Error::Encode {
            what: "result",
            reason: e.to_string(),
        })?;
        self.finish(Outcome::Success(bytes))
    }

    /// Records a failure; the retry rule decides what happens next. Returns `false` if the
    /// attempt was no longer current.
    pub fn fail(self, error: TaskError) -> Result<bool> {
        self.finish(Outcome::Failure(error))
    }

    /// Runs the registered handler for this task on the calling thread and records its outcome.
    pub fn run(self) -> Result<Execution> {
        let never = Arc::new(AtomicBool::new(false));
        let ctx = TaskContext::new(&self.task, None, never, self.queue.downgrade());
        let outcome = handler::execute(&self.queue.inner.registry, &self.task, &ctx);
        let execution = Execution {
            id: self.task.id,
            attempt: self.task.attempts,
            outcome: match &outcome {
                Outcome::Success(_) => Ok(()),
                Outcome::Failure(e) => Err(e.clone()),
                Outcome::Cancelled => Err(TaskError::permanent("cancelled", "cancelled")),
                Outcome::Released => Err(TaskError::permanent("released", "released unstarted")),
            },
        };
        self.finish(outcome)?;
        Ok(execution)
    }

    /// Leaves the task `Running`, as if the process died mid-execution. The next open of the
    /// directory recovers it.
    pub fn abandon(self) {}

    fn finish(self, outcome: Outcome) -> Result<bool> {
        let id = self.task.id;
        let lease = self.task.lease;
        let r = self.queue.inner.backend.finish(id, lease, outcome)?;
        Ok(matches!(r, Finished::Applied(_)))
    }
}

/// Claims the best due task (priority, due time, enqueue order) without running it.
pub fn claim_next(queue: &Queue) -> Result<Option<Claimed>> {
    let inner = &queue.inner;
    let now = inner.clock.now();
    Ok(inner
        .backend
        .claim(QueueSet::All, 1, now)?
        .into_iter()
        .next()
        .map(|task| Claimed {
            queue: queue.clone(),
            task,
        }))
}

/// When the next scheduled (not yet due) task becomes due, if any.
pub fn next_due_at(queue: &Queue) -> Result<Option<Timestamp>> {
    let now = queue.inner.clock.now();
    Ok(queue
        .inner
        .backend
        .due_summary(&QueueSet::All, now, 1)?
        .next_wake)
}
