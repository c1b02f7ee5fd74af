//! The `omniq` binary on a PostgreSQL queue (`--url`, `--schema`, `OMNIQ_URL`): every command
//! against a throwaway schema (`tests/common/pg.rs`), compared with what the library reports
//! while the queue stays open in this process; `--data` with `--url`; a missing schema (reported,
//! never created); an unreachable server and a bad URL; a read command next to a live node
//! (nothing rescued); `omniq serve --url`. Skipped only when the server cannot be reached and
//! `CI` is unset (the tests that need no server always run).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::pg::PgSchema;
use omniq::admin::{Client, Endpoint};
use omniq::postgres::{Liveness, PgOptions};
use omniq::testing::{run_until_idle, ManualClock};
use omniq::{EnqueueOptions, ListFilter, Queue, Status, TaskContext, TaskError, TaskId, Timestamp};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_omniq");

/// Runs `omniq ARGS...` with no `OMNIQ_URL` from the environment.
fn omniq(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("OMNIQ_URL")
        .output()
        .expect("run omniq")
}

/// `omniq --url URL --schema SCHEMA ARGS...`.
fn on(s: &PgSchema, args: &[&str]) -> Output {
    let mut a = vec!["--url", s.url.as_str(), "--schema", s.schema.as_str()];
    a.extend_from_slice(args);
    omniq(&a)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command on `s` that must succeed; its stdout.
fn ok(s: &PgSchema, args: &[&str]) -> String {
    let o = on(s, args);
    assert!(
        o.status.success(),
        "omniq {args:?} failed ({:?}):\n{}{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A `--json` command on `s` that must succeed; its one JSON document.
fn ok_json(s: &PgSchema, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ok(s, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("omniq {a:?}: not JSON ({e}):\n{out}"))
}

/// A failure: exit `code`, one `error:` line on stderr containing `needle`; with `--json`, the
/// error document (of `kind`) on stdout, else nothing on stdout. Returns stderr.
fn failed(o: &Output, json: bool, code: i32, kind: &str, needle: &str) -> String {
    let err = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(code),
        "wrong exit status; stderr:\n{err}"
    );
    assert_eq!(err.lines().count(), 1, "not one line:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in:\n{err}");
    if json {
        let doc: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", text(&o.stdout)));
        assert_eq!(doc["error"]["kind"], kind, "{doc}");
        assert_eq!(doc["error"]["exit_code"], code, "{doc}");
    } else {
        assert!(o.stdout.is_empty(), "stdout on error:\n{}", text(&o.stdout));
    }
    err
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn schema_exists(s: &mut PgSchema) -> bool {
    let name = s.schema.clone();
    s.admin
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&name],
        )
        .map(|r| r.get::<_, i64>(0) == 1)
        .expect("look for the schema")
}

/// A queue in `s` with one completed, one failed, one cancelled and one pending task, all
/// finished long ago by a manual clock (so `purge --older-than 1d` finds the finished ones).
struct Fixture {
    queue: Queue,
    completed: TaskId,
    failed: TaskId,
    cancelled: TaskId,
    pending: TaskId,
}

fn fixture(s: &PgSchema) -> Fixture {
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    let queue = Queue::postgres_with(&s.url, s.options())
        .clock(clock.clone())
        .open()
        .expect("open");
    queue.register_fn(
        "ok",
        |v: Value, _c: &TaskContext| -> Result<Value, TaskError> { Ok(v) },
    );
    queue.register_fn(
        "bad",
        |_v: Value, _c: &TaskContext| -> Result<Value, TaskError> {
            Err(TaskError::permanent("bad_input", "never works"))
        },
    );
    let enqueue = |kind: &str, n: u32| {
        queue
            .enqueue_json(kind, &json!({ "n": n }), EnqueueOptions::new())
            .expect("enqueue")
    };
    let completed = enqueue("ok", 1);
    let failed = enqueue("bad", 2);
    run_until_idle(&queue, &clock, 20).expect("run");
    let cancelled = enqueue("ok", 3);
    queue.cancel(cancelled).expect("cancel");
    let pending = queue
        .enqueue_json(
            "ok",
            &json!({ "n": 4 }),
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .expect("enqueue");
    Fixture {
        queue,
        completed,
        failed,
        cancelled,
        pending,
    }
}

#[test]
fn read_commands_report_what_the_library_reports() {
    let Some(s) = PgSchema::new("cli_read") else {
        return;
    };
    let f = fixture(&s);
    let q = &f.queue;

    let v = ok_json(&s, &["stats"]);
    let st = q.stats().expect("stats");
    assert_eq!(v["total"], st.total);
    for status in Status::ALL {
        assert_eq!(v["by_status"][status.to_string()], st.count(status), "{v}");
    }
    assert_eq!(v["by_queue"]["default"]["FAILED"], 1, "{v}");
    let dir = v["directory"].as_str().expect("directory");
    assert!(dir.contains(&s.schema), "{dir}");
    let human = ok(&s, &["stats"]);
    assert!(human.contains(&format!("{} task(s)", st.total)), "{human}");
    assert!(human.contains(&s.schema), "{human}");

    let v = ok_json(&s, &["list"]);
    let page = q.list(&ListFilter::new().limit(50)).expect("list");
    let ids: Vec<String> = page.tasks.iter().map(|t| t.id.to_string()).collect();
    let shown: Vec<String> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(shown, ids);
    let v = ok_json(&s, &["list", "--status", "failed"]);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["tasks"][0]["id"], f.failed.to_string());
    let human = ok(&s, &["list", "--limit", "2"]);
    assert!(human.contains("more with --cursor"), "{human}");

    let v = ok_json(&s, &["show", &f.failed.to_string()]);
    let t = q.get(f.failed).expect("get").expect("task");
    assert_eq!(v["status"], "FAILED");
    assert_eq!(v["attempts"], t.attempts);
    let history = q.history(f.failed).expect("history");
    assert_eq!(v["history"].as_array().map(Vec::len), Some(history.len()));
    let human = ok(&s, &["show", &f.failed.to_string()]);
    assert!(human.contains("bad_input"), "{human}");
    let o = on(&s, &["show", &TaskId::from_bytes([7; 16]).to_string()]);
    failed(&o, false, 1, "not_found", "not found");

    let v = ok_json(&s, &["check"]);
    assert_eq!(v["consistent"], true, "{v}");
    assert_eq!(v["tasks"], 4);
    assert!(ok(&s, &["check"]).contains("consistent"));

    let v = ok_json(&s, &["schedules"]);
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(q.schedules().expect("schedules").len())
    );

    let v = ok_json(&s, &["purge", "--older-than", "1d", "--dry-run"]);
    let preview = q
        .purge_preview(Duration::from_secs(86_400), 100)
        .expect("preview");
    // The CLI's clock is the real one: everything finished by the manual clock (2023) is old.
    assert_eq!(v["count"], 3, "{v}");
    assert_eq!(preview.tasks, 0, "the manual clock sees nothing that old");
    assert_eq!(v["dry_run"], true);
    assert_eq!(
        q.stats().expect("stats").total,
        4,
        "a dry run removed tasks"
    );

    // The same shapes as a queue directory's.
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Queue::open(dir.path()).expect("open a directory");
    let id = local
        .enqueue_json("ok", &json!(1), EnqueueOptions::new())
        .expect("enqueue");
    drop(local);
    let on_dir = |args: &[&str]| -> Value {
        let mut a = vec!["--json", "--data"];
        let d = dir.path().to_str().expect("utf-8 temp path");
        a.push(d);
        a.extend_from_slice(args);
        // This process's sled releases the directory's lock shortly after the drop.
        let o = common::retry_while_locked(
            || {
                let o = omniq(&a);
                if o.status.success() {
                    Ok(o)
                } else {
                    Err(text(&o.stderr))
                }
            },
            |e| e.contains("in use"),
        )
        .expect("run");
        serde_json::from_slice(&o.stdout).expect("JSON")
    };
    assert_eq!(keys(&on_dir(&["stats"])), keys(&ok_json(&s, &["stats"])));
    assert_eq!(keys(&on_dir(&["list"])), keys(&ok_json(&s, &["list"])));
    assert_eq!(
        keys(&on_dir(&["show", &id.to_string()])),
        keys(&ok_json(&s, &["show", &f.pending.to_string()]))
    );
    assert_eq!(keys(&on_dir(&["check"])), keys(&ok_json(&s, &["check"])));
}

