//! The write-ahead transition log (format 3): what makes a commit group durable.
//!
//! Each commit group is appended as one record to the current segment file and made durable by
//! one `fdatasync` ([`Wal::sync`]); sled then holds the materialised state and is flushed only at
//! checkpoints (see `SledStore`). Records are numbered by a log sequence number (`lsn`, 1, 2, 3,
//! ... without gaps); each group's sled batch also writes `m/wal` = its `lsn`, so sled's own
//! recovery (a prefix of its batches) says exactly which records it holds.
//!
//! ## Files
//! Segments live in the store directory as `wal.<first lsn, 20 digits>`, written to until they
//! pass the segment size, then a new one is started (the directory is fsynced, with the next
//! `fdatasync`, before any record in it is acknowledged). A checkpoint deletes the segments whose
//! records sled holds durably. Every open ends with an empty log: it replays, checkpoints and
//! deletes every segment, then starts a new one.
//!
//! ## Preallocated segments
//! An `fdatasync` that follows an append which grew the file must also commit the new file size
//! (on ext4, a journal commit: a second write and cache flush); one that follows an overwrite of
//! blocks that already hold written data need not. So segments are *preallocated*: a background
//! thread writes the next one in advance as [`SPARE_NAME`], `segment_bytes` of zeros made durable
//! (data and size) by `fsync`, and a rotation renames it to the new segment's name and overwrites
//! it from byte 0. On this project's test machine that made a lone `write` + `fdatasync` of
//! 128 B about 1.4x as fast as on an appended file. A log's first segment is a plain appended
//! file; the spare is asked for once it holds [`SPARE_AFTER_BYTES`] (so a queue opened and
//! closed at once writes no zeros) and the log moves to it as soon as it is ready. Without a
//! spare (still being written, or its write failed), a rotation creates a plain segment, as
//! before. The bytes after a segment's last record are zeros; reading treats them as its tail.
//!
//! ## Record layout (little-endian)
//! `[payload length: u32][crc32 (IEEE) of the next 16 bytes and the payload: u32][lsn: u64]
//! [synced: u64][payload]`. `synced` is the highest `lsn` known durable when the record was
//! written. The payload is the group's key writes in order, each `[key length: u32][key]`
//! followed by `[value length: u32][value]` for a put or `ffffffff` for a remove.
//!
//! ## Reading it back
//! Records are read in order until the first one that is cut short or fails its checksum (the
//! *tail*; zeros to the end of a segment whose successor starts with the next record are that
//! preallocated segment's unused end, not a tail): it and everything after it were never acknowledged, since an acknowledgement waits
//! for an `fdatasync` covering every byte before it. Except when a valid record after that
//! point says (`synced`) that the bad record's `lsn` had already been made durable: then the log
//! was damaged after it was written, and the open is refused ([`Error::Damaged`], naming the
//! file) with the directory untouched.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// A key write: `Some(value)` puts, `None` removes.
pub type Op = (Vec<u8>, Option<Vec<u8>>);

/// Segment file names start with this.
pub const SEGMENT_PREFIX: &str = "wal.";
/// Bytes before a record's payload.
pub const HEADER_BYTES: usize = 24;
const REMOVE: u32 = u32::MAX;

/// Default size past which a new segment is started.
pub(crate) const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

/// The preallocated file the next segment is renamed from (see the module documentation). Not a
/// segment name: reading the log never looks at it, and an open deletes it.
pub const SPARE_NAME: &str = "wal.spare";

/// Segments are preallocated only up to this size (a larger one is a test setting).
const MAX_PREALLOCATED: u64 = 64 << 20;

/// A plain segment asks for a spare once it holds this many bytes (or half the segment size).
pub(crate) const SPARE_AFTER_BYTES: u64 = 64 << 10;

/// Zeros written per `write` when preallocating.
const ZERO_CHUNK: usize = 1 << 20;

/// A segment's file name.
pub fn segment_name(first_lsn: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_lsn:020}")
}

/// The first `lsn` a segment file name announces, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends one record to `out`.
pub fn encode_record(lsn: u64, synced: u64, ops: &[Op], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&synced.to_le_bytes());
    for (k, v) in ops {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&REMOVE.to_le_bytes()),
        }
    }
    let payload = (out.len() - start - HEADER_BYTES) as u32;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&payload.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a record's payload into its key writes (`None`: it does not parse).
