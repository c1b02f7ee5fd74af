//! The PostgreSQL backend's operations one by one, against a real server: each test works in
//! its own throwaway schema (`tests/common/pg.rs`). Skipped only when the server cannot be
//! reached and `CI` is unset.
#![cfg(feature = "postgres")]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::pg::{clock, eventually, PgSchema};
use omniq::postgres::harness::{new_task, FinishResult, PgHarness};
use omniq::postgres::{Liveness, SCHEMA_VERSION};
use omniq::{Cause, Error, ListFilter, Status, TaskError, TaskId, TaskInfo, Timestamp};

macro_rules! schema {
    ($name:expr) => {
        match PgSchema::new($name) {
            Some(s) => s,
            None => return,
        }
    };
}

fn applied(r: omniq::Result<FinishResult>) -> TaskInfo {
    match r.expect("finish") {
        FinishResult::Applied(t) => t,
        FinishResult::Stale => panic!("finish was stale"),
    }
}

fn causes(node: &PgHarness, id: TaskId) -> Vec<String> {
    node.history(id)
        .expect("history")
        .iter()
        .map(|e| e.cause.to_string())
        .collect()
}

/// Counters from a full listing, to compare with the kept counters.
fn counted(node: &PgHarness) -> BTreeMap<(String, Status), u64> {
    let mut out = BTreeMap::new();
    let mut cursor = None;
    loop {
        let page = node
            .list(&ListFilter::new().limit(500).cursor(cursor))
            .expect("list");
        assert!(page.corrupt.is_empty(), "{:?}", page.corrupt);
        for t in &page.tasks {
            *out.entry((t.queue.clone(), t.status)).or_default() += 1;
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

#[test]
fn claims_in_priority_then_due_time_then_enqueue_order() {
    let s = schema!("claim_order");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let now = clock.now();
    let early = Timestamp(now.0 - 5_000);
    let low_old = new_task("q", 0, early, 3, 1);
    let high_new = new_task("q", 5, now, 3, 2);
    let low_new_a = new_task("q", 0, now, 3, 3);
    let low_new_b = new_task("q", 0, now, 3, 4);
    let future = new_task("q", 9, Timestamp(now.0 + 60_000), 3, 5);
    let other_queue = new_task("other", 9, early, 3, 6);
    node.insert(vec![
        low_new_b.clone(),
        future.clone(),
        low_new_a.clone(),
        high_new.clone(),
        low_old.clone(),
        other_queue.clone(),
    ])
    .unwrap();
    assert_eq!(
        node.due_summary(Some(&["q"]), now, 100).unwrap(),
        (4, Some(future.next_run_at))
    );

    let mut order = Vec::new();
    while let Some(t) = node.claim(Some(&["q"]), 1, now).unwrap().pop() {
        assert_eq!(t.status, Status::Running);
        assert_eq!(t.attempts, 1, "the attempt is counted by the claim itself");
        assert_eq!(t.started_at, Some(now));
        assert!(t.lease > 0);
        // Durable and visible before any handler could run.
        assert_eq!(node.get(t.id).unwrap().as_ref(), Some(&t));
        order.push(t.id);
    }
    // Same priority and due time: enqueue order (ids are time-ordered; a was generated first).
    assert_eq!(
        order,
        vec![high_new.id, low_old.id, low_new_a.id, low_new_b.id]
    );
    // Not due yet, and the other queue's task, were not claimed.
    assert_eq!(
        node.get(future.id).unwrap().unwrap().status,
        Status::Pending
    );
    assert_eq!(
        node.get(other_queue.id).unwrap().unwrap().status,
        Status::Pending
    );
    // A batch claim over all queues takes the rest that is due, best first.
    let rest = node.claim(None, 10, now).unwrap();
    assert_eq!(
        rest.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![other_queue.id]
    );
    assert_eq!(causes(&node, low_old.id), vec!["enqueued", "claimed"]);
    let h = node.history(low_old.id).unwrap();
    assert_eq!(h[1].from, Some(Status::Pending));
    assert_eq!(h[1].to, Status::Running);
    assert_eq!(h[1].attempt, 1);
    assert_eq!(h[1].run_id, node.node_id());
    assert!(h[0].seq < h[1].seq);
    node.shut_down().unwrap();
}

#[test]
fn a_finish_is_fenced_by_its_lease_and_a_stale_one_changes_nothing() {
    let s = schema!("fence");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let t = new_task("q", 0, clock.now(), 3, 1);
    node.insert(vec![t.clone()]).unwrap();
    let claimed = node.claim(None, 1, clock.now()).unwrap().remove(0);
    let before = node.get(t.id).unwrap().unwrap();
    let log_before = node.history(t.id).unwrap();

    for wrong in [claimed.lease + 1, claimed.lease.saturating_sub(1), 0] {
        assert_eq!(
            node.succeed(t.id, wrong, b"1").unwrap(),
            FinishResult::Stale
        );
        assert_eq!(
            node.fail(t.id, wrong, TaskError::transient("x", "y"))
                .unwrap(),
            FinishResult::Stale
        );
    }
    assert_eq!(
        node.get(t.id).unwrap().unwrap(),
        before,
        "a stale finish changed the row"
    );
    assert_eq!(
        node.history(t.id).unwrap(),
        log_before,
        "a stale finish wrote a log row"
    );

    clock.advance(Duration::from_millis(250));
    let done = applied(node.succeed(t.id, claimed.lease, b"{\"ok\":true}"));
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.result.as_deref(), Some(&b"{\"ok\":true}"[..]));
    assert_eq!(done.finished_at, Some(clock.now()));
    // The same lease again: the execution is over.
    assert_eq!(
        node.succeed(t.id, claimed.lease, b"2").unwrap(),
        FinishResult::Stale
    );
    assert_eq!(node.get(t.id).unwrap().unwrap(), done);
    assert_eq!(
        causes(&node, t.id),
        vec!["enqueued", "claimed", "succeeded"]
    );
    // A finish for a task that does not exist is an error, not a silent skip.
    let missing = new_task("q", 0, clock.now(), 3, 2).id;
    assert!(matches!(node.succeed(missing, 1, b"1"), Err(Error::NotFound(id)) if id == missing));
    node.shut_down().unwrap();
}

#[test]
fn transient_failures_back_off_then_fail_when_the_budget_is_spent() {
    let s = schema!("retry_rule");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let t = new_task("q", 0, clock.now(), 1, 1);
    node.insert(vec![t.clone()]).unwrap();

    let c1 = node.claim(None, 1, clock.now()).unwrap().remove(0);
    let after1 = applied(node.fail(t.id, c1.lease, TaskError::transient("network", "reset")));
    // Back to Pending, not final, with the nominal first backoff (FixedJitter(0.5): 1 s).
    assert_eq!(after1.status, Status::Pending);
    assert_eq!(after1.next_run_at, Timestamp(clock.now().0 + 1_000));
    assert_eq!(after1.attempts, 1);
    assert_eq!(after1.last_error.as_ref().unwrap().retry_count, 0);
    assert_eq!(after1.last_error.as_ref().unwrap().timestamp, clock.now());
    assert!(after1.finished_at.is_none());
    // Not due before its backoff.
    assert!(node.claim(None, 1, clock.now()).unwrap().is_empty());
    assert_eq!(
        node.due_summary(None, clock.now(), 10).unwrap(),
        (0, Some(after1.next_run_at))
    );

    clock.advance(Duration::from_millis(1_000));
    let c2 = node.claim(None, 1, clock.now()).unwrap().remove(0);
    assert_eq!(c2.attempts, 2);
    assert!(c2.lease > c1.lease);
    let after2 = applied(node.fail(t.id, c2.lease, TaskError::transient("network", "reset")));
    // max_retries = 1: two executions, then Failed in the same transaction as the error.
    assert_eq!(after2.status, Status::Failed);
    assert_eq!(after2.finished_at, Some(clock.now()));
    let counts: Vec<u32> = after2.errors.iter().map(|e| e.retry_count).collect();
    assert_eq!(counts, vec![0, 1]);
    let h = node.history(t.id).unwrap();
    assert_eq!(
        h.iter().map(|e| (e.from, e.to)).collect::<Vec<_>>(),
        vec![
            (None, Status::Pending),
            (Some(Status::Pending), Status::Running),
            (Some(Status::Running), Status::Pending),
            (Some(Status::Pending), Status::Running),
            (Some(Status::Running), Status::Failed),
        ]
    );
    assert!(
        matches!(&h[4].cause, Cause::Failed { error_type, permanent: false } if error_type == "network")
    );
    node.shut_down().unwrap();
}

#[test]
fn a_permanent_error_fails_at_once() {
    let s = schema!("permanent");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let t = new_task("q", 0, clock.now(), 5, 1);
    node.insert(vec![t.clone()]).unwrap();
    let c = node.claim(None, 1, clock.now()).unwrap().remove(0);
    let after = applied(node.fail(t.id, c.lease, TaskError::permanent("not_found", "no user")));
    assert_eq!(after.status, Status::Failed);
    assert_eq!(after.attempts, 1);
    assert!(after.last_error.as_ref().unwrap().permanent);
    node.shut_down().unwrap();
}

#[test]
fn cancel_retry_and_purge() {
    let s = schema!("cancel_retry_purge");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let a = new_task("q", 0, clock.now(), 0, 1);
    let b = new_task("q", 0, clock.now(), 0, 2);
    node.insert(vec![a.clone(), b.clone()]).unwrap();

    let cancelled = node.cancel(a.id).unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    assert!(matches!(
        node.cancel(a.id),
        Err(Error::InvalidState {
            status: Status::Cancelled,
            ..
        })
    ));
    // Only b is claimable now.
    let cb = node.claim(None, 5, clock.now()).unwrap();
    assert_eq!(cb.len(), 1);
    assert!(matches!(
        node.cancel(b.id),
        Err(Error::InvalidState {
            status: Status::Running,
            ..
        })
    ));
    assert!(matches!(
        node.retry(b.id),
        Err(Error::InvalidState {
            status: Status::Running,
            ..
        })
    ));
    applied(node.fail(b.id, cb[0].lease, TaskError::transient("x", "y")));
    assert_eq!(node.get(b.id).unwrap().unwrap().status, Status::Failed);

    clock.advance(Duration::from_secs(1));
    let again = node.retry(b.id).unwrap();
    assert_eq!(again.status, Status::Pending);
    assert_eq!(again.attempts, 0, "a manual retry restores the budget");
    assert_eq!(again.next_run_at, clock.now());
    assert_eq!(again.errors.len(), 1, "the error history is kept");
    let revived = node.retry(a.id).unwrap();
    assert_eq!(revived.status, Status::Pending);
    assert_eq!(
        causes(&node, a.id),
        vec!["enqueued", "cancelled", "manual retry"]
    );

    let c = node.claim(None, 5, clock.now()).unwrap();
    assert_eq!(c.len(), 2);
    for t in &c {
        applied(node.succeed(t.id, t.lease, b"null"));
    }
    // Finished at `now`: a cutoff at `now` keeps them, one after removes them with their logs.
    assert_eq!(node.finished_before(clock.now(), 10).unwrap(), vec![]);
    assert_eq!(node.purge(clock.now(), 10).unwrap(), 0);
    let cutoff = Timestamp(clock.now().0 + 1);
    assert_eq!(node.finished_before(cutoff, 10).unwrap().len(), 2);
    assert_eq!(node.purge(cutoff, 1).unwrap(), 1, "the limit is honoured");
    assert_eq!(node.purge(cutoff, 10).unwrap(), 1);
    for t in [&a, &b] {
        assert_eq!(node.get(t.id).unwrap(), None);
        assert!(node.history(t.id).unwrap().is_empty());
    }
    assert!(node.counts().unwrap().is_empty());
    assert!(node.check().unwrap().is_consistent());
    node.shut_down().unwrap();
}

#[test]
fn counters_match_the_rows_and_the_log_matches_every_transition() {
    let s = schema!("counters");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        tasks.push(new_task(
            ["a", "b", "c"][i as usize % 3],
            (i % 4) as i8,
            clock.now(),
            1,
            i,
        ));
    }
    node.insert(tasks.clone()).unwrap();
    node.cancel(tasks[0].id).unwrap();
    let claimed = node.claim(None, 40, clock.now()).unwrap();
    assert_eq!(claimed.len(), 40);
    for (i, t) in claimed.iter().enumerate() {
        match i % 4 {
            0 => {
                applied(node.succeed(t.id, t.lease, b"1"));
            }
            1 => {
                applied(node.fail(t.id, t.lease, TaskError::transient("x", "y")));
            }
            2 => {
                applied(node.fail(t.id, t.lease, TaskError::permanent("x", "y")));
            }
            _ => {} // still running
        }
    }
    assert_eq!(node.counts().unwrap(), counted(&node));
    let total: u64 = node.counts().unwrap().values().sum();
    assert_eq!(total, 60);
    let report = node.check().unwrap();
    assert!(report.is_consistent(), "{:?}", report.problems);
    assert_eq!(report.tasks, 60);
    // 60 enqueued + 1 cancel + 40 claims + 30 finishes.
    assert_eq!(report.log_entries, 60 + 1 + 40 + 30);
    // Tamper with a counter: the check must notice.
    let mut s = s;
    s.execute(
        "UPDATE omniq_counts SET n = n + 1 WHERE ctid = (SELECT ctid FROM omniq_counts LIMIT 1)",
        &[],
    );
    assert!(!node.check().unwrap().is_consistent());
    node.shut_down().unwrap();
}

#[test]
fn finishes_ride_with_the_next_claim_in_one_transaction() {
    let s = schema!("ride");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let tasks: Vec<TaskInfo> = (0..6)
        .map(|i| new_task("q", 0, clock.now(), 3, i))
        .collect();
    node.insert(tasks.clone()).unwrap();
    let first = node.claim(None, 3, clock.now()).unwrap();
    let mut xids = Vec::new();
    let (results, claimed) = node
        .finish_and_claim(
            vec![
                (first[0].id, first[0].lease, Ok(b"1".to_vec())),
                (
                    first[1].id,
                    first[1].lease,
                    Err(TaskError::transient("t", "m")),
                ),
                (first[2].id, first[2].lease + 100, Ok(b"1".to_vec())),
            ],
            None,
            3,
            clock.now(),
        )
        .unwrap();
    assert!(
        matches!(results[0], Ok(FinishResult::Applied(ref t)) if t.status == Status::Completed)
    );
    assert!(matches!(results[1], Ok(FinishResult::Applied(ref t)) if t.status == Status::Pending));
    assert!(matches!(results[2], Ok(FinishResult::Stale)));
    let claimed = claimed.unwrap();
    assert_eq!(claimed.len(), 3);
    // One transaction: the finishes' and the claims' rows carry the same transaction id.
    let mut s = s;
    for id in [first[0].id, claimed[0].id, claimed[2].id] {
        let rows = s.rows(
            "SELECT xmin::text FROM omniq_tasks WHERE id = $1::text::uuid",
            &[&id.to_string()],
        );
        xids.push(rows[0].get::<_, String>(0));
    }
    assert!(xids.windows(2).all(|w| w[0] == w[1]), "{xids:?}");
    node.shut_down().unwrap();
}

#[test]
fn submissions_queued_behind_a_transaction_commit_together_and_reply_in_order() {
    let s = schema!("grouped");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let tasks: Vec<TaskInfo> = (0..10)
        .map(|i| new_task("q", 0, clock.now(), 3, i))
        .collect();
    node.insert(tasks).unwrap();
    let first = node.claim(None, 4, clock.now()).unwrap();
    assert_eq!(first.len(), 4);
    // Another session holds first[0]'s row: the committer's transaction finishing it waits.
    let mut locker = postgres::Client::connect(&s.url, postgres::NoTls).unwrap();
    let mut lock_tx = locker.transaction().unwrap();
    lock_tx
        .execute(
            &format!(
                "SELECT 1 FROM \"{}\".omniq_tasks WHERE id = $1::text::uuid FOR UPDATE",
                s.schema
            ),
            &[&first[0].id.to_string()],
        )
        .unwrap();
    let locker_pid: i32 = lock_tx
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let (claim_tx, claim_rx) = crossbeam_channel::unbounded();
    let now = clock.now();
    let a = node
        .submit(
            vec![(first[0].id, first[0].lease, Ok(b"a".to_vec()))],
            Some((None, 1, now)),
            &claim_tx,
        )
        .unwrap();
    // Wait until the committer is blocked on that row lock (an observation, not a guess).
    let mut watcher = postgres::Client::connect(&s.url, postgres::NoTls).unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&locker_pid],
            )
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    }));
    let before = node.transactions();
    // Two more submissions queue behind it: one with a stale finish, one with an unknown task.
    let b = node
        .submit(
            vec![
                (first[1].id, first[1].lease, Ok(b"b".to_vec())),
                (first[2].id, first[2].lease + 100, Ok(b"stale".to_vec())),
            ],
            Some((None, 2, now)),
            &claim_tx,
        )
        .unwrap();
    let c = node
        .submit(
            vec![
                (first[2].id, first[2].lease, Ok(b"c".to_vec())),
                (TaskId::from_bytes([7; 16]), 1, Ok(b"nobody".to_vec())),
            ],
            Some((None, 3, now)),
            &claim_tx,
        )
        .unwrap();
    lock_tx.commit().unwrap();
    // Claims answer in the order they were sent, each with its own n.
    let sizes: Vec<usize> = (0..3)
        .map(|_| {
            claim_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("a claim reply")
                .expect("claimed")
                .len()
        })
        .collect();
    assert_eq!(sizes, vec![1, 2, 3]);
    assert!(
        matches!(a[0].wait(), Ok(FinishResult::Applied(ref t)) if t.status == Status::Completed)
    );
    assert!(
        matches!(b[0].wait(), Ok(FinishResult::Applied(ref t)) if t.status == Status::Completed)
    );
    assert!(matches!(b[1].wait(), Ok(FinishResult::Stale)));
    assert!(
        matches!(c[0].wait(), Ok(FinishResult::Applied(ref t)) if t.status == Status::Completed)
    );
    assert!(matches!(c[1].wait(), Err(Error::NotFound(_))));
    // The first submission alone, then the two queued behind it in one transaction.
    assert_eq!(node.transactions() - before, 2);
    let report = node.check().unwrap();
    assert!(report.is_consistent(), "{:?}", report.problems);
    assert_eq!(node.counts().unwrap(), counted(&node));
    node.shut_down().unwrap();
}

