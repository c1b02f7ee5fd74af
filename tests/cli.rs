//! The `omniq` binary, run for real on real temporary directories: every command's happy path
//! (human and `--json`), every bad input (clear one-line error, non-zero exit, stored data
//! unchanged), and the demo killed mid-run and resumed with nothing lost.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use omniq::{Cause, EnqueueOptions, ListFilter, Queue, Stats, Status, TaskError, TaskId, TaskInfo};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_omniq");

/// Runs `omniq --data DIR ARGS...`.
fn omniq(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .env_remove("OMNIQ_DEMO_WORK_MS")
        .output()
        .expect("run omniq")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed and returns its stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let o = omniq(dir, args);
    assert!(
        o.status.success(),
        "omniq {args:?} failed ({:?}):\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a `--json` command that must succeed and parses its stdout as one JSON document.
fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ok(dir, &a);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("omniq {a:?} printed invalid JSON ({e}):\n{out}"))
}

/// Runs a command that must fail with `code`, print nothing on stdout (with `--json`: only the
/// JSON error document) and one `error:` line (containing `needle`) on stderr. Returns stderr.
fn fails(dir: &Path, args: &[&str], code: i32, needle: &str) -> String {
    let o = omniq(dir, args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "omniq {args:?}: wrong exit status; stderr:\n{err}"
    );
    if args.contains(&"--json") {
        // With --json, stdout is the error document (see `fails_json`).
        let doc: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "omniq {args:?}: stdout is not a JSON error ({e}):\n{}",
                stdout(&o)
            )
        });
        assert_eq!(doc["error"]["exit_code"], code, "{doc}");
    } else {
        assert!(
            o.stdout.is_empty(),
            "omniq {args:?} wrote to stdout on error:\n{}",
            stdout(&o)
        );
    }
    assert!(
        err.starts_with("error: "),
        "omniq {args:?}: stderr does not start with `error:`:\n{err}"
    );
    assert!(
        err.contains(needle),
        "omniq {args:?}: stderr lacks {needle:?}:\n{err}"
    );
    err
}

/// Like [`fails`], and the error is exactly one line.
fn fails_one_line(dir: &Path, args: &[&str], code: i32, needle: &str) -> String {
    let err = fails(dir, args, code, needle);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "omniq {args:?}: error is not one line:\n{err}"
    );
    err
}

/// Known tasks in a fixture directory.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    completed: Vec<TaskId>,
    /// Two on queue "emails" (transient error, no retries left), one permanent.
    failed: Vec<TaskId>,
    scheduled: TaskId,
    cancelled: TaskId,
}

const UNKNOWN_ID: &str = "01a20000-0000-7000-8000-000000000000";

/// 8 tasks: 3 COMPLETED, 3 FAILED, 1 PENDING (scheduled in an hour), 1 CANCELLED, on queues
/// "default" and "emails". The queue is closed before the binary runs.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let q = Queue::open(&dir).unwrap();
    q.register_fn("resize", |v, _| Ok(json!({ "ok": v["n"] })));
    q.register_fn("email", |_, _| {
        Err(TaskError::transient("smtp", "relay unreachable"))
    });
    q.register_fn("charge", |_, _| {
        Err(TaskError::permanent("card_declined", "declined"))
    });
    let completed: Vec<TaskId> = (0..3)
        .map(|n| {
            q.enqueue_json("resize", &json!({ "n": n }), EnqueueOptions::new())
                .unwrap()
        })
        .collect();
    let mut failed: Vec<TaskId> = (0..2)
        .map(|n| {
            q.enqueue_json(
                "email",
                &json!({ "to": format!("user{n}@example.com") }),
                EnqueueOptions::new().queue("emails").max_retries(0),
            )
            .unwrap()
        })
        .collect();
    failed.push(
        q.enqueue_json("charge", &json!({ "cents": 999 }), EnqueueOptions::new())
            .unwrap(),
    );
    let later = EnqueueOptions::new().delay(Duration::from_secs(3600));
    let scheduled = q
        .enqueue_json("report", &json!({}), later.clone().priority(-5))
        .unwrap();
    let cancelled = q
        .enqueue_json("resize", &json!({ "n": 99 }), later)
        .unwrap();
    q.cancel(cancelled).unwrap();
    let report = omniq::testing::run_due(&q).unwrap();
    assert_eq!(report.executions, 6);
    drop(q);
    Fixture {
        _tmp: tmp,
        dir,
        completed,
        failed,
        scheduled,
        cancelled,
    }
}

/// Everything stored that an operator can see: every task record (with its history) and stats.
fn snapshot_of(q: &Queue) -> (Vec<(TaskInfo, usize)>, Stats) {
    let page = q.list(&ListFilter::new().limit(10_000)).unwrap();
    assert!(page.next_cursor.is_none());
    let tasks = page.tasks.into_iter().map(|t| {
        let h = q.history(t.id).unwrap().len();
        (t, h)
    });
    (tasks.collect(), q.stats().unwrap())
}

fn snapshot(dir: &Path) -> (Vec<(TaskInfo, usize)>, Stats) {
    snapshot_of(&Queue::open(dir).unwrap())
}

fn ids(v: &Value) -> Vec<String> {
    v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

fn s(id: TaskId) -> String {
    id.to_string()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|t| humantime::parse_rfc3339(t).is_ok())
}

