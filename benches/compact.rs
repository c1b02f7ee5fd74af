//! Issue 12, "the directory shrinks back after a purge": directory sizes for `N` tasks drained
//! (default 100,000), after `purge(0)` without compaction, and after `compact()`; then five
//! rounds of 5,000 tasks + purge with the default auto-compaction rule; the compaction's time
//! and the write pause it causes — measured as the longest `enqueue` latency of a producer
//! running during a compaction of a store holding `N` *pending* tasks (the worst case: every
//! key live, so everything is copied while commits wait), against its median latency.
//!
//! `cargo bench --bench compact -- [N]` (`COMPACT_BENCH_DIR` picks the parent directory).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omniq::{Queue, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize, Deserialize)]
struct Noop {
    n: u64,
}
impl Task for Noop {
    const NAME: &'static str = "compact_bench_noop";
    type Output = ();
}

fn dir_bytes(dir: &Path) -> u64 {
    omniq::bench::disk::dir_bytes(dir).unwrap()
}

fn mb(b: u64) -> String {
    if b < 1_000_000 {
        format!("{:.1} kB", b as f64 / 1e3)
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

fn enqueue(queue: &Queue, from: u64, n: u64) -> Vec<omniq::TaskId> {
    let mut ids = Vec::new();
    let mut i = from;
    while i < from + n {
        let end = (i + 1000).min(from + n);
        ids.extend(queue.enqueue_many((i..end).map(|n| Noop { n })).unwrap());
        i = end;
    }
    ids
}

fn drain(queue: &Queue, ids: &[omniq::TaskId]) {
    let pool = queue.workers().concurrency(4).start().unwrap();
    queue.wait_all(ids, Duration::from_secs(3600)).unwrap();
    pool.stop();
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let parent =
        std::env::var("COMPACT_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let tmp = tempfile::tempdir_in(parent).unwrap();
    let dir = tmp.path().join("q");

    // 1. N drained, purge(0) without compaction, then compact().
    let queue = Queue::builder(&dir).auto_compact(None).open().unwrap();
    queue.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
    let ids = enqueue(&queue, 0, n);
    drain(&queue, &ids);
    let drained = dir_bytes(&dir);
    let removed = queue.purge(Duration::ZERO).unwrap().tasks_removed;
    let purged = dir_bytes(&dir);
    let r = queue.compact().unwrap();
    let compacted = dir_bytes(&dir);
    println!("{n} tasks drained: {}", mb(drained));
    println!("purge(0) removed {removed}, no compaction: {}", mb(purged));
    println!(
        "compact(): {} (report {} -> {}, {} keys, {:.1} ms, writes held {:.1} ms)",
        mb(compacted),
        mb(r.bytes_before),
        mb(r.bytes_after),
        r.keys_copied,
        r.duration.as_secs_f64() * 1e3,
        r.write_pause.as_secs_f64() * 1e3
    );
    queue.close().unwrap();
    println!("after close: {}", mb(dir_bytes(&dir)));

    // 2. Five rounds of 5,000 + purge, default auto-compaction (reopened with the default rule).
    let queue = Queue::open(&dir).unwrap();
    queue.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
    for round in 0..5 {
        let ids = enqueue(&queue, n + round * 5000, 5000);
        drain(&queue, &ids);
        let before = dir_bytes(&dir);
        let p = queue.purge(Duration::ZERO).unwrap();
        println!(
            "round {round}: 5,000 drained {} -> purge {}{}",
            mb(before),
            mb(dir_bytes(&dir)),
            if p.compaction.is_some() {
                " (auto-compacted)"
            } else {
                ""
            }
        );
    }
    queue.close().unwrap();

    // 3. The write pause: N pending tasks (all live), a producer enqueueing one at a time.
    let dir2 = tmp.path().join("pending");
    let queue = Queue::builder(&dir2).auto_compact(None).open().unwrap();
    enqueue(&queue, 0, n);
    let size = dir_bytes(&dir2);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (queue, stop) = (queue.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut i = 10 * n;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                queue.enqueue(Noop { n: i }).unwrap();
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = queue.compact().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let mut lat = producer.join().unwrap();
    lat.sort();
    let median = lat[lat.len() / 2];
    println!(
        "{n} pending ({}): compact() {:.0} ms, {} keys, {} -> {}; writes held {:.0} ms; producer \
         enqueue latency median {:.2} ms, max {:.0} ms over {} enqueues",
        mb(size),
        r.duration.as_secs_f64() * 1e3,
        r.keys_copied,
        mb(r.bytes_before),
        mb(r.bytes_after),
        r.write_pause.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        lat.len()
    );
}
