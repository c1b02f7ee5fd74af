//! Recognising a queue directory before sled touches it.
//!
//! sled 0.34.7 opens any directory: it creates `conf`, `db` and `blobs/`, rewrites a `db` it does
//! not understand, and "recovers" a truncated data file by discarding (and overwriting) what it
//! cannot read. So nothing here runs sled on a directory until it is recognisably omniq's:
//!
//! - **The marker.** omniq writes `OMNIQ` (a magic line and the format version) when it creates a
//!   store, atomically (temp file, fsync, rename, directory fsync), *before* sled creates
//!   anything. A directory with a valid marker is an omniq store; a marker naming a newer format is
//!   refused with [`Error::FormatTooNew`] before sled runs.
//! - **New stores** are created only in a missing directory or an empty one (a leftover
//!   `OMNIQ.tmp` from a creation that was killed counts as empty).
//! - **Format-1 stores written before the marker existed** look like a bare sled directory
//!   (`conf` in sled's exact shape, `db`, `snap.*`, `blobs/`, nothing else). Whether it is
//!   omniq's can only be told by reading `m/format` through sled, and opening it with sled may
//!   rewrite it; so it is opened on a **temporary copy** first ([`trial_open_copy`]). Only when
//!   the copy opens and holds omniq's format key (or is an empty sled database, which an older
//!   omniq killed during its first open leaves) is the real directory opened and the marker
//!   added. A foreign sled database is refused unchanged.
//! - **Damage** ([`preflight`]): before a recognised store is opened, sled's newest snapshot is
//!   read (without sled) and every page it points at must lie inside `db`, and `db` must be at
//!   least as long as the marker's watermark says it was at the last open or clean close. A
//!   miss means the file may have been cut short; then the store is opened on a temporary copy
//!   first, and only if that copy opens and reads back at least the watermark's run and
//!   transition sequence is the real directory opened. A store that cannot be read is reported
//!   as [`Error::Damaged`] with its files as they were.
//! - **The watermark** (marker lines `run`, `seq`, `db_bytes`) is rewritten (atomically) after
//!   every open's sync and at every clean close. sled's snapshot predates everything a run
//!   writes, so without it a store written in one run and then truncated opens, in sled, as an
//!   empty store.
//!
//! Anything else is [`Error::NotAStore`], naming the directory and what is in it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::codec::{self, RecordKind};
use crate::error::{Error, Result};
use crate::keys;

/// The marker file's name.
pub const MARKER: &str = "OMNIQ";
/// The marker's first line.
pub const MARKER_MAGIC: &str = "omniq queue directory";
const MARKER_TMP: &str = "OMNIQ.tmp";

/// The marker's whole content when a store is created (before sled runs).
pub fn marker_text(format: u32) -> String {
    format!("{MARKER_MAGIC}\nformat {format}\n")
}

/// What the marker records. `run`, `seq` and `db_bytes` are a watermark omniq keeps outside
/// sled: the process run whose start is durable in sled (`m/run`), the last transition sequence
/// number known durable (`m/seq`), and the length of sled's data file, as of the last open and
/// the last clean close. All 0 until the first open completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Marker {
    pub format: u32,
    pub run: u64,
    pub seq: u64,
    pub db_bytes: u64,
}

impl Marker {
    fn text(&self) -> String {
        let mut t = marker_text(self.format);
        if self.run > 0 {
            t.push_str(&format!(
                "run {}\nseq {}\ndb_bytes {}\n",
                self.run, self.seq, self.db_bytes
            ));
        }
        t
    }
}

/// What [`probe`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// Missing or empty: omniq may create a store here.
    Fresh,
    /// Has a valid marker.
    Marked(Marker),
    /// A sled directory without a marker: possibly a store written before the marker existed.
    BareSled,
}