#[test]
fn stats_and_list_show_the_stored_tasks() {
    let f = fixture();
    let d = f.dir.as_path();

    let st = ok_json(d, &["stats"]);
    assert_eq!(st["total"], 8);
    assert_eq!(
        st["by_status"],
        json!({"PENDING": 1, "RUNNING": 0, "COMPLETED": 3, "FAILED": 3, "CANCELLED": 1})
    );
    assert_eq!(st["by_queue"]["emails"]["FAILED"], 2);
    assert_eq!(st["by_queue"]["default"]["COMPLETED"], 3);
    let human = ok(d, &["stats"]);
    assert!(human.contains("8 task(s)"), "{human}");
    let header = human
        .lines()
        .find(|l| l.starts_with("QUEUE"))
        .expect("table header");
    for col in [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TOTAL",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let emails = human
        .lines()
        .find(|l| l.starts_with("emails"))
        .expect("emails row");
    let cells: Vec<&str> = emails.split_whitespace().collect();
    assert_eq!(cells, ["emails", "0", "0", "0", "2", "0", "2"]);

    let all = ok_json(d, &["list"]);
    let listed: HashSet<String> = ids(&all).into_iter().collect();
    let expected: HashSet<String> = f
        .completed
        .iter()
        .chain(&f.failed)
        .chain([&f.scheduled, &f.cancelled])
        .map(|i| s(*i))
        .collect();
    assert_eq!(listed, expected);
    assert!(all["next_cursor"].is_null());
    for t in all["tasks"].as_array().unwrap() {
        for key in [
            "id",
            "kind",
            "queue",
            "status",
            "attempts",
            "max_retries",
            "priority",
            "payload",
            "result",
            "last_error",
            "errors",
        ] {
            assert!(t.get(key).is_some(), "task lacks {key}: {t}");
        }
        assert!(
            is_rfc3339(&t["created_at"]) && is_rfc3339(&t["next_run_at"]),
            "{t}"
        );
    }

    let failed = ok_json(d, &["list", "--status", "failed"]);
    let mut got = ids(&failed);
    got.sort();
    let mut want: Vec<String> = f.failed.iter().map(|i| s(*i)).collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(ids(&ok_json(d, &["list", "--queue", "emails"])).len(), 2);
    assert_eq!(ids(&ok_json(d, &["list", "--kind", "resize"])).len(), 4);
    assert_eq!(
        ids(&ok_json(
            d,
            &["list", "--kind", "resize", "--status", "CANCELLED"]
        )),
        [s(f.cancelled)]
    );

    // Pages of 3 cover every task exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut args = vec!["list", "--limit", "3"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let page = ok_json(d, &args);
        assert!(ids(&page).len() <= 3);
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 8);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), expected);

    let human = ok(d, &["list", "--status", "failed"]);
    assert!(human.lines().next().unwrap().starts_with("ID "), "{human}");
    for id in &f.failed {
        let row = human
            .lines()
            .find(|l| l.starts_with(&s(*id)))
            .expect("row per failed task");
        assert!(row.contains("FAILED"), "{row}");
    }
    assert!(human.contains("smtp: relay unreachable"), "{human}");
    let paged = ok(d, &["list", "--limit", "2"]);
    assert!(paged.contains("more with --cursor"), "{paged}");
    assert_eq!(
        ok(d, &["list", "--status", "running"]).trim(),
        "no tasks match"
    );
}

#[test]
fn show_prints_fields_errors_and_history() {
    let f = fixture();
    let d = f.dir.as_path();

    let t = ok_json(d, &["show", &s(f.failed[0])]);
    assert_eq!(t["id"], s(f.failed[0]));
    assert_eq!(t["kind"], "email");
    assert_eq!(t["queue"], "emails");
    assert_eq!(t["status"], "FAILED");
    assert_eq!(t["attempts"], 1);
    assert_eq!(t["max_retries"], 0);
    assert_eq!(t["payload"], json!({"to": "user0@example.com"}));
    assert!(t["result"].is_null());
    assert_eq!(t["errors"].as_array().unwrap().len(), 1);
    assert_eq!(t["errors"][0]["error_type"], "smtp");
    assert_eq!(t["errors"][0]["permanent"], false);
    assert_eq!(t["errors"][0]["retry_count"], 0);
    assert!(is_rfc3339(&t["errors"][0]["timestamp"]) && is_rfc3339(&t["finished_at"]));
    assert_eq!(t["last_error"]["message"], "relay unreachable");
    let to: Vec<&str> = t["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(to, ["PENDING", "RUNNING", "FAILED"]);
    assert_eq!(t["history"][2]["cause"], "failed (smtp)");
    assert_eq!(t["history"][2]["from"], "RUNNING");

    let done = ok_json(d, &["show", &s(f.completed[2])]);
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["result"], json!({"ok": 2}));
    assert!(done["last_error"].is_null());

    let human = ok(d, &["show", &s(f.failed[2])]);
    for needle in [
        "charge",
        "FAILED",
        "card_declined (permanent): declined",
        "errors (1, oldest first)",
        "history (3 transition(s))",
        "claimed",
    ] {
        assert!(human.contains(needle), "lacks {needle:?}:\n{human}");
    }
}

