//! The retry rules of design.md section 1, checked against a plain in-memory model.
//!
//! Every case opens a fresh queue on a [`ManualClock`] with seeded jitter, enqueues one task
//! whose handler follows a random *script* of outcomes (success, transient failure, permanent
//! failure, panic, timeout — one per attempt), and drives it to a terminal state through the
//! public `omniq::testing` driver: either `run_until_idle`, or step by step with a random mix of
//! `claim_next` + `Claimed::{succeed, fail, run}` and `run_due`. The model says how many
//! executions must happen and how the task must end; the engine's record, error history, log
//! and backoff delays must agree.
//!
//! The last test runs the tutorial's backoff table through the real commit path.

mod common;

use std::time::Duration;

use omniq::testing::{self, ManualClock};
use omniq::{Backoff, Cause, EnqueueOptions, Queue, Status, TaskError, TaskInfo, Timestamp};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What one execution of the scripted handler does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Outcome {
    Success,
    Transient,
    Permanent,
    Panic,
    Timeout,
}

/// How the step driver runs one execution.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// `claim_next`, then `Claimed::succeed` / `Claimed::fail` with the scripted outcome
    /// (panics and timeouts need the handler, so they go through `run_due`).
    Direct,
    /// `claim_next`, then `Claimed::run` (the handler runs; timeouts go through `run_due`).
    ClaimRun,
    /// `run_due` (the handler runs; a timeout is detected by the driver).
    RunDue,
}

#[derive(Clone, Debug)]
enum Drive {
    Idle,
    Steps(Vec<Step>),
}

const KIND: &str = "scripted";
/// Every task gets this timeout; a `Timeout` outcome advances the clock past it.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest script needed: max_retries <= 6 allows at most 7 executions.
const SCRIPT_LEN: usize = 7;

fn expected_error_type(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => unreachable!("a success records no error"),
        Outcome::Transient => "network",
        Outcome::Permanent => "invalid",
        Outcome::Panic => "panic",
        Outcome::Timeout => "timeout",
    }
}

/// The model: the retry rule written plainly. Returns (executions, final status).
fn model(script: &[Outcome], max_retries: u32) -> (u32, Status) {
    let mut attempts = 0;
    for &o in script {
        attempts += 1;
        match o {
            Outcome::Success => return (attempts, Status::Completed),
            Outcome::Permanent => return (attempts, Status::Failed),
            // Transient, panic and timeout: retried while retries remain.
            _ if attempts > max_retries => return (attempts, Status::Failed),
            _ => {}
        }
    }
    panic!("script too short for max_retries {max_retries}");
}

fn open(dir: &std::path::Path, clock: &ManualClock, seed: u64) -> Queue {
    let q = Queue::builder(dir)
        .clock(clock.clone())
        .jitter_seed(seed)
        .open()
        .unwrap();
    let c = clock.clone();
    q.register_fn(KIND, move |payload, ctx| {
        let script: Vec<Outcome> = serde_json::from_value(payload["script"].clone()).unwrap();
        let a = ctx.attempt();
        match script[a as usize - 1] {
            Outcome::Success => Ok(json!(format!("ok on attempt {a}"))),
            Outcome::Transient => Err(TaskError::transient(
                "network",
                format!("attempt {a} lost the network"),
            )),
            Outcome::Permanent => Err(TaskError::permanent(
                "invalid",
                format!("attempt {a} found bad input"),
            )),
            Outcome::Panic => panic!("scripted panic on attempt {a}"),
            Outcome::Timeout => {
                // A slow handler: time passes beyond its deadline while it runs. Its result
                // must be discarded.
                c.advance(TIMEOUT + Duration::from_secs(1));
                Ok(json!("too late"))
            }
        }
    });
    q
}

fn effective_backoff(t: &TaskInfo) -> Backoff {
    t.backoff.unwrap_or_default()
}

