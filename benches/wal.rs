//! Issue 12's everyday workloads, each as a ratio to a raw 128-byte append + `fdatasync` measured
//! in the same run: single-producer `enqueue`, one producer while 4 workers run (first enqueue
//! to last durable completion), a drain of an `enqueue_many`-built queue by 4 workers, and every
//! task failing once then succeeding (1 retry, no delay). Public API only, so the same file
//! builds against an older checkout for before/after runs.
//!
//! `cargo bench --bench wal -- [N] [rounds]` (default 5,000 tasks per row, 1 round;
//! `WAL_BENCH_ROWS=a,b` picks rows, `WAL_BENCH_DIR` the directory). Prints one line per row:
//! `row rate/s raw <raw rate/s measured just before it> ratio <rate / raw>`.

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

fn raw(dir: &Path) -> f64 {
    let path = dir.join("raw");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let block = [0x5au8; 128];
    f.write_all(&block).unwrap();
    f.sync_all().unwrap();
    let n = 1000;
    let t0 = Instant::now();
    for _ in 0..n {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
    }
    let r = rate(n, t0.elapsed());
    std::fs::remove_file(path).unwrap();
    r
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

fn enqueue_alone(dir: &Path, n: usize) -> f64 {
    let q = open(dir, "enqueue");
    let t0 = Instant::now();
    for i in 0..n as u64 {
        q.enqueue(Noop { n: i }).unwrap();
    }
    rate(n, t0.elapsed())
}

fn producer_and_workers(dir: &Path, n: usize) -> f64 {
    let q = open(dir, "lifecycle");
    let pool = q.workers().concurrency(4).start().unwrap();
    let events = q.subscribe();
    let t0 = Instant::now();
    for i in 0..n as u64 {
        q.enqueue(Noop { n: i }).unwrap();
    }
    await_completed(&events, n);
    let r = rate(n, t0.elapsed());
    pool.stop();
    r
}

fn enqueue_many<T: Task>(q: &Queue, n: usize, make: impl Fn(u64) -> T) {
    let mut i = 0u64;
    while (i as usize) < n {
        let k = (n - i as usize).min(1000) as u64;
        q.enqueue_many((i..i + k).map(&make)).unwrap();
        i += k;
    }
}

fn drain(dir: &Path, n: usize, fail_once: bool) -> f64 {
    let q = open(dir, if fail_once { "fail_once" } else { "drain" });
    if fail_once {
        enqueue_many(&q, n, |n| FailOnce { n });
    } else {
        enqueue_many(&q, n, |n| Noop { n });
    }
    let events = q.subscribe();
    let t0 = Instant::now();
    let pool = q.workers().concurrency(4).start().unwrap();
    await_completed(&events, n);
    let r = rate(n, t0.elapsed());
    pool.stop();
    r
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    // `WAL_BENCH_ROWS=enqueue_alone,fail_once` runs only those rows.
    let only = std::env::var("WAL_BENCH_ROWS").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|r| r == name))
    };
    type Row = fn(&Path, usize) -> f64;
    let rows: [(&str, Row); 4] = [
        ("enqueue_alone", enqueue_alone),
        ("producer_4_workers", producer_and_workers),
        ("drain_4_workers", |d, n| drain(d, n, false)),
        ("fail_once", |d, n| drain(d, n, true)),
    ];
    for _ in 0..rounds {
        let tmp =
            tempfile::tempdir_in(std::env::var("WAL_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
        // The raw rate is measured right before each row (the disk's speed drifts on a shared
        // machine), and the row is given as a ratio to it.
        for (name, row) in rows.iter().filter(|(name, _)| wanted(name)) {
            let raw = raw(tmp.path());
            let r = row(tmp.path(), n);
            println!("{name} {r:.0} raw {raw:.0} ratio {:.2}", r / raw);
        }
    }
}
