//! Schedules and limits with a real worker pool on the system clock: the dispatcher fires
//! ticks and waits out rate windows by sleeping until the right instant (no polling), and a
//! concurrency limit holds however many workers the pool has.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omniq::{
    EnqueueOptions, Limit, LimitScope, ListFilter, Missed, Queue, Spec, Status, TaskContext,
    TaskError, Timestamp,
};
use serde_json::json;

mod common;

fn completed(q: &Queue) -> u64 {
    q.stats().unwrap().count(Status::Completed)
}

/// Waits (woken by the engine, not polling the store) until `n` tasks completed.
fn wait_completed(q: &Queue, n: u64, within: Duration) {
    let events = q.subscribe();
    let deadline = Instant::now() + within;
    while completed(q) < n {
        assert!(
            events.recv_deadline(deadline).is_ok(),
            "only {} of {n} tasks completed in {within:?}",
            completed(q)
        );
    }
}

fn noop(q: &Queue, kind: &str) {
    q.register_fn(kind, |_v, _ctx: &TaskContext| -> Result<_, TaskError> {
        Ok(json!(null))
    });
}

#[test]
fn a_pool_fires_schedule_ticks_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    // The handler sees the tick it stands for.
    q.register_fn("tick", |_v, ctx: &TaskContext| -> Result<_, TaskError> {
        let s = ctx
            .scheduled()
            .unwrap()
            .expect("a scheduled task knows its tick");
        assert_eq!(s.schedule, "fast");
        Ok(json!(s.at.as_millis()))
    });
    q.schedule_json(
        "fast",
        Spec::every(Duration::from_millis(40)),
        Missed::CatchUp(1_000),
        "tick",
        &json!({}),
        EnqueueOptions::new(),
    )
    .unwrap();
    let pool = q.workers().concurrency(2).start().unwrap();
    wait_completed(&q, 5, Duration::from_secs(10));
    pool.stop();
    let s = q.schedules().unwrap().remove(0);
    let mut ticks: Vec<Timestamp> = q
        .list(&ListFilter::new().limit(1_000))
        .unwrap()
        .tasks
        .iter()
        .map(|t| q.extras(t.id).unwrap().unwrap().scheduled.unwrap().at)
        .collect();
    ticks.sort();
    for t in q.list(&ListFilter::new().limit(1_000)).unwrap().tasks {
        if t.status == Status::Completed {
            let tick = q.extras(t.id).unwrap().unwrap().scheduled.unwrap().at;
            assert_eq!(t.result::<u64>().unwrap(), Some(tick.as_millis()));
        }
    }
    let expected: Vec<Timestamp> = (1..=s.fired)
        .map(|k| Timestamp(s.created_at.0 + k * 40))
        .collect();
    assert_eq!(ticks, expected, "every tick once, none skipped");
    assert!(s.fired >= 5);
}

#[test]
fn a_pool_keeps_to_a_rate_limit_by_sleeping_until_the_window_frees() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    noop(&q, "r");
    q.set_limit(
        LimitScope::queue("slow"),
        Limit::new().rate(5, Duration::from_millis(200)),
    )
    .unwrap();
    for i in 0..20 {
        q.enqueue_json("r", &json!(i), EnqueueOptions::new().queue("slow"))
            .unwrap();
    }
    let started = Instant::now();
    let pool = q.workers().concurrency(8).start().unwrap();
    wait_completed(&q, 20, Duration::from_secs(20));
    let elapsed = started.elapsed();
    pool.stop();
    // 20 tasks at 5 per 200 ms: the last batch cannot start before 3 windows have passed.
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    let mut starts: Vec<u64> = q
        .list(&ListFilter::new().limit(100))
        .unwrap()
        .tasks
        .iter()
        .map(|t| {
            assert_eq!(t.attempts, 1, "no attempt charged by the limit");
            t.started_at.unwrap().0
        })
        .collect();
    starts.sort();
    for (i, s) in starts.iter().enumerate() {
        let n = starts[i..].iter().take_while(|x| **x < s + 200).count();
        assert!(n <= 5, "{n} starts within 200 ms of {s}");
    }
}

#[test]
fn a_concurrency_limit_holds_with_more_workers() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    q.register_fn(
        "pdf",
        move |_v, _ctx: &TaskContext| -> Result<_, TaskError> {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(null))
        },
    );
    q.set_limit(LimitScope::kind("pdf"), Limit::new().concurrency(2))
        .unwrap();
    for i in 0..12 {
        let queue = if i % 2 == 0 { "a" } else { "b" };
        q.enqueue_json("pdf", &json!(i), EnqueueOptions::new().queue(queue))
            .unwrap();
    }
    let pool = q.workers().concurrency(6).start().unwrap();
    wait_completed(&q, 12, Duration::from_secs(20));
    pool.stop();
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "at most 2 ran at once, and 2 did"
    );
}

