//! `omniq demo`: the main job. Enqueues a mixed workload (successes, flaky tasks that recover
//! through retries, permanent failures, tasks that spend their retry budget, a scheduled task,
//! several priorities) on the `demo` queue, runs it on a worker pool with a progress bar, and
//! prints a summary. If the directory holds an unfinished demo workload (after a kill, say),
//! it is resumed instead, and the summary shows what crash recovery did.
//!
//! The default workload runs for about 20 s, long enough to interrupt. The first Ctrl-C
//! (`SIGINT`) or `SIGTERM` stops it gracefully: nothing new is claimed, running handlers finish,
//! the summary is printed and the exit status is 130 (`SIGINT`) or 143 (`SIGTERM`); the next run
//! resumes with no attempt charged. A second signal ends the process at once (see
//! `omniq::shutdown`).

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use omniq::{
    Backoff, Cause, EnqueueOptions, ListFilter, Queue, RetryPolicy, Status, Task, TaskContext,
    TaskError, TaskId, TaskInfo, TransitionEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::args::DemoArgs;
use super::output::{emit, emit_json, status_str, Table};
use super::CliError;

/// The queue the demo workload lives on (the demo's workers serve only this queue).
pub const DEMO_QUEUE: &str = "demo";
/// How far in the future the scheduled task is due.
const SCHEDULE_DELAY: Duration = Duration::from_secs(2);
/// Default handler work time: the default 100-task workload on 4 workers runs ~20 s, long enough
/// to interrupt.
const DEFAULT_WORK_MS: u64 = 500;
/// How long a graceful stop waits for running handlers.
const GRACE: Duration = Duration::from_secs(10);
/// Environment variable overriding the handler work time.
const WORK_MS_ENV: &str = "OMNIQ_DEMO_WORK_MS";

/// The arguments every demo task carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    /// Which workload the task belongs to (the time it was enqueued, RFC 3339).
    workload: String,
    /// Its index in the workload.
    n: u32,
    /// The workload's size.
    of: u32,
    /// For flaky tasks: how many executions fail before one succeeds.
    #[serde(default)]
    fail_times: u32,
}

macro_rules! demo_task {
    ($ty:ident, $name:literal) => {
        #[derive(Serialize, Deserialize)]
        struct $ty(Job);
        impl Task for $ty {
            const NAME: &'static str = $name;
            type Output = Value;
        }
    };
}

demo_task!(ResizeImage, "demo.resize_image");
demo_task!(SendEmail, "demo.send_email");
demo_task!(ChargeCard, "demo.charge_card");
demo_task!(SyncInventory, "demo.sync_inventory");
demo_task!(NightlyReport, "demo.nightly_report");

/// The demo's retry policy: fast, so the whole workload finishes in seconds.
fn demo_policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        backoff: Backoff::new(Duration::from_millis(150), Duration::from_secs(2), 0.25),
    }
}

