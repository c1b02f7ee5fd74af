//! The real threaded worker pool (design.md section 3, issue 3).
//!
//! Synchronisation is done with channels, condition variables, `queue.wait` and `subscribe`,
//! never with sleeps. Two tests run part of themselves in a child process (this same test
//! binary, re-executed with a filter and an environment variable): the grace-expiry test, because
//! an abandoned handler keeps the store open until the process ends, and the idle-CPU test,
//! because `getrusage(RUSAGE_SELF)` must not count the other tests' threads.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, TryRecvError};
use omniq::testing::{self, ManualClock};
use omniq::{
    Backoff, Cause, EnqueueOptions, Error, Queue, Status, Task, TaskContext, TaskError, TaskId,
};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use serde_json::json;

const CHILD_ENV: &str = "OMNIQ_WORKERS_CHILD";
const CHILD_DIR_ENV: &str = "OMNIQ_WORKERS_CHILD_DIR";
/// Generous upper bound for anything we wait on; tests normally finish far sooner.
const LONG: Duration = Duration::from_secs(30);

/// Retries a few milliseconds apart, so retry paths run quickly on a real clock.
fn fast_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(5), Duration::from_millis(20), 0.25)
}

fn open() -> (tempfile::TempDir, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    (dir, q)
}

/// Runs this test binary again with only `test` selected and `role` in the environment.
fn run_child(test: &str, role: &str, dir: &std::path::Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env(CHILD_DIR_ENV, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child {role} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn child_value<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.split_once(&format!("{key} ")).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("child printed no {key} line:\n{stdout}"))
}

/// N handlers that each wait (up to `LONG`) until all N are running at the same time.
struct Rendezvous {
    arrived: Mutex<usize>,
    cv: Condvar,
    need: usize,
}

impl Rendezvous {
    fn new(need: usize) -> Arc<Rendezvous> {
        Arc::new(Rendezvous {
            arrived: Mutex::new(0),
            cv: Condvar::new(),
            need,
        })
    }
    /// True if all `need` parties were present at once.
    fn meet(&self) -> bool {
        let mut n = self.arrived.lock();
        *n += 1;
        self.cv.notify_all();
        let deadline = Instant::now() + LONG;
        while *n < self.need {
            if self.cv.wait_until(&mut n, deadline).timed_out() {
                return false;
            }
        }
        true
    }
}

#[derive(Serialize, Deserialize)]
struct Work {
    n: u32,
}
impl Task for Work {
    const NAME: &'static str = "work";
    type Output = u32;
}

#[test]
fn no_task_runs_on_two_threads_and_concurrency_never_exceeds_n() {
    const N: usize = 4;
    let (_dir, q) = open();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Mutex::new(HashSet::<TaskId>::new()));
    let runs = Arc::new(Mutex::new(HashMap::<TaskId, u32>::new()));
    {
        let (running, peak, overlap, in_flight, runs) = (
            running.clone(),
            peak.clone(),
            overlap.clone(),
            in_flight.clone(),
            runs.clone(),
        );
        q.register(
            move |w: Work, ctx: &TaskContext| -> Result<u32, TaskError> {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                if !in_flight.lock().insert(ctx.task_id()) {
                    overlap.store(true, Ordering::SeqCst);
                }
                *runs.lock().entry(ctx.task_id()).or_default() += 1;
                // A little work, so executions overlap.
                let mut x = 0u64;
                for i in 0..20_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
                std::hint::black_box(x);
                in_flight.lock().remove(&ctx.task_id());
                running.fetch_sub(1, Ordering::SeqCst);
                // Every third task fails its first attempt, so retries interleave with new work.
                if ctx.attempt() == 1 && w.n.is_multiple_of(3) {
                    Err(TaskError::transient("flaky", "first attempt fails"))
                } else {
                    Ok(w.n)
                }
            },
        );
    }
    let ids = q
        .enqueue_many_with(
            (0..150).map(|n| Work { n }),
            EnqueueOptions::new().max_retries(2).backoff(fast_backoff()),
        )
        .unwrap();
    let pool = q.workers().concurrency(N).start().unwrap();
    for (n, id) in ids.iter().enumerate() {
        let t = q.wait(*id, LONG).unwrap();
        assert_eq!(t.status, Status::Completed);
        assert_eq!(t.result::<u32>().unwrap(), Some(n as u32));
        let want = if n % 3 == 0 { 2 } else { 1 };
        assert_eq!(t.attempts, want, "task {n}");
        assert_eq!(
            runs.lock()[id],
            t.attempts,
            "handler executions equal attempts for task {n}"
        );
    }
    assert_eq!(pool.stop().abandoned, 0);
    assert!(
        !overlap.load(Ordering::SeqCst),
        "a task ran on two threads at once"
    );
    let p = peak.load(Ordering::SeqCst);
    assert!(
        (1..=N).contains(&p),
        "peak concurrency {p} with {N} workers"
    );
    assert!(q.check_consistency().unwrap().is_consistent());
}

