//! The PostgreSQL backend: durable enqueue, `enqueue_many`, the full lifecycle on a worker pool,
//! and enqueue-to-start latency, each phase in a throwaway schema (dropped afterwards).
//!
//! `cargo bench --bench postgres`; the server is `OMNIQ_PG_URL` (default
//! `host=127.0.0.1 user=postgres dbname=postgres`), tasks per phase `OMNIQ_BENCH_TASKS` (default
//! 5,000), worker counts `OMNIQ_BENCH_WORKERS` (default `4,16`), each with every claim-ahead of
//! `OMNIQ_BENCH_AHEAD` (default `0,64`; `WorkerPoolBuilder::claim_ahead`). Then the drain rate of a deep
//! queue: `OMNIQ_BENCH_DEPTHS` (default `10000,200000`; issue 9 compares 10,000 with
//! 1,000,000) pending tasks are enqueued, the task table is vacuumed, and 16 workers run the
//! first `OMNIQ_BENCH_TASKS` of them (claim-ahead `OMNIQ_BENCH_DRAIN_AHEAD`, default 0). Plain timing, one run per figure: the server's WAL flush
//! dominates, so repeat runs on the machine you care about.
//!
//! Then the rules of issue 11 on PostgreSQL, each against its baseline *interleaved* in the same
//! run (`OMNIQ_BENCH_ROUNDS` rounds, default 3; ratios are what to compare on a loaded
//! machine): enqueue with a unique key vs a plain enqueue (1 and 8 producers), and claim +
//! finish one at a time with a kind concurrency limit that never binds vs no limit, then with
//! `OMNIQ_BENCH_HELD` (default 20,000) due tasks held back by a spent limit ahead of them.
//! `OMNIQ_BENCH_ONLY=rules` runs only these.

mod common;

use std::time::{Duration, Instant};

