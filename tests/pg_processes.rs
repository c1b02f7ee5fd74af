//! Several processes on one PostgreSQL schema, one of them killed with SIGKILL at random
//! instants over many cycles (issue 9).
//!
//! The test binary re-runs itself as children (`current_exe() --exact pg_child`), with
//! `OMNIQ_PG_CHILD` naming the role:
//! - `producer`: enqueues `TASKS` tasks one by one and appends each acknowledged id to its side
//!   file (fsync'd) once `enqueue` returned, then exits.
//! - `worker`: a `Queue` on the schema with a 4-thread pool; it writes its node id to its side
//!   file, and each handler appends `start <id> <attempt>` (fsync'd) before it works, then
//!   succeeds or fails transiently. It runs until killed.
//!
//! With `OMNIQ_PG_CLAIM_AHEAD=N` the workers claim N tasks ahead (`WorkerPoolBuilder::claim_ahead`).
//!
//! The parent runs the producer and 3 workers, and for `OMNIQ_PG_KILL_CYCLES` cycles (default
//! 12) kills a random worker at a random instant, measures how long until none of the dead
//! node's executions is still running (the rescue bound), and starts a new worker. Then it waits
//! for every task to finish and checks: no acknowledged task lost; no task executed more than
//! `max_retries + 1` times, nor more times than its counted attempts; every attempt left the
//! running state exactly once (so every orphan was charged exactly one crash and no stale
//! finish was applied); every crash names a node that was killed (a live node's executions are
//! never rescued); counters and log agree (`check_consistency`).
#![cfg(all(feature = "postgres", unix))]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omniq::postgres::{Liveness, PgOptions};
use omniq::{
    Backoff, Cause, EnqueueOptions, Queue, RetryPolicy, Status, TaskContext, TaskError, TaskId,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "OMNIQ_PG_CHILD";
const SCHEMA_ENV: &str = "OMNIQ_PG_CHILD_SCHEMA";
const SIDE_ENV: &str = "OMNIQ_PG_CHILD_SIDE";
const LIVENESS_ENV: &str = "OMNIQ_PG_CHILD_LIVENESS";
const TASKS: usize = 300;
const MAX_RETRIES: u32 = 3;
/// Each worker looks for dead nodes this often.
const RESCUE_INTERVAL: Duration = Duration::from_millis(300);
/// Heartbeat mode: a node whose heartbeat is older than this is dead.
const DEAD_AFTER: Duration = Duration::from_secs(4);
/// Room for a machine shared with other builds, on top of what the configuration promises.
const SLACK: Duration = Duration::from_secs(4);

fn options(schema: &str, liveness: Liveness) -> PgOptions {
    PgOptions {
        schema: schema.into(),
        liveness,
        dead_after: DEAD_AFTER,
        pool_size: 3,
        heartbeat_interval: Duration::from_millis(200),
        rescue_interval: RESCUE_INTERVAL,
        poll_interval: Duration::from_secs(1),
        notify_interval: Duration::from_millis(10),
        retention: None,
        ..PgOptions::default()
    }
}

fn open_queue(url: &str, schema: &str, liveness: Liveness) -> Queue {
    Queue::postgres_with(url, options(schema, liveness))
        .retry_policy(RetryPolicy {
            max_retries: MAX_RETRIES,
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(100), 0.25),
        })
        .open()
        .expect("open the PostgreSQL queue")
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open side file")
}

fn record(file: &Mutex<File>, line: &str) {
    let mut f = file.lock();
    f.write_all(format!("{line}\n").as_bytes())
        .expect("write side file");
    f.sync_data().expect("sync side file");
}

