//! The PostgreSQL backend: durable enqueue, `enqueue_many`, the full lifecycle on a worker pool,
//! and enqueue-to-start latency, each phase in a throwaway schema (dropped afterwards).
//!
//! `cargo bench --bench postgres`; the server is `OMNIQ_PG_URL` (default
//! `host=127.0.0.1 user=postgres dbname=postgres`), tasks per phase `OMNIQ_BENCH_TASKS` (default
//! 5,000), worker counts `OMNIQ_BENCH_WORKERS` (default `4,16`). Then the drain rate of a deep
//! queue: `OMNIQ_BENCH_DEPTHS` (default `10000,200000`; issue 9 compares 10,000 with
//! 1,000,000) pending tasks are enqueued, the task table is vacuumed, and 16 workers run the
//! first `OMNIQ_BENCH_TASKS` of them. Plain timing, one run per figure: the server's WAL flush
//! dominates, so repeat runs on the machine you care about.

mod common;

use std::time::{Duration, Instant};

use common::Noop;
use omniq::postgres::PgOptions;
use omniq::{Queue, Status, TaskContext, TaskError};

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
    let workers: String = env("OMNIQ_BENCH_WORKERS", "4,16".to_string());

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
    for w in workers
        .split(',')
        .filter_map(|w| w.trim().parse::<usize>().ok())
    {
        let s = Schema::new(&url, &format!("lifecycle_{w}"));
        let q = s.open();
        q.register(|_: Noop, _: &TaskContext| -> Result<(), TaskError> { Ok(()) });
        let pool = q.workers().concurrency(w).start().expect("pool");
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
            "postgres/lifecycle ({w} workers, enqueue_many then run to COMPLETED): {:.0} tasks/s",
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
            "postgres/enqueue-to-completed latency, idle pool of {w}: p50 {:.2} ms, p99 {:.2} ms",
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
        let pool = q.workers().concurrency(16).start().expect("pool");
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
            "postgres/drain at depth {depth} (16 workers, first {m} tasks, after VACUUM; filled in {:.0} s): {:.0} tasks/s",
            filled.as_secs_f64(),
            rate(m, t0.elapsed())
        );
        pool.stop();
    }
}
