//! The sled implementation of [`Store`]: one sled tree, hand-encoded keys (`keys.rs`),
//! enveloped values (`codec.rs`), one `apply_batch` per commit group.
//!
//! Durability (format 3): each commit group is first appended to omniq's write-ahead log
//! (`wal.rs`) as one record, then applied to sled atomically (`apply_atomically`), with `m/wal`
//! = the record's number. [`SledStore::sync`] is one `fdatasync` of the log. sled is made
//! durable only by checkpoints (a background thread, by log bytes or time, and at open and
//! close): sled `flush()` + `fsync` of its data file (sled 0.34.7's `flush()` ends in
//! `sync_file_range`, which does not survive power loss), after which the log segments sled
//! wholly holds are deleted. After a crash sled holds each group whole or not at all
//! (`apply_atomically`), so `m/wal` says exactly which records it lacks, and the open replays
//! them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::codec::{self, RecordKind};
use crate::error::{Error, Result};
use crate::extras::{ScheduleInfo, TaskExtras};
use crate::inspect::{ConsistencyReport, CorruptEntry, ListFilter, Page};
use crate::keys;
use crate::log::{Cause, LogEntry};
use crate::record;
use crate::rules::unique;
use crate::store::compact::{self, Generation, LiveDb};
use crate::store::format4;
use crate::store::hook;
use crate::store::probe::{self, Found, Preflight};
use crate::store::wal::{self, Op, Wal};
use crate::store::{Change, DueScan, DueTask, LimitState, QueueSet, SideWrite, Store};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

/// Task counts per (queue, status).
type Counters = BTreeMap<(String, Status), u64>;

/// The newest on-disk format this build reads and the one it writes.
///
/// Format 2 (unique keys, limits, schedules) adds key prefixes `u o r a h` and changes no
/// existing encoding. It is a new version because a format-1 build would ignore them and so
/// break uniqueness and limits; a format-1 store is upgraded at open by building the
/// pending-by-kind index and rewriting `m/format`, after which format-1 builds refuse it.
///
/// Format 3 adds the write-ahead log (`wal.*` segment files beside sled's, and `m/wal` in sled):
/// acknowledged transitions may be only in the log, which a format-2 build would ignore. A
/// format-2 store is migrated at open: any write-ahead entry (`w`) a crash left is applied, then
/// `m/format` is rewritten; nothing else changes.
///
/// Where sled's files live (the root, or the generation `sled.<n>/` a compaction switched to)
/// is not part of this number: it is recognised by the pointer file `sled.current`
/// (`compact.rs`).
///
/// Format 4 (issue 12: bytes per task) keeps each task's transition log inside its record (one
/// `t` key, `crate::record`), drops the state-index key of `Completed` tasks and replaces the
/// per-task finished index with per-minute finish buckets (`keys.rs`, `format4.rs`): a completed
/// task is one key. An older store is migrated at open, after its log is replayed and sled
/// checkpointed, each task whole in one atomic batch (`format4::migrate`); the marker says format 4 from
/// the start of the migration (so an older build refuses a half-migrated store) and `m/format`
/// once it is done (so an interrupted migration is run again).
pub const FORMAT_VERSION: u32 = 4;

/// Options for opening the store.
#[derive(Clone, Debug)]
pub(crate) struct SledOptions {
    pub cache_bytes: u64,
    /// sled's background flusher period; `None` disables it. Also how often records appended
    /// without a sync (`Durability::Relaxed`) are made durable.
    pub flush_every_ms: Option<u64>,
    /// Log segment size (a new segment file is started past it).
    pub wal_segment_bytes: u64,
    /// A checkpoint starts once this many log bytes were appended since the last one...
    pub checkpoint_bytes: u64,
    /// ... or this long after it, if anything was appended.
    pub checkpoint_every: Duration,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: 1 << 30,
            flush_every_ms: Some(500),
            wal_segment_bytes: wal::DEFAULT_SEGMENT_BYTES,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            checkpoint_every: Duration::from_secs(30),
        }
    }
}

/// Log bytes after which a checkpoint starts.
pub(crate) const DEFAULT_CHECKPOINT_BYTES: u64 = 32 << 20;

/// What the checkpoint thread and the store share.
struct Checkpoint {
    dir: PathBuf,
    /// sled's current generation (a compaction replaces it).
    db: Arc<LiveDb>,
    /// Held by a checkpoint while it runs, and by a compaction (which must not interleave).
    run_lock: Mutex<()>,
    /// A compaction copying since this record needs the later ones: no checkpoint deletes
    /// them (`u64::MAX`: none running).
    prune_floor: AtomicU64,
    wal: Arc<Wal>,
    /// The last log record applied to sled (in memory).
    applied: AtomicU64,
    synced_blobs: Mutex<HashSet<OsString>>,
    /// A checkpoint failed: sled's files may have lost dirty pages; every later sync fails.
    failed: Mutex<Option<String>>,
    stop: Mutex<bool>,
    wake: Condvar,
    bytes: u64,
    every: Duration,
    /// How often records appended without a sync are synced (`Relaxed`).
    sync_every: Option<Duration>,
}

impl Checkpoint {
    /// sled `flush()` + `fsync` (and new blob files), then deletes the log segments sled now
    /// holds durably (`all`: the current one too, at close). Returns the record it covers.
    fn run(&self, all: bool) -> Result<u64> {
        let _one = self.run_lock.lock();
        let covered = self.applied.load(Ordering::Acquire);
        self.wal.take_since_checkpoint();
        hook::reached("checkpoint");
        self.db.flush()?;
        self.db.sync_data_file()?;
        self.sync_new_blobs()?;
        let floor = self.prune_floor.load(Ordering::Acquire);
        self.wal
            .prune(covered.min(floor), all && floor == u64::MAX)?;
        Ok(covered)
    }

    /// Syncs blob files sled created since the last checkpoint (sled writes them without fsync).
    fn sync_new_blobs(&self) -> Result<()> {
        sync_new_blobs(&self.db.layout().dir, &mut self.synced_blobs.lock())
    }

    /// The checkpoint thread: wakes when the log passed `bytes` since the last checkpoint (the
    /// writer signals it), or every `sync_every` to sync `Relaxed` records and see whether
    /// `every` has passed.
    fn thread(&self) {
        let mut last = Instant::now();
        let poll = self
            .sync_every
            .unwrap_or(Duration::from_millis(500))
            .min(self.every);
        loop {
            {
                let mut stop = self.stop.lock();
                if *stop {
                    return;
                }
                if self.wal.since_checkpoint() < self.bytes {
                    self.wake.wait_for(&mut stop, poll);
                }
                if *stop {
                    return;
                }
            }
            if self.failed.lock().is_some() {
                continue;
            }
            if self.sync_every.is_some() {
                if let Err(e) = self.wal.sync() {
                    tracing::error!(dir = %self.dir.display(), error = %e, "background sync of the write-ahead log failed");
                    *self.failed.lock() = Some(e.to_string());
                    continue;
                }
            }
            let due = self.wal.since_checkpoint() >= self.bytes
                || (self.wal.since_checkpoint() > 0 && last.elapsed() >= self.every);
            if due {
                last = Instant::now();
                if let Err(e) = self.run(false) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "checkpoint failed; the queue refuses further commits");
                    *self.failed.lock() = Some(e.to_string());
                }
            }
        }
    }
}

pub(crate) struct SledStore {
    dir: PathBuf,
    /// sled's current generation: its handle, data file and directory (see `compact.rs`).
    db: Arc<LiveDb>,
    /// sled's cache and flush settings, for a compaction's new generation.
    sled_opts: (u64, Option<u64>),
    /// Held while a group is appended and applied, and by a compaction: no write can land in a
    /// generation being copied.
    write_lock: Mutex<()>,
    /// One compaction at a time.
    compact_lock: Mutex<()>,
    /// The write-ahead log and checkpoints (set at the end of `open`).
    ckpt: Option<Arc<Checkpoint>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    counters: Mutex<Counters>,
    /// Paused queues, loaded at open and kept in step with the `q` keys.
    paused: Mutex<BTreeSet<String>>,
    /// Commit group sizes and sync latency (atomics; read by the admin server's `/metrics`).
    metrics: crate::histogram::StoreMetrics,
    last_seq: Mutex<u64>,
    run_id: u64,
    /// Numbers the write-ahead entries of this process run (see `apply_atomically`).
    write_ahead_counter: Mutex<u64>,
    /// Set once `open` completed: only then does dropping the store update the marker.
    opened: bool,
    /// A sync failed: what was applied since may be lost (fsync errors can drop dirty pages), so
    /// closing must not raise the watermark over it.
    sync_failed: std::sync::atomic::AtomicBool,
    /// The older format found at open, upgraded once interrupted groups are replayed.
    upgrade_from: Mutex<Option<u32>>,
    /// Commit groups applied by this process (a purge's bucket clean-up is valid only if none
    /// was applied since the scan that justified it).
    groups_applied: AtomicU64,
    /// Finish buckets a purge scan found empty: (`groups_applied` at the scan, cutoff). The next
    /// group removes the buckets before the cutoff's minute if no group came in between.
    bucket_cleanup: Mutex<Option<(u64, Timestamp)>>,
    /// The purge in progress, if its last batch was full (see [`format4::PurgeScan`]).
    purge_scan: Mutex<Option<format4::PurgeScan>>,
    /// Must stay the last field: fields drop in declaration order, so this runs after `db`.
    _lock_release: LockRelease,
}

/// A clean close stops the checkpoint thread, syncs the log, checkpoints (deleting every log
/// segment) and records the data file's final length in the marker, so the next open can tell
/// a `db` cut short from one sled shrank during the run. Best effort: if the final sync fails,
/// or any sync failed during the run, the log stays and the marker keeps the values of the last
/// open.
impl Drop for SledStore {
    fn drop(&mut self) {
        self.stop_checkpointer();
        let failed = self.sync_failed.load(std::sync::atomic::Ordering::SeqCst)
            || self
                .ckpt
                .as_ref()
                .is_some_and(|c| c.failed.lock().is_some());
        let closed = match &self.ckpt {
            Some(c) => !failed && c.wal.sync().is_ok() && c.run(true).is_ok(),
            None => false,
        };
        if self.opened && closed {
            if let Err(e) = self.write_watermark() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot update the OMNIQ marker at close");
            }
        }
    }
}

/// Waits, when dropped, until sled's background threads have let go of the directory's file
/// lock. sled 0.34.7 releases it only when its last internal reference goes, which can be a
/// moment after the `Db` is dropped; without this, closing a queue and reopening it at once (or
/// from the next process) could fail with a spurious `Error::Locked`.
struct LockRelease {
    /// The current generation's data file (updated by a compaction's switch).
    db_file: Arc<Mutex<PathBuf>>,
}