#[test]
fn a_pool_of_n_runs_n_handlers_at_once_and_no_more() {
    const N: usize = 3;
    let (_dir, q) = open();
    let meet = Rendezvous::new(N);
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    {
        let (meet, running, peak) = (meet.clone(), running.clone(), peak.clone());
        q.register_fn("meet", move |_, _| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let met = meet.meet();
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(met))
        });
    }
    // N + 2 tasks: the first N must all be running together (or they would time out), and the
    // other two must wait for a free worker.
    let ids: Vec<TaskId> = (0..N + 2)
        .map(|_| {
            q.enqueue_json("meet", &json!(null), EnqueueOptions::new())
                .unwrap()
        })
        .collect();
    let pool = q.workers().concurrency(N).start().unwrap();
    let mut met = 0;
    for id in &ids {
        let t = q.wait(*id, LONG * 2).unwrap();
        assert_eq!(t.status, Status::Completed);
        if t.result::<bool>().unwrap() == Some(true) {
            met += 1;
        }
    }
    pool.stop();
    assert!(
        met >= N,
        "only {met} handlers ever met: the pool did not run {N} at once"
    );
    assert_eq!(peak.load(Ordering::SeqCst), N, "peak concurrency");
}

#[test]
fn one_worker_runs_due_tasks_in_priority_then_enqueue_order() {
    let (_dir, q) = open();
    let order = Arc::new(Mutex::new(Vec::new()));
    {
        let order = order.clone();
        q.register_fn("p", move |v, _| {
            order.lock().push(v["i"].as_u64().unwrap());
            Ok(json!(null))
        });
    }
    let mut expected = Vec::new();
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let priority = ((i * 7) % 5) as i8 - 2;
        ids.push(
            q.enqueue_json(
                "p",
                &json!({ "i": i }),
                EnqueueOptions::new().priority(priority),
            )
            .unwrap(),
        );
        expected.push((std::cmp::Reverse(priority), i));
    }
    expected.sort();
    let pool = q.workers().concurrency(1).start().unwrap();
    for id in &ids {
        q.wait(*id, LONG).unwrap();
    }
    pool.stop();
    let want: Vec<u64> = expected.into_iter().map(|(_, i)| i).collect();
    assert_eq!(*order.lock(), want);
}