/// Drives the task step by step; returns the number of executions. Checks every backoff as it
/// is scheduled.
fn drive_steps(
    q: &Queue,
    clock: &ManualClock,
    id: omniq::TaskId,
    script: &[Outcome],
    steps: &[Step],
) -> u32 {
    let mut executions = 0u32;
    loop {
        let t = q.get(id).unwrap().unwrap();
        if t.status.is_terminal() {
            return executions;
        }
        assert_eq!(
            t.status,
            Status::Pending,
            "between executions the task is Pending"
        );
        assert!(
            executions <= t.max_retries,
            "a task may not be offered more than max_retries + 1 times"
        );
        if t.attempts > 0 {
            // An intermediate failure: last_error set, next run in the future, within bounds.
            let err = t
                .last_error
                .as_ref()
                .expect("a retried task carries its last error");
            let delay = t.next_run_at.0 - err.timestamp.0;
            let (lo, hi) = effective_backoff(&t).bounds_ms(t.attempts);
            assert!(
                (lo..=hi).contains(&delay),
                "backoff before retry {} was {delay} ms, outside {lo}..={hi}",
                t.attempts
            );
            assert!(
                t.next_run_at > clock.now(),
                "a retry is scheduled in the future"
            );
            assert!(
                testing::claim_next(q).unwrap().is_none(),
                "not claimable before its backoff"
            );
        }
        let at = testing::next_due_at(q).unwrap().unwrap_or(clock.now());
        clock.set(at.max(clock.now()));
        let outcome = script[t.attempts as usize];
        let step = steps[executions as usize % steps.len()];
        let attempt = match (step, outcome) {
            (Step::RunDue, _) | (_, Outcome::Timeout) | (Step::Direct, Outcome::Panic) => {
                let r = testing::run_due(q).unwrap();
                assert_eq!(r.executions, 1, "exactly one task is due");
                assert_eq!(r.log[0].id, id);
                r.log[0].attempt
            }
            (Step::Direct, o) => {
                let c = testing::claim_next(q).unwrap().expect("the task is due");
                assert_eq!(c.task.status, Status::Running);
                let attempt = c.task.attempts;
                let applied = match o {
                    Outcome::Success => c.succeed(&format!("ok on attempt {attempt}")).unwrap(),
                    Outcome::Transient => c
                        .fail(TaskError::transient(
                            "network",
                            format!("attempt {attempt} lost the network"),
                        ))
                        .unwrap(),
                    Outcome::Permanent => c
                        .fail(TaskError::permanent(
                            "invalid",
                            format!("attempt {attempt} found bad input"),
                        ))
                        .unwrap(),
                    Outcome::Panic | Outcome::Timeout => unreachable!(),
                };
                assert!(applied, "the current attempt's outcome is applied");
                attempt
            }
            (Step::ClaimRun, _) => {
                let c = testing::claim_next(q).unwrap().expect("the task is due");
                c.run().unwrap().attempt
            }
        };
        executions += 1;
        assert_eq!(
            attempt, executions,
            "attempt numbers count executions from 1"
        );
    }
}

