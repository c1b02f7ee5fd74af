//! The `omniq` CLI against a live queue (issue 10): while a process holds the directory and
//! serves its admin socket, every command goes through the socket, prints exactly what it
//! prints on a closed directory, and says so in one line on stderr. Also `omniq serve` and the
//! socket `omniq demo` serves while it runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use omniq::admin::{Client, Endpoint};
use omniq::{EnqueueOptions, Queue, Status, TaskError, TaskId};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_omniq");
const NOTE: &str = "going through its admin socket";

fn omniq(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .expect("run omniq")
}

fn ok(dir: &Path, args: &[&str]) -> (String, String) {
    let o = omniq(dir, args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "omniq {args:?} failed:\n{out}{err}");
    (out, err)
}

/// Runs a command that must go through the socket: says so in exactly one stderr line.
fn remote(dir: &Path, args: &[&str]) -> String {
    let (out, err) = ok(dir, args);
    let notes: Vec<&str> = err.lines().filter(|l| l.contains(NOTE)).collect();
    assert_eq!(notes.len(), 1, "omniq {args:?}: stderr:\n{err}");
    assert!(notes[0].starts_with("note: "), "{err}");
    out
}

fn remote_json(dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&remote(dir, &a)).unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    done: TaskId,
    failed: TaskId,
    scheduled: TaskId,
    unique: TaskId,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let q = Queue::open(&dir).unwrap();
    q.register_fn("resize", |v, _| Ok(json!({ "ok": v["n"] })));
    q.register_fn("email", |_, _| {
        Err(TaskError::transient("smtp", "relay unreachable"))
    });
    // A unique task, oldest of all (issue 11; shown with its key by `show`).
    let unique = q
        .enqueue_json(
            "report",
            &json!({"once": true}),
            EnqueueOptions::new()
                .delay(Duration::from_secs(3600))
                .unique(omniq::Unique::by_args()),
        )
        .unwrap();
    let done = q
        .enqueue_json("resize", &json!({"n": 1}), EnqueueOptions::new())
        .unwrap();
    let failed = q
        .enqueue_json(
            "email",
            &json!({"to": "ada@example.com"}),
            EnqueueOptions::new().queue("emails").max_retries(0),
        )
        .unwrap();
    let scheduled = q
        .enqueue_json(
            "report",
            &json!({}),
            EnqueueOptions::new()
                .delay(Duration::from_secs(3600))
                .priority(-5)
                .timeout(Duration::from_secs(90)),
        )
        .unwrap();
    assert_eq!(omniq::testing::run_due(&q).unwrap().executions, 2);
    // Issue 11's parts: a limit, a schedule and a unique task (shown by stats, schedules, show).
    q.set_limit(
        omniq::LimitScope::kind("report"),
        omniq::Limit::new().concurrency(3),
    )
    .unwrap();
    q.schedule_json(
        "nightly",
        omniq::Spec::cron("0 3 * * *", "Europe/Paris").unwrap(),
        omniq::Missed::RunOnce,
        "report",
        &json!({"kind": "nightly"}),
        EnqueueOptions::new(),
    )
    .unwrap();
    drop(q);
    Fixture {
        _tmp: tmp,
        dir,
        done,
        failed,
        scheduled,
        unique,
    }
}