#[test]
fn stop_waits_for_the_running_handler_and_claims_nothing_new() {
    let (_dir, q) = open();
    let (started_tx, started_rx) = bounded::<()>(1);
    let (release_tx, release_rx) = bounded::<()>(1);
    let finished = Arc::new(AtomicBool::new(false));
    {
        let finished = finished.clone();
        q.register_fn("block", move |_, _| {
            started_tx.send(()).unwrap();
            release_rx.recv_timeout(LONG).unwrap();
            finished.store(true, Ordering::SeqCst);
            Ok(json!("finished"))
        });
    }
    q.register_fn("later", |_, _| Ok(json!("ran")));
    let pool = q
        .workers()
        .concurrency(1)
        .grace_period(LONG)
        .start()
        .unwrap();
    let a = q
        .enqueue_json("block", &json!(null), EnqueueOptions::new())
        .unwrap();
    started_rx.recv_timeout(LONG).unwrap();

    let (about_tx, about_rx) = bounded::<()>(1);
    let (report_tx, report_rx) = bounded(1);
    let stopper = std::thread::spawn(move || {
        about_tx.send(()).unwrap();
        let report = pool.stop();
        report_tx.send(report).unwrap();
    });
    about_rx.recv().unwrap();
    // Enqueued while the pool is stopping: must not be claimed.
    let later: Vec<TaskId> = (0..3)
        .map(|_| {
            q.enqueue_json("later", &json!(null), EnqueueOptions::new())
                .unwrap()
        })
        .collect();
    assert_eq!(
        report_rx.try_recv().unwrap_err(),
        TryRecvError::Empty,
        "stop returned while a handler was running"
    );
    release_tx.send(()).unwrap();
    let report = report_rx.recv_timeout(LONG).unwrap();
    stopper.join().unwrap();

    assert_eq!(report.abandoned, 0);
    assert!(
        finished.load(Ordering::SeqCst),
        "stop returned before the handler finished"
    );
    let a = q.get(a).unwrap().unwrap();
    assert_eq!(
        a.status,
        Status::Completed,
        "the running handler's result was recorded before stop returned"
    );
    assert_eq!(a.result::<String>().unwrap().unwrap(), "finished");
    for id in &later {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!(
            (t.status, t.attempts),
            (Status::Pending, 0),
            "a stopping pool claimed new work"
        );
        assert_eq!(q.history(*id).unwrap().len(), 1);
    }
    // Nothing is lost: the next pool runs them.
    let pool = q.workers().concurrency(2).start().unwrap();
    for id in &later {
        assert_eq!(q.wait(*id, LONG).unwrap().status, Status::Completed);
    }
    pool.stop();
}

#[test]
fn stop_after_grace_expiry_abandons_and_the_next_open_recovers_a_crash() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("grace") {
        return grace_child();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_child(
        "stop_after_grace_expiry_abandons_and_the_next_open_recovers_a_crash",
        "grace",
        dir.path(),
    );
    assert_eq!(child_value(&out, "ABANDONED"), "1", "{out}");
    assert_eq!(
        child_value(&out, "CANCELLED"),
        "true",
        "the handler's context reported cancellation"
    );
    assert_eq!(child_value(&out, "STATUS"), "RUNNING");
    let id: TaskId = child_value(&out, "ID").parse().unwrap();

    let q = Queue::open(dir.path()).unwrap();
    let r = q.recovery_report();
    assert_eq!((r.recovered, r.requeued, r.failed), (1, 1, 0));
    let t = q.get(id).unwrap().unwrap();
    assert_eq!(
        (t.status, t.attempts),
        (Status::Pending, 1),
        "the abandoned attempt was counted"
    );
    let e = t.last_error.as_ref().unwrap();
    assert_eq!(
        (e.error_type.as_str(), e.retry_count, e.permanent),
        ("crash", 0, false)
    );
    let h = q.history(id).unwrap();
    let causes: Vec<Cause> = h.iter().map(|e| e.cause.clone()).collect();
    assert_eq!(
        causes,
        vec![
            Cause::Enqueued,
            Cause::Claimed,
            Cause::Failed {
                error_type: "crash".into(),
                permanent: false
            }
        ]
    );
    assert_ne!(h[1].run_id, h[2].run_id, "recovery is done by the next run");
    // The recovered task then runs normally.
    q.register_fn("stubborn", |_, ctx| Ok(json!(ctx.attempt())));
    let pool = q.workers().concurrency(1).start().unwrap();
    let t = q.wait(id, LONG * 3).unwrap();
    pool.stop();
    assert_eq!((t.status, t.attempts), (Status::Completed, 2));
}

