//! Operator controls through the public `Queue` API: durable queue pause / resume, and
//! cooperative cancellation of a running execution (issue 10). No sleeps: every wait is on a
//! channel or `Queue::wait`, with bounded timeouts.

mod common;

use std::time::Duration;

use crossbeam_channel::bounded;
use omniq::{Cause, EnqueueOptions, Error, Queue, Status, TaskContext, TaskError};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);

fn ok(v: Value, _ctx: &TaskContext) -> Result<Value, TaskError> {
    Ok(v)
}

fn on(queue: &str) -> EnqueueOptions {
    EnqueueOptions::new().queue(queue)
}

#[test]
fn a_paused_queue_is_never_claimed_and_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.register_fn("echo", ok);
    // The paused queue's task is older: with one worker it would otherwise run first.
    let held = q.enqueue_json("echo", &json!(1), on("held")).unwrap();
    q.pause("held").unwrap();
    assert!(q.is_paused("held"));
    assert_eq!(q.paused_queues(), vec!["held".to_string()]);
    let free = q.enqueue_json("echo", &json!(2), on("free")).unwrap();

    let pool = q.workers().concurrency(1).start().unwrap();
    assert_eq!(q.wait(free, LONG).unwrap().status, Status::Completed);
    let t = q.get(held).unwrap().unwrap();
    assert_eq!(
        (t.status, t.attempts),
        (Status::Pending, 0),
        "nothing charged"
    );
    let causes: Vec<Cause> = q
        .history(held)
        .unwrap()
        .into_iter()
        .map(|e| e.cause)
        .collect();
    assert_eq!(causes, vec![Cause::Enqueued], "never claimed");
    pool.stop();

    // The flag is durable.
    drop(q);
    let q = common::reopen(|| Queue::open(dir.path())).unwrap();
    q.register_fn("echo", ok);
    assert!(q.is_paused("held"), "pause survives a restart");
    assert!(omniq::testing::run_due(&q).unwrap().executions == 0);

    let pool = q.workers().concurrency(1).start().unwrap();
    q.resume("held").unwrap();
    assert!(!q.is_paused("held"));
    let t = q.wait(held, LONG).unwrap();
    assert_eq!((t.status, t.attempts), (Status::Completed, 1));
    pool.stop();
    assert!(q.check_consistency().unwrap().is_consistent());
}

#[test]
fn pause_validates_the_queue_name_and_resume_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    assert!(matches!(q.pause(""), Err(Error::Invalid { .. })));
    assert!(matches!(
        q.pause(&"x".repeat(200)),
        Err(Error::Invalid { .. })
    ));
    q.resume("never-paused").unwrap();
    assert!(q.paused_queues().is_empty());
}

#[test]
fn cancelling_a_running_task_ends_its_attempt_cancelled_when_the_handler_returns() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let (started_tx, started) = bounded::<()>(1);
    let (saw_tx, saw) = bounded::<bool>(1);
    q.register_fn("long", move |_v: Value, ctx: &TaskContext| {
        started_tx.send(()).ok();
        let until = std::time::Instant::now() + LONG;
        while !ctx.is_cancelled() && std::time::Instant::now() < until {
            std::thread::yield_now();
        }
        saw_tx.send(ctx.is_cancelled()).ok();
        Ok(json!("finished anyway"))
    });
    let id = q
        .enqueue_json("long", &json!(null), EnqueueOptions::new().max_retries(5))
        .unwrap();
    let pool = q.workers().concurrency(1).start().unwrap();
    started.recv_timeout(LONG).unwrap();
    let now = q.cancel_running(id).unwrap();
    assert_eq!(now.status, Status::Running);
    assert!(
        saw.recv_timeout(LONG).unwrap(),
        "the handler saw is_cancelled()"
    );
    let t = q.wait(id, LONG).unwrap();
    assert_eq!(t.status, Status::Cancelled);
    assert_eq!(t.attempts, 1);
    assert_eq!(t.result, None, "whatever it returned is discarded");
    let last = q.history(id).unwrap().pop().unwrap();
    assert_eq!(
        (last.from, last.to, last.cause),
        (Some(Status::Running), Status::Cancelled, Cause::Cancelled)
    );
    pool.stop();
    // Terminal: not run again; retry brings it back like any cancelled task.
    assert!(matches!(
        q.cancel_running(id),
        Err(Error::InvalidState {
            status: Status::Cancelled,
            ..
        })
    ));
    assert!(q.check_consistency().unwrap().is_consistent());
}

#[test]
fn a_cancelled_execution_that_ignores_the_flag_ends_cancelled_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let (started_tx, started) = bounded::<()>(1);
    let (release_tx, release) = bounded::<()>(1);
    q.register_fn("stubborn", move |_v: Value, _ctx: &TaskContext| {
        started_tx.send(()).ok();
        // Ignores cancellation until the test lets it go.
        let _ = release.recv_timeout(LONG);
        Ok(json!(null))
    });
    let id = q
        .enqueue_json(
            "stubborn",
            &json!(null),
            EnqueueOptions::new()
                .timeout(Duration::from_millis(300))
                .max_retries(3),
        )
        .unwrap();
    let pool = q.workers().concurrency(1).start().unwrap();
    started.recv_timeout(LONG).unwrap();
    q.cancel_running(id).unwrap();
    let t = q.wait(id, LONG).unwrap();
    assert_eq!(
        t.status,
        Status::Cancelled,
        "not a timeout failure, not retried"
    );
    assert!(t.errors.is_empty());
    release_tx.send(()).unwrap();
    pool.stop();
    assert_eq!(q.get(id).unwrap().unwrap().status, Status::Cancelled);
}

#[test]
fn cancel_running_refuses_other_states_and_closes_an_orphaned_attempt_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.register_fn("echo", ok);
    let pending = q
        .enqueue_json("echo", &json!(1), EnqueueOptions::new())
        .unwrap();
    let err = q.cancel_running(pending).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidState {
                status: Status::Pending,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(q.get(pending).unwrap().unwrap().status, Status::Pending);
    let unknown: omniq::TaskId = "0192f5e4-8c1a-7b3e-9f00-1a2b3c4d5e6f".parse().unwrap();
    assert!(matches!(q.cancel_running(unknown), Err(Error::NotFound(_))));

    // Claimed but run by nobody in this process: closed in the store at once, fenced.
    let claimed = omniq::testing::claim_next(&q).unwrap().unwrap();
    let t = q.cancel_running(claimed.task.id).unwrap();
    assert_eq!((t.status, t.attempts), (Status::Cancelled, 1));
    assert!(
        !claimed.succeed(&"late").unwrap(),
        "the late result is stale"
    );
    assert_eq!(q.get(pending).unwrap().unwrap().status, Status::Cancelled);
}
