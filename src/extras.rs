//! Public data of the three scheduling features: what an insert did ([`Inserted`]), what is
//! stored beside a task ([`TaskExtras`]: its unique key, the schedule tick that made it), the
//! live state of a limit ([`LimitStatus`]) and of a schedule ([`ScheduleInfo`]).

use serde::{Deserialize, Serialize};

use crate::retry::Backoff;
use crate::rules::limit::{Limit, LimitScope};
use crate::rules::schedule::{Missed, Spec};
use crate::rules::unique::UniqueSpec;
use crate::task::{TaskId, Timestamp};

/// What an enqueue did: the task's id and whether it was refused as a duplicate of a task
/// holding the same unique key (then `id` is that task's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Inserted {
    /// The new task, or the existing holder of the unique key.
    pub id: TaskId,
    /// True when no task was inserted because `id` holds the key.
    pub duplicate: bool,
}

/// Which schedule tick made a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledFrom {
    /// The schedule's name.
    pub schedule: String,
    /// The tick's time (also the task's first due time).
    pub at: Timestamp,
}

/// What is stored beside a task record when it uses unique keys or comes from a schedule
/// (`omniq show` prints it). Tasks without either have none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskExtras {
    /// Its unique key, digest and hold set.
    pub unique: Option<UniqueSpec>,
    /// The schedule tick that enqueued it.
    pub scheduled: Option<ScheduledFrom>,
}

impl TaskExtras {
    pub(crate) fn is_empty(&self) -> bool {
        self.unique.is_none() && self.scheduled.is_none()
    }
}

/// A limit and how it stands now ([`Queue::limits`](crate::Queue::limits), `omniq stats`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    /// What it applies to.
    pub scope: LimitScope,
    /// The configured limit.
    pub limit: Limit,
    /// Tasks of the scope running now.
    pub running: u32,
    /// Executions started in the current window (when it has a rate).
    pub started_in_window: u32,
    /// How many more may start now (`u32::MAX`: unlimited).
    pub remaining: u32,
    /// Due tasks of the scope held back by this limit (counted up to 10,000).
    pub waiting: u64,
    /// When the rate window frees a slot, if the rate is what blocks now.
    pub frees_at: Option<Timestamp>,
}

/// The options a scheduled task is enqueued with, resolved when the schedule is registered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduledTaskOptions {
    /// Its queue.
    pub queue: String,
    /// Its priority.
    pub priority: i8,
    /// Its retry budget.
    pub max_retries: u32,
    /// Its per-execution timeout, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Its own backoff, if any.
    pub backoff: Option<Backoff>,
    /// Its unique key rule, if any: `(explicit key, hold set, period in ms)`.
    pub unique: Option<(Option<String>, u8, Option<u64>)>,
}

/// A durable schedule as stored and listed ([`Queue::schedules`](crate::Queue::schedules),
/// `omniq schedules`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleInfo {
    /// Its name (unique per queue directory).
    pub name: String,
    /// When it ticks.
    pub spec: Spec,
    /// What happens to ticks missed while nothing was ticking.
    pub missed: Missed,
    /// The kind of task each tick enqueues.
    pub kind: String,
    /// Its JSON payload.
    pub payload: Vec<u8>,
    /// The options each task is enqueued with.
    pub options: ScheduledTaskOptions,
    /// A paused schedule fires nothing; resuming skips the ticks of the pause.
    pub paused: bool,
    /// The last tick accounted for (fired or skipped); creation time before the first.
    pub last_fired: Timestamp,
    /// When it was created.
    pub created_at: Timestamp,
    /// Ticks fired so far.
    pub fired: u64,
    /// Ticks skipped so far by the missed-tick policy.
    pub skipped: u64,
}

impl ScheduleInfo {
    /// The next tick it will fire (none while paused).
    pub fn next_tick(&self) -> Option<Timestamp> {
        if self.paused {
            return None;
        }
        self.spec.next_after(self.last_fired).ok().flatten()
    }

    /// The payload as JSON, for display.
    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}
