//! Crash recovery at open. The store belongs to one process at a time, so every task still
//! `Running` when a queue is opened was orphaned by a process that died. Its attempt was
//! already counted at claim; recovery records a `"crash"` error for it and applies the ordinary
//! retry rule (back to `Pending` with backoff, or `Failed` when the budget is spent), each as
//! a normal logged transition. A crash during recovery is safe: every orphan is handled by one
//! atomic commit, and whatever is still `Running` is found again at the next open.

use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::commit::{Finished, Outcome};
use crate::error::{Error, Result};
use crate::inspect::{CorruptEntry, RecoveryReport};
use crate::keys;
use crate::store::Store;
use crate::task::{Status, TaskError};

const CHUNK: usize = 1024;

/// Charges every `Running` task a `"crash"` failure. `finish` submits one fenced finish to the
/// writer and returns where its reply will arrive (so a chunk of them shares group commits).
pub(crate) fn recover(
    store: &dyn Store,
    finish: impl Fn(crate::task::TaskId, u64, Outcome) -> Result<Receiver<Result<Finished>>>,
) -> Result<RecoveryReport> {
    let started = Instant::now();
    let mut report = RecoveryReport {
        run_id: store.run_id(),
        ..RecoveryReport::default()
    };
    let orphans = store.ids_in_state(Status::Running)?;
    for chunk in orphans.chunks(CHUNK) {
        let mut replies = Vec::with_capacity(chunk.len());
        for &id in chunk {
            let rec = match store.get(id) {
                Ok(Some(rec)) if rec.status == Status::Running => rec,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!(task = %id, error = %e, "orphaned task's record does not decode; left as it is");
                    report.corrupt.push(CorruptEntry {
                        key: keys::describe(&keys::task(id)),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let error = TaskError::transient(
                "crash",
                format!(
                    "the process running attempt {} stopped before the attempt finished (found at open by run {})",
                    rec.attempts,
                    store.run_id()
                ),
            );
            let rx = finish(id, rec.lease, Outcome::Failure(error))?;
            replies.push((rec, rx));
        }
        for (rec, rx) in replies {
            match rx.recv().map_err(|_| Error::Closed)?? {
                Finished::Applied(after) => {
                    report.count(&rec, after.status, "recovered a task orphaned by a crash")
                }
                Finished::Stale => {}
            }
        }
    }
    report.duration = started.elapsed();
    if report.recovered > 0 {
        tracing::info!(
            recovered = report.recovered,
            requeued = report.requeued,
            failed = report.failed,
            ms = report.duration.as_millis() as u64,
            "crash recovery finished"
        );
    }
    Ok(report)
}
