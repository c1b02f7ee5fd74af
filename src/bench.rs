//! The built-in benchmark behind `omniq bench`: runs a workload in a throwaway directory and
//! reports rates, latencies and disk use.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::queue::Durability;

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
}

/// Runs the benchmark. `progress` receives one line per phase.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let _ = (opts, progress);
    Err(Error::Invalid {
        what: "bench",
        reason: "the built-in benchmark is being written".into(),
    })
}
