//! `omniq bench --suite disk`: issue 12's table in one run, and `--suite rss`: peak memory while
//! building and draining a deep queue.
//!
//! **disk** (every omniq row the median of [`SuiteOptions::runs`] runs, each run on a fresh
//! directory; `N` = [`SuiteOptions::tasks`], `W` = [`SuiteOptions::workers`], durability
//! `Group`, no-op handler):
//!
//! 1. raw append + `fdatasync` of 128 B to a plain file (`min(N, 2,000)` writes): the reference.
//! 2. single producer, [`Queue::enqueue`] one task per call, each awaited, no workers.
//! 3. drain: `N` tasks enqueued first (`enqueue_many` batches of 1,000, not timed), then `W`
//!    workers started; timed until the last durable `Completed`.
//! 4. one producer calling `enqueue` once per task while `W` workers run, first enqueue to last
//!    durable `Completed`.
//! 5. every task fails once (transient error on attempt 1) then succeeds: budget 1 retry, no
//!    backoff; `N` tasks enqueued first, then drained by `W` workers, timed until the last
//!    `Completed` (2 executions per task).
//! 6. bytes on disk per completed task: row 3's directory after [`Queue::close`] (so flushed),
//!    every file's length summed, divided by `N`; then the same directory's keys and values
//!    summed by key prefix (opened with sled directly): where the bytes go. This directory
//!    once held `N` pending tasks, and sled's data file never shrinks, so the row measures the
//!    pending peak as much as the completed tasks.
//! 7. the same directory after [`Queue::compact`]: rewritten to what it holds (what a purge's
//!    automatic compaction or `omniq compact` gives back).
//! 8. bytes on disk per completed task in row 4's directory after close: tasks completed as they
//!    arrived (a short backlog), the steady state of a retained history (format 4, issue 12).
//! 9. row 1 again, a drift check.
//!
//! Every omniq run of rows 2-5 is also bracketed by raw measurements of
//! `min(N, 1,000)` writes (a row after row 1 reports them): a workload's ratio is the median,
//! over its runs, of its rate over the mean of the raw rates just before and just after that
//! run. The disk of this project's test machine has been seen to halve its raw rate within one
//! suite, which made ratios to row 1 alone meaningless.
//!
//! **rss**: one process enqueues `N` pending tasks with `enqueue_many` in batches of 1,000
//! (small payloads), reporting peak RSS (`VmHWM`), then the peak is reset (`clear_refs`) and
//! `W` workers drain them, reporting the drain's peak; RSS after `close()`, the time to open the
//! same directory again (open + recovery) and the RSS after that open follow. Linux only (reads `/proc/self/status`).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    await_terminal, count, enqueue_batches, rate, raw_fdatasync, register_noop, thousands,
    BenchNoop, BenchRow, Rows, MAX_RAW_WRITES, RAW_WRITE_BYTES,
};
use crate::error::{Error, Result};
use crate::handler::TaskContext;
use crate::queue::{Durability, Queue};
use crate::retry::{Backoff, RetryPolicy};
use crate::task::{Task, TaskError};

/// Which suite to run and how big.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// Tasks per run (issue 12 uses 20,000 for `disk`, 1,000,000 for `rss`).
    pub tasks: usize,
    /// Worker threads.
    pub workers: usize,
    /// Runs per omniq row; the median is reported (issue 12: 3). `rss` always runs once.
    pub runs: usize,
}

/// What a suite measured.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteReport {
    /// `disk` or `rss`.
    pub suite: String,
    /// Tasks per run.
    pub tasks: usize,
    /// Worker threads.
    pub workers: usize,
    /// Runs per row (median taken).
    pub runs: usize,
    /// Every row, in the order measured.
    pub rows: Vec<BenchRow>,
}

/// Fails its first execution with a transient error, succeeds on the second.
#[derive(Serialize, Deserialize)]
struct BenchFailOnce {
    n: u64,
}

impl Task for BenchFailOnce {
    const NAME: &'static str = "omniq_bench_fail_once";
    type Output = ();
}

fn check(opts: &SuiteOptions) -> Result<()> {
    if opts.tasks == 0 || opts.workers == 0 || opts.runs == 0 {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!(
                "tasks ({}), workers ({}) and runs ({}) must all be at least 1",
                opts.tasks, opts.workers, opts.runs
            ),
        });
    }
    Ok(())
}