fn check_case(
    max_retries: u32,
    script: Vec<Outcome>,
    backoff: Option<Backoff>,
    drive: Drive,
    seed: u64,
) {
    common::quiet_panics("scripted panic");
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000));
    let q = open(dir.path(), &clock, seed);
    let mut opts = EnqueueOptions::new()
        .max_retries(max_retries)
        .timeout(TIMEOUT);
    if let Some(b) = backoff {
        opts = opts.backoff(b);
    }
    let id = q
        .enqueue_json(KIND, &json!({ "script": script }), opts)
        .unwrap();

    let executions = match &drive {
        Drive::Idle => {
            let r = testing::run_until_idle(&q, &clock, 1_000).unwrap();
            for (i, e) in r.log.iter().enumerate() {
                assert_eq!(e.id, id);
                assert_eq!(e.attempt, i as u32 + 1);
            }
            r.executions as u32
        }
        Drive::Steps(steps) => drive_steps(&q, &clock, id, &script, steps),
    };

    let (want_executions, want_status) = model(&script, max_retries);
    let t = q.get(id).unwrap().unwrap();
    assert!(
        executions <= max_retries + 1,
        "{executions} executions with max_retries {max_retries}"
    );
    assert_eq!(executions, want_executions, "executions");
    assert_eq!(t.attempts, executions, "attempts equals executions");
    assert_eq!(t.status, want_status, "final status");
    assert!(t.finished_at.is_some());

    // Completed iff some execution succeeded; the result is the successful one's, never a
    // timed-out execution's late value.
    let ran = &script[..executions as usize];
    let succeeded = ran.contains(&Outcome::Success);
    assert_eq!(t.status == Status::Completed, succeeded);
    if succeeded {
        assert_eq!(
            t.result::<String>().unwrap().unwrap(),
            format!("ok on attempt {executions}")
        );
    } else {
        assert!(t.result.is_none());
        let last = t
            .last_error
            .as_ref()
            .expect("a failed task has a last error");
        assert_eq!(last.error_type, expected_error_type(*ran.last().unwrap()));
    }

    // Error history: one record per failed execution, retry_count 0, 1, 2, ..., right types.
    let failures: Vec<Outcome> = ran
        .iter()
        .copied()
        .filter(|o| *o != Outcome::Success)
        .collect();
    assert_eq!(t.errors.len(), failures.len());
    for (i, (e, o)) in t.errors.iter().zip(&failures).enumerate() {
        assert_eq!(e.retry_count, i as u32, "retry_count of failure {i}");
        assert_eq!(e.error_type, expected_error_type(*o));
        assert_eq!(e.permanent, *o == Outcome::Permanent);
        if *o == Outcome::Panic {
            assert!(
                e.message
                    .contains(&format!("scripted panic on attempt {}", i + 1)),
                "{}",
                e.message
            );
        }
    }
    assert_eq!(t.last_error.as_ref(), t.errors.last());

    // The log: Enqueued, then (Claimed, outcome) per execution; claims == attempts; every
    // retry delay (claim time - failure time) within the jitter bounds when run_until_idle
    // jumped the clock straight to the due time.
    let h = q.history(id).unwrap();
    assert_eq!(h.len(), 1 + 2 * executions as usize);
    assert_eq!(h[0].cause, Cause::Enqueued);
    let claims = h.iter().filter(|e| e.cause == Cause::Claimed).count();
    assert_eq!(
        claims as u32, t.attempts,
        "attempts equals the claims in the log"
    );
    for k in 0..executions as usize {
        let claim = &h[1 + 2 * k];
        let end = &h[2 + 2 * k];
        assert_eq!(
            (claim.cause.clone(), claim.to, claim.attempt),
            (Cause::Claimed, Status::Running, k as u32 + 1)
        );
        match (ran[k], &end.cause) {
            (Outcome::Success, Cause::Succeeded) => assert_eq!(end.to, Status::Completed),
            (
                o,
                Cause::Failed {
                    error_type,
                    permanent,
                },
            ) => {
                assert_eq!(error_type, expected_error_type(o));
                assert_eq!(*permanent, o == Outcome::Permanent);
            }
            (o, c) => panic!("execution {} was {o:?} but the log says {c:?}", k + 1),
        }
        if k + 1 < executions as usize {
            assert_eq!(
                end.to,
                Status::Pending,
                "an intermediate failure never looks final"
            );
            if matches!(drive, Drive::Idle) {
                let delay = h[3 + 2 * k].at.0 - end.at.0;
                let (lo, hi) = effective_backoff(&t).bounds_ms(k as u32 + 1);
                assert!(
                    (lo..=hi).contains(&delay),
                    "retry {} after {delay} ms, outside {lo}..={hi}",
                    k + 1
                );
            }
        } else {
            assert_eq!(end.to, want_status);
        }
    }

    let report = q.check_consistency().unwrap();
    assert!(report.is_consistent(), "{:?}", report.problems);
    // Terminal tasks are never claimed again.
    assert!(testing::claim_next(&q).unwrap().is_none());
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(testing::run_due(&q).unwrap().executions, 0);
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        2 => Just(Outcome::Success),
        4 => Just(Outcome::Transient),
        1 => Just(Outcome::Permanent),
        2 => Just(Outcome::Panic),
        2 => Just(Outcome::Timeout),
    ]
}

fn backoff() -> impl Strategy<Value = Option<Backoff>> {
    prop_oneof![
        Just(None),
        // Delays of at least 1 ms, so a retry is never due at the instant it is scheduled.
        (10u64..5_000, 10u64..120_000, 0.0f64..0.9).prop_map(|(base, cap, jitter)| Some(
            Backoff::new(
                Duration::from_millis(base),
                Duration::from_millis(cap),
                jitter
            )
        )),
    ]
}

