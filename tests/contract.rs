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
    Backoff, Cause, EnqueueOptions, Error, Limit, LimitScope, ListFilter, Missed, Queue,
    QueueBuilder, RetryPolicy, Spec, Status, TaskContext, TaskError, TaskId, Timestamp, Unique,
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

// ----- claim-ahead (WorkerPoolBuilder::claim_ahead) ---------------------------------------------

/// Waits until `n` transitions with `cause` arrived on `events`.
fn await_causes(
    events: &crossbeam_channel::Receiver<omniq::TransitionEvent>,
    cause: &Cause,
    n: usize,
) {
    let mut seen = 0;
    while seen < n {
        let e = events
            .recv_timeout(Duration::from_secs(20))
            .expect("a transition within 20 s");
        if &e.entry.cause == cause {
            seen += 1;
        }
    }
}

/// A graceful stop hands tasks claimed ahead and never started back to `Pending` uncharged:
/// attempts back to 0, no error, a `Released` entry after the claim, due and claimable again.
fn claim_ahead_release_on_graceful_stop_charges_nothing(h: &dyn Harness) {
    let (q, clock) = open(h);
    let (started_tx, started) = crossbeam_channel::bounded::<()>(1);
    let (gate_tx, gate) = crossbeam_channel::bounded::<()>(0);
    q.register_fn(
        "gate",
        move |v: serde_json::Value, _ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            if v == json!(0) {
                let _ = started_tx.send(());
                let _ = gate.recv();
            }
            Ok(json!("done"))
        },
    );
    let first = enqueue(&q, "gate", json!(0), EnqueueOptions::new().priority(10));
    let ahead: Vec<TaskId> = (1..=3)
        .map(|i| enqueue(&q, "gate", json!(i), EnqueueOptions::new()))
        .collect();
    let events = q.subscribe();
    let pool = q.workers().concurrency(1).claim_ahead(3).start().unwrap();
    started.recv_timeout(Duration::from_secs(20)).unwrap();
    // One running, three claimed ahead (each charged its attempt at claim).
    await_causes(&events, &Cause::Claimed, 4);
    for id in &ahead {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!((t.status, t.attempts), (Status::Running, 1));
    }
    let stopper = std::thread::spawn(move || pool.stop());
    // The release commits while the running handler still blocks the stop.
    await_causes(&events, &Cause::Released, 3);
    drop(gate_tx);
    let report = stopper.join().unwrap();
    assert_eq!(report.abandoned, 0);
    let t = q.get(first).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Completed, 1));
    for id in &ahead {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!((t.status, t.attempts), (Status::Pending, 0), "{id}");
        assert!(t.errors.is_empty() && t.last_error.is_none());
        let causes: Vec<Cause> = q
            .history(*id)
            .unwrap()
            .into_iter()
            .map(|e| e.cause)
            .collect();
        assert_eq!(
            causes,
            vec![Cause::Enqueued, Cause::Claimed, Cause::Released]
        );
    }
    let check = q.check_consistency().unwrap();
    assert!(check.is_consistent(), "{:?}", check.problems);
    // Released tasks run again with their full budget.
    testing::run_until_idle(&q, &clock, 10).unwrap();
    for id in &ahead {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!((t.status, t.attempts), (Status::Completed, 1));
    }
}

/// A process that dies with tasks claimed ahead: recovery charges each of them, like the
/// running one, exactly one `crash` (an attempt used without running).
fn claim_ahead_crash_charges_each_one_crash(h: &dyn Harness) {
    let (q, clock) = open(h);
    let (started_tx, started) = crossbeam_channel::bounded::<()>(4);
    q.register_fn(
        "spin",
        move |_v: serde_json::Value, ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            let _ = started_tx.send(());
            // Runs until the pool "dies" (simulate_crash flags every running handler).
            while !ctx.is_cancelled() {
                std::thread::park_timeout(Duration::from_millis(2));
            }
            Ok(json!("never recorded"))
        },
    );
    let ids: Vec<TaskId> = (0..4)
        .map(|i| enqueue(&q, "spin", json!(i), EnqueueOptions::new().max_retries(1)))
        .collect();
    let events = q.subscribe();
    let pool = q.workers().concurrency(1).claim_ahead(3).start().unwrap();
    started.recv_timeout(Duration::from_secs(20)).unwrap();
    await_causes(&events, &Cause::Claimed, 4);
    pool.simulate_crash();
    drop(events);
    drop(q);
    let q = h.reopen(&clock);
    assert_eq!(q.recovery_report().recovered, 4);
    for id in &ids {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!((t.status, t.attempts), (Status::Pending, 1), "{id}");
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.errors[0].error_type, "crash");
        let log = q.history(*id).unwrap();
        let count = |c: &dyn Fn(&Cause) -> bool| log.iter().filter(|e| c(&e.cause)).count();
        assert_eq!(count(&|c| *c == Cause::Claimed), 1);
        assert_eq!(
            count(&|c| matches!(c, Cause::Failed { error_type, .. } if error_type == "crash")),
            1
        );
        assert_eq!(
            count(&|c| matches!(c, Cause::Succeeded | Cause::Released)),
            0
        );
    }
    let check = q.check_consistency().unwrap();
    assert!(check.is_consistent(), "{:?}", check.problems);
}

