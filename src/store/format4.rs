//! Format 4's finish buckets and the migration from format 3 (see `keys.rs` and
//! `crate::record` for the layout).
//!
//! Retention without a per-task finished index: `f` minute -> the largest id of a task that
//! reached a terminal state with `finished_at` in that minute. [`finished_before`] takes
//! `B` = the largest bucket value at or before the cutoff's minute and scans the task records
//! from the first up to and including `B`: every terminal task finished before the cutoff has
//! an id <= its bucket's value <= `B`, so the scan finds them all, under any clock (ids come
//! from the real clock, `finished_at` from the queue's injectable one). Its cost is the number
//! of records up to `B`, not the number of finished tasks; with tasks finishing roughly in id
//! order (the usual case) that is the purgeable tasks plus the live ones older than them.

use std::collections::HashMap;

use crate::codec::{self, RecordKind};
use crate::error::Result;
use crate::keys;
use crate::log::LogEntry;
use crate::record;
use crate::store::hook;
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

/// A bucket's value as stored (absent: no bucket).
pub(crate) fn read_bucket(db: &sled::Db, minute: u64) -> Result<Option<TaskId>> {
    let key = keys::finish_bucket(minute);
    match db.get(&key)? {
        // A damaged value is read as "every id": the purge scan then covers everything up to
        // the newest record, which is slower but never misses a task; the next finish in that
        // minute rewrites it.
        Some(v) => Ok(Some(
            keys::decode_bucket_value(&key, &v).unwrap_or(TaskId::from_bytes([0xff; 16])),
        )),
        None => Ok(None),
    }
}

/// The finish buckets a group writes: read once from sled, then kept as the group changes them.
#[derive(Default)]
pub(crate) struct Buckets {
    seen: HashMap<u64, Option<TaskId>>,
}

impl Buckets {
    /// Marks bucket `minute` deleted (a purge emptied it) in the group.
    pub(crate) fn removed(&mut self, minute: u64) {
        self.seen.insert(minute, None);
    }

    /// Raises bucket `minute` to `id` if it is lower; returns the value to write if it changed.
    pub(crate) fn raise(
        &mut self,
        db: &sled::Db,
        minute: u64,
        id: TaskId,
    ) -> Result<Option<Vec<u8>>> {
        let current = match self.seen.get(&minute) {
            Some(v) => *v,
            None => read_bucket(db, minute)?,
        };
        if current.is_some_and(|c| c.as_bytes() >= id.as_bytes()) {
            self.seen.insert(minute, current);
            return Ok(None);
        }
        self.seen.insert(minute, Some(id));
        Ok(Some(id.as_bytes().to_vec()))
    }
}

/// Whether a change to `after` (from `before`) must raise `after`'s finish bucket: it reached
/// a terminal state, or its finish time changed.
pub(crate) fn finishes(before: Option<&TaskInfo>, after: &TaskInfo) -> Option<u64> {
    if !after.status.is_terminal() {
        return None;
    }
    let at = after.finished_at?;
    let same = before.is_some_and(|b| b.status.is_terminal() && b.finished_at == Some(at));
    (!same).then(|| keys::bucket_of(at))
}

/// The largest bucket value at or before `cutoff`'s minute.
fn bound(db: &sled::Db, cutoff: Timestamp) -> Result<Option<TaskId>> {
    let mut high: Option<TaskId> = None;
    let end = keys::finish_bucket(keys::bucket_of(cutoff).saturating_add(1));
    let range = if keys::bucket_of(cutoff) == u64::MAX {
        db.range(vec![keys::FINISHED]..vec![keys::FINISHED + 1])
    } else {
        db.range(vec![keys::FINISHED]..end)
    };
    for item in range {
        let (k, v) = item?;
        keys::decode_finish_bucket(&k)?;
        let id = keys::decode_bucket_value(&k, &v).unwrap_or(TaskId::from_bytes([0xff; 16]));
        if high.is_none_or(|h| h.as_bytes() < id.as_bytes()) {
            high = Some(id);
        }
    }
    Ok(high)
}