pub fn decode_payload(mut p: &[u8]) -> Option<Vec<Op>> {
    fn u32_at(p: &mut &[u8]) -> Option<u32> {
        let (head, tail) = (p.get(..4)?, p.get(4..)?);
        *p = tail;
        Some(u32::from_le_bytes(head.try_into().ok()?))
    }
    fn bytes(p: &mut &[u8], n: usize) -> Option<Vec<u8>> {
        let (head, tail) = (p.get(..n)?, p.get(n..)?);
        *p = tail;
        Some(head.to_vec())
    }
    let mut ops = Vec::new();
    while !p.is_empty() {
        let klen = u32_at(&mut p)? as usize;
        let key = bytes(&mut p, klen)?;
        let value = match u32_at(&mut p)? {
            REMOVE => None,
            n => Some(bytes(&mut p, n as usize)?),
        };
        ops.push((key, value));
    }
    Some(ops)
}

/// One record read back: its `lsn`, `synced` and payload range in its segment's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Parsed {
    lsn: u64,
    synced: u64,
    payload: std::ops::Range<usize>,
}

/// The valid record at `off` in `bytes`, if there is one.
fn parse_at(bytes: &[u8], off: usize) -> Option<Parsed> {
    let head = bytes.get(off..off.checked_add(HEADER_BYTES)?)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let lsn = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let synced = u64::from_le_bytes(head[16..24].try_into().ok()?);
    let end = off.checked_add(HEADER_BYTES)?.checked_add(len)?;
    let covered = bytes.get(off + 8..end)?;
    if lsn == 0 || synced >= lsn || crc32fast::hash(covered) != crc {
        return None;
    }
    Some(Parsed {
        lsn,
        synced,
        payload: off + HEADER_BYTES..end,
    })
}

/// The records of the log in `dir`, read without writing anything: the last unbroken run of
/// valid records before the tail, oldest first, with their key writes. Refuses a log damaged
/// before its tail ([`Error::Damaged`], naming the file).
pub(crate) fn read_log(dir: &Path) -> Result<Vec<(u64, Vec<Op>)>> {
    read_log_from(dir, 0)
}

