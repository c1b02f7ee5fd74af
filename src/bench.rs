//! The built-in benchmark behind `omniq bench`: runs a workload in a throwaway directory and
//! reports rates, latencies and disk use, each row also as a ratio to a raw `fdatasync`.
//!
//! Rows, in the order they are measured, each on a fresh queue directory inside one temporary
//! directory (removed at the end). `N` is [`BenchOptions::tasks`], `W` is
//! [`BenchOptions::workers`], `mode` is [`BenchOptions::durability`]:
//!
//! 1. **raw append + fdatasync of 128 B**: `min(N, 2,000)` appends to a plain file, each followed
//!    by `fdatasync`, no omniq involved. The floor every durable commit stands on; every other
//!    row is also given as a ratio to it.
//! 2. **enqueue, no workers**: one producer, [`Queue::enqueue`] of one task per call, `N` tasks.
//! 3. **enqueue while W workers run**: `W` workers started first, then one producer calls
//!    [`Queue::enqueue`] once per task, `N` times; the rate counts until the last `enqueue`
//!    returned. The same run gives row 4.
//! 4. **lifecycle, one enqueue per task**: the everyday pattern. Row 3's run, timed from the first
//!    `enqueue` until every task is `Completed` (counted from a [`Queue::subscribe`] stream).
//! 5. **enqueue_many, no workers**: one producer, [`Queue::enqueue_many`] in batches of
//!    `min(N, 1,000)` (the last batch holds the remainder).
//! 6. **lifecycle, enqueue_many batches**: `W` workers started first, then `N` tasks enqueued in
//!    batches of `min(N, 1,000)`, timed until every one is `Completed`. The criterion bench
//!    `lifecycle/4_workers` measures this pattern.
//! 7. **enqueue-to-start latency** (p50, p99, max) on row 6's now idle pool: `min(N, 500)` probes
//!    enqueued one at a time, each only after the previous one completed; the handler reports the
//!    instant it started, the producer took the instant just before calling `enqueue`.
//! 8. **disk per stored task**: row 6's directory size divided by the tasks it stores.
//! 9. Rows 2, 3 and 4 again for `Group` and `Relaxed`, whichever of them `mode` is not, so that
//!    both modes' "enqueue alone" and "enqueue while workers run" rows are in every report.
//! 10. Row 1 again, as a drift check: when it differs much from row 1, other I/O on the machine
//!     moved the disk's speed during the run and the ratios are not to be trusted.

pub mod churn;
pub mod disk;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::handler::TaskContext;
use crate::queue::{Durability, Queue};
use crate::task::{Status, Task, TaskError};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Tasks per row (the raw `fdatasync` row makes at most 2,000 writes, the latency row takes
    /// at most 500 samples).
    pub tasks: usize,
    /// Worker threads for the rows that run a pool.
    pub workers: usize,
    /// Durability mode of the main rows. The `Group` and `Relaxed` comparison rows always run too.
    pub durability: Durability,
    /// Serve the admin API during the lifecycle phase and load the dashboard's pages, its
    /// metrics and stats through the socket once a second (feature `admin`), to show what an
    /// operator watching the queue costs the workers.
    pub poll_dashboard: bool,
}

/// One measured row: what it is, its value, and how it compares to a raw `fdatasync`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Stable key. For the main rows it equals the matching flat key of [`BenchReport`]; the
    /// comparison rows are prefixed with their mode (`relaxed_enqueue_per_s`, ...).
    pub key: String,
    /// What was measured: operation, durability mode, producers, workers, batch size, count.
    pub label: String,
    /// The measured value, in `unit`.
    pub value: f64,
    /// `writes/s`, `tasks/s`, `ms` or `bytes/task`.
    pub unit: String,
    /// Rates: this rate divided by the raw `fdatasync` rate of row 1. Latencies: this latency
    /// divided by row 1's mean write time. `None` for row 1 itself and for disk use.
    pub vs_raw: Option<f64>,
}

impl BenchRow {
    /// The value with its unit, digits grouped: `3,251 tasks/s`, `0.61 ms`.
    pub fn value_text(&self) -> String {
        match self.unit.as_str() {
            "ms" => format!("{:.2} ms", self.value),
            "MB" => format!("{:.1} MB", self.value),
            unit => format!("{} {unit}", thousands(self.value.round() as u64)),
        }
    }

