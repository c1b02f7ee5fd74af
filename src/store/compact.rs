//! Online compaction of the sled store: the live keys are copied into a fresh sled database (a
//! new *generation*), which is made durable and switched to atomically; the old files are then
//! deleted. sled 0.34 never returns space in practice (it truncates its file only when the
//! segments at its end are free, and its cleaner never moves live pages out of the tail), so
//! this is how a directory shrinks back after a purge (issue 12).
//!
//! **Layout.** A store created by omniq keeps sled's files (`conf`, `db`, `snap.*`, `blobs/`) at
//! the directory's root, beside `OMNIQ` and the `wal.*` segments: generation 0. The first
//! compaction moves them to `sled.1/`, the next to `sled.2/`, and so on. The pointer file
//! [`POINTER`] (`sled.<n>\n`) names the current generation; without it the root is current.
//! The write-ahead log stays at the root in every generation: a new generation carries the
//! same `m/wal` watermark as the old one (it is an exact copy), so the log applies to either.
//!
//! **Switching** is a rename: the pointer is written to [`POINTER_TMP`], fsynced, renamed over
//! [`POINTER`], and the directory fsynced, after the new generation's files and directory
//! entries are durable. A crash before the rename leaves the old generation current (the new
//! one is a leftover); after it, the new one (the old one is the leftover). At open, once sled
//! holds the current generation's lock (so no other process uses the directory), leftovers are
//! removed by [`remove_leftovers`] — only names omniq creates (`sled.<n>` directories holding
//! nothing but sled's files, the root's sled files once a pointer exists, the pointer's temp
//! file); anything else is left alone with a warning.
//!
//! The layout is recognised by the pointer file, not by the format number: a build that knows
//! it reads both layouts whatever the format says.

use std::fs::{self, File};
use std::io::Write;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};

/// The pointer file naming the current sled generation.
pub const POINTER: &str = "sled.current";
/// The pointer's temporary name while it is written.
pub const POINTER_TMP: &str = "sled.current.tmp";
/// Generation directories are `sled.<n>`.
const GEN_PREFIX: &str = "sled.";

/// The name of generation `n`'s directory (`n` > 0).
pub(crate) fn generation_name(n: u64) -> String {
    format!("{GEN_PREFIX}{n}")
}

/// The generation a directory entry name is, if it is one (`sled.<digits>`, not `sled.0`).
fn parse_generation(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(GEN_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok().filter(|n| *n > 0)
}

/// Where sled's files are: generation `number` (0 = the root) in `dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub number: u64,
    pub dir: PathBuf,
}

/// Reads the pointer (without writing anything): the current generation of the store in `root`.
/// A pointer that does not parse, or names a directory that is missing, is damage.
pub(crate) fn resolve(root: &Path) -> Result<Layout> {
    let path = root.join(POINTER);
    let text = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Layout {
                number: 0,
                dir: root.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(Error::Open {
                path: root.to_path_buf(),
                reason: format!("cannot read `{POINTER}`: {e}"),
            })
        }
    };
    let damaged = |detail: String| Error::Damaged {
        path: Some(root.to_path_buf()),
        detail,
    };
    let name = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| t.strip_suffix('\n'))
        .filter(|t| !t.contains('\n'))
        .ok_or_else(|| damaged(format!("its generation pointer `{POINTER}` does not parse")))?;
    let number = parse_generation(name).ok_or_else(|| {
        damaged(format!(
            "its generation pointer `{POINTER}` names {name:?}, not a generation"
        ))
    })?;
    let dir = root.join(name);
    if !dir.join("db").is_file() {
        return Err(damaged(format!(
            "its generation pointer `{POINTER}` names `{name}`, which has no data file `db`"
        )));
    }
    Ok(Layout { number, dir })
}

/// Makes generation `number` current: pointer temp file, fsync, rename, directory fsync. The
/// generation's files and its directory entry must already be durable.
pub(crate) fn write_pointer(root: &Path, number: u64) -> Result<()> {
    let tmp = root.join(POINTER_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(format!("{}\n", generation_name(number)).as_bytes())?;
    f.sync_all()?;
    drop(f);
    crate::store::hook::reached("compact-pointer");
    fs::rename(&tmp, root.join(POINTER))?;
    sync_dir(root)?;
    Ok(())
}

/// Whether `name` is one of sled's own files or directories (what sled 0.34 creates in its
/// directory).
fn is_sled_file(name: &str, is_dir: bool) -> bool {
    match name {
        "conf" | "db" => !is_dir,
        "blobs" => is_dir,
        other => other.starts_with("snap.") && !is_dir,
    }
}

/// Removes a generation directory that holds only sled's files (omniq created it and sled
/// filled it). Returns whether it is gone; one holding anything else is left with a warning.
pub(crate) fn remove_generation_dir(dir: &Path) -> Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_sled_file(&name, entry.file_type()?.is_dir()) {
            tracing::warn!(dir = %dir.display(), file = %name, "not removing a leftover sled generation: it holds a file omniq did not create");
            return Ok(false);
        }
    }
    remove_sled_files(dir)?;
    fs::remove_dir(dir)?;
    Ok(true)
}

