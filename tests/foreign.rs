//! Directories that are not (or no longer) readable omniq stores: opening one never modifies,
//! creates in, or "repairs" it. Every case is checked byte for byte (every file's contents and
//! the list of names, before and after) for `Queue::open` here and for every CLI command in
//! `tests/cli.rs`.
//!
//! - a random 100 KB file named `db`;
//! - an SQLite database named `db` (SQLite's 16-byte header and junk);
//! - a directory of unrelated files;
//! - a real store whose `db` was truncated (reported as `Error::Damaged`, untouched);
//! - a file `OMNIQ` that is not omniq's marker, a plain file given as the directory;
//! - a sled database omniq did not write.
//!
//! And the stores omniq does recognise: a new one gets the marker before sled writes anything;
//! a format-1 store written before the marker existed opens (checked on a copy first) and gets
//! its marker; an empty directory is created in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use omniq::{EnqueueOptions, Error, Queue, Status, TaskId};

mod common;
use common::{raw_db, reopen};

/// Every entry under `dir`: relative name -> contents (`None` for a directory).
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(root: &Path, at: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        let mut entries: Vec<_> = std::fs::read_dir(at)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.is_dir() {
        walk(dir, dir, &mut out);
    } else {
        out.insert(PathBuf::new(), Some(std::fs::read(dir).unwrap()));
    }
    out
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn random_db(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("db"), noise(100 * 1024, 0x9e37_79b9_7f4a_7c15)).unwrap();
}

fn sqlite_db(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.extend(noise(8 * 1024, 7));
    std::fs::write(dir.join("db"), bytes).unwrap();
}

fn unrelated_files(dir: &Path) {
    std::fs::create_dir_all(dir.join("photos")).unwrap();
    std::fs::write(dir.join("notes.txt"), "shopping: milk\n").unwrap();
    std::fs::write(dir.join("photos/cat.jpg"), noise(4096, 3)).unwrap();
    std::fs::write(dir.join("conf"), "not sled's\n").unwrap();
}

fn bad_marker(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("OMNIQ"), "some other program's lock file\n").unwrap();
}

/// A real store with `n` tasks, opened twice (so sled's snapshot covers its data), then `db`
/// cut to half its length. Returns the ids.
pub fn truncated_store(dir: &Path, n: usize) -> Vec<TaskId> {
    truncated_store_after(dir, n, 2, 0.5)
}

/// A real store with `n` tasks enqueued in its first run, then `reopens` more runs, then `db`
/// cut to `keep` of its length.
pub fn truncated_store_after(dir: &Path, n: usize, reopens: usize, keep: f64) -> Vec<TaskId> {
    let ids = {
        let q = Queue::open(dir).unwrap();
        (0..n)
            .map(|i| {
                q.enqueue_json(
                    "k",
                    &serde_json::json!({ "n": i, "pad": "x".repeat(200) }),
                    EnqueueOptions::new(),
                )
                .unwrap()
            })
            .collect()
    };
    for _ in 0..reopens {
        drop(reopen(|| Queue::open(dir)).unwrap());
    }
    // Let sled's threads let go of the directory before its files are edited.
    wait_unlocked(dir);
    let db = dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.set_len((len as f64 * keep) as u64).unwrap();
    f.sync_all().unwrap();
    ids
}

/// Waits until no one holds sled's lock on `dir/db` (a queue just closed in this process lets go
/// of it from a background thread).
fn wait_unlocked(dir: &Path) {
    let file = std::fs::File::open(dir.join("db")).unwrap();
    common::retry_while_locked(
        || file.try_lock().map(|()| file.unlock().unwrap()),
        |e| matches!(e, std::fs::TryLockError::WouldBlock),
    )
    .unwrap();
}

fn assert_not_a_store(dir: &Path, needle: &str) {
    let before = tree(dir);
    match Queue::open(dir) {
        Err(e @ Error::NotAStore { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&dir.display().to_string()), "{text}");
            assert!(text.contains(needle), "lacks {needle:?}: {text}");
        }
        Err(other) => panic!("{}: expected NotAStore, got {other:?}", dir.display()),
        Ok(_) => panic!("{}: a foreign directory was opened", dir.display()),
    }
    assert_eq!(tree(dir), before, "{}: opening changed it", dir.display());
}

