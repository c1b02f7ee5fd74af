//! Online compaction (issue 12: "the directory shrinks back after a purge"): a purge followed by
//! a compaction gives the space back; compaction while a producer and workers run loses and
//! repeats nothing; a store in the original layout (sled at the root) compacts into a
//! generation directory and reopens. Kills at every step of a compaction are in `crash.rs`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use omniq::{AutoCompact, EnqueueOptions, Queue, Status, Task, TaskContext, TaskError, TaskId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    omniq::bench::disk::dir_bytes(dir).unwrap()
}

/// [`dir_bytes`] without the write-ahead log's files (`wal.*`): preallocated while the queue is
/// open, so the same size whatever the store holds, and deleted at close.
fn data_bytes(dir: &Path) -> u64 {
    let log: u64 = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("wal."))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    dir_bytes(dir) - log
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn reopen(dir: &Path) -> Queue {
    common::reopen(|| Queue::open(dir)).unwrap()
}

#[derive(Serialize, Deserialize)]
struct Noop {
    n: usize,
    pad: String,
}

impl Task for Noop {
    const NAME: &'static str = "noop";
    type Output = ();
}

/// Enqueues `n` tasks (batches of 1,000) and runs them all to completion with 4 workers.
fn enqueue_and_drain(queue: &Queue, n: usize) {
    queue.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
    let mut ids = Vec::new();
    for start in (0..n).step_by(1000) {
        let batch = (start..n.min(start + 1000)).map(|n| Noop {
            n,
            pad: "x".repeat(40),
        });
        ids.extend(queue.enqueue_many(batch).unwrap());
    }
    let pool = queue.workers().concurrency(4).start().unwrap();
    queue.wait_all(&ids, LONG).unwrap();
    pool.stop();
}

#[test]
fn a_purge_compacts_and_the_directory_shrinks_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::builder(&dir)
        .auto_compact(Some(AutoCompact {
            min_bytes: 1 << 20,
            ratio: 3,
        }))
        .open()
        .unwrap();
    enqueue_and_drain(&queue, 20_000);
    let before = data_bytes(&dir);
    let report = queue.purge(Duration::ZERO).unwrap();
    assert_eq!(report.tasks_removed, 20_000);
    let compaction = report
        .compaction
        .expect("a purge that leaves the store nearly empty compacts it");
    assert!(compaction.compacted);
    assert!(compaction.bytes_after < compaction.bytes_before);
    let after = data_bytes(&dir);
    println!(
        "20,000 tasks drained: {before} B; after purge(0) + compaction: {after} B; {compaction:?}"
    );
    assert!(
        after * 4 < before,
        "after {after} B is not below 25% of before {before} B"
    );
    assert_eq!(queue.stats().unwrap().total, 0);
    // A second purge with nothing to remove does not compact again.
    assert!(queue.purge(Duration::ZERO).unwrap().compaction.is_none());
    queue.close().unwrap();
    let queue = reopen(&dir);
    assert!(queue.check_consistency().unwrap().is_consistent());
    assert!(data_bytes(&dir) * 4 < before);
}

#[test]
fn auto_compaction_can_be_turned_off_and_skips_a_store_that_holds_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::builder(&dir).auto_compact(None).open().unwrap();
    enqueue_and_drain(&queue, 2_000);
    let report = queue.purge(Duration::ZERO).unwrap();
    assert_eq!(report.tasks_removed, 2_000);
    assert!(report.compaction.is_none());
    drop(queue);
    // The default rule: a store under 16 MiB is left alone.
    let queue = reopen(&dir);
    enqueue_and_drain(&queue, 500);
    assert!(queue.purge(Duration::ZERO).unwrap().compaction.is_none());
    // The rule itself.
    let rule = AutoCompact::default();
    assert!(rule.wants(128 << 20, 0, None));
    assert!(!rule.wants(128 << 20, 50_000, None));
    assert!(rule.wants(128 << 20, 30_000, Some(1000)));
    assert!(rule.wants(32 << 20, 0, None));
    assert!(!rule.wants(8 << 20, 0, None));
}

