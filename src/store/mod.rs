//! The narrow storage interface. Everything the engine persists or reads goes through
//! [`Store`]; `sled_store` is the one implementation today. A second backend (PostgreSQL, for
//! users who outgrow one machine) would implement this trait and nothing else.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::error::Result;
use crate::extras::{ScheduleInfo, TaskExtras};
use crate::inspect::{ConsistencyReport, ListFilter, Page};
use crate::log::LogEntry;
use crate::rules::limit::{Limit, LimitScope};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

pub(crate) mod compact;
pub(crate) mod format4;
pub mod hook;
#[cfg(test)]
mod power_loss;
pub(crate) mod probe;
pub(crate) mod sled_config;
pub(crate) mod sled_store;
pub mod wal;

/// One task's state change, as the commit writer hands it to the store. `before` is the record
/// as stored (so the store can drop its old index entries), `after` the new record (`None`
/// deletes the task and its log), `log` the transition's log entry.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub before: Option<TaskInfo>,
    pub after: Option<TaskInfo>,
    pub log: Option<LogEntry>,
    /// Writes beside the task record made in the same atomic commit (unique holds, extras,
    /// limit starts and configuration, schedules), applied in order after the task writes.
    pub side: Vec<SideWrite>,
}

/// A write the commit writer makes beside task records, in the same atomic commit.
#[derive(Clone, Debug)]
pub(crate) enum SideWrite {
    /// Stores (`Some`) or deletes a task's extras.
    Extras {
        id: TaskId,
        extras: Option<TaskExtras>,
    },
    /// Sets (`Some`) or releases the holder of a unique digest.
    UniqueHold {
        digest: [u8; 32],
        holder: Option<TaskId>,
    },
    /// Records (`present`) or forgets an execution start counted by a rate limit.
    RateStart {
        scope: LimitScope,
        at: Timestamp,
        id: TaskId,
        present: bool,
    },
    /// Sets (`Some`) or removes a limit.
    Limit {
        scope: LimitScope,
        limit: Option<Limit>,
    },
    /// Stores (`Some`) or removes a schedule.
    Schedule {
        name: String,
        record: Option<Box<ScheduleInfo>>,
    },
}

/// The durable limit state: configured limits and the starts counted in their windows.
#[derive(Clone, Debug, Default)]
pub(crate) struct LimitState {
    pub limits: Vec<(LimitScope, Limit)>,
    pub starts: Vec<(LimitScope, Timestamp, TaskId)>,
}

/// Which queues a scan covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum QueueSet {
    All,
    Named(Vec<String>),
}

/// A due task found by [`Store::due`], in claim order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DueTask {
    pub id: TaskId,
    pub queue: String,
    /// Known when found through the pending-by-kind index.
    pub kind: Option<String>,
    pub priority: i8,
    pub next_run: Timestamp,
}

/// What [`Store::due`] found: tasks due now (best first), and the earliest future due time
/// among what it looked at (when to wake up next).
#[derive(Clone, Debug, Default)]
pub(crate) struct DueScan {
    pub ready: Vec<DueTask>,
    pub next_wake: Option<Timestamp>,
}

pub(crate) trait Store: Send + Sync + 'static {
    /// Applies a group of changes atomically (records, indexes, log, counters, the sequence
    /// number), then, if `durable`, makes them survive power loss before returning.
    fn commit(&self, changes: &[Change], last_seq: u64, durable: bool) -> Result<()>;
    /// One task.
    fn get(&self, id: TaskId) -> Result<Option<TaskInfo>>;
    /// Up to `limit` due tasks (`next_run <= now`) ordered by priority, due time, enqueue
    /// order, skipping `skip`.
    fn due(
        &self,
        queues: &QueueSet,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
    ) -> Result<DueScan>;
    /// [`due`](Store::due) through the pending-by-kind index, leaving out the kinds in
    /// `skip_kinds` and the queues in `skip_queues` without reading their entries (each found
    /// task's kind is known).
    fn due_by_kind(
        &self,
        queues: &QueueSet,
        skip_queues: &HashSet<String>,
        skip_kinds: &HashSet<String>,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
    ) -> Result<DueScan> {
        let _ = (skip_kinds, skip_queues);
        self.due(queues, now, limit, skip)
    }
    /// How many tasks of `kind` are due at `now` (counted up to `limit`), on unpaused queues.
    fn due_count_of_kind(&self, kind: &str, now: Timestamp, limit: usize) -> Result<usize> {
        let none = HashSet::new();
        Ok(self
            .due_by_kind(&QueueSet::All, &none, &none, now, limit, &HashSet::new())?
            .ready
            .iter()
            .filter(|d| d.kind.as_deref() == Some(kind))
            .count())
    }
    /// Ids in one state, oldest first (recovery uses it for `Running`).
    fn ids_in_state(&self, status: Status) -> Result<Vec<TaskId>>;
    /// A page of tasks, newest first.
    fn list(&self, filter: &ListFilter) -> Result<Page>;
    /// One task's transitions, oldest first.
    fn history(&self, id: TaskId) -> Result<Vec<LogEntry>>;
    /// Up to `limit` terminal tasks finished before `cutoff`, oldest finish first (sled: the
    /// first `limit` in id order, found through its finish buckets, then sorted).
    fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>>;
    /// Counters: (queue, status) -> count.
    fn counts(&self) -> BTreeMap<(String, Status), u64>;
    /// The last transition sequence number committed.
    fn last_seq(&self) -> u64;
    /// This process run's id.
    fn run_id(&self) -> u64;
    /// Full scan verifying every invariant between records, indexes, counters and the log.
    fn check(&self) -> Result<ConsistencyReport>;
    /// Bytes used on disk.
    fn size_on_disk(&self) -> Result<u64>;
    /// Of [`size_on_disk`](Store::size_on_disk), the bytes a compaction cannot give back: the
    /// write-ahead log's preallocated segments.
    fn log_bytes(&self) -> u64 {
        0
    }
    /// Makes everything committed so far durable.
    fn sync(&self) -> Result<()>;
    /// Sets or clears a queue's durable pause flag (written and made durable before it
    /// returns). Only the commit writer calls it.
    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        let _ = (queue, paused);
        Err(crate::error::Error::Storage(
            "this store cannot pause queues".into(),
        ))
    }
    /// The paused queues (kept in memory; O(paused queues)).
    fn paused(&self) -> BTreeSet<String> {
        BTreeSet::new()
    }
    /// What the store measures about its commits (group sizes, sync latency), if anything.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    fn metrics(&self) -> Option<&crate::histogram::StoreMetrics> {
        None
    }
    /// A task's extras (unique key, schedule tick), if it has any.
    fn extras(&self, id: TaskId) -> Result<Option<TaskExtras>> {
        let _ = id;
        Ok(None)
    }
    /// The task holding a unique digest, if any.
    fn unique_holder(&self, digest: &[u8; 32]) -> Result<Option<TaskId>> {
        let _ = digest;
        Ok(None)
    }
    /// Every configured limit and the starts counted in their windows.
    fn limit_state(&self) -> Result<LimitState> {
        Ok(LimitState::default())
    }
    /// Every schedule.
    fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        Ok(Vec::new())
    }
    /// Rewrites the store into fresh files holding only its live data (`compact.rs`); `None`
    /// when the store has nothing of the kind to do.
    fn compact(&self) -> Result<Option<compact::Compacted>> {
        Ok(None)
    }
    /// Whether any task has extras (so transitions must look them up).
    fn has_extras(&self) -> Result<bool> {
        Ok(false)
    }
}
