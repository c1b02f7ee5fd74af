//! sled's configuration for a store directory (issue 12: bounded memory).
//!
//! sled 0.34's resident memory while a store grows scales with its log segment size, not with
//! `cache_capacity`: building 200,000 pending tasks with `enqueue_many` reached 867 MiB RSS
//! with sled's default 512 KiB segments, 3.7 GiB with 4 MiB segments and 350 MiB with 64 KiB
//! (BENCHMARKS.md, "Issue 12"). New stores therefore use [`SEGMENT_SIZE`]. sled refuses to open a
//! directory with a segment size other than the one it was created with (it records it in its
//! `conf` file), so an existing store keeps its own: the size is read back from `conf`.

use std::path::Path;

/// Log segment size of a new store, bytes (sled's default is 512 KiB).
pub(crate) const SEGMENT_SIZE: usize = 128 << 10;

/// The segment size recorded in the `conf` file of the sled database in `dir`, if there is one
/// that says so (a power of two in sled's accepted range).
pub(crate) fn recorded_segment_size(dir: &Path) -> Option<usize> {
    let bytes = std::fs::read(dir.join("conf")).ok()?;
    let text = std::str::from_utf8(bytes.get(..bytes.len().checked_sub(4)?)?).ok()?;
    let size = text
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: "))?
        .trim()
        .parse::<usize>()
        .ok()?;
    (size.is_power_of_two() && (256..=1 << 24).contains(&size)).then_some(size)
}

/// The segment size to open `dir` with: its recorded one, or [`SEGMENT_SIZE`] for a new store.
pub(crate) fn segment_size(dir: &Path) -> usize {
    recorded_segment_size(dir).unwrap_or(SEGMENT_SIZE)
}

/// sled's configuration for the store in `dir`.
pub(crate) fn config(dir: &Path, cache_bytes: u64, flush_every_ms: Option<u64>) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .flush_every_ms(flush_every_ms)
        .mode(sled::Mode::HighThroughput)
        .segment_size(segment_size(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_store_gets_the_small_segments_and_an_old_one_keeps_its_own() {
        let tmp = tempfile::TempDir::new().unwrap();
        let fresh = tmp.path().join("fresh");
        assert_eq!(segment_size(&fresh), SEGMENT_SIZE);
        let db = config(&fresh, 1 << 20, None).open().unwrap();
        drop(db);
        assert_eq!(recorded_segment_size(&fresh), Some(SEGMENT_SIZE));

        // A store created by an older build, with sled's default 512 KiB segments, reopens.
        let old = tmp.path().join("old");
        let db = sled::Config::new().path(&old).open().unwrap();
        db.insert(b"k", b"v").unwrap();
        db.flush().unwrap();
        drop(db);
        assert_eq!(recorded_segment_size(&old), Some(512 << 10));
        let db = config(&old, 1 << 20, None).open().unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));

        // A conf file that does not say, or says nonsense: the default.
        std::fs::write(tmp.path().join("conf"), b"segment_size: 1000\n\0\0\0\0").unwrap();
        assert_eq!(recorded_segment_size(tmp.path()), None);
    }
}
