//! Inspecting a queue: `get`, `list` (filters and pages), `stats`, `history`, and reading
//! typed results and error records.
//!
//! ```text
//! cargo run --example inspect
//! ```

use std::time::Duration;

use omniq::{
    Backoff, EnqueueOptions, ListFilter, Queue, RetryPolicy, Status, Task, TaskContext, TaskError,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Divide {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize, Debug)]
struct Quotient {
    value: i64,
    remainder: i64,
}

impl Task for Divide {
    const NAME: &'static str = "divide";
    type Output = Quotient;
}

fn main() -> omniq::Result<()> {
    let dir = tempfile::tempdir().map_err(omniq::Error::from)?;
    // Quick retries for the demo: 2 retries, 10 ms apart.
    let queue = Queue::builder(dir.path().join("omniq_data"))
        .retry_policy(RetryPolicy {
            max_retries: 2,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50), 0.25),
        })
        .open()?;
    queue.register(
        |d: Divide, _: &TaskContext| -> Result<Quotient, TaskError> {
            match d.b {
                0 => Err(TaskError::permanent(
                    "invalid",
                    format!("{} / 0 is undefined", d.a),
                )),
                // Pretend negative divisors hit a flaky service: a transient error, retried.
                b if b < 0 => Err(TaskError::transient(
                    "network",
                    "the division service timed out",
                )),
                b => Ok(Quotient {
                    value: d.a / b,
                    remainder: d.a % b,
                }),
            }
        },
    );

    let ids = queue.enqueue_many((1..=6).map(|a| Divide { a: a * 10, b: 3 }))?;
    let zero = queue.enqueue(Divide { a: 1, b: 0 })?;
    let flaky = queue.enqueue(Divide { a: 1, b: -1 })?;
    let later = queue.enqueue_with(
        Divide { a: 9, b: 3 },
        EnqueueOptions::new().delay(Duration::from_secs(3600)),
    )?;

    let pool = queue.workers().concurrency(2).start()?;
    pool.stop_on_signals()?; // Ctrl-C: let running handlers finish, charge nothing
    for id in ids.iter().chain([&zero, &flaky]) {
        queue.wait(*id, Duration::from_secs(10))?;
    }
    pool.stop();

    // --- get + typed result ------------------------------------------------------------
    let t = queue.get(ids[0])?.expect("exists");
    let q: Quotient = t.result()?.expect("completed tasks have a result");
    println!(
        "get {}: {} after {} attempt(s), result {q:?}",
        t.id, t.status, t.attempts
    );
    println!("  payload as JSON: {}", t.payload_json());

    // --- errors: the last one and the history --------------------------------------------
    for id in [zero, flaky] {
        let t = queue.get(id)?.expect("exists");
        println!(
            "task {}: {} after {} attempt(s)",
            t.id, t.status, t.attempts
        );
        for e in &t.errors {
            println!(
                "  retry_count={} error_type={} permanent={} at {}: {}",
                e.retry_count, e.error_type, e.permanent, e.timestamp, e.message
            );
        }
    }

    // --- stats: counters, per status and per queue ---------------------------------------
    let stats = queue.stats()?;
    println!("stats: total {}", stats.total);
    for (status, n) in &stats.by_status {
        println!("  {:<9} {n}", status.to_string());
    }

    // --- list: filters and pages (newest first) --------------------------------------------
    let failed = queue.list(&ListFilter::new().status(Status::Failed))?;
    println!("failed tasks: {}", failed.tasks.len());
    let mut filter = ListFilter::new().kind("divide").limit(4);
    let mut page_no = 1;
    loop {
        let page = queue.list(&filter)?;
        let shown: Vec<String> = page.tasks.iter().map(|t| format!("{}", t.status)).collect();
        println!("page {page_no}: {}", shown.join(", "));
        match page.next_cursor {
            Some(c) => filter = filter.cursor(Some(c)),
            None => break,
        }
        page_no += 1;
    }

    // --- history: every transition, in order ---------------------------------------------
    println!("history of the flaky task:");
    for e in queue.history(flaky)? {
        let from = e.from.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  #{:<3} {from:>9} -> {:<9} attempt {}  {}",
            e.seq,
            e.to.to_string(),
            e.attempt,
            e.cause
        );
    }

    let l = queue.get(later)?.expect("exists");
    println!("the delayed task is {} until {}", l.status, l.next_run_at);
    let report = queue.check_consistency()?;
    println!(
        "consistency check: {} tasks, {} log entries, {} problem(s)",
        report.tasks,
        report.log_entries,
        report.problems.len()
    );
    Ok(())
}
