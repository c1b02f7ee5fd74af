//! The inspect-and-operate commands: stats, list, show, retry, cancel, purge, check, bench,
//! schedules.

use std::process::ExitCode;
use std::time::Duration;

use omniq::bench::{BenchOptions, BenchReport};
use omniq::{LimitStatus, ListFilter, ScheduleInfo, Status, TaskId, TaskInfo, Timestamp};
use serde_json::{json, Value};

use super::args::{BenchArgs, ListArgs};
use super::output::{
    emit, emit_json, log_json, status_counts_json, status_str, task_json, truncate, ts, ts_opt,
    Table,
};
use super::remote::Target;
use super::CliError;

/// `omniq stats`.
pub fn stats(queue: &Target, json: bool) -> Result<ExitCode, CliError> {
    let stats = queue.stats()?;
    let limits = queue.limits()?;
    if json {
        let by_queue: serde_json::Map<String, Value> = stats
            .by_queue
            .iter()
            .map(|(q, counts)| {
                (
                    q.clone(),
                    status_counts_json(|s| counts.get(&s).copied().unwrap_or(0)),
                )
            })
            .collect();
        emit_json(&json!({
            "directory": queue.path().display().to_string(),
            "total": stats.total,
            "by_status": status_counts_json(|s| stats.count(s)),
            "by_queue": by_queue,
            "limits": limits.iter().map(limit_json).collect::<Vec<_>>(),
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut headers = vec!["QUEUE"];
    headers.extend(Status::ALL.iter().map(|s| status_str(*s)));
    headers.push("TOTAL");
    // Long queue names are shortened (with `…`) so the table fits 80 columns.
    let mut table = Table::new(&headers)
        .right(&(1..headers.len()).collect::<Vec<_>>())
        .fit(80, 0);
    for (q, counts) in &stats.by_queue {
        let mut row = vec![q.clone()];
        row.extend(
            Status::ALL
                .iter()
                .map(|s| counts.get(s).copied().unwrap_or(0).to_string()),
        );
        row.push(counts.values().sum::<u64>().to_string());
        table.row(row);
    }
    let mut row = vec!["(all)".to_string()];
    row.extend(Status::ALL.iter().map(|s| stats.count(*s).to_string()));
    row.push(stats.total.to_string());
    table.row(row);
    let mut text = format!(
        "{}: {} task(s)\n\n{}",
        queue.path().display(),
        stats.total,
        table.render()
    );
    if !limits.is_empty() {
        // Short headers and a relative time keep the table within 80 columns; `--json` has
        // the exact instants.
        let mut t = Table::new(&[
            "LIMIT ON", "LIMIT", "RUN", "STARTED", "LEFT", "WAITING", "FREES IN",
        ])
        .right(&[2, 3, 4, 5, 6]);
        let now = omniq::Timestamp::now();
        for l in &limits {
            t.row([
                l.scope.to_string(),
                l.limit.to_string(),
                l.running.to_string(),
                l.started_in_window.to_string(),
                remaining_text(l.remaining),
                l.waiting.to_string(),
                l.frees_at
                    .map_or("-".to_string(), |t| short_duration(t.since(now))),
            ]);
        }
        text.push_str(&format!(
            "\nlimits (STARTED: in the current window; LEFT: may start now;\n\
             WAITING: due tasks held back; FREES IN: until the window frees a slot)\n{}",
            t.render()
        ));
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// `2h05m`, `4m10s`, `3.2s`, `850ms`: a duration in at most 6 characters or so.
fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1_000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1_000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

fn remaining_text(n: u32) -> String {
    if n == u32::MAX {
        "-".into()
    } else {
        n.to_string()
    }
}

fn limit_json(l: &LimitStatus) -> Value {
    let (scope, name) = match &l.scope {
        omniq::LimitScope::Queue(q) => ("queue", q),
        omniq::LimitScope::Kind(k) => ("kind", k),
    };
    json!({
        "scope": scope,
        "name": name,
        "rate": l.limit.rate.map(|r| json!({"max": r.max, "per_ms": r.per_ms})),
        "concurrency": l.limit.concurrency,
        "running": l.running,
        "started_in_window": l.started_in_window,
        "remaining": (l.remaining != u32::MAX).then_some(l.remaining),
        "waiting": l.waiting,
        "frees_at": l.frees_at.map(|t| t.to_string()),
    })
}

/// `omniq schedules`.
pub fn schedules(queue: &Target, json: bool) -> Result<ExitCode, CliError> {
    let list = queue.schedules()?;
    if json {
        emit_json(&Value::Array(list.iter().map(schedule_json).collect()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "NAME",
        "SPEC",
        "MISSED",
        "KIND",
        "QUEUE",
        "STATE",
        "LAST TICK",
        "NEXT TICK",
        "FIRED",
        "SKIPPED",
    ])
    .right(&[8, 9]);
    for s in &list {
        t.row([
            s.name.clone(),
            s.spec.to_string(),
            format!("{:?}", s.missed),
            s.kind.clone(),
            s.options.queue.clone(),
            if s.paused { "paused" } else { "active" }.to_string(),
            last_tick(s),
            ts_opt(s.next_tick()),
            s.fired.to_string(),
            s.skipped.to_string(),
        ]);
    }
    emit(&format!(
        "{}: {} schedule(s)\n\n{}",
        queue.path().display(),
        list.len(),
        t.render()
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn last_tick(s: &ScheduleInfo) -> String {
    if s.fired + s.skipped == 0 {
        "-".into()
    } else {
        ts(s.last_fired)
    }
}

fn schedule_json(s: &ScheduleInfo) -> Value {
    json!({
        "name": s.name,
        "spec": s.spec.to_string(),
        "missed": format!("{:?}", s.missed),
        "kind": s.kind,
        "payload": s.payload_json(),
        "queue": s.options.queue,
        "paused": s.paused,
        "created_at": s.created_at.to_string(),
        "last_fired": s.last_fired.to_string(),
        "next_tick": s.next_tick().map(|t: Timestamp| t.to_string()),
        "fired": s.fired,
        "skipped": s.skipped,
    })
}

/// `omniq list`.
pub fn list(
    queue: &Target,
    json: bool,
    a: &ListArgs,
    status: Option<Status>,
    cursor: Option<TaskId>,
) -> Result<ExitCode, CliError> {
    if let Some(c) = cursor {
        if queue.get(c)?.is_none() {
            return Err(CliError::Kind(
                "not_found",
                format!(
                    "--cursor {c} names no task in {} (a cursor is the id printed after \
                     \"more with --cursor\"; that task may have been purged since): run the \
                     listing again without --cursor",
                    queue.path().display()
                ),
            ));
        }
    }
    let mut filter = ListFilter::new().limit(a.limit as usize).cursor(cursor);
    filter.status = status;
    filter.queue = a.queue.clone();
    filter.kind = a.kind.clone();
    let page = queue.list(&filter)?;
    for c in &page.corrupt {
        eprintln!(
            "warning: skipped a record that does not decode at {}: {}",
            c.key, c.reason
        );
    }
    if json {
        emit_json(&json!({
            "tasks": page.tasks.iter().map(task_json).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor.map(|c| c.to_string()),
            "corrupt": page.corrupt,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if page.tasks.is_empty() {
        emit("no tasks match\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "ID",
        "KIND",
        "QUEUE",
        "STATUS",
        "ATTEMPTS",
        "PRI",
        "CREATED",
        "DUE / FINISHED",
        "LAST ERROR",
    ])
    .right(&[4, 5]);
    for t in &page.tasks {
        table.row(list_row(t));
    }
    let mut text = table.render();
    match page.next_cursor {
        Some(c) => text.push_str(&format!(
            "\n{} task(s) shown; more with --cursor {c}\n",
            page.tasks.len()
        )),
        None => text.push_str(&format!("\n{} task(s)\n", page.tasks.len())),
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn list_row(t: &TaskInfo) -> Vec<String> {
    let when = match t.finished_at {
        Some(f) => ts(f),
        None => ts(t.next_run_at),
    };
    // A completed task's earlier errors are history (see `show`), not a current problem.
    let err = match (t.status, &t.last_error) {
        (Status::Completed, _) | (_, None) => String::new(),
        (_, Some(e)) => truncate(&format!("{}: {}", e.error_type, e.message), 48),
    };
    vec![
        t.id.to_string(),
        t.kind.clone(),
        t.queue.clone(),
        status_str(t.status).to_string(),
        format!("{}/{}", t.attempts, u64::from(t.max_retries) + 1),
        t.priority.to_string(),
        ts(t.created_at),
        when,
        err,
    ]
}

fn get(queue: &Target, id: TaskId) -> Result<TaskInfo, CliError> {
    queue.get(id)?.ok_or_else(|| {
        CliError::Kind(
            "not_found",
            format!(
                "task {id} not found in {} (`omniq list` shows the ids)",
                queue.path().display()
            ),
        )
    })
}

/// `omniq show ID`.
pub fn show(queue: &Target, json: bool, id: TaskId) -> Result<ExitCode, CliError> {
    let t = get(queue, id)?;
    let history = queue.history(id)?;
    let extras = queue.extras(id)?.unwrap_or_default();
    if json {
        let mut v = task_json(&t);
        if let Value::Object(m) = &mut v {
            m.insert(
                "history".into(),
                Value::Array(history.iter().map(log_json).collect()),
            );
            m.insert(
                "unique".into(),
                extras.unique.as_ref().map_or(Value::Null, |u| {
                    json!({
                        "key": u.key,
                        "digest": u.digest_hex(),
                        "held_while": omniq::rules::unique::states_of(u.states)
                            .into_iter()
                            .map(status_str)
                            .collect::<Vec<_>>(),
                        "period": u.period,
                    })
                }),
            );
            m.insert(
                "scheduled".into(),
                extras.scheduled.as_ref().map_or(
                    Value::Null,
                    |s| json!({"schedule": s.schedule, "tick": s.at.to_string()}),
                ),
            );
        }
        emit_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let compact = |v: &Value| serde_json::to_string(v).unwrap_or_else(|_| "?".into());
    let mut fields = Table::new(&["FIELD", "VALUE"]);
    fields.row(["id".to_string(), t.id.to_string()]);
    fields.row(["kind".to_string(), t.kind.clone()]);
    fields.row(["queue".to_string(), t.queue.clone()]);
    fields.row(["status".to_string(), status_str(t.status).to_string()]);
    fields.row([
        "attempts".to_string(),
        format!(
            "{} of at most {} (max_retries {})",
            t.attempts,
            u64::from(t.max_retries) + 1,
            t.max_retries
        ),
    ]);
    fields.row(["priority".to_string(), t.priority.to_string()]);
    fields.row(["created".to_string(), ts(t.created_at)]);
    fields.row(["next run".to_string(), ts(t.next_run_at)]);
    fields.row(["started".to_string(), ts_opt(t.started_at)]);
    fields.row(["finished".to_string(), ts_opt(t.finished_at)]);
    fields.row([
        "timeout".to_string(),
        t.timeout()
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "-".into()),
    ]);
    fields.row(["payload".to_string(), compact(&t.payload_json())]);
    if let Some(u) = &extras.unique {
        let held: Vec<&str> = omniq::rules::unique::states_of(u.states)
            .into_iter()
            .map(status_str)
            .collect();
        let holds = if omniq::rules::unique::holds(u.states, t.status) {
            "holds it"
        } else {
            "released"
        };
        fields.row([
            "unique key".to_string(),
            format!("{} (held while {}; {holds})", u.key, held.join("/")),
        ]);
    }
    if let Some(s) = &extras.scheduled {
        fields.row([
            "scheduled by".to_string(),
            format!("{} (tick {})", s.schedule, ts(s.at)),
        ]);
    }
    fields.row([
        "result".to_string(),
        t.result_json()
            .map(|r| compact(&r))
            .unwrap_or_else(|| "-".into()),
    ]);
    fields.row([
        "last error".to_string(),
        t.last_error
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into()),
    ]);
    let mut text = fields.render();

    text.push_str(&format!("\nerrors ({}, oldest first)\n", t.errors.len()));
    if !t.errors.is_empty() {
        let mut errors =
            Table::new(&["#", "TYPE", "KIND", "RETRY", "AT", "MESSAGE"]).right(&[0, 3]);
        for (i, e) in t.errors.iter().enumerate() {
            errors.row([
                (i + 1).to_string(),
                e.error_type.clone(),
                if e.permanent {
                    "permanent"
                } else {
                    "transient"
                }
                .to_string(),
                e.retry_count.to_string(),
                ts(e.timestamp),
                truncate(&e.message, 80),
            ]);
        }
        text.push_str(&errors.render());
    }

    text.push_str(&format!("\nhistory ({} transition(s))\n", history.len()));
    if !history.is_empty() {
        let mut h =
            Table::new(&["SEQ", "AT", "FROM", "TO", "ATTEMPT", "CAUSE", "RUN"]).right(&[0, 4, 6]);
        for e in &history {
            h.row([
                e.seq.to_string(),
                ts(e.at),
                e.from.map(status_str).unwrap_or("-").to_string(),
                status_str(e.to).to_string(),
                e.attempt.to_string(),
                e.cause.to_string(),
                e.run_id.to_string(),
            ]);
        }
        text.push_str(&h.render());
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// `omniq retry ID | --all-failed`.
pub fn retry(queue: &Target, json: bool, id: Option<TaskId>) -> Result<ExitCode, CliError> {
    let ids = match id {
        Some(id) => {
            get(queue, id)?;
            vec![id]
        }
        None => all_failed(queue)?,
    };
    let mut retried = Vec::with_capacity(ids.len());
    for id in ids {
        retried.push(queue.retry(id)?);
    }
    if json {
        emit_json(&changed_json("retry", false, retried.len(), &retried))?;
        return Ok(ExitCode::SUCCESS);
    }
    let text = match (id, retried.first()) {
        (Some(_), Some(t)) => format!(
            "task {} re-queued: {} with a fresh budget of {} execution(s), due now\n",
            t.id,
            status_str(t.status),
            u64::from(t.max_retries) + 1
        ),
        _ => format!("re-queued {} failed task(s)\n", retried.len()),
    };
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn all_failed(queue: &Target) -> Result<Vec<TaskId>, CliError> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = queue.list(
            &ListFilter::new()
                .status(Status::Failed)
                .limit(1000)
                .cursor(cursor),
        )?;
        ids.extend(page.tasks.iter().map(|t| t.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(ids),
        }
    }
}

/// `omniq cancel ID`.
pub fn cancel(queue: &Target, json: bool, id: TaskId) -> Result<ExitCode, CliError> {
    get(queue, id)?;
    let t = queue.cancel(id)?;
    if json {
        emit_json(&changed_json("cancel", false, 1, std::slice::from_ref(&t)))?;
    } else if t.status == Status::Running {
        // Only a live queue (through its admin socket) can cancel a running task: cooperatively.
        emit(&format!(
            "task {} is running: cancellation requested; its attempt ends CANCELLED when its handler returns or times out\n",
            t.id
        ))?;
    } else {
        emit(&format!("task {} cancelled\n", t.id))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// How many affected tasks the JSON of a mutating command lists in full.
pub const JSON_TASKS_SHOWN: usize = 100;

/// The one JSON shape of every mutating command (`retry`, `cancel`, `purge`):
/// `{"command", "dry_run", "count", "tasks", "tasks_truncated"}`. `count` is every task the
/// command changed (or, with `--dry-run`, would change); `tasks` lists the first
/// [`JSON_TASKS_SHOWN`] of them in full (as they are now; for `purge`, as they were).
fn changed_json(command: &str, dry_run: bool, count: usize, tasks: &[TaskInfo]) -> Value {
    let shown = &tasks[..tasks.len().min(JSON_TASKS_SHOWN)];
    json!({
        "command": command,
        "dry_run": dry_run,
        "count": count,
        "tasks": shown.iter().map(task_json).collect::<Vec<_>>(),
        "tasks_truncated": count > shown.len(),
    })
}

/// A duration as a person says it: "7 days", "12 hours", "90 seconds", "1500 ms".
fn age_words(d: Duration) -> String {
    let ms = d.as_millis();
    let unit = |n: u128, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    if ms == 0 {
        return "0 seconds".into();
    }
    for (size, name) in [
        (86_400_000, "day"),
        (3_600_000, "hour"),
        (60_000, "minute"),
        (1_000, "second"),
    ] {
        if ms.is_multiple_of(size) {
            return unit(ms / size, name);
        }
    }
    format!("{ms} ms")
}

/// `omniq purge --older-than DURATION [--dry-run]`.
pub fn purge(
    queue: &Target,
    json: bool,
    given: &str,
    age: Duration,
    dry_run: bool,
) -> Result<ExitCode, CliError> {
    // The CLI holds the directory and runs no workers, so nothing finishes between the preview
    // and the purge: the preview's tasks are the ones removed.
    let preview = queue.purge_preview(age, JSON_TASKS_SHOWN)?;
    let (count, compaction) = if dry_run {
        (preview.tasks, None)
    } else {
        let r = queue.purge(age)?;
        (r.tasks_removed, r.compaction)
    };
    let when = age_words(age);
    if json {
        let mut v = changed_json("purge", dry_run, count, &preview.sample);
        if let Value::Object(m) = &mut v {
            m.insert("older_than".into(), json!(given));
            m.insert(
                "older_than_ms".into(),
                json!(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            );
            m.insert("cutoff".into(), json!(ts(preview.cutoff)));
            if let Some(c) = &compaction {
                m.insert("compaction".into(), json!(c));
            }
        }
        emit_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !dry_run {
        emit(&format!(
            "purged {count} finished task(s) (and their history) that finished at least {when} ago\n"
        ))?;
        if let Some(c) = compaction.filter(|c| c.compacted) {
            emit(&format!(
                "compacted the store afterwards: {} -> {} bytes on disk\n",
                c.bytes_before, c.bytes_after
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!(
        "dry run: would purge {count} finished task(s) that finished at least {when} ago \
         (before {}); nothing was removed\n",
        ts(preview.cutoff)
    );
    const SHOWN: usize = 5;
    if count > 0 {
        let mut table = Table::new(&["ID", "KIND", "QUEUE", "STATUS", "FINISHED"]);
        for t in preview.sample.iter().take(SHOWN) {
            table.row([
                t.id.to_string(),
                t.kind.clone(),
                t.queue.clone(),
                status_str(t.status).to_string(),
                ts_opt(t.finished_at),
            ]);
        }
        text.push('\n');
        text.push_str(&table.render());
        if count > SHOWN {
            text.push_str(&format!("… and {} more\n", count - SHOWN));
        }
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// `omniq check`: exit status 1 when a problem is found.
pub fn check(queue: &Target, json: bool) -> Result<ExitCode, CliError> {
    let report = queue.check_consistency()?;
    let ok = report.is_consistent();
    if json {
        emit_json(&json!({
            "consistent": ok,
            "tasks": report.tasks,
            "log_entries": report.log_entries,
            "problems": report.problems,
        }))?;
    } else {
        let mut text = format!(
            "checked {} task(s) and {} log entr{}\n",
            report.tasks,
            report.log_entries,
            if report.log_entries == 1 { "y" } else { "ies" }
        );
        if ok {
            text.push_str("consistent: every record, index, counter and log entry agrees\n");
        } else {
            for p in &report.problems {
                text.push_str(&format!("problem: {p}\n"));
            }
        }
        emit(&text)?;
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: {} consistency problem(s) found in {}",
            report.problems.len(),
            queue.path().display()
        );
        Ok(ExitCode::from(1))
    }
}

/// `omniq bench`: runs in a temporary directory.
pub fn bench(json: bool, a: &BenchArgs) -> Result<ExitCode, CliError> {
    if a.suite != crate::cli::args::SuiteArg::Default {
        return bench_suite(json, a);
    }
    let opts = BenchOptions {
        tasks: usize::try_from(a.tasks).unwrap_or(usize::MAX),
        workers: usize::try_from(a.workers).unwrap_or(usize::MAX),
        durability: a.durability.into(),
        poll_dashboard: a.poll_dashboard,
    };
    let mut progress = |line: &str| {
        if !json {
            eprintln!("{line}");
        }
    };
    let report = omniq::bench::run(&opts, &mut progress)?;
    if json {
        let v = serde_json::to_value(&report)
            .map_err(|e| CliError::Runtime(format!("cannot encode the bench report: {e}")))?;
        emit_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    emit(&bench_table(&report))?;
    Ok(ExitCode::SUCCESS)
}

/// `omniq bench --suite disk|rss|churn`.
fn bench_suite(json: bool, a: &BenchArgs) -> Result<ExitCode, CliError> {
    use omniq::bench::disk;
    let opts = disk::SuiteOptions {
        tasks: usize::try_from(a.tasks).unwrap_or(usize::MAX),
        workers: usize::try_from(a.workers).unwrap_or(usize::MAX),
        runs: usize::try_from(a.runs).unwrap_or(usize::MAX),
    };
    let mut progress = |line: &str| {
        if !json {
            eprintln!("{line}");
        }
    };
    let report = match a.suite {
        crate::cli::args::SuiteArg::Rss => disk::run_rss(&opts, &mut progress)?,
        crate::cli::args::SuiteArg::Churn => {
            let churn = omniq::bench::churn::ChurnOptions {
                rate: usize::try_from(a.rate).unwrap_or(usize::MAX),
                duration: Duration::from_secs(a.seconds),
                retention: Duration::from_secs(a.retention),
                purge_interval: Duration::from_secs(a.purge_interval),
                workers: opts.workers,
            };
            omniq::bench::churn::run_churn(&churn, &mut progress)?
        }
        _ => disk::run_disk(&opts, &mut progress)?,
    };
    if json {
        let v = serde_json::to_value(&report)
            .map_err(|e| CliError::Runtime(format!("cannot encode the bench report: {e}")))?;
        emit_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["MEASURE", "VALUE", "VS RAW FDATASYNC"]).right(&[1, 2]);
    for row in &report.rows {
        t.row([row.label.clone(), row.value_text(), row.vs_raw_text()]);
    }
    emit(&format!(
        "omniq bench --suite {}: {} tasks, {} workers, {} runs per row\n\n{}",
        report.suite,
        report.tasks,
        report.workers,
        report.runs,
        t.render()
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn bench_table(r: &BenchReport) -> String {
    let mut t = Table::new(&["MEASURE", "VALUE", "VS RAW FDATASYNC"]).right(&[1, 2]);
    for row in &r.rows {
        t.row([row.label.clone(), row.value_text(), row.vs_raw_text()]);
    }
    format!(
        "omniq bench: {} tasks per row, {} workers, main rows in durability {}\n\n{}",
        r.tasks,
        r.workers,
        r.durability,
        t.render()
    )
}

/// `omniq migrate`: brings a PostgreSQL schema to this build's version.
#[cfg(feature = "postgres")]
pub fn migrate(json: bool, url: &str, schema: &str) -> Result<ExitCode, CliError> {
    let options = omniq::postgres::PgOptions {
        schema: schema.to_string(),
        ..Default::default()
    };
    let r = omniq::postgres::migrate(url, &options)?;
    if json {
        emit_json(&json!({ "schema": schema, "from": r.from, "to": r.to }))?;
    } else if r.from == r.to {
        emit(&format!("schema {schema} is at version {} already\n", r.to))?;
    } else {
        emit(&format!(
            "schema {schema} migrated from version {} to {}\n",
            r.from, r.to
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `omniq compact`: rewrites the store, then says what it gave back.
pub fn compact(queue: &Target, json: bool) -> Result<ExitCode, CliError> {
    let r = queue.compact()?;
    if json {
        emit_json(&serde_json::to_value(&r).map_err(|e| CliError::Runtime(e.to_string()))?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !r.compacted {
        emit(&format!(
            "nothing to compact at {}: {}\n",
            queue.path().display(),
            r.note.as_deref().unwrap_or("nothing to do")
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    emit(&format!(
        "compacted {}: {:.1} MiB -> {:.1} MiB ({} keys, {:.1} MiB of live data copied) in {:.0} ms; \
         writes waited {:.0} ms\n",
        queue.path().display(),
        mib(r.bytes_before),
        mib(r.bytes_after),
        r.keys_copied,
        mib(r.live_bytes),
        r.duration.as_secs_f64() * 1000.0,
        r.write_pause.as_secs_f64() * 1000.0,
    ))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn short_durations() {
        let d = Duration::from_millis;
        assert_eq!(super::short_duration(d(850)), "850ms");
        assert_eq!(super::short_duration(d(3_240)), "3.2s");
        assert_eq!(super::short_duration(d(250_000)), "4m10s");
        assert_eq!(super::short_duration(d(7_500_000)), "2h05m");
    }
}