#[test]
fn retry_and_cancel_change_exactly_the_named_tasks() {
    let f = fixture();
    let d = f.dir.as_path();
    let (before, _) = snapshot(d);

    let out = ok(d, &["retry", &s(f.failed[2])]);
    assert!(out.contains("re-queued"), "{out}");
    let r = ok_json(d, &["retry", "--all-failed"]);
    assert_mutation_shape(&r, "retry", false, 2);
    assert!(r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["status"] == "PENDING"));
    let c = ok_json(d, &["cancel", &s(f.scheduled)]);
    assert_mutation_shape(&c, "cancel", false, 1);
    assert_eq!(c["tasks"][0]["id"], s(f.scheduled));
    assert_eq!(c["tasks"][0]["status"], "CANCELLED");

    let (after, stats) = snapshot(d);
    assert_eq!(stats.count(Status::Failed), 0);
    assert_eq!(stats.count(Status::Pending), 3);
    assert_eq!(stats.count(Status::Cancelled), 2);
    for (t, _) in &after {
        let old = &before.iter().find(|(b, _)| b.id == t.id).unwrap().0;
        if f.failed.contains(&t.id) {
            assert_eq!(
                (t.status, t.attempts),
                (Status::Pending, 0),
                "retried with a fresh budget"
            );
            assert_eq!(t.errors, old.errors, "error history kept");
        } else if t.id == f.scheduled {
            assert_eq!(t.status, Status::Cancelled);
        } else {
            assert_eq!(t, old, "untouched task changed");
        }
    }
    let q = Queue::open(d).unwrap();
    assert_eq!(
        q.history(f.failed[0]).unwrap().last().unwrap().cause,
        Cause::ManualRetry
    );
    assert!(q.check_consistency().unwrap().is_consistent());
}

#[test]
fn purge_removes_only_old_finished_tasks() {
    let f = fixture();
    let d = f.dir.as_path();
    let before = snapshot(d);
    let r = ok_json(d, &["purge", "--older-than", "7d"]);
    assert_mutation_shape(&r, "purge", false, 0);
    assert_eq!(r["older_than"], "7d");
    assert_eq!(snapshot(d), before);
    let out = ok(d, &["purge", "--older-than", "7d"]);
    assert!(
        out.contains(
            "purged 0 finished task(s) (and their history) that finished at least 7 days ago"
        ),
        "{out}"
    );

    let out = ok(d, &["purge", "--older-than", "1ms"]);
    assert!(out.contains("purged 7 finished task(s)"), "{out}");
    let (after, stats) = snapshot(d);
    assert_eq!(stats.total, 1);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0.id, f.scheduled);
    assert_eq!(ok_json(d, &["check"])["consistent"], true);
}