    /// The ratio to the raw `fdatasync` row: `0.45x raw rate`, `2.1x raw write`, or empty.
    pub fn vs_raw_text(&self) -> String {
        match (self.vs_raw, self.unit.as_str()) {
            (None, _) => String::new(),
            (Some(r), "ms") => format!("{r:.1}x raw write"),
            (Some(r), _) => format!("{r:.2}x raw rate"),
        }
    }
}

/// What was measured. Keys are stable: scripts read them from `omniq bench --json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Tasks per row.
    pub tasks: usize,
    /// Worker threads.
    pub workers: usize,
    /// Durability mode of the main rows, lower-case.
    pub durability: String,
    /// Single-producer `enqueue` rate with no workers (acknowledged, durable per mode), tasks/s.
    pub enqueue_per_s: f64,
    /// `enqueue_many` rate in batches of `batch`, no workers, tasks/s.
    pub enqueue_many_per_s: f64,
    /// Full lifecycle rate (enqueue_many in batches of `batch` -> run a no-op -> Completed),
    /// tasks/s.
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
    /// Tasks per `enqueue_many` call: `min(tasks, 1000)`.
    pub batch: usize,
    /// Raw append + `fdatasync` of 128 bytes to a plain file, writes/s.
    pub raw_fdatasync_per_s: f64,
    /// How many raw writes `raw_fdatasync_per_s` comes from (and `raw_fdatasync_after_per_s`).
    pub raw_writes: usize,
    /// The raw row measured again after every omniq row, writes/s: a drift check. Far from
    /// `raw_fdatasync_per_s`, the disk was disturbed during the run (other I/O on the machine).
    pub raw_fdatasync_after_per_s: f64,
    /// Single-producer `enqueue` rate while `workers` workers run the tasks, until the last
    /// `enqueue` returned, tasks/s.
    pub enqueue_with_workers_per_s: f64,
    /// Full lifecycle with one `enqueue` call per task on a running pool (first enqueue -> last
    /// Completed), tasks/s: the everyday pattern.
    pub lifecycle_single_enqueue_per_s: f64,
    /// `enqueue_per_s` under `Durability::Group`, whatever `durability` is.
    pub group_enqueue_per_s: f64,
    /// `enqueue_with_workers_per_s` under `Durability::Group`.
    pub group_enqueue_with_workers_per_s: f64,
    /// `enqueue_per_s` under `Durability::Relaxed`.
    pub relaxed_enqueue_per_s: f64,
    /// `enqueue_with_workers_per_s` under `Durability::Relaxed`.
    pub relaxed_enqueue_with_workers_per_s: f64,
    /// Every row, in the order measured, with its label and its ratio to the raw row.
    pub rows: Vec<BenchRow>,
    /// Dashboard polls (4 requests each) made during the lifecycle row (0 unless
    /// `poll_dashboard`).
    pub dashboard_polls: usize,
}

/// Most tasks per `enqueue_many` call.
const BATCH: usize = 1_000;
/// Upper bound on latency samples.
const MAX_LATENCY_SAMPLES: usize = 500;
/// Upper bound on raw `fdatasync` writes.
const MAX_RAW_WRITES: usize = 2_000;
/// Bytes per raw write.
const RAW_WRITE_BYTES: usize = 128;
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

/// `1234567` -> `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `n` and a noun, pluralized with an `s`: `1 task`, `1,000 tasks`.
fn count(n: usize, noun: &str) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{} {noun}{s}", thousands(n as u64))
}

/// How `n` tasks split into `enqueue_many` calls of at most [`BATCH`]: `1 batch of 500`,
/// `10 batches of 1,000`, `2 batches of 1,000 + 1 of 500`.
fn batches_text(n: usize) -> String {
    let (full, rem) = (n / BATCH, n % BATCH);
    let size = thousands(BATCH as u64);
    let noun = if full == 1 { "batch" } else { "batches" };
    match (full, rem) {
        (0, _) => format!("1 batch of {}", thousands(rem as u64)),
        (_, 0) => format!("{} {noun} of {size}", thousands(full as u64)),
        _ => format!(
            "{} {noun} of {size} + 1 of {}",
            thousands(full as u64),
            thousands(rem as u64)
        ),
    }
}