/// With claim-ahead, workers do not wait for their outcomes' commits, but `stop()` still
/// returns only once every outcome of its workers is committed.
fn claim_ahead_stop_returns_after_outcomes_commit(h: &dyn Harness) {
    let (q, _clock) = open(h);
    let (ran_tx, ran) = crossbeam_channel::unbounded::<()>();
    q.register_fn(
        "note",
        move |_v: serde_json::Value, _ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            let _ = ran_tx.send(());
            Ok(json!("ok"))
        },
    );
    let ids: Vec<TaskId> = (0..40)
        .map(|i| enqueue(&q, "note", json!(i), EnqueueOptions::new()))
        .collect();
    let pool = q.workers().concurrency(2).claim_ahead(8).start().unwrap();
    for _ in &ids {
        ran.recv_timeout(Duration::from_secs(20)).unwrap();
    }
    // Every handler has returned; their outcomes may still be on their way.
    let report = pool.stop();
    assert_eq!(report.abandoned, 0);
    for id in &ids {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!((t.status, t.attempts), (Status::Completed, 1), "{id}");
    }
}

/// `cancel_running` on a task claimed ahead (Running, not started): it never starts, and ends
/// `Cancelled` with its one charged attempt.
fn claim_ahead_cancel_before_start(h: &dyn Harness) {
    let (q, _clock) = open(h);
    let (started_tx, started) = crossbeam_channel::bounded::<serde_json::Value>(4);
    let (gate_tx, gate) = crossbeam_channel::bounded::<()>(0);
    q.register_fn(
        "gate",
        move |v: serde_json::Value, _ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            let _ = started_tx.send(v.clone());
            if v == json!(0) {
                let _ = gate.recv();
            }
            Ok(json!("done"))
        },
    );
    let first = enqueue(&q, "gate", json!(0), EnqueueOptions::new().priority(10));
    let waiting = enqueue(&q, "gate", json!(1), EnqueueOptions::new());
    let events = q.subscribe();
    let pool = q.workers().concurrency(1).claim_ahead(1).start().unwrap();
    assert_eq!(
        started.recv_timeout(Duration::from_secs(20)).unwrap(),
        json!(0)
    );
    // Both were claimed in one claim (idle worker + 1 ahead); the waiting one was registered
    // before the first handler started.
    await_causes(&events, &Cause::Claimed, 2);
    let t = q.cancel_running(waiting).unwrap();
    assert_eq!(t.status, Status::Running);
    drop(gate_tx);
    let t = q.wait(waiting, Duration::from_secs(20)).unwrap();
    assert_eq!((t.status, t.attempts), (Status::Cancelled, 1));
    let t = q.wait(first, Duration::from_secs(20)).unwrap();
    assert_eq!(t.status, Status::Completed);
    pool.stop();
    assert!(
        started.try_recv().is_err(),
        "the cancelled task's handler ran"
    );
}

/// With claim-ahead, a timed-out attempt's late result is still rejected by the lease fence,
/// and the tasks that waited behind it run on the replacement worker.
fn claim_ahead_keeps_finishes_fenced(h: &dyn Harness) {
    let (q, clock) = open(h);
    let (started_tx, started) = crossbeam_channel::bounded::<()>(1);
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    q.register_fn(
        "slow",
        move |_v: serde_json::Value, ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            if ctx.attempt() == 1 {
                let _ = started_tx.send(());
                let _ = released.recv();
            }
            Ok(json!("late"))
        },
    );
    q.register_fn(
        "quick",
        |_v: serde_json::Value, _ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            Ok(json!("ok"))
        },
    );
    let slow = enqueue(
        &q,
        "slow",
        json!(1),
        EnqueueOptions::new()
            .max_retries(1)
            .priority(10)
            .timeout(Duration::from_secs(30)),
    );
    let quick: Vec<TaskId> = (0..2)
        .map(|i| enqueue(&q, "quick", json!(i), EnqueueOptions::new()))
        .collect();
    let events = q.subscribe();
    let pool = q.workers().concurrency(1).claim_ahead(2).start().unwrap();
    started.recv_timeout(Duration::from_secs(20)).unwrap();
    await_causes(&events, &Cause::Claimed, 3);
    clock.advance(Duration::from_secs(31));
    // The timeout closes attempt 1; the replacement worker runs the two waiting tasks.
    for id in &quick {
        let t = q.wait(*id, Duration::from_secs(20)).unwrap();
        assert_eq!((t.status, t.attempts), (Status::Completed, 1));
    }
    release.send(()).unwrap();
    clock.advance(Duration::from_secs(2));
    let done = q.wait(slow, Duration::from_secs(20)).unwrap();
    pool.stop();
    assert_eq!((done.status, done.attempts), (Status::Completed, 2));
    assert_eq!(done.errors.len(), 1);
    assert_eq!(done.errors[0].error_type, "timeout");
    let succeeded: Vec<u32> = q
        .history(slow)
        .unwrap()
        .iter()
        .filter(|e| e.cause == Cause::Succeeded)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(succeeded, vec![2]);
    let check = q.check_consistency().unwrap();
    assert!(check.is_consistent(), "{:?}", check.problems);
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