#[test]
fn a_root_layout_store_compacts_into_generations_and_reopens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::open(&dir).unwrap();
    let ids: Vec<TaskId> = (0..300)
        .map(|i| {
            queue
                .enqueue_json("k", &json!({ "i": i }), EnqueueOptions::new())
                .unwrap()
        })
        .collect();
    queue.close().unwrap();
    // The layout every earlier build wrote: sled's files at the root.
    let root = names(&dir);
    assert!(root.contains(&"db".to_string()) && root.contains(&"conf".to_string()));
    assert!(!root.contains(&"sled.current".to_string()));

    let queue = reopen(&dir);
    let r = queue.compact().unwrap();
    assert!(r.compacted && r.keys_copied > 300 * 3, "{r:?}");
    let after = names(&dir);
    assert!(
        !after
            .iter()
            .any(|n| n == "db" || n == "conf" || n.starts_with("snap.")),
        "the root's sled files are gone: {after:?}"
    );
    assert!(after.contains(&"sled.1".to_string()), "{after:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("sled.current")).unwrap(),
        "sled.1\n"
    );
    // Writes after the switch land in the new generation and survive a reopen.
    let late = queue
        .enqueue_json("k", &json!({ "late": true }), EnqueueOptions::new())
        .unwrap();
    queue.close().unwrap();

    let queue = reopen(&dir);
    for id in ids.iter().chain([&late]) {
        assert_eq!(queue.get(*id).unwrap().unwrap().status, Status::Pending);
    }
    assert!(queue.check_consistency().unwrap().is_consistent());
    let r = queue.compact().unwrap();
    assert!(r.compacted);
    let after = names(&dir);
    assert!(after.contains(&"sled.2".to_string()) && !after.contains(&"sled.1".to_string()));
    queue.close().unwrap();
    let queue = reopen(&dir);
    assert_eq!(queue.stats().unwrap().total, 301);
}

#[test]
fn leftovers_of_an_interrupted_compaction_are_removed_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::open(&dir).unwrap();
    let id = queue
        .enqueue_json("k", &json!(1), EnqueueOptions::new())
        .unwrap();
    queue.compact().unwrap();
    queue.close().unwrap();
    // A half-written next generation (killed mid-copy), and a stale pointer temp file.
    std::fs::create_dir_all(dir.join("sled.2/blobs")).unwrap();
    std::fs::write(dir.join("sled.2/db"), b"partial").unwrap();
    std::fs::write(dir.join("sled.2/conf"), b"partial").unwrap();
    std::fs::write(dir.join("sled.current.tmp"), b"sled.2\n").unwrap();
    // And a file that is not omniq's, which must survive.
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let queue = reopen(&dir);
    assert_eq!(queue.get(id).unwrap().unwrap().status, Status::Pending);
    let now = names(&dir);
    assert!(!now.contains(&"sled.2".to_string()), "{now:?}");
    assert!(!now.contains(&"sled.current.tmp".to_string()), "{now:?}");
    assert!(now.contains(&"notes.txt".to_string()));
    assert!(now.contains(&"sled.1".to_string()));
}

#[test]
fn a_pointer_to_a_missing_generation_is_damage_and_nothing_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::open(&dir).unwrap();
    queue.compact().unwrap();
    queue.close().unwrap();
    std::fs::write(dir.join("sled.current"), b"sled.7\n").unwrap();
    let before = names(&dir);
    let err = common::reopen(|| Queue::open(&dir)).unwrap_err();
    assert!(matches!(err, omniq::Error::Damaged { .. }), "{err}");
    assert_eq!(names(&dir), before);
}