/// Classifies `dir` without writing anything. Errors: [`Error::NotAStore`] (foreign content),
/// [`Error::FormatTooNew`] (a newer marker), [`Error::Open`] (cannot read the directory).
pub(crate) fn probe(dir: &Path, supported: u32) -> Result<Found> {
    let io_err = |what: &str, e: std::io::Error| Error::Open {
        path: dir.to_path_buf(),
        reason: format!("cannot {what}: {e}"),
    };
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Fresh),
        Err(e) => return Err(io_err("read it", e)),
    };
    if !meta.is_dir() {
        return Err(Error::NotAStore {
            path: dir.to_path_buf(),
            found: format!("it is a {}-byte file, not a directory", meta.len()),
        });
    }
    let mut names: Vec<(String, bool, u64)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err("list it", e))? {
        let entry = entry.map_err(|e| io_err("list it", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let (is_dir, len) = match entry.metadata() {
            Ok(m) => (m.is_dir(), m.len()),
            Err(_) => (false, 0),
        };
        if name != MARKER_TMP {
            names.push((name, is_dir, len));
        }
    }
    names.sort();
    if names.iter().any(|(n, _, _)| n == MARKER) {
        let marker = read_marker(dir)?;
        if marker.format > supported {
            return Err(Error::FormatTooNew {
                path: dir.to_path_buf(),
                found: marker.format,
                supported,
            });
        }
        return Ok(Found::Marked(marker));
    }
    if names.is_empty() {
        return Ok(Found::Fresh);
    }
    let sled_owned = |(n, is_dir, _): &(String, bool, u64)| match n.as_str() {
        "conf" | "db" => !is_dir,
        "blobs" => *is_dir,
        other => other.starts_with("snap.") && !is_dir,
    };
    let has = |name: &str| names.iter().any(|(n, d, _)| n == name && !d);
    if has("conf") && has("db") && names.iter().all(sled_owned) && is_sled_conf(&dir.join("conf")) {
        return Ok(Found::BareSled);
    }
    Err(Error::NotAStore {
        path: dir.to_path_buf(),
        found: describe(dir, &names),
    })
}

/// Reads and validates the marker.
pub(crate) fn read_marker(dir: &Path) -> Result<Marker> {
    let path = dir.join(MARKER);
    let not_ours = |why: String| Error::NotAStore {
        path: dir.to_path_buf(),
        found: format!("it holds a file `{MARKER}` that is not an omniq marker ({why})"),
    };
    let mut text = String::new();
    File::open(&path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| not_ours(format!("unreadable: {e}")))?;
    let mut lines = text.lines();
    if lines.next() != Some(MARKER_MAGIC) {
        return Err(not_ours(format!("its first line is not {MARKER_MAGIC:?}")));
    }
    let number = |line: Option<&str>, key: &str| {
        line.and_then(|l| l.strip_prefix(key))
            .and_then(|l| l.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let format = number(lines.next(), "format")
        .and_then(|f| u32::try_from(f).ok())
        .ok_or_else(|| not_ours("no `format N` line".into()))?;
    // The watermark lines are omniq's own bookkeeping: absent (or unreadable) means "none yet".
    let run = number(lines.next(), "run").unwrap_or(0);
    let seq = number(lines.next(), "seq").unwrap_or(0);
    let db_bytes = number(lines.next(), "db_bytes").unwrap_or(0);
    Ok(Marker {
        format,
        run,
        seq,
        db_bytes,
    })
}

/// Writes the marker atomically: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_marker(dir: &Path, marker: &Marker) -> Result<()> {
    let tmp = dir.join(MARKER_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(marker.text().as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(MARKER))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Creates `dir` (and missing parents) for a new store, removes a marker temp file left by a
/// killed creation, and writes the marker. Only for [`Found::Fresh`] directories.
pub(crate) fn create(dir: &Path, format: u32) -> Result<()> {
    let created = !dir.exists();
    fs::create_dir_all(dir).map_err(|e| Error::Open {
        path: dir.to_path_buf(),
        reason: format!("cannot create the directory: {e}"),
    })?;
    if created {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
    }
    write_marker(
        dir,
        &Marker {
            format,
            ..Marker::default()
        },
    )
}

/// Whether `path` is a sled 0.34 `conf` file: three `key: value` lines (`segment_size`,
/// `use_compression`, `version`) followed by a 4-byte checksum.
fn is_sled_conf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    if bytes.len() < 8 || bytes.len() > 256 {
        return false;
    }
    let Ok(text) = std::str::from_utf8(&bytes[..bytes.len() - 4]) else {
        return false;
    };
    let keys: Vec<&str> = text.lines().filter_map(|l| l.split(": ").next()).collect();
    keys == ["segment_size", "use_compression", "version"]
        && text.lines().all(|l| l.split(": ").count() == 2)
}

/// A short description of a directory that is not a store, for [`Error::NotAStore`].
fn describe(dir: &Path, names: &[(String, bool, u64)]) -> String {
    let db = names.iter().find(|(n, d, _)| n == "db" && !d);
    if let Some((_, _, len)) = db {
        let mut head = [0u8; 16];
        let n = File::open(dir.join("db"))
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        let what = if head[..n].starts_with(b"SQLite format 3\0") {
            "an SQLite database".to_string()
        } else {
            "not sled's data file".to_string()
        };
        return format!("it holds a {len}-byte file `db` that is {what}, and no `{MARKER}` marker");
    }
    let shown: Vec<String> = names
        .iter()
        .take(5)
        .map(|(n, d, _)| if *d { format!("{n}/") } else { n.clone() })
        .collect();
    let more = names.len().saturating_sub(shown.len());
    format!(
        "it holds {} entr{} that omniq did not write ({}{}) and no `{MARKER}` marker",
        names.len(),
        if names.len() == 1 { "y" } else { "ies" },
        shown.join(", "),
        if more > 0 {
            format!(", and {more} more")
        } else {
            String::new()
        }
    )
}

/// What [`preflight`] concluded.
#[derive(Debug)]
pub(crate) enum Preflight {
    /// Nothing suspicious.
    Clean,
    /// Open a copy first: the reason is why.
    Suspicious(String),
}

/// Reads sled's newest finished snapshot (read-only, without sled) and checks that every page it
/// points at lies inside `db`. sled's own reader would fail with "Read corrupted data", panic, or
/// (worse) treat the missing tail as a crash and overwrite it, after it has already written a new
/// snapshot. A stale snapshot can legitimately point past a segment sled has since truncated, so
/// a hit is not a verdict: it makes the caller open a copy first.
///
/// With a marker, also: `db` shorter than when omniq last opened or closed it. sled shrinks its
/// file when it frees trailing segments, so this too only asks for a copy first.
pub(crate) fn preflight(dir: &Path, marker: Option<&Marker>) -> Preflight {
    let db_len = match fs::metadata(dir.join("db")) {
        Ok(m) => m.len(),
        Err(_) if marker.is_some_and(|m| m.run > 0) => {
            return Preflight::Suspicious("sled's data file `db` is missing".into())
        }
        Err(_) => return Preflight::Clean,
    };
    if let Some(m) = marker.filter(|m| db_len < m.db_bytes) {
        return Preflight::Suspicious(format!(
            "its data file `db` has {db_len} bytes but had {} when omniq last opened or closed it",
            m.db_bytes
        ));
    }
    let Some(snapshot) = newest_snapshot(dir) else {
        return Preflight::Clean;
    };
    let Ok(bytes) = fs::read(&snapshot) else {
        return Preflight::Clean;
    };
    match snapshot_extent(&bytes) {
        Some(end) if end > db_len => Preflight::Suspicious(format!(
            "sled's snapshot {} points at byte {end} of `db`, which has only {db_len} bytes",
            snapshot
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )),
        _ => Preflight::Clean,
    }
}

/// The snapshot file sled would read: the greatest `snap.*` name, skipping unfinished
/// `.generating` files (removed before sled reads them, see `SledStore::open`).
fn newest_snapshot(dir: &Path) -> Option<PathBuf> {
    let mut snaps: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("snap.")
                    && !n.ends_with(".generating")
                    && !n.ends_with(".in___motion")
            })
        })
        .collect();
    snaps.sort();
    snaps.pop()
}

