//! Crash recovery, for real: a child process claims a task and dies (abort) in the middle of
//! its handler. The parent reopens the directory: the task is found `Running`, charged the
//! attempt it used with a `"crash"` error, and retried by the ordinary rule.
//!
//! ```text
//! cargo run --example crash_recovery
//! ```
//!
//! (In tests you can simulate the same without a second process: claim a task with
//! `omniq::testing::claim_next`, `abandon()` it, drop every `Queue` clone and reopen.)

use std::process::Command;
use std::time::Duration;

use omniq::{EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Import {
    file: String,
}

impl Task for Import {
    const NAME: &'static str = "import";
    type Output = String;
}

fn main() -> omniq::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(&args[2]);
    }

    let dir = tempfile::tempdir().map_err(omniq::Error::from)?;
    let path = dir.path().join("omniq_data");

    println!("parent: starting a child process that will crash mid-task");
    let exe = std::env::current_exe().map_err(omniq::Error::from)?;
    let status = Command::new(exe)
        .arg("child")
        .arg(&path)
        .status()
        .map_err(omniq::Error::from)?;
    println!("parent: child exited abnormally: {}", !status.success());

    // Reopen: recovery runs before `open` returns, so no worker can claim first.
    let queue = Queue::open(&path)?;
    let report = queue.recovery_report();
    println!(
        "parent: recovery found {} orphaned task(s): {} re-queued, {} failed (budget spent)",
        report.recovered, report.requeued, report.failed
    );
    let id = queue.list(&omniq::ListFilter::new().kind("import"))?.tasks[0].id;
    let t = queue.get(id)?.expect("the task survived the crash");
    let e = t.last_error.as_ref().expect("recovery recorded an error");
    println!(
        "parent: task is {} with attempts = {} (the crashed run counted)",
        t.status, t.attempts
    );
    println!(
        "parent: its error: error_type={:?}, retry_count={}: {}",
        e.error_type, e.retry_count, e.message
    );

    // Run it again, this time without crashing. Handlers must be idempotent: delivery is
    // at-least-once, and the crashed attempt may have done part of its work.
    queue.register(
        |job: Import, ctx: &TaskContext| -> Result<String, TaskError> {
            Ok(format!(
                "imported {} on attempt {}",
                job.file,
                ctx.attempt()
            ))
        },
    );
    let pool = queue.workers().concurrency(1).start()?;
    // Unlike abort() above, Ctrl-C here would let the handler finish: no crash charged.
    pool.stop_on_signals()?;
    let done = queue.wait(id, Duration::from_secs(30))?;
    pool.stop();
    assert_eq!(done.status, Status::Completed);
    println!(
        "parent: {} -> {}",
        done.status,
        done.result::<String>()?.unwrap_or_default()
    );
    println!("parent: history:");
    for entry in queue.history(id)? {
        println!(
            "  {:>9} -> {:<9} attempt {} ({}, run {})",
            entry
                .from
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            entry.to.to_string(),
            entry.attempt,
            entry.cause,
            entry.run_id
        );
    }
    Ok(())
}

fn child(path: &str) -> omniq::Result<()> {
    let queue = Queue::open(path)?;
    queue.register(
        |job: Import, ctx: &TaskContext| -> Result<String, TaskError> {
            println!(
                "child: attempt {} of {:?} started; crashing now",
                ctx.attempt(),
                job.file
            );
            // The claim (attempts + 1) is already durable; the process dies before any outcome.
            std::process::abort();
        },
    );
    queue.enqueue_with(
        Import {
            file: "orders.csv".into(),
        },
        EnqueueOptions::new().max_retries(3),
    )?;
    let _pool = queue.workers().concurrency(1).start()?;
    // The handler aborts the process; this wait never returns normally.
    queue.wait(
        queue.list(&omniq::ListFilter::new())?.tasks[0].id,
        Duration::from_secs(30),
    )?;
    unreachable!("the child crashes before its task finishes");
}
