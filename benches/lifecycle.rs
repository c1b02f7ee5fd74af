//! Full durable lifecycle (issue 3): enqueue -> run a no-op handler -> `Completed` under the
//! default group commit, on a pool started before the first enqueue:
//!
//! - `N_workers` (1, 4, 16): each iteration enqueues its 1,000 tasks in one `enqueue_many` call;
//!   `4_workers_claim_ahead_64` the same with `WorkerPoolBuilder::claim_ahead(64)`;
//! - `4_workers_one_enqueue_per_task`: one producer calls `enqueue` once per task, 1,000 times
//!   (the everyday pattern; issue 8).
//!
//! Both are timed from the first enqueue until every task is `Completed`. Then enqueue-to-start
//! latency on an idle pool, whose p50/p99 this bench computes and prints itself (criterion reports
//! means, not percentiles).
//!
//! Run: `cargo bench --bench lifecycle`

mod common;

use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use crossbeam_channel::Receiver;
use omniq::{Queue, Status, Task, TaskContext, TaskError, TransitionEvent};
use serde::{Deserialize, Serialize};

use common::Noop;

#[derive(Serialize, Deserialize)]
struct Probe {
    n: u64,
}

impl Task for Probe {
    const NAME: &'static str = "probe";
    type Output = ();
}

/// Tasks per measured iteration.
const TASKS: usize = 1_000;

/// True under `cargo bench`; false under `cargo test --benches`, where every part runs once,
/// small.
fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Waits until `n` tasks completed, counting the queue's transition events (no polling).
fn await_completed(events: &Receiver<TransitionEvent>, n: usize) {
    let mut done = 0;
    while done < n {
        let ev = events
            .recv_timeout(Duration::from_secs(120))
            .expect("tasks stopped completing");
        if ev.entry.to.is_terminal() {
            assert_eq!(
                ev.entry.to,
                Status::Completed,
                "a no-op task did not complete"
            );
            done += 1;
        }
    }
}

fn bench_lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("lifecycle");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(TASKS as u64));
    // (workers, claim-ahead): the plain pools, then 4 workers claiming 64 ahead.
    for (workers, ahead) in [(1usize, 0usize), (4, 0), (16, 0), (4, 64)] {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path().join("q")).unwrap();
        q.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
        let pool = q
            .workers()
            .concurrency(workers)
            .claim_ahead(ahead)
            .start()
            .unwrap();
        let events = q.subscribe();
        let mut next = 0u64;
        let name = match ahead {
            0 => format!("{workers}_workers"),
            a => format!("{workers}_workers_claim_ahead_{a}"),
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch: Vec<Noop> =
                        (next..next + TASKS as u64).map(|n| Noop { n }).collect();
                    next += TASKS as u64;
                    let t0 = Instant::now();
                    q.enqueue_many(batch).unwrap();
                    await_completed(&events, TASKS);
                    total += t0.elapsed();
                }
                total
            })
        });
        pool.stop();
    }
    {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path().join("q")).unwrap();
        q.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
        let pool = q.workers().concurrency(4).start().unwrap();
        let events = q.subscribe();
        let mut next = 0u64;
        g.bench_function("4_workers_one_enqueue_per_task", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    for _ in 0..TASKS {
                        q.enqueue(Noop { n: next }).unwrap();
                        next += 1;
                    }
                    await_completed(&events, TASKS);
                    total += t0.elapsed();
                }
                total
            })
        });
        pool.stop();
    }
    g.finish();
}

/// Enqueue-to-start latency on an idle pool: one probe at a time, the next only after the
/// previous completed. The producer takes the instant just before `enqueue`, the handler the
/// instant it starts.
fn latency(workers: usize, samples: usize) {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path().join("q")).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded::<Instant>();
    q.register(move |_: Probe, _: &TaskContext| -> Result<(), TaskError> {
        tx.send(Instant::now()).unwrap();
        Ok(())
    });
    let pool = q.workers().concurrency(workers).start().unwrap();
    // A few unmeasured probes first (page cache, thread start-up).
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let t0 = Instant::now();
        let id = q.enqueue(Probe { n: i as u64 }).unwrap();
        let started = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        if i >= 20 {
            lat.push(started.duration_since(t0));
        }
        q.wait(id, Duration::from_secs(30)).unwrap();
    }
    pool.stop();
    lat.sort();
    let pct = |p: f64| {
        let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
        lat[rank - 1].as_secs_f64() * 1e3
    };
    println!(
        "lifecycle/enqueue_to_start_latency ({workers} workers, idle pool, {} samples): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        lat.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_lifecycle(&mut c);
    c.final_summary();
    let samples = if benchmarking() { 1_000 } else { 20 };
    latency(1, samples);
    latency(4, samples);
}