/// The end (offset + on-log size) of the furthest page a sled 0.34.7 snapshot points at inside
/// the data file; `None` when the bytes do not parse as a snapshot (sled then reports it).
///
/// Layout (sled's `serialization.rs`): the body, then its length (8 bytes LE) and CRC32 (4
/// bytes). Body: `stable_lsn` (a shifted `i64`) and `active_segment` (a shifted varint), then page states
/// to the end: `0` = free (`lsn i64`, disk pointer), `n > 0` = present with `n` entries of
/// (`lsn i64`, disk pointer, size varint). Disk pointer: `0` inline (offset varint) or `1` blob
/// (offset varint, blob lsn i64). Varints: sled's own (<= 240 one byte, 241..=248 two,
/// 249 three, 250..=255 followed by 3..=8 little-endian bytes).
pub(crate) fn snapshot_extent(bytes: &[u8]) -> Option<u64> {
    let body = bytes.get(..bytes.len().checked_sub(12)?)?;
    let mut r = Reader(body);
    r.i64()?; // stable_lsn
    r.varint()?; // active_segment
    let mut end = 0u64;
    while !r.0.is_empty() {
        let n = r.byte()?;
        if n == 0 {
            r.i64()?;
            r.disk_ptr()?;
            continue;
        }
        for _ in 0..n {
            r.i64()?;
            let offset = r.disk_ptr()?;
            let size = r.varint()?;
            end = end.max(offset.checked_add(size)?);
        }
    }
    Some(end)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn varint(&mut self) -> Option<u64> {
        let first = self.byte()?;
        Some(match first {
            0..=240 => u64::from(first),
            241..=248 => 240 + 256 * (u64::from(first) - 241) + u64::from(self.byte()?),
            249 => {
                let b = self.take(2)?;
                2288 + 256 * u64::from(b[0]) + u64::from(b[1])
            }
            other => {
                let n = usize::from(other) - 247;
                let mut le = [0u8; 8];
                le[..n].copy_from_slice(self.take(n)?);
                u64::from_le_bytes(le)
            }
        })
    }
    /// A disk pointer; returns its log offset.
    fn disk_ptr(&mut self) -> Option<u64> {
        match self.byte()? {
            0 => self.varint(),
            1 => {
                let offset = self.varint()?;
                self.i64()?;
                Some(offset)
            }
            _ => None,
        }
    }
}

