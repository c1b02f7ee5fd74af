//! The store's contract (issue 2): paging, counters, cancel, atomic batches, wait, purge,
//! retention, reopen. Every test ends with the index-consistency checker.

use std::collections::HashSet;
use std::time::Duration;

use omniq::testing::{self, ManualClock};
use omniq::{
    EnqueueOptions, Error, ListFilter, Queue, Status, Task, TaskContext, TaskError, TaskId,
};
use serde::{Deserialize, Serialize};

mod common;

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Job {
    n: u64,
}
impl Task for Job {
    const NAME: &'static str = "job";
    type Output = u64;
}

#[derive(Serialize, Deserialize)]
struct Other;
impl Task for Other {
    const NAME: &'static str = "other";
    type Output = ();
}

fn manual_queue(dir: &std::path::Path) -> (Queue, ManualClock) {
    let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000));
    let q = Queue::builder(dir)
        .clock(clock.clone())
        .jitter_seed(3)
        .open()
        .unwrap();
    (q, clock)
}

fn assert_consistent(q: &Queue) {
    let r = q.check_consistency().unwrap();
    assert!(r.is_consistent(), "inconsistent store: {:#?}", r.problems);
}

#[test]
fn list_paging_returns_every_task_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _clock) = manual_queue(dir.path());
    let mut ids: Vec<TaskId> = q.enqueue_many((0..237).map(|n| Job { n })).unwrap();
    ids.extend(
        q.enqueue_many_with(
            (0..45).map(|n| Job { n }),
            EnqueueOptions::new().queue("mail"),
        )
        .unwrap(),
    );
    for id in ids.iter().take(20) {
        q.cancel(*id).unwrap();
    }
    // Completed tasks have no state-index key (format 4): listing them scans the records.
    for _ in 0..30 {
        let c = testing::claim_next(&q).unwrap().unwrap();
        assert!(c.succeed(&1u64).unwrap());
    }
    for (filter, expected) in [
        (ListFilter::new(), ids.len()),
        (ListFilter::new().status(Status::Pending), ids.len() - 50),
        (ListFilter::new().status(Status::Cancelled), 20),
        (ListFilter::new().status(Status::Completed), 30),
        (ListFilter::new().status(Status::Completed).queue("mail"), 0),
        (ListFilter::new().queue("mail"), 45),
        (
            ListFilter::new()
                .kind("job")
                .status(Status::Pending)
                .queue("default"),
            237 - 50,
        ),
        (ListFilter::new().kind("nope"), 0),
    ] {
        for page_size in [1, 7, 50, 1000] {
            let mut seen = Vec::new();
            let mut cursor = None;
            let mut pages = 0;
            loop {
                let page = q
                    .list(&filter.clone().limit(page_size).cursor(cursor))
                    .unwrap();
                assert!(page.tasks.len() <= page_size);
                assert!(page.corrupt.is_empty());
                seen.extend(page.tasks.iter().map(|t| t.id));
                pages += 1;
                assert!(pages < 10_000, "paging does not terminate");
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let unique: HashSet<_> = seen.iter().collect();
            assert_eq!(
                unique.len(),
                seen.len(),
                "a task appeared twice ({filter:?}, page {page_size})"
            );
            assert_eq!(seen.len(), expected, "{filter:?}, page {page_size}");
            let mut sorted = seen.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            assert_eq!(seen, sorted, "newest first");
        }
    }
    assert_consistent(&q);
}

