//! Handles and closing (issue 8, defect 6): handlers reach the queue through their context
//! without keeping it open; `close()` says whether the directory was really released; a second
//! open in this process is told apart from another process's lock.

use std::sync::Arc;
use std::time::Duration;

use omniq::{EnqueueOptions, Error, Queue, Status, Task, TaskContext, TaskError, TaskInfo};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Parent {
    children: u32,
}
impl Task for Parent {
    const NAME: &'static str = "parent";
    type Output = u32;
}

#[derive(Serialize, Deserialize)]
struct Child {
    n: u32,
}
impl Task for Child {
    const NAME: &'static str = "child";
    type Output = u32;
}

/// Opening right after `close()` returned Ok must work at once: no retry loop here, because
/// `close` promises the lock is released when it returns.
fn open_now(dir: &std::path::Path) -> Queue {
    Queue::open(dir).expect("the directory is free once close() returned Ok")
}

#[test]
fn a_handler_enqueues_follow_ups_and_reads_its_record_without_keeping_the_queue_open() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let seen: Arc<Mutex<Vec<TaskInfo>>> = Arc::default();
    let seen_in_handler = seen.clone();
    queue.register(
        move |p: Parent, ctx: &TaskContext| -> Result<u32, TaskError> {
            let me = ctx.current()?;
            seen_in_handler.lock().push(me);
            for n in 0..p.children {
                ctx.enqueue_with(Child { n }, EnqueueOptions::new().queue("children"))?;
            }
            Ok(p.children)
        },
    );
    queue.register(|c: Child, _ctx: &TaskContext| -> Result<u32, TaskError> { Ok(c.n * 10) });
    let id = queue.enqueue(Parent { children: 3 }).unwrap();
    let pool = queue.workers().concurrency(2).start().unwrap();
    let parent = queue.wait(id, Duration::from_secs(20)).unwrap();
    assert_eq!(parent.status, Status::Completed);
    let children = queue
        .list(&omniq::ListFilter::new().queue("children"))
        .unwrap()
        .tasks;
    assert_eq!(children.len(), 3);
    let ids: Vec<_> = children.iter().map(|t| t.id).collect();
    let done = queue.wait_all(&ids, Duration::from_secs(20)).unwrap();
    assert!(done.iter().all(|t| t.status == Status::Completed));
    {
        let seen = seen.lock();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].id, id);
        assert_eq!(seen[0].status, Status::Running);
        assert_eq!(seen[0].attempts, 1);
    }
    pool.stop();
    // The registered handlers are still there, but hold no handle: this was the last one.
    queue.close().unwrap();
    let again = open_now(dir.path());
    assert_eq!(again.stats().unwrap().count(Status::Completed), 4);
}

#[test]
fn close_says_when_other_handles_keep_the_queue_open() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let id = queue
        .enqueue_json("job", &serde_json::json!(1), EnqueueOptions::new())
        .unwrap();
    let clone = queue.clone();
    match queue.close() {
        Err(Error::StillOpen { path, others }) => {
            assert_eq!(path, dir.path());
            assert_eq!(others, 1);
        }
        other => panic!("expected StillOpen, got {other:?}"),
    }
    // The directory is still open in this process: said so, not blamed on another process.
    assert!(matches!(
        Queue::open(dir.path()),
        Err(Error::AlreadyOpen { .. })
    ));
    // What was committed is durable and the remaining handle works.
    assert_eq!(clone.get(id).unwrap().unwrap().status, Status::Pending);
    clone.close().unwrap();
    let again = open_now(dir.path());
    assert_eq!(again.get(id).unwrap().unwrap().status, Status::Pending);
}

#[test]
fn a_running_worker_pool_is_a_handle() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let pool = queue.workers().concurrency(1).start().unwrap();
    let probe = queue.clone();
    assert!(matches!(queue.close(), Err(Error::StillOpen { .. })));
    pool.stop();
    probe.close().unwrap();
    drop(open_now(dir.path()));
}

#[test]
fn a_handler_that_captured_a_queue_clone_is_reported_by_close() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let captured = queue.clone();
    queue.register_fn(
        "leaky",
        move |_v: serde_json::Value, _ctx: &TaskContext| -> Result<serde_json::Value, TaskError> {
            Ok(serde_json::json!(captured.path().display().to_string()))
        },
    );
    match queue.close() {
        Err(Error::StillOpen { others, .. }) => assert_eq!(others, 1),
        other => panic!("a captured clone keeps the queue open; close must say so: {other:?}"),
    }
    let err = Queue::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::AlreadyOpen { .. }),
        "same-process holder must not be blamed on another process: {err}"
    );
    assert!(err.to_string().contains("already open in this process"));
}

#[test]
fn context_handle_fails_cleanly_once_the_queue_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let weak = queue.downgrade();
    assert!(weak.upgrade().is_some());
    queue.close().unwrap();
    assert!(weak.upgrade().is_none());
}
