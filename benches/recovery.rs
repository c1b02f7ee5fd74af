//! Open + crash recovery (issue 4).
//!
//! 1. `recovery/open_100k_tasks_10k_orphans` (criterion): a directory holding 100,000 tasks of
//!    which 10,000 were left `Running` by a "crashed" process (claimed, then abandoned) is
//!    copied afresh for every iteration; the timed part is `Queue::open`, which recovers the
//!    orphans before it returns.
//! 2. 1,000,000 stored tasks (10,000 of them orphans): built once with `enqueue_many` batches
//!    (progress printed), then opened a few times from fresh copies; open + recovery times,
//!    plain reopen time and disk use are printed (one open is seconds, too slow for criterion's
//!    minimum of 10 samples).
//!
//! Run: `cargo bench --bench recovery`

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use omniq::{testing, Queue};

use common::Noop;

/// True under `cargo bench`; false under `cargo test --benches`, where everything runs once,
/// small.
fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// Builds a closed queue directory with `total` tasks, `orphans` of them left `Running` as a
/// killed process would leave them.
fn build(path: &Path, total: usize, orphans: usize) {
    let t0 = Instant::now();
    let q = Queue::open(path).unwrap();
    let mut next = 0u64;
    while (next as usize) < total {
        let k = (total - next as usize).min(1_000) as u64;
        q.enqueue_many((next..next + k).map(|n| Noop { n }))
            .unwrap();
        next += k;
        if next.is_multiple_of(100_000) {
            eprintln!(
                "  built {next}/{total} tasks ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    for i in 0..orphans {
        testing::claim_next(&q).unwrap().unwrap().abandon();
        if (i + 1) % 5_000 == 0 {
            eprintln!(
                "  orphaned {}/{orphans} ({:.1} s)",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let bytes = q.size_on_disk().unwrap();
    drop(q);
    eprintln!(
        "  built {total} tasks / {orphans} orphans in {:.1} s: {bytes} bytes on disk ({:.0} bytes/task)",
        t0.elapsed().as_secs_f64(),
        bytes as f64 / total as f64
    );
}

fn bench_100k(c: &mut Criterion) {
    let (total, orphans) = if benchmarking() {
        (100_000, 10_000)
    } else {
        (2_000, 200)
    };
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    eprintln!("recovery: building {total} tasks with {orphans} orphans");
    build(&template, total, orphans);

    let mut recovery_times = Vec::new();
    let mut g = c.benchmark_group("recovery");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    let mut copy = 0u32;
    g.bench_function(
        format!("open_{}k_tasks_{}k_orphans", total / 1000, orphans / 1000),
        |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    copy += 1;
                    let dir = root.path().join(format!("copy{copy}"));
                    copy_dir(&template, &dir);
                    let t0 = Instant::now();
                    let q = Queue::open(&dir).unwrap();
                    elapsed += t0.elapsed();
                    let r = q.recovery_report();
                    assert_eq!(r.recovered, orphans);
                    assert_eq!(r.requeued, orphans);
                    recovery_times.push(r.duration);
                    drop(q);
                    std::fs::remove_dir_all(&dir).unwrap();
                }
                elapsed
            })
        },
    );
    g.finish();
    recovery_times.sort();
    if let (Some(min), Some(max)) = (recovery_times.first(), recovery_times.last()) {
        println!(
            "recovery/open_{}k_tasks_{}k_orphans: recovery step alone (RecoveryReport::duration) over {} opens: min {:.3} s, median {:.3} s, max {:.3} s",
            total / 1000,
            orphans / 1000,
            recovery_times.len(),
            min.as_secs_f64(),
            recovery_times[recovery_times.len() / 2].as_secs_f64(),
            max.as_secs_f64()
        );
    }
}

fn one_million() {
    let (total, orphans, runs) = if benchmarking() {
        (1_000_000, 10_000, 3)
    } else {
        (3_000, 100, 1)
    };
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    eprintln!("recovery: building {total} tasks with {orphans} orphans (once; this takes a while)");
    build(&template, total, orphans);
    for run in 1..=runs {
        let dir = root.path().join(format!("copy{run}"));
        copy_dir(&template, &dir);
        let t0 = Instant::now();
        let q = Queue::open(&dir).unwrap();
        let open_recover = t0.elapsed();
        let r = q.recovery_report().clone();
        assert_eq!(r.recovered, orphans);
        drop(q);
        let t1 = Instant::now();
        let q = Queue::open(&dir).unwrap();
        let reopen = t1.elapsed();
        assert_eq!(q.recovery_report().recovered, 0);
        assert_eq!(q.stats().unwrap().total, total as u64);
        drop(q);
        println!(
            "recovery/open_{}_tasks_{}_orphans run {run}: open + recovery {:.3} s (recovery step {:.3} s); clean reopen {:.3} s",
            total,
            orphans,
            open_recover.as_secs_f64(),
            r.duration.as_secs_f64(),
            reopen.as_secs_f64()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_100k(&mut c);
    c.final_summary();
    one_million();
}
