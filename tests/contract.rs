//! The contract suite (design.md sections 1 and 6): every rule of the semantics contract, written
//! once against the public API and run against every backend, the way crossbeam-channel runs one
//! suite over every flavour. A backend joins by providing a [`Harness`]: a fresh, empty store and
//! a way to (re)open it with given options.
//!
//! Time is a `ManualClock` and jitter is seeded, so every schedule is exact and nothing sleeps.
//! "Crash" is modelled the way each backend defines it: for sled, a queue handle dropped while a
//! task is claimed and the directory reopened.

mod common;

use std::time::Duration;

use omniq::testing::{self, ManualClock};
use omniq::{
    Backoff, Cause, EnqueueOptions, Error, ListFilter, Queue, QueueBuilder, RetryPolicy, Status,
    TaskContext, TaskError, TaskId, Timestamp,
};
use serde_json::json;

/// One backend's way to make and reopen a store.
trait Harness {
    /// A builder for this harness's store (the same store every call), with no options set.
    fn builder(&self) -> QueueBuilder;
    /// Opens the store as a process restarting after a crash would (for sled: after the
    /// previous handle is gone; callers drop theirs first).
    fn reopen(&self, clock: &ManualClock) -> Queue {
        common::reopen(|| configure(self.builder(), clock).open()).expect("reopen")
    }
}

struct Sled {
    dir: tempfile::TempDir,
}

impl Sled {
    fn new() -> Sled {
        Sled {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Harness for Sled {
    fn builder(&self) -> QueueBuilder {
        Queue::builder(self.dir.path())
    }
}

/// A throwaway PostgreSQL schema (feature `postgres`). A "crash" is a queue handle dropped
/// while a task is claimed: its node leaves, and the next open's rescue charges the orphan.
#[cfg(feature = "postgres")]
struct Pg(common::pg::PgSchema);

#[cfg(feature = "postgres")]
impl Harness for Pg {
    fn builder(&self) -> QueueBuilder {
        Queue::postgres_with(&self.0.url, self.0.options())
    }
}

/// The options every contract test runs with: a manual clock, seeded jitter, backoff of
/// 1 s .. 60 s ±25 % (the tutorial's table).
fn configure(b: QueueBuilder, clock: &ManualClock) -> QueueBuilder {
    b.clock(clock.clone()).jitter_seed(7)
}

fn open(h: &dyn Harness) -> (Queue, ManualClock) {
    let clock = ManualClock::new(Timestamp(1_000_000));
    let q = configure(h.builder(), &clock).open().expect("open");
    (q, clock)
}

fn enqueue(q: &Queue, kind: &str, payload: serde_json::Value, o: EnqueueOptions) -> TaskId {
    q.enqueue_json(kind, &payload, o).expect("enqueue")
}

/// Registers `kind`: fails transiently with `error_type` on attempts `<= fail_until`, then
/// succeeds returning the attempt number.
fn flaky(q: &Queue, kind: &str, error_type: &'static str, fail_until: u32) {
    q.register_fn(
        kind,
        move |_v: serde_json::Value, ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            if ctx.attempt() <= fail_until {
                Err(TaskError::transient(
                    error_type,
                    format!("attempt {}", ctx.attempt()),
                ))
            } else {
                Ok(json!(ctx.attempt()))
            }
        },
    );
}

// ----- the rules ------------------------------------------------------------------------------

/// `max_retries = N` allows exactly N + 1 executions; each failure records `retry_count =
/// attempts - 1`; only the last failure is final.
fn budget_is_exact(h: &dyn Harness) {
    for n in [0u32, 1, 3, 5] {
        let (q, clock) = open(h);
        flaky(&q, "always", "network", u32::MAX);
        let id = enqueue(&q, "always", json!(n), EnqueueOptions::new().max_retries(n));
        let report = testing::run_until_idle(&q, &clock, 100).expect("run");
        let runs = report.log.iter().filter(|e| e.id == id).count();
        assert_eq!(runs as u32, n + 1, "max_retries = {n}");
        let t = q.get(id).unwrap().unwrap();
        assert_eq!(t.status, Status::Failed);
        assert_eq!(t.attempts, n + 1);
        let counts: Vec<u32> = t.errors.iter().map(|e| e.retry_count).collect();
        assert_eq!(counts, (0..=n).collect::<Vec<_>>());
        assert!(t.errors.iter().all(|e| e.error_type == "network"));
        drop(q);
    }
}

/// A task that fails k <= N times then succeeds completes with attempts k + 1; between
/// failures it is Pending with the error set and a future `next_run_at` inside the backoff
/// range.
fn transient_failures_retry_with_backoff_in_range(h: &dyn Harness) {
    let (q, clock) = open(h);
    flaky(&q, "flaky", "network", 3);
    let id = enqueue(&q, "flaky", json!({}), EnqueueOptions::new().max_retries(5));
    for retry in 1..=3u32 {
        let before = clock.now();
        testing::run_due(&q).unwrap();
        let t = q.get(id).unwrap().unwrap();
        assert_eq!(
            t.status,
            Status::Pending,
            "an intermediate failure never looks final"
        );
        assert_eq!(t.attempts, retry);
        assert_eq!(t.last_error.as_ref().unwrap().retry_count, retry - 1);
        let delay = t.next_run_at.since(before);
        let base = Duration::from_secs(1 << (retry - 1));
        assert!(
            delay >= base.mul_f64(0.75) && delay <= base.mul_f64(1.25),
            "retry {retry}: delay {delay:?} outside {base:?} ±25 %"
        );
        // Not due a millisecond early.
        clock.set(t.next_run_at.minus(Duration::from_millis(1)));
        assert_eq!(testing::run_due(&q).unwrap().executions, 0);
        clock.set(t.next_run_at);
    }
    testing::run_due(&q).unwrap();
    let t = q.get(id).unwrap().unwrap();
    assert_eq!(t.status, Status::Completed);
    assert_eq!(t.attempts, 4);
    assert_eq!(t.result::<u32>().unwrap(), Some(4));
}

/// Permanent errors are never retried; panics, unregistered kinds and undecodable payloads
/// are classified as documented.
fn errors_are_classified(h: &dyn Harness) {
    let (q, clock) = open(h);
    q.register_fn(
        "permanent",
        |_v: serde_json::Value, _c: &TaskContext| -> Result<serde_json::Value, TaskError> {
            Err(TaskError::permanent("bad_input", "never"))
        },
    );
    q.register_fn(
        "panics",
        |_v: serde_json::Value, _c: &TaskContext| -> Result<serde_json::Value, TaskError> {
            panic!("contract-test panic")
        },
    );
    let permanent = enqueue(
        &q,
        "permanent",
        json!(1),
        EnqueueOptions::new().max_retries(5),
    );
    let panics = enqueue(&q, "panics", json!(1), EnqueueOptions::new().max_retries(1));
    let unknown = enqueue(&q, "nobody", json!(1), EnqueueOptions::new().max_retries(5));
    common::quiet_panics("contract-test panic");
    testing::run_until_idle(&q, &clock, 50).unwrap();

    let t = q.get(permanent).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Failed, 1));
    assert!(t.last_error.as_ref().unwrap().permanent);

