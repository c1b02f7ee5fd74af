//! `wait` reports only durable state (issue 8, defect 1).
//!
//! A child process (this test binary re-running itself, as in `tests/crash.rs`) opens a queue
//! in `Immediate` or `Group` mode, keeps the writer busy with a background producer, enqueues a
//! few tasks, waits for them (`wait` or `wait_all`), prints what `wait` returned on stdout and
//! calls `abort()` at once — no destructor, no final sync. The parent reopens the directory: every
//! task the child saw `Completed` must be `Completed`, with no `crash` charged.
//!
//! Before the fix, `wait` returned as soon as a read showed the terminal state, which with the
//! pipelined writer (and in `Immediate` mode, between apply and fsync) can be a group that never
//! reaches disk: about 40 % of such kills reopened to find the task `Pending`, charged `crash`.
//!
//! `OMNIQ_WAIT_CYCLES` (default 25 per mode and API) sets the number of kills;
//! `OMNIQ_WAIT_SEED` replays a run.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use omniq::{Durability, EnqueueOptions, Queue, Status, TaskContext, TaskError, TaskId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

const CHILD_ENV: &str = "OMNIQ_WAIT_CHILD";
const DIR_ENV: &str = "OMNIQ_WAIT_CHILD_DIR";
const SEED_ENV: &str = "OMNIQ_WAIT_CHILD_SEED";

fn builder(dir: &Path, durability: Durability) -> omniq::QueueBuilder {
    Queue::builder(dir)
        .durability(durability)
        .cache_bytes(8 << 20)
}

fn noop(_: serde_json::Value, _: &TaskContext) -> Result<serde_json::Value, TaskError> {
    Ok(serde_json::json!("done"))
}

/// The child: role `MODE-API`: MODE `immediate` or `group`, API `wait`, `poll`
/// (`wait` with a zero timeout in a loop) or `wait_all`.
#[test]
fn wait_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, api) = role.split_once('-').expect("role is MODE-API");
    let durability = match mode {
        "immediate" => Durability::Immediate,
        _ => Durability::Group,
    };
    let dir = std::env::var(DIR_ENV).expect("dir");
    let seed: u64 = std::env::var(SEED_ENV)
        .expect("seed")
        .parse()
        .expect("seed");
    let mut rng = StdRng::seed_from_u64(seed);
    let queue = common::reopen(|| builder(Path::new(&dir), durability).open()).expect("open");
    queue.register_fn("noop", noop);
    let _pool = queue.workers().concurrency(4).start().expect("pool");

    // A producer that keeps groups flowing, so the task we wait for shares its pipeline with
    // groups applied but not yet synced.
    let stop = Arc::new(AtomicBool::new(false));
    let _background = {
        let (queue, stop) = (queue.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = queue.enqueue_json("noop", &serde_json::json!("bg"), Default::default());
            }
        })
    };
    let n = rng.random_range(1..=6);
    let ids: Vec<TaskId> = (0..n)
        .map(|i| {
            queue
                .enqueue_json("noop", &serde_json::json!(i), EnqueueOptions::new())
                .expect("enqueue")
        })
        .collect();
    let done = match api {
        "wait_all" => queue
            .wait_all(&ids, Duration::from_secs(30))
            .expect("wait_all"),
        // A caller polling with a zero timeout reads the task as often as it can, so it
        // sees a terminal state the moment the writer applies it, before its fsync.
        "poll" => vec![loop {
            match queue.wait(ids[ids.len() - 1], Duration::ZERO) {
                Ok(t) => break t,
                Err(omniq::Error::WaitTimeout { .. }) => continue,
                Err(e) => panic!("wait: {e}"),
            }
        }],
        _ => vec![queue
            .wait(ids[ids.len() - 1], Duration::from_secs(30))
            .expect("wait")],
    };
    let mut out = std::io::stdout().lock();
    for t in &done {
        writeln!(out, "done {} {}", t.id, t.status).expect("stdout");
    }
    out.flush().expect("stdout");
    // No destructors, no final sync: the process dies with whatever is not yet durable.
    std::process::abort();
}

fn seed() -> u64 {
    std::env::var("OMNIQ_WAIT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn cycles() -> u64 {
    std::env::var("OMNIQ_WAIT_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25)
}

fn run(role: &str) {
    let seed = seed();
    println!("OMNIQ_WAIT_SEED={seed} ({role})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lost = Vec::new();
    let cycles = cycles();
    for cycle in 0..cycles {
        let dir = tempfile::tempdir().expect("tempdir");
        let child_seed: u64 = rng.random();
        let exe = std::env::current_exe().expect("exe");
        let mut child = Command::new(exe)
            .args(["--exact", "wait_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .env(DIR_ENV, dir.path())
            .env(SEED_ENV, child_seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let reported: Vec<(TaskId, String)> = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                // The harness may print "test wait_child ... " before it on the same line.
                let rest = l[l.find("done ")? + 5..].to_string();
                let (id, status) = rest.split_once(' ')?;
                Some((id.parse().ok()?, status.to_string()))
            })
            .collect();
        let status = child.wait().expect("child exit");
        assert!(
            !status.success(),
            "cycle {cycle}: the child should have aborted"
        );
        assert!(
            !reported.is_empty(),
            "cycle {cycle} (child seed {child_seed}): the child reported nothing ({status})"
        );
        let queue = common::reopen(|| builder(dir.path(), Durability::Group).open())
            .expect("reopen after abort");
        for (id, reported_status) in reported {
            assert_eq!(reported_status, Status::Completed.to_string());
            let task = queue.get(id).expect("get").expect("reported task exists");
            let crashed = task.errors.iter().any(|e| e.error_type == "crash");
            if task.status != Status::Completed || crashed {
                lost.push(format!(
                    "cycle {cycle} (child seed {child_seed}): wait returned Completed for {id}, \
                     after reopen it is {} with attempts {} and errors {:?}",
                    task.status,
                    task.attempts,
                    task.errors
                        .iter()
                        .map(|e| &e.error_type)
                        .collect::<Vec<_>>()
                ));
            }
        }
        let report = queue.check_consistency().expect("check");
        assert!(report.is_consistent(), "cycle {cycle}: {report:?}");
        drop(queue);
    }
    assert!(
        lost.is_empty(),
        "{} of {cycles} kills after `wait` lost what it reported (seed {seed}):\n{}",
        lost.len(),
        lost.join("\n")
    );
}

#[test]
fn wait_result_survives_abort_right_after_it_immediate() {
    run("immediate-wait");
}

#[test]
fn wait_result_survives_abort_right_after_it_group() {
    run("group-wait");
}

#[test]
fn polled_wait_result_survives_abort_right_after_it_immediate() {
    run("immediate-poll");
}

#[test]
fn polled_wait_result_survives_abort_right_after_it_group() {
    run("group-poll");
}

#[test]
fn wait_all_results_survive_abort_right_after_it_group() {
    run("group-wait_all");
}

#[test]
fn wait_all_results_survive_abort_right_after_it_immediate() {
    run("immediate-wait_all");
}