#[test]
fn stats_count_per_status_and_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (q, clock) = manual_queue(dir.path());
    q.register(|j: Job, _: &TaskContext| -> Result<u64, TaskError> {
        if j.n.is_multiple_of(3) {
            Err(TaskError::permanent("bad", "multiple of three"))
        } else {
            Ok(j.n)
        }
    });
    q.enqueue_many((0..9).map(|n| Job { n })).unwrap();
    q.enqueue_with(
        Job { n: 1 },
        EnqueueOptions::new()
            .queue("later")
            .delay(Duration::from_secs(60)),
    )
    .unwrap();
    let stats = q.stats().unwrap();
    assert_eq!(stats.count(Status::Pending), 10);
    assert_eq!(stats.total, 10);
    testing::run_due(&q).unwrap();
    let stats = q.stats().unwrap();
    assert_eq!(stats.count(Status::Completed), 6);
    assert_eq!(stats.count(Status::Failed), 3);
    assert_eq!(stats.count(Status::Pending), 1);
    assert_eq!(stats.by_queue["later"][&Status::Pending], 1);
    clock.advance(Duration::from_secs(60));
    testing::run_due(&q).unwrap();
    assert_eq!(q.stats().unwrap().count(Status::Completed), 7);
    assert_eq!(q.stats().unwrap().count(Status::Pending), 0);
    assert_consistent(&q);
}

#[test]
fn cancel_is_for_pending_tasks_only() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _clock) = manual_queue(dir.path());
    let a = q.enqueue(Job { n: 1 }).unwrap();
    let b = q.enqueue(Job { n: 2 }).unwrap();
    let cancelled = q.cancel(a).unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    match q.cancel(a) {
        Err(Error::InvalidState {
            id,
            status: Status::Cancelled,
            ..
        }) => assert_eq!(id, a),
        other => panic!("expected InvalidState, got {other:?}"),
    }
    let claimed = testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(claimed.task.id, b);
    let err = q.cancel(b).unwrap_err();
    assert!(
        err.to_string().contains(&b.to_string()) && err.to_string().contains("RUNNING"),
        "{err}"
    );
    assert_eq!(
        q.get(b).unwrap().unwrap().status,
        Status::Running,
        "a refused cancel changes nothing"
    );
    let missing: TaskId = "0190f5a2-0000-7000-8000-000000000000".parse().unwrap();
    assert!(matches!(q.cancel(missing), Err(Error::NotFound(id)) if id == missing));
    claimed.succeed(&7u64).unwrap();
    assert_consistent(&q);
}

#[test]
fn claim_order_is_priority_then_due_time_then_enqueue_order() {
    let dir = tempfile::tempdir().unwrap();
    let (q, clock) = manual_queue(dir.path());
    let low = q
        .enqueue_with(Job { n: 0 }, EnqueueOptions::new().priority(-5))
        .unwrap();
    let first = q.enqueue(Job { n: 1 }).unwrap();
    let second = q.enqueue(Job { n: 2 }).unwrap();
    let high = q
        .enqueue_with(
            Job { n: 3 },
            EnqueueOptions::new().priority(9).queue("other"),
        )
        .unwrap();
    let scheduled_high = q
        .enqueue_with(
            Job { n: 4 },
            EnqueueOptions::new()
                .priority(100)
                .delay(Duration::from_secs(5)),
        )
        .unwrap();
    let mut order = Vec::new();
    while let Some(c) = testing::claim_next(&q).unwrap() {
        order.push(c.task.id);
        c.succeed(&0u64).unwrap();
    }
    assert_eq!(
        order,
        vec![high, first, second, low],
        "not-yet-due work waits whatever its priority"
    );
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        testing::claim_next(&q).unwrap().unwrap().task.id,
        scheduled_high
    );
}

#[test]
fn enqueue_validates_its_input_and_stores_nothing_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path())
        .max_payload_bytes(64)
        .open()
        .unwrap();
    #[derive(Serialize, Deserialize)]
    struct Big(String);
    impl Task for Big {
        const NAME: &'static str = "big";
        type Output = ();
    }
    let err = q.enqueue(Big("x".repeat(100))).unwrap_err();
    assert!(
        err.to_string().contains("payload") && err.to_string().contains("big"),
        "{err}"
    );
    let err = q
        .enqueue_with(Job { n: 1 }, EnqueueOptions::new().queue(""))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "queue name",
                ..
            }
        ),
        "{err}"
    );
    let err = q
        .enqueue_with(Job { n: 1 }, EnqueueOptions::new().queue("x".repeat(200)))
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }));
    // One bad task in a batch: nothing of the batch is stored.
    let err = q
        .enqueue_many(vec![Big("ok".into()), Big("y".repeat(100))])
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }));
    assert_eq!(q.stats().unwrap().total, 0);
    assert_consistent(&q);
}