/// A paused queue's tasks are never claimed and nothing is charged; other queues go on; resume
/// makes them claimable again, in order, and the pause survives a reopen.
fn pause_holds_claims_and_charges_nothing(h: &dyn Harness) {
    let (q, clock) = open(h);
    let held = enqueue(&q, "k", json!(1), EnqueueOptions::new().queue("held"));
    let other = enqueue(&q, "k", json!(2), EnqueueOptions::new().queue("other"));
    q.pause("held").unwrap();
    assert!(q.is_paused("held"));
    let c = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(c.task.id, other);
    assert!(c.succeed(&0).unwrap());
    assert!(
        testing::claim_next(&q).unwrap().is_none(),
        "a paused queue was claimed"
    );
    let t = q.get(held).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Pending, 0));
    drop(q);
    let q = h.reopen(&clock);
    assert_eq!(q.paused_queues(), vec!["held".to_string()]);
    assert!(
        testing::claim_next(&q).unwrap().is_none(),
        "the pause did not survive a reopen"
    );
    q.resume("held").unwrap();
    let c = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!((c.task.id, c.task.attempts), (held, 1));
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

// ----- unique jobs ----------------------------------------------------------------------------

fn unique_opts() -> EnqueueOptions {
    EnqueueOptions::new().unique(Unique::by_args())
}