fn grace_child() {
    let dir = std::env::var(CHILD_DIR_ENV).unwrap();
    let q = Queue::open(&dir).unwrap();
    let (started_tx, started_rx) = bounded::<()>(1);
    let (saw_tx, saw_rx) = bounded::<bool>(1);
    let (_forever_tx, forever_rx) = bounded::<()>(0);
    q.register_fn("stubborn", move |_, ctx| {
        started_tx.send(()).unwrap();
        // A cooperative handler checks for cancellation between steps of its work.
        let until = Instant::now() + LONG;
        while !ctx.is_cancelled() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        saw_tx.send(ctx.is_cancelled()).unwrap();
        // ... but this one never returns: the process ends with it still running.
        let _ = forever_rx.recv();
        Ok(json!("unreachable"))
    });
    let pool = q
        .workers()
        .concurrency(1)
        .grace_period(Duration::from_millis(200))
        .start()
        .unwrap();
    let id = q
        .enqueue_json(
            "stubborn",
            &json!(null),
            EnqueueOptions::new().max_retries(2),
        )
        .unwrap();
    started_rx.recv_timeout(LONG).unwrap();
    let report = pool.stop();
    let saw = saw_rx.recv_timeout(LONG).unwrap();
    let status = q.get(id).unwrap().unwrap().status;
    let mut out = std::io::stdout();
    writeln!(out, "ABANDONED {}", report.abandoned).unwrap();
    writeln!(out, "CANCELLED {saw}").unwrap();
    writeln!(out, "STATUS {status}").unwrap();
    writeln!(out, "ID {id}").unwrap();
    out.flush().unwrap();
    // Die with the handler still running, as a process killed after its grace period would.
    std::process::exit(0);
}

#[test]
fn a_timeout_closes_the_attempt_rejects_the_late_result_and_keeps_concurrency() {
    let (_dir, q) = open();
    let (started_tx, started_rx) = bounded::<()>(1);
    let (cancelled_tx, cancelled_rx) = bounded::<bool>(1);
    let (release_tx, release_rx) = bounded::<()>(1);
    q.register_fn("slow", move |_, ctx| {
        if ctx.attempt() > 1 {
            return Ok(json!("fresh"));
        }
        started_tx.send(()).unwrap();
        assert!(ctx.deadline().is_some());
        let until = Instant::now() + LONG;
        while !ctx.is_cancelled() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        cancelled_tx.send(ctx.is_cancelled()).unwrap();
        // Stuck: returns only when the test says so, long after its attempt was closed.
        release_rx.recv_timeout(LONG).unwrap();
        Ok(json!("late"))
    });
    let meet = Rendezvous::new(2);
    {
        let meet = meet.clone();
        q.register_fn("meet", move |_, _| Ok(json!(meet.meet())));
    }
    let events = q.subscribe();
    let pool = q.workers().concurrency(2).start().unwrap();
    let id = q
        .enqueue_json(
            "slow",
            &json!(null),
            EnqueueOptions::new()
                .timeout(Duration::from_millis(200))
                .max_retries(1)
                .backoff(fast_backoff()),
        )
        .unwrap();
    started_rx.recv_timeout(LONG).unwrap();
    assert!(
        cancelled_rx.recv_timeout(LONG).unwrap(),
        "the timed-out handler's context reports cancellation"
    );

    // Attempt 2 runs while attempt 1's thread is still stuck.
    let t = q.wait(id, LONG).unwrap();
    assert_eq!((t.status, t.attempts), (Status::Completed, 2));
    assert_eq!(t.result::<String>().unwrap().unwrap(), "fresh");

    // Full concurrency while the stuck handler still holds its thread: two handlers that can
    // only finish together both complete.
    let m1 = q
        .enqueue_json("meet", &json!(null), EnqueueOptions::new())
        .unwrap();
    let m2 = q
        .enqueue_json("meet", &json!(null), EnqueueOptions::new())
        .unwrap();
    for m in [m1, m2] {
        let t = q.wait(m, LONG * 2).unwrap();
        assert_eq!(
            t.result::<bool>().unwrap(),
            Some(true),
            "the pool lost a worker to the stuck handler"
        );
    }

    // Let the stale attempt return; stop() joins its thread, so its completion has been tried.
    release_tx.send(()).unwrap();
    assert_eq!(pool.stop().abandoned, 0);

    let t = q.get(id).unwrap().unwrap();
    assert_eq!(
        t.result::<String>().unwrap().unwrap(),
        "fresh",
        "the late result overwrote the real one"
    );
    assert_eq!(t.errors.len(), 1);
    let e = &t.errors[0];
    assert_eq!(
        (e.error_type.as_str(), e.retry_count, e.permanent),
        ("timeout", 0, false)
    );
    let h = q.history(id).unwrap();
    let succeeded: Vec<u32> = h
        .iter()
        .filter(|e| e.cause == Cause::Succeeded)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(succeeded, vec![2], "only attempt 2 succeeded in the log");
    let timeout = h
        .iter()
        .find(|e| matches!(&e.cause, Cause::Failed { error_type, .. } if error_type == "timeout"))
        .unwrap();
    assert_eq!(
        (timeout.from, timeout.to, timeout.attempt),
        (Some(Status::Running), Status::Pending, 1)
    );
    // Subscribers saw the same: no Succeeded for attempt 1.
    let seen: Vec<_> = events
        .try_iter()
        .filter(|e| e.entry.task_id == id)
        .collect();
    assert_eq!(seen.len(), h.len());
    assert!(!seen
        .iter()
        .any(|e| e.entry.cause == Cause::Succeeded && e.entry.attempt == 1));
    assert!(q.check_consistency().unwrap().is_consistent());
}

