//! The built-in benchmark behind `omniq bench`: runs a workload in a throwaway directory and
//! reports rates, latencies and disk use.
//!
//! Phases, each on a fresh queue directory inside one temporary directory (removed at the end):
//!
//! 1. single-producer [`Queue::enqueue`] of `tasks` tasks with the chosen durability;
//! 2. [`Queue::enqueue_many`] of `tasks` tasks in batches of 1,000;
//! 3. the full lifecycle: with `workers` workers already started, enqueue `tasks` no-op tasks
//!    (batches of 1,000) and time until every one is `Completed` (counted from a
//!    [`Queue::subscribe`] stream, not by polling);
//! 4. enqueue-to-start latency on the now idle pool: `min(tasks, 500)` tasks enqueued one at a
//!    time, each only after the previous one completed; the handler reports the instant it
//!    started, the producer took the instant just before calling `enqueue`;
//! 5. disk use: the lifecycle directory's size divided by the tasks it stores.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::handler::TaskContext;
use crate::queue::{Durability, Queue};
use crate::task::{Status, Task, TaskError};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Tasks per phase.
    pub tasks: usize,
    /// Worker threads for the lifecycle phase.
    pub workers: usize,
    /// Durability mode for the whole run.
    pub durability: Durability,
}

/// What was measured. Keys are stable: scripts read them from `omniq bench --json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Tasks per phase.
    pub tasks: usize,
    /// Worker threads.
    pub workers: usize,
    /// Durability mode, lower-case.
    pub durability: String,
    /// Single-producer `enqueue` rate (acknowledged, durable per mode), tasks/s.
    pub enqueue_per_s: f64,
    /// `enqueue_many` rate in batches of 1,000, tasks/s.
    pub enqueue_many_per_s: f64,
    /// Full lifecycle rate (enqueue -> run a no-op -> Completed), tasks/s.
    pub lifecycle_per_s: f64,
    /// Enqueue-to-start latency on an idle pool, median, ms.
    pub latency_p50_ms: f64,
    /// Enqueue-to-start latency on an idle pool, 99th percentile, ms.
    pub latency_p99_ms: f64,
    /// Bytes on disk per stored task (after the run, completed tasks with their logs).
    pub disk_bytes_per_task: f64,
    /// Enqueue-to-start latency on an idle pool, worst sample, ms.
    pub latency_max_ms: f64,
    /// How many latency samples the percentiles come from.
    pub latency_samples: usize,
}

/// Tasks per `enqueue_many` call.
const BATCH: usize = 1_000;
/// Upper bound on latency samples.
const MAX_LATENCY_SAMPLES: usize = 500;
/// How long any single phase may wait for its tasks before the run is declared stuck.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// The no-op task every phase enqueues.
#[derive(Serialize, Deserialize)]
struct BenchNoop {
    n: u64,
}

impl Task for BenchNoop {
    const NAME: &'static str = "omniq_bench_noop";
    type Output = ();
}

/// The latency probe: its handler reports when it started.
#[derive(Serialize, Deserialize)]
struct BenchProbe {
    n: u64,
}

impl Task for BenchProbe {
    const NAME: &'static str = "omniq_bench_probe";
    type Output = ();
}

fn durability_name(d: Durability) -> String {
    match d {
        Durability::Immediate => "immediate",
        Durability::Group => "group",
        Durability::Relaxed => "relaxed",
    }
    .to_string()
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Nearest-rank percentile of sorted samples, in ms (`p` in `0..=1`).
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn open(dir: &std::path::Path, name: &str, durability: Durability) -> Result<Queue> {
    Queue::builder(dir.join(name)).durability(durability).open()
}

/// Enqueues `n` no-op tasks in batches of [`BATCH`].
fn enqueue_batches(queue: &Queue, n: usize) -> Result<()> {
    let mut next = 0u64;
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        queue.enqueue_many((next..next + k as u64).map(|n| BenchNoop { n }))?;
        next += k as u64;
        left -= k;
    }
    Ok(())
}

/// Blocks until `n` tasks reached a terminal state, as reported by `events`.
fn await_terminal(
    events: &crossbeam_channel::Receiver<crate::TransitionEvent>,
    n: usize,
) -> Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut done = 0;
    while done < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = events.recv_timeout(left).map_err(|_| Error::Invalid {
            what: "bench",
            reason: format!("only {done} of {n} tasks finished within {PHASE_TIMEOUT:?}"),
        })?;
        if ev.entry.to.is_terminal() {
            if ev.entry.to != Status::Completed {
                return Err(Error::Invalid {
                    what: "bench",
                    reason: format!(
                        "task {} ended {} instead of COMPLETED",
                        ev.entry.task_id, ev.entry.to
                    ),
                });
            }
            done += 1;
        }
    }
    Ok(())
}