fn tempdir() -> Result<tempfile::TempDir> {
    tempfile::TempDir::new()
        .map_err(|e| Error::Storage(format!("cannot create a temporary directory: {e}")))
}

/// Writes of each raw measurement bracketing an omniq run (about 0.2 s on this machine).
const PAIRED_RAW_WRITES: usize = 1_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn open_group(dir: &Path) -> Result<Queue> {
    Queue::builder(dir).durability(Durability::Group).open()
}

/// Sum of the lengths of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> Result<u64> {
    let io = |e: std::io::Error| Error::Storage(format!("cannot size {}: {e}", dir.display()));
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let meta = entry.metadata().map_err(io)?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Keys and values stored in a closed queue directory, summed by key prefix byte: (prefix,
/// keys, key bytes, value bytes), in prefix order.
pub fn key_breakdown(dir: &Path) -> Result<Vec<(u8, u64, u64, u64)>> {
    // sled's files: at the root, or in the generation a compaction switched to.
    let sled_dir = crate::store::compact::resolve(dir)?.dir;
    let db = crate::store::sled_config::config(&sled_dir, 64 << 20, None).open()?;
    let mut by: std::collections::BTreeMap<u8, (u64, u64, u64)> = Default::default();
    for kv in db.iter() {
        let (k, v) = kv?;
        let e = by.entry(k.first().copied().unwrap_or(0)).or_default();
        e.0 += 1;
        e.1 += k.len() as u64;
        e.2 += v.len() as u64;
    }
    Ok(by.into_iter().map(|(p, (n, k, v))| (p, n, k, v)).collect())
}

/// One drain run: `n` tasks enqueued (not timed), then `w` workers; tasks/s until the last
/// `Completed`. The queue is returned still open.
fn drain(dir: &Path, n: usize, w: usize) -> Result<(f64, Queue)> {
    let q = open_group(dir)?;
    register_noop(&q);
    enqueue_batches(&q, n)?;
    let events = q.subscribe();
    let t0 = Instant::now();
    let pool = q.workers().concurrency(w).start()?;
    await_terminal(&events, n)?;
    let r = rate(n, t0.elapsed());
    pool.stop();
    Ok((r, q))
}

/// Row 4; the queue is returned still open.
fn producer_with_workers(dir: &Path, n: usize, w: usize) -> Result<(f64, Queue)> {
    let q = open_group(dir)?;
    register_noop(&q);
    let pool = q.workers().concurrency(w).start()?;
    let events = q.subscribe();
    let t0 = Instant::now();
    for i in 0..n as u64 {
        q.enqueue(BenchNoop { n: i })?;
    }
    await_terminal(&events, n)?;
    let r = rate(n, t0.elapsed());
    pool.stop();
    Ok((r, q))
}

fn fail_once(dir: &Path, n: usize, w: usize) -> Result<f64> {
    let q = Queue::builder(dir)
        .durability(Durability::Group)
        .retry_policy(RetryPolicy {
            max_retries: 1,
            backoff: Backoff::new(Duration::ZERO, Duration::ZERO, 0.0),
        })
        .open()?;
    q.register(
        |_: BenchFailOnce, ctx: &TaskContext| -> std::result::Result<(), TaskError> {
            if ctx.attempt() == 1 {
                Err(TaskError::transient("bench", "fails once"))
            } else {
                Ok(())
            }
        },
    );
    let mut next = 0u64;
    while (next as usize) < n {
        let k = (n - next as usize).min(super::BATCH) as u64;
        q.enqueue_many((next..next + k).map(|n| BenchFailOnce { n }))?;
        next += k;
    }
    let events = q.subscribe();
    let t0 = Instant::now();
    let pool = q.workers().concurrency(w).start()?;
    await_terminal(&events, n)?;
    let r = rate(n, t0.elapsed());
    pool.stop();
    Ok(r)
}

fn enqueue_alone(dir: &Path, n: usize) -> Result<f64> {
    let q = open_group(dir)?;
    let t0 = Instant::now();
    for i in 0..n as u64 {
        q.enqueue(BenchNoop { n: i })?;
    }
    Ok(rate(n, t0.elapsed()))
}

/// Runs `--suite disk`.
pub fn run_disk(opts: &SuiteOptions, progress: &mut dyn FnMut(&str)) -> Result<SuiteReport> {
    check(opts)?;
    let tmp = tempdir()?;
    let dir = tmp.path();
    let (n, w, runs) = (opts.tasks, opts.workers, opts.runs);
    let tasks = count(n, "task");
    let workers = count(w, "worker");
    let of_runs = format!("median of {}", count(runs, "run"));
    let raw_writes = n.min(MAX_RAW_WRITES);
    let raw = raw_fdatasync(dir, raw_writes)?;
    let mut rows = Rows {
        raw_per_s: raw,
        rows: Vec::new(),
        progress,
    };
    rows.push(
        "raw_fdatasync_per_s",
        format!(
            "raw append + fdatasync of {RAW_WRITE_BYTES} B (plain file, 1 thread, {})",
            count(raw_writes, "write")
        ),
        raw,
        "writes/s",
    );
    // The workloads interleave run by run, so that drift in the disk's speed spreads over all.
    // And each workload is bracketed by raw measurements (`paired`): its ratio is to the mean of
    // the raw rates just before and just after it, since this disk's rate has been seen to
    // halve within one run (issue 12; BENCHMARKS.md).
    let mut results: [Vec<f64>; 4] = Default::default();
    let mut ratios: [Vec<f64>; 4] = Default::default();
    let mut paired = Vec::new();
    let pair_writes = raw_writes.min(PAIRED_RAW_WRITES);
    let mut before = raw_fdatasync(dir, pair_writes)?;
    paired.push(before);
    let mut bracket = |i: usize, r: f64, results: &mut [Vec<f64>; 4]| -> Result<()> {
        let after = raw_fdatasync(dir, pair_writes)?;
        paired.push(after);
        results[i].push(r);
        ratios[i].push(r / ((before + after) / 2.0));
        before = after;
        Ok(())
    };
    let mut bytes = Vec::new();
    let mut steady = Vec::new();
    let mut compacted = Vec::new();
    let mut breakdown = Vec::new();
    for run in 0..runs {
        let r = enqueue_alone(&dir.join(format!("enqueue-{run}")), n)?;
        bracket(0, r, &mut results)?;
        let drained = dir.join(format!("drain-{run}"));
        let (r, q) = drain(&drained, n, w)?;
        bracket(1, r, &mut results)?;
        q.close()?;
        bytes.push(dir_bytes(&drained)? as f64 / n as f64);
        if run == 0 {
            breakdown = key_breakdown(&drained)?;
        }
        // The same directory rewritten to what it holds: the pending backlog's high-water
        // mark is gone (what a purge's automatic compaction or `omniq compact` gives back).
        let q = open_group(&drained)?;
        q.compact()?;
        q.close()?;
        compacted.push(dir_bytes(&drained)? as f64 / n as f64);
        let everyday = dir.join(format!("producer-{run}"));
        let (r, q) = producer_with_workers(&everyday, n, w)?;
        bracket(2, r, &mut results)?;
        q.close()?;
        steady.push(dir_bytes(&everyday)? as f64 / n as f64);
        let r = fail_once(&dir.join(format!("fail-once-{run}")), n, w)?;
        bracket(3, r, &mut results)?;
        for sub in ["enqueue", "drain", "producer", "fail-once"] {
            // Free the disk as we go: a 20,000-task run leaves ~50 MB per directory.
            let _ = std::fs::remove_dir_all(dir.join(format!("{sub}-{run}")));
        }
    }
    let [alone, drained, everyday, retried] = results;
    let [r_alone, r_drained, r_everyday, r_retried] = ratios.map(median);
    let (lo, hi) = paired
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    rows.push(
        "raw_fdatasync_paired_per_s",
        format!(
            "raw append + fdatasync of {RAW_WRITE_BYTES} B around each omniq run ({} of {}; median, range {}-{}); each ratio below is the median of its runs' ratios to the mean of the raw rates just before and after",
            paired.len(),
            count(pair_writes, "write"),
            thousands(lo as u64),
            thousands(hi as u64)
        ),
        median(paired),
        "writes/s",
    );
    rows.push_paired(
        "enqueue_per_s",
        format!("enqueue, group, 1 producer, 1 task per call, each awaited, no workers ({tasks}, {of_runs})"),
        median(alone),
        "tasks/s",
        r_alone,
    );
    rows.push_paired(
        "drain_per_s",
        format!("drain of {tasks} enqueued first, {workers} (start to last durable Completed, {of_runs})"),
        median(drained),
        "tasks/s",
        r_drained,
    );
    rows.push_paired(
        "producer_with_workers_per_s",
        format!("1 producer enqueueing 1 task per call while {workers} run ({tasks}, first enqueue to last durable Completed, {of_runs})"),
        median(everyday),
        "tasks/s",
        r_everyday,
    );
    rows.push_paired(
        "fail_once_per_s",
        format!("every task fails once then succeeds, budget 1 retry, no delay, {workers} ({tasks} enqueued first, to last durable Completed, {of_runs})"),
        median(retried),
        "tasks/s",
        r_retried,
    );
    rows.push(
        "disk_bytes_per_completed_task",
        format!(
            "bytes on disk per completed task (drain directory after close, {tasks}, {of_runs})"
        ),
        median(bytes),
        "bytes/task",
    );
    rows.push(
        "disk_bytes_per_completed_task_compacted",
        format!(
            "bytes on disk per completed task (drain directory after Queue::compact, {tasks}, {of_runs})"
        ),
        median(compacted),
        "bytes/task",
    );
    rows.push(
        "disk_bytes_per_completed_task_steady",
        format!(
            "bytes on disk per completed task (producer + workers directory after close: short backlog, {tasks}, {of_runs})"
        ),
        median(steady),
        "bytes/task",
    );
    for (prefix, keys, kb, vb) in breakdown {
        let p = if prefix.is_ascii_graphic() {
            (prefix as char).to_string()
        } else {
            format!("0x{prefix:02x}")
        };
        rows.push(
            &format!("live_bytes_per_task_{p}"),
            format!(
                "  of which `{p}` keys: {} keys, {} key + {} value bytes (run 1, live data, per task)",
                thousands(keys),
                thousands(kb),
                thousands(vb)
            ),
            (kb + vb) as f64 / n as f64,
            "bytes/task",
        );
    }
    let after = raw_fdatasync(dir, raw_writes)?;
    rows.push(
        "raw_fdatasync_after_per_s",
        format!(
            "raw append + fdatasync of {RAW_WRITE_BYTES} B again, after the omniq rows ({}; drift check)",
            count(raw_writes, "write")
        ),
        after,
        "writes/s",
    );
    Ok(SuiteReport {
        suite: "disk".into(),
        tasks: n,
        workers: w,
        runs,
        rows: rows.rows,
    })
}

/// A `kB` line of `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn proc_status_bytes(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::Storage(format!("cannot read /proc/self/status: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Storage(format!("no {field} in /proc/self/status")))
}