#[test]
fn foreign_directories_are_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let random = tmp.path().join("random");
    random_db(&random);
    assert_not_a_store(
        &random,
        "102400-byte file `db` that is not sled's data file",
    );
    let sqlite = tmp.path().join("sqlite");
    sqlite_db(&sqlite);
    assert_not_a_store(&sqlite, "an SQLite database");
    let files = tmp.path().join("files");
    unrelated_files(&files);
    assert_not_a_store(
        &files,
        "3 entries that omniq did not write (conf, notes.txt, photos/)",
    );
    let marker = tmp.path().join("marker");
    bad_marker(&marker);
    assert_not_a_store(&marker, "not an omniq marker");
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    assert_not_a_store(&file, "not a directory");
}

#[test]
fn a_truncated_store_is_reported_damaged_and_left_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    truncated_store(&dir, 3000);
    let before = tree(&dir);
    let err = match Queue::open(&dir) {
        Err(e) => e,
        Ok(q) => panic!(
            "a truncated store opened with {} task(s)",
            q.stats().unwrap().total
        ),
    };
    assert!(matches!(err, Error::Damaged { .. }), "{err:?}");
    let text = err.to_string();
    for needle in [
        dir.display().to_string().as_str(),
        "is damaged",
        "when omniq last opened or closed it",
        "left its files as they were",
        "restore the directory from a backup",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}: {text}");
    }
    assert!(!text.contains("Inline("), "sled's words leak: {text}");
    assert_eq!(tree(&dir), before, "a failing open changed the store");
}

#[test]
fn a_sled_database_omniq_did_not_write_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sled");
    {
        let db = raw_db(&dir);
        db.insert(b"someone else's key", b"value".to_vec()).unwrap();
        db.flush().unwrap();
    }
    // sled lets go of its lock from a background thread: wait until a queue could open.
    let before = tree(&dir);
    let err = reopen(|| Queue::open(&dir)).expect_err("must be refused");
    assert!(matches!(err, Error::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("no format version"), "{err}");
    assert_eq!(tree(&dir), before);
}

/// A new store gets its marker; an empty directory is created in; a store written before the
/// marker existed (format 1: sled's files and `m/format`) opens with its tasks and gains it.
#[test]
fn stores_omniq_wrote_open_and_carry_the_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("a/b/fresh");
    drop(Queue::open(&fresh).unwrap());
    let marker = std::fs::read_to_string(fresh.join("OMNIQ")).unwrap();
    assert!(
        marker.starts_with("omniq queue directory\nformat 4\nrun 1\nseq 0\ndb_bytes "),
        "{marker}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    drop(Queue::open(&empty).unwrap());
    assert!(empty.join("OMNIQ").is_file());

    let legacy = tmp.path().join("legacy");
    let id = {
        let q = Queue::open(&legacy).unwrap();
        q.enqueue_json("k", &serde_json::json!(1), EnqueueOptions::new())
            .unwrap()
    };
    std::fs::remove_file(legacy.join("OMNIQ")).unwrap();
    let q = reopen(|| Queue::open(&legacy)).unwrap();
    assert_eq!(q.get(id).unwrap().unwrap().status, Status::Pending);
    assert!(legacy.join("OMNIQ").is_file(), "the marker is added");
    drop(q);
    let q = reopen(|| Queue::open(&legacy)).unwrap();
    assert_eq!(q.stats().unwrap().total, 1);
}

/// The common case the snapshot cannot see: a store written in one run (sled's only snapshot is
/// from before the run wrote anything), closed, then cut short. sled alone opens it as an empty
/// store (or panics, or fails) after rewriting it; the watermark in the marker (`db` was longer
/// at the last close; `m/run` must reach the marker's run) makes omniq open a copy first and
/// refuse, leaving the files as they were.
#[test]
fn a_store_truncated_after_a_single_run_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, keep) in [0.1, 0.5, 0.8].into_iter().enumerate() {
        for reopens in [0, 1] {
            let dir = tmp.path().join(format!("q{i}-{reopens}"));
            truncated_store_after(&dir, 2000, reopens, keep);
            let before = tree(&dir);
            match Queue::open(&dir) {
                Err(Error::Damaged { .. }) => {}
                Err(other) => panic!("keep {keep}, reopens {reopens}: {other:?}"),
                Ok(q) => panic!(
                    "keep {keep}, reopens {reopens}: a truncated store opened with {} task(s)",
                    q.stats().unwrap().total
                ),
            }
            assert_eq!(tree(&dir), before, "keep {keep}, reopens {reopens}");
        }
    }
}