/// A paused queue stays paused under a kind limit (the claim then scans by kind).
#[test]
fn a_paused_queue_is_not_claimed_through_the_kind_index() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.set_limit(LimitScope::kind("k"), Limit::new().concurrency(5))
        .unwrap();
    q.enqueue_json("k", &json!(1), EnqueueOptions::new().queue("held"))
        .unwrap();
    let free = q
        .enqueue_json("k", &json!(2), EnqueueOptions::new().queue("free"))
        .unwrap();
    q.pause("held").unwrap();
    let c = omniq::testing::claim_next(&q).unwrap().unwrap();
    assert_eq!(c.task.id, free);
    assert!(omniq::testing::claim_next(&q).unwrap().is_none());
}

/// A limit changed at run time applies at once: a pool sleeping while a limit holds its work
/// back is woken when the limit is raised (no polling: without the wake-up it would sleep on).
#[test]
fn raising_a_limit_at_run_time_wakes_a_sleeping_pool() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    noop(&q, "w");
    q.set_limit(LimitScope::queue("gated"), Limit::new().concurrency(0))
        .unwrap();
    for i in 0..3 {
        q.enqueue_json("w", &json!(i), EnqueueOptions::new().queue("gated"))
            .unwrap();
    }
    let pool = q.workers().concurrency(2).start().unwrap();
    let l = &q.limits().unwrap()[0];
    assert_eq!((l.remaining, l.running), (0, 0));
    assert_eq!(completed(&q), 0, "held back by the limit");
    assert!(q
        .list(&ListFilter::new())
        .unwrap()
        .tasks
        .iter()
        .all(|t| t.attempts == 0));
    q.set_limit(LimitScope::queue("gated"), Limit::new().concurrency(1))
        .unwrap();
    wait_completed(&q, 3, Duration::from_secs(5));
    pool.stop();
}

/// A schedule or limit record that no longer decodes does not keep the queue from opening: it
/// is left out (and logged), and the consistency check names it.
#[test]
fn a_corrupt_schedule_or_limit_record_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(dir.path()).unwrap();
        q.set_limit(LimitScope::queue("a"), Limit::new().concurrency(1))
            .unwrap();
        q.schedule_json(
            "s",
            Spec::every(Duration::from_secs(60)),
            Missed::Skip,
            "t",
            &json!({}),
            EnqueueOptions::new(),
        )
        .unwrap();
        q.close().unwrap();
    }
    {
        let db = common::raw_db(dir.path());
        db.insert(omniq::keys::schedule("s"), vec![7u8, 0, 1, 0xff])
            .unwrap();
        db.insert(omniq::keys::limit(&LimitScope::queue("a")), vec![6u8, 0])
            .unwrap();
        db.flush().unwrap();
    }
    let q = common::reopen(|| Queue::open(dir.path())).unwrap();
    assert!(q.schedules().unwrap().is_empty());
    assert!(q.limits().unwrap().is_empty());
    let report = q.check_consistency().unwrap();
    let text = report.problems.join("\n");
    assert!(text.contains("h/s") && text.contains("r/q/a"), "{text}");
}

/// The admin API and `/metrics` show limits (what runs, what waits) and schedules.
#[cfg(feature = "admin")]
#[test]
fn the_admin_api_and_metrics_show_limits_and_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    q.set_limit(LimitScope::queue("mail"), Limit::new().concurrency(0))
        .unwrap();
    let held = q
        .insert_json(
            "send",
            &json!({"to": 1}),
            EnqueueOptions::new()
                .queue("mail")
                .unique(omniq::Unique::by_args()),
        )
        .unwrap();
    q.schedule_json(
        "hourly",
        Spec::every(Duration::from_secs(3600)),
        Missed::Skip,
        "report",
        &json!({}),
        EnqueueOptions::new(),
    )
    .unwrap();
    let _server = q.admin().serve().unwrap();
    let c = omniq::admin::Client::new(omniq::admin::Endpoint::Unix(
        omniq::admin::default_socket_path(dir.path()),
    ));
    let limits = c.limits().unwrap();
    assert_eq!(limits, q.limits().unwrap());
    assert_eq!(limits[0].waiting, 1);
    assert_eq!(c.schedules().unwrap(), q.schedules().unwrap());
    assert_eq!(c.extras(held.id).unwrap(), q.extras(held.id).unwrap());
    assert!(c.extras(held.id).unwrap().unwrap().unique.is_some());
    let text = c.request("GET", "/metrics", &[], b"").unwrap().text();
    assert!(
        text.contains("omniq_limit_waiting{scope=\"queue\",name=\"mail\"} 1"),
        "{text}"
    );
    assert!(text.contains("omniq_limit_running{scope=\"queue\",name=\"mail\"} 0"));
    assert!(text.contains("omniq_schedule_ticks_total{schedule=\"hourly\",outcome=\"fired\"} 0"));
    // The dashboard's overview lists both, escaped.
    let html = c.request("GET", "/", &[], b"").unwrap().text();
    assert!(
        html.contains("<table id=\"limits\">") && html.contains("queue mail"),
        "{html}"
    );
    assert!(
        html.contains("<table id=\"schedules\">") && html.contains("every 1h"),
        "{html}"
    );
}