/// A duplicate is refused with the holder's id while the holder is Pending or Running; the key
/// is released when the holder leaves its hold set, and a new task takes it.
fn unique_refuses_duplicates_until_released(h: &dyn Harness) {
    let (q, _clock) = open(h);
    let first = q
        .insert_json("sync", &json!({"a": 1, "b": 2}), unique_opts())
        .unwrap();
    assert!(!first.duplicate);
    // Same args in another key order: the same key.
    let dup = q
        .insert_json("sync", &json!({"b": 2, "a": 1}), unique_opts())
        .unwrap();
    assert_eq!((dup.id, dup.duplicate), (first.id, true));
    // Other args, or another kind: other keys.
    assert!(
        !q.insert_json("sync", &json!({"a": 2}), unique_opts())
            .unwrap()
            .duplicate
    );
    assert!(
        !q.insert_json("other", &json!({"a": 1, "b": 2}), unique_opts())
            .unwrap()
            .duplicate
    );
    // Without unique options nothing is checked.
    let plain = q.enqueue_json("sync", &json!({"a": 1, "b": 2}), EnqueueOptions::new());
    assert_ne!(plain.unwrap(), first.id);
    let extras = q.extras(first.id).unwrap().unwrap();
    let key = extras.unique.unwrap();
    assert_eq!(key.key, r#"sync {"a":1,"b":2}"#);

    // Running still holds it.
    let c = loop {
        let c = testing::claim_next(&q).unwrap().unwrap();
        if c.task.id == first.id {
            break c;
        }
        assert!(c.succeed(&0).unwrap());
    };
    let dup = q
        .insert_json("sync", &json!({"a": 1, "b": 2}), unique_opts())
        .unwrap();
    assert_eq!((dup.id, dup.duplicate), (first.id, true));
    // Completed is not in the default hold set: released.
    assert!(c.succeed(&0).unwrap());
    let next = q
        .insert_json("sync", &json!({"a": 1, "b": 2}), unique_opts())
        .unwrap();
    assert!(!next.duplicate);
    assert_ne!(next.id, first.id);
    // Cancel releases too.
    q.cancel(next.id).unwrap();
    assert!(
        !q.insert_json("sync", &json!({"a": 1, "b": 2}), unique_opts())
            .unwrap()
            .duplicate
    );
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// Terminal states in the hold set keep the key after the task ends, until it is purged;
/// an explicit key ignores the arguments.
fn unique_hold_states_and_purge(h: &dyn Harness) {
    let (q, clock) = open(h);
    let once =
        || EnqueueOptions::new().unique(Unique::key("welcome:42").states([Status::Completed]));
    let a = q.insert_json("mail", &json!({"v": 1}), once()).unwrap();
    let c = testing::claim_next(&q).unwrap().unwrap();
    assert!(c.succeed(&0).unwrap());
    let b = q.insert_json("mail", &json!({"v": 2}), once()).unwrap();
    assert_eq!((b.id, b.duplicate), (a.id, true), "Completed holds the key");
    clock.advance(Duration::from_secs(10));
    assert_eq!(q.purge(Duration::from_secs(1)).unwrap().tasks_removed, 1);
    assert!(
        q.extras(a.id).unwrap().is_none(),
        "purge removes the extras"
    );
    assert!(
        !q.insert_json("mail", &json!({"v": 3}), once())
            .unwrap()
            .duplicate
    );
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// With a period, the key includes the period the enqueue falls in.
fn unique_period(h: &dyn Harness) {
    let (q, clock) = open(h);
    let hourly =
        || EnqueueOptions::new().unique(Unique::key("report").period(Duration::from_secs(3600)));
    clock.set(Timestamp(3_600_000 * 100));
    let a = q.insert_json("r", &json!(1), hourly()).unwrap();
    clock.advance(Duration::from_secs(3599));
    assert!(q.insert_json("r", &json!(1), hourly()).unwrap().duplicate);
    clock.advance(Duration::from_secs(1));
    let b = q.insert_json("r", &json!(1), hourly()).unwrap();
    assert!(!b.duplicate && b.id != a.id);
}

/// `enqueue_many`: duplicates of stored tasks and of earlier tasks in the same batch are not
/// inserted; the rest are, atomically.
fn unique_in_enqueue_many(h: &dyn Harness) {
    let (q, _clock) = open(h);
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Sync {
        account: u32,
    }
    impl omniq::Task for Sync {
        const NAME: &'static str = "sync";
        type Output = ();
    }
    let stored = q.insert_with(Sync { account: 1 }, unique_opts()).unwrap();
    let out = q
        .insert_many_with([1, 2, 3, 2].map(|account| Sync { account }), unique_opts())
        .unwrap();
    let dups: Vec<bool> = out.iter().map(|i| i.duplicate).collect();
    assert_eq!(dups, vec![true, false, false, true]);
    assert_eq!(out[0].id, stored.id);
    assert_eq!(out[3].id, out[1].id);
    assert_eq!(q.stats().unwrap().total, 3);
}

/// Producers racing with one key: exactly one inserts; every one learns the same id.
fn unique_racing_producers_insert_one(h: &dyn Harness) {
    let (q, _clock) = open(h);
    for round in 0..5 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let results: Vec<omniq::Inserted> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let q = q.clone();
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        q.insert_json("race", &json!(round), unique_opts()).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let inserted = results.iter().filter(|r| !r.duplicate).count();
        assert_eq!(inserted, 1, "round {round}: {results:?}");
        assert!(results.iter().all(|r| r.id == results[0].id));
    }
    assert_eq!(q.stats().unwrap().total, 5);
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// A manual retry that would make two live tasks share a key is refused, clearly; once the
/// other task lets go, the retry goes through. Automatic retries keep the key (Pending and
/// Running always hold it).
fn unique_manual_retry_conflict(h: &dyn Harness) {
    let (q, clock) = open(h);
    flaky(&q, "u", "network", u32::MAX);
    let a = q
        .insert_json("u", &json!(1), unique_opts().max_retries(1))
        .unwrap();
    testing::run_due(&q).unwrap();
    let t = q.get(a.id).unwrap().unwrap();
    assert_eq!(t.status, Status::Pending, "automatic retry");
    assert!(
        q.insert_json("u", &json!(1), unique_opts())
            .unwrap()
            .duplicate
    );
    testing::run_until_idle(&q, &clock, 10).unwrap();
    assert_eq!(q.get(a.id).unwrap().unwrap().status, Status::Failed);
    let b = q.insert_json("u", &json!(1), unique_opts()).unwrap();
    assert!(!b.duplicate);
    match q.retry(a.id) {
        Err(Error::UniqueConflict { id, holder, .. }) => assert_eq!((id, holder), (a.id, b.id)),
        other => panic!("expected a unique conflict, got {other:?}"),
    }
    assert_eq!(
        q.get(a.id).unwrap().unwrap().status,
        Status::Failed,
        "unchanged"
    );
    // A task that cannot be retried at all says so, not that its key is taken (found by
    // tests/rules_model.rs: the uniqueness check once ran before the state rule).
    let c = q
        .insert_json("other", &json!(3), EnqueueOptions::new())
        .unwrap();
    let running = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(running.task.id, b.id);
    assert!(running.succeed(&0).unwrap());
    let d = q.insert_json("u", &json!(1), unique_opts()).unwrap();
    assert!(!d.duplicate, "b completed: the key is free again");
    match q.retry(b.id) {
        Err(Error::InvalidState { status, .. }) => assert_eq!(status, Status::Completed),
        other => panic!("retry of a Completed task: expected InvalidState, got {other:?}"),
    }
    q.cancel(c.id).unwrap();
    q.cancel(d.id).unwrap();
    assert_eq!(q.retry(a.id).unwrap().status, Status::Pending);
    assert!(
        q.insert_json("u", &json!(1), unique_opts())
            .unwrap()
            .duplicate
    );
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// Keys survive a restart (they are stored, not remembered).
fn unique_survives_reopen(h: &dyn Harness) {
    let (q, clock) = open(h);
    let a = q.insert_json("k", &json!(1), unique_opts()).unwrap();
    drop(q);
    let q = h.reopen(&clock);
    let b = q.insert_json("k", &json!(1), unique_opts()).unwrap();
    assert_eq!((b.id, b.duplicate), (a.id, true));
}

/// A crash rescue moves a holder under the ordinary rule: back to Pending keeps its key (and its
/// concurrency slot is freed), a last attempt Failed releases it.
fn unique_and_limits_after_a_crash(h: &dyn Harness) {
    let (q, clock) = open(h);
    q.set_limit(LimitScope::kind("u"), Limit::new().concurrency(2))
        .unwrap();
    let keep = q
        .insert_json("u", &json!(1), unique_opts().max_retries(1))
        .unwrap();
    let lose = q
        .insert_json("u", &json!(2), unique_opts().max_retries(0))
        .unwrap();
    let a = testing::claim_next(&q).unwrap().unwrap();
    let b = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(q.limits().unwrap()[0].running, 2);
    a.abandon();
    b.abandon();
    drop(q);
    let q = h.reopen(&clock);
    assert_eq!(q.recovery_report().recovered, 2);
    assert_eq!(q.get(keep.id).unwrap().unwrap().status, Status::Pending);
    assert_eq!(q.get(lose.id).unwrap().unwrap().status, Status::Failed);
    let again = q.insert_json("u", &json!(1), unique_opts()).unwrap();
    assert_eq!(
        (again.id, again.duplicate),
        (keep.id, true),
        "Pending holds"
    );
    let fresh = q.insert_json("u", &json!(2), unique_opts()).unwrap();
    assert!(!fresh.duplicate, "Failed released the key");
    let l = &q.limits().unwrap()[0];
    assert_eq!(
        (l.running, l.remaining),
        (0, 2),
        "the crash freed both slots"
    );
    assert!(q.check_consistency().unwrap().is_consistent());
}

// ----- limits -----------------------------------------------------------------------------------

/// At most N starts per sliding window; a held task is not claimed and not charged; the next
/// due time is when the window frees a slot; priority order is kept within the limit.
fn rate_limit_window(h: &dyn Harness) {
    let (q, clock) = open(h);
    q.set_limit(
        LimitScope::queue("mail"),
        Limit::new().rate(2, Duration::from_secs(10)),
    )
    .unwrap();
    flaky(&q, "m", "x", 0);
    let ids: Vec<TaskId> = (0..5)
        .map(|i| {
            enqueue(
                &q,
                "m",
                json!(i),
                EnqueueOptions::new().queue("mail").priority(i as i8),
            )
        })
        .collect();
    let other = enqueue(&q, "m", json!("free"), EnqueueOptions::new());
    let start = clock.now();
    let r = testing::run_due(&q).unwrap();
    let ran: Vec<TaskId> = r.log.iter().map(|e| e.id).collect();
    // Best priority first within the limit; the unlimited queue is not held up.
    assert_eq!(ran.len(), 3);
    assert!(ran.contains(&other));
    assert!(ran.contains(&ids[4]) && ran.contains(&ids[3]));
    for id in &ids[..3] {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!(
            (t.status, t.attempts),
            (Status::Pending, 0),
            "never charged"
        );
    }
    assert_eq!(
        testing::next_due_at(&q).unwrap(),
        Some(start.plus(Duration::from_secs(10)))
    );
    let l = &q.limits().unwrap()[0];
    assert_eq!((l.started_in_window, l.remaining, l.waiting), (2, 0, 3));
    assert_eq!(l.frees_at, Some(start.plus(Duration::from_secs(10))));
    clock.advance(Duration::from_millis(9_999));
    assert_eq!(testing::run_due(&q).unwrap().executions, 0);
    clock.advance(Duration::from_millis(1));
    let r = testing::run_due(&q).unwrap();
    assert_eq!(
        r.log.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );
    // Raised at run time: applies at once.
    q.set_limit(
        LimitScope::queue("mail"),
        Limit::new().rate(3, Duration::from_secs(10)),
    )
    .unwrap();
    assert_eq!(testing::run_due(&q).unwrap().executions, 1);
    q.remove_limit(LimitScope::queue("mail")).unwrap();
    assert!(q.limits().unwrap().is_empty());
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// At most M running at once, per queue and per kind (across queues).
fn concurrency_limits(h: &dyn Harness) {
    let (q, _clock) = open(h);
    q.set_limit(LimitScope::kind("pdf"), Limit::new().concurrency(2))
        .unwrap();
    for queue in ["a", "b", "c"] {
        enqueue(&q, "pdf", json!(queue), EnqueueOptions::new().queue(queue));
    }
    let text = enqueue(&q, "text", json!(0), EnqueueOptions::new().queue("a"));
    let c1 = testing::claim_next(&q).unwrap().unwrap();
    let c2 = testing::claim_next(&q).unwrap().unwrap();
    let c3 = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(c3.task.id, text, "the third pdf waits; other kinds do not");
    assert!(testing::claim_next(&q).unwrap().is_none());
    let l = &q.limits().unwrap()[0];
    assert_eq!((l.running, l.remaining, l.waiting), (2, 0, 1));
    assert!(c1.succeed(&0).unwrap());
    let c4 = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(c4.task.kind, "pdf");
    assert!(testing::claim_next(&q).unwrap().is_none());
    // A failure that goes back to Pending frees the slot too.
    assert!(c2.fail(TaskError::transient("x", "y")).unwrap());
    assert!(c3.succeed(&0).unwrap());
    assert!(c4.succeed(&0).unwrap());
}

/// Claim-ahead obeys concurrency limits: a task claimed ahead counts as running while it waits
/// (the limit is never exceeded), and releasing it on a graceful stop frees its slot.
fn claim_ahead_counts_against_concurrency_limits(h: &dyn Harness) {
    let (q, _clock) = open(h);
    q.set_limit(LimitScope::kind("pdf"), Limit::new().concurrency(2))
        .unwrap();
    let (started_tx, started) = crossbeam_channel::bounded::<()>(1);
    let (gate_tx, gate) = crossbeam_channel::bounded::<()>(0);
    q.register_fn(
        "pdf",
        move |v: serde_json::Value, _ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            if v == json!(0) {
                let _ = started_tx.send(());
                let _ = gate.recv();
            }
            Ok(json!("ok"))
        },
    );
    enqueue(&q, "pdf", json!(0), EnqueueOptions::new().priority(10));
    let second = enqueue(&q, "pdf", json!(1), EnqueueOptions::new().priority(5));
    let third = enqueue(&q, "pdf", json!(2), EnqueueOptions::new());
    let events = q.subscribe();
    let pool = q.workers().concurrency(1).claim_ahead(4).start().unwrap();
    started.recv_timeout(Duration::from_secs(20)).unwrap();
    await_causes(&events, &Cause::Claimed, 2);
    // One started, one claimed ahead: the limit is full; the third waits, uncharged.
    let l = &q.limits().unwrap()[0];
    assert_eq!((l.running, l.waiting), (2, 1));
    let t = q.get(third).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Pending, 0));
    let stopper = std::thread::spawn(move || pool.stop());
    await_causes(&events, &Cause::Released, 1);
    drop(gate_tx);
    stopper.join().unwrap();
    let t = q.get(second).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Pending, 0));
    // Both slots are free again.
    let l = &q.limits().unwrap()[0];
    assert_eq!((l.running, l.remaining, l.waiting), (0, 2, 0));
    let a = testing::claim_next(&q).unwrap().unwrap();
    let b = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!((a.task.id, b.task.id), (second, third));
}