    let t = q.get(panics).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Failed, 2));
    assert!(t
        .errors
        .iter()
        .all(|e| e.error_type == "panic" && !e.permanent));

    let t = q.get(unknown).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Failed, 1));
    let e = t.last_error.unwrap();
    assert_eq!(e.error_type, "unregistered");
    assert!(e.message.contains("nobody"), "{}", e.message);
}

/// Claims follow priority, then due time, then enqueue order; a scheduled task waits whatever
/// its priority.
fn claim_order(h: &dyn Harness) {
    let (q, clock) = open(h);
    let low_old = enqueue(&q, "k", json!(1), EnqueueOptions::new().priority(-1));
    let normal_a = enqueue(&q, "k", json!(2), EnqueueOptions::new());
    let normal_b = enqueue(&q, "k", json!(3), EnqueueOptions::new());
    let high = enqueue(&q, "k", json!(4), EnqueueOptions::new().priority(5));
    let later = enqueue(
        &q,
        "k",
        json!(5),
        EnqueueOptions::new()
            .priority(100)
            .delay(Duration::from_secs(10)),
    );
    let mut order = Vec::new();
    while let Some(c) = testing::claim_next(&q).unwrap() {
        order.push(c.task.id);
        assert!(c.succeed(&0).unwrap());
    }
    assert_eq!(order, vec![high, normal_a, normal_b, low_old]);
    assert_eq!(
        testing::next_due_at(&q).unwrap(),
        Some(clock.now().plus(Duration::from_secs(10)))
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(testing::claim_next(&q).unwrap().unwrap().task.id, later);
}

/// Attempts are counted at claim, before any handler runs; every finish is fenced by its lease:
/// a second finish of the same execution, or one of an execution that was closed, changes
/// nothing.
fn attempts_counted_at_claim_and_finishes_fenced(h: &dyn Harness) {
    let (q, _clock) = open(h);
    let id = enqueue(&q, "k", json!(1), EnqueueOptions::new().max_retries(2));
    let claimed = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(claimed.task.attempts, 1);
    let stored = q.get(id).unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts), (Status::Running, 1));
    assert!(claimed.fail(TaskError::transient("network", "x")).unwrap());
    let t = q.get(id).unwrap().unwrap();
    assert_eq!(t.status, Status::Pending);
    // The history shows exactly one claim per attempt.
    let h1 = q.history(id).unwrap();
    let claims = h1.iter().filter(|e| e.cause == Cause::Claimed).count();
    assert_eq!(claims as u32, t.attempts);
}