#[test]
fn operate_commands_change_the_queue_the_library_sees() {
    let Some(s) = PgSchema::new("cli_operate") else {
        return;
    };
    let f = fixture(&s);
    let q = &f.queue;

    let v = ok_json(&s, &["retry", &f.failed.to_string()]);
    assert_eq!(v["command"], "retry");
    assert_eq!(v["tasks"][0]["status"], "PENDING");
    assert_eq!(
        q.get(f.failed).expect("get").map(|t| t.status),
        Some(Status::Pending)
    );

    let out = ok(&s, &["cancel", &f.pending.to_string()]);
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(
        q.get(f.pending).expect("get").map(|t| t.status),
        Some(Status::Cancelled)
    );
    let o = on(&s, &["--json", "cancel", &f.completed.to_string()]);
    failed(&o, true, 1, "invalid_state", "");

    let v = ok_json(&s, &["purge", "--older-than", "1d"]);
    assert_eq!(v["dry_run"], false);
    // The completed task and the cancelled one, finished by the manual clock in 2023 (the task
    // cancelled just now, by the CLI's real clock, stays).
    assert_eq!(v["count"], 2, "{v}");
    assert!(q.get(f.completed).expect("get").is_none());
    assert!(q.get(f.cancelled).expect("get").is_none());
    assert!(q.get(f.failed).expect("get").is_some());

    let v = ok_json(&s, &["retry", "--all-failed"]);
    assert_eq!(v["count"], 0, "{v}");
}