#[test]
fn a_panicking_handler_is_a_transient_panic_failure_and_the_worker_survives() {
    common::quiet_panics("deliberate");
    let (_dir, q) = open();
    let threads = Arc::new(Mutex::new(Vec::new()));
    {
        let threads = threads.clone();
        q.register_fn("fragile", move |_, ctx| {
            threads.lock().push(std::thread::current().id());
            if ctx.attempt() == 1 {
                panic!("deliberate panic in attempt 1");
            }
            Ok(json!(ctx.attempt()))
        });
    }
    let pool = q.workers().concurrency(1).start().unwrap();
    let id = q
        .enqueue_json(
            "fragile",
            &json!(null),
            EnqueueOptions::new().max_retries(1).backoff(fast_backoff()),
        )
        .unwrap();
    let t = q.wait(id, LONG).unwrap();
    assert_eq!((t.status, t.attempts), (Status::Completed, 2));
    let e = &t.errors[0];
    assert_eq!(
        (e.error_type.as_str(), e.permanent, e.retry_count),
        ("panic", false, 0)
    );
    assert!(
        e.message.contains("deliberate panic in attempt 1"),
        "{}",
        e.message
    );
    // The same (only) worker thread ran the retry and still runs new work.
    let other = q
        .enqueue_json(
            "fragile",
            &json!(null),
            EnqueueOptions::new().max_retries(0),
        )
        .unwrap();
    let o = q.wait(other, LONG).unwrap();
    assert_eq!(
        (o.status, o.last_error.unwrap().error_type.as_str()),
        (Status::Failed, "panic")
    );
    let again = q
        .enqueue_json(
            "fragile",
            &json!(null),
            EnqueueOptions::new().max_retries(1).backoff(fast_backoff()),
        )
        .unwrap();
    assert_eq!(q.wait(again, LONG).unwrap().status, Status::Completed);
    pool.stop();
    let threads = threads.lock();
    assert_eq!(threads.len(), 5);
    assert!(
        threads.iter().all(|t| *t == threads[0]),
        "the worker thread was replaced after a panic"
    );
}