#[test]
fn wait_blocks_until_terminal_and_times_out_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let id = q.enqueue(Job { n: 5 }).unwrap();
    match q.wait(id, Duration::from_millis(50)) {
        Err(Error::WaitTimeout {
            id: got,
            status: Status::Pending,
            ..
        }) => assert_eq!(got, id),
        other => panic!("expected WaitTimeout, got {other:?}"),
    }
    let waiter = {
        let q = q.clone();
        std::thread::spawn(move || q.wait(id, Duration::from_secs(30)))
    };
    let c = testing::claim_next(&q).unwrap().unwrap();
    c.succeed(&10u64).unwrap();
    let done = waiter.join().unwrap().unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.result::<u64>().unwrap(), Some(10));
}

#[test]
fn purge_removes_old_finished_tasks_and_their_logs_only() {
    let dir = tempfile::tempdir().unwrap();
    let (q, clock) = manual_queue(dir.path());
    q.register(|j: Job, _: &TaskContext| -> Result<u64, TaskError> { Ok(j.n) });
    let old = q.enqueue_many((0..30).map(|n| Job { n })).unwrap();
    testing::run_due(&q).unwrap();
    clock.advance(Duration::from_secs(3600));
    let recent = q.enqueue_many((0..5).map(|n| Job { n })).unwrap();
    testing::run_due(&q).unwrap();
    let pending = q.enqueue(Job { n: 99 }).unwrap();
    let report = q.purge(Duration::from_secs(1800)).unwrap();
    assert_eq!(report.tasks_removed, 30);
    for id in &old {
        assert!(q.get(*id).unwrap().is_none());
        assert!(
            q.history(*id).unwrap().is_empty(),
            "purge removes the log too"
        );
    }
    for id in &recent {
        assert_eq!(q.get(*id).unwrap().unwrap().status, Status::Completed);
    }
    assert_eq!(q.get(pending).unwrap().unwrap().status, Status::Pending);
    assert_eq!(q.stats().unwrap().total, 6);
    assert_consistent(&q);
}

#[test]
fn retention_purges_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path())
        .retention(Duration::ZERO)
        .purge_interval(Duration::from_millis(20))
        .open()
        .unwrap();
    q.register(|j: Job, _: &TaskContext| -> Result<u64, TaskError> { Ok(j.n) });
    let events = q.subscribe();
    let id = q.enqueue(Job { n: 1 }).unwrap();
    testing::run_due(&q).unwrap();
    // The retention thread removes it; wait for the removal without polling the store.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while q.get(id).unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "retention never purged the task"
        );
        let _ = events.recv_timeout(Duration::from_millis(20));
    }
    assert_consistent(&q);
}

#[test]
fn everything_acknowledged_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    let (first_seq_run, cancelled);
    {
        let q = Queue::open(dir.path()).unwrap();
        first_seq_run = q.recovery_report().run_id;
        for n in 0..50 {
            expected.push((q.enqueue(Job { n }).unwrap(), n));
        }
        let batch = q.enqueue_many((100..200).map(|n| Job { n })).unwrap();
        expected.extend(batch.into_iter().zip(100..200));
        cancelled = expected[3].0;
        q.cancel(cancelled).unwrap();
    }
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(
        q.recovery_report().run_id,
        first_seq_run + 1,
        "each open is a new run"
    );
    assert_eq!(q.recovery_report().recovered, 0);
    for (id, n) in &expected {
        let t = q.get(*id).unwrap().unwrap();
        assert_eq!(t.payload::<Job>().unwrap(), Job { n: *n });
    }
    assert_eq!(q.get(cancelled).unwrap().unwrap().status, Status::Cancelled);
    let history = q.history(cancelled).unwrap();
    assert_eq!(
        history.iter().map(|e| e.to).collect::<Vec<_>>(),
        vec![Status::Pending, Status::Cancelled]
    );
    assert_consistent(&q);
}