/// The starts counted in a window survive a restart: a restart cannot exceed N.
fn limits_survive_reopen(h: &dyn Harness) {
    let (q, clock) = open(h);
    q.set_limit(
        LimitScope::kind("k"),
        Limit::new().rate(2, Duration::from_secs(60)).concurrency(5),
    )
    .unwrap();
    flaky(&q, "k", "x", 0);
    for i in 0..4 {
        enqueue(&q, "k", json!(i), EnqueueOptions::new());
    }
    assert_eq!(testing::run_due(&q).unwrap().executions, 2);
    drop(q);
    clock.advance(Duration::from_secs(30));
    let q = h.reopen(&clock);
    flaky(&q, "k", "x", 0);
    assert_eq!(q.limits().unwrap()[0].started_in_window, 2);
    assert_eq!(testing::run_due(&q).unwrap().executions, 0);
    clock.advance(Duration::from_secs(30));
    assert_eq!(testing::run_due(&q).unwrap().executions, 2);
    assert!(q.check_consistency().unwrap().is_consistent());
}

// ----- schedules --------------------------------------------------------------------------------

fn scheduled_runs(q: &Queue) -> Vec<(Timestamp, String)> {
    let mut out: Vec<(Timestamp, String)> = q
        .list(&ListFilter::new().limit(1000))
        .unwrap()
        .tasks
        .iter()
        .filter_map(|t| {
            q.extras(t.id)
                .unwrap()
                .and_then(|e| e.scheduled)
                .map(|s| (s.at, s.schedule))
        })
        .collect();
    out.sort();
    out
}