#[test]
fn an_unregistered_kind_fails_permanently_and_retry_runs_it_once_registered() {
    let (_dir, q) = open();
    let pool = q.workers().concurrency(1).start().unwrap();
    let id = q
        .enqueue_json(
            "mystery_kind",
            &json!({ "x": 1 }),
            EnqueueOptions::new().max_retries(3),
        )
        .unwrap();
    let t = q.wait(id, LONG).unwrap();
    assert_eq!(
        (t.status, t.attempts),
        (Status::Failed, 1),
        "unregistered is permanent: no retries"
    );
    let e = t.last_error.as_ref().unwrap();
    assert_eq!(e.error_type, "unregistered");
    assert!(e.permanent);
    assert!(e.message.contains("mystery_kind"), "{}", e.message);

    q.register_fn("mystery_kind", |v, ctx| {
        Ok(json!({ "x": v["x"], "attempt": ctx.attempt() }))
    });
    let r = q.retry(id).unwrap();
    assert_eq!(
        (r.status, r.attempts),
        (Status::Pending, 0),
        "manual retry restarts the budget"
    );
    let t = q.wait(id, LONG).unwrap();
    pool.stop();
    assert_eq!((t.status, t.attempts), (Status::Completed, 1));
    assert_eq!(t.result_json().unwrap(), json!({ "x": 1, "attempt": 1 }));
    assert_eq!(
        t.errors.len(),
        1,
        "the error history is kept across a manual retry"
    );
    let causes: Vec<Cause> = q
        .history(id)
        .unwrap()
        .into_iter()
        .map(|e| e.cause)
        .collect();
    assert_eq!(
        causes,
        vec![
            Cause::Enqueued,
            Cause::Claimed,
            Cause::Failed {
                error_type: "unregistered".into(),
                permanent: true
            },
            Cause::ManualRetry,
            Cause::Claimed,
            Cause::Succeeded,
        ]
    );
    // Retrying a completed task is refused.
    assert!(matches!(
        q.retry(id),
        Err(Error::InvalidState {
            status: Status::Completed,
            ..
        })
    ));
}

#[test]
fn wait_is_woken_by_the_finish_and_times_out_otherwise() {
    let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000));
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path()).clock(clock).open().unwrap();
    let id = q
        .enqueue_json("w", &json!(null), EnqueueOptions::new())
        .unwrap();

    // Not finished: WaitTimeout naming the task and its state.
    match q.wait(id, Duration::from_millis(100)) {
        Err(Error::WaitTimeout {
            id: eid,
            status,
            timeout,
        }) => {
            assert_eq!(
                (eid, status, timeout),
                (id, Status::Pending, Duration::from_millis(100))
            );
        }
        other => panic!("expected WaitTimeout, got {other:?}"),
    }

    // A waiter on another thread is woken when the task finishes.
    let (tx, rx) = bounded(1);
    let q2 = q.clone();
    let waiter =
        std::thread::spawn(move || tx.send(q2.wait(id, Duration::from_secs(600))).unwrap());
    let c = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(
        rx.try_recv().unwrap_err(),
        TryRecvError::Empty,
        "wait returned while the task was running"
    );
    assert!(c.succeed(&"ok").unwrap());
    let t = rx.recv_timeout(LONG).unwrap().unwrap();
    waiter.join().unwrap();
    assert_eq!(t.status, Status::Completed);
    // Waiting on a finished task returns at once; on an unknown one, NotFound.
    assert_eq!(
        q.wait(id, Duration::ZERO).unwrap().status,
        Status::Completed
    );
    let unknown: TaskId = "00000000-0000-7000-8000-000000000000".parse().unwrap();
    assert!(
        matches!(q.wait(unknown, Duration::from_millis(10)), Err(Error::NotFound(x)) if x == unknown)
    );
}

