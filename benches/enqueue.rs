//! Enqueue throughput (issue 2): one producer under `Durability::Immediate`, `enqueue_many`
//! of 1,000, and 8 producer threads under group commit. Rates are reported as tasks/s
//! (`Throughput::Elements`).
//!
//! Run: `cargo bench --bench enqueue`

mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use omniq::{Durability, Queue};

use common::Noop;

const PRODUCERS: usize = 8;
/// Enqueues per producer per measured iteration.
const PER_PRODUCER: usize = 50;

fn open(dir: &tempfile::TempDir, d: Durability) -> Queue {
    Queue::builder(dir.path().join("q"))
        .durability(d)
        .open()
        .unwrap()
}

/// Flushes the page cache (the `sync` command) so earlier benchmarks' writeback does not land
/// in this one's measurements.
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn bench_enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("enqueue");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));

    {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, Durability::Immediate);
        let mut n = 0u64;
        g.throughput(Throughput::Elements(1));
        g.bench_function("single_producer_immediate", |b| {
            b.iter(|| {
                n += 1;
                q.enqueue(Noop { n }).unwrap()
            })
        });
    }

    {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, Durability::Group);
        g.throughput(Throughput::Elements((PRODUCERS * PER_PRODUCER) as u64));
        g.bench_function("8_producers_group", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let barrier = Barrier::new(PRODUCERS + 1);
                    let t0 = std::thread::scope(|s| {
                        for p in 0..PRODUCERS {
                            let (q, barrier) = (&q, &barrier);
                            s.spawn(move || {
                                barrier.wait();
                                for i in 0..PER_PRODUCER {
                                    q.enqueue(Noop {
                                        n: (p * PER_PRODUCER + i) as u64,
                                    })
                                    .unwrap();
                                }
                            });
                        }
                        // Every producer is started and waiting: time from release to the last
                        // acknowledgement (the scope joins every producer before it returns).
                        barrier.wait();
                        Instant::now()
                    });
                    total += t0.elapsed();
                }
                total
            })
        });
    }
    // enqueue_many runs last: it leaves a large directory whose teardown and writeback (sled's
    // shared I/O threads, the page cache) would otherwise stall the benchmarks after it.
    settle();
    {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, Durability::Immediate);
        g.sampling_mode(SamplingMode::Flat).sample_size(10);
        g.throughput(Throughput::Elements(1_000));
        g.bench_function("enqueue_many_1000_immediate", |b| {
            b.iter_batched(
                || (0..1_000u64).map(|n| Noop { n }).collect::<Vec<_>>(),
                |batch| q.enqueue_many(batch).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }

    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_enqueue(&mut c);
    c.final_summary();
}