/// Resets `VmHWM` to the current RSS (Linux 4.0+); false when the kernel refused.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Samples `VmRSS` every 50 ms on a thread until dropped; the peak seen.
struct RssSampler {
    stop: crossbeam_channel::Sender<()>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let (stop, rx) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(proc_status_bytes("VmRSS").unwrap_or(0));
                if !matches!(
                    rx.recv_timeout(Duration::from_millis(50)),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout)
                ) {
                    return peak;
                }
            }
        });
        RssSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        drop(self.stop);
        self.thread.join().unwrap_or(0)
    }
}

/// Runs `--suite rss` in this process (its numbers include whatever the process held before).
pub fn run_rss(opts: &SuiteOptions, progress: &mut dyn FnMut(&str)) -> Result<SuiteReport> {
    check(opts)?;
    let tmp = tempdir()?;
    let path = tmp.path().join("rss");
    let (n, w) = (opts.tasks, opts.workers);
    let tasks = count(n, "task");
    let mut rows = Rows {
        raw_per_s: 0.0,
        rows: Vec::new(),
        progress,
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let before = proc_status_bytes("VmRSS")?;
    rows.push(
        "rss_start_mib",
        "RSS before opening".into(),
        mib(before),
        "MiB",
    );
    let q = open_group(&path)?;
    register_noop(&q);
    reset_peak();
    let sampler = RssSampler::start();
    let t0 = Instant::now();
    enqueue_batches(&q, n)?;
    let build = rate(n, t0.elapsed());
    let sampled = sampler.stop();
    let peak = proc_status_bytes("VmHWM")?.max(sampled);
    rows.push(
        "build_per_s",
        format!("build {tasks} pending, enqueue_many batches of 1,000, group"),
        build,
        "tasks/s",
    );
    rows.push(
        "build_peak_rss_mib",
        format!("peak RSS while building {tasks} pending (VmHWM)"),
        mib(peak),
        "MiB",
    );
    let after_build = proc_status_bytes("VmRSS")?;
    rows.push(
        "build_end_rss_mib",
        "RSS when the build returned".into(),
        mib(after_build),
        "MiB",
    );
    let reset = reset_peak();
    let sampler = RssSampler::start();
    let events = q.subscribe();
    let t0 = Instant::now();
    let pool = q.workers().concurrency(w).start()?;
    await_terminal(&events, n)?;
    let drain = rate(n, t0.elapsed());
    pool.stop();
    drop(events);
    let sampled = sampler.stop();
    let peak = if reset {
        proc_status_bytes("VmHWM")?.max(sampled)
    } else {
        sampled
    };
    rows.push(
        "drain_per_s",
        format!("drain {tasks} with {}", count(w, "worker")),
        drain,
        "tasks/s",
    );
    rows.push(
        "drain_peak_rss_mib",
        format!(
            "peak RSS while draining ({})",
            if reset {
                "VmHWM after reset"
            } else {
                "VmRSS sampled every 50 ms"
            }
        ),
        mib(peak),
        "MiB",
    );
    q.close()?;
    rows.push(
        "closed_rss_mib",
        "RSS after close()".into(),
        mib(proc_status_bytes("VmRSS")?),
        "MiB",
    );
    let disk = dir_bytes(&path)?;
    rows.push(
        "disk_mib",
        "directory size after close (all completed)".into(),
        mib(disk),
        "MiB",
    );
    let t0 = Instant::now();
    let q = open_group(&path)?;
    rows.push(
        "reopen_ms",
        format!("open + recovery of the same directory ({tasks}, all completed)"),
        t0.elapsed().as_secs_f64() * 1e3,
        "ms",
    );
    rows.push(
        "reopened_rss_mib",
        "RSS after opening the same directory again".into(),
        mib(proc_status_bytes("VmRSS")?),
        "MiB",
    );
    q.close()?;
    Ok(SuiteReport {
        suite: "rss".into(),
        tasks: n,
        workers: w,
        runs: 1,
        rows: rows.rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_disk_suite_reports_every_row() {
        let r = run_disk(
            &SuiteOptions {
                tasks: 20,
                workers: 2,
                runs: 1,
            },
            &mut |_| {},
        )
        .unwrap();
        let keys: Vec<&str> = r.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys[0], "raw_fdatasync_per_s");
        assert_eq!(keys[1], "raw_fdatasync_paired_per_s");
        let paired = r.rows.iter().find(|r| r.key == "enqueue_per_s").unwrap();
        assert!(paired.vs_raw.is_some_and(|x| x > 0.0 && x.is_finite()));
        for k in [
            "enqueue_per_s",
            "drain_per_s",
            "producer_with_workers_per_s",
            "fail_once_per_s",
            "disk_bytes_per_completed_task",
            "disk_bytes_per_completed_task_compacted",
            "disk_bytes_per_completed_task_steady",
            "live_bytes_per_task_t",
        ] {
            let row = r.rows.iter().find(|r| r.key == k).unwrap();
            assert!(row.value > 0.0 && row.value.is_finite(), "{row:?}");
        }
        assert_eq!(keys.last(), Some(&"raw_fdatasync_after_per_s"));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
    }

    #[test]
    fn a_tiny_rss_suite_reports_peaks() {
        let r = run_rss(
            &SuiteOptions {
                tasks: 50,
                workers: 2,
                runs: 1,
            },
            &mut |_| {},
        )
        .unwrap();
        let get = |k: &str| r.rows.iter().find(|r| r.key == k).unwrap().value;
        assert!(get("build_peak_rss_mib") > 0.0);
        assert!(get("drain_peak_rss_mib") > 0.0);
        assert!(get("disk_mib") > 0.0);
        assert!(get("reopen_ms") > 0.0);
    }
}