/// Simulated work: `ms` scaled by 50-150 % depending on the task. Cut short when the execution
/// is cancelled (its pool's grace period ran out), which is then reported as a failure: a
/// handler must not claim a success for work it did not finish.
fn work(ctx: &TaskContext, ms: u64, n: u32) -> Result<(), TaskError> {
    let ms = ms * (50 + u64::from(n.wrapping_mul(37) % 101)) / 100;
    let until = Instant::now() + Duration::from_millis(ms);
    loop {
        if ctx.is_cancelled() {
            return Err(TaskError::transient(
                "interrupted",
                "the worker pool stopped before this execution finished",
            ));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

fn register(queue: &Queue, ms: u64) {
    queue.register(move |t: ResizeImage, ctx: &TaskContext| -> Result<Value, TaskError> {
        work(ctx, ms, t.0.n)?;
        Ok(json!({ "thumbnail": format!("img-{:04}.webp", t.0.n), "bytes": 18_000 + t.0.n * 7 }))
    });
    queue.register(move |t: SendEmail, ctx: &TaskContext| -> Result<Value, TaskError> {
        work(ctx, ms, t.0.n)?;
        if ctx.attempt() <= t.0.fail_times {
            return Err(TaskError::transient(
                "smtp_unavailable",
                format!("mail relay refused the connection on attempt {}", ctx.attempt()),
            ));
        }
        Ok(json!({ "message_id": format!("msg-{:04}", t.0.n), "delivered_on_attempt": ctx.attempt() }))
    });
    queue.register(
        move |t: ChargeCard, ctx: &TaskContext| -> Result<Value, TaskError> {
            work(ctx, ms, t.0.n)?;
            Err(TaskError::permanent(
                "card_declined",
                format!(
                    "card ending {:04} was declined by the issuer",
                    1000 + t.0.n % 9000
                ),
            ))
        },
    );
    queue.register(
        move |t: SyncInventory, ctx: &TaskContext| -> Result<Value, TaskError> {
            work(ctx, ms, t.0.n)?;
            Err(TaskError::transient(
                "upstream_timeout",
                "the inventory service did not answer within 5 s",
            ))
        },
    );
    queue.register(
        move |t: NightlyReport, ctx: &TaskContext| -> Result<Value, TaskError> {
            work(ctx, ms, t.0.n)?;
            Ok(json!({ "rows": t.0.of * 10 }))
        },
    );
}

/// Enqueues a fresh workload of `of` tasks; returns its id and a description.
fn enqueue_fresh(queue: &Queue, of: u32) -> Result<(String, String), CliError> {
    let workload = queue.now().to_string();
    let mut resize = Vec::new();
    let mut email = Vec::new();
    let mut charge = Vec::new();
    let mut sync = Vec::new();
    let mut report = Vec::new();
    for n in 0..of {
        let job = Job {
            workload: workload.clone(),
            n,
            of,
            fail_times: 0,
        };
        if n + 1 == of {
            report.push(NightlyReport(job));
            continue;
        }
        match n % 10 {
            5 | 6 => email.push(SendEmail(Job {
                fail_times: 1 + (n / 10) % 2,
                ..job
            })),
            7 => charge.push(ChargeCard(job)),
            8 => sync.push(SyncInventory(job)),
            _ => resize.push(ResizeImage(job)),
        }
    }
    let opts = || EnqueueOptions::new().queue(DEMO_QUEUE);
    let what = format!(
        "{} image resizes, {} flaky emails (fail 1-2 times, then recover), {} card charges (declined: permanent), \
         {} inventory syncs (always time out: 3 executions, then FAILED), {} nightly report scheduled in {} s",
        resize.len(),
        email.len(),
        charge.len(),
        sync.len(),
        report.len(),
        SCHEDULE_DELAY.as_secs()
    );
    queue.enqueue_many_with(email, opts().priority(5).max_retries(3))?;
    queue.enqueue_many_with(charge, opts().priority(1).max_retries(3))?;
    queue.enqueue_many_with(resize, opts())?;
    queue.enqueue_many_with(sync, opts().priority(-1).max_retries(2))?;
    queue.enqueue_many_with(report, opts().priority(-5).delay(SCHEDULE_DELAY))?;
    Ok((workload, what))
}

fn job_of(t: &TaskInfo) -> Option<Job> {
    if !t.kind.starts_with("demo.") {
        return None;
    }
    serde_json::from_slice(&t.payload).ok()
}

/// Every demo task on the demo queue, in pages.
fn demo_tasks(
    queue: &Queue,
    status: Option<Status>,
    mut keep: impl FnMut(&TaskInfo, &Job) -> bool,
) -> Result<Vec<TaskInfo>, CliError> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let mut filter = ListFilter::new()
            .queue(DEMO_QUEUE)
            .limit(1000)
            .cursor(cursor);
        filter.status = status;
        let page = queue.list(&filter)?;
        for t in page.tasks {
            if let Some(job) = job_of(&t) {
                if keep(&t, &job) {
                    out.push(t);
                }
            }
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// The workload of some unfinished demo task, if there is one.
fn unfinished_workload(queue: &Queue) -> Result<Option<String>, CliError> {
    for status in [Status::Running, Status::Pending] {
        let mut found = None;
        demo_tasks(queue, Some(status), |_, job| {
            if found.is_none() {
                found = Some(job.workload.clone());
            }
            false
        })?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn load_workload(queue: &Queue, workload: &str) -> Result<Vec<TaskInfo>, CliError> {
    demo_tasks(queue, None, |_, job| job.workload == workload)
}

fn work_ms(a: &DemoArgs) -> Result<u64, CliError> {
    if let Some(ms) = a.work_ms {
        return Ok(ms);
    }
    match std::env::var(WORK_MS_ENV) {
        Ok(v) => v.trim().parse().map_err(|_| {
            CliError::Usage(format!(
                "{WORK_MS_ENV}={v:?} is not a number of milliseconds"
            ))
        }),
        Err(_) => Ok(DEFAULT_WORK_MS),
    }
}

fn progress_bar(total: u64, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} [{elapsed}] {wide_bar} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Counts for one kind (or the total) in the summary.
#[derive(Default)]
struct Row {
    tasks: u64,
    by_status: BTreeMap<Status, u64>,
    retries: u64,
    crashed: u64,
}

impl Row {
    fn add(&mut self, t: &TaskInfo) {
        self.tasks += 1;
        *self.by_status.entry(t.status).or_insert(0) += 1;
        self.retries += u64::from(t.attempts.saturating_sub(1));
        if t.errors.iter().any(|e| e.error_type == "crash") {
            self.crashed += 1;
        }
    }
    fn count(&self, s: Status) -> u64 {
        self.by_status.get(&s).copied().unwrap_or(0)
    }
    fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("tasks".into(), json!(self.tasks));
        for s in Status::ALL {
            m.insert(status_str(s).into(), json!(self.count(s)));
        }
        m.insert("retries".into(), json!(self.retries));
        m.insert("crash_recovered".into(), json!(self.crashed));
        Value::Object(m)
    }
    fn cells(&self, name: &str) -> Vec<String> {
        let mut r = vec![name.to_string(), self.tasks.to_string()];
        r.extend(Status::ALL.iter().map(|s| self.count(*s).to_string()));
        r.push(self.retries.to_string());
        r.push(self.crashed.to_string());
        r
    }
}

/// What the demo has seen of its workload's transitions so far.
struct Progress {
    /// Workload tasks not finished yet.
    remaining: HashSet<TaskId>,
    /// Workload tasks being executed now.
    running: HashSet<TaskId>,
    done_ok: u64,
    done_failed: u64,
    retries: u64,
}

impl Progress {
    /// Takes one committed transition; true if it finished a workload task.
    fn apply(&mut self, ev: &TransitionEvent) -> bool {
        let id = ev.entry.task_id;
        if !self.remaining.contains(&id) {
            return false;
        }
        if ev.entry.to == Status::Running {
            self.running.insert(id);
        } else {
            self.running.remove(&id);
        }
        if ev.entry.to == Status::Pending && matches!(ev.entry.cause, Cause::Failed { .. }) {
            self.retries += 1;
        }
        if !ev.entry.to.is_terminal() {
            return false;
        }
        self.remaining.remove(&id);
        if ev.entry.to == Status::Completed {
            self.done_ok += 1;
        } else {
            self.done_failed += 1;
        }
        true
    }

    fn message(&self) -> String {
        format!(
            "{} completed, {} failed, {} retries scheduled",
            self.done_ok, self.done_failed, self.retries
        )
    }
}

/// Prints a line on stdout, or on stderr when stdout is reserved for the JSON document.
fn say(json: bool, line: &str) -> Result<(), CliError> {
    if json {
        eprint!("{line}");
        Ok(())
    } else {
        emit(line)
    }
}

/// Runs the demo.
pub fn run(dir: &Path, json: bool, a: &DemoArgs) -> Result<ExitCode, CliError> {
    let work_ms = work_ms(a)?;
    super::ensure_not_a_file(dir)?;
    let started = Instant::now();
    let queue = Queue::builder(dir)
        .queue_retry_policy(DEMO_QUEUE, demo_policy())
        .open()?;
    let recovery = queue.recovery_report().clone();
    register(&queue, work_ms);
    // While it runs, `omniq stats` (and every other command) reach it through its admin socket.
    let _admin = super::serve::for_demo(&queue);
    // Subscribe before anything can change, so no transition of the workload is missed.
    let events = queue.subscribe();

    let shown = dir.display();
    let mut intro = String::new();
    let (workload, resumed) = match unfinished_workload(&queue)? {
        Some(w) => (w, true),
        None => {
            let (w, what) = enqueue_fresh(&queue, a.tasks)?;
            intro.push_str(&format!(
                "Enqueued a fresh demo workload of {} tasks in {shown}:\n  {what}.\n",
                a.tasks
            ));
            (w, false)
        }
    };
    let tasks = load_workload(&queue, &workload)?;
    let expected = tasks
        .first()
        .and_then(job_of)
        .map_or(tasks.len() as u64, |j| u64::from(j.of));
    let mut progress = Progress {
        remaining: tasks
            .iter()
            .filter(|t| !t.status.is_terminal())
            .map(|t| t.id)
            .collect(),
        running: HashSet::new(),
        done_ok: 0,
        done_failed: 0,
        retries: 0,
    };
    if resumed {
        intro.push_str(&format!(
            "Resuming the unfinished demo workload {workload} in {shown}: {} of {} tasks not finished yet{}.\n",
            progress.remaining.len(),
            tasks.len(),
            if a.tasks as usize != tasks.len() {
                " (--tasks applies to fresh workloads only)"
            } else {
                ""
            }
        ));
        if (tasks.len() as u64) < expected {
            intro.push_str(&format!(
                "  note: only {} of its {expected} tasks were enqueued before the previous run stopped.\n",
                tasks.len()
            ));
        }
    }
    if recovery.recovered > 0 {
        intro.push_str(&format!(
            "Crash recovery at open: {} task(s) were left RUNNING by a process that stopped; \
             {} re-queued with backoff, {} failed (retry budget spent).\n",
            recovery.recovered, recovery.requeued, recovery.failed
        ));
    }
    if !json {
        emit(&intro)?;
    }

    let pool = queue
        .workers()
        .concurrency(a.workers as usize)
        .queues([DEMO_QUEUE])
        .grace_period(GRACE)
        .start()?;
    // From here on, Ctrl-C / SIGTERM drain the pool instead of killing the process.
    if let Err(e) = pool.stop_on_signals() {
        // Only where there are no Unix signals: the demo still runs, without a graceful Ctrl-C.
        eprintln!("note: {e}; Ctrl-C will end the demo without a graceful stop");
    }
    let stopper = pool.stopper();
    let stopping = stopper.stopping();

    // "workers started" is announced once the first task is running (or, when nothing is due
    // yet, at the earliest due time), so whoever reads it knows executions are under way.
    let now = queue.now();
    let first_due = tasks
        .iter()
        .filter(|t| t.status == Status::Pending)
        .map(|t| t.next_run_at.since(now))
        .min();
    let announce_by = Instant::now() + first_due.map_or(Duration::ZERO, |d| d + GRACE);
    let mut pb: Option<ProgressBar> = None;
    let mut stopped_early = false;
    loop {
        if pb.is_none() && (!progress.running.is_empty() || Instant::now() >= announce_by) {
            say(
                json,
                &format!(
                    "workers started: {} on queue {DEMO_QUEUE:?}, handlers take ~{work_ms} ms \
                     (Ctrl-C stops gracefully; a second Ctrl-C exits at once)\n",
                    a.workers
                ),
            )?;
            // Created after the stdout line so the two do not interleave on a terminal.
            let bar = progress_bar(tasks.len() as u64, json);
            bar.set_position((tasks.len() - progress.remaining.len()) as u64);
            bar.set_message(progress.message());
            pb = Some(bar);
        }
        if progress.remaining.is_empty() {
            break;
        }
        let tick = if pb.is_some() {
            Duration::from_millis(250)
        } else {
            announce_by.saturating_duration_since(Instant::now())
        };
        select! {
            recv(events) -> ev => match ev {
                Ok(ev) => {
                    let finished = progress.apply(&ev);
                    if let Some(bar) = &pb {
                        if finished {
                            bar.inc(1);
                        }
                        bar.set_message(progress.message());
                    }
                }
                Err(_) => {
                    return Err(CliError::Runtime(
                        "the queue stopped delivering transition events".into(),
                    ));
                }
            },
            recv(stopping) -> _ => {
                stopped_early = true;
                break;
            }
            default(tick) => {}
        }
    }
    if let Some(bar) = &pb {
        bar.finish_and_clear();
    }
    if stopped_early {
        let by = stopper
            .signal()
            .map_or("a stop request".to_string(), |s| s.name().to_string());
        say(
            json,
            &format!(
                "{by} received: stopping gracefully: no new task is claimed; waiting up to {} s for {} running task(s) to finish. \
                 A second Ctrl-C or SIGTERM exits at once (tasks still running are then charged a crash attempt at the next open).\n",
                GRACE.as_secs(),
                progress.running.len()
            ),
        )?;
    }
    let stop = pool.stop();
    let elapsed = started.elapsed();

    let tasks = load_workload(&queue, &workload)?;
    let mut by_kind: BTreeMap<String, Row> = BTreeMap::new();
    let mut total = Row::default();
    for t in &tasks {
        by_kind.entry(t.kind.clone()).or_default().add(t);
        total.add(t);
    }
    let unfinished = tasks.iter().filter(|t| !t.status.is_terminal()).count();
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    // Stopped by a signal: exit 128 + its number, as a shell expects of an interrupted program.
    let code = stop
        .signal
        .map_or(ExitCode::SUCCESS, |s| ExitCode::from(s.exit_code()));

    if json {
        emit_json(&json!({
            "directory": shown.to_string(),
            "workload": workload,
            "resumed": resumed,
            "tasks": tasks.len(),
            "expected_tasks": expected,
            "workers": a.workers,
            "work_ms": work_ms,
            "by_status": total.json(),
            "by_kind": by_kind.iter().map(|(k, r)| (k.clone(), r.json())).collect::<serde_json::Map<_, _>>(),
            "retries_used": total.retries,
            "crash_recovered_tasks": total.crashed,
            "recovery": {
                "recovered": recovery.recovered,
                "requeued": recovery.requeued,
                "failed": recovery.failed,
                "duration_ms": recovery.duration.as_secs_f64() * 1000.0,
            },
            "stopped_by": stop.signal.map(|s| s.name()),
            "unfinished_tasks": unfinished,
            "abandoned_at_stop": stop.abandoned,
            "elapsed_ms": elapsed_ms,
        }))?;
        return Ok(code);
    }

    let mut headers = vec!["KIND", "TASKS"];
    headers.extend(Status::ALL.iter().map(|s| status_str(*s)));
    headers.extend(["RETRIES", "CRASHED"]);
    let mut table = Table::new(&headers).right(&(1..headers.len()).collect::<Vec<_>>());
    for (k, r) in &by_kind {
        table.row(r.cells(k));
    }
    table.row(total.cells("total"));

    let mut facts = Table::new(&["SUMMARY", "", ""]).right(&[1]);
    facts.row([
        "retries used".to_string(),
        total.retries.to_string(),
        "executions beyond each task's first".to_string(),
    ]);
    facts.row([
        "crash-recovered tasks".to_string(),
        total.crashed.to_string(),
        "tasks whose error history holds a \"crash\" (a process died while they ran)".to_string(),
    ]);
    facts.row([
        "recovered at this open".to_string(),
        recovery.recovered.to_string(),
        format!(
            "{} re-queued, {} failed",
            recovery.requeued, recovery.failed
        ),
    ]);
    facts.row([
        "elapsed".to_string(),
        format!("{:.1} s", elapsed.as_secs_f64()),
        String::new(),
    ]);

    let how = if unfinished == 0 {
        "all finished".to_string()
    } else {
        format!(
            "stopped by {} with {unfinished} not finished",
            stop.signal.map_or("a stop request", |s| s.name())
        )
    };
    let mut text = format!(
        "\nDemo workload {workload}: {} tasks, {how}{}.\n\n{}\n{}",
        tasks.len(),
        if resumed { " (resumed)" } else { "" },
        table.render(),
        facts.render()
    );
    if stop.abandoned > 0 {
        text.push_str(&format!(
            "warning: {} execution(s) were still running when the {} s grace period ran out; each is charged its attempt \
             (\"interrupted\" if its handler returns before this process exits, \"crash\" at the next open otherwise)\n",
            stop.abandoned,
            GRACE.as_secs()
        ));
    }
    if unfinished > 0 {
        text.push_str(&format!(
            "\nRun `omniq demo --data {shown}` again to resume the {unfinished} unfinished task(s).\n"
        ));
    }
    text.push_str(&format!(
        "\nNext: omniq list --data {shown} --status failed   |   omniq show --data {shown} <ID>   |   omniq stats --data {shown}\n"
    ));
    emit(&text)?;
    Ok(code)
}
