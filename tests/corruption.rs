//! Corrupt bytes and locked directories.
//!
//! Corruption: after a queue is closed, one task's stored value is overwritten with raw sled
//! (garbage, truncated, the wrong record kind, a newer schema version, trailing bytes, ...).
//! On reopen, reading that task gives `Error::Corrupt` naming its id; every other task still
//! loads, lists, and runs; the corrupt record is reported, never "repaired", so its bytes are
//! exactly as they were; and nothing panics or spins.
//!
//! Locking: a directory already open (in this process, or in another one) is refused with
//! `Error::Locked` naming it (`Error::AlreadyOpen` when the holder is this process), and the
//! holder keeps working.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use omniq::testing::{self, ManualClock};
use omniq::{keys, EnqueueOptions, Error, ListFilter, Queue, Status, TaskId, Timestamp};

mod common;
use common::{raw_db, reopen};

const WAIT: Duration = Duration::from_secs(20);

/// The ways a stored task value is damaged. Each takes the record's valid bytes (format 4: the
/// task and its log) and the same task as a format-3 record (another record kind).
type Damage = fn(&[u8], &[u8]) -> Vec<u8>;

const VARIANTS: &[(&str, Damage)] = &[
    ("empty", |_, _| Vec::new()),
    ("garbage", |_, _| {
        (0u32..40).map(|i| (i * 73 + 11) as u8).collect()
    }),
    ("garbage after a valid header", |_, _| {
        let mut v = vec![8, 0, 1];
        v.extend((0u32..40).map(|i| (i * 151 + 7) as u8));
        v
    }),
    ("header only", |rec, _| rec[..3].to_vec()),
    ("truncated", |rec, _| rec[..rec.len() / 2].to_vec()),
    ("missing last byte", |rec, _| rec[..rec.len() - 1].to_vec()),
    ("wrong record kind", |_, v3| v3.to_vec()),
    ("newer schema version", |rec, _| {
        let mut v = rec.to_vec();
        v[1..3].copy_from_slice(&2u16.to_be_bytes());
        v
    }),
    ("trailing bytes", |rec, _| {
        let mut v = rec.to_vec();
        v.extend_from_slice(&[0, 0xff]);
        v
    }),
    ("huge length prefix", |rec, _| {
        // header, the task's length (1 byte), the id (17 bytes), then a kind string claiming
        // 2^63 bytes.
        let mut v = rec[..21].to_vec();
        v.push(0xfd);
        v.extend_from_slice(&(1u64 << 63).to_le_bytes());
        v
    }),
    ("invalid utf-8 in kind", |rec, _| {
        let mut v = rec.to_vec();
        v[22] = 0xff; // first byte of the kind name (after header, task length, id, length byte)
        v
    }),
];

/// A closed queue directory holding one task to corrupt (`bad`, highest priority, so it is
/// the first a worker would pick) and `others`, all pending and due.
struct Fixture {
    dir: tempfile::TempDir,
    bad: TaskId,
    others: Vec<TaskId>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let bad = q
        .enqueue_json(
            "job",
            &serde_json::json!({"n": "bad"}),
            EnqueueOptions::new().priority(10),
        )
        .unwrap();
    let others = (0..5)
        .map(|n| {
            q.enqueue_json("job", &serde_json::json!({ "n": n }), EnqueueOptions::new())
                .unwrap()
        })
        .collect();
    drop(q);
    Fixture { dir, bad, others }
}

/// Overwrites `id`'s record with `damage(record, the record in format 3)`; returns what was
/// stored.
fn corrupt(dir: &Path, id: TaskId, damage: Damage) -> Vec<u8> {
    let db = raw_db(dir);
    let record = db.get(keys::task(id)).unwrap().expect("record exists");
    let task = omniq::record::decode_task(&record, &|| "t".into()).unwrap();
    let v3 = omniq::codec::encode(omniq::codec::RecordKind::Task, &task).unwrap();
    let bytes = damage(&record, &v3);
    assert_ne!(bytes, record.to_vec());
    db.insert(keys::task(id), bytes.clone()).unwrap();
    db.flush().unwrap();
    bytes
}