#[test]
fn two_processes_racing_never_claim_the_same_task() {
    let s = schema!("race");
    let clock = clock();
    let a = Arc::new(s.node(s.options(), &clock));
    let b = Arc::new(s.node(s.options(), &clock));
    let n = 600u64;
    let tasks: Vec<TaskInfo> = (0..n)
        .map(|i| new_task("q", (i % 3) as i8, clock.now(), 3, i))
        .collect();
    a.insert(tasks).unwrap();
    let now = clock.now();
    let mut handles = Vec::new();
    for node in [
        a.clone(),
        b.clone(),
        a.clone(),
        b.clone(),
        a.clone(),
        b.clone(),
    ] {
        handles.push(std::thread::spawn(move || {
            let mut mine = Vec::new();
            let mut pending: Vec<(TaskId, u64, Result<Vec<u8>, TaskError>)> = Vec::new();
            loop {
                let (results, claimed) = node
                    .finish_and_claim(std::mem::take(&mut pending), Some(&["q"]), 7, now)
                    .unwrap();
                for r in results {
                    assert!(matches!(r, Ok(FinishResult::Applied(_))), "{r:?}");
                }
                let claimed = claimed.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                for t in claimed {
                    pending.push((t.id, t.lease, Ok(b"1".to_vec())));
                    mine.push(t.id);
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for h in handles {
        for id in h.join().unwrap() {
            total += 1;
            assert!(seen.insert(id), "task {id} was claimed twice");
        }
    }
    assert_eq!(total, n as usize);
    let counts = a.counts().unwrap();
    assert_eq!(counts.get(&("q".to_string(), Status::Completed)), Some(&n));
    assert_eq!(counts.len(), 1);
    let report = a.check().unwrap();
    assert!(report.is_consistent(), "{:?}", report.problems);
    a.shut_down().unwrap();
    b.shut_down().unwrap();
}

/// Kills `node`'s session from outside, as a lost connection or `pg_terminate_backend` would.
fn terminate(s: &mut PgSchema, node: &PgHarness) {
    let pid = node.session_pid();
    let rows = s.rows("SELECT pg_terminate_backend($1, 5000)", &[&pid]);
    assert!(
        rows[0].get::<_, bool>(0),
        "session {pid} was not terminated"
    );
}

#[test]
fn a_dead_sessions_executions_are_charged_one_crash_and_a_live_nodes_never() {
    let mut s = schema!("rescue");
    let clock = clock();
    let dead = s.node(s.options(), &clock);
    let live = s.node(s.options(), &clock);
    let tasks: Vec<TaskInfo> = (0..6)
        .map(|i| new_task("q", 0, clock.now(), 3, i))
        .collect();
    live.insert(tasks.clone()).unwrap();
    let doomed = dead.claim(None, 3, clock.now()).unwrap();
    let kept = live.claim(None, 2, clock.now()).unwrap();
    assert_eq!((doomed.len(), kept.len()), (3, 2));

    // While both are alive, nothing is rescued.
    let r = live.rescue().unwrap();
    assert_eq!(r.recovered, 0);

    terminate(&mut s, &dead);
    clock.advance(Duration::from_secs(10));
    let r = live.rescue().unwrap();
    assert_eq!((r.recovered, r.requeued, r.failed), (3, 3, 0));
    assert_eq!(r.run_id, live.node_id());
    for t in &doomed {
        let now = live.get(t.id).unwrap().unwrap();
        assert_eq!(now.status, Status::Pending);
        assert_eq!(now.attempts, 1, "the crashed attempt stays counted, once");
        let e = now.last_error.unwrap();
        assert_eq!(e.error_type, "crash");
        assert!(
            e.message.contains(&format!("node {}", dead.node_id())),
            "{}",
            e.message
        );
        assert_eq!(now.next_run_at, Timestamp(clock.now().0 + 1_000));
        let crashes = live
            .history(t.id)
            .unwrap()
            .into_iter()
            .filter(
                |e| matches!(&e.cause, Cause::Failed { error_type, .. } if error_type == "crash"),
            )
            .count();
        assert_eq!(crashes, 1);
    }
    for t in &kept {
        let now = live.get(t.id).unwrap().unwrap();
        assert_eq!(
            now.status,
            Status::Running,
            "a live node's execution was touched"
        );
        assert_eq!(now.lease, t.lease);
    }
    // A second pass finds nothing more: each orphan is charged exactly once.
    assert_eq!(live.rescue().unwrap().recovered, 0);

    // The dead node notices, claims nothing, and its late finishes are fenced.
    assert!(
        eventually(Duration::from_secs(10), || dead.is_lost()),
        "the dead node did not notice"
    );
    assert!(matches!(
        dead.claim(None, 1, clock.now()),
        Err(Error::SessionLost { .. })
    ));
    assert_eq!(
        dead.succeed(doomed[0].id, doomed[0].lease, b"late")
            .unwrap(),
        FinishResult::Stale
    );
    assert_eq!(
        live.get(doomed[0].id).unwrap().unwrap().status,
        Status::Pending
    );
    // The live node's executions finish normally.
    for t in &kept {
        applied(live.succeed(t.id, t.lease, b"1"));
    }
    let report = live.check().unwrap();
    assert!(report.is_consistent(), "{:?}", report.problems);
    live.shut_down().unwrap();
}

#[test]
fn a_crash_on_the_last_attempt_fails_the_task() {
    let mut s = schema!("rescue_budget");
    let clock = clock();
    let dead = s.node(s.options(), &clock);
    let live = s.node(s.options(), &clock);
    let t = new_task("q", 0, clock.now(), 0, 1);
    live.insert(vec![t.clone()]).unwrap();
    dead.claim(None, 1, clock.now()).unwrap();
    terminate(&mut s, &dead);
    let r = live.rescue().unwrap();
    assert_eq!((r.recovered, r.requeued, r.failed), (1, 0, 1));
    let now = live.get(t.id).unwrap().unwrap();
    assert_eq!(now.status, Status::Failed);
    assert_eq!(now.last_error.unwrap().error_type, "crash");
    live.shut_down().unwrap();
}

#[test]
fn heartbeat_mode_rescues_a_stale_node_only_and_that_node_stops_claiming() {
    let mut s = schema!("heartbeat");
    let clock = clock();
    let mut opts = s.options();
    opts.liveness = Liveness::Heartbeat;
    opts.dead_after = Duration::from_secs(30);
    let live = s.node(opts.clone(), &clock);
    // The stale node's own heartbeat thread must not refresh the hour-old time written below
    // before the rescue reads it (under load a 200 ms beat landed in between).
    opts.heartbeat_interval = Duration::from_secs(3600);
    let stale = s.node(opts, &clock);
    let tasks: Vec<TaskInfo> = (0..4)
        .map(|i| new_task("q", 0, clock.now(), 3, i))
        .collect();
    live.insert(tasks).unwrap();
    let theirs = stale.claim(None, 2, clock.now()).unwrap();
    let mine = live.claim(None, 2, clock.now()).unwrap();
    // Heartbeats are fresh: nobody is dead, even though no session lock is held.
    assert_eq!(live.rescue().unwrap().recovered, 0);
    // The stale node's heartbeat is an hour old (as if it had been stopped for that long).
    let id = stale.node_id() as i64;
    let changed = s.execute(
        "UPDATE omniq_nodes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        &[&id],
    );
    assert_eq!(changed, 1);
    let r = live.rescue().unwrap();
    assert_eq!(r.recovered, 2);
    for t in &theirs {
        assert_eq!(live.get(t.id).unwrap().unwrap().status, Status::Pending);
    }
    for t in &mine {
        assert_eq!(live.get(t.id).unwrap().unwrap().status, Status::Running);
    }
    // Its row is gone: its next claim is refused and its finishes are fenced.
    assert!(matches!(
        stale.claim(None, 1, clock.now()),
        Err(Error::SessionLost { .. })
    ));
    assert!(stale.is_lost());
    assert_eq!(
        stale.succeed(theirs[0].id, theirs[0].lease, b"1").unwrap(),
        FinishResult::Stale
    );
    live.shut_down().unwrap();
}

#[test]
fn a_wedged_node_holding_its_lock_is_terminated_then_rescued() {
    let mut s = schema!("wedged");
    let clock = clock();
    let mut opts = s.options();
    opts.dead_after = Duration::from_secs(30);
    let live = s.node(opts.clone(), &clock);
    opts.heartbeat_interval = Duration::from_secs(3600);
    let wedged = s.node(opts, &clock);
    let t = new_task("q", 0, clock.now(), 3, 1);
    live.insert(vec![t.clone()]).unwrap();
    wedged.claim(None, 1, clock.now()).unwrap();
    let id = wedged.node_id() as i64;
    s.execute(
        "UPDATE omniq_nodes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        &[&id],
    );
    // First pass: the lock is held, so it is not rescued, but its session is ended.
    assert_eq!(live.rescue().unwrap().recovered, 0);
    assert_eq!(live.get(t.id).unwrap().unwrap().status, Status::Running);
    assert!(eventually(Duration::from_secs(10), || wedged.is_lost()));
    // Next pass: its lock is free, so it is dead.
    assert!(eventually(Duration::from_secs(10), || {
        live.rescue().map(|r| r.recovered == 1).unwrap_or(false)
    }));
    assert_eq!(live.get(t.id).unwrap().unwrap().status, Status::Pending);
    live.shut_down().unwrap();
}

#[test]
fn notifications_wake_other_processes_dispatchers_and_waiters() {
    let s = schema!("notify");
    let clock = clock();
    // Fallback poll is an hour: only a notification can wake them in time.
    let producer = s.node(s.options(), &clock);
    let other = s.node(s.options(), &clock);
    let waker = other.waker();
    let t = new_task("q", 0, clock.now(), 3, 1);
    producer.insert(vec![t.clone()]).unwrap();
    waker
        .recv_timeout(Duration::from_secs(5))
        .expect("the other process was not woken for new work");
    let c = other.claim(None, 1, clock.now()).unwrap().remove(0);
    let waiter = other.waiter(t.id);
    // Finished by the other process... its own commit wakes it locally; finish from producer.
    let local_events = producer.subscribe();
    applied(producer.succeed(t.id, c.lease, b"1"));
    waiter
        .recv_timeout(Duration::from_secs(5))
        .expect("a waiter was not woken for a task finished in another process");
    // The producer's own subscription heard its commit at once.
    let ev = local_events.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!(ev.entry.to, Status::Completed);
    producer.shut_down().unwrap();
    other.shut_down().unwrap();
}

#[test]
fn migrate_is_idempotent_and_a_newer_schema_is_refused() {
    let mut s = schema!("migrate");
    let mut opts = s.options();
    let r = omniq::postgres::migrate(&s.url, &opts).unwrap();
    assert_eq!((r.from, r.to), (0, SCHEMA_VERSION));
    let r = omniq::postgres::migrate(&s.url, &opts).unwrap();
    assert_eq!((r.from, r.to), (SCHEMA_VERSION, SCHEMA_VERSION));
    s.execute("INSERT INTO omniq_schema (version) VALUES (999)", &[]);
    let e = omniq::postgres::migrate(&s.url, &opts).unwrap_err();
    assert!(
        matches!(&e, Error::SchemaTooNew { found: 999, supported, schema } if *supported == SCHEMA_VERSION && schema.ends_with(&s.schema)),
        "{e}"
    );
    let clock = clock();
    let e = PgHarness::connect(
        &s.url,
        opts.clone(),
        clock,
        Box::new(omniq::retry::FixedJitter(0.5)),
        omniq::Backoff::default(),
    )
    .err()
    .expect("a newer schema must be refused");
    assert!(matches!(e, Error::SchemaTooNew { found: 999, .. }), "{e}");
    // Without auto-migration, a schema that was never migrated is refused with a hint.
    opts.schema = format!("{}_empty", s.schema);
    opts.auto_migrate = false;
    let e = PgHarness::connect(
        &s.url,
        opts.clone(),
        common::pg::clock(),
        Box::new(omniq::retry::FixedJitter(0.5)),
        omniq::Backoff::default(),
    )
    .err()
    .expect("an unmigrated schema must be refused");
    assert!(e.to_string().contains("omniq migrate"), "{e}");
}

#[test]
fn list_pages_newest_first_with_filters() {
    let s = schema!("list");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let tasks: Vec<TaskInfo> = (0..25)
        .map(|i| {
            new_task(
                if i % 2 == 0 { "even" } else { "odd" },
                0,
                clock.now(),
                3,
                i,
            )
        })
        .collect();
    node.insert(tasks.clone()).unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = node
            .list(&ListFilter::new().queue("even").limit(5).cursor(cursor))
            .unwrap();
        seen.extend(page.tasks.iter().map(|t| t.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut expected: Vec<TaskId> = tasks
        .iter()
        .filter(|t| t.queue == "even")
        .map(|t| t.id)
        .collect();
    expected.reverse();
    assert_eq!(seen, expected);
    let running = node
        .list(&ListFilter::new().status(Status::Running))
        .unwrap();
    assert!(running.tasks.is_empty());
    assert!(node.size_on_disk().unwrap() > 0);
    node.shut_down().unwrap();
}

/// A `Queue` whose database session is cut (`pg_terminate_backend`) while a handler runs:
/// another process's rescuer charges the execution a crash, the cut process claims nothing
/// more (new work runs elsewhere), and its handler's late success is fenced.
#[test]
fn a_queue_whose_session_is_cut_stops_claiming_and_its_late_finish_is_fenced() {
    let mut s = schema!("session_cut");
    let mut opts = s.options();
    opts.rescue_interval = Duration::from_millis(100);
    opts.poll_interval = Duration::from_millis(200);
    let url = s.url.clone();
    let open = |opts: omniq::postgres::PgOptions| {
        omniq::Queue::postgres_with(&url, opts)
            .retry_policy(omniq::RetryPolicy {
                max_retries: 3,
                backoff: omniq::Backoff::new(
                    Duration::from_secs(3600),
                    Duration::from_secs(3600),
                    0.0,
                ),
            })
            .open()
            .expect("open")
    };
    let cut = open(opts.clone());
    let cut_node: i64 = s.rows("SELECT max(id) FROM omniq_nodes", &[])[0].get(0);
    let (started_tx, started) = crossbeam_channel::bounded::<u32>(4);
    let (release_tx, release) = crossbeam_channel::bounded::<()>(4);
    let ran_on_cut = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = ran_on_cut.clone();
    cut.register_fn(
        "blocker",
        move |_v: serde_json::Value, ctx: &omniq::TaskContext| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = started_tx.send(ctx.attempt());
            let _ = release.recv_timeout(Duration::from_secs(30));
            Ok::<_, TaskError>(serde_json::json!("late"))
        },
    );
    let pool = cut.workers().concurrency(2).start().unwrap();
    let id = cut
        .enqueue_json(
            "blocker",
            &serde_json::json!({}),
            omniq::EnqueueOptions::new(),
        )
        .unwrap();
    assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), 1);

    // The rescuer, in "another process" (its own node), with a handler that does not block.
    let other = open(opts);
    other.register_fn(
        "blocker",
        |_v: serde_json::Value, _ctx: &omniq::TaskContext| {
            Ok::<_, TaskError>(serde_json::json!("elsewhere"))
        },
    );
    let pid: i32 = s.rows(
        "SELECT session_pid FROM omniq_nodes WHERE id = $1",
        &[&cut_node],
    )[0]
    .get(0);
    assert!(s.rows("SELECT pg_terminate_backend($1, 5000)", &[&pid])[0].get::<_, bool>(0));

    // Rescued as a crash by the other node's background rescuer.
    assert!(eventually(Duration::from_secs(10), || {
        other
            .get(id)
            .unwrap()
            .is_some_and(|t| t.status == Status::Pending)
    }));
    let t = other.get(id).unwrap().unwrap();
    assert_eq!(t.last_error.as_ref().unwrap().error_type, "crash");
    assert_eq!(t.attempts, 1);
    // The cut handler now finishes: fenced, nothing changes.
    release_tx.send(()).unwrap();
    let report = pool.stop();
    assert_eq!(report.abandoned, 0);
    let after = other.get(id).unwrap().unwrap();
    assert_eq!(
        after.status,
        Status::Pending,
        "the late finish of a rescued attempt was applied"
    );
    assert!(!other
        .history(id)
        .unwrap()
        .iter()
        .any(|e| e.cause == Cause::Succeeded));

    // New work runs only elsewhere: the cut process claims nothing any more (its pooled
    // connections still work, so it can still enqueue).
    let cut_pool = cut.workers().concurrency(2).start().unwrap();
    let other_pool = other.workers().concurrency(1).start().unwrap();
    let more = cut
        .enqueue_json(
            "blocker",
            &serde_json::json!({}),
            omniq::EnqueueOptions::new(),
        )
        .unwrap();
    let done = other.wait(more, Duration::from_secs(10)).unwrap();
    assert_eq!(
        done.result::<String>().unwrap().as_deref(),
        Some("elsewhere")
    );
    assert_eq!(ran_on_cut.load(std::sync::atomic::Ordering::SeqCst), 1);
    cut_pool.stop();
    other_pool.stop();
}

#[test]
fn an_insert_is_all_or_none() {
    let s = schema!("insert_atomic");
    let clock = clock();
    let node = s.node(s.options(), &clock);
    let first = new_task("q", 0, clock.now(), 3, 1);
    node.insert(vec![first.clone()]).unwrap();
    let fresh = new_task("q", 0, clock.now(), 3, 2);
    // The second batch repeats an existing id: nothing of it is stored.
    let e = node.insert(vec![fresh.clone(), first.clone()]).unwrap_err();
    assert!(
        e.to_string().contains(&s.schema),
        "the error names the schema: {e}"
    );
    assert_eq!(node.get(fresh.id).unwrap(), None);
    assert!(node.history(fresh.id).unwrap().is_empty());
    assert_eq!(
        node.counts()
            .unwrap()
            .get(&("q".to_string(), Status::Pending)),
        Some(&1)
    );
    node.shut_down().unwrap();
}

/// A burst of commits on one queue sends at most one NOTIFY per `notify_interval` (each
/// notifying commit takes a cluster-wide lock), and the last of the burst is not dropped.
#[test]
fn notifications_are_throttled_per_queue_without_dropping_the_last() {
    let mut s = schema!("notify_throttle");
    let clock = clock();
    let mut opts = s.options();
    opts.notify_interval = Duration::from_millis(300);
    let node = s.node(opts, &clock);
    let channel = format!("omniq:{}", s.schema);
    s.admin
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    let started = std::time::Instant::now();
    let burst = 40;
    for i in 0..burst {
        node.insert(vec![new_task("q", 0, clock.now(), 3, i)])
            .unwrap();
    }
    let burst_took = started.elapsed();
    // Collect for the burst plus two intervals: the trailing notification must arrive.
    let mut payloads = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_millis(700);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let mut notes = s.admin.notifications();
        let mut it = notes.timeout_iter(left);
        use postgres::fallible_iterator::FallibleIterator;
        match it.next().unwrap() {
            Some(n) => payloads.push(n.payload().to_string()),
            None => break,
        }
    }
    let work: Vec<&String> = payloads.iter().filter(|p| p.contains(":w:q")).collect();
    let allowed = (burst_took.as_millis() / 300) as usize + 2;
    assert!(!work.is_empty(), "no notification at all");
    assert!(
        work.len() <= allowed,
        "{} notifications for {burst} commits in {burst_took:?} (at most {allowed})",
        work.len()
    );
    node.shut_down().unwrap();
}

#[cfg(feature = "cli")]
#[test]
fn omniq_migrate_creates_upgrades_and_refuses_a_newer_schema() {
    let mut s = schema!("cli_migrate");
    let url = s.url.clone();
    let name = s.schema.clone();
    let run = |schema: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_omniq"))
            .args(["migrate", "--json", "--url", &url, "--schema", schema])
            .output()
            .unwrap()
    };
    let out = run(&name);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["from"].as_u64(), v["to"].as_u64()),
        (Some(0), Some(SCHEMA_VERSION as u64))
    );
    let out = run(&name);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["from"].as_u64(), Some(SCHEMA_VERSION as u64));
    s.execute("INSERT INTO omniq_schema (version) VALUES (99)", &[]);
    let out = run(&name);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("version 99") && err.contains("upgrade omniq"),
        "{err}"
    );
}

