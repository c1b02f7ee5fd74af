//! Unique keys, limits and schedules (issue 11), measured against their targets:
//!
//! 1. enqueue with a unique key vs a plain enqueue (target: within 20 %): one producer under
//!    `Durability::Immediate`, and 8 producers under group commit; 11 alternating rounds,
//!    medians (and the median of each round's ratio, which cancels slow drifts in load);
//! 2. a queue limited to 1,000 starts/s, 8 workers, 6,000 no-op tasks: the starts per second
//!    over the steady part of the run (from the first window's end to the last start), from
//!    the tasks' recorded start times (target: within 5 % of 1,000/s);
//! 3. claim cost with 100,000 due tasks waiting behind a spent limit (a queue limit, then a
//!    kind limit on a kind sharing the queue) vs 100,000 tasks not due yet and vs an empty
//!    store: the median time of one claim of a free task (target: flat).
//!
//! Run: `cargo bench --bench rules` (prints a table; `OMNIQ_BENCH_QUICK=1` for a short run,
//! `OMNIQ_RULES_ONLY=unique|rate|claim` for one section).

mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use omniq::{
    Durability, EnqueueOptions, Limit, LimitScope, Queue, Status, Task, TaskContext, Unique,
};

use common::Noop;

/// The task kind held back by a spent kind limit.
#[derive(serde::Serialize, serde::Deserialize)]
struct Blocked {
    n: u64,
}

impl omniq::Task for Blocked {
    const NAME: &'static str = "blocked";
    type Output = ();
}

fn quick() -> bool {
    std::env::var("OMNIQ_BENCH_QUICK").is_ok()
}

fn open(dir: &std::path::Path, d: Durability) -> Queue {
    Queue::builder(dir).durability(d).open().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Tasks/s of `producers` threads each enqueueing `per` tasks (unique keys when `unique`).
fn enqueue_rate(q: &Queue, producers: usize, per: usize, unique: bool, base: u64) -> f64 {
    let barrier = Barrier::new(producers);
    let started = Instant::now();
    std::thread::scope(|s| {
        for p in 0..producers {
            let (q, barrier) = (q.clone(), &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..per {
                    let n = base + (p * per + i) as u64;
                    let o = if unique {
                        EnqueueOptions::new().unique(Unique::by_args())
                    } else {
                        EnqueueOptions::new()
                    };
                    let r = q.insert_with(Noop { n }, o).unwrap();
                    assert!(!r.duplicate);
                }
            });
        }
    });
    (producers * per) as f64 / started.elapsed().as_secs_f64()
}

fn unique_vs_plain() {
    println!("\n## enqueue: unique key vs plain (median of alternating rounds)\n");
    println!("| mode | plain | unique | unique / plain | median of the rounds' ratios |");
    println!("|---|---|---|---|---|");
    let rounds = if quick() { 3 } else { 11 };
    for (label, d, producers, per) in [
        ("1 producer, Immediate", Durability::Immediate, 1, 400),
        ("8 producers, Group", Durability::Group, 8, 250),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), d);
        let (mut plain, mut unique) = (Vec::new(), Vec::new());
        let mut base = 0u64;
        for _ in 0..rounds {
            plain.push(enqueue_rate(&q, producers, per, false, base));
            base += 1_000_000;
            unique.push(enqueue_rate(&q, producers, per, true, base));
            base += 1_000_000;
        }
        let ratios: Vec<f64> = plain.iter().zip(&unique).map(|(p, u)| u / p).collect();
        let (p, u) = (median(plain), median(unique));
        println!(
            "| {label} | {p:.0}/s | {u:.0}/s | {:.1} % | {:.1} % |",
            u / p * 100.0,
            median(ratios) * 100.0
        );
    }
}