/// A producer and four workers run while another thread compacts again and again: every
/// acknowledged task completes exactly once, and the store stays consistent.
#[test]
fn compaction_while_a_producer_and_workers_run_loses_and_repeats_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::builder(&dir).auto_compact(None).open().unwrap();
    let runs: Arc<Mutex<HashMap<TaskId, usize>>> = Arc::default();
    {
        let runs = runs.clone();
        queue.register_fn("job", move |_, ctx| {
            *runs.lock().entry(ctx.task_id()).or_insert(0) += 1;
            Ok(json!(null))
        });
    }
    let pool = queue.workers().concurrency(4).start().unwrap();
    // The producer asks for a compaction every 250 acknowledged enqueues; the compactor runs
    // them (and a purge) while enqueues, claims and finishes keep coming.
    let (ask, asked) = crossbeam_channel::unbounded::<()>();
    let compactor = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            let mut pauses = Vec::new();
            while asked.recv().is_ok() {
                let r = queue.compact().unwrap();
                assert!(r.compacted);
                pauses.push(r.write_pause);
                queue.purge(Duration::from_secs(3600)).unwrap();
            }
            pauses
        })
    };
    let mut acked = Vec::new();
    for i in 0..3_000 {
        acked.push(
            queue
                .enqueue_json("job", &json!({ "i": i }), EnqueueOptions::new())
                .unwrap(),
        );
        if i % 250 == 0 {
            ask.send(()).unwrap();
        }
    }
    ask.send(()).unwrap();
    drop(ask);
    let finished = queue.wait_all(&acked, LONG).unwrap();
    let pauses = compactor.join().unwrap();
    assert!(pauses.len() >= 13);
    pool.stop();
    assert!(finished.iter().all(|t| t.status == Status::Completed));
    let runs = runs.lock().clone();
    for id in &acked {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "task {id} ran {:?} times",
            runs.get(id)
        );
    }
    assert_eq!(runs.len(), acked.len());
    let report = queue.check_consistency().unwrap();
    assert!(report.is_consistent(), "{:?}", report.problems);
    println!(
        "{} compactions during the run; longest write pause {:?}",
        pauses.len(),
        pauses.iter().max()
    );
    queue.close().unwrap();
    let queue = reopen(&dir);
    assert_eq!(
        queue.stats().unwrap().by_status.get(&Status::Completed),
        Some(&3_000)
    );
    assert!(queue.check_consistency().unwrap().is_consistent());
}

/// Every file under `dir` with its length, for "nothing was touched".
fn tree(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_dir() {
            out.extend(
                tree(&entry.path())
                    .into_iter()
                    .map(|(n, l)| (format!("{name}/{n}"), l)),
            );
        } else {
            out.push((name, meta.len()));
        }
    }
    out.sort();
    out
}

/// A compacted store whose data file is cut short is refused as damaged, untouched: the
/// preflight and the watermark follow the generation.
#[test]
fn a_compacted_store_cut_short_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let queue = Queue::open(&dir).unwrap();
    let batch = (0..2_000).map(|n| Noop {
        n,
        pad: "y".repeat(40),
    });
    queue.enqueue_many(batch).unwrap();
    queue.compact().unwrap();
    queue.close().unwrap();
    let db = dir.join("sled.1/db");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let before = tree(&dir);
    match common::reopen(|| Queue::open(&dir)) {
        Err(omniq::Error::Damaged { .. }) => {}
        Err(e) => panic!("{e:?}"),
        Ok(q) => panic!(
            "a cut-short store opened with {} task(s)",
            q.stats().unwrap().total
        ),
    }
    assert_eq!(tree(&dir), before);
}

/// A store written before the marker existed (sled's files at the root, nothing else) opens,
/// compacts into a generation and reopens.
#[test]
fn a_store_from_before_the_marker_compacts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let id = {
        let q = Queue::open(&dir).unwrap();
        q.enqueue_json("k", &json!(7), EnqueueOptions::new())
            .unwrap()
    };
    std::fs::remove_file(dir.join("OMNIQ")).unwrap();
    let q = reopen(&dir);
    assert!(q.compact().unwrap().compacted);
    q.close().unwrap();
    let q = reopen(&dir);
    assert_eq!(q.get(id).unwrap().unwrap().status, Status::Pending);
    assert!(dir.join("sled.1/db").is_file() && !dir.join("db").exists());
}