/// A marker-less store whose data file was truncated is not adopted, and not changed.
#[test]
fn a_truncated_store_without_marker_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    truncated_store(&dir, 3000);
    std::fs::remove_file(dir.join("OMNIQ")).unwrap();
    let before = tree(&dir);
    let err = Queue::open(&dir).expect_err("must be refused");
    assert!(matches!(err, Error::Damaged { .. }), "{err:?}");
    // Without a marker there is no watermark: sled's snapshot gives the truncation away.
    assert!(err.to_string().contains("points at byte"), "{err}");
    assert_eq!(tree(&dir), before);
}

// ----- the CLI ------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_omniq");
const SOME_ID: &str = "01a20000-0000-7000-8000-000000000000";

fn omniq(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .env("OMNIQ_DEMO_WORK_MS", "1")
        .output()
        .expect("run omniq")
}

/// Every command, human and `--json`: refused with exit status 1, one `error:` line naming the
/// directory and containing `needle`, a JSON error document of `kind` with `--json`, and not one
/// byte or name in the directory changed.
fn every_command_refuses(dir: &Path, kind: &str, needle: &str) {
    let commands: &[&[&str]] = &[
        &["stats"],
        &["list"],
        &["list", "--status", "failed"],
        &["show", SOME_ID],
        &["retry", SOME_ID],
        &["retry", "--all-failed"],
        &["cancel", SOME_ID],
        &["purge", "--older-than", "1d"],
        &["purge", "--older-than", "0", "--dry-run"],
        &["check"],
        &["demo", "--tasks", "5"],
    ];
    let before = tree(dir);
    let shown = std::path::absolute(dir).unwrap().display().to_string();
    for args in commands {
        for json in [false, true] {
            let mut all = Vec::new();
            if json {
                all.push("--json");
            }
            all.extend_from_slice(args);
            let o = omniq(dir, &all);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "omniq {all:?}: {err}");
            assert!(err.starts_with("error: "), "omniq {all:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "omniq {all:?}: {err}");
            assert!(
                err.contains(&shown) || err.contains(&dir.display().to_string()),
                "omniq {all:?} does not name the directory: {err}"
            );
            assert!(
                err.contains(needle),
                "omniq {all:?} lacks {needle:?}: {err}"
            );
            if json {
                let doc: serde_json::Value = serde_json::from_slice(&o.stdout)
                    .unwrap_or_else(|e| panic!("omniq {all:?}: stdout is not JSON ({e})"));
                assert_eq!(doc["error"]["kind"], kind, "omniq {all:?}: {doc}");
                assert_eq!(doc["error"]["exit_code"], 1);
                assert!(doc["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(needle)));
            } else {
                assert!(o.stdout.is_empty(), "omniq {all:?} printed on stdout");
            }
            assert_eq!(tree(dir), before, "omniq {all:?} changed {}", dir.display());
        }
    }
}

#[test]
fn every_cli_command_refuses_a_foreign_directory_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let random = tmp.path().join("random");
    random_db(&random);
    every_command_refuses(&random, "not_a_store", "is not an omniq queue directory");
    let sqlite = tmp.path().join("sqlite");
    sqlite_db(&sqlite);
    every_command_refuses(&sqlite, "not_a_store", "an SQLite database");
    let files = tmp.path().join("files");
    unrelated_files(&files);
    every_command_refuses(&files, "not_a_store", "omniq did not write");
    let marker = tmp.path().join("marker");
    bad_marker(&marker);
    every_command_refuses(&marker, "not_a_store", "not an omniq marker");
}

/// The reported case: a truncated `db` printed "storage error: Read corrupted data at file
/// offset Some(Inline(581985)) backtrace ()". Now every command says the directory is damaged
/// and what to do, and leaves it as it was.
#[test]
fn every_cli_command_reports_a_truncated_store_as_damaged_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    truncated_store(&dir, 3000);
    every_command_refuses(&dir, "corrupt", "is damaged");
    let o = omniq(&dir, &["stats"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("restore the directory from a backup"), "{err}");
    assert!(
        !err.contains("Inline(") && !err.contains("backtrace"),
        "{err}"
    );
}

/// Commands that read never create anything in a missing or empty directory.
#[test]
fn read_commands_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = tmp.path().join("missing");
    for args in [
        &["stats"][..],
        &["list"],
        &["show", SOME_ID],
        &["check"],
        &["purge", "--older-than", "1d", "--dry-run"],
    ] {
        for dir in [&empty, &missing] {
            let o = omniq(dir, args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let mut json = vec!["--json"];
            json.extend_from_slice(args);
            let o = omniq(dir, &json);
            let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(doc["error"]["kind"], "no_queue");
        }
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "{args:?}");
        assert!(!missing.exists(), "{args:?}");
    }
}

