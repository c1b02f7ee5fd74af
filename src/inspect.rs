//! Read-side types: list filters and pages, statistics, and the reports that open, purge and
//! the consistency checker return.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::task::{Status, TaskId, TaskInfo, Timestamp};

/// What [`Queue::list`](crate::Queue::list) returns: newest first.
///
/// ```
/// use omniq::{ListFilter, Status};
/// let filter = ListFilter::new().status(Status::Failed).queue("emails").limit(50);
/// # let _ = filter;
/// ```
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only tasks in this state.
    pub status: Option<Status>,
    /// Only tasks on this queue.
    pub queue: Option<String>,
    /// Only tasks of this kind.
    pub kind: Option<String>,
    /// At most this many tasks per page (default 100, 0 means the default).
    pub limit: usize,
    /// Continue after this id (the `next_cursor` of the previous page).
    pub cursor: Option<TaskId>,
}

impl ListFilter {
    /// Everything, 100 per page.
    pub fn new() -> ListFilter {
        ListFilter::default()
    }
    /// Only this state.
    pub fn status(mut self, s: Status) -> Self {
        self.status = Some(s);
        self
    }
    /// Only this queue.
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queue = Some(q.into());
        self
    }
    /// Only this kind.
    pub fn kind(mut self, k: impl Into<String>) -> Self {
        self.kind = Some(k.into());
        self
    }
    /// Page size.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n;
        self
    }
    /// Continue after this id.
    pub fn cursor(mut self, id: Option<TaskId>) -> Self {
        self.cursor = id;
        self
    }
    pub(crate) fn effective_limit(&self) -> usize {
        if self.limit == 0 {
            100
        } else {
            self.limit
        }
    }
    pub(crate) fn matches(&self, t: &TaskInfo) -> bool {
        self.status.is_none_or(|s| s == t.status)
            && self.queue.as_deref().is_none_or(|q| q == t.queue)
            && self.kind.as_deref().is_none_or(|k| k == t.kind)
    }
}

/// A stored record that failed to decode; listed so an operator can find it.
#[derive(Clone, Debug, Serialize)]
pub struct CorruptEntry {
    /// The key, printed readably.
    pub key: String,
    /// The decode error.
    pub reason: String,
}

/// One page of [`Queue::list`](crate::Queue::list).
#[derive(Clone, Debug)]
pub struct Page {
    /// The tasks, newest first.
    pub tasks: Vec<TaskInfo>,
    /// Pass this as the next filter's `cursor`; `None` on the last page.
    pub next_cursor: Option<TaskId>,
    /// Records on this page's range that could not be decoded (they are skipped, not lost).
    pub corrupt: Vec<CorruptEntry>,
}

/// Task counts per status and per queue. Kept as counters updated in the same atomic write as
/// every transition, so reading them costs O(queues), not O(tasks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Count per status, over all queues.
    pub by_status: BTreeMap<Status, u64>,
    /// Count per status, per queue.
    pub by_queue: BTreeMap<String, BTreeMap<Status, u64>>,
    /// All tasks stored.
    pub total: u64,
}

impl Stats {
    /// The number of tasks in `status` (all queues).
    pub fn count(&self, status: Status) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// What crash recovery did at open.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RecoveryReport {
    /// The id of this process run (one per open).
    pub run_id: u64,
    /// Tasks found `Running` (orphans of a dead process).
    pub recovered: usize,
    /// Of those, sent back to `Pending` with backoff.
    pub requeued: usize,
    /// Of those, `Failed` because their budget was spent.
    pub failed: usize,
    /// Orphans whose record could not be decoded (left untouched).
    pub corrupt: Vec<CorruptEntry>,
    /// How long recovery took.
    #[serde(with = "duration_ms")]
    pub duration: Duration,
}

impl RecoveryReport {
    /// Counts one rescued orphan by where the retry rule sent it, and says so in the log.
    pub(crate) fn count(&mut self, orphan: &crate::TaskInfo, after: crate::Status, how: &str) {
        self.recovered += 1;
        if after == crate::Status::Pending {
            self.requeued += 1;
        } else {
            self.failed += 1;
        }
        tracing::warn!(
            task = %orphan.id, kind = %orphan.kind, queue = %orphan.queue, attempt = orphan.attempts,
            error_type = "crash", outcome = %after,
            "{how}"
        );
    }
}

/// What a purge removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PurgeReport {
    /// Finished tasks removed (with their log entries).
    pub tasks_removed: usize,
    /// The compaction the purge ran afterwards, if the store had grown much larger than what
    /// it holds (see [`QueueBuilder::auto_compact`](crate::QueueBuilder::auto_compact)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compaction: Option<CompactReport>,
}

/// What [`Queue::compact`](crate::Queue::compact) did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompactReport {
    /// Whether the store was rewritten. `false` when the backend has nothing to do: on
    /// PostgreSQL, reclaiming space is autovacuum's job.
    pub compacted: bool,
    /// Why nothing was done, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Bytes on disk before (the store's files: sled's and the write-ahead log).
    pub bytes_before: u64,
    /// Bytes on disk after.
    pub bytes_after: u64,
    /// Keys copied into the new files.
    pub keys_copied: u64,
    /// Their keys' and values' bytes: what the store holds, before storage overhead.
    pub live_bytes: u64,
    /// Of `bytes_after`, the write-ahead log's: its segments are preallocated (zeros written
    /// ahead, so that a sync need not commit a file size), and a compaction does not shrink
    /// them. Up to about 16 MiB while the queue is open; deleted at close.
    pub log_bytes: u64,
    /// From start to the old files deleted.
    #[serde(with = "duration_ms", rename = "duration_ms")]
    pub duration: Duration,
    /// How long commits waited: the copy, its sync and the switch. Reads are not held up.
    #[serde(with = "duration_ms", rename = "write_pause_ms")]
    pub write_pause: Duration,
}

/// What [`Queue::purge`](crate::Queue::purge) would remove, from
/// [`Queue::purge_preview`](crate::Queue::purge_preview). Nothing is removed to compute it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PurgePreview {
    /// Tasks that finished before this instant would be removed (now minus `older_than`).
    pub cutoff: Timestamp,
    /// How many finished tasks would be removed (with their log entries).
    pub tasks: usize,
    /// The first of them, oldest finish first (at most the `sample` asked for).
    pub sample: Vec<TaskInfo>,
}

/// Result of [`Queue::check_consistency`](crate::Queue::check_consistency): every problem found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsistencyReport {
    /// Task records read.
    pub tasks: usize,
    /// Log entries read.
    pub log_entries: usize,
    /// Every inconsistency found, one line each. Empty means consistent.
    pub problems: Vec<String>,
}

impl ConsistencyReport {
    /// True when no problem was found.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

mod duration_ms {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}
