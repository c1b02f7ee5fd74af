//! Model-based property test (design.md section 5).
//!
//! Random sequences of operations — enqueue (random budget, priority, delay), claim, succeed,
//! fail transient, fail permanent, panic, run-due with a behaviour (success, transient, panic,
//! timeout), crash + reopen, clock advance, cancel and manual retry — are applied both to a real
//! queue (driven through `omniq::testing` on a `ManualClock`) and to a plain in-memory model.
//! After every step the two must agree:
//!
//! - every task's status, attempts and (for Pending tasks) due time match the model;
//! - `attempts <= max_retries + 1`, and `attempts` equals the claims in the log since the last
//!   manual retry (each manual retry opens a new budget round);
//! - `check_consistency()` finds no problem and the per-status counters match the model;
//! - a terminal task is never claimed again (in the log, a terminal state is followed only by a
//!   manual retry of a Failed/Cancelled task);
//! - every retry's backoff (due time - failure time) is within `Backoff::bounds_ms(attempts)`;
//! - claims come in order: priority desc, then `next_run_at`, then enqueue order;
//! - cancel works only on Pending tasks and manual retry only on Failed/Cancelled ones; any
//!   other state gives `Error::InvalidState` and changes nothing;
//! - a crash (claimed tasks abandoned, every `Queue` clone dropped, the directory reopened with
//!   the same clock) charges each orphan a `"crash"` failure under the ordinary rule, and the
//!   recovery report counts them.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use omniq::retry::{decide, Decision};
use omniq::testing::{self, Claimed, ManualClock};
use omniq::{Backoff, Cause, EnqueueOptions, Error, Queue, Status, TaskError, TaskId, Timestamp};
use parking_lot::Mutex;
use proptest::prelude::*;
use serde_json::json;

const KIND: &str = "model";
/// Every task's timeout; a `Timeout` behaviour advances the clock by `SLOW` inside the handler.
const TIMEOUT: Duration = Duration::from_millis(5);
const SLOW: Duration = Duration::from_millis(10);
/// At most this many tasks per case: one `run_due` then advances the clock by at most
/// `MAX_TASKS * SLOW` = 120 ms, less than the smallest default backoff (750 ms), so a task
/// retried inside one `run_due` never becomes due again in the same call.
const MAX_TASKS: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behavior {
    Succeed,
    Transient,
    Panic,
    Timeout,
}

#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        max_retries: u32,
        priority: i8,
        delay_ms: u64,
    },
    Claim,
    Succeed(usize),
    FailTransient(usize),
    FailPermanent(usize),
    PanicHeld(usize),
    RunDue(Behavior),
    CrashReopen,
    Advance(u64),
    Cancel(usize),
    Retry(usize),
    /// Rewrites the store into a new sled generation (held claims stay valid).
    Compact,
}

#[derive(Clone, Debug)]
struct MTask {
    id: TaskId,
    /// Enqueue order.
    seq: usize,
    max_retries: u32,
    priority: i8,
    status: Status,
    attempts: u32,
    next_run_at: Timestamp,
    last_error_type: Option<String>,
}

#[derive(Default)]
struct Model {
    tasks: Vec<MTask>,
}

impl Model {
    fn get(&mut self, id: TaskId) -> &mut MTask {
        self.tasks
            .iter_mut()
            .find(|t| t.id == id)
            .expect("task in model")
    }

    /// The task a claimer must pick at `now`: priority desc, then due time, then enqueue order.
    fn best_due(&self, now: Timestamp, exclude: &HashSet<TaskId>) -> Option<TaskId> {
        self.tasks
            .iter()
            .filter(|t| {
                t.status == Status::Pending && t.next_run_at <= now && !exclude.contains(&t.id)
            })
            .min_by_key(|t| (std::cmp::Reverse(t.priority), t.next_run_at, t.seq))
            .map(|t| t.id)
    }
}

struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    behavior: Arc<Mutex<Behavior>>,
    queue: Option<Queue>,
    held: Vec<Claimed>,
    model: Model,
    opens: u64,
}

impl Harness {
    fn new() -> Harness {
        common::quiet_panics("model panic");
        let mut h = Harness {
            dir: tempfile::tempdir().unwrap(),
            clock: ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000)),
            behavior: Arc::new(Mutex::new(Behavior::Succeed)),
            queue: None,
            held: Vec::new(),
            model: Model::default(),
            opens: 0,
        };
        h.open();
        h
    }

    fn open(&mut self) {
        self.opens += 1;
        let q = Queue::builder(self.dir.path())
            .clock(self.clock.clone())
            .jitter_seed(self.opens)
            .open()
            .unwrap();
        let behavior = self.behavior.clone();
        let clock = self.clock.clone();
        q.register_fn(KIND, move |_, ctx| {
            let b = *behavior.lock();
            match b {
                Behavior::Succeed => Ok(json!(ctx.attempt())),
                Behavior::Transient => Err(TaskError::transient("network", "unreachable")),
                Behavior::Panic => panic!("model panic on attempt {}", ctx.attempt()),
                Behavior::Timeout => {
                    clock.advance(SLOW);
                    Ok(json!("too late"))
                }
            }
        });
        self.queue = Some(q);
    }

    fn q(&self) -> &Queue {
        self.queue.as_ref().unwrap()
    }

    /// The model's side of a failed execution of `id` (already counted); checks the engine's
    /// resulting record against the rule and the backoff bounds.
    fn model_fail(&mut self, id: TaskId, error_type: &str, permanent: bool) {
        let rec = self.q().get(id).unwrap().unwrap();
        let m = self.model.get(id);
        m.last_error_type = Some(error_type.to_string());
        match decide(m.attempts, m.max_retries, permanent) {
            Decision::Retry => {
                m.status = Status::Pending;
                assert_eq!(
                    rec.status,
                    Status::Pending,
                    "an intermediate failure goes back to Pending"
                );
                let err = rec.last_error.as_ref().unwrap();
                let delay = rec.next_run_at.0 - err.timestamp.0;
                let (lo, hi) = Backoff::default().bounds_ms(m.attempts);
                assert!(
                    (lo..=hi).contains(&delay),
                    "backoff {delay} ms before retry {} outside {lo}..={hi}",
                    m.attempts
                );
                m.next_run_at = rec.next_run_at;
            }
            Decision::Fail => m.status = Status::Failed,
        }
    }

    fn take_held(&mut self, i: usize) -> Option<Claimed> {
        if self.held.is_empty() {
            None
        } else {
            let i = i % self.held.len();
            Some(self.held.remove(i))
        }
    }

    fn pick(&self, i: usize) -> Option<TaskId> {
        if self.model.tasks.is_empty() {
            None
        } else {
            Some(self.model.tasks[i % self.model.tasks.len()].id)
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Enqueue {
                max_retries,
                priority,
                delay_ms,
            } => {
                if self.model.tasks.len() >= MAX_TASKS {
                    return;
                }
                let opts = EnqueueOptions::new()
                    .max_retries(max_retries)
                    .priority(priority)
                    .delay(Duration::from_millis(delay_ms))
                    .timeout(TIMEOUT);
                let now = self.clock.now();
                let id = self
                    .q()
                    .enqueue_json(KIND, &json!({ "n": self.model.tasks.len() }), opts)
                    .unwrap();
                let seq = self.model.tasks.len();
                self.model.tasks.push(MTask {
                    id,
                    seq,
                    max_retries,
                    priority,
                    status: Status::Pending,
                    attempts: 0,
                    next_run_at: Timestamp(now.0 + delay_ms),
                    last_error_type: None,
                });
            }
            Op::Claim => {
                let want = self.model.best_due(self.clock.now(), &HashSet::new());
                let got = testing::claim_next(self.q()).unwrap();
                assert_eq!(got.as_ref().map(|c| c.task.id), want, "claim order");
                if let Some(c) = got {
                    let m = self.model.get(c.task.id);
                    m.status = Status::Running;
                    m.attempts += 1;
                    assert_eq!(c.task.attempts, m.attempts);
                    assert_eq!(c.task.status, Status::Running);
                    self.held.push(c);
                }
            }
            Op::Succeed(i) => {
                if let Some(c) = self.take_held(i) {
                    let id = c.task.id;
                    assert!(
                        c.succeed(&"done").unwrap(),
                        "the current attempt's success is applied"
                    );
                    self.model.get(id).status = Status::Completed;
                }
            }
            Op::FailTransient(i) | Op::FailPermanent(i) => {
                if let Some(c) = self.take_held(i) {
                    let id = c.task.id;
                    let permanent = matches!(op, Op::FailPermanent(_));
                    let err = if permanent {
                        TaskError::permanent("invalid", "bad input")
                    } else {
                        TaskError::transient("network", "unreachable")
                    };
                    assert!(c.fail(err).unwrap());
                    self.model_fail(id, if permanent { "invalid" } else { "network" }, permanent);
                }
            }
            Op::PanicHeld(i) => {
                if let Some(c) = self.take_held(i) {
                    let id = c.task.id;
                    *self.behavior.lock() = Behavior::Panic;
                    let e = c.run().unwrap();
                    assert_eq!(e.outcome.as_ref().unwrap_err().error_type, "panic");
                    self.model_fail(id, "panic", false);
                }
            }
            Op::RunDue(b) => {
                *self.behavior.lock() = b;
                let start = self.clock.now();
                let report = testing::run_due(self.q()).unwrap();
                // Replay in the model: execution k starts at `start + k * SLOW` for a timeout
                // behaviour (each one advances the clock), at `start` otherwise.
                let mut ran = HashSet::new();
                for (k, e) in report.log.iter().enumerate() {
                    let now = if b == Behavior::Timeout {
                        Timestamp(start.0 + SLOW.as_millis() as u64 * k as u64)
                    } else {
                        start
                    };
                    let want = self.model.best_due(now, &ran);
                    assert_eq!(Some(e.id), want, "run_due execution {k} out of order");
                    ran.insert(e.id);
                    let m = self.model.get(e.id);
                    m.attempts += 1;
                    assert_eq!(e.attempt, m.attempts);
                    m.status = Status::Running;
                }
                let now = if b == Behavior::Timeout {
                    Timestamp(start.0 + SLOW.as_millis() as u64 * report.log.len() as u64)
                } else {
                    start
                };
                assert_eq!(self.clock.now(), now);
                assert_eq!(
                    self.model.best_due(now, &ran),
                    None,
                    "run_due left a due task unrun"
                );
                for e in &report.log {
                    match b {
                        Behavior::Succeed => {
                            assert!(e.outcome.is_ok());
                            self.model.get(e.id).status = Status::Completed;
                        }
                        Behavior::Transient => self.model_fail(e.id, "network", false),
                        Behavior::Panic => self.model_fail(e.id, "panic", false),
                        Behavior::Timeout => {
                            assert_eq!(e.outcome.as_ref().unwrap_err().error_type, "timeout");
                            self.model_fail(e.id, "timeout", false);
                        }
                    }
                }
            }
            Op::CrashReopen => {
                let orphans: Vec<TaskId> = self.held.iter().map(|c| c.task.id).collect();
                for c in self.held.drain(..) {
                    c.abandon();
                }
                // Every clone gone: the store closes and releases its lock.
                self.queue = None;
                self.open();
                let report = self.q().recovery_report().clone();
                assert_eq!(report.recovered, orphans.len(), "every orphan is recovered");
                let mut requeued = 0;
                for id in orphans {
                    let rec = self.q().get(id).unwrap().unwrap();
                    assert_eq!(rec.last_error.as_ref().unwrap().error_type, "crash");
                    self.model_fail(id, "crash", false);
                    if self.model.get(id).status == Status::Pending {
                        requeued += 1;
                    }
                }
                assert_eq!(report.requeued, requeued);
                assert_eq!(report.failed, report.recovered - requeued);
            }
            Op::Advance(ms) => self.clock.advance(Duration::from_millis(ms)),
            Op::Compact => {
                let r = self.q().compact().unwrap();
                assert!(r.compacted, "{r:?}");
            }
            Op::Cancel(i) | Op::Retry(i) => {
                let Some(id) = self.pick(i) else { return };
                let before = self.q().get(id).unwrap().unwrap();
                let log_before = self.q().history(id).unwrap().len();
                let cancel = matches!(op, Op::Cancel(_));
                let r = if cancel {
                    self.q().cancel(id)
                } else {
                    self.q().retry(id)
                };
                let m = self.model.get(id);
                let allowed = if cancel {
                    m.status == Status::Pending
                } else {
                    matches!(m.status, Status::Failed | Status::Cancelled)
                };
                if allowed {
                    let t = r.unwrap();
                    if cancel {
                        m.status = Status::Cancelled;
                    } else {
                        m.status = Status::Pending;
                        m.attempts = 0;
                        m.next_run_at = self.clock.now();
                    }
                    assert_eq!(t.status, m.status);
                } else {
                    match r {
                        Err(Error::InvalidState {
                            id: eid, status, ..
                        }) => {
                            assert_eq!(eid, id);
                            assert_eq!(status, m.status);
                        }
                        other => panic!("{op:?} on a {:?} task gave {other:?}", m.status),
                    }
                    assert_eq!(
                        self.q().get(id).unwrap().unwrap(),
                        before,
                        "a refused operation changes nothing"
                    );
                    assert_eq!(self.q().history(id).unwrap().len(), log_before);
                }
            }
        }
    }

    fn check(&self) {
        let q = self.q();
        let held: HashSet<TaskId> = self.held.iter().map(|c| c.task.id).collect();
        let mut counts = std::collections::BTreeMap::new();
        for m in &self.model.tasks {
            *counts.entry(m.status).or_insert(0u64) += 1;
            let t = q.get(m.id).unwrap().unwrap();
            assert_eq!(t.status, m.status, "status of task {}", m.seq);
            assert_eq!(t.attempts, m.attempts, "attempts of task {}", m.seq);
            assert!(
                t.attempts <= t.max_retries + 1,
                "task {} ran {} times with max_retries {}",
                m.seq,
                t.attempts,
                t.max_retries
            );
            assert_eq!(
                t.status == Status::Running,
                held.contains(&m.id),
                "Running iff held by the test"
            );
            if m.status == Status::Pending {
                assert_eq!(t.next_run_at, m.next_run_at, "due time of task {}", m.seq);
            }
            assert_eq!(
                t.last_error.as_ref().map(|e| e.error_type.clone()),
                m.last_error_type
            );

            // The log: claims since the last manual retry == attempts; a terminal state is
            // only ever left by a manual retry (never by a claim); per round, executions stay
            // within the budget.
            let h = q.history(m.id).unwrap();
            assert_eq!(h[0].cause, Cause::Enqueued);
            let mut round_claims = 0;
            for w in h.windows(2) {
                if w[0].to.is_terminal() {
                    assert_eq!(
                        w[1].cause,
                        Cause::ManualRetry,
                        "a terminal task moved by {:?}",
                        w[1].cause
                    );
                    assert_ne!(w[0].to, Status::Completed, "a completed task was retried");
                }
            }
            for e in &h {
                match e.cause {
                    Cause::ManualRetry => round_claims = 0,
                    Cause::Claimed => {
                        round_claims += 1;
                        assert!(
                            round_claims <= m.max_retries + 1,
                            "budget exceeded in a round"
                        );
                    }
                    _ => {}
                }
            }
            assert_eq!(
                round_claims, t.attempts,
                "attempts equals the claims in the log (this round)"
            );
            assert_eq!(h.last().unwrap().to, t.status);
            assert!(h.windows(2).all(|w| w[0].seq < w[1].seq));
        }
        let stats = q.stats().unwrap();
        for s in Status::ALL {
            assert_eq!(
                stats.count(s),
                counts.get(&s).copied().unwrap_or(0),
                "count of {s}"
            );
        }
        let report = q.check_consistency().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
    }
}

