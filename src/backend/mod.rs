//! The engine's storage seam (design.md section 6): the operations themselves, each atomic and
//! durable (per [`Durability`](crate::Durability)) when its reply arrives.
//!
//! With one process, a store could be handed records computed in advance, because one writer
//! validated every transition. With several processes on one database, validation has to happen
//! where the data is, so the engine asks a backend for *transitions* — insert, claim due work,
//! finish fenced by lease, cancel, retry, rescue orphans, purge — and reads. Each backend
//! implements them its own way (sled: the group-commit writer in `commit.rs`; PostgreSQL:
//! conditional SQL), but the rules themselves stay the pure functions of `lifecycle.rs` and
//! `retry.rs`: a backend reads the row, calls the rule, and writes the result only if the row is
//! still what the rule saw (the sled writer by being the only mutator, SQL by `WHERE lease = $2`).
//!
//! Every backend reports committed transitions to the shared [`Notify`](crate::events::Notify)
//! (wake-ups, `wait`, subscriptions) only once they are durable.

use std::collections::{BTreeMap, BTreeSet};

use crossbeam_channel::Sender;

use crate::commit::{Finished, NewTask, Outcome};
use crate::error::{Error, Result};
use crate::extras::{Inserted, LimitStatus, ScheduleInfo, TaskExtras};
use crate::inspect::{ConsistencyReport, ListFilter, Page, RecoveryReport};
use crate::log::LogEntry;
use crate::rules::limit::{Limit, LimitScope};
use crate::store::QueueSet;
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sled;

/// A reply channel: the backend sends exactly one message on it once the operation is durable
/// (or has failed).
pub(crate) type Reply<T> = Sender<Result<T>>;

/// Record the outcome of one execution, fenced by the lease it was claimed with: an outcome
/// whose lease is no longer the task's current one changes nothing and is answered
/// [`Finished::Stale`].
pub(crate) struct FinishRequest {
    pub id: TaskId,
    pub lease: u64,
    pub outcome: Outcome,
    pub reply: Reply<Finished>,
}

/// Claim up to `n` tasks of `queues` that are due at `now`, best first (priority, then due
/// time, then enqueue order): each moves `Pending -> Running` with `attempts + 1` and a new
/// lease, durably, before the reply is sent — so no execution can go uncounted.
pub(crate) struct ClaimRequest {
    pub queues: QueueSet,
    pub n: usize,
    pub now: Timestamp,
    pub reply: Reply<Vec<TaskInfo>>,
}

/// A worker pool's end of a standing claim ([`Backend::stand`]).
pub(crate) struct StandingLink {
    pub shared: std::sync::Arc<crate::commit::StandingShared>,
    pub tasks: crossbeam_channel::Receiver<Result<Vec<TaskInfo>>>,
}

/// What a worker pool needs to know to decide whether to claim and how long to sleep. Tasks a
/// limit holds back are not `ready`; `next_wake` includes when a rate window frees a slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DueSummary {
    /// Tasks due now (counted up to the limit asked for).
    pub ready: usize,
    /// The earliest due time after now among the tasks looked at, if any.
    pub next_wake: Option<Timestamp>,
}

