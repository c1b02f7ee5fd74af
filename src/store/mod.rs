//! The narrow storage interface. Everything the engine persists or reads goes through
//! [`Store`]; `sled_store` is the one implementation today. A second backend (PostgreSQL, for
//! users who outgrow one machine) would implement this trait and nothing else.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::error::Result;
use crate::inspect::{ConsistencyReport, ListFilter, Page};
use crate::log::LogEntry;
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

pub(crate) mod probe;
pub(crate) mod sled_store;

/// One task's state change, as the commit writer hands it to the store. `before` is the record
/// as stored (so the store can drop its old index entries), `after` the new record (`None`
/// deletes the task and its log), `log` the transition's log entry.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub before: Option<TaskInfo>,
    pub after: Option<TaskInfo>,
    pub log: Option<LogEntry>,
}

/// Which queues a scan covers.
#[derive(Clone, Debug)]
pub(crate) enum QueueSet {
    All,
    Named(Vec<String>),
}

/// A due task found by [`Store::due`], in claim order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DueTask {
    pub id: TaskId,
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
    /// Ids in one state, oldest first (recovery uses it for `Running`).
    fn ids_in_state(&self, status: Status) -> Result<Vec<TaskId>>;
    /// A page of tasks, newest first.
    fn list(&self, filter: &ListFilter) -> Result<Page>;
    /// One task's transitions, oldest first.
    fn history(&self, id: TaskId) -> Result<Vec<LogEntry>>;
    /// Up to `limit` terminal tasks finished before `cutoff`, oldest first.
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
}