#[test]
fn data_and_url_together_is_a_usage_error() {
    for json in [false, true] {
        let mut a = vec!["--data", "/nonexistent", "--url", "host=127.0.0.1", "stats"];
        if json {
            a.push("--json");
        }
        failed(&omniq(&a), json, 2, "usage", "--data and --url");
    }
    let o = omniq(&["--schema", "x", "--data", "/nonexistent", "stats"]);
    failed(&o, false, 2, "usage", "--schema");
    let o = omniq(&["--url", "host=127.0.0.1", "demo"]);
    failed(&o, false, 2, "usage", "queue directory only");
    let o = omniq(&["--data", "/nonexistent", "migrate"]);
    failed(&o, false, 2, "usage", "--url");
}

#[test]
fn a_missing_schema_is_no_queue_and_is_not_created() {
    let Some(mut s) = PgSchema::new("cli_missing") else {
        return;
    };
    assert!(!schema_exists(&mut s));
    for json in [false, true] {
        let mut a = vec!["stats"];
        if json {
            a.push("--json");
        }
        failed(&on(&s, &a), json, 1, "no_queue", &s.schema);
    }
    failed(
        &on(&s, &["serve", "--listen", "127.0.0.1:0"]),
        false,
        1,
        "no_queue",
        "omniq migrate",
    );
    assert!(!schema_exists(&mut s), "a read command created the schema");

    // `migrate` creates it, with the same flags; then the commands find a queue.
    let v = ok_json(&s, &["migrate"]);
    assert_eq!(v["to"], omniq::postgres::SCHEMA_VERSION);
    assert_eq!(ok_json(&s, &["stats"])["total"], 0);
    // OMNIQ_URL stands for --url.
    let o = Command::new(BIN)
        .args(["--json", "--schema", &s.schema, "stats"])
        .env("OMNIQ_URL", &s.url)
        .output()
        .expect("run omniq");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains(&s.schema));
}

#[test]
fn an_unreachable_server_is_one_line_naming_it_without_the_password() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://someone:hunter2secret@127.0.0.1:{port}/db");
    for json in [false, true] {
        let mut a = vec!["--url", url.as_str(), "list"];
        if json {
            a.push("--json");
        }
        let o = omniq(&a);
        let err = failed(&o, json, 1, "storage", &format!("127.0.0.1:{port}"));
        assert!(!err.contains("hunter2secret"), "{err}");
        assert!(!text(&o.stdout).contains("hunter2secret"));
    }
    let o = omniq(&["--json", "--url", "postgres://u:pw@[bad", "stats"]);
    let err = failed(
        &o,
        true,
        1,
        "invalid_argument",
        "not a PostgreSQL connection string",
    );
    assert!(!err.contains("pw@"), "{err}");
}