#[test]
fn check_passes_on_a_good_store_and_fails_on_a_corrupt_record() {
    let f = fixture();
    let d = f.dir.as_path();
    let c = ok_json(d, &["check"]);
    assert_eq!(c["consistent"], true);
    assert_eq!(c["tasks"], 8);
    assert_eq!(c["problems"], json!([]));
    // 8 enqueues, 6 claims, 6 outcomes, 1 cancel.
    assert_eq!(c["log_entries"], 21);
    assert!(ok(d, &["check"]).contains("consistent"));

    // Overwrite one task record with bytes that do not decode.
    {
        let db = common::sled_config(d).open().unwrap();
        db.insert(omniq::keys::task(f.completed[0]), &b"\x01\x00garbage"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let o = omniq(d, &["--json", "check"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["consistent"], false);
    assert!(!report["problems"].as_array().unwrap().is_empty());
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    let o = omniq(d, &["check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("problem: "), "{}", stdout(&o));
    // The corrupt record is named; the others still show.
    fails_one_line(d, &["show", &s(f.completed[0])], 1, "corrupt");
    ok_json(d, &["show", &s(f.completed[1])]);
}

#[test]
fn bench_json_reports_positive_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let v = ok_json(tmp.path(), &["bench", "--tasks", "200", "--workers", "2"]);
    for key in [
        "enqueue_per_s",
        "enqueue_many_per_s",
        "lifecycle_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "disk_bytes_per_task",
        "raw_fdatasync_per_s",
        "enqueue_with_workers_per_s",
        "lifecycle_single_enqueue_per_s",
        "group_enqueue_per_s",
        "group_enqueue_with_workers_per_s",
        "relaxed_enqueue_per_s",
        "relaxed_enqueue_with_workers_per_s",
        "raw_fdatasync_after_per_s",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing or not a number: {v}"));
        assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    }
    assert!(v["latency_p99_ms"].as_f64() >= v["latency_p50_ms"].as_f64());
    assert_eq!(v["tasks"], 200);
    assert_eq!(v["batch"], 200);
    assert_eq!(v["raw_writes"], 200);
    assert_eq!(v["durability"], "group");
    // Every row: its key, label, value, unit, and a ratio to the raw fdatasync row (none for
    // the raw row itself and for disk use).
    let rows = v["rows"].as_array().expect("rows");
    let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "raw_fdatasync_per_s",
            "enqueue_per_s",
            "enqueue_with_workers_per_s",
            "lifecycle_single_enqueue_per_s",
            "enqueue_many_per_s",
            "lifecycle_per_s",
            "latency_p50_ms",
            "latency_p99_ms",
            "latency_max_ms",
            "disk_bytes_per_task",
            "relaxed_enqueue_per_s",
            "relaxed_enqueue_with_workers_per_s",
            "relaxed_lifecycle_single_enqueue_per_s",
            "raw_fdatasync_after_per_s",
        ]
    );
    for r in rows {
        let key = r["key"].as_str().unwrap();
        assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
        let no_ratio = ["raw_fdatasync_per_s", "disk_bytes_per_task"].contains(&key);
        assert_eq!(r["vs_raw"].is_null(), no_ratio, "{r}");
        if let Some(flat) = v[key].as_f64() {
            assert_eq!(r["value"].as_f64(), Some(flat), "{key}");
        }
    }
    // bench runs in its own temporary directory: --data is left alone.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn bench_progress_labels_say_what_was_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let o = omniq(tmp.path(), &["bench", "--tasks", "500", "--workers", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    let expected_starts = [
        "raw append + fdatasync of 128 B (plain file, 1 thread, 500 writes): ",
        "enqueue, group, 1 producer, 1 task per call, no workers (500 tasks): ",
        "enqueue, group, 1 producer, 1 task per call, while 3 workers run them (500 tasks, until \
         the last enqueue returned): ",
        "lifecycle, group, 1 producer, 1 enqueue per task, 3 workers already running (500 tasks, \
         first enqueue to last durable Completed): ",
        "enqueue_many, group, 1 producer, 1 batch of 500, no workers (500 tasks): ",
        "lifecycle, group, 1 producer, enqueue_many in 1 batch of 500, 3 workers already running \
         (500 tasks, first enqueue to last durable Completed): ",
        "enqueue-to-start latency p50, group, 1 producer, 1 task at a time, idle pool of 3 \
         workers (500 samples): ",
        "enqueue-to-start latency p99, group, 1 producer, 1 task at a time, idle pool of 3 \
         workers (500 samples): ",
        "enqueue-to-start latency max, group, 1 producer, 1 task at a time, idle pool of 3 \
         workers (500 samples): ",
        "disk per stored task, group (",
        "enqueue, relaxed, 1 producer, 1 task per call, no workers (500 tasks): ",
        "enqueue, relaxed, 1 producer, 1 task per call, while 3 workers run them (500 tasks, \
         until the last enqueue returned): ",
        "lifecycle, relaxed, 1 producer, 1 enqueue per task, 3 workers already running (500 \
         tasks, first enqueue to last Completed, acknowledged before its fsync): ",
        "raw append + fdatasync of 128 B again, after the omniq rows (plain file, 1 thread, 500 \
         writes; drift check): ",
    ];
    assert_eq!(lines.len(), expected_starts.len(), "{err}");
    for (line, start) in lines.iter().zip(expected_starts) {
        assert!(
            line.starts_with(start),
            "{line:?} does not start with {start:?}"
        );
    }
    assert!(lines[0].ends_with(" writes/s"), "{}", lines[0]);
    assert!(lines[1].ends_with("x raw rate"), "{}", lines[1]);
    assert!(lines[13].ends_with("x raw rate"), "{}", lines[13]);
    assert!(lines[6].ends_with("x raw write"), "{}", lines[6]);
    // 500 tasks from the lifecycle row plus 500 latency probes.
    assert!(
        lines[9].contains(" bytes for 1,000 completed tasks with their logs): ")
            && lines[9].ends_with(" bytes/task"),
        "{}",
        lines[9]
    );
    assert!(
        !err.contains("of 1,000"),
        "a label names a batch size not used:\n{err}"
    );
    // The table on stdout: one line per row, the same label, value and ratio.
    let out = stdout(&o);
    assert!(
        out.starts_with(
            "omniq bench: 500 tasks per row, 3 workers, main rows in durability group\n"
        ),
        "{out}"
    );
    assert!(!out.contains("of 1,000"), "{out}");
    let table: Vec<&str> = out.lines().skip(3).collect();
    assert_eq!(table.len(), lines.len(), "{out}");
    for (row, line) in table.iter().zip(&lines) {
        let (label, rest) = line.split_once("): ").unwrap();
        let value = rest.split(", ").next().unwrap();
        assert!(row.starts_with(&format!("{label})")), "{row:?} vs {line:?}");
        assert!(row.contains(value), "{row:?} vs {line:?}");
    }
}

#[test]
fn bad_inputs_fail_with_one_line_and_change_nothing() {
    let f = fixture();
    let d = f.dir.as_path();
    let before = snapshot(d);
    let done = s(f.completed[0]);
    let cases: &[(&[&str], i32, &str)] = &[
        (&["show", "nope"], 2, "\"nope\" is not a task id"),
        (&["cancel", "12345"], 2, "is not a task id"),
        (&["retry", "xyz"], 2, "is not a task id"),
        (&["list", "--cursor", "xyz"], 2, "is not a task id"),
        (&["show", UNKNOWN_ID], 1, "not found"),
        (&["retry", UNKNOWN_ID], 1, "not found"),
        (&["cancel", UNKNOWN_ID], 1, "not found"),
        (&["cancel", &done], 1, "cannot cancel"),
        (&["retry", &done], 1, "cannot retry"),
        (&["list", "--status", "done"], 2, "\"done\" is not a status"),
        (
            &["purge", "--older-than", "7x"],
            2,
            "\"7x\" is not a duration",
        ),
        (&["purge", "--older-than", "soon"], 2, "is not a duration"),
    ];
    for (args, code, needle) in cases {
        fails_one_line(d, args, *code, needle);
    }
    // Usage errors caught by clap itself: status 2, one `error:` line with a hint.
    for (args, needle, hint) in [
        (&["retry"][..], "<ID|--all-failed>", "omniq retry --help"),
        (&["list", "--limit", "0"], "--limit", "omniq list --help"),
        (
            &["bench", "--durability", "fast"],
            "fast",
            "omniq bench --help",
        ),
        (&["frobnicate"], "frobnicate", "omniq --help"),
    ] {
        let err = fails_one_line(d, args, 2, needle);
        assert!(err.contains(hint), "{err}");
    }
    assert_eq!(snapshot(d), before, "a failed command changed stored data");
}

/// Runs `omniq --json ARGS` that must fail with `code`: stdout is exactly one JSON error
/// document `{"error": {"kind", "message", "exit_code"}}` and stderr one `error:` line.
fn fails_json(dir: &Path, args: &[&str], code: i32, kind: &str) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = omniq(dir, &a);
    assert_eq!(o.status.code(), Some(code), "omniq {a:?}: {}", stderr(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "omniq {a:?}: stdout is not one JSON document ({e}): {}",
            stdout(&o)
        )
    });
    assert_eq!(doc["error"]["kind"], kind, "omniq {a:?}: {doc}");
    assert_eq!(doc["error"]["exit_code"], code, "{doc}");
    let message = doc["error"]["message"].as_str().expect("a message");
    let err = stderr(&o);
    assert_eq!(err.trim_end(), format!("error: {message}"), "omniq {a:?}");
    doc
}