/// How a lifecycle row's clock stops under `d`: `Relaxed` acknowledges a completion before
/// its fsync.
fn completed_text(d: Durability) -> &'static str {
    if d == Durability::Relaxed {
        "last Completed, acknowledged before its fsync"
    } else {
        "last durable Completed"
    }
}

/// Nearest-rank percentile of sorted samples, in ms (`p` in `0..=1`).
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn open(dir: &Path, name: &str, durability: Durability) -> Result<Queue> {
    Queue::builder(dir.join(name)).durability(durability).open()
}

fn register_noop(q: &Queue) {
    q.register(|_: BenchNoop, _: &TaskContext| -> std::result::Result<(), TaskError> { Ok(()) });
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

/// Appends `writes` blocks of [`RAW_WRITE_BYTES`] to a new file in `dir`, each followed by
/// `fdatasync`; returns writes/s. One unmeasured write first creates the file.
fn raw_fdatasync(dir: &Path, writes: usize) -> Result<f64> {
    let io = |e: std::io::Error| Error::Storage(format!("raw fdatasync row: {e}"));
    let path = dir.join("raw-fdatasync");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    let block = [0x5au8; RAW_WRITE_BYTES];
    f.write_all(&block).map_err(io)?;
    f.sync_all().map_err(io)?;
    let t0 = Instant::now();
    for _ in 0..writes {
        f.write_all(&block).map_err(io)?;
        f.sync_data().map_err(io)?;
    }
    let r = rate(writes, t0.elapsed());
    drop(f);
    std::fs::remove_file(&path).map_err(io)?;
    Ok(r)
}

/// Single producer, one `enqueue` per task, no workers: tasks/s.
fn enqueue_alone(dir: &Path, name: &str, d: Durability, n: usize) -> Result<f64> {
    let q = open(dir, name, d)?;
    let t0 = Instant::now();
    for i in 0..n as u64 {
        q.enqueue(BenchNoop { n: i })?;
    }
    Ok(rate(n, t0.elapsed()))
}

/// `workers` workers started first, then one producer enqueues `n` tasks one per call.
/// Returns (tasks/s until the last `enqueue` returned, tasks/s until the last `Completed`).
fn enqueue_with_workers(
    dir: &Path,
    name: &str,
    d: Durability,
    n: usize,
    workers: usize,
) -> Result<(f64, f64)> {
    let q = open(dir, name, d)?;
    register_noop(&q);
    let pool = q.workers().concurrency(workers).start()?;
    let events = q.subscribe();
    let t0 = Instant::now();
    for i in 0..n as u64 {
        q.enqueue(BenchNoop { n: i })?;
    }
    let acked = t0.elapsed();
    await_terminal(&events, n)?;
    let done = t0.elapsed();
    pool.stop();
    Ok((rate(n, acked), rate(n, done)))
}

/// Collects rows, computes their ratio to the raw row, and reports each as it is measured.
struct Rows<'a> {
    raw_per_s: f64,
    rows: Vec<BenchRow>,
    progress: &'a mut dyn FnMut(&str),
}

impl Rows<'_> {
    fn push(&mut self, key: &str, label: String, value: f64, unit: &str) {
        let vs_raw = match unit {
            _ if key == "raw_fdatasync_per_s" || self.raw_per_s <= 0.0 => None,
            "bytes/task" | "MiB" => None,
            // A latency against the mean time of one raw write.
            "ms" => Some(value / (1e3 / self.raw_per_s)),
            _ => Some(value / self.raw_per_s),
        };
        self.push_row(key, label, value, unit, vs_raw);
    }

    /// A row whose ratio was measured against raw rates taken around it (`disk` suite).
    fn push_paired(&mut self, key: &str, label: String, value: f64, unit: &str, ratio: f64) {
        self.push_row(key, label, value, unit, Some(ratio));
    }

    fn push_row(&mut self, key: &str, label: String, value: f64, unit: &str, vs_raw: Option<f64>) {
        let row = BenchRow {
            key: key.to_string(),
            label,
            value,
            unit: unit.to_string(),
            vs_raw,
        };
        let ratio = row.vs_raw_text();
        let sep = if ratio.is_empty() { "" } else { ", " };
        (self.progress)(&format!("{}: {}{sep}{ratio}", row.label, row.value_text()));
        self.rows.push(row);
    }
}