/// What [`finished_before`] found.
pub(crate) struct Finished {
    /// Terminal tasks finished before the cutoff, oldest finish first (the first `limit` of them
    /// in id order).
    pub ids: Vec<TaskId>,
    /// The scan reached its bound (it was not cut short by the limit).
    pub complete: bool,
    /// The largest id returned (where a continuation starts).
    pub last: Option<TaskId>,
}

/// Up to `limit` terminal tasks finished before `cutoff` (strictly) with ids above `after`
/// (all, if `None`): the first `limit` in id order, returned oldest finish first. A record that
/// does not decode is skipped (a purge must not stop on it; `omniq check` reports it).
pub(crate) fn finished_before(
    db: &sled::Db,
    cutoff: Timestamp,
    limit: usize,
    after: Option<TaskId>,
) -> Result<Finished> {
    let mut out = Finished {
        ids: Vec::new(),
        complete: true,
        last: None,
    };
    let Some(high) = bound(db, cutoff)? else {
        return Ok(out);
    };
    let low = match after {
        Some(id) => {
            let mut k = keys::task(id);
            k.push(0);
            k
        }
        None => vec![keys::TASK],
    };
    let high = keys::task(high);
    if low > high {
        return Ok(out);
    }
    let mut found: Vec<(Timestamp, TaskId)> = Vec::new();
    for item in db.range(low..=high) {
        let (k, v) = item?;
        let Ok(t) = record::decode_task(&v, &|| keys::describe(&k)) else {
            continue;
        };
        match t.finished_at {
            Some(f) if t.status.is_terminal() && f < cutoff => {
                if found.len() >= limit {
                    out.complete = false;
                    break;
                }
                found.push((f, t.id));
                out.last = Some(t.id);
            }
            _ => {}
        }
    }
    found.sort();
    out.ids = found.into_iter().map(|(_, id)| id).collect();
    Ok(out)
}

/// A purge in progress: `Queue::purge` asks for batches of `limit` with one cutoff until a batch
/// is empty. Each batch continues after the last id the previous one returned instead of
/// scanning again from the first record, so live tasks older than the purged ones are read
/// once per purge, not once per batch. Valid while no task finished with a `finished_at`
/// before the cutoff since the purge began (a clock set back, or `purge(0)` within the same
/// millisecond): such a task may lie behind the continuation point, so the next batch starts
/// from the first record again. Commit groups record the earliest finish they apply in
/// `floor`.
#[derive(Clone, Debug)]
pub(crate) struct PurgeScan {
    pub cutoff: Timestamp,
    pub limit: usize,
    pub after: TaskId,
    /// The earliest `finished_at` applied since the purge began (ms).
    pub floor: u64,
}

/// The bucket keys whose whole minute is before `cutoff`: once no terminal task finished before
/// `cutoff` remains, nothing can remain in them.
pub(crate) fn stale_buckets(db: &sled::Db, cutoff: Timestamp) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let end = keys::finish_bucket(keys::bucket_of(cutoff));
    for item in db.range(vec![keys::FINISHED]..end).keys() {
        out.push(keys::decode_finish_bucket(&item?)?);
    }
    Ok(out)
}

/// Tasks converted per atomic batch by [`migrate`] (`OMNIQ_MIGRATE_BATCH` overrides it, for the
/// tests that interrupt a migration between batches). sled 0.34.7's `apply_batch` costs two
/// synchronous writebacks whatever its size: one batch per task made a 200,000-task migration
/// take 20 s.
const MIGRATE_BATCH: usize = 1_000;

