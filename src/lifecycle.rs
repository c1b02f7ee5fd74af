//! The task state machine as pure functions: given a record and an event, the next record.
//! No I/O here; the commit writer applies these and stores the results atomically.

use crate::error::Error;
use crate::log::Cause;
use crate::retry::{decide, Backoff, Decision};
use crate::task::{Status, TaskError, TaskId, TaskInfo, Timestamp, ERROR_HISTORY_LIMIT};

/// Why an event does not apply to a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The record is not in a state the event applies to.
    WrongState(Status),
    /// Pending but not due yet.
    NotDue,
    /// A completion from an execution whose lease is no longer current (timed out, recovered).
    Stale,
}

impl Refusal {
    /// The error a caller gets when `op` (which needs a task that is `expected`) is refused.
    /// Both backends answer with it, so the words are the same on each.
    pub(crate) fn into_error(self, id: TaskId, op: &'static str, expected: &'static str) -> Error {
        match self {
            Refusal::WrongState(status) => Error::InvalidState {
                id,
                status,
                op,
                expected,
            },
            Refusal::NotDue => Error::InvalidState {
                id,
                status: Status::Pending,
                op,
                expected: "due",
            },
            Refusal::Stale => Error::InvalidState {
                id,
                status: Status::Running,
                op,
                expected: "held by this execution",
            },
        }
    }
}

/// Pending -> Running. `attempts + 1`; `lease` fences this execution.
pub(crate) fn claim(
    rec: &TaskInfo,
    now: Timestamp,
    lease: u64,
) -> Result<(TaskInfo, Cause), Refusal> {
    if rec.status != Status::Pending {
        return Err(Refusal::WrongState(rec.status));
    }
    if rec.next_run_at > now {
        return Err(Refusal::NotDue);
    }
    let mut next = rec.clone();
    next.status = Status::Running;
    next.attempts = rec.attempts.saturating_add(1);
    next.started_at = Some(now);
    next.lease = lease;
    Ok((next, Cause::Claimed))
}

fn check_lease(rec: &TaskInfo, lease: u64) -> Result<(), Refusal> {
    if rec.status != Status::Running {
        return Err(if rec.lease == lease {
            Refusal::WrongState(rec.status)
        } else {
            Refusal::Stale
        });
    }
    if rec.lease != lease {
        return Err(Refusal::Stale);
    }
    Ok(())
}

/// Running -> Completed, fenced by `lease`.
pub(crate) fn succeed(
    rec: &TaskInfo,
    lease: u64,
    result: Vec<u8>,
    now: Timestamp,
) -> Result<(TaskInfo, Cause), Refusal> {
    check_lease(rec, lease)?;
    let mut next = rec.clone();
    next.status = Status::Completed;
    next.result = Some(result);
    next.finished_at = Some(now);
    Ok((next, Cause::Succeeded))
}

/// Running -> Pending (retry after backoff) or Failed, fenced by `lease`. `unit` is the jitter
/// sample in `[0, 1]`; `backoff` is the task's effective backoff.
pub(crate) fn fail(
    rec: &TaskInfo,
    lease: u64,
    mut error: TaskError,
    now: Timestamp,
    backoff: &Backoff,
    unit: f64,
) -> Result<(TaskInfo, Cause), Refusal> {
    check_lease(rec, lease)?;
    error.retry_count = rec.attempts.saturating_sub(1);
    error.timestamp = now;
    let cause = Cause::Failed {
        error_type: error.error_type.clone(),
        permanent: error.permanent,
    };
    let mut next = rec.clone();
    match decide(rec.attempts, rec.max_retries, error.permanent) {
        Decision::Retry => {
            next.status = Status::Pending;
            let delay = backoff.delay_ms(rec.attempts, unit);
            next.next_run_at = Timestamp(now.0.saturating_add(delay));
        }
        Decision::Fail => {
            next.status = Status::Failed;
            next.finished_at = Some(now);
        }
    }
    push_error(&mut next, error);
    Ok((next, cause))
}

fn push_error(rec: &mut TaskInfo, error: TaskError) {
    rec.errors.push(error.clone());
    if rec.errors.len() > ERROR_HISTORY_LIMIT {
        let excess = rec.errors.len() - ERROR_HISTORY_LIMIT;
        rec.errors.drain(..excess);
    }
    rec.last_error = Some(error);
}

/// Pending -> Cancelled.
pub(crate) fn cancel(rec: &TaskInfo, now: Timestamp) -> Result<(TaskInfo, Cause), Refusal> {
    if rec.status != Status::Pending {
        return Err(Refusal::WrongState(rec.status));
    }
    let mut next = rec.clone();
    next.status = Status::Cancelled;
    next.finished_at = Some(now);
    Ok((next, Cause::Cancelled))
}

/// Running -> Cancelled, fenced by `lease`: an execution whose cancellation was requested
/// ended (its handler returned, or its timeout fired). Whatever it returned is discarded.
pub(crate) fn cancel_running(
    rec: &TaskInfo,
    lease: u64,
    now: Timestamp,
) -> Result<(TaskInfo, Cause), Refusal> {
    check_lease(rec, lease)?;
    let mut next = rec.clone();
    next.status = Status::Cancelled;
    next.finished_at = Some(now);
    Ok((next, Cause::Cancelled))
}