/// Everything stored under `t` keys, raw.
fn raw_records(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = raw_db(dir);
    db.scan_prefix([keys::TASK])
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// The history of a damaged record: `len` entries if the damage spared the log (the log is
/// inside the record, format 4), else a `Corrupt` error naming the task.
fn assert_history(q: &Queue, id: TaskId, len: usize, variant: &str) {
    match q.history(id) {
        Ok(h) => assert_eq!(h.len(), len, "{variant}"),
        Err(e) => {
            assert!(matches!(e, Error::Corrupt { .. }), "{variant}: {e:?}");
            assert!(e.to_string().contains(&id.to_string()), "{variant}: {e}");
        }
    }
}

fn assert_corrupt_names(err: &Error, id: TaskId, variant: &str) {
    assert!(
        matches!(
            err,
            Error::Corrupt {
                what: "task record",
                ..
            }
        ),
        "{variant}: {err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&id.to_string()),
        "{variant}: {text:?} does not name task {id}"
    );
}

#[test]
fn a_corrupt_record_is_reported_and_everything_else_still_loads() {
    for (variant, damage) in VARIANTS {
        let f = fixture();
        let stored = corrupt(f.dir.path(), f.bad, *damage);
        let before = raw_records(f.dir.path());
        {
            let q = reopen(|| Queue::open(f.dir.path()))
                .unwrap_or_else(|e| panic!("{variant}: open failed: {e}"));
            let err = q.get(f.bad).expect_err(variant);
            assert_corrupt_names(&err, f.bad, variant);
            for id in &f.others {
                assert_eq!(
                    q.get(*id).unwrap().unwrap().status,
                    Status::Pending,
                    "{variant}"
                );
            }

            // list: every other task, and the corrupt one reported (not silently dropped).
            for filter in [ListFilter::new(), ListFilter::new().status(Status::Pending)] {
                let page = q.list(&filter).unwrap();
                let listed: BTreeSet<TaskId> = page.tasks.iter().map(|t| t.id).collect();
                assert_eq!(listed, f.others.iter().copied().collect(), "{variant}");
                assert_eq!(page.corrupt.len(), 1, "{variant}: {:?}", page.corrupt);
                assert!(
                    page.corrupt[0].key.contains(&f.bad.to_string()),
                    "{variant}: {:?}",
                    page.corrupt
                );
                assert!(
                    page.corrupt[0].reason.contains(&f.bad.to_string()),
                    "{variant}: {:?}",
                    page.corrupt
                );
            }
            // Paging still returns every readable task exactly once.
            let mut seen = Vec::new();
            let mut corrupt_seen = 0;
            let mut cursor = None;
            loop {
                let page = q.list(&ListFilter::new().limit(2).cursor(cursor)).unwrap();
                seen.extend(page.tasks.iter().map(|t| t.id));
                corrupt_seen += page.corrupt.len();
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            seen.sort();
            let mut expected = f.others.clone();
            expected.sort();
            assert_eq!(seen, expected, "{variant}");
            assert_eq!(corrupt_seen, 1, "{variant}");

            // Its log is inside the damaged record (format 4): readable when the damage
            // spared it, else the same named error; operations on it fail cleanly.
            assert_history(&q, f.bad, 1, variant);
            assert_corrupt_names(&q.cancel(f.bad).expect_err(variant), f.bad, variant);
            assert_corrupt_names(&q.retry(f.bad).expect_err(variant), f.bad, variant);
            assert_eq!(
                q.stats().unwrap().count(Status::Pending),
                6,
                "{variant}: counters unchanged"
            );

            // The checker reports it, and only it.
            let report = q.check_consistency().unwrap();
            assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.contains(&f.bad.to_string())),
                "{variant}: {:?}",
                report.problems
            );
            for p in &report.problems {
                for id in &f.others {
                    assert!(
                        !p.contains(&id.to_string()),
                        "{variant}: healthy task {id} reported: {p}"
                    );
                }
            }
            // Other tasks can still be operated on.
            assert_eq!(q.cancel(f.others[0]).unwrap().status, Status::Cancelled);
        }
        let after = raw_records(f.dir.path());
        assert_eq!(after.len(), before.len(), "{variant}: no record lost");
        let bad_value = after
            .iter()
            .find(|(k, _)| *k == keys::task(f.bad))
            .map(|(_, v)| v.clone());
        assert_eq!(
            bad_value,
            Some(stored),
            "{variant}: the corrupt bytes were left as they were"
        );
    }
}