/// What a trial open of a copy found.
pub(crate) enum Trial {
    /// It opened and holds omniq's format key with a version this build reads.
    Omniq,
    /// It opened and is an empty sled database.
    Empty,
}

/// Copies the sled files of `dir` (`conf`, `db`, finished `snap.*`, `blobs/`) into a temporary
/// directory, opens the copy with sled and reads `m/format`. The original is only read. Fails
/// with [`Error::Damaged`] when sled cannot open the copy (or panics), with
/// [`Error::NotAStore`] when the copy is a sled database without omniq's format key, and with
/// [`Error::FormatTooNew`] for a newer format.
///
/// `expected` is the marker's watermark (or the default): a copy whose `m/run` or `m/seq` is
/// older lost what the last run wrote (sled took the missing part of its log for a crash tail),
/// which is damage too.
pub(crate) fn trial_open_copy(
    dir: &Path,
    supported: u32,
    why: &str,
    expected: &Marker,
) -> Result<Trial> {
    let expected_run = expected.run;
    let tmp = tempfile::Builder::new()
        .prefix("omniq-trial-open")
        .tempdir()
        .map_err(|e| Error::Open {
            path: dir.to_path_buf(),
            reason: format!(
                "{why}, so omniq opens a temporary copy before the directory itself, but cannot \
                 create one: {e}"
            ),
        })?;
    let copy = tmp.path().join("q");
    copy_sled_files(dir, &copy).map_err(|e| Error::Open {
        path: dir.to_path_buf(),
        reason: format!("{why}, so omniq opens a temporary copy first, but copying failed: {e}"),
    })?;
    let opened = open_quietly(
        sled::Config::new()
            .path(&copy)
            .flush_every_ms(None)
            .segment_size(super::sled_config::segment_size(&copy)),
    );
    let damaged = |detail: String| Error::Damaged {
        path: Some(dir.to_path_buf()),
        detail: format!("{detail}; omniq left its files as they were"),
    };
    let db = match opened {
        Some(Ok(db)) => db,
        Some(Err(e)) => {
            return Err(damaged(format!(
                "{why}, and the storage engine cannot read it ({})",
                sled_words(&e)
            )))
        }
        None => {
            return Err(damaged(format!(
                "{why}, and the storage engine fails reading it"
            )))
        }
    };
    let format = db.get(keys::META_FORMAT).map_err(|e| {
        damaged(format!(
            "{why}, and its format key cannot be read ({})",
            sled_words(&e)
        ))
    })?;
    let result = match format {
        Some(bytes) => {
            let found: u32 = codec::decode(RecordKind::Meta, &bytes, &|| "m/format".into())?;
            if found > supported {
                return Err(Error::FormatTooNew {
                    path: dir.to_path_buf(),
                    found,
                    supported,
                });
            }
            let meta = |key: &[u8], name: &str| -> Result<u64> {
                match db.get(key) {
                    Ok(Some(bytes)) => {
                        codec::decode::<u64>(RecordKind::Meta, &bytes, &|| name.to_string())
                    }
                    Ok(None) => Ok(0),
                    Err(e) => Err(damaged(format!(
                        "{why}, and {name} cannot be read ({})",
                        sled_words(&e)
                    ))),
                }
            };
            let found = Marker {
                format: found,
                run: meta(keys::META_RUN, "m/run")?,
                seq: meta(keys::META_SEQ, "m/seq")?,
                db_bytes: 0,
            };
            if let Some(lost) = lost(why, &found, expected) {
                return Err(damaged(lost));
            }
            Trial::Omniq
        }
        None if db.is_empty() && expected_run == 0 => Trial::Empty,
        None if expected_run > 0 => {
            return Err(damaged(format!(
                "{why}, and what the storage engine can read of it holds none of the queue's \
                 data"
            )))
        }
        None => {
            return Err(Error::NotAStore {
                path: dir.to_path_buf(),
                found: format!(
                    "it holds a sled database that omniq did not write ({} key(s) and no format \
                     version)",
                    db.len()
                ),
            })
        }
    };
    Ok(result)
}