#[test]
fn pg_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let url = common::pg::url();
    let schema = std::env::var(SCHEMA_ENV).expect("schema");
    let side = Arc::new(Mutex::new(append(Path::new(
        &std::env::var(SIDE_ENV).expect("side file"),
    ))));
    let liveness = match std::env::var(LIVENESS_ENV).as_deref() {
        Ok("heartbeat") => Liveness::Heartbeat,
        _ => Liveness::SessionLock,
    };
    let queue = open_queue(&url, &schema, liveness);
    if role == "producer" {
        for n in 0..TASKS {
            let id = queue
                .enqueue_json("job", &serde_json::json!({ "n": n }), EnqueueOptions::new())
                .expect("enqueue");
            record(&side, &format!("ack {id}"));
        }
        return;
    }
    // Our node id, for the parent: the newest node row of this process.
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let row = client
        .query_one(
            &format!("SELECT max(id) FROM \"{schema}\".omniq_nodes WHERE pid = $1"),
            &[&(std::process::id() as i32)],
        )
        .expect("find our node");
    let node: i64 = row.get(0);
    record(&side, &format!("node {node}"));
    let runs = side.clone();
    queue.register_fn(
        "job",
        move |_v: serde_json::Value, ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            record(&runs, &format!("start {} {}", ctx.task_id(), ctx.attempt()));
            let mut rng = rand::rng();
            std::thread::sleep(Duration::from_millis(rng.random_range(2..40)));
            if rng.random_bool(0.15) {
                Err(TaskError::transient("flaky", "try again"))
            } else {
                Ok(serde_json::json!(ctx.attempt()))
            }
        },
    );
    // `OMNIQ_PG_CLAIM_AHEAD` (default 0) runs the workers with claim-ahead: a killed worker
    // then also leaves claimed-but-not-started tasks, each charged one crash like the others.
    let ahead: usize = std::env::var("OMNIQ_PG_CLAIM_AHEAD")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let _pool = queue
        .workers()
        .concurrency(4)
        .claim_ahead(ahead)
        .start()
        .expect("start workers");
    // Until killed (bounded, in case the parent died).
    std::thread::sleep(Duration::from_secs(300));
}

struct Worker {
    child: Child,
    side: PathBuf,
}

fn spawn(role: &str, schema: &str, side: &Path, liveness: Liveness) -> Child {
    Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "pg_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env(
            LIVENESS_ENV,
            match liveness {
                Liveness::Heartbeat => "heartbeat",
                Liveness::SessionLock => "session_lock",
            },
        )
        .env(SCHEMA_ENV, schema)
        .env(SIDE_ENV, side)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

fn side_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn node_of(path: &Path) -> Option<i64> {
    side_lines(path)
        .iter()
        .find_map(|l| l.strip_prefix("node ").and_then(|n| n.parse().ok()))
}

/// Session-lock liveness: a killed node is dead as soon as its session ends.
#[test]
fn three_workers_and_a_producer_survive_sigkill_with_exact_rescue() {
    kill_loop(
        Liveness::SessionLock,
        "OMNIQ_PG_KILL_CYCLES",
        12,
        RESCUE_INTERVAL + SLACK,
    );
}

/// Heartbeat-only liveness (for poolers): a killed node is dead once its heartbeat is older
/// than `DEAD_AFTER`, and live nodes (heartbeat every 200 ms) never are.
#[test]
fn heartbeat_mode_workers_survive_sigkill_with_exact_rescue() {
    kill_loop(
        Liveness::Heartbeat,
        "OMNIQ_PG_HEARTBEAT_KILL_CYCLES",
        4,
        DEAD_AFTER + RESCUE_INTERVAL + SLACK,
    );
}