/// Removes sled's files from `dir` (the root generation's, or a generation directory's): the
/// snapshots first, then `conf`, `blobs/` and last `db`, with a fault point between files.
fn remove_sled_files(dir: &Path) -> Result<()> {
    let mut snaps = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && entry.file_type()?.is_file() {
            snaps.push(entry.path());
        }
    }
    for snap in snaps {
        remove_file_if_present(&snap)?;
        crate::store::hook::reached("compact-delete");
    }
    remove_file_if_present(&dir.join("conf"))?;
    let blobs = dir.join("blobs");
    if blobs.is_dir() {
        for blob in fs::read_dir(&blobs)? {
            let blob = blob?;
            if blob.file_type()?.is_file() {
                fs::remove_file(blob.path())?;
            }
        }
        fs::remove_dir(&blobs)?;
    }
    crate::store::hook::reached("compact-delete");
    remove_file_if_present(&dir.join("db"))?;
    sync_dir(dir)?;
    Ok(())
}

fn remove_file_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes what an interrupted compaction left in `root`, given the current generation:
/// every other `sled.<n>` directory (a half-written new generation, or the old one after the
/// switch), the root's sled files when a later generation is current, and the pointer's temp
/// file. Only call it while holding the current generation's lock. Returns how many
/// generations it removed.
pub(crate) fn remove_leftovers(root: &Path, current: &Layout) -> Result<usize> {
    let mut removed = 0;
    let mut others = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = parse_generation(&name) {
            if n != current.number && entry.file_type()?.is_dir() {
                others.push(entry.path());
            }
        }
    }
    for dir in others {
        tracing::warn!(dir = %dir.display(), "removing a sled generation an interrupted compaction left");
        if remove_generation_dir(&dir)? {
            removed += 1;
        }
    }
    if current.number > 0 && root.join("db").is_file() {
        tracing::warn!(dir = %root.display(), "removing the pre-compaction sled files an interrupted compaction left");
        remove_sled_files(root)?;
        removed += 1;
    }
    remove_file_if_present(&root.join(POINTER_TMP))?;
    if removed > 0 {
        sync_dir(root)?;
    }
    Ok(removed)
}

/// Removes the generation a compaction switched away from, once sled has let go of it (its
/// lock on `db` is free: every handle and sled's own threads are gone). Gives up, leaving the
/// files for the next open's [`remove_leftovers`], if that takes longer than `wait`.
pub(crate) fn remove_old_generation(root: &Path, old: &Layout, wait: Duration) -> Result<bool> {
    if !wait_for_unlock(&old.dir.join("db"), wait) {
        tracing::warn!(dir = %old.dir.display(), "the old sled generation is still in use; the next open removes it");
        return Ok(false);
    }
    if old.number == 0 {
        remove_sled_files(root)?;
        Ok(true)
    } else {
        let gone = remove_generation_dir(&old.dir)?;
        sync_dir(root)?;
        Ok(gone)
    }
}

/// Waits until nobody holds the `flock` sled takes on `db_file` (or it is gone); false after
/// `wait`.
pub(crate) fn wait_for_unlock(db_file: &Path, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let Ok(file) = File::open(db_file) else {
            return true;
        };
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                return true;
            }
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::fs::TryLockError::WouldBlock) => return false,
            Err(std::fs::TryLockError::Error(_)) => return true,
        }
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The sled database in use: its handle, its data file (opened separately to `fsync` it) and
/// where it lives.
pub(crate) struct Generation {
    pub db: sled::Db,
    pub data_file: File,
    pub layout: Layout,
}

/// The current [`Generation`], replaced whole by a compaction. Every read and write goes
/// through it (the methods mirror sled's, each on the generation current when called), so a
/// reader never holds a handle across a switch for longer than one call or iterator.
pub(crate) struct LiveDb {
    current: RwLock<Generation>,
    /// The data file whose lock the store waits for at close (the current generation's).
    lock_file: Arc<Mutex<PathBuf>>,
}

impl LiveDb {
    pub(crate) fn new(generation: Generation) -> LiveDb {
        let lock_file = generation.layout.dir.join("db");
        LiveDb {
            current: RwLock::new(generation),
            lock_file: Arc::new(Mutex::new(lock_file)),
        }
    }

    /// A handle on the current database (for a long scan, or a copy).
    pub(crate) fn handle(&self) -> sled::Db {
        self.current.read().db.clone()
    }