/// The operations a queue is made of. Writes reply once durable; reads may fail (a record that
/// no longer decodes, a lost connection) and say so.
pub(crate) trait Backend: Send + Sync + 'static {
    // ----- transitions ----------------------------------------------------------------------

    /// Inserts new `Pending` tasks, all or none.
    fn insert(&self, tasks: Vec<TaskInfo>) -> Result<()>;

    /// Inserts new `Pending` tasks with their extras, all or none, atomically with the unique
    /// rule ([`rules::unique`](crate::rules::unique)): a task whose key is held is not
    /// inserted and is answered with the holder's id as a duplicate (SQL: the partial unique
    /// index and `ON CONFLICT`). Two producers racing insert exactly one task.
    fn insert_new(&self, tasks: Vec<NewTask>) -> Result<Vec<Inserted>> {
        if tasks.iter().any(|t| t.extras.is_some()) {
            return Err(Error::Storage(
                "this backend does not support unique keys or schedules yet".into(),
            ));
        }
        let out = tasks
            .iter()
            .map(|t| Inserted {
                id: t.task.id,
                duplicate: false,
            })
            .collect();
        self.insert(tasks.into_iter().map(|t| t.task).collect())?;
        Ok(out)
    }

    /// Sets (`Some`) or removes a rate / concurrency limit, durably; claims from then on obey
    /// it ([`rules::limit`](crate::rules::limit)).
    fn set_limit(&self, scope: LimitScope, limit: Option<Limit>) -> Result<()> {
        let _ = (scope, limit);
        Err(Error::Storage(
            "this backend does not support limits yet".into(),
        ))
    }

    /// Every limit and how it stands at `now`.
    fn limits(&self, now: Timestamp) -> Result<Vec<LimitStatus>> {
        let _ = now;
        Ok(Vec::new())
    }

    /// Creates or updates a schedule (an update keeps when it last fired); returns whether it
    /// was created.
    fn put_schedule(&self, info: ScheduleInfo) -> Result<bool> {
        let _ = info;
        Err(Error::Storage(
            "this backend does not support schedules yet".into(),
        ))
    }

    /// Pauses or resumes a schedule.
    fn pause_schedule(&self, name: &str, paused: bool) -> Result<()> {
        let _ = paused;
        Err(Error::NoSuchSchedule { name: name.into() })
    }

    /// Removes a schedule; returns whether it existed.
    fn remove_schedule(&self, name: &str) -> Result<bool> {
        let _ = name;
        Ok(false)
    }

    /// Fires every schedule tick owed at `now`: each tick's task is inserted in the same atomic
    /// commit that advances the schedule's last-fired time, and only if that time is still what
    /// was read (SQL: `UPDATE ... WHERE last_fired = $seen`). Returns the new tasks.
    fn tick(&self, now: Timestamp) -> Result<Vec<TaskId>> {
        let _ = now;
        Ok(Vec::new())
    }

    /// When the next schedule tick is due, if any (a worker pool sleeps until then at most).
    fn next_tick(&self) -> Option<Timestamp> {
        None
    }

    /// Applies `finishes` and then `claim` in one atomic commit, without waiting: each reply
    /// arrives on its own channel. (A worker pool sends its workers' outcomes together with its
    /// next claim: one durable commit for both.)
    fn submit(&self, finishes: Vec<FinishRequest>, claim: Option<ClaimRequest>) -> Result<()>;

    /// A worker pool's outcomes with no claim: like `submit(finishes, None)`, but the backend
    /// may hold their commit back briefly to share it with the next one (sled:
    /// [`Command::Outcomes`](crate::commit::Command::Outcomes)).
    fn submit_outcomes(&self, finishes: Vec<FinishRequest>) -> Result<()> {
        self.submit(finishes, None)
    }

    /// Registers a standing claim for a worker pool serving `queues`: the pool grants free
    /// slots ([`StandingLink::shared`]) and the backend fills them, with the commit of whatever
    /// makes work due, sending the claimed tasks (durable) to [`StandingLink::tasks`]. `None`
    /// when the backend has no such thing: the pool then claims with [`ClaimRequest`]s.
    fn stand(&self, _queues: &QueueSet) -> Result<Option<StandingLink>> {
        Ok(None)
    }

    /// Withdraws a standing claim; returns how many tasks it took in all. Once this returns,
    /// it takes no more.
    fn sit(&self, _id: u64) -> Result<u64> {
        Ok(0)
    }

    /// Has the standing claims look for due work now (for work that came due by the clock);
    /// the reply arrives once that commit is durable.
    fn poke(&self) -> Result<crossbeam_channel::Receiver<Result<()>>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = tx.send(Ok(()));
        Ok(rx)
    }

    /// `Pending -> Cancelled`.
    fn cancel(&self, id: TaskId) -> Result<TaskInfo>;

    /// `Failed | Cancelled -> Pending` with a fresh budget.
    fn retry(&self, id: TaskId) -> Result<TaskInfo>;

    /// Deletes up to `limit` terminal tasks finished before `cutoff`, with their logs. Returns
    /// how many were deleted.
    fn purge(&self, cutoff: Timestamp, limit: usize) -> Result<usize>;

    /// Finds executions whose process is gone and charges each its attempt as a `"crash"`
    /// failure under the ordinary retry rule. Never touches an execution whose process is alive.
    fn rescue(&self) -> Result<RecoveryReport>;

    /// Sets (`paused`) or clears a queue's durable pause flag, durably before it returns. A
    /// paused queue's tasks are never claimed (they wait; nothing is charged) until it is
    /// resumed.
    fn set_paused(&self, queue: &str, paused: bool) -> Result<()>;

    // ----- reads ----------------------------------------------------------------------------

    /// The paused queues (O(paused queues)).
    fn paused(&self) -> BTreeSet<String>;
    /// What the storage measures about its commits (group sizes, sync latency), if anything:
    /// atomics it updates as it commits, read by the admin server's `/metrics`.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    fn commit_metrics(&self) -> Option<&crate::histogram::StoreMetrics> {
        None
    }
    /// Every schedule, by name.
    fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        Ok(Vec::new())
    }
    /// A task's extras (unique key, schedule tick), if any.
    fn extras(&self, id: TaskId) -> Result<Option<TaskExtras>> {
        let _ = id;
        Ok(None)
    }

    /// One task.
    fn get(&self, id: TaskId) -> Result<Option<TaskInfo>>;
    /// A page of tasks, newest first.
    fn list(&self, filter: &ListFilter) -> Result<Page>;
    /// One task's transitions, oldest first.
    fn history(&self, id: TaskId) -> Result<Vec<LogEntry>>;
    /// Tasks per (queue, status), kept as counters: O(queues), never a full count.
    fn counts(&self) -> Result<BTreeMap<(String, Status), u64>>;
    /// How many of `queues`' tasks are due at `now` (up to `limit`), and the next due time.
    fn due_summary(&self, queues: &QueueSet, now: Timestamp, limit: usize) -> Result<DueSummary>;
    /// Up to `limit` terminal tasks finished before `cutoff`, oldest finish first (sled: the
    /// first `limit` in id order, then sorted).
    #[allow(dead_code)] // for `purge --dry-run`, which lands with the CLI's purge preview
    fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>>;
    /// Full scan verifying every invariant between records, indexes, counters and the log.
    fn check(&self) -> Result<ConsistencyReport>;
    /// Bytes the backend uses on disk.
    fn size_on_disk(&self) -> Result<u64>;
    /// Of [`size_on_disk`](Backend::size_on_disk), the bytes a compaction cannot give back
    /// (the write-ahead log's preallocated segments; 0 where there are none).
    fn log_bytes(&self) -> u64 {
        0
    }
    /// Rewrites the storage to give back the space dead data holds (see
    /// [`Queue::compact`](crate::Queue::compact)). By default there is nothing to do.
    fn compact(&self) -> Result<crate::inspect::CompactReport> {
        Ok(crate::inspect::CompactReport {
            note: Some("this backend reclaims space by itself".into()),
            ..Default::default()
        })
    }

    // ----- lifecycle ------------------------------------------------------------------------

    /// Makes everything acknowledged so far durable (a no-op where acknowledgement already is).
    fn sync(&self) -> Result<()>;
    /// Stops accepting operations, drains what was submitted, and makes it durable. Called once,
    /// when the last handle to the queue closes.
    fn shut_down(&self) -> Result<()>;

    // ----- synchronous forms of `submit` ----------------------------------------------------

    /// Records one outcome and waits for it.
    fn finish(&self, id: TaskId, lease: u64, outcome: Outcome) -> Result<Finished> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.submit(
            vec![FinishRequest {
                id,
                lease,
                outcome,
                reply,
            }],
            None,
        )?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Claims up to `n` due tasks and waits for them.
    fn claim(&self, queues: QueueSet, n: usize, now: Timestamp) -> Result<Vec<TaskInfo>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.submit(
            Vec::new(),
            Some(ClaimRequest {
                queues,
                n,
                now,
                reply,
            }),
        )?;
        rx.recv().map_err(|_| Error::Closed)?
    }
}