fn kill_loop(liveness: Liveness, cycles_env: &str, default_cycles: usize, bound: Duration) {
    let Some(mut s) = common::pg::PgSchema::new("processes") else {
        return;
    };
    omniq::postgres::migrate(&s.url, &options(&s.schema, liveness)).expect("migrate");
    let seed: u64 = std::env::var("OMNIQ_PG_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let cycles: usize = std::env::var(cycles_env)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cycles);
    println!("{liveness:?}: OMNIQ_PG_KILL_SEED={seed} {cycles_env}={cycles}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let producer_side = dir.path().join("producer");
    let mut producer = spawn("producer", &s.schema, &producer_side, liveness);
    let mut generation = 0;
    let mut new_worker = |schema: &str| {
        generation += 1;
        let side = dir.path().join(format!("worker-{generation}"));
        Worker {
            child: spawn("worker", schema, &side, liveness),
            side,
        }
    };
    let mut workers: Vec<Worker> = (0..3).map(|_| new_worker(&s.schema)).collect();
    let mut killed: HashSet<i64> = HashSet::new();
    let mut all_sides: Vec<PathBuf> = workers.iter().map(|w| w.side.clone()).collect();
    let mut slowest = Duration::ZERO;

    for cycle in 0..cycles {
        // A random instant: the victim may be opening, claiming, running or finishing.
        std::thread::sleep(Duration::from_millis(rng.random_range(50..700)));
        let i = rng.random_range(0..workers.len());
        let victim = &mut workers[i];
        victim.child.kill().expect("SIGKILL");
        victim.child.wait().expect("reap");
        let died = Instant::now();
        if let Some(node) = node_of(&victim.side) {
            killed.insert(node);
            // Every execution of the dead node is rescued within the bound (by the others).
            let mut rescued_in = None;
            while died.elapsed() < bound * 2 {
                let left: i64 = s.rows(
                    "SELECT count(*) FROM omniq_tasks WHERE state = 'running' AND node = $1",
                    &[&node],
                )[0]
                .get(0);
                if left == 0 {
                    rescued_in = Some(died.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let took = rescued_in.unwrap_or_else(|| {
                panic!(
                    "cycle {cycle} (seed {seed}): node {node}'s executions not rescued within {:?}",
                    bound * 2
                )
            });
            assert!(
                took <= bound,
                "cycle {cycle} (seed {seed}): node {node} rescued after {took:?}, over {bound:?}"
            );
            slowest = slowest.max(took);
        }
        workers[i] = new_worker(&s.schema);
        all_sides.push(workers[i].side.clone());
    }

    let status = producer.wait().expect("producer");
    assert!(status.success(), "the producer failed: {status}");
    let acked: Vec<TaskId> = side_lines(&producer_side)
        .iter()
        .filter_map(|l| l.strip_prefix("ack ").and_then(|id| id.parse().ok()))
        .collect();
    assert_eq!(acked.len(), TASKS);

    // Every task finishes (the surviving workers run them).
    let check = open_queue(&s.url, &s.schema, liveness);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let stats = check.stats().expect("stats");
        let open = stats.count(Status::Pending) + stats.count(Status::Running);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {open} task(s) never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in &mut workers {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }

    // Executions the handlers started, per task.
    let mut starts: HashMap<TaskId, u32> = HashMap::new();
    for side in &all_sides {
        for l in side_lines(side) {
            if let Some(rest) = l.strip_prefix("start ") {
                let id: TaskId = rest
                    .split(' ')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .expect("start line");
                *starts.entry(id).or_default() += 1;
            }
        }
    }
    let mut crashes = 0;
    for id in &acked {
        let t = check
            .get(*id)
            .expect("get")
            .unwrap_or_else(|| panic!("seed {seed}: acknowledged task {id} lost"));
        assert!(t.status.is_terminal(), "{id} is {}", t.status);
        assert!(
            t.attempts <= MAX_RETRIES + 1,
            "{id}: {} attempts",
            t.attempts
        );
        let ran = starts.get(id).copied().unwrap_or(0);
        assert!(
            ran <= MAX_RETRIES + 1,
            "seed {seed}: {id} executed {ran} times"
        );
        assert!(
            ran <= t.attempts,
            "seed {seed}: {id} executed {ran} times but counted {}",
            t.attempts
        );
        // Each attempt was claimed once and left the running state exactly once.
        let history = check.history(*id).expect("history");
        let mut exits: BTreeMap<u32, u32> = BTreeMap::new();
        let mut claims = 0;
        for e in &history {
            if e.cause == Cause::Claimed {
                claims += 1;
            }
            if e.from == Some(Status::Running) {
                *exits.entry(e.attempt).or_default() += 1;
            }
        }
        assert_eq!(claims, t.attempts, "{id}");
        assert_eq!(
            exits.len() as u32,
            t.attempts,
            "seed {seed}: {id}: exits {exits:?}"
        );
        assert!(
            exits.values().all(|n| *n == 1),
            "seed {seed}: {id}: an attempt ended twice: {exits:?}"
        );
        // Every crash names a node that was killed.
        for e in t.errors.iter().filter(|e| e.error_type == "crash") {
            crashes += 1;
            let node: i64 = e
                .message
                .split("(node ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("crash message without a node: {}", e.message));
            assert!(
                killed.contains(&node),
                "seed {seed}: {id} rescued from node {node}, which was alive"
            );
        }
    }
    let total: u64 = check.stats().expect("stats").total;
    assert_eq!(total, TASKS as u64, "tasks appeared that nobody enqueued");
    let report = check.check_consistency().expect("check");
    assert!(report.is_consistent(), "seed {seed}: {:?}", report.problems);
    println!(
        "{liveness:?}: {cycles} kills of {} known nodes, {crashes} crash charge(s), slowest rescue {slowest:?}",
        killed.len()
    );
    drop(check);
}