fn drive() -> impl Strategy<Value = Drive> {
    let step = prop_oneof![Just(Step::Direct), Just(Step::ClaimRun), Just(Step::RunDue)];
    prop_oneof![
        Just(Drive::Idle),
        prop::collection::vec(step, 1..8).prop_map(Drive::Steps)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn retry_rules_match_the_model(
        max_retries in 0u32..=6,
        script in prop::collection::vec(outcome(), SCRIPT_LEN),
        backoff in backoff(),
        drive in drive(),
        seed in any::<u64>(),
    ) {
        check_case(max_retries, script, backoff, drive, seed);
    }
}

/// The edge cases of the budget, spelled out (the property test covers them too, by chance).
#[test]
fn budget_edges() {
    use Outcome::*;
    let all_fail = vec![Transient; SCRIPT_LEN];
    for max in 0..=6 {
        check_case(max, all_fail.clone(), None, Drive::Idle, 1);
        check_case(
            max,
            all_fail.clone(),
            None,
            Drive::Steps(vec![Step::Direct]),
            2,
        );
    }
    // max_retries = 0: one execution, even for a transient error.
    assert_eq!(model(&[Transient, Success], 0), (1, Status::Failed));
    check_case(
        0,
        vec![
            Transient, Success, Success, Success, Success, Success, Success,
        ],
        None,
        Drive::Idle,
        3,
    );
    // The last allowed execution may still succeed.
    let mut s = vec![Timeout, Panic, Transient, Success];
    s.resize(SCRIPT_LEN, Success);
    assert_eq!(model(&s, 3), (4, Status::Completed));
    check_case(
        3,
        s,
        None,
        Drive::Steps(vec![Step::RunDue, Step::ClaimRun]),
        4,
    );
    // A permanent error stops at once whatever the budget.
    let mut p = vec![Transient, Permanent];
    p.resize(SCRIPT_LEN, Success);
    check_case(6, p, None, Drive::Idle, 5);
}

/// The tutorial's table, through the real engine: fail a task with `max_retries = 10` and the
/// default backoff; delay n must be in the table's range (retry 7 and later: 45-75 s).
#[test]
fn tutorial_backoff_table() {
    const TABLE_MS: [(u64, u64); 7] = [
        (750, 1_250),
        (1_500, 2_500),
        (3_000, 5_000),
        (6_000, 10_000),
        (12_000, 20_000),
        (24_000, 40_000),
        (45_000, 75_000),
    ];
    let mut schedules = Vec::new();
    for seed in [1u64, 2, 3, 1] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Timestamp(1_700_000_000_000));
        let q = Queue::builder(dir.path())
            .clock(clock.clone())
            .jitter_seed(seed)
            .open()
            .unwrap();
        let id = q
            .enqueue_json("flaky", &json!(null), EnqueueOptions::new().max_retries(10))
            .unwrap();
        let mut delays = Vec::new();
        for execution in 1..=11u32 {
            let at = testing::next_due_at(&q).unwrap().unwrap_or(clock.now());
            clock.set(at.max(clock.now()));
            let c = testing::claim_next(&q).unwrap().expect("due");
            assert_eq!(c.task.attempts, execution);
            assert!(c
                .fail(TaskError::transient("network", "unreachable"))
                .unwrap());
            let t = q.get(id).unwrap().unwrap();
            if execution <= 10 {
                assert_eq!(t.status, Status::Pending, "retry {execution} is scheduled");
                let delay = t.next_run_at.0 - t.last_error.as_ref().unwrap().timestamp.0;
                let (lo, hi) = TABLE_MS[(execution as usize - 1).min(6)];
                assert!(
                    (lo..=hi).contains(&delay),
                    "delay before retry {execution}: {delay} ms, table says {lo}..={hi}"
                );
                delays.push(delay);
            } else {
                assert_eq!(
                    t.status,
                    Status::Failed,
                    "11 executions spend a budget of 10 retries"
                );
                assert_eq!(t.attempts, 11);
                let counts: Vec<u32> = t.errors.iter().map(|e| e.retry_count).collect();
                assert_eq!(counts, (0..11).collect::<Vec<_>>());
            }
        }
        assert!(testing::claim_next(&q).unwrap().is_none());
        schedules.push(delays);
    }
    // The same seed gives the same schedule; different seeds give different jitter.
    assert_eq!(schedules[0], schedules[3]);
    assert_ne!(schedules[0], schedules[1]);
    assert_ne!(schedules[1], schedules[2]);
}