#[test]
fn orphans_are_recovered_at_open_and_charged() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000));
    let (retryable, spent);
    {
        let q = Queue::builder(dir.path())
            .clock(clock.clone())
            .open()
            .unwrap();
        retryable = q
            .enqueue_with(Job { n: 1 }, EnqueueOptions::new().max_retries(1))
            .unwrap();
        spent = q
            .enqueue_with(Job { n: 2 }, EnqueueOptions::new().max_retries(0))
            .unwrap();
        testing::claim_next(&q).unwrap().unwrap().abandon();
        testing::claim_next(&q).unwrap().unwrap().abandon();
    }
    let q = Queue::builder(dir.path())
        .clock(clock.clone())
        .open()
        .unwrap();
    let r = q.recovery_report();
    assert_eq!((r.recovered, r.requeued, r.failed), (2, 1, 1));
    let t = q.get(retryable).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Pending, 1));
    assert_eq!(t.last_error.as_ref().unwrap().error_type, "crash");
    assert!(t.next_run_at > clock.now(), "requeued with backoff");
    let t = q.get(spent).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Failed, 1));
    assert_eq!(t.last_error.as_ref().unwrap().error_type, "crash");
    assert_consistent(&q);
    drop(q);
    // Recovery is idempotent: nothing left to recover.
    let q = Queue::builder(dir.path()).clock(clock).open().unwrap();
    assert_eq!(q.recovery_report().recovered, 0);
}

#[test]
fn different_kinds_and_unknown_ids() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let id = q.enqueue(Other).unwrap();
    let t = q.get(id).unwrap().unwrap();
    assert_eq!(t.kind, "other");
    assert_eq!(t.queue, "default");
    assert_eq!(t.max_retries, 3, "default budget");
    let err = t.payload::<Job>().unwrap_err();
    assert!(err.to_string().contains(&id.to_string()), "{err}");
    let unknown: TaskId = "0190f5a2-0000-7000-8000-000000000001".parse().unwrap();
    assert!(q.get(unknown).unwrap().is_none());
    assert!(matches!(q.retry(unknown), Err(Error::NotFound(_))));
    assert!(matches!(q.retry(id), Err(Error::InvalidState { .. })));
}

/// Format 4 purges through per-minute finish buckets, not a per-task index: it must remove
/// exactly the terminal tasks finished before the cutoff whatever the clock did. The queue's
/// clock jumps back and forth by hours between finishes (ids come from the real clock, so id
/// order and finish order disagree), tasks are retried and finish again, finishes land in
/// minutes whose buckets a purge already removed, and after every purge the set of tasks left
/// is exactly the model's and the checker (which verifies every terminal task is covered by a
/// bucket) is satisfied.
#[test]
fn purge_is_exact_whatever_the_clock_does() {
    match std::env::var("OMNIQ_PURGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => purge_model(seed),
        None => (0..8).for_each(purge_model),
    }
}