/// Runs the benchmark. `progress` receives one line per row, as it is measured.
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
    let w = opts.workers;
    let d = opts.durability;
    let mode = durability_name(d);
    let tasks = count(n, "task");
    let workers = count(w, "worker");
    let run_them = if w == 1 { "runs them" } else { "run them" };
    let batch = n.min(BATCH);
    let batches = batches_text(n);

    // 1. raw append + fdatasync, the reference for every ratio.
    let raw_writes = n.min(MAX_RAW_WRITES);
    let raw_fdatasync_per_s = raw_fdatasync(dir, raw_writes)?;
    let mut rows = Rows {
        raw_per_s: raw_fdatasync_per_s,
        rows: Vec::new(),
        progress,
    };
    rows.push(
        "raw_fdatasync_per_s",
        format!(
            "raw append + fdatasync of {RAW_WRITE_BYTES} B (plain file, 1 thread, {})",
            count(raw_writes, "write")
        ),
        raw_fdatasync_per_s,
        "writes/s",
    );

    // Rows 2, 3 and 4 for one mode; the main mode's keys are unprefixed.
    let single_producer_rows = |rows: &mut Rows, m: Durability, prefix: &str| {
        let name = durability_name(m);
        let alone = enqueue_alone(dir, &format!("{name}-enqueue"), m, n)?;
        rows.push(
            &format!("{prefix}enqueue_per_s"),
            format!("enqueue, {name}, 1 producer, 1 task per call, no workers ({tasks})"),
            alone,
            "tasks/s",
        );
        let (acked, done) =
            enqueue_with_workers(dir, &format!("{name}-enqueue-with-workers"), m, n, w)?;
        rows.push(
            &format!("{prefix}enqueue_with_workers_per_s"),
            format!(
                "enqueue, {name}, 1 producer, 1 task per call, while {workers} {run_them} \
                 ({tasks}, until the last enqueue returned)"
            ),
            acked,
            "tasks/s",
        );
        let completed = completed_text(m);
        rows.push(
            &format!("{prefix}lifecycle_single_enqueue_per_s"),
            format!(
                "lifecycle, {name}, 1 producer, 1 enqueue per task, {workers} already running \
                 ({tasks}, first enqueue to {completed})"
            ),
            done,
            "tasks/s",
        );
        Ok::<_, Error>((alone, acked, done))
    };

    // 2, 3, 4: the main mode.
    let (enqueue_per_s, enqueue_with_workers_per_s, lifecycle_single_enqueue_per_s) =
        single_producer_rows(&mut rows, d, "")?;

    // 5. enqueue_many, no workers.
    let enqueue_many_per_s = {
        let q = open(dir, "enqueue_many", d)?;
        let t0 = Instant::now();
        enqueue_batches(&q, n)?;
        rate(n, t0.elapsed())
    };
    rows.push(
        "enqueue_many_per_s",
        format!("enqueue_many, {mode}, 1 producer, {batches}, no workers ({tasks})"),
        enqueue_many_per_s,
        "tasks/s",
    );

    // 6. lifecycle from enqueue_many batches on a started pool.
    let q = open(dir, "lifecycle", d)?;
    register_noop(&q);
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<Instant>();
    q.register(
        move |_: BenchProbe, _: &TaskContext| -> std::result::Result<(), TaskError> {
            let _ = started_tx.send(Instant::now());
            Ok(())
        },
    );
    let pool = q.workers().concurrency(w).start()?;
    let events = q.subscribe();
    let poller = if opts.poll_dashboard {
        Some(DashboardPoller::start(&q)?)
    } else {
        None
    };
    let lifecycle_per_s = {
        let t0 = Instant::now();
        enqueue_batches(&q, n)?;
        await_terminal(&events, n)?;
        rate(n, t0.elapsed())
    };
    let dashboard_polls = poller.map(DashboardPoller::stop).transpose()?.unwrap_or(0);
    drop(events);
    rows.push(
        "lifecycle_per_s",
        format!(
            "lifecycle, {mode}, 1 producer, enqueue_many in {batches}, {workers} already running \
             ({tasks}, first enqueue to {}){}",
            completed_text(d),
            if opts.poll_dashboard {
                ", dashboard polled every 1 s"
            } else {
                ""
            }
        ),
        lifecycle_per_s,
        "tasks/s",
    );

    // 7. enqueue-to-start latency on the idle pool.
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
    pool.stop();
    lat.sort();
    let latency_p50_ms = percentile_ms(&lat, 0.50);
    let latency_p99_ms = percentile_ms(&lat, 0.99);
    let latency_max_ms = percentile_ms(&lat, 1.0);
    for (key, what, v) in [
        ("latency_p50_ms", "p50", latency_p50_ms),
        ("latency_p99_ms", "p99", latency_p99_ms),
        ("latency_max_ms", "max", latency_max_ms),
    ] {
        rows.push(
            key,
            format!(
                "enqueue-to-start latency {what}, {mode}, 1 producer, 1 task at a time, idle pool \
                 of {workers} ({})",
                count(samples, "sample")
            ),
            v,
            "ms",
        );
    }

    // 8. disk use of the lifecycle directory.
    let stored = q.stats()?.total;
    let bytes = q.size_on_disk()?;
    drop(q);
    let disk_bytes_per_task = if stored == 0 {
        0.0
    } else {
        bytes as f64 / stored as f64
    };
    rows.push(
        "disk_bytes_per_task",
        format!(
            "disk per stored task, {mode} ({} bytes for {} with their logs)",
            thousands(bytes),
            count(stored as usize, "completed task")
        ),
        disk_bytes_per_task,
        "bytes/task",
    );

    // 9. the Group / Relaxed comparison rows the main mode did not already give.
    let mut pair = |m: Durability| -> Result<(f64, f64)> {
        if m == d {
            Ok((enqueue_per_s, enqueue_with_workers_per_s))
        } else {
            let (alone, acked, _) =
                single_producer_rows(&mut rows, m, &format!("{}_", durability_name(m)))?;
            Ok((alone, acked))
        }
    };
    let (group_enqueue_per_s, group_enqueue_with_workers_per_s) = pair(Durability::Group)?;
    let (relaxed_enqueue_per_s, relaxed_enqueue_with_workers_per_s) = pair(Durability::Relaxed)?;

    // 10. the raw row again: if it moved, so did the disk under every row in between.
    let raw_fdatasync_after_per_s = raw_fdatasync(dir, raw_writes)?;
    rows.push(
        "raw_fdatasync_after_per_s",
        format!(
            "raw append + fdatasync of {RAW_WRITE_BYTES} B again, after the omniq rows (plain \
             file, 1 thread, {}; drift check)",
            count(raw_writes, "write")
        ),
        raw_fdatasync_after_per_s,
        "writes/s",
    );

    Ok(BenchReport {
        tasks: n,
        workers: w,
        durability: mode,
        enqueue_per_s,
        enqueue_many_per_s,
        lifecycle_per_s,
        latency_p50_ms,
        latency_p99_ms,
        disk_bytes_per_task,
        latency_max_ms,
        latency_samples: samples,
        batch,
        raw_fdatasync_per_s,
        raw_writes,
        raw_fdatasync_after_per_s,
        enqueue_with_workers_per_s,
        lifecycle_single_enqueue_per_s,
        group_enqueue_per_s,
        group_enqueue_with_workers_per_s,
        relaxed_enqueue_per_s,
        relaxed_enqueue_with_workers_per_s,
        rows: rows.rows,
        dashboard_polls,
    })
}