impl Drop for LockRelease {
    fn drop(&mut self) {
        let db_file = self.db_file.lock().clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let Ok(file) = File::open(&db_file) else {
                return;
            };
            match file.try_lock() {
                Ok(()) => {
                    let _ = file.unlock();
                    return;
                }
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => {
                    tracing::warn!(file = %db_file.display(), error = %e, "sled still holds its lock after close");
                    return;
                }
            }
        }
    }
}

/// [`Error::Locked`] when another process holds sled's lock on `dir/db` (the same `flock` sled
/// takes), checked before a trial copy is made so a live store is never copied mid-write.
fn refuse_if_locked(dir: &Path) -> Result<()> {
    let Ok(file) = File::open(dir.join("db")) else {
        return Ok(());
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            Ok(())
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(_)) => Ok(()),
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

impl SledStore {
    /// Opens the store in `dir`, creating it only in a missing or empty directory. A directory
    /// that is not recognisably omniq's is refused before sled ever sees it, and a damaged one
    /// is reported without being written (see `probe.rs`).
    pub(crate) fn open(dir: &Path, opts: &SledOptions) -> Result<SledStore> {
        let found = probe::probe(dir, FORMAT_VERSION)?;
        // Where sled's files are: the root, or the generation a compaction switched to.
        let layout = match &found {
            Found::Marked(_) => compact::resolve(dir)?,
            _ => compact::Layout {
                number: 0,
                dir: dir.to_path_buf(),
            },
        };
        let expected = match &found {
            Found::Fresh => {
                probe::create(dir, FORMAT_VERSION)?;
                probe::Marker::default()
            }
            Found::Marked(marker) => {
                if let Preflight::Suspicious(why) = probe::preflight(&layout.dir, Some(marker)) {
                    refuse_if_locked(&layout.dir)?;
                    probe::trial_open_copy(&layout.dir, FORMAT_VERSION, &why, marker)?;
                }
                *marker
            }
            Found::BareSled => {
                // Possibly a format-1 store written before the marker existed: only a copy is
                // opened until it is known to be omniq's.
                refuse_if_locked(dir)?;
                let why = match probe::preflight(dir, None) {
                    Preflight::Suspicious(why) => why,
                    Preflight::Clean => {
                        format!("it has sled's files but no `{}` marker", probe::MARKER)
                    }
                };
                probe::trial_open_copy(dir, FORMAT_VERSION, &why, &probe::Marker::default())?;
                probe::Marker::default()
            }
        };
        Self::open_recognised(dir, &layout, opts, &expected).map_err(|e| e.in_dir(dir))
    }

    /// Opens a directory [`probe`] recognised. `expected` is the marker's watermark: sled's
    /// `m/run` and `m/seq` must have reached it, or sled lost the end of its log.
    fn open_recognised(
        dir: &Path,
        layout: &compact::Layout,
        opts: &SledOptions,
        expected: &probe::Marker,
    ) -> Result<SledStore> {
        let open_err = |reason: String| Error::Open {
            path: dir.to_path_buf(),
            reason,
        };
        let sled_dir = layout.dir.as_path();
        let existed = sled_dir.join("db").exists();
        // The log is read (and checked) before sled touches the directory: a log damaged before
        // its tail is refused with every file as it was.
        let log = wal::read_log(dir)?;
        let open = || {
            probe::open_quietly(super::sled_config::config(
                sled_dir,
                opts.cache_bytes,
                opts.flush_every_ms,
            ))
            // sled panicked: it found data it cannot read.
            .unwrap_or(Err(sled::Error::Corruption { at: None, bt: () }))
        };
        // sled 0.34.7 writes a snapshot during every open as `snap.<lsn>.generating`, fsyncs
        // it, then renames it to `snap.<lsn>`; but its reader does not skip `.generating`
        // files. A process killed while writing one leaves a truncated file that sorts last,
        // and every later open failed with "Read corrupted data" (sled issues 1527 and 1533;
        // found by the SIGKILL loop in tests/crash.rs). Such a file is an unfinished snapshot
        // sled never made current: the previous snapshot and the log are intact, so removing
        // it restores sled's own protocol. Only after an open failed as corrupt, when no live
        // process can be writing one (any open fails while the leftover is there), and only
        // in a directory already recognised as an omniq store.
        let db = match open() {
            Err(sled::Error::Corruption { .. }) if remove_unfinished_snapshots(sled_dir)? > 0 => {
                open()
            }
            other => other,
        }
        .map_err(|e| {
            if is_lock_error(&e) {
                Error::Locked {
                    path: dir.to_path_buf(),
                }
            } else if let sled::Error::Corruption { .. } = e {
                Error::Damaged {
                    path: Some(dir.to_path_buf()),
                    detail: "the storage engine cannot read its data file `db` back (it fails \
                             its checksums or ends early)"
                        .into(),
                }
            } else {
                open_err(e.to_string())
            }
        })?;
        // A process that switched generations while this one was opening the old one holds the
        // directory: it let go of the old generation's lock only after its pointer switch.
        if compact::resolve(dir)? != *layout {
            return Err(Error::Locked {
                path: dir.to_path_buf(),
            });
        }
        // This process holds the current generation's lock, so nothing else uses the
        // directory: what an interrupted compaction left can go.
        compact::remove_leftovers(dir, layout)?;
        let data_file = File::open(sled_dir.join("db"))
            .map_err(|e| open_err(format!("cannot open sled's data file: {e}")))?;
        let live = Arc::new(LiveDb::new(Generation {
            db,
            data_file,
            layout: layout.clone(),
        }));
        let mut store = SledStore {
            dir: dir.to_path_buf(),
            _lock_release: LockRelease {
                db_file: live.lock_file(),
            },
            db: live,
            sled_opts: (opts.cache_bytes, opts.flush_every_ms),
            write_lock: Mutex::new(()),
            compact_lock: Mutex::new(()),
            ckpt: None,
            checkpointer: None,
            counters: Mutex::new(BTreeMap::new()),
            paused: Mutex::new(BTreeSet::new()),
            metrics: crate::histogram::StoreMetrics::default(),
            last_seq: Mutex::new(0),
            run_id: 0,
            write_ahead_counter: Mutex::new(0),
            opened: false,
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            upgrade_from: Mutex::new(None),
            groups_applied: AtomicU64::new(0),
            bucket_cleanup: Mutex::new(None),
            purge_scan: Mutex::new(None),
        };
        store.check_format(existed, expected.run)?;
        if !existed {
            // New files and directories need their directory entries on disk too.
            sync_dir(sled_dir)?;
            sync_dir(dir)?;
        }
        let last_run = store.read_meta_u64(keys::META_RUN)?;
        let found = probe::Marker {
            format: FORMAT_VERSION,
            run: last_run,
            seq: store.read_meta_u64(keys::META_SEQ)?,
            db_bytes: 0,
        };
        if let Some(lost) = probe::lost("it opened", &found, expected) {
            return Err(Error::Damaged {
                path: Some(dir.to_path_buf()),
                detail: format!(
                    "{lost}; the storage engine may have rewritten part of its files while \
                     reading them"
                ),
            });
        }
        store.run_id = last_run + 1;
        store.db.insert(
            keys::META_RUN,
            codec::encode(RecordKind::Meta, &store.run_id)?,
        )?;
        store.replay_write_ahead()?;
        let applied = store.replay_log(log)?;
        let migrate = store.upgrade()?;
        *store.last_seq.lock() = store.read_meta_u64(keys::META_SEQ)?;
        store.load_counters()?;
        store.load_paused()?;
        // sled now holds every record of the log: make it durable (blob files too), then start
        // an empty log.
        store.db.flush()?;
        store.db.sync_data_file()?;
        let mut blobs = HashSet::new();
        sync_new_blobs(sled_dir, &mut blobs)?;
        let wal = Arc::new(Wal::start(dir, applied + 1, opts.wal_segment_bytes)?);
        if let Some(found) = migrate {
            // Only now: no format-3 log record is left to be replayed onto format-4 records.
            store.migrate_to_4(found)?;
            sync_new_blobs(sled_dir, &mut blobs)?;
        }
        let ckpt = Arc::new(Checkpoint {
            dir: dir.to_path_buf(),
            db: store.db.clone(),
            run_lock: Mutex::new(()),
            prune_floor: AtomicU64::new(u64::MAX),
            wal,
            applied: AtomicU64::new(applied),
            synced_blobs: Mutex::new(blobs),
            failed: Mutex::new(None),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            bytes: opts.checkpoint_bytes.max(1),
            every: opts.checkpoint_every,
            sync_every: opts.flush_every_ms.map(Duration::from_millis),
        });
        let thread = ckpt.clone();
        store.checkpointer = Some(
            std::thread::Builder::new()
                .name("omniq-checkpoint".into())
                .spawn(move || thread.thread())
                .map_err(|e| open_err(format!("cannot start the checkpoint thread: {e}")))?,
        );
        store.ckpt = Some(ckpt);
        // The watermark: this run's start is durable in sled. (For a format-1 store from before
        // the marker, this is where it gains one.)
        store.write_watermark()?;
        store.opened = true;
        Ok(store)
    }

    /// Stops the checkpoint thread (at close) and waits for it.
    fn stop_checkpointer(&mut self) {
        if let Some(c) = &self.ckpt {
            *c.stop.lock() = true;
            c.wake.notify_all();
        }
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
    }

    /// Applies the log records sled lacks (see `wal.rs`), each as one batch with its `m/wal`,
    /// in order. Returns the last record sled then holds (the next one appended follows it).
    fn replay_log(&self, log: Vec<(u64, Vec<Op>)>) -> Result<u64> {
        let applied = self.read_meta_u64(keys::META_WAL)?;
        let last_in_log = log.last().map_or(0, |r| r.0);
        let records = wal::unapplied(&self.dir, log, applied)?;
        let n = records.len();
        for (lsn, ops) in records {
            hook::reached("wal-replay");
            self.apply_atomically(with_lsn(ops, lsn)?)?;
        }
        if n > 0 {
            tracing::info!(records = n, path = %self.dir.display(), "replayed the write-ahead log");
        }
        Ok(applied.max(last_in_log))
    }

    /// Runs a checkpoint now, on the caller's thread (the power-loss test).
    #[cfg(test)]
    pub(crate) fn checkpoint_now(&self) -> Result<()> {
        self.ckpt()?.run(false).map(|_| ())
    }

    /// sled `flush()` + `fsync` without a checkpoint's log deletion: sled's files get ahead of
    /// the log's last sync, as the kernel writing sled's pages back on its own would make them
    /// (the power-loss test).
    #[cfg(test)]
    pub(crate) fn flush_sled_now(&self) -> Result<()> {
        self.db.flush()?;
        self.db.sync_data_file()?;
        Ok(())
    }

    /// The log's durable image (see [`Wal::durable_image`]).
    #[cfg(test)]
    pub(crate) fn wal_image(&self) -> Vec<(PathBuf, u64, u64)> {
        self.ckpt()
            .map(|c| c.wal.durable_image())
            .unwrap_or_default()
    }

    /// The store directory.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn ckpt(&self) -> Result<&Checkpoint> {
        self.ckpt
            .as_deref()
            .ok_or_else(|| Error::Storage("the store is not open".into()))
    }

    /// Appends a group's key writes to the log, then applies them to sled as one batch with
    /// `m/wal`. Not durable until [`sync`](Store::sync).
    fn apply_logged(&self, ops: Vec<Op>) -> Result<()> {
        let _writing = self.write_lock.lock();
        let ckpt = self.ckpt()?;
        hook::reached("wal-append");
        let lsn = ckpt.wal.append(&ops)?;
        self.apply_atomically(with_lsn(ops, lsn)?)?;
        ckpt.applied.store(lsn, Ordering::Release);
        if ckpt.wal.since_checkpoint() >= ckpt.bytes {
            ckpt.wake.notify_one();
        }
        Ok(())
    }

    /// Records in the marker this run and the length of sled's data file (see `probe.rs`).
    fn write_watermark(&self) -> Result<()> {
        probe::write_marker(
            &self.dir,
            &probe::Marker {
                format: FORMAT_VERSION,
                run: self.run_id,
                seq: *self.last_seq.lock(),
                db_bytes: self.db.data_len()?,
            },
        )
    }

    fn check_format(&self, existed: bool, expected_run: u64) -> Result<()> {
        match self.db.get(keys::META_FORMAT)? {
            Some(bytes) => {
                let found: u32 = codec::decode(RecordKind::Meta, &bytes, &|| "m/format".into())?;
                if found > FORMAT_VERSION {
                    return Err(Error::FormatTooNew {
                        path: self.dir.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                if found < FORMAT_VERSION {
                    *self.upgrade_from.lock() = Some(found);
                }
                Ok(())
            }
            None if expected_run > 0 => Err(Error::Damaged {
                path: Some(self.dir.clone()),
                detail: "what the storage engine can read of it holds none of the queue's data \
                         (the end of its data file is missing, or the file was replaced); the \
                         storage engine may have rewritten part of its files while reading them"
                    .into(),
            }),
            None if self.db.is_empty() || !existed => {
                self.db.insert(
                    keys::META_FORMAT,
                    codec::encode(RecordKind::Meta, &FORMAT_VERSION)?,
                )?;
                Ok(())
            }
            None => Err(Error::Damaged {
                path: Some(self.dir.clone()),
                detail: "it has omniq's marker, but its database holds data without omniq's \
                         format version (part of the data file is missing, or another program \
                         wrote into it)"
                    .into(),
            }),
        }
    }

    /// Format 1 or 2 -> 3 (after any interrupted commit group is replayed): from format 1,
    /// builds the pending-by-kind index for the tasks already pending. Returns the format found
    /// when the store still needs [`migrate_to_4`](SledStore::migrate_to_4), which writes the
    /// new version; until it is written (and checkpointed) an interrupted upgrade is redone.
    fn upgrade(&self) -> Result<Option<u32>> {
        let Some(found) = self.upgrade_from.lock().take() else {
            return Ok(None);
        };
        if found < 2 {
            let n = self.backfill_kind_index()?;
            tracing::info!(pending = n, path = %self.dir.display(), "built the pending-by-kind index");
        }
        Ok(Some(found))
    }

    /// Format 3 -> 4 (see [`FORMAT_VERSION`]), once sled holds the replayed log durably and the
    /// log is empty: the marker says 4 first, then every task is converted, then `m/format`
    /// is written and sled checkpointed.
    fn migrate_to_4(&self, found: u32) -> Result<()> {
        self.write_watermark()?;
        let n = super::format4::migrate(&self.db.handle())?;
        self.db.insert(
            keys::META_FORMAT,
            codec::encode(RecordKind::Meta, &FORMAT_VERSION)?,
        )?;
        self.db.flush()?;
        self.db.sync_data_file()?;
        tracing::info!(from = found, to = FORMAT_VERSION, tasks = n, path = %self.dir.display(), "upgraded the on-disk format");
        Ok(())
    }

    fn read_meta_u64(&self, key: &[u8]) -> Result<u64> {
        match self.db.get(key)? {
            Some(bytes) => codec::decode(RecordKind::Meta, &bytes, &|| keys::describe(key)),
            None => Ok(0),
        }
    }

    fn load_paused(&self) -> Result<()> {
        let mut set = BTreeSet::new();
        for item in self.db.scan_prefix([keys::PAUSED]).keys() {
            set.insert(keys::decode_paused(&item?)?);
        }
        *self.paused.lock() = set;
        Ok(())
    }

    fn load_counters(&self) -> Result<()> {
        let mut map = BTreeMap::new();
        for item in self.db.scan_prefix([keys::COUNT]) {
            let (k, v) = item?;
            let (status, queue) = keys::decode_count(&k)?;
            let n = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::Corrupt {
                what: "counter",
                key: format!("c/{status}/{queue}"),
                reason: format!("{} bytes, expected 8", v.len()),
            })?);
            map.insert((queue, status), n);
        }
        *self.counters.lock() = map;
        Ok(())
    }

    /// Writes a group to sled atomically with respect to crashes. The whole group is first stored
    /// as one value under a `w` (write-ahead) key, then applied key by key, then the `w` key is
    /// removed. sled recovers its log as a prefix, so after a crash either the `w` entry survives
    /// (and [`replay_write_ahead`](SledStore::replay_write_ahead) re-applies the group at the
    /// next open) or its removal survived, and with it every write before it.
    ///
    /// Why not always `apply_batch`: sled 0.34.7's `apply_batch` rolls its I/O buffer before and
    /// after the batch (`pin_log`), i.e. two synchronous writebacks (`pwrite` +
    /// `sync_file_range` each, ~125 us apiece here) on the writer thread for every group, which
    /// would cost more than the log's `fdatasync`. Groups over `WRITE_AHEAD_MAX_BYTES` (an
    /// `enqueue_many`) still use one `apply_batch`, where the writebacks are amortized over many
    /// tasks and a large copy would cost more.
    fn apply_atomically(&self, ops: Vec<Op>) -> Result<()> {
        let bytes: usize = ops
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        if bytes > WRITE_AHEAD_MAX_BYTES {
            let mut batch = sled::Batch::default();
            for (k, v) in ops {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
            }
            self.db.apply_batch(batch)?;
            return Ok(());
        }
        let id = {
            let mut n = self.write_ahead_counter.lock();
            *n += 1;
            *n
        };
        let key = keys::write_ahead(id);
        self.db
            .insert(&key, codec::encode(RecordKind::WriteAhead, &ops)?)?;
        apply_ops(&self.db, &ops)?;
        self.db.remove(&key)?;
        Ok(())
    }

    /// Re-applies commit groups whose application a crash interrupted, oldest first (see
    /// [`apply_atomically`](SledStore::apply_atomically); format 2 wrote every group this way).
    fn replay_write_ahead(&self) -> Result<usize> {
        let mut replayed = 0;
        for item in self.db.scan_prefix([keys::WRITE_AHEAD]) {
            let (k, v) = item?;
            let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                codec::decode(RecordKind::WriteAhead, &v, &|| keys::describe(&k))?;
            apply_ops(&self.db, &ops)?;
            self.db.remove(&k)?;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::warn!(
                groups = replayed,
                "re-applied commit groups interrupted by a crash"
            );
        }
        Ok(replayed)
    }

    /// Every key write a group of changes makes: records, index entries, log entries, the
    /// counters it touches and the sequence number; with the counters as they will be after.
    fn write_set(&self, changes: &[Change], last_seq: u64) -> Result<(WriteSet, Counters)> {
        let mut batch = WriteSet::default();
        let mut counters = self.counters.lock().clone();
        let mut touched: HashSet<(String, Status)> = HashSet::new();
        // Records as this group leaves them (a task changed twice appends to its first write).
        let mut records: HashMap<TaskId, Option<Vec<u8>>> = HashMap::new();
        let mut buckets = format4::Buckets::default();
        // One handle for the group's reads (only this thread writes, so every generation a
        // compaction may switch to meanwhile holds the same data).
        let db = self.db.handle();
        let cleanup = self.bucket_cleanup.lock().take();
        if let Some((seen, cutoff)) = cleanup {
            // Before this group's finishes: one of them may land in such a minute again.
            if seen == self.groups_applied.load(Ordering::Acquire) {
                for minute in format4::stale_buckets(&db, cutoff)? {
                    batch.remove(keys::finish_bucket(minute));
                    buckets.removed(minute);
                }
            }
        }
        for ch in changes {
            if let Some(b) = &ch.before {
                for k in Self::index_keys(b) {
                    batch.remove(k);
                }
                let key = (b.queue.clone(), b.status);
                let n = counters.entry(key.clone()).or_insert(0);
                *n = n.saturating_sub(1);
                touched.insert(key);
            }
            match &ch.after {
                Some(a) => {
                    let key = keys::task(a.id);
                    let old = match records.remove(&a.id) {
                        Some(v) => v,
                        None if ch.before.is_some() => db.get(&key)?.map(|v| v.to_vec()),
                        None => None,
                    };
                    let entry = ch.log.as_ref().filter(|e| e.task_id == a.id);
                    let value = record::append(old.as_deref(), a, entry, &|| keys::describe(&key))?;
                    batch.insert(key, value.clone());
                    records.insert(a.id, Some(value));
                    for k in Self::index_keys(a) {
                        batch.insert(k, Vec::new());
                    }
                    if let Some(minute) = format4::finishes(ch.before.as_ref(), a) {
                        if let Some(v) = buckets.raise(&db, minute, a.id)? {
                            batch.insert(keys::finish_bucket(minute), v);
                        }
                        if let (Some(scan), Some(at)) =
                            (self.purge_scan.lock().as_mut(), a.finished_at)
                        {
                            scan.floor = scan.floor.min(at.0);
                        }
                    }
                    let key = (a.queue.clone(), a.status);
                    *counters.entry(key.clone()).or_insert(0) += 1;
                    touched.insert(key);
                }
                None => {
                    if let Some(b) = &ch.before {
                        batch.remove(keys::task(b.id));
                        records.insert(b.id, None);
                    }
                }
            }
            for w in &ch.side {
                side_write(&mut batch, w)?;
            }
        }
        for (queue, status) in &touched {
            let key = keys::count(*status, queue);
            match counters
                .get(&(queue.clone(), *status))
                .copied()
                .unwrap_or(0)
            {
                0 => {
                    counters.remove(&(queue.clone(), *status));
                    batch.remove(key);
                }
                n => batch.insert(key, n.to_be_bytes().to_vec()),
            }
        }
        batch.insert(keys::META_SEQ, codec::encode(RecordKind::Meta, &last_seq)?);
        Ok((batch, counters))
    }

    fn decode_task(key: &[u8], bytes: &[u8]) -> Result<TaskInfo> {
        record::decode_task(bytes, &|| keys::describe(key))
    }

    /// A task's index keys by state: `Pending` has `s p k`, `Running`, `Failed` and
    /// `Cancelled` have `s`, `Completed` none (format 4: its record is its only key).
    fn index_keys(t: &TaskInfo) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(3);
        if t.status != Status::Completed {
            out.push(keys::state(t.status, t.id));
        }
        if t.status == Status::Pending {
            out.push(keys::pending(&t.queue, t.priority, t.next_run_at, t.id));
            out.push(keys::kind_pending(
                &t.kind,
                &t.queue,
                t.priority,
                t.next_run_at,
                t.id,
            ));
        }
        out
    }

    fn each_log(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        let key = keys::task(id);
        match self.db.get(&key)? {
            Some(v) => record::decode_log(id, &v, &|| keys::describe(&key)),
            None => Ok(Vec::new()),
        }
    }

    /// The due tasks of one queue: walks its priority buckets best first; within a bucket keys
    /// are in due-time order, so each bucket costs one seek plus the due keys taken.
    fn due_in_queue(
        &self,
        queue: &str,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
        scan: &mut DueScan,
    ) -> Result<Vec<DueTask>> {
        self.walk_buckets(
            &keys::pending_queue_prefix(queue),
            &keys::decode_pending,
            None,
            now,
            limit,
            skip,
            scan,
        )
    }

    /// The walk both pending indexes share. Keys under `qprefix` are `qprefix prio(1)
    /// next_run(8) id(16)`: buckets best priority first, due-time order inside one. Takes the
    /// due keys of each bucket and jumps past the rest of it with one seek at the first key not
    /// yet due (noting its time in `scan.next_wake`).
    #[allow(clippy::too_many_arguments)]
    fn walk_buckets(
        &self,
        qprefix: &[u8],
        decode: &dyn Fn(&[u8]) -> Result<keys::PendingKey>,
        kind: Option<&str>,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
        scan: &mut DueScan,
    ) -> Result<Vec<DueTask>> {
        let mut end = qprefix.to_vec();
        end.push(0xff);
        end.push(0xff);
        let bucket_prefix = |pb: u8| {
            let mut k = qprefix.to_vec();
            k.push(pb);
            k
        };
        let mut found = Vec::new();
        let mut start = qprefix.to_vec();
        'buckets: loop {
            let mut iter = self.db.range(start.clone()..end.clone());
            let mut bucket: Option<i8> = None;
            loop {
                let Some(item) = iter.next() else {
                    break 'buckets;
                };
                let (k, _) = item?;
                let pk = decode(&k)?;
                if bucket.is_some_and(|b| b != pk.priority) {
                    // Entered the next bucket while collecting: continue from here.
                    start = k.to_vec();
                    continue 'buckets;
                }
                bucket = Some(pk.priority);
                if pk.next_run > now {
                    scan.next_wake =
                        Some(scan.next_wake.map_or(pk.next_run, |w| w.min(pk.next_run)));
                    let pb = keys::priority_byte(pk.priority);
                    if pb == u8::MAX {
                        break 'buckets;
                    }
                    start = bucket_prefix(pb + 1);
                    continue 'buckets;
                }
                if !skip.contains(&pk.id) {
                    found.push(DueTask {
                        id: pk.id,
                        queue: pk.queue.clone(),
                        kind: kind.map(str::to_string),
                        priority: pk.priority,
                        next_run: pk.next_run,
                    });
                    if found.len() >= limit {
                        break 'buckets;
                    }
                }
            }
        }
        Ok(found)
    }
}