/// The one JSON shape of every mutating command.
fn assert_mutation_shape(v: &Value, command: &str, dry_run: bool, count: u64) {
    assert_eq!(v["command"], command, "{v}");
    assert_eq!(v["dry_run"], dry_run, "{v}");
    assert_eq!(v["count"], count, "{v}");
    assert_eq!(
        v["tasks"].as_array().map(Vec::len),
        Some(count as usize),
        "{v}"
    );
    assert_eq!(v["tasks_truncated"], false, "{v}");
}

#[test]
fn json_failures_print_an_error_document_with_a_stable_kind() {
    let f = fixture();
    let d = f.dir.as_path();
    let before = snapshot(d);
    let done = s(f.completed[0]);
    fails_json(d, &["show", UNKNOWN_ID], 1, "not_found");
    fails_json(d, &["cancel", UNKNOWN_ID], 1, "not_found");
    fails_json(d, &["cancel", &done], 1, "invalid_state");
    fails_json(d, &["retry", &done], 1, "invalid_state");
    fails_json(d, &["show", "nope"], 2, "usage");
    fails_json(d, &["purge", "--older-than", "soon"], 2, "usage");
    // clap's own usage errors, with --json before or after the subcommand.
    fails_json(d, &["retry"], 2, "usage");
    fails_json(d, &["list", "--limit", "0"], 2, "usage");
    fails_json(d, &["frobnicate"], 2, "usage");
    let o = omniq(d, &["list", "--bogus", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["error"]["kind"], "usage");
    let missing = f._tmp.path().join("missing");
    let doc = fails_json(&missing, &["stats"], 1, "no_queue");
    assert!(doc["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    {
        let _held = Queue::open(d).unwrap();
        fails_json(d, &["stats"], 1, "locked");
    }
    assert_eq!(snapshot(d), before);
}

#[test]
fn an_unknown_cursor_is_an_error() {
    let f = fixture();
    let d = f.dir.as_path();
    let err = fails_one_line(d, &["list", "--cursor", UNKNOWN_ID], 1, "names no task");
    assert!(err.contains("--cursor"), "{err}");
    fails_json(d, &["list", "--cursor", UNKNOWN_ID], 1, "not_found");
    // A known cursor still pages.
    let first = ok_json(d, &["list", "--limit", "1"]);
    let c = first["next_cursor"].as_str().unwrap().to_string();
    assert_eq!(ids(&ok_json(d, &["list", "--cursor", &c])).len(), 7);
}

#[test]
fn purge_dry_run_says_what_would_go_and_removes_nothing() {
    let f = fixture();
    let d = f.dir.as_path();
    let before = snapshot(d);
    let v = ok_json(d, &["purge", "--older-than", "0", "--dry-run"]);
    assert_mutation_shape(&v, "purge", true, 7);
    assert!(is_rfc3339(&v["cutoff"]), "{v}");
    let listed: HashSet<String> = ids(&v).into_iter().collect();
    let finished: HashSet<String> = f
        .completed
        .iter()
        .chain(&f.failed)
        .chain([&f.cancelled])
        .map(|i| s(*i))
        .collect();
    assert_eq!(listed, finished);
    let human = ok(d, &["purge", "--older-than", "0", "--dry-run"]);
    assert!(
        human.contains("dry run: would purge 7 finished task(s)")
            && human.contains("nothing was removed"),
        "{human}"
    );
    let rows = human
        .lines()
        .filter(|l| finished.iter().any(|id| l.starts_with(id.as_str())))
        .count();
    assert_eq!(rows, 5, "the first five are shown: {human}");
    assert!(human.contains("… and 2 more"), "{human}");
    assert_eq!(snapshot(d), before, "a dry run removed something");

    let v = ok_json(d, &["purge", "--older-than", "0"]);
    assert_mutation_shape(&v, "purge", false, 7);
    assert_eq!(snapshot(d).1.total, 1);
}

#[test]
fn list_leaves_last_error_blank_for_completed_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let clock = omniq::testing::ManualClock::starting_now();
    let q = Queue::builder(&dir).clock(clock.clone()).open().unwrap();
    q.register_fn("flaky", |_, ctx| {
        if ctx.attempt() == 1 {
            Err(TaskError::transient("network", "first try fails"))
        } else {
            Ok(json!("ok"))
        }
    });
    let id = q
        .enqueue_json("flaky", &json!({}), EnqueueOptions::new())
        .unwrap();
    omniq::testing::run_until_idle(&q, &clock, 10).unwrap();
    let t = q.get(id).unwrap().unwrap();
    assert_eq!(t.status, Status::Completed);
    assert!(t.last_error.is_some(), "the fixture has an earlier error");
    drop(q);
    let human = ok(&dir, &["list"]);
    let row = human.lines().find(|l| l.starts_with(&s(id))).unwrap();
    assert!(!row.contains("first try fails"), "{row}");
    assert!(row.trim_end().ends_with("Z"), "LAST ERROR is blank: {row}");
    // `show` still has the history.
    assert!(ok(&dir, &["show", &s(id)]).contains("first try fails"));
}

#[test]
fn the_stats_table_fits_80_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let q = Queue::open(&dir).unwrap();
    let long = "notifications.transactional.email.high-priority.eu-west-1";
    for queue in [long, "default"] {
        q.enqueue_json("k", &json!({}), EnqueueOptions::new().queue(queue))
            .unwrap();
    }
    drop(q);
    let human = ok(&dir, &["stats"]);
    let table: Vec<&str> = human.lines().skip(2).collect();
    assert_eq!(table.len(), 4, "{human}");
    for line in &table {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line}",
            line.chars().count()
        );
    }
    assert!(
        table
            .iter()
            .any(|l| l.starts_with("notifications.") && l.contains('…')),
        "{human}"
    );
    assert!(table[0].ends_with("TOTAL"), "{human}");
}