/// Serves the admin API and, from a thread of its own, loads what an open dashboard loads
/// (overview, task list, metrics, stats) once a second through the UNIX socket.
#[cfg(feature = "admin")]
struct DashboardPoller {
    stop: crossbeam_channel::Sender<()>,
    thread: std::thread::JoinHandle<Result<usize>>,
    _server: crate::admin::AdminServer,
}

#[cfg(feature = "admin")]
impl DashboardPoller {
    fn start(q: &Queue) -> Result<DashboardPoller> {
        let server = q.admin().serve()?;
        let client = crate::admin::Client::new(server.endpoints()[0].clone());
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("omniq-bench-poller".into())
            .spawn(move || {
                let mut polls = 0;
                loop {
                    for target in ["/", "/tasks", "/metrics", "/api/v1/stats"] {
                        let r = client.request("GET", target, &[], b"")?;
                        if r.status != 200 {
                            return Err(Error::Storage(format!(
                                "dashboard poll of {target} answered {}",
                                r.status
                            )));
                        }
                    }
                    polls += 1;
                    match stop_rx.recv_timeout(Duration::from_secs(1)) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return Ok(polls),
                    }
                }
            })
            .map_err(|e| Error::Storage(format!("cannot start the dashboard poller: {e}")))?;
        Ok(DashboardPoller {
            stop,
            thread,
            _server: server,
        })
    }

    fn stop(self) -> Result<usize> {
        drop(self.stop);
        self.thread
            .join()
            .map_err(|_| Error::Storage("the dashboard poller panicked".into()))?
    }
}