/// A handler that outlives its timeout: the attempt is closed as a `timeout` failure, the
/// handler sees `is_cancelled()`, and its late success is rejected by the lease fence.
fn late_result_of_a_timed_out_attempt_is_rejected(h: &dyn Harness) {
    let (q, clock) = open(h);
    let (started_tx, started) = crossbeam_channel::bounded::<()>(1);
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let (saw_cancel_tx, saw_cancel) = crossbeam_channel::bounded::<bool>(1);
    q.register_fn(
        "slow",
        move |_v: serde_json::Value, ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            if ctx.attempt() == 1 {
                let _ = started_tx.send(());
                let _ = released.recv();
                let _ = saw_cancel_tx.send(ctx.is_cancelled());
            }
            Ok(json!("late"))
        },
    );
    let id = enqueue(
        &q,
        "slow",
        json!(1),
        EnqueueOptions::new()
            .max_retries(1)
            .timeout(Duration::from_secs(30)),
    );
    let pool = q.workers().concurrency(1).start().unwrap();
    started.recv_timeout(Duration::from_secs(20)).unwrap();
    let events = q.subscribe();
    clock.advance(Duration::from_secs(31));
    // The dispatcher closes the attempt (woken by the clock change).
    let closed = events
        .iter()
        .find(|e| e.entry.task_id == id && e.entry.to == Status::Pending)
        .unwrap();
    assert!(
        matches!(&closed.entry.cause, Cause::Failed { error_type, .. } if error_type == "timeout")
    );
    release.send(()).unwrap();
    assert!(saw_cancel.recv_timeout(Duration::from_secs(20)).unwrap());
    // The retry runs (attempt 2) once its backoff has passed and completes; attempt 1's late
    // "success" never counted.
    clock.advance(Duration::from_secs(2));
    let done = q.wait(id, Duration::from_secs(20)).unwrap();
    pool.stop();
    assert_eq!((done.status, done.attempts), (Status::Completed, 2));
    assert_eq!(done.errors.len(), 1);
    assert_eq!(done.errors[0].error_type, "timeout");
    let succeeded = q
        .history(id)
        .unwrap()
        .iter()
        .filter(|e| e.cause == Cause::Succeeded)
        .map(|e| e.attempt)
        .collect::<Vec<_>>();
    assert_eq!(succeeded, vec![2]);
}

/// What was running when the process died is charged its attempt as a `crash` under the
/// ordinary rule: retried while budget remains, failed when it was the last.
fn crash_is_charged_under_the_ordinary_rule(h: &dyn Harness) {
    let (q, clock) = open(h);
    let with_budget = enqueue(&q, "k", json!(1), EnqueueOptions::new().max_retries(1));
    let last_chance = enqueue(&q, "k", json!(2), EnqueueOptions::new().max_retries(0));
    let a = testing::claim_next(&q).unwrap().unwrap();
    let b = testing::claim_next(&q).unwrap().unwrap();
    let lease_a = a.task.lease;
    a.abandon();
    b.abandon();
    drop(q);
    let q = h.reopen(&clock);
    assert_eq!(q.recovery_report().recovered, 2);
    let t = q.get(with_budget).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Pending, 1));
    assert_eq!(t.last_error.as_ref().unwrap().error_type, "crash");
    assert_eq!(t.last_error.as_ref().unwrap().retry_count, 0);
    let t = q.get(last_chance).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Failed, 1));
    assert_eq!(t.last_error.as_ref().unwrap().error_type, "crash");
    // A second open finds nothing left to rescue.
    drop(q);
    let q = h.reopen(&clock);
    assert_eq!(q.recovery_report().recovered, 0);
    // The charged task runs again with a new lease.
    clock.advance(Duration::from_secs(2));
    let again = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(again.task.id, with_budget);
    assert_eq!(again.task.attempts, 2);
    assert_ne!(again.task.lease, lease_a);
}