/// (utime + stime) clock ticks used by this process's worker-pool dispatcher threads.
fn dispatcher_cpu_ticks() -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("omniq-dispatch") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after "(comm)": state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    total
}

// The only test in this file that starts worker pools (so the dispatcher-CPU probe sees only
// its own dispatcher).
#[test]
fn a_worker_pool_runs_the_other_tasks_and_does_not_spin_on_the_corrupt_one() {
    for (variant, damage) in VARIANTS {
        let f = fixture();
        let stored = corrupt(f.dir.path(), f.bad, *damage);
        {
            let q = reopen(|| Queue::open(f.dir.path())).unwrap();
            q.register_fn("job", |v, _| Ok(v));
            let pool = q.workers().concurrency(2).start().unwrap();
            for id in &f.others {
                let t = q
                    .wait(*id, WAIT)
                    .unwrap_or_else(|e| panic!("{variant}: {e}"));
                assert_eq!(t.status, Status::Completed, "{variant}");
                assert_eq!(t.attempts, 1, "{variant}");
            }
            // Every other task is done; the corrupt one is due but unclaimable. An idle pool
            // sleeps until the next due time; a dispatcher retrying the corrupt task would burn
            // a core (~25 ticks in this window at 100 Hz). Allow a few ticks for scheduling noise.
            let t0 = dispatcher_cpu_ticks();
            std::thread::sleep(Duration::from_millis(250));
            let used = dispatcher_cpu_ticks() - t0;
            assert!(
                used <= 5,
                "{variant}: the dispatcher used {used} CPU ticks while idle: it spins"
            );
            let report = pool.stop();
            assert_eq!(report.abandoned, 0, "{variant}");
            assert_corrupt_names(&q.get(f.bad).expect_err(variant), f.bad, variant);
            assert_history(&q, f.bad, 1, &format!("{variant}: never claimed"));
            let stats = q.stats().unwrap();
            assert_eq!(stats.count(Status::Completed), 5, "{variant}");
        }
        let after = raw_records(f.dir.path());
        assert_eq!(after.len(), 6, "{variant}");
        let bad_value = after
            .iter()
            .find(|(k, _)| *k == keys::task(f.bad))
            .map(|(_, v)| v.clone());
        assert_eq!(
            bad_value,
            Some(stored),
            "{variant}: the corrupt bytes were left as they were"
        );
    }
}

