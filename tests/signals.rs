//! `SIGINT` / `SIGTERM` are a graceful stop, not a crash (design.md section 3, issue 8): real
//! signals sent with `libc::kill` to real processes.
//!
//! - The `omniq demo` binary: the first `SIGTERM` (or `SIGINT`) drains the running handlers and
//!   the process exits by itself with 143 (130); the next open recovers nothing and no task
//!   carries a `crash` error. A second signal during a long drain ends the process at once,
//!   killed by that signal, and the next open charges the running tasks a `crash`.
//! - The library (`signals_child`, this test binary re-run as a child): two pools listen (one
//!   of them calls `stop_on_signals` twice); one `SIGTERM` drains both while their handlers run,
//!   a `max_retries = 0` task included; once they stopped, `SIGTERM` ends the process again as
//!   by default.
//! - `ShutdownHandle`: stops a pool from another thread; `wait` returns its report.
//!
//! Every wait is on something observable (a line the child prints, the child's exit), bounded
//! by `LONG`; nothing sleeps to let a race settle.

#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use omniq::{Cause, EnqueueOptions, ListFilter, Queue, ShutdownHandle, Signal, Status, TaskInfo};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_omniq");
const CHILD_ENV: &str = "OMNIQ_SIGNALS_CHILD";
const CHILD_DIR_ENV: &str = "OMNIQ_SIGNALS_CHILD_DIR";
/// Upper bound for anything we wait on; tests normally finish far sooner.
const LONG: Duration = Duration::from_secs(60);

/// A child process whose output lines arrive on channels, read by helper threads.
struct Running {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every line read so far, for failure messages.
    seen: Vec<String>,
}

fn lines_of(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Waits (up to `LONG`) for a line on stdout or stderr that contains `needle`; returns the
    /// line from `needle` on (the test harness may print before it on the same line).
    fn line_with(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = crossbeam_channel::select! {
                recv(self.stdout) -> l => l.ok(),
                recv(self.stderr) -> l => l.ok(),
                default(left) => panic!("no line with {needle:?} within {LONG:?}; seen:\n{}", self.seen.join("\n")),
            };
            let Some(line) = line else {
                panic!(
                    "the child closed its output before printing {needle:?}; seen:\n{}",
                    self.seen.join("\n")
                );
            };
            self.seen.push(line.clone());
            if let Some(at) = line.find(needle) {
                return line[at..].to_string();
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits (up to `LONG`) for the child to exit; returns its status and the rest of stdout.
    fn exit(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + LONG;
        let mut rest = Vec::new();
        // stdout closes when the process ends (nothing else holds the pipe).
        loop {
            match self
                .stdout
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "the child did not exit within {LONG:?}; seen:\n{}\n{}",
                        self.seen.join("\n"),
                        rest.join("\n")
                    );
                }
            }
        }
        let status = self.child.wait().unwrap();
        (status, rest.join("\n"))
    }
}

/// `omniq --data DIR --json demo ARGS...`, with its output lines on channels.
fn demo(dir: &Path, args: &[&str]) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data")
        .arg(dir)
        .args(["--json", "demo", "--workers", "4"])
        .args(args)
        .env_remove("OMNIQ_DEMO_WORK_MS");
    Running::spawn(cmd)
}

fn open(dir: &Path) -> Queue {
    common::retry_while_locked(
        || Queue::open(dir),
        |e| matches!(e, omniq::Error::Locked { .. }),
    )
    .unwrap()
}

fn all_tasks(q: &Queue) -> Vec<TaskInfo> {
    q.list(&ListFilter::new().limit(10_000)).unwrap().tasks
}

/// Every execution of every task ended with an outcome its handler reported: no task is
/// `Running`, no error is a `crash` (or an `interrupted` handler), and the log counts exactly the
/// attempts.
fn assert_no_attempt_charged(q: &Queue) {
    assert_eq!(
        q.recovery_report().recovered,
        0,
        "the next open found orphans"
    );
    for t in all_tasks(q) {
        assert_ne!(t.status, Status::Running, "{t:?}");
        for e in &t.errors {
            assert!(
                e.error_type != "crash" && e.error_type != "interrupted",
                "an attempt was charged for the stop: {t:?}"
            );
        }
        let claims = q
            .history(t.id)
            .unwrap()
            .iter()
            .filter(|e| e.cause == Cause::Claimed)
            .count();
        assert_eq!(claims, t.attempts as usize, "{t:?}");
    }
    assert!(q.check_consistency().unwrap().is_consistent());
}