/// `cancel` is for Pending tasks; `retry` re-queues Failed or Cancelled ones with a fresh
/// budget and keeps their history.
fn cancel_and_retry(h: &dyn Harness) {
    let (q, clock) = open(h);
    flaky(&q, "always", "network", u32::MAX);
    let pending = enqueue(
        &q,
        "always",
        json!(1),
        EnqueueOptions::new().delay(Duration::from_secs(60)),
    );
    let cancelled = q.cancel(pending).unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    match q.cancel(pending) {
        Err(Error::InvalidState { status, .. }) => assert_eq!(status, Status::Cancelled),
        other => panic!("expected InvalidState, got {other:?}"),
    }
    match q.cancel(TaskId::from_bytes([9; 16])) {
        Err(Error::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    let failing = enqueue(&q, "always", json!(2), EnqueueOptions::new().max_retries(1));
    testing::run_until_idle(&q, &clock, 50).unwrap();
    let failed = q.get(failing).unwrap().unwrap();
    assert_eq!((failed.status, failed.attempts), (Status::Failed, 2));
    match q.retry(pending) {
        Ok(t) => assert_eq!((t.status, t.attempts), (Status::Pending, 0)),
        Err(e) => panic!("retry of a cancelled task: {e}"),
    }
    let retried = q.retry(failing).unwrap();
    assert_eq!((retried.status, retried.attempts), (Status::Pending, 0));
    assert_eq!(retried.errors.len(), 2, "history kept");
    let report = testing::run_until_idle(&q, &clock, 50).unwrap();
    assert_eq!(
        report.log.iter().filter(|e| e.id == failing).count(),
        2,
        "a fresh budget"
    );
    let log = q.history(failing).unwrap();
    assert!(log.iter().any(|e| e.cause == Cause::ManualRetry));
    match q.retry(failing) {
        Ok(_) => {}
        Err(e) => panic!("a failed task can be retried again: {e}"),
    }
    let running = testing::claim_next(&q).unwrap().unwrap();
    match q.retry(running.task.id) {
        Err(Error::InvalidState { status, .. }) => assert_eq!(status, Status::Running),
        other => panic!("expected InvalidState, got {other:?}"),
    }
}

/// `wait` and `wait_all` return terminal tasks; they time out on unfinished ones and say
/// `NotFound` for unknown ids.
fn wait_and_wait_all(h: &dyn Harness) {
    let (q, clock) = open(h);
    flaky(&q, "ok", "x", 0);
    let a = enqueue(&q, "ok", json!(1), EnqueueOptions::new());
    let b = enqueue(&q, "ok", json!(2), EnqueueOptions::new());
    let later = enqueue(
        &q,
        "ok",
        json!(3),
        EnqueueOptions::new().delay(Duration::from_secs(5)),
    );
    testing::run_due(&q).unwrap();
    let done = q.wait_all(&[a, b], Duration::from_secs(5)).unwrap();
    assert!(done.iter().all(|t| t.status == Status::Completed));
    match q.wait(later, Duration::from_millis(20)) {
        Err(Error::WaitTimeout { status, .. }) => assert_eq!(status, Status::Pending),
        other => panic!("expected WaitTimeout, got {other:?}"),
    }
    match q.wait_all(&[a, later], Duration::from_millis(20)) {
        Err(Error::WaitTimeout { id, .. }) => assert_eq!(id, later),
        other => panic!("expected WaitTimeout, got {other:?}"),
    }
    assert!(matches!(
        q.wait(TaskId::from_bytes([7; 16]), Duration::from_millis(5)),
        Err(Error::NotFound(_))
    ));
    clock.advance(Duration::from_secs(5));
    testing::run_due(&q).unwrap();
    assert_eq!(
        q.wait(later, Duration::ZERO).unwrap().status,
        Status::Completed
    );
}

/// Every transition is in the history in order, with its cause and attempt; counters agree.
fn history_and_counts(h: &dyn Harness) {
    let (q, clock) = open(h);
    flaky(&q, "flaky", "network", 1);
    let id = enqueue(&q, "flaky", json!(1), EnqueueOptions::new().queue("mail"));
    testing::run_until_idle(&q, &clock, 20).unwrap();
    let log = q.history(id).unwrap();
    let steps: Vec<(Option<Status>, Status, u32)> =
        log.iter().map(|e| (e.from, e.to, e.attempt)).collect();
    assert_eq!(
        steps,
        vec![
            (None, Status::Pending, 0),
            (Some(Status::Pending), Status::Running, 1),
            (Some(Status::Running), Status::Pending, 1),
            (Some(Status::Pending), Status::Running, 2),
            (Some(Status::Running), Status::Completed, 2),
        ]
    );
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
    let stats = q.stats().unwrap();
    assert_eq!(stats.count(Status::Completed), 1);
    assert_eq!(stats.by_queue["mail"][&Status::Completed], 1);
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// Purge removes terminal tasks finished before the cutoff (with their history), nothing else.
fn purge(h: &dyn Harness) {
    let (q, clock) = open(h);
    flaky(&q, "ok", "x", 0);
    let old = enqueue(&q, "ok", json!(1), EnqueueOptions::new());
    testing::run_due(&q).unwrap();
    clock.advance(Duration::from_secs(3600));
    let recent = enqueue(&q, "ok", json!(2), EnqueueOptions::new());
    testing::run_due(&q).unwrap();
    let waiting = enqueue(
        &q,
        "ok",
        json!(3),
        EnqueueOptions::new().delay(Duration::from_secs(60)),
    );
    let report = q.purge(Duration::from_secs(60)).unwrap();
    assert_eq!(report.tasks_removed, 1);
    assert!(q.get(old).unwrap().is_none());
    assert!(q.history(old).unwrap().is_empty());
    assert!(q.get(recent).unwrap().is_some());
    assert!(q.get(waiting).unwrap().is_some());
    let listed = q.list(&ListFilter::new()).unwrap().tasks.len();
    assert_eq!(listed, 2);
}

/// Per-task backoff overrides the queue's, which overrides the store's.
fn backoff_configuration(h: &dyn Harness) {
    let clock = ManualClock::new(Timestamp(1_000_000));
    let q = configure(h.builder(), &clock)
        .retry_policy(RetryPolicy {
            max_retries: 3,
            backoff: Backoff::new(Duration::from_secs(10), Duration::from_secs(10), 0.0),
        })
        .queue_retry_policy(
            "fast",
            RetryPolicy {
                max_retries: 3,
                backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(2), 0.0),
            },
        )
        .open()
        .unwrap();
    flaky(&q, "f", "x", 1);
    let store_default = enqueue(&q, "f", json!(1), EnqueueOptions::new());
    let queue_default = enqueue(&q, "f", json!(2), EnqueueOptions::new().queue("fast"));
    let own = enqueue(
        &q,
        "f",
        json!(3),
        EnqueueOptions::new().queue("fast").backoff(Backoff::new(
            Duration::from_secs(5),
            Duration::from_secs(5),
            0.0,
        )),
    );
    let now = clock.now();
    testing::run_due(&q).unwrap();
    let due = |id| q.get(id).unwrap().unwrap().next_run_at.since(now);
    assert_eq!(due(store_default), Duration::from_secs(10));
    assert_eq!(due(queue_default), Duration::from_secs(2));
    assert_eq!(due(own), Duration::from_secs(5));
}

// ----- one suite per backend ----------------------------------------------------------------

macro_rules! contract_suite {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            use super::*;

            #[test]
            fn budget_is_exact() {
                super::budget_is_exact(&$harness);
            }
            #[test]
            fn transient_failures_retry_with_backoff_in_range() {
                super::transient_failures_retry_with_backoff_in_range(&$harness);
            }
            #[test]
            fn errors_are_classified() {
                super::errors_are_classified(&$harness);
            }
            #[test]
            fn claim_order() {
                super::claim_order(&$harness);
            }
            #[test]
            fn attempts_counted_at_claim_and_finishes_fenced() {
                super::attempts_counted_at_claim_and_finishes_fenced(&$harness);
            }
            #[test]
            fn late_result_of_a_timed_out_attempt_is_rejected() {
                super::late_result_of_a_timed_out_attempt_is_rejected(&$harness);
            }
            #[test]
            fn crash_is_charged_under_the_ordinary_rule() {
                super::crash_is_charged_under_the_ordinary_rule(&$harness);
            }
            #[test]
            fn cancel_and_retry() {
                super::cancel_and_retry(&$harness);
            }
            #[test]
            fn wait_and_wait_all() {
                super::wait_and_wait_all(&$harness);
            }
            #[test]
            fn history_and_counts() {
                super::history_and_counts(&$harness);
            }
            #[test]
            fn purge() {
                super::purge(&$harness);
            }
            #[test]
            fn backoff_configuration() {
                super::backoff_configuration(&$harness);
            }
        }
    };
}

contract_suite!(sled, Sled::new());
// Skipped (the test returns) only when the server is unreachable and CI is unset.
#[cfg(feature = "postgres")]
contract_suite!(
    postgres,
    match common::pg::PgSchema::new("contract") {
        Some(s) => Pg(s),
        None => return,
    }
);