impl SledStore {
    /// [`due_in_queue`](SledStore::due_in_queue) for one (kind, queue) of the pending-by-kind
    /// index.
    fn due_in_kind_queue(
        &self,
        kind: &str,
        queue: &str,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
        scan: &mut DueScan,
    ) -> Result<Vec<DueTask>> {
        self.walk_buckets(
            &keys::kind_queue_prefix(kind, queue),
            &|k: &[u8]| keys::decode_kind_pending(k).map(|(_, pk)| pk),
            Some(kind),
            now,
            limit,
            skip,
            scan,
        )
    }

    /// The distinct names under `prefix` (kinds, or queues within a kind): one seek each,
    /// whatever the number of entries. `name_at` reads the length-prefixed name right after
    /// `prefix` in a key.
    fn names_under(&self, prefix: &[u8]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut from = prefix.to_vec();
        loop {
            let Some(item) = self.db.range(from.clone()..prefix_end(prefix)).next() else {
                return Ok(out);
            };
            let (k, _) = item?;
            let rest = &k[prefix.len()..];
            let Some((&len, tail)) = rest.split_first() else {
                return Err(Error::Corrupt {
                    what: "pending-by-kind key",
                    key: keys::describe(&k),
                    reason: "too short".into(),
                });
            };
            let name = tail.get(..len as usize).ok_or_else(|| Error::Corrupt {
                what: "pending-by-kind key",
                key: keys::describe(&k),
                reason: "name runs past the key".into(),
            })?;
            let name_str = std::str::from_utf8(name).map_err(|_| Error::Corrupt {
                what: "pending-by-kind key",
                key: keys::describe(&k),
                reason: "name is not UTF-8".into(),
            })?;
            out.push(name_str.to_string());
            // Past every key with this name: the prefix, the length, the name, then 0xff...
            let mut next = prefix.to_vec();
            next.push(len);
            next.extend_from_slice(name);
            from = prefix_end_full(&next);
        }
    }

