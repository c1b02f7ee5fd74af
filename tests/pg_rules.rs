//! Unique keys, limits and schedules on PostgreSQL are exact across processes: two `Queue`
//! handles on one schema (each its own node, pool and committer, as two processes would have)
//! race on the same keys, limits and ticks from several threads. Time is a shared manual clock;
//! nothing sleeps. Skipped only when the server cannot be reached and `CI` is unset.
#![cfg(feature = "postgres")]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::pg::PgSchema;
use omniq::postgres::harness::new_task;
use omniq::testing::{self, ManualClock};
use omniq::{
    EnqueueOptions, Inserted, Limit, LimitScope, ListFilter, Missed, Queue, Spec, Timestamp, Unique,
};
use serde_json::json;

macro_rules! schema {
    ($name:expr) => {
        match PgSchema::new($name) {
            Some(s) => s,
            None => return,
        }
    };
}

/// Two handles on `s`, sharing `clock`.
fn two(s: &PgSchema, clock: &ManualClock) -> (Queue, Queue) {
    let open = || {
        Queue::postgres_with(&s.url, s.options())
            .clock(clock.clone())
            .jitter_seed(7)
            .open()
            .expect("open")
    };
    (open(), open())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sync {
    account: u32,
}
impl omniq::Task for Sync {
    const NAME: &'static str = "sync";
    type Output = ();
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Pdf {
    page: u32,
}
impl omniq::Task for Pdf {
    const NAME: &'static str = "pdf";
    type Output = ();
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp(1_700_000_000_000))
}

/// Producers on two handles race with batches of the same keys in different orders: each key
/// is inserted exactly once and every producer learns the same holder; after the holders
/// complete, the next race again inserts each key exactly once.
#[test]
fn unique_keys_hold_under_concurrent_inserts_from_two_handles() {
    let mut s = schema!("rules_unique");
    let clock = clock();
    let (a, b) = two(&s, &clock);
    let keys: Vec<u32> = (0..12).collect();
    for round in 0..2 {
        let barrier = Arc::new(Barrier::new(8));
        let results: Vec<Vec<(u32, Inserted)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let q = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let barrier = barrier.clone();
                    let mut mine = keys.clone();
                    // Each producer its own order, so their key sets overlap every way.
                    mine.rotate_left(i * 5 % keys.len());
                    if i % 3 == 0 {
                        mine.reverse();
                    }
                    sc.spawn(move || {
                        barrier.wait();
                        let mut out = Vec::new();
                        for chunk in mine.chunks(4) {
                            let got = q
                                .insert_many_with(
                                    chunk.iter().map(|&account| Sync { account }),
                                    EnqueueOptions::new().unique(Unique::by_args()),
                                )
                                .expect("insert");
                            out.extend(chunk.iter().copied().zip(got));
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        let mut by_key: BTreeMap<u32, Vec<Inserted>> = BTreeMap::new();
        for (k, r) in results.into_iter().flatten() {
            by_key.entry(k).or_default().push(r);
        }
        for (k, rs) in &by_key {
            assert_eq!(
                rs.iter().filter(|r| !r.duplicate).count(),
                1,
                "round {round} key {k}: {rs:?}"
            );
            assert!(rs.iter().all(|r| r.id == rs[0].id), "key {k}: {rs:?}");
        }
        let held = s.rows("SELECT count(*) FROM omniq_unique", &[]);
        assert_eq!(held[0].get::<_, i64>(0), keys.len() as i64);
        assert!(a.check_consistency().expect("check").is_consistent());
        // Complete every holder (on either handle): the keys are released.
        for i in 0.. {
            let q = if i % 2 == 0 { &a } else { &b };
            match testing::claim_next(q).expect("claim") {
                Some(c) => assert!(c.succeed(&0).expect("succeed")),
                None => break,
            }
        }
        let held = s.rows("SELECT count(*) FROM omniq_unique", &[]);
        assert_eq!(held[0].get::<_, i64>(0), 0, "completion releases");
    }
    assert_eq!(a.stats().expect("stats").total, 2 * keys.len() as u64);
}

/// A concurrency limit of 3 per kind holds across two processes' worker pools (4 workers
/// each, on different queues, so that their claims pick different tasks): no more than 3
/// handlers ever run at once, and 3 do.
#[test]
fn a_concurrency_limit_is_never_exceeded_across_two_pools() {
    let s = schema!("rules_concurrency");
    let options = omniq::postgres::PgOptions {
        // A fallback only: finishes elsewhere wake the pools through NOTIFY.
        poll_interval: Duration::from_millis(500),
        ..s.options()
    };
    let open = || {
        Queue::postgres_with(&s.url, options.clone())
            .open()
            .expect("open")
    };
    let (a, b) = (open(), open());
    a.set_limit(LimitScope::kind("pdf"), Limit::new().concurrency(3))
        .expect("limit");
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    for q in [&a, &b] {
        let (r, m) = (running.clone(), most.clone());
        q.register_fn(
            "pdf",
            move |_v: serde_json::Value, _ctx: &omniq::TaskContext| {
                // A handler runs between its claim's commit and its finish's: fewer run here
                // than the database counts as running, never more.
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, omniq::TaskError>(json!(null))
            },
        );
    }
    let mut ids = Vec::new();
    for queue in ["x", "y"] {
        ids.extend(
            a.enqueue_many_with(
                (0..20).map(|page| Pdf { page }),
                EnqueueOptions::new().queue(queue),
            )
            .expect("insert"),
        );
    }
    let pa = a
        .workers()
        .queues(["x"])
        .concurrency(4)
        .start()
        .expect("pool");
    let pb = b
        .workers()
        .queues(["y"])
        .concurrency(4)
        .start()
        .expect("pool");
    let done = a.wait_all(&ids, Duration::from_secs(60)).expect("wait");
    pa.stop();
    pb.stop();
    assert!(done.iter().all(|t| t.status == omniq::Status::Completed));
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "at most 3 ran at once across both processes, and 3 did"
    );
    assert!(b.check_consistency().expect("check").is_consistent());
}

/// A rate of 5 per 10 s per kind holds across two processes claiming two at a time from
/// different queues (so that they pick different tasks) from eight threads: each window starts
/// exactly 5, whoever claims; the next window opens exactly at its boundary.
#[test]
fn a_rate_limit_is_never_exceeded_across_two_processes() {
    let mut s = schema!("rules_rate");
    let clock = common::pg::clock();
    let a = s.node(s.options(), &clock);
    let b = s.node(s.options(), &clock);
    b.set_limit(
        LimitScope::kind("test"),
        Some(Limit::new().rate(5, Duration::from_secs(10))),
    )
    .expect("limit");
    let tasks: Vec<_> = (0..24)
        .map(|i| new_task(if i % 2 == 0 { "x" } else { "y" }, 0, clock.now(), 0, i))
        .collect();
    a.insert(tasks).expect("insert");
    let mut total = 0;
    for window in 0..5 {
        let barrier = Arc::new(Barrier::new(8));
        let claimed: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let (node, queue) = if i % 2 == 0 { (&a, "x") } else { (&b, "y") };
                    let barrier = barrier.clone();
                    let clock = clock.clone();
                    sc.spawn(move || {
                        barrier.wait();
                        let mut got = 0;
                        loop {
                            let c = node.claim(Some(&[queue]), 2, clock.now()).expect("claim");
                            if c.is_empty() {
                                return got;
                            }
                            for t in c {
                                node.succeed(t.id, t.lease, b"0").expect("succeed");
                                got += 1;
                            }
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("join")).sum()
        });
        let expect = (24 - total).min(5);
        assert_eq!(claimed, expect, "window {window}");
        total += claimed;
        let starts = s.rows("SELECT count(*) FROM omniq_rate_starts", &[]);
        assert_eq!(starts[0].get::<_, i64>(0), expect as i64, "window {window}");
        clock.advance(Duration::from_millis(9_999));
        assert!(a.claim(None, 5, clock.now()).expect("claim").is_empty());
        clock.advance(Duration::from_millis(1));
    }
    assert_eq!(total, 24);
    assert!(a.check().expect("check").is_consistent());
    a.shut_down().expect("shut down");
    b.shut_down().expect("shut down");
}

/// Every node may run the scheduler: two handles firing from four threads at every minute
/// fire each tick exactly once between them.
#[test]
fn a_schedule_tick_fires_once_across_two_handles() {
    let s = schema!("rules_schedule");
    let clock = clock();
    let (a, _) = two(&s, &clock);
    a.schedule_json(
        "minutely",
        Spec::every(Duration::from_secs(60)),
        Missed::CatchUp(5),
        "tick",
        &json!({}),
        EnqueueOptions::new(),
    )
    .expect("schedule");
    // Opened after the schedule exists: both know it.
    let b = Queue::postgres_with(&s.url, s.options())
        .clock(clock.clone())
        .open()
        .expect("open");
    let t0 = clock.now();
    let minutes = 15u64;
    let mut fired_ids = HashSet::new();
    for minute in 1..=minutes {
        // Every few minutes skip one, so that a catch-up of two ticks races too.
        clock.advance(Duration::from_secs(if minute % 4 == 0 { 120 } else { 60 }));
        let barrier = Arc::new(Barrier::new(4));
        let fired: Vec<omniq::TaskId> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let q = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let barrier = barrier.clone();
                    sc.spawn(move || {
                        barrier.wait();
                        q.fire_due_schedules().expect("fire")
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("join"))
                .collect()
        });
        let want = if minute % 4 == 0 { 2 } else { 1 };
        assert_eq!(fired.len(), want, "minute {minute}: {fired:?}");
        fired_ids.extend(fired);
    }
    let ticks: Vec<Timestamp> = a
        .list(&ListFilter::new().limit(1000))
        .expect("list")
        .tasks
        .iter()
        .map(|t| {
            a.extras(t.id)
                .expect("extras")
                .and_then(|e| e.scheduled)
                .expect("scheduled")
                .at
        })
        .collect();
    let distinct: HashSet<Timestamp> = ticks.iter().copied().collect();
    assert_eq!(ticks.len(), distinct.len(), "no tick fired twice");
    let total_minutes = minutes + minutes / 4;
    assert_eq!(ticks.len() as u64, total_minutes);
    assert_eq!(fired_ids.len() as u64, total_minutes);
    assert_eq!(
        distinct.iter().max().copied(),
        Some(t0.plus(Duration::from_secs(60 * total_minutes)))
    );
    let info = &b.schedules().expect("schedules")[0];
    assert_eq!((info.fired, info.skipped), (total_minutes, 0));
}

/// Two processes' worker pools on one schema, on the real clock, run a fast schedule: each
/// sleeps until the next tick (cached per node, no polling), both try every tick, and each tick
/// becomes exactly one task whichever fires it.
#[test]
fn two_pools_run_one_schedule_each_tick_once() {
    let s = schema!("rules_pools_schedule");
    let open = || {
        Queue::postgres_with(&s.url, s.options())
            .open()
            .expect("open")
    };
    let a = open();
    a.schedule_json(
        "fast",
        Spec::every(Duration::from_millis(50)),
        Missed::CatchUp(1_000),
        "tick",
        &json!({}),
        EnqueueOptions::new(),
    )
    .expect("schedule");
    let b = open();
    for q in [&a, &b] {
        q.register_fn(
            "tick",
            |_v: serde_json::Value, _ctx: &omniq::TaskContext| {
                Ok::<_, omniq::TaskError>(json!(null))
            },
        );
    }
    let events = a.subscribe();
    let pa = a.workers().concurrency(2).start().expect("pool");
    let pb = b.workers().concurrency(2).start().expect("pool");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let completed = || {
        a.stats()
            .expect("stats")
            .by_status
            .get(&omniq::Status::Completed)
            .copied()
            .unwrap_or(0)
    };
    while completed() < 8 {
        assert!(
            events.recv_deadline(deadline).is_ok(),
            "only {} ticks ran in 30 s",
            completed()
        );
    }
    pa.stop();
    pb.stop();
    let ticks: Vec<Timestamp> = a
        .list(&ListFilter::new().limit(1000))
        .expect("list")
        .tasks
        .iter()
        .filter_map(|t| a.extras(t.id).expect("extras").and_then(|e| e.scheduled))
        .map(|s| s.at)
        .collect();
    let distinct: HashSet<Timestamp> = ticks.iter().copied().collect();
    assert_eq!(ticks.len(), distinct.len(), "a tick fired twice: {ticks:?}");
    let info = &a.schedules().expect("schedules")[0];
    assert_eq!(info.fired, ticks.len() as u64);
    assert!(a.check_consistency().expect("check").is_consistent());
}
