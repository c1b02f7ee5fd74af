//! The dashboard in a real browser (issue 10): headless Chromium, driven by `playwright-core`
//! (tests/browser/dashboard.js), loads the dashboard of a running queue, sees a failed task's
//! error history, clicks Retry, confirms, and the task runs again and shows Completed; an HTML
//! payload renders as text. A screenshot of each page goes to `target/browser-screenshots/`.
//!
//! Needs `/usr/bin/chromium` (Debian `chromium`) and Node. `npm ci` runs in tests/browser when
//! its `node_modules` is missing. Outside CI (`CI` unset) a missing browser skips the test with
//! a message; under `CI=true` it fails (`.ci/run` installs both).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use omniq::{Cause, EnqueueOptions, Queue, Status, TaskContext, TaskError};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);
const BROWSER_RUN_LIMIT: Duration = Duration::from_secs(240);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `Some(reason)` when the browser test cannot run here.
fn missing_prerequisite(chromium: &Path, browser_dir: &Path) -> Option<String> {
    if !chromium.exists() {
        return Some(format!(
            "{} is missing (apt-get install chromium)",
            chromium.display()
        ));
    }
    if !browser_dir.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(browser_dir)
            .stdout(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => {
                return Some(format!(
                    "`npm ci` in {} failed: {other:?}",
                    browser_dir.display()
                ))
            }
        }
    }
    None
}

#[test]
fn the_dashboard_retries_a_failed_task_in_headless_chromium() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let chromium = PathBuf::from(
        std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string()),
    );
    if let Some(reason) = missing_prerequisite(&chromium, &browser_dir) {
        assert!(
            !in_ci(),
            "CI=true and the browser test cannot run: {reason}"
        );
        eprintln!("skipping the browser test (CI is not set): {reason}");
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path().join("q"))
        .retry_policy(omniq::RetryPolicy {
            max_retries: 1,
            backoff: omniq::Backoff::new(Duration::ZERO, Duration::ZERO, 0.0),
        })
        .open()
        .unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    q.register_fn("flaky", move |_v: Value, ctx: &TaskContext| {
        if h.load(Ordering::SeqCst) {
            Ok(json!({"recovered": true}))
        } else {
            Err(TaskError::transient(
                "upstream",
                format!("upstream unavailable (attempt {})", ctx.attempt()),
            ))
        }
    });
    q.register_fn("<b>xss</b>", |_v: Value, _c: &TaskContext| {
        Err(TaskError::permanent(
            "render",
            "<img src=x onerror=window.__xss=2>",
        ))
    });
    q.register_fn("echo", |v: Value, _c: &TaskContext| Ok(v));
    // Served before the workload runs, so the overview's last-hour activity shows it.
    let admin = q
        .admin()
        .tcp("127.0.0.1:0".parse().unwrap())
        .serve()
        .unwrap();
    let pool = q.workers().concurrency(2).start().unwrap();
    let failed = q
        .enqueue_json("flaky", &json!({"order": 42}), EnqueueOptions::new())
        .unwrap();
    let xss = q
        .enqueue_json(
            "<b>xss</b>",
            &json!("<script>window.__xss=1</script>"),
            EnqueueOptions::new(),
        )
        .unwrap();
    let other = q
        .enqueue_json(
            "echo",
            &json!({"hello": "world"}),
            EnqueueOptions::new().queue("other"),
        )
        .unwrap();
    for id in [failed, xss, other] {
        q.wait(id, LONG).unwrap();
    }
    let t = q.get(failed).unwrap().unwrap();
    assert_eq!((t.status, t.errors.len()), (Status::Failed, 2));
    healthy.store(true, Ordering::SeqCst);

    let url = format!("http://{}", admin.tcp_addr().unwrap());
    let shots = root.join("target/browser-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let names = [
        "overview",
        "queues",
        "tasks-failed",
        "task-xss",
        "task-failed",
        "task-completed",
    ];
    for n in names {
        let _ = std::fs::remove_file(shots.join(format!("{n}.png")));
    }

    let child = Command::new("node")
        .arg(browser_dir.join("dashboard.js"))
        .current_dir(&browser_dir)
        .env("OMNIQ_URL", &url)
        .env("OMNIQ_FAILED_ID", failed.to_string())
        .env("OMNIQ_XSS_ID", xss.to_string())
        .env("OMNIQ_SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let pid = child.id();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(BROWSER_RUN_LIMIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: `pid` is our own child, still running (its waiter has not returned).
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("the browser run took longer than {BROWSER_RUN_LIMIT:?}");
        }
    };
    assert!(
        out.status.success(),
        "browser checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the browser saw is what the store holds: the retried task ran again and completed.
    let t = q.get(failed).unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (Status::Completed, 1));
    let causes: Vec<Cause> = q
        .history(failed)
        .unwrap()
        .into_iter()
        .map(|e| e.cause)
        .collect();
    assert!(causes.contains(&Cause::ManualRetry), "{causes:?}");
    assert!(
        !q.is_paused("other"),
        "paused and resumed from the queues page"
    );
    assert_eq!(
        q.get(xss).unwrap().unwrap().status,
        Status::Failed,
        "the XSS task was only viewed"
    );
    for n in names {
        let p = shots.join(format!("{n}.png"));
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "screenshot {} written", p.display());
    }
    admin.stop();
    pool.stop();
}