    /// Where the current generation lives.
    pub(crate) fn layout(&self) -> Layout {
        self.current.read().layout.clone()
    }

    /// Replaces the generation; returns the old one.
    pub(crate) fn replace(&self, generation: Generation) -> Generation {
        *self.lock_file.lock() = generation.layout.dir.join("db");
        std::mem::replace(&mut *self.current.write(), generation)
    }

    /// The current generation's data file (kept up to date across switches), for the lock
    /// wait at close.
    pub(crate) fn lock_file(&self) -> Arc<Mutex<PathBuf>> {
        self.lock_file.clone()
    }

    /// `fsync` of the current data file.
    pub(crate) fn sync_data_file(&self) -> Result<()> {
        self.current.read().data_file.sync_all()?;
        Ok(())
    }

    /// The current data file's length.
    pub(crate) fn data_len(&self) -> Result<u64> {
        Ok(self.current.read().data_file.metadata()?.len())
    }

    pub(crate) fn get<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<sled::IVec>> {
        self.current.read().db.get(key)
    }

    pub(crate) fn insert<K: AsRef<[u8]>, V: Into<sled::IVec>>(
        &self,
        key: K,
        value: V,
    ) -> sled::Result<Option<sled::IVec>> {
        self.current.read().db.insert(key, value)
    }

    pub(crate) fn remove<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<sled::IVec>> {
        self.current.read().db.remove(key)
    }

    pub(crate) fn scan_prefix<P: AsRef<[u8]>>(&self, prefix: P) -> sled::Iter {
        self.current.read().db.scan_prefix(prefix)
    }

    pub(crate) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> sled::Iter {
        self.current.read().db.range(range)
    }

    pub(crate) fn apply_batch(&self, batch: sled::Batch) -> sled::Result<()> {
        self.current.read().db.apply_batch(batch)
    }

    pub(crate) fn flush(&self) -> sled::Result<usize> {
        self.current.read().db.flush()
    }

    pub(crate) fn size_on_disk(&self) -> sled::Result<u64> {
        self.current.read().db.size_on_disk()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.current.read().db.is_empty()
    }
}

/// What one compaction did (the store's side of [`CompactReport`](crate::CompactReport)).
#[derive(Clone, Debug, Default)]
pub(crate) struct Compacted {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub keys_copied: u64,
    pub live_bytes: u64,
    pub duration: Duration,
    pub write_pause: Duration,
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_parse_strictly() {
        assert_eq!(parse_generation("sled.1"), Some(1));
        assert_eq!(parse_generation("sled.42"), Some(42));
        for bad in [
            "sled.",
            "sled.0",
            "sled.01",
            "sled.1a",
            "sled.current",
            "snap.1",
            "sled.-1",
        ] {
            assert_eq!(parse_generation(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_pointer_round_trips_and_damage_is_reported() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(resolve(root.path()).unwrap().number, 0);
        fs::create_dir(root.path().join("sled.3")).unwrap();
        fs::write(root.path().join("sled.3/db"), b"").unwrap();
        write_pointer(root.path(), 3).unwrap();
        let l = resolve(root.path()).unwrap();
        assert_eq!((l.number, l.dir.clone()), (3, root.path().join("sled.3")));
        write_pointer(root.path(), 4).unwrap();
        assert!(matches!(resolve(root.path()), Err(Error::Damaged { .. })));
        fs::write(root.path().join(POINTER), b"sled.x\n").unwrap();
        assert!(matches!(resolve(root.path()), Err(Error::Damaged { .. })));
    }

    #[test]
    fn leftovers_are_removed_but_foreign_files_are_not() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for n in [1, 2, 3] {
            let d = r.join(generation_name(n));
            fs::create_dir_all(d.join("blobs")).unwrap();
            fs::write(d.join("db"), b"x").unwrap();
            fs::write(d.join("conf"), b"x").unwrap();
            fs::write(d.join("snap.0000001"), b"x").unwrap();
        }
        // Someone else's file in generation 3: that directory stays.
        fs::write(r.join("sled.3/notes.txt"), b"mine").unwrap();
        fs::write(r.join("db"), b"root").unwrap();
        fs::write(r.join("conf"), b"root").unwrap();
        fs::write(r.join("OMNIQ"), b"marker").unwrap();
        fs::write(r.join(POINTER_TMP), b"sled.9\n").unwrap();
        let current = Layout {
            number: 2,
            dir: r.join("sled.2"),
        };
        assert_eq!(remove_leftovers(r, &current).unwrap(), 2);
        assert!(!r.join("sled.1").exists());
        assert!(r.join("sled.2/db").exists());
        assert!(r.join("sled.3/notes.txt").exists());
        assert!(!r.join("db").exists() && !r.join("conf").exists());
        assert!(r.join("OMNIQ").exists());
        assert!(!r.join(POINTER_TMP).exists());
    }
}
