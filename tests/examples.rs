//! Every example runs, and `examples/retries.rs` prints exactly the tutorial's expected output.
//!
//! The examples are run with `cargo run --example` (cargo builds them if needed), from the
//! package directory.

use std::process::Command;

fn run_example(name: &str) -> String {
    run_example_with(name, &[])
}

fn run_example_with(name: &str, env: &[(&str, &std::path::Path)]) -> String {
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn retries_example_prints_the_tutorials_expected_output() {
    let out = run_example("retries");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 12, "{out}");
    let id = lines[1].strip_prefix("Task ID: ").expect("a Task ID line");
    assert!(
        id.parse::<omniq::TaskId>().is_ok(),
        "{id:?} is not a task id"
    );
    let expected = [
        "Enqueuing flaky task (max_retries=3)...",
        "Task ID: <id>",
        "",
        "Starting workers...",
        "Attempt 1: processing 'test-data'",
        "Attempt 2: processing 'test-data'",
        "Attempt 3: processing 'test-data'",
        "",
        "Checking task result...",
        "Final status: COMPLETED",
        "Total attempts: 3",
        "Result: Success: test-data (attempt 3)",
    ];
    let got: Vec<String> = lines.iter().map(|l| l.replace(id, "<id>")).collect();
    assert_eq!(got, expected);
}

#[test]
fn quickstart_example_runs() {
    let out = run_example("quickstart");
    assert!(
        out.contains("COMPLETED -> cat.png resized to 640 px (attempt 1)"),
        "{out}"
    );
    assert!(
        out.contains("FAILED after 1 attempt(s) -> invalid (permanent): width must be positive"),
        "{out}"
    );
}

#[test]
fn scheduling_example_runs() {
    let out = run_example("scheduling");
    let order: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, what)| what))
        .collect();
    assert_eq!(
        order[..4],
        [
            "urgent (10)",
            "normal priority (0)",
            "send welcome email",
            "low priority (-5)"
        ],
        "{out}"
    );
    assert_eq!(order[4], "delayed by 300 ms", "{out}");
    assert!(order[5].starts_with("scheduled for"), "{out}");
    assert!(out.contains("still PENDING"), "{out}");
    assert!(out.contains("max_retries = 5"), "{out}");
}

#[test]
fn inspect_example_runs() {
    let out = run_example("inspect");
    assert!(out.contains("FAILED after 3 attempt(s)"), "{out}");
    assert!(out.contains("retry_count=2 error_type=network"), "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");
}

#[test]
fn crash_recovery_example_runs() {
    let out = run_example("crash_recovery");
    assert!(
        out.contains("recovery found 1 orphaned task(s): 1 re-queued"),
        "{out}"
    );
    assert!(out.contains("error_type=\"crash\", retry_count=0"), "{out}");
    assert!(
        out.contains("COMPLETED -> imported orders.csv on attempt 2"),
        "{out}"
    );
}

#[test]
fn worker_service_example_runs_until_idle_then_stops_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("service");
    let out = run_example_with("worker_service", &[("OMNIQ_EXAMPLE_DIR", &dir)]);
    assert!(out.contains("0 task(s) left running"), "{out}");
    assert!(out.contains("enqueued 20 jobs"), "{out}");
    assert!(
        out.contains("stopped: 20 completed, 0 failed, 0 pending for the next start, 0 abandoned"),
        "{out}"
    );
}