/// Each tick fires exactly once, however often the ticker asks; the task carries its tick.
fn schedule_fires_once_per_tick(h: &dyn Harness) {
    let (q, clock) = open(h);
    let t0 = clock.now();
    assert!(q
        .schedule_json(
            "every-minute",
            Spec::every(Duration::from_secs(60)),
            Missed::Skip,
            "tick",
            &json!({"x": 1}),
            EnqueueOptions::new().queue("cron"),
        )
        .unwrap());
    assert!(q.fire_due_schedules().unwrap().is_empty());
    for minute in 1..=5u64 {
        clock.advance(Duration::from_secs(30));
        assert!(q.fire_due_schedules().unwrap().is_empty());
        clock.advance(Duration::from_secs(30));
        let fired = q.fire_due_schedules().unwrap();
        assert_eq!(fired.len(), 1, "minute {minute}");
        assert!(q.fire_due_schedules().unwrap().is_empty(), "not twice");
        let t = q.get(fired[0]).unwrap().unwrap();
        assert_eq!(t.next_run_at, t0.plus(Duration::from_secs(60 * minute)));
        assert_eq!(t.queue, "cron");
    }
    let s = &q.schedules().unwrap()[0];
    assert_eq!((s.fired, s.skipped), (5, 0));
    assert_eq!(s.next_tick(), Some(t0.plus(Duration::from_secs(360))));
    assert_eq!(scheduled_runs(&q).len(), 5);
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// Ticks missed while the program was down follow the schedule's policy.
fn schedule_missed_ticks_after_restart(h: &dyn Harness) {
    let (q, clock) = open(h);
    let every = Spec::every(Duration::from_secs(60));
    for (name, missed) in [
        ("skip", Missed::Skip),
        ("once", Missed::RunOnce),
        ("three", Missed::CatchUp(3)),
    ] {
        q.schedule_json(
            name,
            every.clone(),
            missed,
            "t",
            &json!(name),
            EnqueueOptions::new(),
        )
        .unwrap();
    }
    drop(q);
    // Down for 10 minutes and 5 seconds: 10 ticks owed, the last one 5 s ago.
    clock.advance(Duration::from_secs(605));
    let q = h.reopen(&clock);
    q.fire_due_schedules().unwrap();
    let runs = scheduled_runs(&q);
    let count = |n: &str| runs.iter().filter(|(_, s)| s == n).count();
    assert_eq!((count("skip"), count("once"), count("three")), (1, 1, 3));
    let skipped: Vec<(String, u64, u64)> = q
        .schedules()
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.fired, s.skipped))
        .collect();
    assert_eq!(
        skipped,
        vec![
            ("once".to_string(), 1, 9),
            ("skip".to_string(), 1, 9),
            ("three".to_string(), 3, 7),
        ]
    );
    // A daily schedule down for two days, restarted 2 minutes after its tick: `Skip` fires
    // nothing (the latest tick is more than a minute late), `RunOnce` fires one.
    for (name, missed) in [
        ("daily-skip", Missed::Skip),
        ("daily-once", Missed::RunOnce),
    ] {
        q.schedule_json(
            name,
            Spec::every(Duration::from_secs(86_400)),
            missed,
            "t",
            &json!(name),
            EnqueueOptions::new(),
        )
        .unwrap();
    }
    drop(q);
    clock.advance(Duration::from_secs(2 * 86_400 + 120));
    let q = h.reopen(&clock);
    q.fire_due_schedules().unwrap();
    let runs = scheduled_runs(&q);
    assert_eq!(runs.iter().filter(|(_, s)| s == "daily-skip").count(), 0);
    assert_eq!(runs.iter().filter(|(_, s)| s == "daily-once").count(), 1);
    let s = q.schedules().unwrap();
    let daily = s.iter().find(|s| s.name == "daily-skip").unwrap();
    assert_eq!((daily.fired, daily.skipped), (0, 2));
}