fn rate_limited() {
    println!("\n## a queue limited to 1,000 starts/s (8 workers, no-op handler)\n");
    let tasks = if quick() { 3_000 } else { 6_000 };
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), Durability::Group);
    q.set_limit(
        LimitScope::queue("limited"),
        Limit::new().rate(1_000, Duration::from_secs(1)),
    )
    .unwrap();
    q.register(|_: Noop, _: &TaskContext| -> Result<(), omniq::TaskError> { Ok(()) });
    let opts = EnqueueOptions::new().queue("limited");
    for chunk in (0..tasks as u64).collect::<Vec<_>>().chunks(1_000) {
        q.enqueue_many_with(chunk.iter().map(|&n| Noop { n }), opts.clone())
            .unwrap();
    }
    let started = Instant::now();
    let pool = q.workers().concurrency(8).start().unwrap();
    let mut starts: Vec<u64> = Vec::with_capacity(tasks);
    loop {
        let done = q.stats().unwrap().count(Status::Completed);
        if done as usize == tasks {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "stuck");
        std::thread::sleep(Duration::from_millis(50));
    }
    pool.stop();
    let mut cursor = None;
    loop {
        let page = q
            .list(&omniq::ListFilter::new().limit(1_000).cursor(cursor))
            .unwrap();
        starts.extend(page.tasks.iter().filter_map(|t| t.started_at.map(|s| s.0)));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    starts.sort();
    let first = starts[0];
    let last = *starts.last().unwrap();
    // A sliding window lets each second's 1,000 start in a burst as soon as the window frees
    // them, so the rate is measured over whole windows: the starts in the first K full
    // seconds of the run, divided by K.
    let whole = (last - first) / 1_000;
    let rate = starts
        .iter()
        .filter(|s| **s < first + whole * 1_000)
        .count() as f64
        / whole as f64;
    // The most starts in any 1 s window (must never exceed 1,000).
    let mut worst = 0;
    for (i, s) in starts.iter().enumerate() {
        worst = worst.max(starts[i..].iter().take_while(|x| **x < s + 1_000).count());
    }
    println!("| tasks | wall time | starts/s over whole windows | of 1,000/s | most starts in any 1 s window |");
    println!("|---|---|---|---|---|");
    println!(
        "| {tasks} | {:.2} s | {rate:.0}/s | {:.1} % | {worst} |",
        started.elapsed().as_secs_f64(),
        rate / 10.0
    );
}

/// Median time of one claim of a free task, with `behind` tasks waiting behind a spent limit
/// (`scope`), or (no scope) `behind` tasks in the store that are not due yet.
fn claim_cost(scope: Option<LimitScope>, behind: usize, probes: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), Durability::Group);
    let (blocked_queue, blocked_kind) = match &scope {
        Some(LimitScope::Kind(_)) => ("free", "blocked"),
        _ => ("blocked", Noop::NAME),
    };
    if let Some(scope) = scope.clone() {
        q.set_limit(scope, Limit::new().concurrency(0)).unwrap();
    }
    let mut n = 0u64;
    while (n as usize) < behind {
        let batch = (behind - n as usize).min(5_000) as u64;
        let mut o = EnqueueOptions::new().queue(blocked_queue);
        if scope.is_none() {
            o = o.delay(Duration::from_secs(3600));
        }
        if blocked_kind == "blocked" {
            q.enqueue_many_with((n..n + batch).map(|n| Blocked { n }), o)
                .unwrap();
        } else {
            q.enqueue_many_with((n..n + batch).map(|n| Noop { n }), o)
                .unwrap();
        }
        n += batch;
    }
    let mut samples = Vec::with_capacity(probes);
    for i in 0..probes {
        q.enqueue_with(Noop { n: i as u64 }, EnqueueOptions::new().queue("free"))
            .unwrap();
        let t = Instant::now();
        let c = omniq::testing::claim_next(&q)
            .unwrap()
            .expect("the free task");
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(c.task.kind, Noop::NAME);
        c.succeed(&()).unwrap();
    }
    median(samples)
}

fn claim_behind_limits() {
    println!("\n## claim cost with due tasks waiting behind a spent limit\n");
    let behind = if quick() { 20_000 } else { 100_000 };
    let probes = if quick() { 100 } else { 300 };
    println!("| the store holds | one claim (a durable commit), median |");
    println!("|---|---|");
    let empty = claim_cost(None, 0, probes);
    println!("| nothing else | {empty:.3} ms |");
    let none = claim_cost(None, behind, probes);
    println!("| {behind} tasks not due yet (no limit) | {none:.3} ms |");
    let queue = claim_cost(Some(LimitScope::queue("blocked")), behind, probes);
    println!("| {behind} on a queue whose limit is spent | {queue:.3} ms |");
    let kind = claim_cost(Some(LimitScope::kind("blocked")), behind, probes);
    println!("| {behind} of a spent kind, same queue as the claimed task | {kind:.3} ms |");
}

fn main() {
    // For profiling one side: OMNIQ_RULES_PROBE=plain|unique runs 2,000 Immediate enqueues.
    if let Ok(which) = std::env::var("OMNIQ_RULES_PROBE") {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path(), Durability::Immediate);
        let r = enqueue_rate(&q, 1, 2_000, which == "unique", 0);
        println!("{which}: {r:.0}/s");
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is read.
    println!("# omniq rules benchmarks (cargo bench --bench rules)");
    let only = std::env::var("OMNIQ_RULES_ONLY").unwrap_or_default();
    if only.is_empty() || only == "unique" {
        unique_vs_plain();
    }
    if only.is_empty() || only == "rate" {
        rate_limited();
    }
    if only.is_empty() || only == "claim" {
        claim_behind_limits();
    }
}
