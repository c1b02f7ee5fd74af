//! `omniq bench --suite churn`: what a queue that runs for a while under retention holds on disk
//! and in memory (issue 12: "the README's disk formula holds ... measure it again and state what
//! a user should plan for").
//!
//! One producer enqueues no-op tasks at a steady `rate` (an `enqueue_many` of whatever is due
//! every 20 ms, at most 1,000), `workers` run them, and the queue purges in the background
//! ([`QueueBuilder::retention`](crate::QueueBuilder::retention) and
//! [`purge_interval`](crate::QueueBuilder::purge_interval)). Every 5 s the run samples the tasks
//! stored, the directory's size and the process's RSS. The report gives the *level* each settles
//! at: the range over the second half of the run, once the first retention window has passed and
//! purges remove as much as is finished.

use std::path::Path;
use std::time::{Duration, Instant};

use super::disk::{dir_bytes, proc_status_bytes, SuiteReport};
use super::{register_noop, thousands, BenchNoop, BenchRow, Rows};
use crate::error::{Error, Result};
use crate::queue::{Durability, Queue};

/// What `--suite churn` runs.
#[derive(Clone, Debug)]
pub struct ChurnOptions {
    /// Tasks enqueued per second.
    pub rate: usize,
    /// How long the producer runs.
    pub duration: Duration,
    /// Finished tasks older than this are purged.
    pub retention: Duration,
    /// How often the background purge runs.
    pub purge_interval: Duration,
    /// Worker threads.
    pub workers: usize,
}

/// One sample of the run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    stored: u64,
    dir_bytes: u64,
    rss: u64,
}

/// Runs the churn suite in a temporary directory.
pub fn run_churn(opts: &ChurnOptions, progress: &mut dyn FnMut(&str)) -> Result<SuiteReport> {
    if opts.rate == 0 || opts.workers == 0 || opts.duration < Duration::from_secs(10) {
        return Err(Error::Invalid {
            what: "bench",
            reason: "--suite churn needs a rate and workers of at least 1 and at least 10 seconds"
                .into(),
        });
    }
    let tmp = tempfile::TempDir::new()
        .map_err(|e| Error::Storage(format!("cannot create a temporary directory: {e}")))?;
    let path = tmp.path().join("churn");
    let q = Queue::builder(&path)
        .durability(Durability::Group)
        .retention(opts.retention)
        .purge_interval(opts.purge_interval)
        .open()?;
    register_noop(&q);
    let pool = q.workers().concurrency(opts.workers).start()?;
    let samples = produce(&q, &path, opts, progress)?;
    pool.stop();
    let enqueued = (opts.rate as f64 * opts.duration.as_secs_f64()) as u64;
    q.close()?;
    Ok(report(opts, enqueued, &samples, progress))
}