#[test]
fn readme_list_example_matches_the_demo_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    ok(&d, &["demo", "--tasks", "20", "--work-ms", "1"]);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("omniq list "))
        .expect("README shows `omniq list`");
    // The example as printed, without the optional `[--cursor ID]`.
    let args: Vec<&str> = line
        .split_whitespace()
        .skip(1)
        .take_while(|w| !w.starts_with('[') && !w.starts_with('#'))
        .collect();
    assert!(
        args.contains(&"--kind"),
        "the example filters by kind: {line}"
    );
    let found = ok_json(&d, &args);
    assert!(
        !ids(&found).is_empty(),
        "README's `omniq {}` finds nothing in the demo's data",
        args.join(" ")
    );
}

#[test]
fn a_missing_directory_is_reported_and_not_created() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing-here");
    let commands: &[&[&str]] = &[
        &["stats"],
        &["list"],
        &["show", UNKNOWN_ID],
        &["retry", "--all-failed"],
        &["cancel", UNKNOWN_ID],
        &["purge", "--older-than", "1d"],
        &["check"],
        &["--json", "stats"],
    ];
    for args in commands {
        let err = fails_one_line(&missing, args, 1, "no queue at");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(!missing.exists(), "omniq {args:?} created the directory");
    }
    // An existing directory that holds no queue is left empty.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails_one_line(&empty, &["stats"], 1, "holds no omniq queue");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

#[test]
fn demo_help_says_it_runs_long_enough_to_interrupt_and_how_to_shorten_it() {
    let tmp = tempfile::tempdir().unwrap();
    let help = ok(tmp.path(), &["demo", "--help"]);
    assert!(help.contains("~20 s"), "{help}");
    assert!(help.contains("Ctrl-C stops it gracefully"), "{help}");
    assert!(help.contains("--tasks <TASKS>"), "{help}");
    assert!(help.contains("--work-ms <MS>"), "{help}");
    assert!(help.contains("The default, 500"), "{help}");
}

