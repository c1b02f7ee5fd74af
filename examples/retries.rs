//! The retries tutorial's complete example, in Rust: a task that fails twice, then succeeds,
//! with `max_retries = 3` (up to four executions). Prints the tutorial's "Expected output":
//!
//! ```text
//! Enqueuing flaky task (max_retries=3)...
//! Task ID: <uuid>
//!
//! Starting workers...
//! Attempt 1: processing 'test-data'
//! Attempt 2: processing 'test-data'
//! Attempt 3: processing 'test-data'
//!
//! Checking task result...
//! Final status: COMPLETED
//! Total attempts: 3
//! Result: Success: test-data (attempt 3)
//! ```
//!
//! Run it with `cargo run --example retries`. The backoff is shortened (100 ms, then 200 ms,
//! instead of the default 1 s, 2 s) so it finishes in well under a second.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use omniq::{Backoff, EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

/// The task's argument: the data to process.
#[derive(Serialize, Deserialize)]
struct FlakyTask {
    data: String,
}

impl Task for FlakyTask {
    const NAME: &'static str = "flaky_task";
    type Output = String;
}

fn main() -> omniq::Result<()> {
    // A fresh directory, so attempts count from 1 (the tutorial uses ./omniq_data).
    let dir = tempfile::tempdir().map_err(omniq::Error::from)?;
    let queue = Queue::open(dir.path().join("omniq_data"))?;

    // Track how many times the task is called.
    let call_count = Arc::new(AtomicU32::new(0));
    let calls = call_count.clone();
    queue.register(
        move |task: FlakyTask, _ctx: &TaskContext| -> Result<String, TaskError> {
            let attempt = calls.fetch_add(1, Ordering::SeqCst) + 1;
            println!("Attempt {attempt}: processing '{}'", task.data);
            if attempt <= 2 {
                // Fail the first two attempts: a transient error, so it is retried.
                return Err(TaskError::transient(
                    "runtime",
                    format!("Simulated failure (attempt {attempt}/2)"),
                ));
            }
            Ok(format!("Success: {} (attempt {attempt})", task.data))
        },
    );

    // Enqueue the task with a retry budget.
    println!("Enqueuing flaky task (max_retries=3)...");
    let fast = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.25);
    let task_id = queue.enqueue_with(
        FlakyTask {
            data: "test-data".into(),
        },
        EnqueueOptions::new().max_retries(3).backoff(fast),
    )?;
    println!("Task ID: {task_id}");
    println!();

    // Run workers until the task is finished (woken by the engine, no fixed sleep).
    println!("Starting workers...");
    let workers = queue.workers().concurrency(1).start()?;
    workers.stop_on_signals()?; // Ctrl-C: let the running attempt finish, charge nothing
    let result = queue.wait(task_id, Duration::from_secs(30))?;
    workers.stop();

    // Check the result.
    println!();
    println!("Checking task result...");
    println!("Final status: {}", result.status);
    println!("Total attempts: {}", result.attempts);
    if result.status == Status::Failed {
        if let Some(error) = &result.last_error {
            println!("Error: {error}");
        }
    }
    if let Some(value) = result.result::<String>()? {
        println!("Result: {value}");
    }
    Ok(())
}