/// A pause set by one process holds for every process: none claims the queue's tasks (nothing
/// is charged) and due counts leave them out, until it is resumed.
#[test]
fn a_pause_holds_across_processes_until_resumed() {
    let s = schema!("pause");
    let clock = clock();
    let a = s.node(s.options(), &clock);
    let b = s.node(s.options(), &clock);
    let paused_task = new_task("mail", 0, clock.now(), 3, 1);
    let other = new_task("other", 0, clock.now(), 3, 2);
    a.insert(vec![paused_task.clone(), other.clone()]).unwrap();
    a.set_paused("mail", true).unwrap();
    assert!(
        b.paused().contains("mail"),
        "another process sees the pause"
    );
    assert_eq!(b.due_summary(None, clock.now(), 10).unwrap().0, 1);
    let claimed = b.claim(None, 10, clock.now()).unwrap();
    assert_eq!(
        claimed.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![other.id]
    );
    let waiting = b.get(paused_task.id).unwrap().unwrap();
    assert_eq!((waiting.status, waiting.attempts), (Status::Pending, 0));
    b.set_paused("mail", false).unwrap();
    assert!(a.paused().is_empty());
    let claimed = a.claim(Some(&["mail"]), 10, clock.now()).unwrap();
    assert_eq!(claimed.len(), 1);
    a.shut_down().unwrap();
    b.shut_down().unwrap();
}