/// Why `found` (what sled reads back) is older than the `expected` watermark, if it is.
pub(crate) fn lost(why: &str, found: &Marker, expected: &Marker) -> Option<String> {
    if found.run >= expected.run && found.seq >= expected.seq {
        return None;
    }
    Some(format!(
        "{why}, and what the storage engine can read of it is older than what omniq last made \
         durable (run {} and transition {} against run {} and transition {}): the end of its \
         data file is missing (if its files were restored from an older backup on purpose, \
         delete its `{MARKER}` file to accept them as they are)",
        found.run, found.seq, expected.run, expected.seq
    ))
}

const OPEN_THREAD: &str = "omniq-sled-open";

/// Opens sled on a thread of its own; `None` when sled panicked. sled 0.34.7 panics on some
/// damaged files (index out of bounds in its segment accountant, "tried to serialize
/// Uninitialized"); such a panic is an answer here ("damaged"), so its message is kept off
/// stderr: while the open runs, panics on that thread are not passed to the process's panic
/// hook (every other thread's are), and the hook is restored afterwards.
pub(crate) fn open_quietly(config: sled::Config) -> Option<sled::Result<sled::Db>> {
    static SWAP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SWAP.lock().unwrap_or_else(|e| e.into_inner());
    let previous = std::sync::Arc::new(std::panic::take_hook());
    let forward = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some(OPEN_THREAD) {
            forward(info);
        }
    }));
    let result = std::thread::Builder::new()
        .name(OPEN_THREAD.into())
        .spawn(move || config.open())
        .ok()
        .and_then(|h| h.join().ok());
    drop(std::panic::take_hook());
    match std::sync::Arc::try_unwrap(previous) {
        Ok(hook) => std::panic::set_hook(hook),
        Err(shared) => std::panic::set_hook(Box::new(move |info| shared(info))),
    }
    result
}