/// [`read_log`] over only the segments that can hold records after `after` (a compaction
/// catching up on what was appended while it copied).
pub(crate) fn read_log_from(dir: &Path, after: u64) -> Result<Vec<(u64, Vec<Op>)>> {
    let mut segs = segments(dir)?;
    let from = segs
        .iter()
        .rposition(|(first, _)| *first <= after.saturating_add(1))
        .unwrap_or(0);
    segs.drain(..from);
    let damaged = |file: &Path, detail: String| Error::Damaged {
        path: Some(dir.to_path_buf()),
        detail: format!(
            "its write-ahead log file `{}` {detail}; omniq left its files as they were",
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
    };
    let mut out: Vec<(u64, Vec<Op>)> = Vec::new();
    // The first bad spot: (file, offset, the lsn the record there should have had).
    let mut tail: Option<(PathBuf, usize, u64)> = None;
    let next_firsts: Vec<Option<u64>> = segs
        .iter()
        .skip(1)
        .map(|(f, _)| Some(*f))
        .chain([None])
        .collect();
    for ((first, path), next_first) in segs.into_iter().zip(next_firsts) {
        let bytes = std::fs::read(&path)?;
        if tail.is_none() && out.last().is_some_and(|(l, _)| l + 1 != first) {
            // Records are missing between two segments (an older segment whose deletion did
            // not reach disk): only what follows can be needed; `unapplied` checks it is.
            out.clear();
        }
        let mut expected = first;
        let mut off = 0usize;
        while off < bytes.len() {
            if let Some((bad_file, bad_off, bad_lsn)) = &tail {
                // Past the tail: only looking for proof that the tail had been made durable.
                match parse_at(&bytes, off) {
                    Some(p) if p.synced >= *bad_lsn => {
                        return Err(damaged(
                            bad_file,
                            format!(
                                "holds a damaged record at byte {bad_off} (record {bad_lsn}), \
                                 followed by valid records written after it was made durable"
                            ),
                        ));
                    }
                    Some(p) => off = p.payload.end,
                    None => off = next_candidate(&bytes, off),
                }
                continue;
            }
            match parse_at(&bytes, off) {
                Some(p) if p.lsn == expected => {
                    let ops = decode_payload(&bytes[p.payload.clone()]).ok_or_else(|| {
                        damaged(
                            &path,
                            format!("holds record {} whose key writes do not parse", p.lsn),
                        )
                    })?;
                    out.push((p.lsn, ops));
                    expected = p.lsn + 1;
                    off = p.payload.end;
                }
                _ if next_first == Some(expected) && bytes[off..].iter().all(|b| *b == 0) => {
                    // The unused, zero-filled end of a preallocated segment: the next segment
                    // starts with the record expected here, so this one ended cleanly.
                    break;
                }
                _ => {
                    tail = Some((path.clone(), off, expected));
                    off = next_candidate(&bytes, off);
                }
            }
        }
    }
    Ok(out)
}

/// The records of `log` (from [`read_log`]) that sled, holding records up to `applied`, lacks.
/// They must continue sled's records without a gap.
pub(crate) fn unapplied(
    dir: &Path,
    log: Vec<(u64, Vec<Op>)>,
    applied: u64,
) -> Result<Vec<(u64, Vec<Op>)>> {
    let rest: Vec<(u64, Vec<Op>)> = log.into_iter().filter(|(l, _)| *l > applied).collect();
    match rest.first() {
        Some((first, _)) if *first != applied + 1 => Err(Error::Damaged {
            path: Some(dir.to_path_buf()),
            detail: format!(
                "its write-ahead log continues at record {first} but the database holds records \
                 only up to {applied}: records are missing"
            ),
        }),
        _ => Ok(rest),
    }
}

/// The next offset after `off` where a valid record could start. A record's header holds a
/// nonzero `lsn` at bytes 8..16, so one cannot start more than 15 bytes before the next nonzero
/// byte: the zeros of a preallocated segment's unwritten end are skipped at memory speed.
fn next_candidate(bytes: &[u8], off: usize) -> usize {
    match bytes
        .get(off + 1..)
        .and_then(|rest| rest.iter().position(|b| *b != 0))
    {
        Some(p) => (off + 1 + p).saturating_sub(15).max(off + 1),
        None => bytes.len(),
    }
}

/// The segment files in `dir`, oldest first.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first) = parse_segment_name(&entry.file_name().to_string_lossy()) {
            if entry.file_type()?.is_file() {
                out.push((first, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The appending end of the log.
struct Appender {
    file: Arc<File>,
    /// Bytes written to the current segment (where the next record goes).
    len: u64,
    /// The current segment was a spare: its blocks already hold zeros, and `len` is not its size.
    preallocated: bool,
    next_lsn: u64,
    /// Segments rotated away from but not yet `fdatasync`ed.
    unsynced: Vec<Arc<File>>,
    /// A segment was created since the directory was last synced.
    dir_dirty: bool,
    /// Every live segment (first lsn, path, bytes written to it; the current one's is `len`),
    /// oldest first; the last is the current one.
    live: VecDeque<(u64, PathBuf, u64)>,
    buf: Vec<u8>,
}

/// The log of one open store. One appender (the commit writer), one syncer, one checkpointer.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    app: Mutex<Appender>,
    /// Held by a sync that took rotated-away segments (or a directory sync) until it finished:
    /// a sync that started after it waits for it before counting records in those segments
    /// as durable. Syncs otherwise run concurrently.
    rotation: Mutex<()>,
    /// The highest lsn known durable.
    synced: AtomicU64,
    /// Bytes appended since the last checkpoint started.
    since_checkpoint: AtomicU64,
    /// What the last sync covered: (first lsn of the segment it synced last, its length then).
    /// Older segments were wholly synced. Read by the power-loss test.
    durable: Mutex<(u64, u64)>,
    /// Writes the next preallocated segment.
    spare: SpareMaker,
}

impl Wal {
    /// Starts an empty log whose first record will be `next_lsn`, deleting any segment files
    /// (only after sled holds every record they hold durably).
    pub(crate) fn start(dir: &Path, next_lsn: u64, segment_bytes: u64) -> Result<Wal> {
        for (_, path) in segments(dir)? {
            std::fs::remove_file(path)?;
        }
        remove_spare(dir)?;
        let path = dir.join(segment_name(next_lsn));
        let file = create_segment(&path)?;
        sync_dir(dir)?;
        let segment_bytes = segment_bytes.max(1);
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            app: Mutex::new(Appender {
                file: Arc::new(file),
                len: 0,
                preallocated: false,
                next_lsn,
                unsynced: Vec::new(),
                dir_dirty: false,
                live: VecDeque::from([(next_lsn, path, 0)]),
                buf: Vec::new(),
            }),
            rotation: Mutex::new(()),
            synced: AtomicU64::new(next_lsn - 1),
            since_checkpoint: AtomicU64::new(0),
            durable: Mutex::new((next_lsn, 0)),
            spare: SpareMaker::start(dir, segment_bytes)?,
        })
    }

    /// Appends one group's key writes as a record (written, not yet durable); returns its lsn.
    pub(crate) fn append(&self, ops: &[Op]) -> Result<u64> {
        let mut guard = self.app.lock();
        let app = &mut *guard;
        let lsn = app.next_lsn;
        app.buf.clear();
        encode_record(lsn, self.synced.load(Ordering::Acquire), ops, &mut app.buf);
        let full = app.len + app.buf.len() as u64 > self.segment_bytes;
        // A plain segment is left as soon as a preallocated one is ready.
        let upgrade = !app.preallocated && self.spare.ready();
        if app.len > 0 && (full || upgrade) {
            self.rotate_locked(app)?;
        }
        if !app.preallocated && app.len >= SPARE_AFTER_BYTES.min(self.segment_bytes / 2) {
            self.spare.want();
        }
        // Positioned writes: a preallocated segment is overwritten from byte 0.
        if crate::store::hook::armed("wal-torn") {
            // Crash tests: die with half of the record written.
            let half = app.buf.len() / 2;
            app.file.write_all_at(&app.buf[..half], app.len)?;
            crate::store::hook::reached("wal-torn");
            app.file
                .write_all_at(&app.buf[half..], app.len + half as u64)?;
        } else {
            app.file.write_all_at(&app.buf, app.len)?;
        }
        app.len += app.buf.len() as u64;
        if let Some(current) = app.live.back_mut() {
            current.2 = app.len;
        }
        app.next_lsn += 1;
        self.since_checkpoint
            .fetch_add(app.buf.len() as u64, Ordering::Relaxed);
        Ok(lsn)
    }

    /// Starts a new segment now if the current one holds any record, so that every record
    /// appended so far can be pruned once covered (a compaction, whose new files hold them all,
    /// calls it instead of waiting for the segment to fill).
    pub(crate) fn rotate(&self) -> Result<()> {
        let mut guard = self.app.lock();
        if guard.len == 0 {
            return Ok(());
        }
        self.rotate_locked(&mut guard)
    }

    /// Starts the segment the next record (`next_lsn`) goes to: the spare renamed, or a plain
    /// file without one. The old one is synced by the next sync, with the directory (which
    /// makes the rename durable before any record in the new segment is acknowledged).
    fn rotate_locked(&self, app: &mut Appender) -> Result<()> {
        crate::store::hook::reached("wal-rotate");
        if app.preallocated {
            // Cut the unused zeros off the segment being left: made durable by the sync that
            // syncs this segment, which precedes any acknowledgement of a record after it. A
            // directory left by a crash then reads as with plain segments, so a build from
            // before preallocation (which took a zero tail followed by more segments for
            // damage) can still open it.
            app.file.set_len(app.len)?;
        }
        let lsn = app.next_lsn;
        let path = self.dir.join(segment_name(lsn));
        let (file, preallocated) = match self.spare.take() {
            Some(spare) => match std::fs::rename(self.dir.join(SPARE_NAME), &path) {
                Ok(()) => (spare, true),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot rename the preallocated log segment; starting a plain one");
                    drop(spare);
                    (create_segment(&path)?, false)
                }
            },
            None => (create_segment(&path)?, false),
        };
        let old = std::mem::replace(&mut app.file, Arc::new(file));
        app.unsynced.push(old);
        app.dir_dirty = true;
        app.len = 0;
        app.preallocated = preallocated;
        app.live.push_back((lsn, path, 0));
        self.spare.want();
        Ok(())
    }

    /// Makes every record appended so far durable: `fdatasync` of the segments written since
    /// the last sync, and of the directory if a segment was created. Several may run at once.
    pub(crate) fn sync(&self) -> Result<()> {
        let (file, old, dir_dirty, upto, covers, rotation) = {
            let mut app = self.app.lock();
            let old = std::mem::take(&mut app.unsynced);
            let dir_dirty = std::mem::take(&mut app.dir_dirty);
            // Taken under `app`, so any sync that snapshots after this one waits for it.
            let rotation = (!old.is_empty() || dir_dirty).then(|| self.rotation.lock());
            (
                app.file.clone(),
                old,
                dir_dirty,
                app.next_lsn - 1,
                (app.live.back().map_or(0, |l| l.0), app.len),
                rotation,
            )
        };
        if upto <= self.synced.load(Ordering::Acquire) && rotation.is_none() {
            return Ok(());
        }
        for f in &old {
            f.sync_data()?;
        }
        file.sync_data()?;
        if dir_dirty {
            sync_dir(&self.dir)?;
        }
        match rotation {
            Some(guard) => drop(guard),
            // Records before ours may be in a segment another sync is still syncing.
            None => drop(self.rotation.lock()),
        }
        self.synced.fetch_max(upto, Ordering::AcqRel);
        let mut durable = self.durable.lock();
        *durable = (*durable).max(covers);
        Ok(())
    }

    /// Every live segment with the bytes of it the last sync made durable and the bytes written
    /// to it (what a power loss would keep, at least, and at most; past what was written, a
    /// preallocated segment holds zeros). For the power-loss test.
    #[cfg(test)]
    pub(crate) fn durable_image(&self) -> Vec<(PathBuf, u64, u64)> {
        let (dfirst, dlen) = *self.durable.lock();
        let app = self.app.lock();
        app.live
            .iter()
            .map(|(first, path, len)| {
                let len = *len;
                let synced = match first.cmp(&dfirst) {
                    std::cmp::Ordering::Less => len,
                    std::cmp::Ordering::Equal => dlen,
                    std::cmp::Ordering::Greater => 0,
                };
                (path.clone(), synced, len)
            })
            .collect()
    }

    /// Bytes appended since the last [`take_since_checkpoint`](Wal::take_since_checkpoint).
    pub(crate) fn since_checkpoint(&self) -> u64 {
        self.since_checkpoint.load(Ordering::Relaxed)
    }

    /// Resets the byte count a checkpoint is due by.
    pub(crate) fn take_since_checkpoint(&self) {
        self.since_checkpoint.store(0, Ordering::Relaxed);
    }

    /// Deletes the segments whose every record is `<= covered` (sled holds them durably). With
    /// `all`, the current segment too when it is wholly covered (only at close: nothing is
    /// appended after).
    pub(crate) fn prune(&self, covered: u64, all: bool) -> Result<usize> {
        let doomed: Vec<PathBuf> = {
            let mut app = self.app.lock();
            let mut doomed = Vec::new();
            loop {
                let wholly_covered = match app.live.get(1) {
                    Some((next_first, _, _)) => next_first - 1 <= covered,
                    None => all && app.next_lsn - 1 <= covered,
                };
                if !wholly_covered {
                    break;
                }
                match app.live.pop_front() {
                    Some((_, path, _)) => doomed.push(path),
                    None => break,
                }
            }
            doomed
        };
        for path in &doomed {
            crate::store::hook::reached("wal-prune");
            std::fs::remove_file(path)?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(doomed.len())
    }

    /// Bytes of every live segment and of the spare.
    pub(crate) fn bytes_on_disk(&self) -> u64 {
        let mut live: Vec<PathBuf> = self
            .app
            .lock()
            .live
            .iter()
            .map(|(_, p, _)| p.clone())
            .collect();
        live.push(self.dir.join(SPARE_NAME));
        live.iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

fn create_segment(path: &Path) -> Result<File> {
    Ok(OpenOptions::new().create_new(true).write(true).open(path)?)
}

/// Deletes a spare a previous run left (it holds nothing but zeros).
fn remove_spare(dir: &Path) -> Result<()> {
    match std::fs::remove_file(dir.join(SPARE_NAME)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// The background thread that writes the next preallocated segment ([`SPARE_NAME`]).
struct SpareMaker {
    shared: Arc<SpareShared>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

struct SpareShared {
    state: Mutex<SpareState>,
    wake: Condvar,
    /// A spare is ready to be taken (read by every append of a plain segment).
    ready: AtomicBool,
    /// A spare was asked for and not yet begun (saves the lock on every append).
    wanted: AtomicBool,
    stop: AtomicBool,
}

#[derive(Default)]
struct SpareState {
    /// The ready spare.
    file: Option<File>,
    /// Asked for, not yet begun.
    wanted: bool,
    /// Being written.
    filling: bool,
}

impl SpareMaker {
    /// Starts the thread (none when segments are too large to preallocate).
    fn start(dir: &Path, segment_bytes: u64) -> Result<SpareMaker> {
        let shared = Arc::new(SpareShared {
            state: Mutex::new(SpareState::default()),
            wake: Condvar::new(),
            ready: AtomicBool::new(false),
            wanted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let thread = if segment_bytes <= MAX_PREALLOCATED {
            let (sh, path) = (shared.clone(), dir.join(SPARE_NAME));
            Some(
                std::thread::Builder::new()
                    .name("omniq-wal-spare".into())
                    .spawn(move || sh.run(&path, segment_bytes))?,
            )
        } else {
            None
        };
        Ok(SpareMaker {
            shared,
            thread,
            dir: dir.to_path_buf(),
        })
    }

    fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Asks for a spare, if none is ready or being written.
    fn want(&self) {
        if self.thread.is_none() || self.shared.wanted.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut st = self.shared.state.lock();
        st.wanted = true;
        self.shared.wake.notify_one();
    }

    /// The ready spare, if any (the caller renames it). Called at every rotation: it also
    /// lets a spare be asked for again (after a failed one, once per rotation).
    fn take(&self) -> Option<File> {
        let mut st = self.shared.state.lock();
        let file = st.file.take();
        self.shared.ready.store(false, Ordering::Release);
        // A request not yet begun is dropped: the thread must not recreate the file before the
        // caller has renamed it away. The caller asks again after its rename.
        st.wanted = false;
        if !st.filling {
            self.shared.wanted.store(false, Ordering::Release);
        }
        file
    }
}

impl SpareShared {
    fn run(&self, path: &Path, bytes: u64) {
        loop {
            {
                let mut st = self.state.lock();
                let work = |st: &SpareState| st.wanted && st.file.is_none();
                while !(self.stop.load(Ordering::Acquire) || work(&st)) {
                    self.wake.wait(&mut st);
                }
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                st.wanted = false;
                st.filling = true;
            }
            let filled = self.fill(path, bytes);
            let mut st = self.state.lock();
            st.filling = false;
            match filled {
                Ok(Some(file)) => {
                    st.file = Some(file);
                    self.ready.store(true, Ordering::Release);
                }
                Ok(None) => return,
                Err(e) => {
                    // Rotations make plain segments; the next one asks again (`take`).
                    tracing::warn!(file = %path.display(), error = %e, "cannot preallocate the next log segment");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }

    /// Writes `bytes` zeros to a new spare and makes them durable; `None` if stopped meanwhile.
    fn fill(&self, path: &Path, bytes: u64) -> std::io::Result<Option<File>> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(path)?;
        let zeros = vec![0u8; ZERO_CHUNK.min(bytes as usize)];
        let mut done = 0u64;
        while done < bytes {
            if self.stop.load(Ordering::Acquire) {
                drop(file);
                let _ = std::fs::remove_file(path);
                return Ok(None);
            }
            let n = (bytes - done).min(zeros.len() as u64) as usize;
            (&file).write_all(&zeros[..n])?;
            done += n as u64;
        }
        crate::store::hook::reached("wal-spare");
        file.sync_all()?;
        Ok(Some(file))
    }
}

/// Stops the thread and deletes the spare (an unused one holds nothing).
impl Drop for SpareMaker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _st = self.shared.state.lock();
            self.shared.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.shared.state.lock().file.take());
        if self.shared.wanted.load(Ordering::Acquire) {
            // A spare was asked for: written, being written when stopped, or failed.
            if let Err(e) = remove_spare(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot delete the preallocated log segment; the next open does");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(i: u64) -> Vec<Op> {
        vec![
            (
                format!("key{i}").into_bytes(),
                Some(vec![i as u8; (i % 7) as usize]),
            ),
            (b"gone".to_vec(), None),
        ]
    }

    /// Writes `n` records into a fresh log in `dir`, syncing after each (so each record's
    /// `synced` names the one before it); returns the segment's bytes and each record's end.
    fn write_log(dir: &Path, n: u64) -> (PathBuf, Vec<usize>) {
        let wal = Wal::start(dir, 1, 1 << 30).unwrap();
        let mut ends = Vec::new();
        for i in 1..=n {
            assert_eq!(wal.append(&ops(i)).unwrap(), i);
            wal.sync().unwrap();
            ends.push(wal.app.lock().len as usize);
        }
        (dir.join(segment_name(1)), ends)
    }

    #[test]
    fn records_round_trip_and_applied_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 5);
        let all = read_log(dir.path()).unwrap();
        assert_eq!(
            all,
            (1..=5).map(|i| (i, ops(i))).collect::<Vec<_>>(),
            "every record, in order"
        );
        let rest = unapplied(dir.path(), all.clone(), 3).unwrap();
        assert_eq!(rest.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 5]);
        assert!(unapplied(dir.path(), all.clone(), 9).unwrap().is_empty());
        assert!(matches!(
            unapplied(dir.path(), all[2..].to_vec(), 1),
            Err(Error::Damaged { .. })
        ));
    }

    /// The log cut at every byte of its last record, or with any byte of it changed: exactly
    /// the records before it are read back. Any byte of an earlier record changed: refused.
    #[test]
    fn a_torn_or_corrupt_last_record_is_dropped_and_earlier_damage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = write_log(dir.path(), 4);
        let good = std::fs::read(&path).unwrap();
        let last_start = ends[2];
        let previous: Vec<(u64, Vec<Op>)> = (1..=3).map(|i| (i, ops(i))).collect();
        for cut in last_start..good.len() {
            std::fs::write(&path, &good[..cut]).unwrap();
            let read = read_log(dir.path()).unwrap();
            assert_eq!(read, previous, "cut at byte {cut}");
        }
        for at in last_start..good.len() {
            for flip in [0x01u8, 0xff] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                std::fs::write(&path, &bad).unwrap();
                let read = read_log(dir.path()).unwrap();
                assert_eq!(read, previous, "byte {at} ^ {flip:#x}");
            }
        }
        // Record 3 damaged while record 4 (written after 3 was made durable) is intact.
        for at in ends[1]..ends[2] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            match read_log(dir.path()) {
                Err(Error::Damaged { detail, .. }) => {
                    assert!(detail.contains(&segment_name(1)), "{detail}")
                }
                other => panic!("byte {at}: expected Damaged, got {other:?}"),
            }
        }
    }

    /// A record after a torn one that was written before the torn one was made durable (power
    /// loss can persist pages out of order) is part of the unacknowledged tail, not damage.
    #[test]
    fn records_written_before_the_torn_one_was_durable_are_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 1, 1 << 30).unwrap();
        wal.append(&ops(1)).unwrap();
        wal.sync().unwrap();
        let before = wal.app.lock().len as usize;
        wal.append(&ops(2)).unwrap();
        let middle = wal.app.lock().len as usize;
        wal.append(&ops(3)).unwrap();
        let path = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[before + HEADER_BYTES] ^= 0x55;
        assert!(middle < bytes.len());
        std::fs::write(&path, &bytes).unwrap();
        let read = read_log(dir.path()).unwrap();
        assert_eq!(read, vec![(1, ops(1))]);
    }

    #[test]
    fn segments_rotate_and_prune_only_what_is_covered() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 1, 100).unwrap();
        for i in 1..=10 {
            wal.append(&ops(i)).unwrap();
        }
        wal.sync().unwrap();
        let n = segments(dir.path()).unwrap().len();
        assert!(n > 2, "{n} segments");
        let read = read_log(dir.path()).unwrap();
        assert_eq!(read.len(), 10);
        wal.prune(4, false).unwrap();
        let read = unapplied(dir.path(), read_log(dir.path()).unwrap(), 4).unwrap();
        assert_eq!(
            read.iter().map(|r| r.0).collect::<Vec<_>>(),
            (5..=10).collect::<Vec<_>>()
        );
        assert!(segments(dir.path()).unwrap().len() < n);
        wal.prune(10, true).unwrap();
        assert!(segments(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_missing_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 1, 100).unwrap();
        for i in 1..=10 {
            wal.append(&ops(i)).unwrap();
        }
        wal.sync().unwrap();
        let segs = segments(dir.path()).unwrap();
        std::fs::remove_file(&segs[1].1).unwrap();
        let log = read_log(dir.path()).unwrap();
        assert!(
            log.first().is_some_and(|r| r.0 > 1),
            "only the run after the gap"
        );
        assert!(matches!(
            unapplied(dir.path(), log, 0),
            Err(Error::Damaged { .. })
        ));
    }

    /// Asks for a spare and waits (bounded) until the thread has it ready.
    fn spare_ready(wal: &Wal) {
        wal.spare.want();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !wal.spare.ready() {
            assert!(std::time::Instant::now() < deadline, "no spare after 30 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Appends records until the log has moved to preallocated segments and filled `segments`
    /// of them; returns the number of records.
    fn fill_preallocated(wal: &Wal, segments_wanted: usize) -> u64 {
        let mut i = 0;
        let mut preallocated = 0;
        while preallocated < segments_wanted {
            spare_ready(wal);
            let first = wal.app.lock().live.len();
            while wal.app.lock().live.len() == first {
                i += 1;
                wal.append(&ops(i)).unwrap();
                wal.sync().unwrap();
            }
            if wal.app.lock().preallocated {
                preallocated += 1;
            }
        }
        i
    }

    /// Segments after the first are the spare renamed: written from byte 0 of a file that
    /// already holds `segment_bytes` of zeros, and cut to their records when the log moves on.
    /// Every record reads back, also when the cut did not reach disk (zeros to a segment's end
    /// are not a tail when the next segment starts with the next record), and the spare is
    /// gone once the log is.
    #[test]
    fn preallocated_segments_read_back_across_their_zero_ends() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 1, 4096).unwrap();
        let n = fill_preallocated(&wal, 3);
        let segs = segments(dir.path()).unwrap();
        assert!(segs.len() >= 4, "{segs:?}");
        // Every segment but the current one was cut to its records at rotation.
        let zero_ended = segs[1..segs.len() - 1]
            .iter()
            .filter(|(_, p)| {
                let b = std::fs::read(p).unwrap();
                b.len() == 4096 && *b.last().unwrap() == 0
            })
            .count();
        assert_eq!(zero_ended, 0, "a segment left behind kept its zeros");
        let read = read_log(dir.path()).unwrap();
        assert_eq!(read, (1..=n).map(|i| (i, ops(i))).collect::<Vec<_>>());
        // The cuts lost (a crash before the sync that made them durable): zeros again.
        for (_, p) in &segs[1..segs.len() - 1] {
            let mut b = std::fs::read(p).unwrap();
            b.resize(4096.max(b.len()), 0);
            std::fs::write(p, &b).unwrap();
        }
        assert_eq!(
            read_log(dir.path()).unwrap(),
            (1..=n).map(|i| (i, ops(i))).collect::<Vec<_>>()
        );
        assert!(dir.path().join(SPARE_NAME).exists());
        drop(wal);
        assert!(
            !dir.path().join(SPARE_NAME).exists(),
            "the spare outlived the log"
        );
    }

    /// The last record of a preallocated segment lost at every byte (what a power loss leaves
    /// of an unsynced write there: the zeros it overwrote) or changed at any byte: exactly the
    /// records before it are read back, whether or not a next segment exists.
    #[test]
    fn a_torn_last_record_in_a_preallocated_segment_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 1, 8192).unwrap();
        spare_ready(&wal);
        // Moves to the spare with its first append, then writes 4 records into it.
        let mut ends = Vec::new();
        for i in 1..=5 {
            wal.append(&ops(i)).unwrap();
            wal.sync().unwrap();
            ends.push(wal.app.lock().len as usize);
        }
        assert!(wal.app.lock().preallocated);
        let first = wal.app.lock().live.back().unwrap().0;
        let path = dir.path().join(segment_name(first));
        drop(wal);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(good.len(), 8192);
        let (start, end) = (ends[3], ends[4]);
        let previous: Vec<(u64, Vec<Op>)> = (1..=4).map(|i| (i, ops(i))).collect();
        for cut in start..end {
            let mut lost = good.clone();
            lost[cut..end].fill(0);
            std::fs::write(&path, &lost).unwrap();
            assert_eq!(
                read_log(dir.path()).unwrap(),
                previous,
                "zeros from byte {cut}"
            );
        }
        for at in start..end {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(read_log(dir.path()).unwrap(), previous, "byte {at} changed");
        }
        // A record in the middle lost while a later one is intact and names it durable.
        let mut bad = good.clone();
        bad[ends[1]..ends[2]].fill(0);
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(read_log(dir.path()), Err(Error::Damaged { .. })));
    }

    /// Zeros at the end of a segment count as its clean end only when the next segment starts
    /// with the record expected there: when it does not, they are a tail, as before.
    #[test]
    fn zeros_before_a_gap_are_a_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 1, 4096).unwrap();
        let n = fill_preallocated(&wal, 2);
        drop(wal);
        let segs = segments(dir.path()).unwrap();
        // Lose the whole last record of the second-to-last segment (it was synced, but suppose
        // it was not): the next segment then starts one record later than expected.
        let (first, path) = &segs[segs.len() - 2];
        let next_first = segs[segs.len() - 1].0;
        let mut bytes = std::fs::read(path).unwrap();
        let mut off = 0;
        let mut starts = Vec::new();
        while let Some(p) = parse_at(&bytes, off) {
            starts.push(off);
            off = p.payload.end;
        }
        assert_eq!(*first + starts.len() as u64, next_first);
        let last = *starts.last().unwrap();
        bytes[last..off].fill(0);
        std::fs::write(path, &bytes).unwrap();
        // Records after the gap were written after the lost one was durable: refused.
        assert!(
            matches!(read_log(dir.path()), Err(Error::Damaged { .. })),
            "{n} records"
        );
    }
}