use common::Noop;
use omniq::postgres::PgOptions;
use omniq::{EnqueueOptions, Limit, LimitScope, Queue, Status, TaskContext, TaskError, Unique};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new(url: &str, phase: &str) -> Schema {
        let s = Schema {
            url: url.into(),
            name: format!("omniq_bench_{}_{phase}", std::process::id()),
        };
        s.drop_it();
        s
    }

    fn open(&self) -> Queue {
        Queue::postgres_with(
            &self.url,
            PgOptions {
                schema: self.name.clone(),
                ..PgOptions::default()
            },
        )
        .open()
        .expect("open")
    }

    fn drop_it(&self) {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).expect("connect");
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name))
            .expect("drop schema");
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        self.drop_it();
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let url = env(
        "OMNIQ_PG_URL",
        "host=127.0.0.1 user=postgres dbname=postgres".to_string(),
    );
    let n: usize = env("OMNIQ_BENCH_TASKS", 5_000);
    if env("OMNIQ_BENCH_ONLY", String::new()) == "rules" {
        rules(&url, n);
        return;
    }
    let workers: String = env("OMNIQ_BENCH_WORKERS", "4,16".to_string());
    let aheads: Vec<usize> = env("OMNIQ_BENCH_AHEAD", "0,64".to_string())
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();

    {
        let s = Schema::new(&url, "enqueue");
        let q = s.open();
        let k = (n / 5).max(1);
        let t0 = Instant::now();
        for i in 0..k as u64 {
            q.enqueue(Noop { n: i }).expect("enqueue");
        }
        println!(
            "postgres/enqueue (1 producer, 1 transaction each): {:.0} tasks/s",
            rate(k, t0.elapsed())
        );
    }
    {
        let s = Schema::new(&url, "enqueue_many");
        let q = s.open();
        let t0 = Instant::now();
        for b in 0..n.div_ceil(1000) as u64 {
            q.enqueue_many((b * 1000..(b + 1) * 1000).map(|n| Noop { n }))
                .expect("enqueue_many");
        }
        println!(
            "postgres/enqueue_many (batches of 1,000): {:.0} tasks/s",
            rate(n.div_ceil(1000) * 1000, t0.elapsed())
        );
    }
    for (w, ahead) in workers
        .split(',')
        .filter_map(|w| w.trim().parse::<usize>().ok())
        .flat_map(|w| aheads.iter().map(move |&a| (w, a)))
    {
        let s = Schema::new(&url, &format!("lifecycle_{w}_{ahead}"));
        let q = s.open();
        q.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
        let pool = q
            .workers()
            .concurrency(w)
            .claim_ahead(ahead)
            .start()
            .expect("pool");
        let events = q.subscribe();
        let t0 = Instant::now();
        for b in 0..n.div_ceil(1000) as u64 {
            q.enqueue_many((b * 1000..(b + 1) * 1000).map(|n| Noop { n }))
                .expect("enqueue_many");
        }
        let total = n.div_ceil(1000) * 1000;
        let mut done = 0;
        while done < total {
            let ev = events
                .recv_timeout(Duration::from_secs(120))
                .expect("a task finished within 120 s");
            if ev.entry.to == Status::Completed {
                done += 1;
            }
        }
        println!(
            "postgres/lifecycle ({w} workers, claim-ahead {ahead}, enqueue_many then run to COMPLETED): {:.0} tasks/s",
            rate(total, t0.elapsed())
        );
        // Enqueue-to-start on the now idle pool.
        let mut lat = Vec::new();
        for i in 0..200u64 {
            let t = Instant::now();
            let id = q.enqueue(Noop { n: 1_000_000 + i }).expect("enqueue");
            q.wait(id, Duration::from_secs(30)).expect("wait");
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "postgres/enqueue-to-completed latency, idle pool of {w}, claim-ahead {ahead}: p50 {:.2} ms, p99 {:.2} ms",
            lat[lat.len() / 2].as_secs_f64() * 1e3,
            lat[lat.len() * 99 / 100].as_secs_f64() * 1e3
        );
        let bytes = q.size_on_disk().expect("size");
        let tasks = q.stats().expect("stats").total;
        println!(
            "postgres/disk: {:.0} bytes per completed task (tables, indexes, log)",
            bytes as f64 / tasks.max(1) as f64
        );
        pool.stop();
    }
    let depths: String = env("OMNIQ_BENCH_DEPTHS", "10000,200000".to_string());
    for depth in depths
        .split(',')
        .filter_map(|d| d.trim().parse::<u64>().ok())
    {
        let s = Schema::new(&url, &format!("drain_{depth}"));
        let q = s.open();
        q.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
        let t0 = Instant::now();
        let mut b = 0;
        while b < depth {
            let e = (b + 10_000).min(depth);
            q.enqueue_many((b..e).map(|n| Noop { n }))
                .expect("enqueue_many");
            b = e;
        }
        let filled = t0.elapsed();
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        c.batch_execute(&format!("VACUUM ANALYZE \"{}\".omniq_tasks", s.name))
            .expect("vacuum");
        let events = q.subscribe();
        let m = n.min(depth as usize);
        let t0 = Instant::now();
        let drain_ahead: usize = env("OMNIQ_BENCH_DRAIN_AHEAD", 0);
        let pool = q
            .workers()
            .concurrency(16)
            .claim_ahead(drain_ahead)
            .start()
            .expect("pool");
        let mut done = 0;
        while done < m {
            let ev = events
                .recv_timeout(Duration::from_secs(120))
                .expect("a task finished within 120 s");
            if ev.entry.to == Status::Completed {
                done += 1;
            }
        }
        println!(
            "postgres/drain at depth {depth} (16 workers, claim-ahead {drain_ahead}, first {m} tasks, after VACUUM; filled in {:.0} s): {:.0} tasks/s",
            filled.as_secs_f64(),
            rate(m, t0.elapsed())
        );
        pool.stop();
    }
    rules(&url, n);
}

/// A task of another kind, for the limit phases.
#[derive(serde::Serialize, serde::Deserialize)]
struct Held {
    n: u64,
}