/// sled's error in words an operator can use.
fn sled_words(e: &sled::Error) -> String {
    match e {
        sled::Error::Corruption { .. } => "its data does not match its checksums".into(),
        other => other.to_string(),
    }
}

pub(crate) fn copy_sled_files(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let n = name.to_string_lossy();
        let wanted =
            n == "conf" || n == "db" || (n.starts_with("snap.") && !n.ends_with(".generating"));
        if wanted && entry.file_type()?.is_file() {
            fs::copy(entry.path(), to.join(&name))?;
        } else if n == "blobs" && entry.file_type()?.is_dir() {
            let blobs = to.join("blobs");
            fs::create_dir_all(&blobs)?;
            for blob in fs::read_dir(entry.path())? {
                let blob = blob?;
                if blob.file_type()?.is_file() {
                    fs::copy(blob.path(), blobs.join(blob.file_name()))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_varints_match_sleds_encoding() {
        // 300 = 2 bytes (241 + (300-240)/256, (300-240)%256); 70000 = 250 + 3 LE bytes.
        let mut r = Reader(&[241, 60, 250, 0x70, 0x11, 0x01, 5]);
        assert_eq!(r.varint(), Some(300));
        assert_eq!(r.varint(), Some(70000));
        assert_eq!(r.varint(), Some(5));
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn snapshot_extent_is_the_furthest_page_end() {
        let mut body = vec![0u8; 9]; // no stable lsn (i64), no active segment (varint)
        body.push(1); // present, one entry
        body.extend(7i64.to_le_bytes());
        body.extend([0, 100, 20]); // inline at 100, 20 bytes
        body.push(0); // free page
        body.extend(3i64.to_le_bytes());
        body.extend([0, 200]);
        body.push(2); // present, two entries
        body.extend(8i64.to_le_bytes());
        body.extend([0, 50, 10]);
        body.extend(9i64.to_le_bytes());
        body.extend([1, 150, 0, 0, 0, 0, 0, 0, 0, 0, 30]); // blob at 150, 30 bytes
        body.extend([0u8; 12]);
        assert_eq!(snapshot_extent(&body), Some(180));
        assert_eq!(snapshot_extent(&[1, 2, 3]), None);
        let mut cut = vec![0u8; 9];
        cut.extend([1, 9, 0, 0]);
        cut.extend([0u8; 12]);
        assert_eq!(snapshot_extent(&cut), None);
    }

    #[test]
    fn a_read_back_state_older_than_the_watermark_is_lost_data() {
        let mark = |run, seq| Marker {
            format: 1,
            run,
            seq,
            db_bytes: 0,
        };
        assert_eq!(lost("w", &mark(2, 10), &mark(2, 10)), None);
        assert_eq!(lost("w", &mark(3, 11), &mark(2, 10)), None);
        assert!(lost("w", &mark(2, 9), &mark(2, 10)).is_some());
        assert!(lost("w", &mark(1, 10), &mark(2, 10)).is_some());
    }

    #[test]
    fn markers_parse_and_foreign_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let m = Marker {
            format: 1,
            run: 3,
            seq: 17,
            db_bytes: 4096,
        };
        write_marker(dir.path(), &m).unwrap();
        assert_eq!(probe(dir.path(), 1).unwrap(), Found::Marked(m));
        assert!(matches!(
            probe(dir.path(), 0),
            Err(Error::FormatTooNew { found: 1, .. })
        ));
        fs::write(dir.path().join(MARKER), "hello\n").unwrap();
        assert!(matches!(probe(dir.path(), 1), Err(Error::NotAStore { .. })));
        let empty = tempfile::tempdir().unwrap();
        fs::write(empty.path().join(MARKER_TMP), "omn").unwrap();
        assert_eq!(probe(empty.path(), 1).unwrap(), Found::Fresh);
    }
}