/// Enqueues at `rate` for `duration`, sampling every 5 s.
fn produce(
    q: &Queue,
    path: &Path,
    opts: &ChurnOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Sample>> {
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut next_sample = Duration::ZERO;
    let mut samples = Vec::new();
    let target = |elapsed: Duration| (opts.rate as f64 * elapsed.as_secs_f64()) as u64;
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= opts.duration {
            break;
        }
        let due = target(elapsed).saturating_sub(sent).min(1_000);
        if due > 0 {
            q.enqueue_many((sent..sent + due).map(|n| BenchNoop { n }))?;
            sent += due;
        }
        if elapsed >= next_sample {
            let s = Sample {
                at: elapsed,
                stored: q.stats()?.total,
                dir_bytes: dir_bytes(path)?,
                rss: proc_status_bytes("VmRSS")?,
            };
            progress(&format!(
                "{:>4.0} s: {} tasks stored, directory {:.1} MB, RSS {:.0} MiB",
                s.at.as_secs_f64(),
                thousands(s.stored),
                s.dir_bytes as f64 / 1e6,
                s.rss as f64 / (1 << 20) as f64
            ));
            samples.push(s);
            next_sample += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(samples)
}

fn report(
    opts: &ChurnOptions,
    enqueued: u64,
    samples: &[Sample],
    progress: &mut dyn FnMut(&str),
) -> SuiteReport {
    let mut rows = Rows {
        raw_per_s: 0.0,
        rows: Vec::new(),
        progress,
    };
    // The level: the second half of the run (at least one retention + purge interval in).
    let settle = (opts.duration / 2).max(opts.retention + opts.purge_interval);
    let level: Vec<&Sample> = samples.iter().filter(|s| s.at >= settle).collect();
    let range = |f: &dyn Fn(&Sample) -> f64| {
        let lo = level.iter().map(|s| f(s)).fold(f64::INFINITY, f64::min);
        let hi = level.iter().map(|s| f(s)).fold(0.0, f64::max);
        if level.is_empty() {
            (0.0, 0.0)
        } else {
            (lo, hi)
        }
    };
    let (stored_lo, stored_hi) = range(&|s| s.stored as f64);
    let (dir_lo, dir_hi) = range(&|s| s.dir_bytes as f64);
    let (rss_lo, rss_hi) = range(&|s| s.rss as f64 / (1 << 20) as f64);
    let per_task = range(&|s| s.dir_bytes as f64 / s.stored.max(1) as f64);
    let mb = 1e6;
    rows.push(
        "churn_enqueued",
        format!(
            "tasks enqueued ({} /s for {} s, retention {} s, purge every {} s, {} workers)",
            thousands(opts.rate as u64),
            opts.duration.as_secs(),
            opts.retention.as_secs(),
            opts.purge_interval.as_secs(),
            opts.workers
        ),
        enqueued as f64,
        "tasks",
    );
    rows.push(
        "churn_stored_low",
        "tasks stored, level (low, second half of the run)".into(),
        stored_lo,
        "tasks",
    );
    rows.push(
        "churn_stored_high",
        "tasks stored, level (high)".into(),
        stored_hi,
        "tasks",
    );
    rows.push(
        "churn_dir_low_mb",
        "directory, level (low)".into(),
        dir_lo / mb,
        "MB",
    );
    rows.push(
        "churn_dir_high_mb",
        "directory, level (high)".into(),
        dir_hi / mb,
        "MB",
    );
    rows.push(
        "churn_bytes_per_stored_low",
        "directory bytes per task stored (low)".into(),
        per_task.0,
        "bytes/task",
    );
    rows.push(
        "churn_bytes_per_stored_high",
        "directory bytes per task stored (high)".into(),
        per_task.1,
        "bytes/task",
    );
    rows.push(
        "churn_rss_low_mib",
        "RSS, level (low)".into(),
        rss_lo,
        "MiB",
    );
    rows.push(
        "churn_rss_high_mib",
        "RSS, level (high)".into(),
        rss_hi,
        "MiB",
    );
    let rows: Vec<BenchRow> = rows.rows;
    SuiteReport {
        suite: "churn".into(),
        tasks: enqueued as usize,
        workers: opts.workers,
        runs: 1,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_churn_run_levels_off_under_retention() {
        let opts = ChurnOptions {
            rate: 400,
            duration: Duration::from_secs(10),
            retention: Duration::from_secs(2),
            purge_interval: Duration::from_secs(1),
            workers: 2,
        };
        let report = run_churn(&opts, &mut |_| {}).unwrap();
        let get = |k: &str| {
            report
                .rows
                .iter()
                .find(|r| r.key == k)
                .map(|r| r.value)
                .unwrap()
        };
        assert_eq!(get("churn_enqueued"), 4_000.0);
        // Retention keeps about (retention + purge interval) x rate = ~1,200 tasks, far fewer
        // than the 4,000 enqueued: purges ran and the level is the window, not the total.
        let high = get("churn_stored_high");
        assert!(high > 0.0 && high < 3_000.0, "level {high}");
        assert!(get("churn_dir_high_mb") > 0.0);
        assert!(get("churn_rss_high_mib") > 0.0);
    }
}