/// `cancel_running` from a process that does not run the execution closes the attempt as
/// `Cancelled` at once (fenced by its lease); the running process's late result is fenced.
#[test]
fn cancel_running_from_another_process_is_fenced() {
    let s = schema!("cancel_running");
    let url = s.url.clone();
    let open = |opts: omniq::postgres::PgOptions| {
        omniq::Queue::postgres_with(&url, opts)
            .open()
            .expect("open")
    };
    let runner = open(s.options());
    let (started_tx, started) = crossbeam_channel::bounded::<()>(1);
    let (release_tx, release) = crossbeam_channel::bounded::<()>(1);
    runner.register_fn(
        "slow",
        move |_v: serde_json::Value, _ctx: &omniq::TaskContext| {
            let _ = started_tx.send(());
            let _ = release.recv_timeout(Duration::from_secs(30));
            Ok::<_, TaskError>(serde_json::json!("done"))
        },
    );
    let pool = runner.workers().concurrency(1).start().unwrap();
    let id = runner
        .enqueue_json("slow", &serde_json::json!({}), omniq::EnqueueOptions::new())
        .unwrap();
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    let operator = open(s.options());
    let cancelled = operator.cancel_running(id).unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(cancelled.attempts, 1);
    release_tx.send(()).unwrap();
    pool.stop();
    let t = operator.get(id).unwrap().unwrap();
    assert_eq!(t.status, Status::Cancelled, "the late result was applied");
    assert!(t.result.is_none());
    assert!(!operator
        .history(id)
        .unwrap()
        .iter()
        .any(|e| e.cause == Cause::Succeeded));
}