/// Files restored from an older backup under a newer marker read back older than the marker's
/// watermark: refused as damaged, with the way out in the message (delete `OMNIQ`), which then
/// accepts the restored state.
#[test]
fn an_older_backup_under_a_newer_marker_is_refused_until_the_marker_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let backup = tmp.path().join("backup");
    let enqueue = |q: &Queue, n: usize| {
        for i in 0..n {
            q.enqueue_json("k", &serde_json::json!(i), EnqueueOptions::new())
                .unwrap();
        }
    };
    enqueue(&Queue::open(&dir).unwrap(), 10);
    wait_unlocked(&dir);
    std::fs::create_dir(&backup).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "OMNIQ" {
            std::fs::copy(e.path(), backup.join(e.file_name())).unwrap();
        }
    }
    enqueue(&reopen(|| Queue::open(&dir)).unwrap(), 10);
    wait_unlocked(&dir);
    // Restore the backup's sled files, keeping the newer marker.
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "OMNIQ" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    for e in std::fs::read_dir(&backup).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let err = Queue::open(&dir).expect_err("older than the watermark");
    assert!(matches!(err, Error::Damaged { .. }), "{err:?}");
    assert!(err.to_string().contains("delete its `OMNIQ` file"), "{err}");
    std::fs::remove_file(dir.join("OMNIQ")).unwrap();
    let q = reopen(|| Queue::open(&dir)).unwrap();
    assert_eq!(q.stats().unwrap().total, 10, "the backup's state");
    assert!(dir.join("OMNIQ").is_file());
}

/// The write-ahead log (format 3) at open: records past what sled holds are replayed and a torn
/// last record dropped; a record damaged before valid records written after it was made durable
/// is `Error::Damaged` naming the file, with every file left as it was; log files without a
/// marker are not a store.
#[test]
fn a_damaged_write_ahead_log_is_refused_untouched_and_a_torn_tail_dropped() {
    use omniq::wal::{encode_record, segment_name};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    {
        let q = Queue::open(&dir).unwrap();
        q.enqueue_json("k", &serde_json::json!(1), EnqueueOptions::new())
            .unwrap();
    }
    let applied: u64 = {
        let db = raw_db(&dir);
        let v = db.get(omniq::keys::META_WAL).unwrap().unwrap();
        omniq::codec::decode(omniq::codec::RecordKind::Meta, &v, &|| "m/wal".into()).unwrap()
    };
    let put = |k: &str| vec![(k.as_bytes().to_vec(), Some(b"v".to_vec()))];
    // Three records after sled's last, each written after the one before was made durable.
    let mut log = Vec::new();
    let mut ends = Vec::new();
    for (i, k) in ["zz-1", "zz-2", "zz-3"].iter().enumerate() {
        let lsn = applied + 1 + i as u64;
        encode_record(lsn, lsn - 1, &put(k), &mut log);
        ends.push(log.len());
    }
    let seg = dir.join(segment_name(applied + 1));

    // Damage in the second record: refused, untouched.
    let mut bad = log.clone();
    bad[ends[0] + 30] ^= 0x40;
    std::fs::write(&seg, &bad).unwrap();
    let before = tree(&dir);
    let err = reopen(|| Queue::open(&dir)).expect_err("a damaged log must be refused");
    assert!(matches!(err, Error::Damaged { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&segment_name(applied + 1)),
        "{err}"
    );
    assert_eq!(tree(&dir), before, "a refused open changed the directory");

    // Only the last record torn: the first two are replayed, the third dropped.
    std::fs::write(&seg, &log[..ends[2] - 3]).unwrap();
    drop(reopen(|| Queue::open(&dir)).unwrap());
    let db = raw_db(&dir);
    assert!(db.get("zz-1").unwrap().is_some() && db.get("zz-2").unwrap().is_some());
    assert!(db.get("zz-3").unwrap().is_none());
    drop(db);
    assert!(
        !std::fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("wal.")),
        "a clean close leaves no log"
    );

    // Log files without a marker: not a store.
    let stray = tmp.path().join("stray");
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(stray.join(segment_name(1)), &log).unwrap();
    let before = tree(&stray);
    let err = Queue::open(&stray).expect_err("refused");
    assert!(matches!(err, Error::NotAStore { .. }), "{err:?}");
    assert_eq!(tree(&stray), before);
}