impl omniq::Task for Held {
    const NAME: &'static str = "held";
    type Output = ();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `producers` threads enqueue `k` tasks each, one transaction per task, plain or with a unique
/// key (all distinct: every insert takes a key); tasks/s.
fn enqueue_rate(q: &Queue, producers: usize, k: usize, unique: bool, base: u64) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for p in 0..producers as u64 {
            sc.spawn(move || {
                for i in 0..k as u64 {
                    let task = Noop {
                        n: base + p * 1_000_000 + i,
                    };
                    if unique {
                        q.insert_with(task, EnqueueOptions::new().unique(Unique::by_args()))
                            .expect("insert");
                    } else {
                        q.enqueue(task).expect("enqueue");
                    }
                }
            });
        }
    });
    rate(producers * k, t0.elapsed())
}

/// Claims and completes `m` tasks one at a time (one claim transaction and one finish
/// transaction each); ms per task.
fn claim_cost(q: &Queue, m: usize) -> f64 {
    let t0 = Instant::now();
    for _ in 0..m {
        let c = omniq::testing::claim_next(q)
            .expect("claim")
            .expect("a due task");
        assert!(c.succeed(&()).expect("finish"));
    }
    t0.elapsed().as_secs_f64() * 1e3 / m as f64
}

fn rules(url: &str, n: usize) {
    let rounds: usize = env("OMNIQ_BENCH_ROUNDS", 3);
    let held: u64 = env("OMNIQ_BENCH_HELD", 20_000);
    let s = Schema::new(url, "unique");
    let q = s.open();
    for producers in [1usize, 8] {
        let k = (n / 5 / producers).max(1);
        let (mut plain, mut unique) = (Vec::new(), Vec::new());
        for r in 0..rounds as u64 {
            plain.push(enqueue_rate(&q, producers, k, false, r * 100_000_000));
            unique.push(enqueue_rate(
                &q,
                producers,
                k,
                true,
                r * 100_000_000 + 50_000_000,
            ));
        }
        let (p, u) = (median(plain), median(unique));
        println!(
            "postgres/enqueue with a unique key vs plain ({producers} producer(s), {} rounds interleaved, median): {u:.0} vs {p:.0} tasks/s = {:.0} %",
            rounds,
            100.0 * u / p
        );
    }
    drop(q);
    drop(s);

    let m = (n / 5).max(1);
    let free = Schema::new(url, "claim_free");
    let limited = Schema::new(url, "claim_limited");
    let (qf, ql) = (free.open(), limited.open());
    // A limit that never binds: what the locked, planned claim costs over the plain one.
    ql.set_limit(
        LimitScope::kind("noop"),
        Limit::new().concurrency(1_000_000),
    )
    .expect("limit");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds as u64 {
        for q in [&qf, &ql] {
            q.enqueue_many((0..m as u64).map(|i| Noop {
                n: r * 1_000_000 + i,
            }))
            .expect("enqueue_many");
        }
        a.push(claim_cost(&qf, m));
        b.push(claim_cost(&ql, m));
    }
    let (a, b) = (median(a), median(b));
    println!(
        "postgres/claim + finish, one at a time, kind concurrency limit (never binding) vs none ({rounds} rounds interleaved, median): {b:.2} vs {a:.2} ms per task = {:.2}x",
        b / a
    );
    // Tasks held back by a spent limit, ahead of the claimable ones in claim order.
    ql.set_limit(LimitScope::kind("held"), Limit::new().concurrency(0))
        .expect("limit");
    let mut start = 0;
    while start < held {
        let end = (start + 10_000).min(held);
        ql.enqueue_many((start..end).map(|n| Held { n }))
            .expect("enqueue_many");
        start = end;
    }
    let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    c.batch_execute(&format!("VACUUM ANALYZE \"{}\".omniq_tasks", limited.name))
        .expect("vacuum");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds as u64 {
        for q in [&qf, &ql] {
            q.enqueue_many((0..m as u64).map(|i| Noop {
                n: 100_000_000 + r * 1_000_000 + i,
            }))
            .expect("enqueue_many");
        }
        a.push(claim_cost(&qf, m));
        b.push(claim_cost(&ql, m));
    }
    let (a, b) = (median(a), median(b));
    println!(
        "postgres/claim + finish with {held} due tasks held back by a spent kind limit ahead vs none ({rounds} rounds interleaved, median): {b:.2} vs {a:.2} ms per task = {:.2}x",
        b / a
    );
}