#[cfg(not(feature = "admin"))]
struct DashboardPoller;

#[cfg(not(feature = "admin"))]
impl DashboardPoller {
    fn start(_q: &Queue) -> Result<DashboardPoller> {
        Err(Error::Invalid {
            what: "bench",
            reason: "polling the dashboard needs the `admin` feature".into(),
        })
    }
    fn stop(self) -> Result<usize> {
        Ok(0)
    }
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
    fn batch_labels_follow_the_task_count() {
        assert_eq!(batches_text(1), "1 batch of 1");
        assert_eq!(batches_text(500), "1 batch of 500");
        assert_eq!(batches_text(1_000), "1 batch of 1,000");
        assert_eq!(batches_text(10_000), "10 batches of 1,000");
        assert_eq!(batches_text(1_500), "1 batch of 1,000 + 1 of 500");
        assert_eq!(batches_text(25_001), "25 batches of 1,000 + 1 of 1");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(count(1, "worker"), "1 worker");
        assert_eq!(count(10_000, "task"), "10,000 tasks");
    }

    #[test]
    fn a_small_run_reports_every_row_with_its_parameters() {
        let mut lines = Vec::new();
        let r = run(
            &BenchOptions {
                tasks: 30,
                workers: 2,
                durability: Durability::Group,
                poll_dashboard: true,
            },
            &mut |l| lines.push(l.to_string()),
        )
        .unwrap();
        let keys: Vec<&str> = r.rows.iter().map(|row| row.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "raw_fdatasync_per_s",
                "enqueue_per_s",
                "enqueue_with_workers_per_s",
                "lifecycle_single_enqueue_per_s",
                "enqueue_many_per_s",
                "lifecycle_per_s",
                "latency_p50_ms",
                "latency_p99_ms",
                "latency_max_ms",
                "disk_bytes_per_task",
                "relaxed_enqueue_per_s",
                "relaxed_enqueue_with_workers_per_s",
                "relaxed_lifecycle_single_enqueue_per_s",
                "raw_fdatasync_after_per_s",
            ]
        );
        assert!(r.dashboard_polls >= 1, "the dashboard was polled");
        // One progress line per row, each the row's label, value and ratio.
        assert_eq!(lines.len(), r.rows.len(), "{lines:?}");
        for (line, row) in lines.iter().zip(&r.rows) {
            assert!(line.starts_with(&format!("{}: ", row.label)), "{line}");
            assert!(line.contains(&row.value_text()), "{line}");
        }
        let label = |key: &str| {
            r.rows
                .iter()
                .find(|row| row.key == key)
                .map(|row| row.label.clone())
                .unwrap()
        };
        assert_eq!(
            label("raw_fdatasync_per_s"),
            "raw append + fdatasync of 128 B (plain file, 1 thread, 30 writes)"
        );
        assert_eq!(
            label("enqueue_per_s"),
            "enqueue, group, 1 producer, 1 task per call, no workers (30 tasks)"
        );
        assert_eq!(
            label("enqueue_with_workers_per_s"),
            "enqueue, group, 1 producer, 1 task per call, while 2 workers run them \
             (30 tasks, until the last enqueue returned)"
        );
        assert_eq!(
            label("lifecycle_single_enqueue_per_s"),
            "lifecycle, group, 1 producer, 1 enqueue per task, 2 workers already running \
             (30 tasks, first enqueue to last durable Completed)"
        );
        assert_eq!(
            label("enqueue_many_per_s"),
            "enqueue_many, group, 1 producer, 1 batch of 30, no workers (30 tasks)"
        );
        assert_eq!(
            label("lifecycle_per_s"),
            "lifecycle, group, 1 producer, enqueue_many in 1 batch of 30, 2 workers already \
             running (30 tasks, first enqueue to last durable Completed), dashboard polled every 1 s"
        );
        assert_eq!(
            label("latency_p99_ms"),
            "enqueue-to-start latency p99, group, 1 producer, 1 task at a time, idle pool of \
             2 workers (30 samples)"
        );
        assert!(
            label("disk_bytes_per_task").ends_with("for 60 completed tasks with their logs)"),
            "{}",
            label("disk_bytes_per_task")
        );
        assert_eq!(
            label("relaxed_enqueue_with_workers_per_s"),
            "enqueue, relaxed, 1 producer, 1 task per call, while 2 workers run them \
             (30 tasks, until the last enqueue returned)"
        );
        assert_eq!(
            label("relaxed_lifecycle_single_enqueue_per_s"),
            "lifecycle, relaxed, 1 producer, 1 enqueue per task, 2 workers already running \
             (30 tasks, first enqueue to last Completed, acknowledged before its fsync)"
        );
        // Ratios: none for the raw row and disk, every other row has one.
        for row in &r.rows {
            let expect = row.key != "raw_fdatasync_per_s" && row.unit != "bytes/task";
            assert_eq!(row.vs_raw.is_some(), expect, "{row:?}");
            assert!(row.value > 0.0 && row.value.is_finite(), "{row:?}");
        }
        assert_eq!(r.latency_samples, 30);
        assert_eq!((r.batch, r.raw_writes), (30, 30));
        assert_eq!(r.durability, "group");
        assert_eq!(r.group_enqueue_per_s, r.enqueue_per_s);
        assert_eq!(
            r.group_enqueue_with_workers_per_s,
            r.enqueue_with_workers_per_s
        );
        assert!(r.relaxed_enqueue_per_s > 0.0 && r.relaxed_enqueue_with_workers_per_s > 0.0);
        assert!(r.latency_p50_ms <= r.latency_p99_ms && r.latency_p99_ms <= r.latency_max_ms);
    }

    #[test]
    fn immediate_runs_both_comparison_modes() {
        let r = run(
            &BenchOptions {
                tasks: 5,
                workers: 1,
                durability: Durability::Immediate,
                poll_dashboard: false,
            },
            &mut |_| {},
        )
        .unwrap();
        let prefixed: Vec<&str> = r
            .rows
            .iter()
            .map(|row| row.key.as_str())
            .filter(|k| k.starts_with("group_") || k.starts_with("relaxed_"))
            .collect();
        assert_eq!(
            prefixed,
            [
                "group_enqueue_per_s",
                "group_enqueue_with_workers_per_s",
                "group_lifecycle_single_enqueue_per_s",
                "relaxed_enqueue_per_s",
                "relaxed_enqueue_with_workers_per_s",
                "relaxed_lifecycle_single_enqueue_per_s",
            ]
        );
        assert!(r.rows[1]
            .label
            .starts_with("enqueue, immediate, 1 producer"));
        assert!(r.rows[2].label.contains("while 1 worker runs them"));
    }

    #[test]
    fn zero_tasks_is_refused() {
        let e = run(
            &BenchOptions {
                tasks: 0,
                workers: 1,
                durability: Durability::Group,
                poll_dashboard: false,
            },
            &mut |_| {},
        );
        assert!(matches!(e, Err(Error::Invalid { .. })));
    }
}