/// The demo, stopped by one `sig` while its handlers (0.75-2.25 s each) run, drains them and
/// exits with `code`; the next open recovers nothing, and a resumed run finishes the workload
/// with no crash in any task's history.
fn demo_drains_on(sig: libc::c_int, name: &str, code: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    let mut child = demo(&d, &["--tasks", "20", "--work-ms", "1500"]);
    // Announced once the first claim has committed: handlers are running now.
    child.line_with("workers started");
    let started = Instant::now();
    child.signal(sig);
    let line = child.line_with(&format!("{name} received: stopping gracefully"));
    let (status, out) = child.exit();
    assert_eq!(status.code(), Some(code), "{status:?}\n{line}\n{out}");
    // A drain, not the 10 s grace period running out.
    assert!(started.elapsed() < Duration::from_secs(9), "{line}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["stopped_by"], name, "{summary}");
    assert_eq!(summary["abandoned_at_stop"], 0, "{summary}");
    assert_eq!(summary["by_status"]["RUNNING"], 0, "{summary}");
    assert!(
        summary["unfinished_tasks"].as_u64().unwrap() > 0,
        "stopped half-way: {summary}"
    );
    {
        let q = open(&d);
        assert_no_attempt_charged(&q);
        // Executions ran (the first four were claimed before the announcement) and each one
        // ended with the outcome its handler returned during the drain.
        let executions: u32 = all_tasks(&q).iter().map(|t| t.attempts).sum();
        assert!(executions >= 4, "{summary}");
    }

    // The next run resumes with 0 orphans and finishes; nothing was ever charged a crash.
    let mut resumed = demo(&d, &["--work-ms", "5"]);
    let (status, out) = {
        resumed.line_with("workers started");
        resumed.exit()
    };
    assert_eq!(status.code(), Some(0), "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["resumed"], true, "{summary}");
    assert_eq!(summary["recovery"]["recovered"], 0, "{summary}");
    assert_eq!(summary["crash_recovered_tasks"], 0, "{summary}");
    assert_eq!(summary["unfinished_tasks"], 0, "{summary}");
    assert_eq!(summary["stopped_by"], Value::Null, "{summary}");
    let q = open(&d);
    assert_no_attempt_charged(&q);
}

#[test]
fn sigterm_drains_the_demo_which_exits_143_and_charges_no_attempt() {
    demo_drains_on(libc::SIGTERM, "SIGTERM", 143);
}

#[test]
fn sigint_drains_the_demo_which_exits_130_and_charges_no_attempt() {
    demo_drains_on(libc::SIGINT, "SIGINT", 130);
}

#[test]
fn a_second_signal_during_the_drain_ends_the_demo_at_once_and_running_tasks_are_charged_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    // Handlers take 30-90 s: far longer than the demo's 10 s grace period.
    let mut child = demo(&d, &["--tasks", "20", "--work-ms", "60000"]);
    child.line_with("workers started");
    child.signal(libc::SIGTERM);
    // The first signal was taken (two signals sent back to back could merge into one).
    let line = child.line_with("SIGTERM received: stopping gracefully");
    let started = Instant::now();
    child.signal(libc::SIGINT);
    let (status, out) = child.exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGINT),
        "killed by the second signal, not an exit: {status:?}\n{line}\n{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "at once, not after the grace period"
    );
    assert!(out.is_empty(), "no summary after the second signal: {out}");

    // The next open finds the 4 executions that were running (all four workers were busy:
    // the first claim took four due tasks in one commit) and charges each a crash.
    let q = open(&d);
    let report = q.recovery_report().clone();
    assert_eq!(report.recovered, 4, "{report:?}\n{line}");
    let crashed: Vec<TaskInfo> = all_tasks(&q)
        .into_iter()
        .filter(|t| t.errors.iter().any(|e| e.error_type == "crash"))
        .collect();
    assert_eq!(crashed.len(), 4);
    for t in &crashed {
        assert_eq!(t.attempts, 1, "{t:?}");
        assert_eq!(t.status, Status::Pending, "budget left: re-queued: {t:?}");
        let e = t.last_error.as_ref().unwrap();
        assert_eq!(
            (e.error_type.as_str(), e.retry_count),
            ("crash", 0),
            "{t:?}"
        );
    }
    assert!(q.check_consistency().unwrap().is_consistent());
}

// ----- the library, in a child process -----------------------------------------------------