/// One run of [`purge_is_exact_whatever_the_clock_does`]; the clock moves within 30 minutes so
/// that finishes share minutes (and buckets) often.
fn purge_model(seed: u64) {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let t0 = omniq::Timestamp(1_700_000_000_000);
    let clock = ManualClock::new(t0);
    let q = Queue::builder(dir.path())
        .clock(clock.clone())
        .open()
        .unwrap();
    // Every task stored: finished_at for the terminal ones, None for the live ones.
    let mut model: HashMap<TaskId, Option<omniq::Timestamp>> = HashMap::new();
    let jump = |rng: &mut StdRng| {
        clock.set(t0 + Duration::from_millis(rng.random_range(0..30 * 60_000)));
    };
    for round in 0..40 {
        for _ in 0..rng.random_range(1..6) {
            let id = q
                .enqueue_with(Job { n: round }, EnqueueOptions::new().max_retries(0))
                .unwrap();
            model.insert(id, None);
        }
        for _ in 0..rng.random_range(0..6) {
            jump(&mut rng);
            match rng.random_range(0..3) {
                0 | 1 => {
                    if let Some(c) = testing::claim_next(&q).unwrap() {
                        let id = c.task.id;
                        if rng.random_bool(0.5) {
                            assert!(c.succeed(&1u64).unwrap());
                        } else {
                            assert!(c.fail(TaskError::permanent("x", "no")).unwrap());
                        }
                        model.insert(id, Some(clock.now()));
                    }
                }
                _ => {
                    let live: Vec<TaskId> = model
                        .iter()
                        .filter(|(_, f)| f.is_none())
                        .map(|(id, _)| *id)
                        .collect();
                    if let Some(id) = live.first() {
                        if q.get(*id).unwrap().unwrap().status == Status::Pending {
                            q.cancel(*id).unwrap();
                            model.insert(*id, Some(clock.now()));
                        }
                    }
                }
            }
        }
        // Retry a failed or cancelled task now and then: it must leave the purge's reach
        // until it finishes again.
        if rng.random_bool(0.3) {
            let retryable: Vec<TaskId> = model
                .iter()
                .filter(|(id, f)| {
                    f.is_some() && q.get(**id).unwrap().unwrap().status != Status::Completed
                })
                .map(|(id, _)| *id)
                .collect();
            if let Some(id) = retryable.first() {
                jump(&mut rng);
                q.retry(*id).unwrap();
                model.insert(*id, None);
            }
        }
        if rng.random_bool(0.5) {
            jump(&mut rng);
            let older_than = Duration::from_millis(rng.random_range(0..20 * 60_000));
            let now = clock.now();
            let report = q.purge(older_than).unwrap();
            let gone: Vec<TaskId> = model
                .iter()
                .filter(|(_, f)| f.is_some_and(|f| f + older_than <= now))
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(
                report.tasks_removed,
                gone.len(),
                "seed {seed} round {round}: purge({older_than:?}) at {now}"
            );
            for id in gone {
                model.remove(&id);
            }
        }
        for (id, f) in &model {
            let t = q.get(*id).unwrap();
            assert!(t.is_some(), "seed {seed} round {round}: {id} was lost");
            assert_eq!(t.unwrap().finished_at.is_some(), f.is_some());
        }
        assert_eq!(
            q.stats().unwrap().total,
            model.len() as u64,
            "seed {seed} round {round}"
        );
        assert_consistent(&q);
    }
}

/// Finish buckets do not pile up: once a purge removed everything finished before its cutoff,
/// the buckets of the minutes wholly before it are deleted (by the next commit).
#[test]
fn a_purge_deletes_the_buckets_it_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = omniq::Timestamp(1_700_000_000_000); // a minute boundary: 28_333_333 min + 20 s
    let clock = ManualClock::new(t0);
    let minute = |t: omniq::Timestamp| t.0 / 60_000;
    let mut finished = Vec::new();
    {
        let q = Queue::builder(dir.path())
            .clock(clock.clone())
            .open()
            .unwrap();
        for m in 0..3u64 {
            q.enqueue(Job { n: m }).unwrap();
            let c = testing::claim_next(&q).unwrap().unwrap();
            assert!(c.succeed(&m).unwrap());
            finished.push(clock.now());
            clock.advance(Duration::from_secs(120));
        }
        // Now t0 + 6 min: purge what finished at least 3 min ago (the first two).
        assert_eq!(q.purge(Duration::from_secs(180)).unwrap().tasks_removed, 2);
        q.enqueue(Job { n: 9 }).unwrap();
        assert_consistent(&q);
    }
    let db = common::raw_db(dir.path());
    let buckets: Vec<u64> = db
        .scan_prefix([omniq::keys::FINISHED])
        .keys()
        .map(|k| omniq::keys::decode_finish_bucket(&k.unwrap()).unwrap())
        .collect();
    assert_eq!(buckets, vec![minute(finished[2])]);
}