fn op() -> impl Strategy<Value = Op> {
    let behavior = prop_oneof![
        Just(Behavior::Succeed),
        Just(Behavior::Transient),
        Just(Behavior::Panic),
        Just(Behavior::Timeout),
    ];
    prop_oneof![
        4 => (0u32..=3, -2i8..=2, prop_oneof![Just(0u64), Just(0u64), 1u64..3_000])
            .prop_map(|(max_retries, priority, delay_ms)| Op::Enqueue { max_retries, priority, delay_ms }),
        4 => Just(Op::Claim),
        2 => any::<usize>().prop_map(Op::Succeed),
        3 => any::<usize>().prop_map(Op::FailTransient),
        1 => any::<usize>().prop_map(Op::FailPermanent),
        1 => any::<usize>().prop_map(Op::PanicHeld),
        3 => behavior.prop_map(Op::RunDue),
        1 => Just(Op::CrashReopen),
        3 => prop_oneof![Just(1u64), Just(100), Just(800), Just(2_000), Just(10_000), Just(75_000)].prop_map(Op::Advance),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::Retry),
        1 => Just(Op::Compact),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
            h.check();
        }
    }
}

/// One fixed scenario that touches every operation, so the invariants are exercised even if
/// the random cases happen to miss a path.
#[test]
fn scripted_scenario_covers_every_operation() {
    let mut h = Harness::new();
    let ops = [
        Op::Enqueue {
            max_retries: 1,
            priority: 0,
            delay_ms: 0,
        },
        Op::Enqueue {
            max_retries: 0,
            priority: 2,
            delay_ms: 0,
        },
        Op::Enqueue {
            max_retries: 3,
            priority: 0,
            delay_ms: 500,
        },
        Op::Enqueue {
            max_retries: 2,
            priority: -1,
            delay_ms: 0,
        },
        Op::Claim,       // priority 2 first
        Op::Claim,       // then the oldest priority 0 that is due
        Op::Compact,     // held claims finish in the new generation
        Op::Cancel(0),   // Running: refused
        Op::CrashReopen, // both orphans charged "crash"
        Op::Compact,
        Op::Retry(1), // task 1 (max_retries 0) failed by the crash: manual retry
        Op::Advance(2_000),
        Op::RunDue(Behavior::Timeout),
        Op::Claim,
        Op::PanicHeld(0),
        Op::Advance(75_000),
        Op::RunDue(Behavior::Transient),
        Op::Advance(75_000),
        Op::Claim,
        Op::FailPermanent(0),
        Op::Claim,
        Op::Succeed(0),
        Op::Cancel(3),
        Op::Retry(3),
        Op::Advance(75_000),
        Op::RunDue(Behavior::Succeed),
        Op::Retry(0),
        Op::RunDue(Behavior::Succeed),
    ];
    for op in &ops {
        h.apply(op);
        h.check();
    }
    // Everything ended somewhere terminal, and a crash really was recorded.
    let q = h.q();
    assert!(
        h.model.tasks.iter().all(|m| m.status.is_terminal()),
        "{:?}",
        h.model.tasks
    );
    let crashed = h
        .model
        .tasks
        .iter()
        .filter(|m| {
            q.get(m.id)
                .unwrap()
                .unwrap()
                .errors
                .iter()
                .any(|e| e.error_type == "crash")
        })
        .count();
    assert_eq!(crashed, 2);
}