#[test]
fn demo_with_data_naming_a_file_says_it_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "not a queue").unwrap();
    // The same message as `stats` gives, for the path itself and for a path under the file.
    for args in [&["demo", "--tasks", "5"][..], &["stats"][..]] {
        let err = fails_one_line(&file, args, 1, "is not a directory");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("pass --data DIR"), "{err}");
        assert!(!err.contains("IO error"), "{err}");
    }
    let under = file.join("queue");
    let err = fails_one_line(&under, &["demo", "--tasks", "5"], 1, "is not a directory");
    assert!(err.contains("cannot be a queue directory"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a queue");
}

#[test]
fn compact_rewrites_the_directory_named_as_its_argument() {
    let f = fixture();
    let d = f.dir.as_path();
    let before = snapshot(d);
    // `omniq compact DIR` (no --data).
    let o = Command::new(BIN)
        .args(["--json", "compact"])
        .arg(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["compacted"], true, "{v}");
    for key in [
        "bytes_before",
        "bytes_after",
        "keys_copied",
        "log_bytes",
        "duration_ms",
        "write_pause_ms",
    ] {
        assert!(v[key].is_number(), "{key} in {v}");
    }
    assert!(d.join("sled.current").exists());
    assert_eq!(snapshot(d), before);
    let out = ok(d, &["compact"]);
    assert!(out.starts_with("compacted "), "{out}");
    assert!(
        out.contains("MiB ->") && out.contains("writes waited"),
        "{out}"
    );
    assert_eq!(ok_json(d, &["check"])["consistent"], true);
    // The directory given twice, differently, is a usage error.
    let o = Command::new(BIN)
        .args(["--data", "/elsewhere", "compact"])
        .arg(d)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn a_locked_directory_is_reported_plainly() {
    let f = fixture();
    let d = f.dir.as_path();
    let held = Queue::open(d).unwrap();
    let before = snapshot_of(&held);
    let id = s(f.scheduled);
    let commands: &[&[&str]] = &[
        &["stats"],
        &["list"],
        &["show", &id],
        &["retry", "--all-failed"],
        &["cancel", &id],
        &["purge", "--older-than", "1ms"],
        &["check"],
        &["compact"],
        &["--json", "list"],
        &["demo", "--tasks", "5"],
    ];
    let shown = std::path::absolute(d).unwrap().display().to_string();
    for args in commands {
        let err = fails_one_line(d, args, 1, "is in use by another process");
        assert!(err.contains(&shown), "names the directory: {err}");
        assert!(err.contains("stop that process"), "says what to do: {err}");
    }
    assert_eq!(snapshot_of(&held), before);
}

fn demo_json(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["demo", "--workers", "4"];
    args.extend_from_slice(extra);
    ok_json(dir, &args)
}

fn assert_all_terminal(summary: &Value, tasks: u64) {
    assert_eq!(summary["tasks"], tasks, "{summary}");
    assert_eq!(summary["expected_tasks"], tasks, "{summary}");
    let by = &summary["by_status"];
    assert_eq!(by["tasks"], tasks);
    assert_eq!(
        (by["PENDING"].as_u64(), by["RUNNING"].as_u64()),
        (Some(0), Some(0)),
        "{summary}"
    );
    let terminal = by["COMPLETED"].as_u64().unwrap()
        + by["FAILED"].as_u64().unwrap()
        + by["CANCELLED"].as_u64().unwrap();
    assert_eq!(terminal, tasks);
}

#[test]
fn demo_runs_a_mixed_workload_then_a_fresh_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    let first = demo_json(&d, &["--tasks", "20", "--work-ms", "5"]);
    assert_eq!(first["resumed"], false);
    assert_all_terminal(&first, 20);
    assert_eq!(first["recovery"]["recovered"], 0);
    // 20 tasks: 11 resizes + 1 nightly report complete; 4 flaky emails recover through retries;
    // 2 charges fail permanently; 2 syncs spend their 3 executions.
    assert_eq!(first["by_status"]["COMPLETED"], 16);
    assert_eq!(first["by_status"]["FAILED"], 4);
    let emails = &first["by_kind"]["demo.send_email"];
    assert_eq!(
        (emails["COMPLETED"].as_u64(), emails["retries"].as_u64()),
        (Some(4), Some(6))
    );
    assert_eq!(first["by_kind"]["demo.sync_inventory"]["retries"], 4);
    assert_eq!(first["by_kind"]["demo.charge_card"]["retries"], 0);
    assert_eq!(first["by_kind"]["demo.nightly_report"]["COMPLETED"], 1);
    assert_eq!(first["retries_used"], 10);

    // Finished workload: the next run enqueues a fresh one.
    let human = ok(&d, &["demo", "--tasks", "10", "--work-ms", "5"]);
    assert!(
        human.contains("Enqueued a fresh demo workload of 10 tasks"),
        "{human}"
    );
    assert!(human.contains("workers started"), "{human}");
    assert!(human.contains("all finished"), "{human}");
    let total = human
        .lines()
        .find(|l| l.starts_with("total "))
        .expect("total row");
    assert_eq!(total.split_whitespace().nth(1), Some("10"), "{total}");
    assert!(human.contains("recovered at this open"), "{human}");

    let st = ok_json(&d, &["stats"]);
    assert_eq!(st["by_queue"]["demo"]["PENDING"], 0);
    assert_eq!(st["total"], 30);
    assert_eq!(ok_json(&d, &["check"])["consistent"], true);
}

/// Starts a slow demo, waits for "workers started" (the first claims have committed), kills it
/// (`SIGKILL`: a crash, unlike Ctrl-C).
fn start_and_kill(dir: &Path, tasks: &str) {
    let mut child = Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args([
            "demo",
            "--tasks",
            tasks,
            "--workers",
            "4",
            "--work-ms",
            "3000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .expect("demo ended before starting its workers")
            .unwrap();
        if line.starts_with("workers started") {
            break;
        }
    }
    // The demo announces its workers once the first claim has committed, and handlers take
    // 1.5-4.5 s: the claimed tasks are running now.
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every task of the demo directory is terminal, and its log counts exactly its attempts.
fn assert_nothing_lost(dir: &Path, tasks: usize) {
    let q = Queue::open(dir).unwrap();
    assert_eq!(q.recovery_report().recovered, 0);
    let (all, stats) = snapshot_of(&q);
    assert_eq!(all.len(), tasks);
    assert_eq!(stats.total, tasks as u64);
    for (t, _) in &all {
        assert!(t.status.is_terminal(), "{t:?}");
        let claims = q
            .history(t.id)
            .unwrap()
            .iter()
            .filter(|e| e.cause == Cause::Claimed)
            .count();
        assert_eq!(
            claims, t.attempts as usize,
            "every execution counted: {t:?}"
        );
    }
    assert!(q.check_consistency().unwrap().is_consistent());
}

#[test]
fn demo_killed_mid_run_resumes_with_nothing_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    start_and_kill(&d, "20");
    let second = demo_json(&d, &["--work-ms", "5"]);
    assert_eq!(second["resumed"], true, "{second}");
    assert_all_terminal(&second, 20);
    let rec = &second["recovery"];
    let recovered = rec["recovered"].as_u64().unwrap();
    assert!(recovered > 0, "the kill caught running tasks: {second}");
    assert_eq!(
        rec["requeued"].as_u64().unwrap() + rec["failed"].as_u64().unwrap(),
        recovered
    );
    assert_eq!(second["crash_recovered_tasks"], recovered);
    assert_nothing_lost(&d, 20);
}

#[test]
fn demo_resumed_after_a_kill_says_so_in_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    start_and_kill(&d, "12");
    let out = ok(&d, &["demo", "--work-ms", "5"]);
    assert!(
        out.contains("Resuming the unfinished demo workload"),
        "{out}"
    );
    assert!(out.contains("Crash recovery at open:"), "{out}");
    assert!(out.contains("(resumed)"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("recovered at this open"))
        .expect("recovery row");
    let n: u64 = row.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!(n > 0, "{row}");
    let crashed = out
        .lines()
        .find(|l| l.starts_with("crash-recovered tasks"))
        .expect("crash row");
    assert_eq!(
        crashed.split_whitespace().nth(2),
        Some(n.to_string().as_str()),
        "{crashed}"
    );
    assert_nothing_lost(&d, 12);
}

/// `omniq schedules`, the unique key and schedule in `omniq show`, and limits with how many
/// tasks wait on them in `omniq stats` (human and `--json`).
#[test]
fn schedules_unique_keys_and_limits_are_visible() {
    let dir = tempfile::tempdir().unwrap();
    let (unique_id, scheduled_id) = {
        // In the past, so what it makes due is due for the CLI's real clock too.
        let clock = omniq::testing::ManualClock::new(
            omniq::Timestamp::now().minus(Duration::from_secs(7200)),
        );
        let q = omniq::Queue::builder(dir.path())
            .clock(clock.clone())
            .open()
            .unwrap();
        q.set_limit(
            omniq::LimitScope::queue("mail"),
            omniq::Limit::new()
                .rate(1, Duration::from_secs(86_400))
                .concurrency(4),
        )
        .unwrap();
        let u = q
            .insert_json(
                "send",
                &serde_json::json!({"to": 7}),
                omniq::EnqueueOptions::new()
                    .queue("mail")
                    .unique(omniq::Unique::by_args()),
            )
            .unwrap();
        q.enqueue_json(
            "send",
            &serde_json::json!({"to": 8}),
            omniq::EnqueueOptions::new().queue("mail"),
        )
        .unwrap();
        q.schedule_json(
            "hourly",
            omniq::Spec::cron("0 * * * *", "UTC").unwrap(),
            omniq::Missed::RunOnce,
            "report",
            &serde_json::json!({}),
            omniq::EnqueueOptions::new(),
        )
        .unwrap();
        clock.advance(Duration::from_secs(3600));
        let fired = q.fire_due_schedules().unwrap();
        // One of the two mail tasks starts; the other waits on the rate.
        let c = omniq::testing::claim_next(&q).unwrap().unwrap();
        assert!(c.succeed(&0).unwrap());
        q.close().unwrap();
        (u.id, fired[0])
    };
    let d = dir.path();
    let text = ok(d, &["schedules"]);
    assert!(
        text.contains("hourly") && text.contains("cron \"0 * * * *\" UTC"),
        "{text}"
    );
    assert!(
        text.contains("RunOnce") && text.contains("NEXT TICK"),
        "{text}"
    );
    let v = ok_json(d, &["schedules"]);
    assert_eq!(v[0]["name"], "hourly");
    assert_eq!(v[0]["fired"], 1);

    let text = ok(d, &["show", &unique_id.to_string()]);
    assert!(
        text.contains("unique key")
            && text.contains(r#"send {"to":7} (held while PENDING/RUNNING; released)"#),
        "{text}"
    );
    let v = ok_json(d, &["show", &unique_id.to_string()]);
    assert_eq!(v["unique"]["key"], r#"send {"to":7}"#);
    assert_eq!(v["unique"]["digest"].as_str().unwrap().len(), 64);
    let text = ok(d, &["show", &scheduled_id.to_string()]);
    assert!(
        text.contains("scheduled by") && text.contains("hourly"),
        "{text}"
    );

    let text = ok(d, &["stats"]);
    assert!(
        text.contains("LIMIT ON") && text.contains("queue mail"),
        "{text}"
    );
    assert!(text.contains("1 per 1day, 4 at once"), "{text}");
    assert!(
        text.contains("FREES IN") && text.contains("22h59m"),
        "{text}"
    );
    assert!(
        text.lines().all(|l| l.chars().count() <= 80),
        "stats fits 80 columns:\n{text}"
    );
    let v = ok_json(d, &["stats"]);
    let l = &v["limits"][0];
    assert_eq!(
        (l["scope"].as_str(), l["name"].as_str()),
        (Some("queue"), Some("mail"))
    );
    assert_eq!(l["started_in_window"], 1);
    // Rate spent: the other mail task waits on the limit.
    assert_eq!(l["waiting"], 1);
    assert_eq!(l["remaining"], 0);
}