    /// Format 1 -> 2: builds the pending-by-kind index for the tasks already `Pending`.
    /// Idempotent; runs before `m/format` says 2, so an interrupted upgrade is redone.
    fn backfill_kind_index(&self) -> Result<usize> {
        let mut n = 0;
        for item in self
            .db
            .scan_prefix(keys::state_prefix(Status::Pending))
            .keys()
        {
            let (_, id) = keys::decode_state(&item?)?;
            let key = keys::task(id);
            if let Some(v) = self.db.get(&key)? {
                // Usually still a format-1 record: the migration to format 4 runs after this.
                let t: TaskInfo = if record::is_record(&v) {
                    record::decode_task(&v, &|| keys::describe(&key))?
                } else {
                    codec::decode(RecordKind::Task, &v, &|| keys::describe(&key))?
                };
                self.db.insert(
                    keys::kind_pending(&t.kind, &t.queue, t.priority, t.next_run_at, t.id),
                    Vec::<u8>::new(),
                )?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl SledStore {
    /// The limits and counted starts that decode, and an error for each record that does not
    /// (one bad record must not keep the queue from opening).
    fn limit_state_checked(&self) -> Result<(LimitState, Vec<Error>)> {
        let mut state = LimitState::default();
        let mut bad = Vec::new();
        for item in self.db.scan_prefix([keys::LIMIT]) {
            let (k, v) = item?;
            let decoded = keys::decode_limit(&k).and_then(|scope| {
                codec::decode(RecordKind::Limit, &v, &|| keys::describe(&k)).map(|l| (scope, l))
            });
            match decoded {
                Ok(entry) => state.limits.push(entry),
                Err(e) => bad.push(e),
            }
        }
        for item in self.db.scan_prefix([keys::RATE_START]).keys() {
            match keys::decode_rate_start(&item?) {
                Ok(start) => state.starts.push(start),
                Err(e) => bad.push(e),
            }
        }
        Ok((state, bad))
    }

    /// The schedules that decode, and an error for each record that does not.
    fn schedules_checked(&self) -> Result<(Vec<ScheduleInfo>, Vec<Error>)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for item in self.db.scan_prefix([keys::SCHEDULE]) {
            let (k, v) = item?;
            match codec::decode(RecordKind::Schedule, &v, &|| keys::describe(&k)) {
                Ok(s) => out.push(s),
                Err(e) => bad.push(e),
            }
        }
        Ok((out, bad))
    }
}

/// The smallest key greater than every key starting with `prefix`, for any prefix (a trailing
/// 0xff is carried).
fn prefix_end_full(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

impl SledStore {
    fn commit_inner(&self, changes: &[Change], last_seq: u64, durable: bool) -> Result<()> {
        self.metrics.group_size.observe(changes.len() as f64);
        let (writes, counters) = self.write_set(changes, last_seq)?;
        self.apply_logged(writes.ops)?;
        self.groups_applied.fetch_add(1, Ordering::AcqRel);
        *self.counters.lock() = counters;
        *self.last_seq.lock() = last_seq;
        if durable {
            self.sync()?;
        }
        Ok(())
    }

    fn get_inner(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        let key = keys::task(id);
        match self.db.get(&key)? {
            Some(bytes) => Self::decode_task(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn due_inner(
        &self,
        queues: &QueueSet,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
    ) -> Result<DueScan> {
        let paused = self.paused.lock().clone();
        let names: Vec<String> = match queues {
            // A paused queue's tasks are not due: they wait, and nothing is charged.
            QueueSet::Named(names) => names
                .iter()
                .filter(|q| !paused.contains(*q))
                .cloned()
                .collect(),
            // Only queues that have pending work, from the counters.
            QueueSet::All => self
                .counters
                .lock()
                .iter()
                .filter(|((q, s), n)| *s == Status::Pending && **n > 0 && !paused.contains(q))
                .map(|((q, _), _)| q.clone())
                .collect(),
        };
        let mut scan = DueScan::default();
        let mut all = Vec::new();
        for q in names {
            let found = self.due_in_queue(&q, now, limit, skip, &mut scan)?;
            all.extend(found);
        }
        all.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.next_run.cmp(&b.next_run))
                .then(a.id.cmp(&b.id))
        });
        all.truncate(limit);
        scan.ready = all;
        Ok(scan)
    }

    fn due_by_kind_inner(
        &self,
        queues: &QueueSet,
        skip_queues: &HashSet<String>,
        skip_kinds: &HashSet<String>,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
    ) -> Result<DueScan> {
        let mut scan = DueScan::default();
        let mut all = Vec::new();
        // A paused queue's tasks are not due here either.
        let paused = self.paused.lock().clone();
        for kind in self.names_under(&[keys::KIND_PENDING])? {
            if skip_kinds.contains(&kind) {
                continue;
            }
            let queues_of_kind = match queues {
                QueueSet::All => self.names_under(&keys::kind_prefix(&kind))?,
                QueueSet::Named(v) => v.clone(),
            };
            for q in queues_of_kind {
                if skip_queues.contains(&q) || paused.contains(&q) {
                    continue;
                }
                all.extend(self.due_in_kind_queue(&kind, &q, now, limit, skip, &mut scan)?);
            }
        }
        all.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.next_run.cmp(&b.next_run))
                .then(a.id.cmp(&b.id))
        });
        all.truncate(limit);
        scan.ready = all;
        Ok(scan)
    }

    fn ids_in_state_inner(&self, status: Status) -> Result<Vec<TaskId>> {
        let mut out = Vec::new();
        if status == Status::Completed {
            // No state index for them (format 4): read the records (nothing in the engine asks
            // for these; kept correct for the trait).
            for item in self.db.scan_prefix([keys::TASK]) {
                let (k, v) = item?;
                if Self::decode_task(&k, &v)?.status == Status::Completed {
                    out.push(keys::decode_task(&k)?);
                }
            }
            return Ok(out);
        }
        for item in self.db.scan_prefix(keys::state_prefix(status)).keys() {
            let k = item?;
            out.push(keys::decode_state(&k)?.1);
        }
        Ok(out)
    }

    /// Newest first. A status other than `Completed` reads its state index; `Completed` (which
    /// has none, format 4) and no status scan the task records backwards, decoding each, so
    /// listing completed tasks costs the records newer than the page's last one (all of them
    /// when few are completed), and a record that does not decode anywhere on that range is
    /// reported in the page.
    fn list_inner(&self, filter: &ListFilter) -> Result<Page> {
        let limit = filter.effective_limit();
        // Newest first: scan backwards from just below the cursor (or the prefix's end).
        let by_index = filter.status.filter(|st| *st != Status::Completed);
        let prefix = match by_index {
            Some(st) => keys::state_prefix(st),
            None => vec![keys::TASK],
        };
        let high = match filter.cursor {
            Some(c) => [prefix.as_slice(), c.as_bytes()].concat(),
            None => prefix_end(&prefix),
        };
        let low = prefix;
        let mut page = Page {
            tasks: Vec::new(),
            next_cursor: None,
            corrupt: Vec::new(),
        };
        for item in self.db.range(low..high).rev() {
            let (k, v) = item?;
            let (id, record) = if by_index.is_some() {
                let (_, id) = keys::decode_state(&k)?;
                let tkey = keys::task(id);
                match self.db.get(&tkey)? {
                    Some(bytes) => (id, Self::decode_task(&tkey, &bytes)),
                    None => continue,
                }
            } else {
                (keys::decode_task(&k)?, Self::decode_task(&k, &v))
            };
            match record {
                Ok(t) if filter.matches(&t) => page.tasks.push(t),
                Ok(_) => {}
                Err(e) => page.corrupt.push(CorruptEntry {
                    key: keys::describe(&keys::task(id)),
                    reason: e.to_string(),
                }),
            }
            if page.tasks.len() >= limit {
                page.next_cursor = Some(id);
                break;
            }
        }
        Ok(page)
    }

    fn history_inner(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        self.each_log(id)
    }

    /// Terminal tasks finished before `cutoff`, read through the finish buckets (see
    /// `format4.rs`). A batch of a purge in progress (same cutoff and limit as the previous,
    /// full, batch) continues after the previous batch's last id ([`format4::PurgeScan`]).
    ///
    /// A scan that found none, having covered every record up to the bound (this call, or this
    /// purge's batches with no earlier finish since it began), means every bucket whose minute
    /// is wholly before `cutoff` is empty: the next commit group removes them, if no group was
    /// applied while this scan ran (a preview scans beside the writer; a task finished in the
    /// meantime could be in one).
    fn finished_before_inner(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
        let seen = self.groups_applied.load(Ordering::Acquire);
        let resume = {
            let mut scan = self.purge_scan.lock();
            match scan.take() {
                Some(s) if s.cutoff == cutoff && s.limit == limit && s.floor >= cutoff.0 => {
                    Some(s.after)
                }
                // Another caller (a preview) leaves a purge's continuation alone.
                Some(s) if s.limit != limit => {
                    *scan = Some(s);
                    None
                }
                _ => None,
            }
        };
        let found = format4::finished_before(&self.db.handle(), cutoff, limit, resume)?;
        match (found.complete, found.last) {
            (false, Some(after)) => {
                *self.purge_scan.lock() = Some(format4::PurgeScan {
                    cutoff,
                    limit,
                    after,
                    floor: u64::MAX,
                });
            }
            _ if found.ids.is_empty() && self.groups_applied.load(Ordering::Acquire) == seen => {
                *self.bucket_cleanup.lock() = Some((seen, cutoff));
            }
            _ => {}
        }
        Ok(found.ids)
    }

    fn check_inner(&self) -> Result<ConsistencyReport> {
        check_all(self)
    }

    fn size_on_disk_inner(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()? + self.ckpt()?.wal.bytes_on_disk())
    }

