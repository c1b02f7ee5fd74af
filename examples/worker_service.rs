//! A worker process, the way a service runs one: it works until it is told to stop, and a stop
//! (Ctrl-C, `kill PID`, a deploy) costs no task an attempt.
//!
//! ```text
//! cargo run --example worker_service            # runs ~3 s, then stops by itself (exit 0)
//! cargo run --example worker_service            # press Ctrl-C half-way: it drains, exits 130
//! cargo run --example worker_service            # ... and the next start resumes, 0 orphans
//! ```
//!
//! - `pool.stop_on_signals()`: the first `SIGINT` / `SIGTERM` stops claiming and lets running
//!   handlers finish (within the grace period); a second one exits at once, and the tasks still
//!   running are then charged a `crash` attempt at the next open.
//! - `pool.stopper()`: the same graceful stop from your own code; here a thread stops the pool
//!   when the queue is empty, so the example ends by itself.
//! - `pool.wait()`: blocks until one of those stopped the pool and it has drained.
//!
//! The queue lives in `$TMPDIR/omniq-worker-service` so that a second run finds what the first
//! left (`OMNIQ_EXAMPLE_DIR` overrides it).

use std::process::ExitCode;
use std::time::Duration;

use omniq::{EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Thumbnail {
    image: u32,
}

impl Task for Thumbnail {
    const NAME: &'static str = "thumbnail";
    type Output = String;
}

fn main() -> Result<ExitCode, omniq::Error> {
    let dir = std::env::var_os("OMNIQ_EXAMPLE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("omniq-worker-service"));
    let queue = Queue::open(&dir)?;
    let recovered = queue.recovery_report().recovered;
    println!(
        "opened {}: {recovered} task(s) left running by a previous process",
        dir.display()
    );

    queue.register(
        |job: Thumbnail, ctx: &TaskContext| -> Result<String, TaskError> {
            // Real work would be here; a graceful stop lets it finish.
            std::thread::sleep(Duration::from_millis(300));
            Ok(format!(
                "thumbnail of image {} (attempt {})",
                job.image,
                ctx.attempt()
            ))
        },
    );

    let pending = queue.stats()?.count(Status::Pending);
    if pending == 0 {
        let jobs = (0..20).map(|image| Thumbnail { image });
        // max_retries = 0: a job that would fail for good if a restart were charged as a crash.
        queue.enqueue_many_with(jobs, EnqueueOptions::new().max_retries(0))?;
        println!("enqueued 20 jobs");
    } else {
        println!("resuming {pending} pending job(s)");
    }

    let pool = queue
        .workers()
        .concurrency(2)
        .grace_period(Duration::from_secs(10))
        .start()?;
    // First Ctrl-C / SIGTERM: drain gracefully. Second: exit at once.
    pool.stop_on_signals()?;
    println!("working; press Ctrl-C to stop gracefully");

    // Stop by ourselves once nothing is left to do (a real service would keep running).
    let stopper = pool.stopper();
    let watcher = queue.clone();
    std::thread::spawn(move || {
        let events = watcher.subscribe();
        while !stopper.is_stopping() {
            let idle = watcher
                .stats()
                .is_ok_and(|s| s.count(Status::Pending) == 0 && s.count(Status::Running) == 0);
            if idle {
                stopper.stop();
                break;
            }
            let _ = events.recv_timeout(Duration::from_millis(500));
        }
    });

    let report = pool.wait();
    let stats = queue.stats()?;
    println!(
        "stopped{}: {} completed, {} failed, {} pending for the next start, {} abandoned",
        report
            .signal
            .map(|s| format!(" by {s}"))
            .unwrap_or_default(),
        stats.count(Status::Completed),
        stats.count(Status::Failed),
        stats.count(Status::Pending),
        report.abandoned
    );
    if stats.count(Status::Pending) == 0 {
        // Finished: start from scratch next time.
        queue.purge(Duration::ZERO)?;
    }
    // Exit 130 after SIGINT, 143 after SIGTERM: the convention shells and supervisors read.
    Ok(report
        .signal
        .map_or(ExitCode::SUCCESS, |s| ExitCode::from(s.exit_code())))
}