#[test]
fn recovery_at_open_reports_a_corrupt_orphan_and_recovers_the_rest() {
    for (variant, damage) in VARIANTS {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Timestamp(1_700_000_000_000));
        let open = || {
            reopen(|| {
                Queue::builder(dir.path())
                    .clock(clock.clone())
                    .jitter_seed(7)
                    .open()
            })
        };
        let (bad, orphan, pending) = {
            let q = open().unwrap();
            let bad = q
                .enqueue_json(
                    "job",
                    &serde_json::json!("bad"),
                    EnqueueOptions::new().priority(10),
                )
                .unwrap();
            let orphan = q
                .enqueue_json(
                    "job",
                    &serde_json::json!("orphan"),
                    EnqueueOptions::new().priority(5),
                )
                .unwrap();
            let pending = q
                .enqueue_json("job", &serde_json::json!("pending"), EnqueueOptions::new())
                .unwrap();
            // Both claimed and left Running, as a crash would leave them.
            let c = testing::claim_next(&q).unwrap().unwrap();
            assert_eq!(c.task.id, bad);
            c.abandon();
            let c = testing::claim_next(&q).unwrap().unwrap();
            assert_eq!(c.task.id, orphan);
            c.abandon();
            (bad, orphan, pending)
        };
        let stored = corrupt(dir.path(), bad, *damage);

        let q =
            open().unwrap_or_else(|e| panic!("{variant}: open with a corrupt orphan failed: {e}"));
        let r = q.recovery_report();
        assert_eq!(
            (r.recovered, r.requeued, r.failed),
            (1, 1, 0),
            "{variant}: {r:?}"
        );
        assert_eq!(r.corrupt.len(), 1, "{variant}: {r:?}");
        assert!(
            r.corrupt[0].key.contains(&bad.to_string()),
            "{variant}: {r:?}"
        );
        assert!(
            r.corrupt[0].reason.contains(&bad.to_string()),
            "{variant}: {r:?}"
        );
        let o = q.get(orphan).unwrap().unwrap();
        assert_eq!(o.status, Status::Pending, "{variant}");
        assert_eq!(
            o.last_error.as_ref().map(|e| e.error_type.as_str()),
            Some("crash"),
            "{variant}"
        );
        assert_corrupt_names(&q.get(bad).expect_err(variant), bad, variant);
        drop(q);

        // Reopening again is just as calm: the corrupt orphan is reported again, nothing else.
        let q = open().unwrap();
        let r = q.recovery_report();
        assert_eq!((r.recovered, r.corrupt.len()), (0, 1), "{variant}: {r:?}");
        // The healthy tasks run to completion.
        q.register_fn("job", |v, _| Ok(v));
        clock.advance(Duration::from_secs(120));
        let run = testing::run_until_idle(&q, &clock, 50).unwrap();
        assert_eq!(run.executions, 2, "{variant}: {:?}", run.log);
        for id in [orphan, pending] {
            assert_eq!(
                q.get(id).unwrap().unwrap().status,
                Status::Completed,
                "{variant}"
            );
        }
        assert_history(
            &q,
            bad,
            2,
            &format!("{variant}: enqueue + claim, nothing more"),
        );
        drop(q);

        let after = raw_records(dir.path());
        assert_eq!(after.len(), 3, "{variant}");
        let bad_value = after
            .iter()
            .find(|(k, _)| *k == keys::task(bad))
            .map(|(_, v)| v.clone());
        assert_eq!(
            bad_value,
            Some(stored),
            "{variant}: the corrupt bytes were left as they were"
        );
    }
}