/// Runs the benchmark. `progress` receives one line per phase.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if opts.tasks == 0 || opts.workers == 0 {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!(
                "tasks ({}) and workers ({}) must both be at least 1",
                opts.tasks, opts.workers
            ),
        });
    }
    let tmp = tempfile::TempDir::new()
        .map_err(|e| Error::Storage(format!("cannot create a temporary directory: {e}")))?;
    let dir = tmp.path();
    let n = opts.tasks;
    let d = opts.durability;
    let mode = durability_name(d);

    // (a) single producer, one task per call.
    let enqueue_per_s = {
        let q = open(dir, "enqueue", d)?;
        let t0 = Instant::now();
        for i in 0..n as u64 {
            q.enqueue(BenchNoop { n: i })?;
        }
        let r = rate(n, t0.elapsed());
        progress(&format!(
            "enqueue ({mode}, 1 producer): {n} tasks, {r:.0} tasks/s"
        ));
        r
    };

    // (b) enqueue_many in batches of 1,000.
    let enqueue_many_per_s = {
        let q = open(dir, "enqueue_many", d)?;
        let t0 = Instant::now();
        enqueue_batches(&q, n)?;
        let r = rate(n, t0.elapsed());
        progress(&format!(
            "enqueue_many ({mode}, batches of {BATCH}): {n} tasks, {r:.0} tasks/s"
        ));
        r
    };

    // (c) full lifecycle on a started pool.
    let q = open(dir, "lifecycle", d)?;
    q.register(|_: BenchNoop, _: &TaskContext| -> std::result::Result<(), TaskError> { Ok(()) });
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<Instant>();
    q.register(
        move |_: BenchProbe, _: &TaskContext| -> std::result::Result<(), TaskError> {
            let _ = started_tx.send(Instant::now());
            Ok(())
        },
    );
    let pool = q.workers().concurrency(opts.workers).start()?;
    let events = q.subscribe();
    let lifecycle_per_s = {
        let t0 = Instant::now();
        enqueue_batches(&q, n)?;
        await_terminal(&events, n)?;
        let r = rate(n, t0.elapsed());
        progress(&format!(
            "lifecycle ({mode}, {} workers): {n} tasks enqueued, run and completed, {r:.0} tasks/s",
            opts.workers
        ));
        r
    };
    drop(events);

    // (d) enqueue-to-start latency on the idle pool.
    let samples = n.min(MAX_LATENCY_SAMPLES);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let t0 = Instant::now();
        let id = q.enqueue(BenchProbe { n: i })?;
        let started = started_rx
            .recv_timeout(PHASE_TIMEOUT)
            .map_err(|_| Error::Invalid {
                what: "bench",
                reason: format!("latency probe {i} did not start within {PHASE_TIMEOUT:?}"),
            })?;
        lat.push(started.saturating_duration_since(t0));
        // Wait for it to finish so the next probe meets an idle pool again.
        q.wait(id, PHASE_TIMEOUT)?;
    }
    lat.sort();
    let latency_p50_ms = percentile_ms(&lat, 0.50);
    let latency_p99_ms = percentile_ms(&lat, 0.99);
    let latency_max_ms = percentile_ms(&lat, 1.0);
    progress(&format!(
        "enqueue-to-start latency (idle pool, {samples} samples): p50 {latency_p50_ms:.3} ms, p99 {latency_p99_ms:.3} ms, max {latency_max_ms:.3} ms"
    ));
    pool.stop();

    // (e) disk use of the lifecycle directory.
    let stored = q.stats()?.total;
    let bytes = q.size_on_disk()?;
    let disk_bytes_per_task = if stored == 0 {
        0.0
    } else {
        bytes as f64 / stored as f64
    };
    progress(&format!(
        "disk: {bytes} bytes for {stored} completed tasks with their logs, {disk_bytes_per_task:.0} bytes/task"
    ));
    drop(q);

    Ok(BenchReport {
        tasks: n,
        workers: opts.workers,
        durability: mode,
        enqueue_per_s,
        enqueue_many_per_s,
        lifecycle_per_s,
        latency_p50_ms,
        latency_p99_ms,
        disk_bytes_per_task,
        latency_max_ms,
        latency_samples: samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&s, 0.5), 50.0);
        assert_eq!(percentile_ms(&s, 0.99), 99.0);
        assert_eq!(percentile_ms(&s, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn a_small_run_reports_every_phase() {
        let mut lines = Vec::new();
        let r = run(
            &BenchOptions {
                tasks: 30,
                workers: 2,
                durability: Durability::Group,
            },
            &mut |l| lines.push(l.to_string()),
        )
        .unwrap();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(r.latency_samples, 30);
        assert_eq!(r.durability, "group");
        assert!(r.enqueue_per_s > 0.0 && r.enqueue_many_per_s > 0.0 && r.lifecycle_per_s > 0.0);
        assert!(r.latency_p50_ms <= r.latency_p99_ms && r.latency_p99_ms <= r.latency_max_ms);
        assert!(r.disk_bytes_per_task > 0.0);
    }

    #[test]
    fn zero_tasks_is_refused() {
        let e = run(
            &BenchOptions {
                tasks: 0,
                workers: 1,
                durability: Durability::Group,
            },
            &mut |_| {},
        );
        assert!(matches!(e, Err(Error::Invalid { .. })));
    }
}