/// Daylight saving with a fixed zone and the manual clock: a 02:30 job on the spring-forward
/// day fires once at 03:00 EDT; a 01:30 job on the fall-back day fires once.
fn schedule_daylight_saving(h: &dyn Harness) {
    let (q, clock) = open(h);
    let utc = |s: &str| Timestamp::from_system_time(humantime::parse_rfc3339(s).unwrap());
    clock.set(utc("2026-03-07T12:00:00Z"));
    q.schedule_json(
        "gap",
        Spec::cron("30 2 * * *", "America/New_York").unwrap(),
        Missed::CatchUp(10),
        "t",
        &json!(1),
        EnqueueOptions::new(),
    )
    .unwrap();
    q.schedule_json(
        "overlap",
        Spec::cron("30 1 * * *", "America/New_York").unwrap(),
        Missed::CatchUp(10),
        "t",
        &json!(2),
        EnqueueOptions::new(),
    )
    .unwrap();
    // Minute by minute through the spring-forward night.
    while clock.now() < utc("2026-03-08T12:00:00Z") {
        clock.advance(Duration::from_secs(60));
        q.fire_due_schedules().unwrap();
    }
    let gap: Vec<Timestamp> = scheduled_runs(&q)
        .into_iter()
        .filter(|(_, s)| s == "gap")
        .map(|(t, _)| t)
        .collect();
    assert_eq!(gap, vec![utc("2026-03-08T07:00:00Z")]);
    // And through the fall-back night (01:30 EDT = 05:30 UTC; 01:30 EST is not a second run).
    clock.set(utc("2026-10-31T12:00:00Z"));
    q.pause_schedule("overlap").unwrap();
    q.resume_schedule("overlap").unwrap();
    while clock.now() < utc("2026-11-01T12:00:00Z") {
        clock.advance(Duration::from_secs(60));
        q.fire_due_schedules().unwrap();
    }
    let overlap: Vec<Timestamp> = scheduled_runs(&q)
        .into_iter()
        .filter(|(t, s)| s == "overlap" && *t > utc("2026-10-31T12:00:00Z"))
        .map(|(t, _)| t)
        .collect();
    assert_eq!(overlap, vec![utc("2026-11-01T05:30:00Z")]);
}