#[test]
fn subscribe_delivers_every_transition_in_order_on_a_manual_clock_pool() {
    let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000));
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path())
        .clock(clock.clone())
        .jitter_seed(3)
        .open()
        .unwrap();
    q.register_fn("flaky", |_, ctx| {
        if ctx.attempt() < 3 {
            Err(TaskError::transient(
                "network",
                format!("attempt {} failed", ctx.attempt()),
            ))
        } else {
            Ok(json!(ctx.attempt()))
        }
    });
    q.register_fn("later", |_, _| Ok(json!("on time")));
    let events = q.subscribe();
    let pool = q.workers().concurrency(2).start().unwrap();

    // A delayed task does not run before its time; advancing the clock wakes the pool.
    let later = q
        .enqueue_json(
            "later",
            &json!(null),
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .unwrap();
    assert!(matches!(
        q.wait(later, Duration::from_millis(200)),
        Err(Error::WaitTimeout {
            status: Status::Pending,
            ..
        })
    ));
    clock.advance(Duration::from_secs(3600));
    assert_eq!(q.wait(later, LONG).unwrap().status, Status::Completed);

    // A retried task: every transition arrives, in order; the test moves the clock past each
    // backoff when it sees the retry scheduled.
    let id = q
        .enqueue_json("flaky", &json!(null), EnqueueOptions::new().max_retries(5))
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let ev = events.recv_timeout(LONG).expect("an event");
        if ev.entry.task_id != id {
            continue;
        }
        let to = ev.entry.to;
        let retry_scheduled =
            matches!(ev.entry.cause, Cause::Failed { .. }) && to == Status::Pending;
        seen.push(ev);
        if retry_scheduled {
            clock.advance(Duration::from_secs(120));
        }
        if to == Status::Completed {
            break;
        }
    }
    pool.stop();
    let kinds: Vec<(Option<Status>, Status, u32, Cause)> = seen
        .iter()
        .map(|e| {
            (
                e.entry.from,
                e.entry.to,
                e.entry.attempt,
                e.entry.cause.clone(),
            )
        })
        .collect();
    let failed = Cause::Failed {
        error_type: "network".into(),
        permanent: false,
    };
    assert_eq!(
        kinds,
        vec![
            (None, Status::Pending, 0, Cause::Enqueued),
            (Some(Status::Pending), Status::Running, 1, Cause::Claimed),
            (Some(Status::Running), Status::Pending, 1, failed.clone()),
            (Some(Status::Pending), Status::Running, 2, Cause::Claimed),
            (Some(Status::Running), Status::Pending, 2, failed),
            (Some(Status::Pending), Status::Running, 3, Cause::Claimed),
            (
                Some(Status::Running),
                Status::Completed,
                3,
                Cause::Succeeded
            ),
        ]
    );
    let history = q.history(id).unwrap();
    let delivered: Vec<_> = seen.iter().map(|e| e.entry.clone()).collect();
    assert_eq!(delivered, history, "subscribers see exactly the log");
    assert!(seen
        .iter()
        .all(|e| e.kind == "flaky" && e.queue == "default"));
    let counts: Vec<u32> = seen
        .iter()
        .filter_map(|e| e.error.as_ref())
        .map(|e| e.retry_count)
        .collect();
    assert_eq!(counts, vec![0, 1]);
}

#[test]
fn an_idle_pool_uses_almost_no_cpu() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("idle") {
        return idle_child();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_child("an_idle_pool_uses_almost_no_cpu", "idle", dir.path());
    let us: u64 = child_value(&out, "IDLE_CPU_US").parse().unwrap();
    eprintln!("idle pool: {us} us of CPU over 2 s");
    assert!(
        us < 50_000,
        "an idle pool used {us} us of CPU in 2 s: it is polling"
    );
}

#[allow(unsafe_code)]
fn process_cpu_us() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0);
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn idle_child() {
    let dir = std::env::var(CHILD_DIR_ENV).unwrap();
    let q = Queue::open(&dir).unwrap();
    q.register_fn("later", |_, _| Ok(json!(null)));
    // Something scheduled far ahead, so the dispatcher has a due time to sleep towards, and a
    // thread blocked in `wait` on it.
    let id = q
        .enqueue_json(
            "later",
            &json!(null),
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .unwrap();
    let pool = q.workers().concurrency(4).start().unwrap();
    let q2 = q.clone();
    let (tx, rx) = unbounded();
    std::thread::spawn(move || tx.send(q2.wait(id, Duration::from_secs(4)).is_err()));
    let before = process_cpu_us();
    // The measurement window itself, not a synchronisation.
    std::thread::sleep(Duration::from_secs(2));
    let used = process_cpu_us() - before;
    assert!(
        rx.recv_timeout(LONG).unwrap(),
        "the waiter must time out: nothing was due"
    );
    pool.stop();
    println!("IDLE_CPU_US {used}");
}