    fn sync_inner(&self) -> Result<()> {
        let ckpt = self.ckpt()?;
        if let Some(reason) = ckpt.failed.lock().clone() {
            return Err(Error::Storage(format!("a checkpoint failed: {reason}")));
        }
        let started = std::time::Instant::now();
        let r = ckpt.wal.sync();
        self.metrics
            .sync_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }
}

impl SledStore {
    /// Rewrites the store into a fresh sled generation and switches to it (see `compact.rs`).
    ///
    /// 1. **Copy, commits running.** Under the write lock (a moment), note the last log record
    ///    applied, `a0`, and forbid checkpoints to delete any later record; then copy every key
    ///    but the transient write-ahead entries (`w`) into `sled.<n+1>/` while commits go on.
    ///    The copy is not a point-in-time image, but every key it read stale was written by a
    ///    record after `a0`.
    /// 2. **Catch up and switch, commits held.** Under the write lock and the checkpoint lock:
    ///    read the log records after `a0` back and apply them to the copy in order (absolute
    ///    puts and removes, each with its `m/wal`), so the copy equals the source, `m/wal`
    ///    included (checked; in debug builds, key by key). Flush and fsync it with its
    ///    directory; suspend the marker's length check; switch the pointer (rename + directory
    ///    fsync); replace the live handle; rewrite the watermark; prune the log segments the
    ///    new generation holds.
    /// 3. **Commits resume**, then the old generation's files are deleted once sled let go of
    ///    them. Readers run throughout (each call uses the generation current then).
    ///
    /// A group applied but not yet synced is copied too (an unacknowledged group may survive
    /// whole, as with any crash). One compaction at a time.
    pub(crate) fn compact(&self) -> Result<compact::Compacted> {
        let _one = self.compact_lock.lock();
        let started = Instant::now();
        let ckpt = self.ckpt()?;
        let mut out = compact::Compacted {
            bytes_before: self.size_on_disk_inner()?,
            ..Default::default()
        };
        let usable = || -> Result<()> {
            if let Some(reason) = ckpt.failed.lock().clone() {
                return Err(Error::Storage(format!("a checkpoint failed: {reason}")));
            }
            if self.sync_failed.load(Ordering::SeqCst) {
                return Err(Error::Storage(
                    "an earlier sync failed; reopen the queue before compacting".into(),
                ));
            }
            Ok(())
        };
        usable()?;
        // Phase 1.
        let (a0, source, number) = {
            let _writes = self.write_lock.lock();
            let a0 = ckpt.applied.load(Ordering::Acquire);
            ckpt.prune_floor.store(a0, Ordering::Release);
            (a0, self.db.handle(), self.db.layout().number + 1)
        };
        let _floor = PruneFloor(&ckpt.prune_floor);
        let new_dir = self.dir.join(compact::generation_name(number));
        // A generation an earlier attempt of this process left half-written.
        if !compact::remove_generation_dir(&new_dir)? {
            return Err(Error::Storage(format!(
                "cannot compact: {} holds files omniq did not create",
                new_dir.display()
            )));
        }
        std::fs::create_dir(&new_dir)?;
        hook::reached("compact-start");
        let (cache_bytes, flush_every_ms) = self.sled_opts;
        let target = probe::open_quietly(super::sled_config::config(
            &new_dir,
            cache_bytes,
            flush_every_ms,
        ))
        .unwrap_or(Err(sled::Error::Corruption { at: None, bt: () }))?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0usize;
        for item in source.iter() {
            let (k, v) = item?;
            if k.first() == Some(&keys::WRITE_AHEAD) {
                // A group being applied: its record is after `a0` and is replayed below.
                continue;
            }
            out.keys_copied += 1;
            out.live_bytes += (k.len() + v.len()) as u64;
            batch.insert(k, v);
            in_batch += 1;
            if in_batch == COMPACT_BATCH_KEYS {
                target.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
                hook::reached("compact-copy");
            }
        }
        target.apply_batch(batch)?;
        // Written out and synced now, so the flush and fsync under the lock write only what
        // the catch-up changes.
        target.flush()?;
        File::open(new_dir.join("db"))?.sync_all()?;
        // Phase 2.
        let (old, a1) = {
            let _writes = self.write_lock.lock();
            let paused = Instant::now();
            let _checkpoint = ckpt.run_lock.lock();
            usable()?;
            let a1 = ckpt.applied.load(Ordering::Acquire);
            if a1 > a0 {
                let mut next = a0 + 1;
                for (lsn, ops) in wal::read_log_from(&self.dir, a0)? {
                    if lsn < next || lsn > a1 {
                        continue;
                    }
                    if lsn != next {
                        break;
                    }
                    let mut b = sled::Batch::default();
                    for (k, v) in with_lsn(ops, lsn)? {
                        match v {
                            Some(v) => b.insert(k, v),
                            None => b.remove(k),
                        }
                    }
                    target.apply_batch(b)?;
                    next += 1;
                }
                if next != a1 + 1 {
                    return Err(Error::Storage(format!(
                        "compaction found log records {} to {a1} incomplete (next {next}); \
                         nothing was switched",
                        a0 + 1
                    )));
                }
            }
            // The copy must now equal the source, or the log would be misapplied.
            for key in [keys::META_WAL, keys::META_SEQ, keys::META_RUN] {
                if target.get(key)? != source.get(key)? {
                    return Err(Error::Storage(format!(
                        "compaction copied {} differently; nothing was switched",
                        keys::describe(key)
                    )));
                }
            }
            if cfg!(debug_assertions) && !same_keys(&source, &target) {
                return Err(Error::Storage(
                    "compaction's copy differs from the store; nothing was switched".into(),
                ));
            }
            target.flush()?;
            let data_file = File::open(new_dir.join("db"))?;
            data_file.sync_all()?;
            // sled's other files (`conf`, its snapshot) must survive a power loss too before the
            // pointer names this generation.
            for entry in std::fs::read_dir(&new_dir)?.flatten() {
                if entry.file_type()?.is_file() {
                    File::open(entry.path())?.sync_all()?;
                }
            }
            let mut blobs = HashSet::new();
            sync_new_blobs(&new_dir, &mut blobs)?;
            sync_dir(&new_dir)?;
            sync_dir(&self.dir)?;
            hook::reached("compact-synced");
            // The marker's `db_bytes` describes the old data file: suspend the length check
            // until the watermark below describes the new one.
            let marker = probe::read_marker(&self.dir)?;
            probe::write_marker(
                &self.dir,
                &probe::Marker {
                    db_bytes: 0,
                    ..marker
                },
            )?;
            // From the rename on, the directory may name the new generation: a failure that
            // leaves it unclear which one a reopen finds poisons the store (like a failed
            // checkpoint), so nothing is acknowledged that only one of them holds.
            let poison = |e: Error| {
                *ckpt.failed.lock() = Some(format!("compaction could not switch: {e}"));
                e
            };
            compact::write_pointer(&self.dir, number).map_err(poison)?;
            hook::reached("compact-switched");
            let old = self.db.replace(Generation {
                db: target,
                data_file,
                layout: compact::Layout {
                    number,
                    dir: new_dir,
                },
            });
            *ckpt.synced_blobs.lock() = blobs;
            if let Err(e) = self.write_watermark() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot update the OMNIQ marker after a compaction");
            }
            // The current log segment holds records the new generation has: start another,
            // so the prune below can delete it too.
            if let Err(e) = ckpt.wal.rotate() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot start a new log segment after a compaction; the next checkpoint deletes the old one");
            }
            out.write_pause = paused.elapsed();
            out.generation = number;
            (old, a1)
        };
        // The new generation durably holds every record up to `a1`: those segments can go (as
        // a checkpoint would delete them; a failure here is one).
        if let Err(e) = ckpt.wal.prune(a1, false) {
            *ckpt.failed.lock() = Some(format!("compaction could not prune the log: {e}"));
            return Err(e);
        }
        drop(source);
        let old_layout = old.layout.clone();
        drop(old);
        // The switch is done: old files that cannot go now are a leftover the next open removes.
        if let Err(e) =
            compact::remove_old_generation(&self.dir, &old_layout, Duration::from_secs(10))
        {
            tracing::warn!(dir = %old_layout.dir.display(), error = %e, "cannot delete the old sled generation; the next open removes it");
        }
        out.bytes_after = self.size_on_disk_inner()?;
        out.duration = started.elapsed();
        tracing::info!(
            dir = %self.dir.display(),
            before = out.bytes_before,
            after = out.bytes_after,
            keys = out.keys_copied,
            generation = out.generation,
            pause_ms = out.write_pause.as_millis() as u64,
            "compacted the store"
        );
        Ok(out)
    }
}

