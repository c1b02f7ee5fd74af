//! Issue 12's everyday workloads, each as a ratio to a raw 128-byte append + `fdatasync` measured
//! in the same run: single-producer `enqueue`, one producer while 4 workers run (first enqueue
//! to last durable completion), a drain of an `enqueue_many`-built queue by 4 workers, and every
//! task failing once then succeeding (1 retry, no delay). Public API only, so the same file
//! builds against an older checkout for before/after runs.
//!
//! `cargo bench --bench wal -- [N] [blocks]` (default 5,000 tasks per row in 10 blocks;
//! `WAL_BENCH_ROWS=a,b` picks rows, `WAL_BENCH_DIR` the directory). Each block of tasks is timed
//! right after 100 raw appends + `fdatasync` and divided by their rate, so the disk's drift on a
//! shared machine cancels; each row prints the medians of its blocks.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use omniq::{Backoff, Durability, Queue, RetryPolicy, Status, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize, Deserialize)]
struct Noop {
    n: u64,
}
impl Task for Noop {
    const NAME: &'static str = "wal_bench_noop";
    type Output = ();
}

#[derive(Serialize, Deserialize)]
struct FailOnce {
    n: u64,
}
impl Task for FailOnce {
    const NAME: &'static str = "wal_bench_fail_once";
    type Output = ();
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// `n` appends of 128 bytes to `f`, each followed by `fdatasync`: writes/s.
fn raw(f: &mut std::fs::File, n: usize) -> f64 {
    let block = [0x5au8; 128];
    let t0 = Instant::now();
    for _ in 0..n {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
    }
    rate(n, t0.elapsed())
}

fn open(dir: &Path, name: &str) -> Queue {
    let q = Queue::builder(dir.join(name))
        .durability(Durability::Group)
        .retry_policy(RetryPolicy {
            max_retries: 1,
            backoff: Backoff::new(Duration::ZERO, Duration::ZERO, 0.0),
        })
        .open()
        .unwrap();
    q.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
    q.register(|_: FailOnce, ctx: &TaskContext| -> Result<(), TaskError> {
        if ctx.attempt() <= 1 {
            Err(TaskError::transient("once", "fails once"))
        } else {
            Ok(())
        }
    });
    q
}

fn await_completed(events: &crossbeam_channel::Receiver<omniq::TransitionEvent>, n: usize) {
    let mut done = 0;
    while done < n {
        let ev = events
            .recv_timeout(Duration::from_secs(300))
            .expect("bench stalled");
        if ev.entry.to.is_terminal() {
            assert_eq!(ev.entry.to, Status::Completed);
            done += 1;
        }
    }
}

fn enqueue_many<T: Task>(q: &Queue, n: usize, make: impl Fn(u64) -> T) {
    let mut i = 0u64;
    while (i as usize) < n {
        let k = (n - i as usize).min(1000) as u64;
        q.enqueue_many((i..i + k).map(&make)).unwrap();
        i += k;
    }
}

/// One workload, measured in blocks of `k` tasks on one queue (and pool).
struct Row {
    q: Queue,
    events: crossbeam_channel::Receiver<omniq::TransitionEvent>,
    _pool: Option<omniq::WorkerPool>,
    kind: &'static str,
}

impl Row {
    fn new(dir: &Path, kind: &'static str) -> Row {
        let q = open(dir, kind);
        let events = q.subscribe();
        let pool = (kind != "enqueue_alone").then(|| q.workers().concurrency(4).start().unwrap());
        Row {
            q,
            events,
            _pool: pool,
            kind,
        }
    }

    /// Runs one block of `k` tasks: tasks/s.
    fn block(&mut self, k: usize) -> f64 {
        while self.events.try_recv().is_ok() {}
        let t0 = Instant::now();
        match self.kind {
            "enqueue_alone" => {
                for i in 0..k as u64 {
                    self.q.enqueue(Noop { n: i }).unwrap();
                }
            }
            "producer_4_workers" => {
                for i in 0..k as u64 {
                    self.q.enqueue(Noop { n: i }).unwrap();
                }
                await_completed(&self.events, k);
            }
            "drain_4_workers" => {
                enqueue_many(&self.q, k, |n| Noop { n });
                await_completed(&self.events, k);
            }
            _ => {
                enqueue_many(&self.q, k, |n| FailOnce { n });
                await_completed(&self.events, k);
            }
        }
        rate(k, t0.elapsed())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let blocks: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    // `WAL_BENCH_ROWS=enqueue_alone,fail_once` runs only those rows.
    let only = std::env::var("WAL_BENCH_ROWS").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|r| r == name))
    };
    let tmp =
        tempfile::tempdir_in(std::env::var("WAL_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp.path().join("raw"))
        .unwrap();
    f.write_all(&[0u8; 128]).unwrap();
    f.sync_all().unwrap();
    for kind in [
        "enqueue_alone",
        "producer_4_workers",
        "drain_4_workers",
        "fail_once",
    ] {
        if !wanted(kind) {
            continue;
        }
        let mut row = Row::new(tmp.path(), kind);
        let k = (n / blocks).max(1);
        // Each block is timed right after 100 raw appends + fdatasync, and given as a ratio
        // to them, so the disk's drift on a shared machine cancels out; medians of the blocks.
        let (mut rates, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..blocks {
            let r0 = raw(&mut f, 100);
            let r = row.block(k);
            rates.push(r);
            raws.push(r0);
            ratios.push(r / r0);
        }
        println!(
            "{kind} {:.0}/s raw {:.0}/s ratio {:.2} (median of {blocks} blocks of {k})",
            median(rates),
            median(raws),
            median(ratios)
        );
    }
}
