//! Scheduling: delays, absolute run times, priorities, named queues and per-queue retry
//! policies.
//!
//! ```text
//! cargo run --example scheduling
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use omniq::{Backoff, EnqueueOptions, Queue, RetryPolicy, Status, TaskId};
use parking_lot::Mutex;
use serde_json::json;

fn main() -> omniq::Result<()> {
    let dir = tempfile::tempdir().map_err(omniq::Error::from)?;
    // Retry policies can differ per named queue: here "emails" retries 5 times, quickly.
    let queue = Queue::builder(dir.path().join("omniq_data"))
        .queue_retry_policy(
            "emails",
            RetryPolicy {
                max_retries: 5,
                backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 0.25),
            },
        )
        .open()?;

    // One plain-closure handler that records the order things ran in.
    let start = Instant::now();
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = ran.clone();
    queue.register_fn("note", move |args, ctx| {
        let line = format!(
            "{:>5} ms  [{}] {}",
            start.elapsed().as_millis() / 50 * 50, // rounded, so the output is stable
            ctx.queue(),
            args["what"].as_str().unwrap_or("?")
        );
        log.lock().push(line);
        Ok(json!(null))
    });
    let note = |what: &str, options: EnqueueOptions| {
        queue.enqueue_json("note", &json!({ "what": what }), options)
    };

    // --- Priorities: among due tasks, higher priority runs first (then the oldest). ---------
    let mut ids: Vec<TaskId> = vec![
        note("low priority (-5)", EnqueueOptions::new().priority(-5))?,
        note("normal priority (0)", EnqueueOptions::new())?,
        note("urgent (10)", EnqueueOptions::new().priority(10))?,
    ];

    // --- Delays and absolute times: Pending until due. ----------------------------------
    ids.push(note(
        "delayed by 300 ms",
        EnqueueOptions::new().delay(Duration::from_millis(300)),
    )?);
    let at = queue.now() + Duration::from_millis(600);
    ids.push(note(
        &format!("scheduled for {at}"),
        EnqueueOptions::new().run_at(at),
    )?);

    // --- Named queues: a pool serves only the queues it is told to. ---------------------
    let email = note("send welcome email", EnqueueOptions::new().queue("emails"))?;
    let report = note("nightly report", EnqueueOptions::new().queue("reports"))?;

    // One worker, so the priority order is visible; it serves "default" and "emails" only.
    let pool = queue
        .workers()
        .concurrency(1)
        .queues(["default", "emails"])
        .start()?;
    pool.stop_on_signals()?; // Ctrl-C: let the running handler finish, charge nothing
    for id in ids.iter().chain([&email]) {
        queue.wait(*id, Duration::from_secs(10))?;
    }
    pool.stop();

    println!("Ran, in order:");
    for line in ran.lock().iter() {
        println!("  {line}");
    }

    let r = queue.get(report)?.expect("the report task exists");
    assert_eq!(r.status, Status::Pending);
    println!(
        "\n\"reports\" has no worker, so its task is still {} (queue {:?}).",
        r.status, r.queue
    );
    let e = queue.get(email)?.expect("the email task exists");
    println!(
        "The email task got its queue's budget: max_retries = {}.",
        e.max_retries
    );

    // Another pool can serve "reports" later; nothing is lost meanwhile.
    let pool = queue.workers().concurrency(1).queues(["reports"]).start()?;
    pool.stop_on_signals()?; // again for this pool: handlers are installed once per process
    let r = queue.wait(report, Duration::from_secs(10))?;
    pool.stop();
    println!("After starting a \"reports\" worker: {}.", r.status);
    Ok(())
}