/// Running -> Pending, fenced by `lease`, **uncharged**: a task a worker pool claimed ahead
/// ([`WorkerPoolBuilder::claim_ahead`](crate::WorkerPoolBuilder::claim_ahead)) and never
/// started is handed back on a graceful stop. Its attempt is given back (`attempts - 1`), it
/// keeps its due time and priority (so it is claimed again first), and nothing else changes.
pub(crate) fn release(
    rec: &TaskInfo,
    lease: u64,
    _now: Timestamp,
) -> Result<(TaskInfo, Cause), Refusal> {
    check_lease(rec, lease)?;
    let mut next = rec.clone();
    next.status = Status::Pending;
    next.attempts = rec.attempts.saturating_sub(1);
    if next.attempts == 0 {
        next.started_at = None;
    }
    Ok((next, Cause::Released))
}

/// Failed | Cancelled -> Pending, due now, with a fresh budget: `attempts` restarts at 0 so the
/// task again gets `max_retries + 1` executions. Its error history and log are kept.
pub(crate) fn manual_retry(rec: &TaskInfo, now: Timestamp) -> Result<(TaskInfo, Cause), Refusal> {
    if !matches!(rec.status, Status::Failed | Status::Cancelled) {
        return Err(Refusal::WrongState(rec.status));
    }
    let mut next = rec.clone();
    next.status = Status::Pending;
    next.attempts = 0;
    next.next_run_at = now;
    next.finished_at = None;
    next.result = None;
    Ok((next, Cause::ManualRetry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::test_task as pending;

    #[test]
    fn failing_every_time_runs_exactly_budget_plus_one() {
        let b = Backoff::default();
        let mut rec = pending(3);
        let mut runs = 0;
        for lease in 1.. {
            if rec.status != Status::Pending {
                break;
            }
            let now = rec.next_run_at;
            rec = claim(&rec, now, lease).unwrap().0;
            runs += 1;
            rec = fail(&rec, lease, TaskError::transient("x", "y"), now, &b, 0.5)
                .unwrap()
                .0;
        }
        assert_eq!(runs, 4);
        assert_eq!(rec.status, Status::Failed);
        assert_eq!(rec.attempts, 4);
        let counts: Vec<u32> = rec.errors.iter().map(|e| e.retry_count).collect();
        assert_eq!(counts, vec![0, 1, 2, 3]);
    }

    #[test]
    fn stale_leases_are_rejected() {
        let rec = claim(&pending(1), Timestamp(0), 7).unwrap().0;
        assert_eq!(succeed(&rec, 6, vec![], Timestamp(1)), Err(Refusal::Stale));
        let done = succeed(&rec, 7, vec![], Timestamp(1)).unwrap().0;
        assert_eq!(
            succeed(&done, 7, vec![], Timestamp(1)),
            Err(Refusal::WrongState(Status::Completed))
        );
    }

    #[test]
    fn cancelling_a_running_execution_is_fenced_by_its_lease() {
        let rec = claim(&pending(1), Timestamp(0), 7).unwrap().0;
        assert_eq!(cancel_running(&rec, 6, Timestamp(1)), Err(Refusal::Stale));
        let (done, cause) = cancel_running(&rec, 7, Timestamp(1)).unwrap();
        assert_eq!((done.status, cause), (Status::Cancelled, Cause::Cancelled));
        assert_eq!(done.attempts, 1, "the attempt stays counted");
        assert_eq!(
            cancel_running(&pending(1), 0, Timestamp(1)),
            Err(Refusal::WrongState(Status::Pending))
        );
    }

    #[test]
    fn releasing_gives_the_attempt_back_fenced_by_its_lease() {
        let mut first = pending(1);
        first.next_run_at = Timestamp(5);
        let rec = claim(&first, Timestamp(5), 7).unwrap().0;
        assert_eq!(release(&rec, 6, Timestamp(9)), Err(Refusal::Stale));
        let (back, cause) = release(&rec, 7, Timestamp(9)).unwrap();
        assert_eq!(cause, Cause::Released);
        assert_eq!((back.status, back.attempts), (Status::Pending, 0));
        assert_eq!(back.next_run_at, Timestamp(5), "due as before");
        assert_eq!(back.started_at, None);
        assert!(back.errors.is_empty() && back.last_error.is_none());
        // A second release of the same claim changes nothing.
        assert_eq!(
            release(&back, 7, Timestamp(9)),
            Err(Refusal::WrongState(Status::Pending))
        );
        // After a failed attempt, a release gives back only the released claim's attempt.
        let again = claim(&back, Timestamp(9), 8).unwrap().0;
        let failed = fail(
            &again,
            8,
            TaskError::transient("x", "y"),
            Timestamp(10),
            &Backoff::default(),
            0.5,
        )
        .unwrap()
        .0;
        let third = claim(&failed, failed.next_run_at, 9).unwrap().0;
        assert_eq!(third.attempts, 2);
        let (back, _) = release(&third, 9, Timestamp(99)).unwrap();
        assert_eq!(back.attempts, 1);
        assert_eq!(back.errors.len(), 1);
    }

    #[test]
    fn not_due_tasks_cannot_be_claimed() {
        let mut rec = pending(1);
        rec.next_run_at = Timestamp(10);
        assert_eq!(claim(&rec, Timestamp(9), 1), Err(Refusal::NotDue));
        assert!(claim(&rec, Timestamp(10), 1).is_ok());
    }
}