fn migrate_batch() -> usize {
    std::env::var("OMNIQ_MIGRATE_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(MIGRATE_BATCH)
}

/// Format 3 -> 4, run at open after the log is replayed and sled checkpointed: per task, the
/// record is rewritten with its log inside and its `l` keys, its `s` key if it is `Completed`
/// and its per-task `f` key are removed, and its finish bucket raised, all in the same atomic
/// batch (a batch holds up to [`MIGRATE_BATCH`] whole tasks, in id order). A record already in
/// format 4 (an interrupted migration) is recognised by its envelope and only has its leftover
/// keys removed. Returns how many records it converted.
///
/// A record that does not decode is left as it is, with its log keys (it reads as the corrupt
/// record it is, naming its key; one bad record must not keep the queue from opening); a log
/// entry that does not decode is dropped from its task's history, with an error logged.
pub(crate) fn migrate(db: &sled::Db) -> Result<usize> {
    let mut converted = 0;
    let mut from = vec![keys::TASK];
    let end = vec![keys::TASK + 1];
    let per_batch = migrate_batch();
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    // Bucket values as this migration left them (batches not yet applied included).
    let mut buckets: HashMap<u64, TaskId> = HashMap::new();
    loop {
        if in_batch >= per_batch {
            hook::reached("migrate-4");
            db.apply_batch(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
        let Some(item) = db.range(from.clone()..end.clone()).next() else {
            break;
        };
        let (k, v) = item?;
        from = k.to_vec();
        from.push(0);
        let name = || keys::describe(&k);
        let decoded = keys::decode_task(&k).and_then(|id| {
            if record::is_record(&v) {
                record::decode_task(&v, &name).map(|t| (id, t, true))
            } else {
                codec::decode::<TaskInfo>(RecordKind::Task, &v, &name).map(|t| (id, t, false))
            }
        });
        let (id, task, done) = match decoded {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "a task record does not decode; the migration leaves it and its log as they are");
                continue;
            }
        };
        in_batch += 1;
        let mut log = Vec::new();
        for item in db.scan_prefix(keys::log_prefix(id)) {
            let (lk, lv) = item?;
            match codec::decode::<LogEntry>(RecordKind::Log, &lv, &|| keys::describe(&lk)) {
                Ok(entry) => log.push(entry),
                Err(e) => {
                    tracing::error!(error = %e, "a log entry does not decode; it is dropped from the task's history")
                }
            }
            batch.remove(lk);
        }
        if !done {
            let mut entries = Vec::new();
            for e in &log {
                entries.extend_from_slice(&record::encode_entry(e)?);
            }
            batch.insert(
                k.to_vec(),
                record::encode(&task, log.len() as u64, &entries)?,
            );
            converted += 1;
        }
        if task.status == Status::Completed {
            batch.remove(keys::state(Status::Completed, id));
        }
        if let (true, Some(at)) = (task.status.is_terminal(), task.finished_at) {
            batch.remove(keys::finished(at, id));
            let minute = keys::bucket_of(at);
            let current = match buckets.get(&minute) {
                Some(b) => Some(*b),
                None => read_bucket(db, minute)?,
            };
            if current.is_none_or(|b| b.as_bytes() < id.as_bytes()) {
                batch.insert(keys::finish_bucket(minute), id.as_bytes().to_vec());
                buckets.insert(minute, id);
            }
        }
    }
    if in_batch > 0 {
        hook::reached("migrate-4");
        db.apply_batch(batch)?;
    }
    // Per-task `f` keys of tasks whose record is gone or whose finish time disagrees cannot be
    // found from the records: remove every format-3 `f` key (25 bytes) left.
    let mut leftover = sled::Batch::default();
    for item in db.scan_prefix([keys::FINISHED]).keys() {
        let k = item?;
        if k.len() != 9 {
            leftover.remove(k);
        }
    }
    for item in db.scan_prefix([keys::LOG]).keys() {
        let k = item?;
        // Those of a record left unconverted stay with it.
        let kept = match keys::decode_log(&k) {
            Ok((id, _)) => db
                .get(keys::task(id))?
                .is_some_and(|v| !record::is_record(&v)),
            Err(_) => false,
        };
        if !kept {
            leftover.remove(k);
        }
    }
    for item in db.scan_prefix(keys::state_prefix(Status::Completed)).keys() {
        leftover.remove(item?);
    }
    db.apply_batch(leftover)?;
    Ok(converted)
}