/// Update keeps when it last fired; pause fires nothing and resume skips the pause's ticks;
/// remove stops it; a unique key on the scheduled task skips a tick while the previous run is
/// still live.
fn schedule_update_pause_remove_unique(h: &dyn Harness) {
    let (q, clock) = open(h);
    let every = |s| Spec::every(Duration::from_secs(s));
    q.schedule_json(
        "s",
        every(60),
        Missed::Skip,
        "t",
        &json!(1),
        EnqueueOptions::new(),
    )
    .unwrap();
    clock.advance(Duration::from_secs(60));
    assert_eq!(q.fire_due_schedules().unwrap().len(), 1);
    assert!(!q
        .schedule_json(
            "s",
            every(120),
            Missed::Skip,
            "t",
            &json!(2),
            EnqueueOptions::new()
        )
        .unwrap());
    clock.advance(Duration::from_secs(60));
    assert!(
        q.fire_due_schedules().unwrap().is_empty(),
        "next tick is 120 s after the last"
    );
    clock.advance(Duration::from_secs(60));
    let fired = q.fire_due_schedules().unwrap();
    assert_eq!(q.get(fired[0]).unwrap().unwrap().payload_json(), json!(2));
    q.pause_schedule("s").unwrap();
    clock.advance(Duration::from_secs(600));
    assert!(q.fire_due_schedules().unwrap().is_empty());
    assert_eq!(q.schedules().unwrap()[0].next_tick(), None);
    q.resume_schedule("s").unwrap();
    assert!(
        q.fire_due_schedules().unwrap().is_empty(),
        "the pause's ticks are skipped"
    );
    clock.advance(Duration::from_secs(120));
    assert_eq!(q.fire_due_schedules().unwrap().len(), 1);
    assert!(q.remove_schedule("s").unwrap());
    assert!(!q.remove_schedule("s").unwrap());
    assert!(matches!(
        q.pause_schedule("s"),
        Err(Error::NoSuchSchedule { .. })
    ));
    clock.advance(Duration::from_secs(600));
    assert!(q.fire_due_schedules().unwrap().is_empty());

    q.schedule_json(
        "u",
        every(60),
        Missed::Skip,
        "t",
        &json!(3),
        EnqueueOptions::new().unique(Unique::by_args()),
    )
    .unwrap();
    clock.advance(Duration::from_secs(60));
    let first = q.fire_due_schedules().unwrap();
    assert_eq!(first.len(), 1);
    clock.advance(Duration::from_secs(60));
    assert!(
        q.fire_due_schedules().unwrap().is_empty(),
        "previous run still pending"
    );
    let s = q
        .schedules()
        .unwrap()
        .into_iter()
        .find(|s| s.name == "u")
        .unwrap();
    assert_eq!((s.fired, s.skipped), (1, 1));
    assert!(q.check_consistency().unwrap().is_consistent());
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
            fn claim_ahead_release_on_graceful_stop_charges_nothing() {
                super::claim_ahead_release_on_graceful_stop_charges_nothing(&$harness);
            }
            #[test]
            fn claim_ahead_crash_charges_each_one_crash() {
                super::claim_ahead_crash_charges_each_one_crash(&$harness);
            }
            #[test]
            fn claim_ahead_cancel_before_start() {
                super::claim_ahead_cancel_before_start(&$harness);
            }
            #[test]
            fn claim_ahead_stop_returns_after_outcomes_commit() {
                super::claim_ahead_stop_returns_after_outcomes_commit(&$harness);
            }
            #[test]
            fn claim_ahead_keeps_finishes_fenced() {
                super::claim_ahead_keeps_finishes_fenced(&$harness);
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
            fn pause_holds_claims_and_charges_nothing() {
                super::pause_holds_claims_and_charges_nothing(&$harness);
            }
            #[test]
            fn backoff_configuration() {
                super::backoff_configuration(&$harness);
            }
        }
    };
}

/// Unique keys, limits and schedules (issue 11): the same contract on every backend
/// (`Backend::insert_new`, `set_limit`, `put_schedule`, `tick`...; see ARCHITECTURE.md for how
/// SQL enforces them).
macro_rules! rules_contract_suite {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            use super::*;

            #[test]
            fn unique_refuses_duplicates_until_released() {
                super::unique_refuses_duplicates_until_released(&$harness);
            }
            #[test]
            fn unique_hold_states_and_purge() {
                super::unique_hold_states_and_purge(&$harness);
            }
            #[test]
            fn unique_period() {
                super::unique_period(&$harness);
            }
            #[test]
            fn unique_in_enqueue_many() {
                super::unique_in_enqueue_many(&$harness);
            }
            #[test]
            fn unique_racing_producers_insert_one() {
                super::unique_racing_producers_insert_one(&$harness);
            }
            #[test]
            fn unique_manual_retry_conflict() {
                super::unique_manual_retry_conflict(&$harness);
            }
            #[test]
            fn unique_survives_reopen() {
                super::unique_survives_reopen(&$harness);
            }
            #[test]
            fn unique_and_limits_after_a_crash() {
                super::unique_and_limits_after_a_crash(&$harness);
            }
            #[test]
            fn rate_limit_window() {
                super::rate_limit_window(&$harness);
            }
            #[test]
            fn concurrency_limits() {
                super::concurrency_limits(&$harness);
            }
            #[test]
            fn limits_survive_reopen() {
                super::limits_survive_reopen(&$harness);
            }
            #[test]
            fn claim_ahead_counts_against_concurrency_limits() {
                super::claim_ahead_counts_against_concurrency_limits(&$harness);
            }
            #[test]
            fn schedule_fires_once_per_tick() {
                super::schedule_fires_once_per_tick(&$harness);
            }
            #[test]
            fn schedule_missed_ticks_after_restart() {
                super::schedule_missed_ticks_after_restart(&$harness);
            }
            #[test]
            fn schedule_daylight_saving() {
                super::schedule_daylight_saving(&$harness);
            }
            #[test]
            fn schedule_update_pause_remove_unique() {
                super::schedule_update_pause_remove_unique(&$harness);
            }
        }
    };
}

contract_suite!(sled, Sled::new());
rules_contract_suite!(sled_rules, Sled::new());
// Skipped (the test returns) only when the server is unreachable and CI is unset.
#[cfg(feature = "postgres")]
contract_suite!(
    postgres,
    match common::pg::PgSchema::new("contract") {
        Some(s) => Pg(s),
        None => return,
    }
);
#[cfg(feature = "postgres")]
rules_contract_suite!(
    postgres_rules,
    match common::pg::PgSchema::new("contract_rules") {
        Some(s) => Pg(s),
        None => return,
    }
);