/// Two pools (queues `a` and `b`) listen to signals; each runs a handler that prints
/// `STARTED <queue>` and returns only once its pool is stopping, so both are mid-execution when
/// the parent's one `SIGTERM` arrives. Then the child prints its reports and `DRAINED`, and
/// sleeps: with no pool listening, the parent's next `SIGTERM` ends it as by default.
#[test]
fn signals_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return; // Only meaningful as the child of `two_pools_drain_on_one_sigterm_...`.
    };
    assert_eq!(std::env::var(CHILD_ENV).as_deref(), Ok("two_pools"));
    let q = Queue::open(&dir).unwrap();
    let stoppers: std::sync::Arc<parking_lot::Mutex<Vec<ShutdownHandle>>> = Default::default();
    let s = stoppers.clone();
    q.register_fn("wait_for_stop", move |_, ctx| {
        println!("STARTED {}", ctx.queue());
        std::io::stdout().flush().unwrap();
        let deadline = Instant::now() + LONG;
        while !s.lock().iter().all(ShutdownHandle::is_stopping) {
            assert!(Instant::now() < deadline, "never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!ctx.is_cancelled(), "a graceful drain does not cancel");
        Ok(json!(ctx.queue()))
    });
    q.enqueue_json(
        "wait_for_stop",
        &json!(null),
        EnqueueOptions::new().queue("a").max_retries(0),
    )
    .unwrap();
    q.enqueue_json(
        "wait_for_stop",
        &json!(null),
        EnqueueOptions::new().queue("b"),
    )
    .unwrap();
    let a = q.workers().queues(["a"]).concurrency(1).start().unwrap();
    let b = q.workers().queues(["b"]).concurrency(1).start().unwrap();
    a.stop_on_signals().unwrap();
    a.stop_on_signals().unwrap(); // a second call changes nothing
    b.stop_on_signals().unwrap();
    stoppers.lock().extend([a.stopper(), b.stopper()]);
    let ra = a.wait();
    let rb = b.wait();
    println!("REPORT a {:?} {}", ra.signal, ra.abandoned);
    println!("REPORT b {:?} {}", rb.signal, rb.abandoned);
    drop(q);
    println!("DRAINED");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(LONG);
    println!("STILL ALIVE");
    std::process::exit(0);
}

#[test]
fn two_pools_drain_on_one_sigterm_and_later_signals_end_the_process_as_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "signals_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "two_pools")
    .env(CHILD_DIR_ENV, tmp.path());
    let mut child = Running::spawn(cmd);
    let mut started = vec![child.line_with("STARTED "), child.line_with("STARTED ")];
    started.sort();
    assert_eq!(started, ["STARTED a", "STARTED b"]);
    child.signal(libc::SIGTERM);
    assert_eq!(child.line_with("REPORT a"), "REPORT a Some(Terminate) 0");
    assert_eq!(child.line_with("REPORT b"), "REPORT b Some(Terminate) 0");
    child.line_with("DRAINED");
    // No pool listens any more: SIGTERM is back to its default action.
    child.signal(libc::SIGTERM);
    let (status, rest) = child.exit();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?} {rest}");
    assert!(!rest.contains("STILL ALIVE"));

    let q = open(tmp.path());
    assert_no_attempt_charged(&q);
    let tasks = all_tasks(&q);
    assert_eq!(tasks.len(), 2);
    for t in &tasks {
        // The `max_retries = 0` task too: one execution, completed, not failed by the stop.
        assert_eq!((t.status, t.attempts), (Status::Completed, 1), "{t:?}");
    }
}

#[test]
fn a_shutdown_handle_stops_the_pool_from_another_thread_and_wait_returns_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let (started_tx, started_rx) = crossbeam_channel::bounded(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    q.register_fn("slow", move |_, _| {
        started_tx.send(()).unwrap();
        release_rx.recv_timeout(LONG).unwrap();
        Ok(json!("done"))
    });
    let first = q
        .enqueue_json("slow", &json!(1), EnqueueOptions::new())
        .unwrap();
    let second = q
        .enqueue_json("slow", &json!(2), EnqueueOptions::new().priority(-1))
        .unwrap();
    let pool = q.workers().concurrency(1).start().unwrap();
    let stopper = pool.stopper();
    let stopping = stopper.stopping();
    started_rx.recv_timeout(LONG).unwrap();
    assert!(!stopper.is_stopping());
    let t = std::thread::spawn(move || {
        stopper.stop();
        stopper.stop(); // idempotent
        release_tx.send(()).unwrap();
    });
    assert!(stopping
        .recv_timeout(LONG)
        .is_err_and(|e| e == RecvTimeoutError::Disconnected));
    let report = pool.wait();
    t.join().unwrap();
    assert_eq!(
        report,
        omniq::StopReport {
            abandoned: 0,
            signal: None
        }
    );
    assert_eq!(q.get(first).unwrap().unwrap().status, Status::Completed);
    let untouched = q.get(second).unwrap().unwrap();
    assert_eq!((untouched.status, untouched.attempts), (Status::Pending, 0));
    assert_eq!(Signal::Terminate.exit_code(), 143);
    assert_eq!(Signal::Interrupt.exit_code(), 130);
}