#[test]
fn a_corrupt_log_entry_fails_history_but_not_the_task() {
    let f = fixture();
    {
        // The entry's bytes (after its length prefix) become 0xff: the framing holds, the
        // entry does not decode.
        let db = raw_db(f.dir.path());
        let mut v = db.get(keys::task(f.bad)).unwrap().unwrap().to_vec();
        let (_, count, entries) = omniq::record::split(&v, &|| "t".into()).unwrap();
        assert_eq!(count, 1);
        let start = v.len() - entries.len() + 1;
        v[start..].fill(0xff);
        db.insert(keys::task(f.bad), v).unwrap();
        db.flush().unwrap();
    }
    let q = reopen(|| Queue::open(f.dir.path())).unwrap();
    let err = q.history(f.bad).expect_err("a corrupt log entry");
    assert!(
        matches!(
            err,
            Error::Corrupt {
                what: "log entry",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&f.bad.to_string()), "{err}");
    assert_eq!(q.get(f.bad).unwrap().unwrap().status, Status::Pending);
    for id in &f.others {
        assert_eq!(q.history(*id).unwrap().len(), 1);
    }
}

// ----- locking ---------------------------------------------------------------------------------

fn assert_locked(result: omniq::Result<Queue>, dir: &Path) {
    match result {
        Err(e @ Error::Locked { .. }) => {
            let Error::Locked { path } = &e else {
                unreachable!()
            };
            assert_eq!(path, dir);
            let text = e.to_string();
            assert!(
                text.contains(&dir.display().to_string()),
                "{text:?} does not name the directory"
            );
        }
        Err(other) => panic!("expected Error::Locked, got {other:?}"),
        Ok(_) => panic!("a second open of a held directory must fail"),
    }
}

/// A second open in the same process is told apart from another process's lock.
fn assert_already_open(result: omniq::Result<Queue>, dir: &Path) {
    match result {
        Err(Error::AlreadyOpen { path }) => assert_eq!(path, dir),
        Err(other) => panic!("expected Error::AlreadyOpen, got {other:?}"),
        Ok(_) => panic!("a second open of a held directory must fail"),
    }
}

#[test]
fn a_directory_open_in_this_process_is_already_open() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let before = q
        .enqueue_json("job", &serde_json::json!(1), EnqueueOptions::new())
        .unwrap();
    assert_already_open(Queue::open(dir.path()), dir.path());
    assert_already_open(Queue::builder(dir.path()).open(), dir.path());
    // The same directory by another spelling of its path.
    assert_already_open(Queue::open(dir.path().join(".")), &dir.path().join("."));
    // The holder is unaffected.
    let after = q
        .enqueue_json("job", &serde_json::json!(2), EnqueueOptions::new())
        .unwrap();
    assert_eq!(q.get(before).unwrap().unwrap().status, Status::Pending);
    assert!(q.check_consistency().unwrap().is_consistent());
    drop(q);
    let q = reopen(|| Queue::open(dir.path())).unwrap();
    assert!(q.get(before).unwrap().is_some() && q.get(after).unwrap().is_some());
}

const CHILD_ENV: &str = "OMNIQ_TEST_LOCK_HOLDER_DIR";

/// Not a test on its own: the child half of `a_directory_open_in_another_process_is_locked`,
/// which re-runs this test binary with `CHILD_ENV` set. Without it, it returns at once.
#[test]
fn lock_holder_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let q = Queue::open(&dir).unwrap();
    let first = q
        .enqueue_json("job", &serde_json::json!("child"), EnqueueOptions::new())
        .unwrap();
    println!("HOLDING {first}");
    std::io::stdout().flush().unwrap();
    // Hold the directory until the parent closes our stdin (or give up after a minute, so a
    // parent that failed to see our line cannot leave both processes waiting forever).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = std::io::stdin().read_to_string(&mut sink);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the parent did not release the directory within 60 s");
    // Still fully working after the parent's refused opens.
    let second = q
        .enqueue_json("job", &serde_json::json!("child 2"), EnqueueOptions::new())
        .unwrap();
    q.register_fn("job", |v, _| Ok(v));
    let run = testing::run_due(&q).unwrap();
    assert_eq!(run.executions, 2);
    assert!(q.check_consistency().unwrap().is_consistent());
    println!("DONE {second}");
    std::io::stdout().flush().unwrap();
}

#[test]
fn a_directory_open_in_another_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "lock_holder_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut find = |prefix: &str| -> TaskId {
        for line in lines.by_ref() {
            // libtest may have printed "test lock_holder_child ... " on the same line.
            let line = line.unwrap();
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().parse().unwrap();
            }
        }
        panic!("the child exited before printing {prefix:?}");
    };
    let first = find("HOLDING ");
    // The child holds the directory now.
    assert_locked(Queue::open(dir.path()), dir.path());
    assert_locked(Queue::open(dir.path()), dir.path());
    // Release it: the child finishes its work and closes the queue.
    drop(child.stdin.take());
    let second = find("DONE ");
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");

    let q = reopen(|| Queue::open(dir.path())).unwrap();
    for id in [first, second] {
        assert_eq!(q.get(id).unwrap().unwrap().status, Status::Completed);
    }
    assert!(q.check_consistency().unwrap().is_consistent());
}