/// Whether `copy` holds exactly the keys and values of `source`, write-ahead entries aside (a
/// compaction's check in debug builds).
fn same_keys(source: &sled::Db, copy: &sled::Db) -> bool {
    let mut a = source
        .iter()
        .filter(|i| !matches!(i, Ok((k, _)) if k.first() == Some(&keys::WRITE_AHEAD)));
    let mut b = copy.iter();
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(Ok(x)), Some(Ok(y))) if x == y => {}
            _ => return false,
        }
    }
}

/// Lifts a compaction's hold on log pruning when it ends, however it ends.
struct PruneFloor<'a>(&'a AtomicU64);

impl Drop for PruneFloor<'_> {
    fn drop(&mut self) {
        self.0.store(u64::MAX, Ordering::Release);
    }
}

/// Keys per batch a compaction writes into the new generation.
const COMPACT_BATCH_KEYS: usize = 4096;

/// Every storage error leaving the store names the queue directory (see [`Error::in_dir`]).
impl Store for SledStore {
    fn commit(&self, changes: &[Change], last_seq: u64, durable: bool) -> Result<()> {
        self.commit_inner(changes, last_seq, durable)
            .map_err(|e| e.in_dir(&self.dir))
    }

    fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        self.get_inner(id).map_err(|e| e.in_dir(&self.dir))
    }

    fn due(
        &self,
        queues: &QueueSet,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
    ) -> Result<DueScan> {
        self.due_inner(queues, now, limit, skip)
            .map_err(|e| e.in_dir(&self.dir))
    }

    fn due_by_kind(
        &self,
        queues: &QueueSet,
        skip_queues: &HashSet<String>,
        skip_kinds: &HashSet<String>,
        now: Timestamp,
        limit: usize,
        skip: &HashSet<TaskId>,
    ) -> Result<DueScan> {
        self.due_by_kind_inner(queues, skip_queues, skip_kinds, now, limit, skip)
    }

    fn due_count_of_kind(&self, kind: &str, now: Timestamp, limit: usize) -> Result<usize> {
        let paused = self.paused.lock().clone();
        let mut scan = DueScan::default();
        let mut n = 0;
        for q in self.names_under(&keys::kind_prefix(kind))? {
            if paused.contains(&q) || n >= limit {
                continue;
            }
            n += self
                .due_in_kind_queue(kind, &q, now, limit - n, &HashSet::new(), &mut scan)?
                .len();
        }
        Ok(n)
    }

    fn ids_in_state(&self, status: Status) -> Result<Vec<TaskId>> {
        self.ids_in_state_inner(status)
            .map_err(|e| e.in_dir(&self.dir))
    }

    fn list(&self, filter: &ListFilter) -> Result<Page> {
        self.list_inner(filter).map_err(|e| e.in_dir(&self.dir))
    }

    fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        self.history_inner(id).map_err(|e| e.in_dir(&self.dir))
    }

    fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
        self.finished_before_inner(cutoff, limit)
            .map_err(|e| e.in_dir(&self.dir))
    }

    fn counts(&self) -> BTreeMap<(String, Status), u64> {
        self.counters.lock().clone()
    }

    fn last_seq(&self) -> u64 {
        *self.last_seq.lock()
    }

    fn run_id(&self) -> u64 {
        self.run_id
    }

    fn check(&self) -> Result<ConsistencyReport> {
        self.check_inner().map_err(|e| e.in_dir(&self.dir))
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.size_on_disk_inner().map_err(|e| e.in_dir(&self.dir))
    }

    fn log_bytes(&self) -> u64 {
        self.ckpt().map_or(0, |c| c.wal.bytes_on_disk())
    }

    fn extras(&self, id: TaskId) -> Result<Option<TaskExtras>> {
        let key = keys::extras(id);
        match self.db.get(&key)? {
            Some(v) => codec::decode(RecordKind::Extras, &v, &|| keys::describe(&key)).map(Some),
            None => Ok(None),
        }
    }

    fn unique_holder(&self, digest: &[u8; 32]) -> Result<Option<TaskId>> {
        let key = keys::unique(digest);
        match self.db.get(&key)? {
            Some(v) => keys::decode_holder(&key, &v).map(Some),
            None => Ok(None),
        }
    }

    fn has_extras(&self) -> Result<bool> {
        Ok(self.db.scan_prefix([keys::EXTRAS]).next().is_some())
    }

    fn limit_state(&self) -> Result<LimitState> {
        let (state, bad) = self.limit_state_checked()?;
        for e in bad {
            tracing::error!(error = %e, "a limit record does not decode; it is not enforced (omniq check lists it)");
        }
        Ok(state)
    }

    fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        let (out, bad) = self.schedules_checked()?;
        for e in bad {
            tracing::error!(error = %e, "a schedule record does not decode; it does not fire (omniq check lists it)");
        }
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        self.sync_inner().map_err(|e| {
            self.sync_failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            e.in_dir(&self.dir)
        })
    }

    fn metrics(&self) -> Option<&crate::histogram::StoreMetrics> {
        Some(&self.metrics)
    }

    fn compact(&self) -> Result<Option<compact::Compacted>> {
        SledStore::compact(self)
            .map(Some)
            .map_err(|e| e.in_dir(&self.dir))
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        let key = keys::paused(queue);
        if paused {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            self.apply_logged(vec![(key, Some(at.to_be_bytes().to_vec()))])?;
        } else {
            self.apply_logged(vec![(key, None)])?;
        }
        self.sync()?;
        let mut set = self.paused.lock();
        if paused {
            set.insert(queue.to_string());
        } else {
            set.remove(queue);
        }
        Ok(())
    }

    fn paused(&self) -> BTreeSet<String> {
        self.paused.lock().clone()
    }
}

/// The key write of one [`SideWrite`].
fn side_write(batch: &mut WriteSet, w: &SideWrite) -> Result<()> {
    match w {
        SideWrite::Extras { id, extras } => match extras {
            Some(e) => batch.insert(keys::extras(*id), codec::encode(RecordKind::Extras, e)?),
            None => batch.remove(keys::extras(*id)),
        },
        SideWrite::UniqueHold { digest, holder } => match holder {
            Some(id) => batch.insert(keys::unique(digest), id.as_bytes().to_vec()),
            None => batch.remove(keys::unique(digest)),
        },
        SideWrite::RateStart {
            scope,
            at,
            id,
            present,
        } => {
            let k = keys::rate_start(scope, *at, *id);
            if *present {
                batch.insert(k, Vec::new());
            } else {
                batch.remove(k);
            }
        }
        SideWrite::Limit { scope, limit } => match limit {
            Some(l) => batch.insert(keys::limit(scope), codec::encode(RecordKind::Limit, l)?),
            None => batch.remove(keys::limit(scope)),
        },
        SideWrite::Schedule { name, record } => match record {
            Some(r) => batch.insert(
                keys::schedule(name),
                codec::encode(RecordKind::Schedule, r.as_ref())?,
            ),
            None => batch.remove(keys::schedule(name)),
        },
    }
    Ok(())
}

/// The key writes of one commit group, in order (a later write to the same key wins).
#[derive(Default)]
struct WriteSet {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteSet {
    fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }
    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }
}

/// A log record's key writes, then `m/wal` = its number: what sled applies atomically.
fn with_lsn(mut ops: Vec<Op>, lsn: u64) -> Result<Vec<Op>> {
    ops.push((
        keys::META_WAL.to_vec(),
        Some(codec::encode(RecordKind::Meta, &lsn)?),
    ));
    Ok(ops)
}

/// Groups whose writes exceed this many bytes are written to sled with one `apply_batch` instead
/// of a write-ahead entry (see `SledStore::apply_atomically`).
const WRITE_AHEAD_MAX_BYTES: usize = 32 << 10;

fn apply_ops(db: &LiveDb, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<()> {
    for (k, v) in ops {
        match v {
            Some(v) => {
                db.insert(k.as_slice(), v.as_slice())?;
            }
            None => {
                db.remove(k.as_slice())?;
            }
        }
    }
    Ok(())
}

/// The smallest key greater than every key starting with `prefix` (prefixes here never end in
/// 0xff).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    end
}

