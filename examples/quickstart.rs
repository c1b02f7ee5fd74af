//! The first five minutes with omniq: open a queue directory, define a task, register its
//! handler, enqueue work, run a worker pool, wait for the result.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use omniq::{EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

/// 1. A task is a serde struct holding its arguments, plus a stable name and an output type.
#[derive(Serialize, Deserialize)]
struct Resize {
    image: String,
    width: u32,
}

impl Task for Resize {
    /// Stored with every task; handlers are found by it. Keep it stable across releases.
    const NAME: &'static str = "resize";
    /// What a successful run returns; stored as JSON and readable later.
    type Output = String;
}

fn main() -> omniq::Result<()> {
    // 2. Open (or create) a queue directory. Everything written to it survives restarts and
    //    crashes. (A throwaway directory here; a real program uses a fixed path.)
    let dir = tempfile::tempdir().map_err(omniq::Error::from)?;
    let queue = Queue::open(dir.path().join("omniq_data"))?;

    // 3. Register the code that runs a `Resize`. Return Ok(output), or an error: transient
    //    errors (and any std::error::Error, via `?`) are retried, permanent ones are not.
    queue.register(
        |job: Resize, ctx: &TaskContext| -> Result<String, TaskError> {
            if job.width == 0 {
                return Err(TaskError::permanent("invalid", "width must be positive"));
            }
            Ok(format!(
                "{} resized to {} px (attempt {})",
                job.image,
                job.width,
                ctx.attempt()
            ))
        },
    );

    // 4. Enqueue. The call returns once the task is durable on disk.
    let id = queue.enqueue(Resize {
        image: "cat.png".into(),
        width: 640,
    })?;
    let bad = queue.enqueue_with(
        Resize {
            image: "dog.png".into(),
            width: 0,
        },
        EnqueueOptions::new().max_retries(5),
    )?;
    println!("enqueued {id} and {bad}");

    // 5. Run workers: OS threads that claim due tasks and run their handlers.
    let pool = queue.workers().concurrency(2).start()?;
    //    Ctrl-C or SIGTERM: running handlers finish, then the pool stops; nothing is charged
    //    an attempt (a second signal exits at once). See examples/worker_service.rs.
    pool.stop_on_signals()?;

    // 6. Wait for the results (woken when the task finishes, no polling).
    let done = queue.wait(id, Duration::from_secs(10))?;
    let failed = queue.wait(bad, Duration::from_secs(10))?;
    pool.stop();

    assert_eq!(done.status, Status::Completed);
    println!(
        "{id}: {} -> {}",
        done.status,
        done.result::<String>()?.unwrap_or_default()
    );
    let error = failed
        .last_error
        .as_ref()
        .map(|e| e.to_string())
        .unwrap_or_default();
    println!(
        "{bad}: {} after {} attempt(s) -> {error}",
        failed.status, failed.attempts
    );
    Ok(())
}