#[test]
fn every_command_goes_through_the_socket_with_identical_output() {
    let f = fixture();
    let d = f.dir.as_path();
    let (done, failed, scheduled, unique) = (
        f.done.to_string(),
        f.failed.to_string(),
        f.scheduled.to_string(),
        f.unique.to_string(),
    );
    let reads: Vec<Vec<&str>> = vec![
        vec!["stats"],
        vec!["--json", "stats"],
        vec!["list"],
        vec!["--json", "list"],
        vec!["list", "--status", "failed", "--queue", "emails"],
        vec!["--json", "list", "--limit", "1"],
        vec!["show", &failed],
        vec!["--json", "show", &failed],
        vec!["show", &done],
        vec!["--json", "show", &scheduled],
        vec!["check"],
        vec!["--json", "check"],
        vec!["schedules"],
        vec!["--json", "schedules"],
        vec!["show", &unique],
        vec!["--json", "show", &unique],
    ];
    // On the closed directory first ...
    let local: Vec<String> = reads
        .iter()
        .map(|a| {
            let (out, err) = ok(d, a);
            assert!(!err.contains(NOTE));
            out
        })
        .collect();

    assert!(local[12].contains("nightly"), "{}", local[12]);
    assert!(local[14].contains("unique key"), "{}", local[14]);
    assert!(local[0].contains("kind report"), "{}", local[0]);
    // ... then held by a live process serving its socket: the same output.
    let q = Queue::open(d).unwrap();
    let server = q.admin().serve().unwrap();
    for (a, want) in reads.iter().zip(&local) {
        assert_eq!(
            &remote(d, a),
            want,
            "omniq {a:?} differs through the socket"
        );
    }

    // Actions go through the live queue and agree with what the library sees.
    let v = remote_json(d, &["retry", &failed]);
    assert_eq!(
        (v["command"].as_str(), v["count"].as_u64()),
        (Some("retry"), Some(1))
    );
    let t = q.get(f.failed).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Pending, 0));
    assert_eq!(v["tasks"][0]["status"], "PENDING");
    let text = remote(d, &["cancel", &scheduled]);
    assert_eq!(text, format!("task {scheduled} cancelled\n"));
    assert_eq!(
        q.get(f.scheduled).unwrap().unwrap().status,
        Status::Cancelled
    );
    let v = remote_json(d, &["stats"]);
    let lib = q.stats().unwrap();
    assert_eq!(v["total"], lib.total);
    assert_eq!(v["by_status"]["CANCELLED"], lib.count(Status::Cancelled));
    // The retried task and the unique one.
    assert_eq!(v["by_status"]["PENDING"], 2);
    let listed = remote_json(d, &["list", "--status", "pending"]);
    assert_eq!(listed["tasks"][0]["id"], failed);
    let v = remote_json(d, &["purge", "--older-than", "0s", "--dry-run"]);
    assert_eq!(
        (v["dry_run"].as_bool(), v["count"].as_u64()),
        (Some(true), Some(2))
    );
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);
    assert!(
        q.get(f.done).unwrap().is_some(),
        "a dry run removes nothing"
    );
    let v = remote_json(d, &["purge", "--older-than", "0s"]);
    assert_eq!(v["count"], 2);
    assert!(q.get(f.done).unwrap().is_none());
    // The live process compacts its own store; its tasks stay.
    let before = q.stats().unwrap();
    let v = remote_json(d, &["compact"]);
    assert_eq!(v["compacted"], true, "{v}");
    assert!(v["keys_copied"].as_u64().unwrap() > 0, "{v}");
    assert!(d.join("sled.current").exists());
    assert_eq!(q.stats().unwrap().total, before.total);

    // Errors keep their meaning (and one line).
    let o = omniq(d, &["cancel", &done]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found"), "{err}");
    let o = omniq(d, &["retry", &failed]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot retry"), "{err}");
    let o = omniq(d, &["--json", "retry", &failed]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["error"]["kind"], "invalid_state",
        "the same kind as a local refusal: {v}"
    );

    // Once the server is gone (even if its socket file were left), commands open the
    // directory themselves again -- or report the lock if the holder lives on.
    server.stop();
    let o = omniq(d, &["stats"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use by another process"));
    drop(q);
    let (_, err) = ok(d, &["stats"]);
    assert!(!err.contains(NOTE));
}

fn wait_for_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the process ended before printing {prefix:?}"))
            .unwrap();
        if line.starts_with(prefix) {
            return line;
        }
    }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn omniq_demo_serves_its_socket_while_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    let child = Command::new(BIN)
        .arg("--data")
        .arg(&d)
        .args([
            "demo",
            "--tasks",
            "40",
            "--workers",
            "2",
            "--work-ms",
            "5000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_for_line(&mut child.0, "workers started");
    let v = remote_json(&d, &["stats"]);
    assert_eq!(v["total"], 40);
    let listed = remote_json(&d, &["list", "--limit", "5"]);
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 5);
    let id = listed["tasks"][0]["id"].as_str().unwrap().to_string();
    let shown = remote_json(&d, &["show", &id]);
    assert_eq!(shown["id"], id);
    assert!(shown["history"].as_array().is_some_and(|h| !h.is_empty()));

    // A running task can be cancelled through the socket: its handler is told, and the attempt
    // ends CANCELLED. (Handlers run for 2.5-7.5 s; the CLI answers in milliseconds.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let running = loop {
        let l = remote_json(&d, &["list", "--status", "running", "--limit", "1"]);
        if let Some(id) = l["tasks"][0]["id"].as_str() {
            break id.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no task started running"
        );
    };
    let text = remote(&d, &["cancel", &running]);
    assert!(text.contains("cancellation requested"), "{text}");
    let status = loop {
        let s = remote_json(&d, &["show", &running]);
        let status = s["status"].as_str().unwrap().to_string();
        if status != "RUNNING" || std::time::Instant::now() > deadline {
            break s;
        }
    };
    assert_eq!(status["status"], "CANCELLED", "{status}");
    let last = status["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (last["from"].as_str(), last["cause"].as_str()),
        (Some("RUNNING"), Some("cancelled"))
    );
}

#[test]
fn omniq_serve_opens_a_stopped_directory_with_no_workers() {
    let f = fixture();
    let d = f.dir.as_path();
    let o = omniq(d, &["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("token"));
    let o = omniq(d, &["serve", "--listen", "nowhere"]);
    assert_eq!(o.status.code(), Some(2));

    let child = Command::new(BIN)
        .arg("--data")
        .arg(d)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let line = wait_for_line(&mut child.0, "serving");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let c = Client::new(Endpoint::Tcp(addr));
    assert_eq!(c.get_json("/api/v1/health").unwrap()["status"], "ok");
    let t = c.get(f.failed).unwrap().unwrap();
    assert_eq!(t.status, Status::Failed);
    // The CLI goes through it too, and nothing runs: no workers.
    let v = remote_json(d, &["retry", &f.failed.to_string()]);
    assert_eq!(v["tasks"][0]["status"], "PENDING");
    assert_eq!(c.get(f.failed).unwrap().unwrap().status, Status::Pending);
    let page = c.get_json("/").ok();
    assert!(page.is_none(), "the dashboard is HTML, not JSON");
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.status, 200);
}