/// Removes sled snapshot files that were never finished (`snap.*.generating`, see
/// [`SledStore::open`]); returns how many.
fn remove_unfinished_snapshots(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing an unfinished sled snapshot left by a killed process");
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Syncs the blob files sled created that are not in `synced` (sled writes them without fsync),
/// and their directory; adds them to `synced`.
fn sync_new_blobs(dir: &Path, synced: &mut HashSet<OsString>) -> Result<()> {
    let blob_dir = dir.join("blobs");
    let Ok(entries) = std::fs::read_dir(&blob_dir) else {
        return Ok(());
    };
    let mut any = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if synced.contains(&name) {
            continue;
        }
        if let Ok(f) = File::open(entry.path()) {
            f.sync_all()?;
        }
        synced.insert(name);
        any = true;
    }
    if any {
        sync_dir(&blob_dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The index-consistency checker: reads everything and reports every disagreement.
fn check_all(s: &SledStore) -> Result<ConsistencyReport> {
    let mut report = ConsistencyReport::default();
    let mut problems: Vec<String> = Vec::new();
    let mut p = |msg: String| problems.push(msg);
    let mut tasks: HashMap<TaskId, TaskInfo> = HashMap::new();
    let mut logs: HashMap<TaskId, Vec<LogEntry>> = HashMap::new();
    for item in s.db.scan_prefix([keys::TASK]) {
        let (k, v) = item?;
        match keys::decode_task(&k).and_then(|_| record::decode(&v, &|| keys::describe(&k))) {
            Ok((t, log)) => {
                if keys::task(t.id) != k.as_ref() {
                    p(format!(
                        "record at {} holds task {}",
                        keys::describe(&k),
                        t.id
                    ));
                }
                logs.insert(t.id, log);
                tasks.insert(t.id, t);
            }
            Err(e) => p(e.to_string()),
        }
    }
    // State index: exactly one entry per task, matching its status; none for `Completed`.
    let mut states: HashMap<TaskId, Vec<Status>> = HashMap::new();
    for item in s.db.scan_prefix([keys::STATE]).keys() {
        let (st, id) = keys::decode_state(&item?)?;
        states.entry(id).or_default().push(st);
    }
    for (id, t) in &tasks {
        match states.get(id).map(Vec::as_slice) {
            Some([st]) if *st == t.status && t.status != Status::Completed => {}
            None if t.status == Status::Completed => {}
            other => p(format!(
                "task {id} is {} but the state index has {other:?}",
                t.status
            )),
        }
    }
    for id in states.keys() {
        if !tasks.contains_key(id) {
            p(format!("state index names task {id}, which has no record"));
        }
    }
    // Pending index: exactly the Pending tasks, with matching queue/priority/due time.
    let mut pending_seen = HashSet::new();
    for item in s.db.scan_prefix([keys::PENDING]).keys() {
        let pk = keys::decode_pending(&item?)?;
        match tasks.get(&pk.id) {
            Some(t)
                if t.status == Status::Pending
                    && t.queue == pk.queue
                    && t.priority == pk.priority
                    && t.next_run_at == pk.next_run => {}
            Some(t) => p(format!(
                "pending index entry {pk:?} disagrees with task {} ({})",
                t.id, t.status
            )),
            None => p(format!(
                "pending index names task {}, which has no record",
                pk.id
            )),
        }
        if !pending_seen.insert(pk.id) {
            p(format!(
                "task {} has more than one pending index entry",
                pk.id
            ));
        }
    }
    for (id, t) in &tasks {
        if t.status == Status::Pending && !pending_seen.contains(id) {
            p(format!(
                "pending task {id} is missing from the pending index"
            ));
        }
    }
    // Pending-by-kind index: exactly the Pending tasks too, with matching kind and key.
    let mut by_kind_seen = HashSet::new();
    for item in s.db.scan_prefix([keys::KIND_PENDING]).keys() {
        let (kind, pk) = keys::decode_kind_pending(&item?)?;
        match tasks.get(&pk.id) {
            Some(t)
                if t.status == Status::Pending
                    && t.kind == kind
                    && t.queue == pk.queue
                    && t.priority == pk.priority
                    && t.next_run_at == pk.next_run => {}
            _ => p(format!(
                "pending-by-kind entry {kind}/{pk:?} disagrees with its task"
            )),
        }
        if !by_kind_seen.insert(pk.id) {
            p(format!(
                "task {} has more than one pending-by-kind entry",
                pk.id
            ));
        }
    }
    for (id, t) in &tasks {
        if t.status == Status::Pending && !by_kind_seen.contains(id) {
            p(format!(
                "pending task {id} is missing from the pending-by-kind index"
            ));
        }
    }
    // Finish buckets: every terminal task is covered by a bucket at or before its finish
    // minute (the purge scan reaches it for any cutoff after its finish).
    let mut buckets: BTreeMap<u64, TaskId> = BTreeMap::new();
    for item in s.db.scan_prefix([keys::FINISHED]) {
        let (k, v) = item?;
        match keys::decode_finish_bucket(&k)
            .and_then(|m| Ok((m, keys::decode_bucket_value(&k, &v)?)))
        {
            Ok((m, id)) => {
                buckets.insert(m, id);
            }
            Err(e) => p(e.to_string()),
        }
    }
    for (id, t) in &tasks {
        let (true, Some(at)) = (t.status.is_terminal(), t.finished_at) else {
            continue;
        };
        let covered = buckets
            .range(..=keys::bucket_of(at))
            .any(|(_, b)| b.as_bytes() >= id.as_bytes());
        if !covered {
            p(format!(
                "terminal task {id} (finished at {at}) is in no finish bucket"
            ));
        }
    }
    // Counters equal a recount.
    let mut recount: BTreeMap<(String, Status), u64> = BTreeMap::new();
    for t in tasks.values() {
        *recount.entry((t.queue.clone(), t.status)).or_insert(0) += 1;
    }
    if recount != s.counts() {
        p(format!(
            "counters {:?} differ from a recount {recount:?}",
            s.counts()
        ));
    }
    // Log: per task, strictly increasing sequence numbers, ending in the task's state, and one
    // claim per counted attempt since the last manual retry.
    let last_seq = s.last_seq();
    for item in s.db.scan_prefix([keys::LOG]).keys() {
        p(format!(
            "format-3 log key {} is left in a format-4 store",
            keys::describe(&item?)
        ));
    }
    for (id, t) in &tasks {
        let entries = logs.get(id).map(Vec::as_slice).unwrap_or_default();
        report.log_entries += entries.len();
        if entries.is_empty() {
            p(format!("task {id} has no log entries"));
            continue;
        }
        if let Some(e) = entries.iter().find(|e| e.seq > last_seq) {
            p(format!(
                "task {id}: log entry {} is beyond the stored last sequence {last_seq}",
                e.seq
            ));
        }
        if entries.windows(2).any(|w| w[0].seq >= w[1].seq) {
            p(format!(
                "task {id}: log sequence numbers do not strictly increase"
            ));
        }
        if entries.windows(2).any(|w| w[1].from != Some(w[0].to)) {
            p(format!(
                "task {id}: log transitions do not chain (a 'from' differs from the previous 'to')"
            ));
        }
        if entries.last().map(|e| e.to) != Some(t.status) {
            p(format!(
                "task {id} is {} but its last log entry says {:?}",
                t.status,
                entries.last().map(|e| e.to)
            ));
        }
        let since_reset = entries
            .iter()
            .rev()
            .take_while(|e| e.cause != Cause::ManualRetry);
        // A release gives its claim's attempt back.
        let (claims, releases) = since_reset.fold((0usize, 0usize), |(c, r), e| match e.cause {
            Cause::Claimed => (c + 1, r),
            Cause::Released => (c, r + 1),
            _ => (c, r),
        });
        let claims = claims.saturating_sub(releases);
        if claims as u32 != t.attempts {
            p(format!(
                "task {id} has attempts = {} but {claims} claims in its log",
                t.attempts
            ));
        }
    }
    // Unique keys: `u` digest -> holder exactly for the tasks in their hold set, and every
    // extras record belongs to a task.
    let mut extras: HashMap<TaskId, TaskExtras> = HashMap::new();
    for item in s.db.scan_prefix([keys::EXTRAS]) {
        let (k, v) = item?;
        let id = keys::decode_extras(&k)?;
        match codec::decode::<TaskExtras>(RecordKind::Extras, &v, &|| keys::describe(&k)) {
            Ok(e) => {
                if !tasks.contains_key(&id) {
                    p(format!("extras exist for task {id}, which has no record"));
                }
                extras.insert(id, e);
            }
            Err(e) => p(e.to_string()),
        }
    }
    let mut held: HashMap<[u8; 32], TaskId> = HashMap::new();
    for item in s.db.scan_prefix([keys::UNIQUE]) {
        let (k, v) = item?;
        let digest = keys::decode_unique(&k)?;
        let holder = keys::decode_holder(&k, &v)?;
        held.insert(digest, holder);
        let spec = extras.get(&holder).and_then(|e| e.unique.as_ref());
        match (tasks.get(&holder), spec) {
            (Some(t), Some(u)) if u.digest == digest && unique::holds(u.states, t.status) => {}
            (Some(t), _) => p(format!(
                "unique key {} names task {holder} ({}), which does not hold it",
                keys::describe(&k),
                t.status
            )),
            (None, _) => p(format!(
                "unique key {} names task {holder}, which has no record",
                keys::describe(&k)
            )),
        }
    }
    for (id, e) in &extras {
        if let (Some(u), Some(t)) = (&e.unique, tasks.get(id)) {
            if unique::holds(u.states, t.status) && held.get(&u.digest) != Some(id) {
                p(format!(
                    "task {id} ({}) should hold unique key {} but {}",
                    t.status,
                    u.key,
                    match held.get(&u.digest) {
                        Some(other) => format!("task {other} does"),
                        None => "nobody does".to_string(),
                    }
                ));
            }
        }
    }
    for e in s.limit_state_checked()?.1 {
        p(e.to_string());
    }
    for e in s.schedules_checked()?.1 {
        p(e.to_string());
    }
    report.tasks = tasks.len();
    report.problems = problems;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Cause;

    fn options() -> SledOptions {
        SledOptions {
            cache_bytes: 8 << 20,
            flush_every_ms: Some(500),
            ..SledOptions::default()
        }
    }

    fn enqueued(t: &TaskInfo, seq: u64) -> Change {
        Change {
            before: None,
            after: Some(t.clone()),
            log: Some(LogEntry {
                seq,
                task_id: t.id,
                from: None,
                to: Status::Pending,
                attempt: 0,
                cause: Cause::Enqueued,
                at: Timestamp(1),
                run_id: 1,
            }),
            side: Vec::new(),
        }
    }

    /// A change from `before` to `after` with its log entry.
    fn moved(before: &TaskInfo, after: &TaskInfo, seq: u64, cause: Cause) -> Change {
        Change {
            before: Some(before.clone()),
            after: Some(after.clone()),
            log: Some(LogEntry {
                seq,
                task_id: after.id,
                from: Some(before.status),
                to: after.status,
                attempt: after.attempts,
                cause,
                at: after.finished_at.unwrap_or(Timestamp(1)),
                run_id: 1,
            }),
            side: Vec::new(),
        }
    }

    /// A purge scan that found nothing lets the next group delete the buckets before its
    /// cutoff's minute; a task of that same group finishing in one of those minutes (a clock
    /// set back) must still find its bucket afterwards: the deletions come first.
    #[test]
    fn bucket_clean_up_comes_before_the_groups_own_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &options()).unwrap();
        let minute = |m: u64| Timestamp(m * keys::BUCKET_MS + 7);
        let a = crate::task::test_task(3);
        let mut done = a.clone();
        done.status = Status::Cancelled;
        done.finished_at = Some(minute(10));
        store.commit(&[enqueued(&a, 1)], 1, true).unwrap();
        store
            .commit(&[moved(&a, &done, 2, Cause::Cancelled)], 2, true)
            .unwrap();
        let purge = Change {
            before: Some(done.clone()),
            after: None,
            log: None,
            side: Vec::new(),
        };
        store.commit(&[purge], 2, true).unwrap();
        assert!(store.db.get(keys::finish_bucket(10)).unwrap().is_some());
        // Nothing finished before minute 20 is left: the next group may drop bucket 10 ...
        assert!(store.finished_before(minute(20), 100).unwrap().is_empty());
        // ... and that group finishes a task in minute 10 again.
        let b = crate::task::test_task(3);
        let mut b_done = b.clone();
        b_done.status = Status::Cancelled;
        b_done.finished_at = Some(minute(10));
        let (mut e, c) = (enqueued(&b, 3), moved(&b, &b_done, 4, Cause::Cancelled));
        e.after = Some(b.clone());
        store.commit(&[e, c], 4, true).unwrap();
        assert_eq!(
            store
                .db
                .get(keys::finish_bucket(10))
                .unwrap()
                .map(|v| v.to_vec()),
            Some(b.id.as_bytes().to_vec())
        );
        let report = store.check().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
        assert_eq!(store.finished_before(minute(20), 100).unwrap(), vec![b.id]);
    }

    /// A clean-up justified by a scan is dropped if a group was applied after the scan began
    /// (a preview's scan runs beside the writer): that group may have finished a task in one of
    /// the minutes the scan found empty.
    #[test]
    fn a_stale_bucket_clean_up_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &options()).unwrap();
        let at = Timestamp(10 * keys::BUCKET_MS + 7);
        assert!(store
            .finished_before(Timestamp(20 * keys::BUCKET_MS), 100)
            .unwrap()
            .is_empty());
        // As if this group had been applied while the scan ran (before the scan recorded its
        // clean-up): it finishes a task in minute 10.
        let pending = store.bucket_cleanup.lock().take();
        assert!(pending.is_some(), "the empty scan asked for a clean-up");
        let a = crate::task::test_task(3);
        let mut done = a.clone();
        done.status = Status::Cancelled;
        done.finished_at = Some(at);
        store
            .commit(
                &[enqueued(&a, 1), moved(&a, &done, 2, Cause::Cancelled)],
                2,
                true,
            )
            .unwrap();
        *store.bucket_cleanup.lock() = pending;
        let b = crate::task::test_task(3);
        store.commit(&[enqueued(&b, 3)], 3, true).unwrap();
        assert!(store.db.get(keys::finish_bucket(10)).unwrap().is_some());
        let report = store.check().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
        assert_eq!(
            store
                .finished_before(Timestamp(20 * keys::BUCKET_MS), 100)
                .unwrap(),
            vec![a.id]
        );
    }

    /// A purge asks for batches until one is empty; a batch after a full one continues after
    /// its last id. A task finishing meanwhile with a `finished_at` before the cutoff (here the
    /// oldest task, behind the continuation point) sends the next batch back to the first
    /// record: otherwise this purge would end on an empty continuation (the one task past the
    /// first batch was retried) and miss it.
    #[test]
    fn purge_batches_continue_unless_an_earlier_finish_happened() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), &options()).unwrap();
        let at = |m: u64| Timestamp(m * keys::BUCKET_MS + 7);
        let mut tasks: Vec<TaskInfo> = (0..8).map(|_| crate::task::test_task(3)).collect();
        tasks.sort_by_key(|t| t.id);
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        for t in &tasks {
            let n = next();
            store.commit(&[enqueued(t, n)], n, true).unwrap();
        }
        let cancel = |t: &TaskInfo, m: u64, seq: u64| {
            let mut done = t.clone();
            done.status = Status::Cancelled;
            done.finished_at = Some(at(m));
            (done.clone(), moved(t, &done, seq, Cause::Cancelled))
        };
        let mut stored: HashMap<TaskId, TaskInfo> =
            tasks.iter().map(|t| (t.id, t.clone())).collect();
        for i in [1, 2, 3] {
            let n = next();
            let (done, ch) = cancel(&tasks[i], 5, n);
            store.commit(&[ch], n, true).unwrap();
            stored.insert(done.id, done);
        }
        let cutoff = at(20);
        let mut batches = 0;
        loop {
            let ids = store.finished_before(cutoff, 2).unwrap();
            batches += 1;
            assert!(batches < 20);
            if ids.is_empty() {
                break;
            }
            let changes: Vec<Change> = ids
                .iter()
                .map(|id| Change {
                    before: stored.remove(id),
                    after: None,
                    log: None,
                    side: Vec::new(),
                })
                .collect();
            let n = next();
            store.commit(&changes, n, true).unwrap();
            if batches == 1 {
                // The third cancelled task is retried, and the oldest task finishes now, with a
                // time before the cutoff.
                let n = next();
                let before = stored[&tasks[3].id].clone();
                let mut again = before.clone();
                again.status = Status::Pending;
                again.finished_at = None;
                store
                    .commit(&[moved(&before, &again, n, Cause::ManualRetry)], n, true)
                    .unwrap();
                stored.insert(again.id, again);
                let n = next();
                let (done, ch) = cancel(&tasks[0], 3, n);
                store.commit(&[ch], n, true).unwrap();
                stored.insert(done.id, done);
            }
        }
        let left: Vec<TaskId> = stored
            .values()
            .filter(|t| t.status.is_terminal())
            .map(|t| t.id)
            .collect();
        assert!(left.is_empty(), "not purged: {left:?}");
        assert_eq!(
            stored.len(),
            5,
            "the pending and the retried tasks are left"
        );
        let report = store.check().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
    }

    /// A format-2 store left by a crash after a group's write-ahead entry reached disk but before
    /// all of its writes (or the entry's removal) did: the next open applies the whole group,
    /// whatever prefix of it had been written.
    #[test]
    fn a_group_interrupted_mid_apply_is_replayed_whole_at_open() {
        for prefix in [0usize, 1, 4, usize::MAX] {
            let dir = tempfile::tempdir().unwrap();
            let first = crate::task::test_task(3);
            let second = crate::task::test_task(3);
            {
                let store = SledStore::open(dir.path(), &options()).unwrap();
                store.commit(&[enqueued(&first, 1)], 1, true).unwrap();
                let (writes, _) = store.write_set(&[enqueued(&second, 2)], 2).unwrap();
                let prefix = prefix.min(writes.ops.len());
                store
                    .db
                    .insert(
                        keys::write_ahead(1),
                        codec::encode(RecordKind::WriteAhead, &writes.ops).unwrap(),
                    )
                    .unwrap();
                apply_ops(&store.db, &writes.ops[..prefix]).unwrap();
                store.sync().unwrap();
            }
            let store = SledStore::open(dir.path(), &options()).unwrap();
            assert_eq!(
                store.get(second.id).unwrap().unwrap().status,
                Status::Pending,
                "prefix {prefix}"
            );
            assert_eq!(store.last_seq(), 2);
            assert_eq!(store.counts()[&("default".to_string(), Status::Pending)], 2);
            assert_eq!(
                store.db.scan_prefix([keys::WRITE_AHEAD]).count(),
                0,
                "replayed entries are removed"
            );
            let report = store.check().unwrap();
            assert!(
                report.is_consistent(),
                "prefix {prefix}: {:?}",
                report.problems
            );
        }
    }

    /// Small and large groups both go through the log and one batch; a clean close leaves no
    /// log segment, and the reopened store holds every group.
    #[test]
    fn groups_are_logged_and_a_clean_close_leaves_no_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), &options()).unwrap();
            let small: Vec<Change> = (1..=2)
                .map(|s| enqueued(&crate::task::test_task(3), s))
                .collect();
            store.commit(&small, 2, true).unwrap();
            let large: Vec<Change> = (3..=400)
                .map(|s| enqueued(&crate::task::test_task(3), s))
                .collect();
            store.commit(&large, 400, true).unwrap();
            assert_eq!(wal::segments(dir.path()).unwrap().len(), 1);
            assert_eq!(
                wal::read_log(dir.path()).unwrap().len(),
                2,
                "one record per group"
            );
            assert_eq!(store.read_meta_u64(keys::META_WAL).unwrap(), 2);
        }
        assert!(wal::segments(dir.path()).unwrap().is_empty());
        let store = SledStore::open(dir.path(), &options()).unwrap();
        assert_eq!(
            store.counts()[&("default".to_string(), Status::Pending)],
            400
        );
        assert_eq!(store.db.scan_prefix([keys::WRITE_AHEAD]).count(), 0);
        assert!(store.check().unwrap().is_consistent());
    }

    /// A crash before any checkpoint: sled never flushed, the log holds every group; the next
    /// open replays them.
    #[test]
    fn the_log_is_replayed_onto_a_sled_that_never_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let tasks: Vec<TaskInfo> = (0..3).map(|_| crate::task::test_task(3)).collect();
        let log_copy = {
            let store = SledStore::open(dir.path(), &options()).unwrap();
            for (i, t) in tasks.iter().enumerate() {
                store
                    .commit(&[enqueued(t, i as u64 + 1)], i as u64 + 1, true)
                    .unwrap();
            }
            let segs = wal::segments(dir.path()).unwrap();
            segs.iter()
                .map(|(_, p)| (p.clone(), std::fs::read(p).unwrap()))
                .collect::<Vec<_>>()
        };
        // The close checkpointed and deleted the log: put it back and roll sled back to its
        // state at open by removing what the groups wrote (as if it had never flushed them).
        {
            let store = SledStore::open(dir.path(), &options()).unwrap();
            for t in &tasks {
                store.db.remove(keys::task(t.id)).unwrap();
            }
            store
                .db
                .insert(
                    keys::META_WAL,
                    codec::encode(RecordKind::Meta, &0u64).unwrap(),
                )
                .unwrap();
            // (Its close checkpoints this and deletes its own, empty, log.)
        }
        for (p, bytes) in &log_copy {
            std::fs::write(p, bytes).unwrap();
        }
        let store = SledStore::open(dir.path(), &options()).unwrap();
        for t in &tasks {
            assert_eq!(store.get(t.id).unwrap().unwrap().status, Status::Pending);
        }
        assert!(wal::segments(dir.path()).unwrap().len() == 1, "a fresh log");
    }
}