/// A node in heartbeat mode that tolerates an hour-old heartbeat is live; a read command (whose
/// own bound would be shorter by default) must leave it and its running task alone.
#[test]
fn a_read_command_rescues_no_live_node() {
    let Some(mut s) = PgSchema::new("cli_live_node") else {
        return;
    };
    let options = PgOptions {
        liveness: Liveness::Heartbeat,
        heartbeat_interval: Duration::from_secs(3 * 3600),
        dead_after: Duration::from_secs(6 * 3600),
        ..s.options()
    };
    let queue = Queue::postgres_with(&s.url, options).open().expect("open");
    let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    queue.register_fn(
        "hold",
        move |_v: Value, _c: &TaskContext| -> Result<Value, TaskError> {
            let _ = started_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
            Ok(json!(null))
        },
    );
    let id = queue
        .enqueue_json("hold", &json!(1), EnqueueOptions::new())
        .expect("enqueue");
    let pool = queue.workers().concurrency(1).start().expect("workers");
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the handler started");
    // Its heartbeat is an hour old: within its own bound, past the default one.
    let changed = s.execute(
        "UPDATE omniq_nodes SET heartbeat_at = now() - interval '1 hour'",
        &[],
    );
    assert_eq!(changed, 1);

    for args in [&["stats"][..], &["list"], &["check"]] {
        let o = on(&s, args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        assert!(
            !text(&o.stderr).contains("recovered"),
            "{}",
            text(&o.stderr)
        );
    }
    let t = queue.get(id).expect("get").expect("task");
    assert_eq!((t.status, t.attempts), (Status::Running, 1));
    let nodes = s.rows("SELECT count(*) FROM omniq_nodes", &[]);
    assert_eq!(
        nodes[0].get::<_, i64>(0),
        1,
        "the live node was removed, or the CLI's stayed"
    );
    let _ = release_tx.send(());
    let done = queue.wait(id, Duration::from_secs(30)).expect("finish");
    assert_eq!(done.status, Status::Completed);
    drop(pool);
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_url_serves_the_api_of_a_postgres_queue() {
    let Some(s) = PgSchema::new("cli_serve") else {
        return;
    };
    let f = fixture(&s);
    let child = Command::new(BIN)
        .args(["--url", &s.url, "--schema", &s.schema])
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("OMNIQ_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut child = KillOnDrop(child);
    let out = child.0.stdout.take().expect("stdout");
    let line = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("serving"))
        .expect("a serving line");
    assert!(line.contains(&s.schema), "{line}");
    assert!(!line.contains("unix:"), "{line}");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .and_then(|a| a.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let c = Client::new(Endpoint::Tcp(addr));
    assert_eq!(
        c.get_json("/api/v1/health").expect("health")["status"],
        "ok"
    );
    assert_eq!(
        c.stats().expect("stats").total,
        f.queue.stats().expect("stats").total
    );
    let t = c.get(f.failed).expect("get").expect("task");
    assert_eq!(t.status, Status::Failed);
    let t = c.retry(f.failed).expect("retry");
    assert_eq!(t.status, Status::Pending);
    assert_eq!(
        f.queue.get(f.failed).expect("get").map(|t| t.status),
        Some(Status::Pending)
    );
    let r = c.request("GET", "/", &[], b"").expect("dashboard");
    assert_eq!(r.status, 200);
}

/// Every row of every omniq table and every sequence's position, as text (what a read must
/// leave exactly as it found it).
fn everything(s: &mut PgSchema) -> Vec<String> {
    let tables: Vec<String> = s
        .rows(
            "SELECT c.relname::text, c.relkind::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'S') ORDER BY 1",
            &[],
        )
        .iter()
        .map(|r| format!("{}:{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let mut out = Vec::new();
    for t in tables {
        let (name, kind) = t.split_once(':').expect("name:kind");
        let sql = if name == "omniq_nodes" {
            // Live nodes' heartbeats move on their own; membership is what a read must keep.
            "SELECT coalesce(string_agg(id::text || '@' || session_pid::text, '|' ORDER BY id), '') \
             FROM omniq_nodes"
                .to_string()
        } else if kind == "S" {
            format!("SELECT last_value::text || '/' || is_called::text FROM \"{name}\"")
        } else {
            format!(
                "SELECT coalesce(string_agg(x::text, '|' ORDER BY x::text), '') FROM \"{name}\" x"
            )
        };
        let v: String = s.rows(&sql, &[])[0].get(0);
        out.push(format!("{name} = {v}"));
    }
    out
}

/// The read commands open a PostgreSQL queue read-only: they register no node, rescue nothing,
/// and leave every row and sequence as they found them (the operate commands, by contrast,
/// join as a node).
#[test]
fn read_commands_write_nothing() {
    let Some(mut s) = PgSchema::new("cli_passive") else {
        return;
    };
    let f = fixture(&s);
    let id = f.failed.to_string();
    // A node that died with a task running: a writing open would rescue it.
    {
        let dead = Queue::postgres_with(&s.url, s.options())
            .open()
            .expect("open");
        dead.enqueue_json("ok", &json!({ "n": 9 }), EnqueueOptions::new())
            .expect("enqueue");
        let c = omniq::testing::claim_next(&dead)
            .expect("claim")
            .expect("a task");
        c.abandon();
        // Closing leaves its row RUNNING for a rescuer, as a killed process would.
        drop(dead);
    }
    let before = everything(&mut s);
    assert!(before.iter().any(|l| l.starts_with("omniq_nodes = ")));
    for args in [
        vec!["stats"],
        vec!["list"],
        vec!["list", "--status", "failed"],
        vec!["show", id.as_str()],
        vec!["check"],
        vec!["schedules"],
        vec!["purge", "--older-than", "1s", "--dry-run"],
    ] {
        for json in [false, true] {
            let mut a = args.clone();
            if json {
                a.push("--json");
            }
            let o = on(&s, &a);
            assert!(o.status.success(), "omniq {a:?}: {}", text(&o.stderr));
            assert!(
                !text(&o.stderr).contains("recovered"),
                "omniq {a:?} rescued: {}",
                text(&o.stderr)
            );
            let after = everything(&mut s);
            let changed: Vec<String> = after
                .iter()
                .filter(|l| !before.contains(l))
                .cloned()
                .collect();
            assert!(changed.is_empty(), "omniq {a:?} wrote: {changed:?}");
        }
    }
    // An operate command does join (and rescues the dead node's task).
    let o = on(&s, &["cancel", &f.pending.to_string()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_ne!(everything(&mut s), before);
    drop(f);
}

/// A schema older than this build is refused with its own kind, naming both versions, by every
/// command and by the library with `auto_migrate: false`; `omniq migrate` then upgrades it.
#[test]
fn an_older_schema_is_schema_too_old() {
    let Some(mut s) = PgSchema::new("cli_too_old") else {
        return;
    };
    assert_eq!(
        ok_json(&s, &["migrate"])["to"],
        omniq::postgres::SCHEMA_VERSION
    );
    let now = omniq::postgres::SCHEMA_VERSION;
    let older = now - 1;
    // As an older omniq left it: its version recorded, the newer migration's tables absent.
    s.execute(
        "DELETE FROM omniq_schema WHERE version > $1",
        &[&(older as i32)],
    );
    s.execute(
        "DROP TABLE omniq_extras, omniq_unique, omniq_limits, omniq_rate_starts, omniq_schedules",
        &[],
    );
    s.execute("DROP INDEX omniq_tasks_running_kind", &[]);
    let needle = format!("version {older}, older than the version {now}");
    for args in [
        vec!["stats"],
        vec!["cancel", "0192f5e4-8c1a-7b3e-9f00-1a2b3c4d5e6f"],
    ] {
        for json in [false, true] {
            let mut a = args.clone();
            if json {
                a.push("--json");
            }
            let err = failed(&on(&s, &a), json, 1, "schema_too_old", &needle);
            assert!(err.contains("omniq migrate"), "{err}");
        }
    }
    let options = PgOptions {
        auto_migrate: false,
        ..s.options()
    };
    match Queue::postgres_with(&s.url, options.clone()).open() {
        Err(omniq::Error::SchemaTooOld { found, needed, .. }) => {
            assert_eq!((found, needed), (older, now))
        }
        Err(e) => panic!("expected SchemaTooOld, got {e}"),
        Ok(_) => panic!("an older schema was opened without migrating"),
    }
    let v = ok_json(&s, &["migrate"]);
    assert_eq!(
        (v["from"].as_u64(), v["to"].as_u64()),
        (Some(older.into()), Some(now.into()))
    );
    let q = Queue::postgres_with(&s.url, options)
        .open()
        .expect("open after migrate");
    assert!(q.check_consistency().expect("check").is_consistent());
}

/// On PostgreSQL, compaction is autovacuum's job: `compact()` and `omniq compact` say there
/// is nothing to do, and change nothing.
#[test]
fn compact_has_nothing_to_do_on_postgres() {
    let Some(s) = PgSchema::new("cli_compact") else {
        return;
    };
    let f = fixture(&s);
    let before = f.queue.stats().expect("stats").total;
    let r = f.queue.compact().expect("compact");
    assert!(!r.compacted);
    assert!(
        r.note.as_deref().unwrap_or("").contains("autovacuum"),
        "{r:?}"
    );
    let v = ok_json(&s, &["compact"]);
    assert_eq!(v["compacted"], false, "{v}");
    let human = ok(&s, &["compact"]);
    assert!(human.contains("nothing to compact"), "{human}");
    assert_eq!(f.queue.stats().expect("stats").total, before);
}
