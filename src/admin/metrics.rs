//! Prometheus metrics and the dashboard's last-hour activity.
//!
//! Transition counters, execution and failure counts, duration and latency histograms and the
//! one-hour ring buffer are derived from [`Queue::subscribe`] events on a thread of their own,
//! off the workers' path. Commit group sizes and sync latency come from atomics the store
//! updates as it commits. Task counts come from `Queue::stats` (O(queues)) when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{select, Sender};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::events::TransitionEvent;
use crate::histogram::{self, Histogram, Snapshot};
use crate::log::Cause;
use crate::queue::Queue;
use crate::task::{Status, Timestamp};

/// Distinct label sets kept per metric; beyond it, new ones are counted under "other" (a
/// handler choosing error types freely must not grow memory without bound).
const MAX_SERIES: usize = 500;
/// Minutes of activity kept for the dashboard.
const RING_MINUTES: usize = 60;

#[derive(Clone, Copy, Default)]
struct Minute {
    /// Minutes since the epoch this slot holds (slots are reused round-robin).
    minute: u64,
    enqueued: u64,
    started: u64,
    completed: u64,
    failures: u64,
    latency_ms_sum: u64,
    latency_n: u64,
}

struct State {
    transitions: BTreeMap<(String, &'static str), u64>,
    executions: BTreeMap<String, u64>,
    failures: BTreeMap<(String, String), u64>,
    duration: BTreeMap<String, Histogram>,
    latency: BTreeMap<String, Histogram>,
    ring: [Minute; RING_MINUTES],
}

fn bounded_key<K: Ord + Clone, V>(map: &BTreeMap<K, V>, key: K, other: K) -> K {
    if map.contains_key(&key) || map.len() < MAX_SERIES {
        key
    } else {
        other
    }
}

fn cause_label(c: &Cause) -> &'static str {
    match c {
        Cause::Enqueued => "enqueued",
        Cause::Claimed => "claimed",
        Cause::Succeeded => "succeeded",
        Cause::Failed { .. } => "failed",
        Cause::Cancelled => "cancelled",
        Cause::ManualRetry => "manual_retry",
        Cause::Released => "released",
    }
}

fn state_label(s: Status) -> &'static str {
    match s {
        Status::Pending => "pending",
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

impl State {
    fn minute(&mut self, at: Timestamp) -> &mut Minute {
        let m = at.0 / 60_000;
        let slot = &mut self.ring[(m % RING_MINUTES as u64) as usize];
        if slot.minute != m {
            *slot = Minute {
                minute: m,
                ..Minute::default()
            };
        }
        slot
    }

    fn add(&mut self, ev: &TransitionEvent) {
        let e = &ev.entry;
        let key = bounded_key(
            &self.transitions,
            (cause_label(&e.cause).to_string(), state_label(e.to)),
            ("other".into(), "other"),
        );
        *self.transitions.entry(key).or_insert(0) += 1;
        let secs = |from: Option<Timestamp>| from.map(|f| e.at.since(f).as_secs_f64());
        match &e.cause {
            Cause::Enqueued => self.minute(e.at).enqueued += 1,
            Cause::Claimed => {
                let k = bounded_key(&self.executions, ev.kind.clone(), "other".into());
                *self.executions.entry(k).or_insert(0) += 1;
                let wait = secs(ev.due_at).unwrap_or(0.0);
                let q = bounded_key(&self.latency, ev.queue.clone(), "other".into());
                self.latency
                    .entry(q)
                    .or_insert_with(|| Histogram::new(histogram::SECONDS))
                    .observe(wait);
                let m = self.minute(e.at);
                m.started += 1;
                m.latency_ms_sum += (wait * 1000.0) as u64;
                m.latency_n += 1;
            }
            Cause::Succeeded => self.minute(e.at).completed += 1,
            Cause::Failed { error_type, .. } => {
                let k = bounded_key(
                    &self.failures,
                    (ev.kind.clone(), error_type.clone()),
                    ("other".into(), "other".into()),
                );
                *self.failures.entry(k).or_insert(0) += 1;
                self.minute(e.at).failures += 1;
            }
            Cause::Cancelled | Cause::ManualRetry | Cause::Released => {}
        }
        if e.from == Some(Status::Running) {
            if let Some(d) = secs(ev.started_at) {
                let q = bounded_key(&self.duration, ev.queue.clone(), "other".into());
                self.duration
                    .entry(q)
                    .or_insert_with(|| Histogram::new(histogram::SECONDS))
                    .observe(d);
            }
        }
    }
}

/// The collector: a thread reading transition events into counters.
pub(crate) struct Metrics {
    state: Arc<Mutex<State>>,
    stop_tx: Mutex<Option<Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Metrics {
    pub(crate) fn start(queue: &Queue) -> Result<Arc<Metrics>> {
        let state = Arc::new(Mutex::new(State {
            transitions: BTreeMap::new(),
            executions: BTreeMap::new(),
            failures: BTreeMap::new(),
            duration: BTreeMap::new(),
            latency: BTreeMap::new(),
            ring: [Minute::default(); RING_MINUTES],
        }));
        let events = queue.subscribe();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("omniq-metrics".into())
            .spawn(move || loop {
                select! {
                    recv(events) -> ev => {
                        let Ok(ev) = ev else { return };
                        let mut s = st.lock();
                        s.add(&ev);
                        while let Ok(ev) = events.try_recv() {
                            s.add(&ev);
                        }
                    }
                    recv(stop_rx) -> _ => return,
                }
            })
            .map_err(|e| Error::Storage(format!("cannot start the metrics thread: {e}")))?;
        Ok(Arc::new(Metrics {
            state,
            stop_tx: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    pub(crate) fn stop(&self) {
        self.stop_tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// The last hour, minute by minute (oldest first), and its totals.
    pub(crate) fn activity_json(&self, now: Timestamp) -> Value {
        let now_min = now.0 / 60_000;
        let s = self.state.lock();
        let mut minutes = Vec::with_capacity(RING_MINUTES);
        let (mut completed, mut failures, mut started, mut lat_sum, mut lat_n, mut enq) =
            (0, 0, 0, 0, 0, 0);
        for back in (0..RING_MINUTES as u64).rev() {
            let m = now_min.saturating_sub(back);
            let slot = s.ring[(m % RING_MINUTES as u64) as usize];
            let slot = if slot.minute == m {
                slot
            } else {
                Minute {
                    minute: m,
                    ..Minute::default()
                }
            };
            completed += slot.completed;
            failures += slot.failures;
            started += slot.started;
            enq += slot.enqueued;
            lat_sum += slot.latency_ms_sum;
            lat_n += slot.latency_n;
            minutes.push(json!({
                "minute": Timestamp(m * 60_000).to_string(),
                "enqueued": slot.enqueued,
                "started": slot.started,
                "completed": slot.completed,
                "failures": slot.failures,
            }));
        }
        let finished = completed + failures;
        json!({
            "window_minutes": RING_MINUTES,
            "enqueued": enq,
            "started": started,
            "completed": completed,
            "failures": failures,
            "throughput_per_minute": completed as f64 / RING_MINUTES as f64,
            "failure_rate": if finished == 0 { 0.0 } else { failures as f64 / finished as f64 },
            "mean_enqueue_to_start_ms": if lat_n == 0 { 0.0 } else { lat_sum as f64 / lat_n as f64 },
            "minutes": minutes,
        })
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self, queue: &Queue) -> String {
        let mut out = String::with_capacity(4096);
        // Task counts, from the counters (O(queues)).
        header(
            &mut out,
            "omniq_tasks",
            "gauge",
            "Tasks stored, per queue and state.",
        );
        if let Ok(stats) = queue.stats() {
            for (q, counts) in &stats.by_queue {
                for st in Status::ALL {
                    let n = counts.get(&st).copied().unwrap_or(0);
                    let _ = writeln!(
                        out,
                        "omniq_tasks{{queue=\"{}\",state=\"{}\"}} {n}",
                        esc(q),
                        state_label(st)
                    );
                }
            }
        }
        header(
            &mut out,
            "omniq_queue_paused",
            "gauge",
            "1 while a queue is paused.",
        );
        for q in queue.paused_queues() {
            let _ = writeln!(out, "omniq_queue_paused{{queue=\"{}\"}} 1", esc(&q));
        }
        // Limits: what runs, what remains, what waits (issue 11).
        if let Ok(limits) = queue.limits() {
            for (name, help) in [
                (
                    "omniq_limit_running",
                    "Running tasks of a limited queue or kind.",
                ),
                (
                    "omniq_limit_started_in_window",
                    "Executions a rate limit counts in its current window.",
                ),
                (
                    "omniq_limit_waiting",
                    "Due tasks held back by a limit (counted up to 10,000).",
                ),
            ] {
                header(&mut out, name, "gauge", help);
                for l in &limits {
                    let (scope, n) = match &l.scope {
                        crate::LimitScope::Queue(q) => ("queue", q),
                        crate::LimitScope::Kind(k) => ("kind", k),
                    };
                    let v = match name {
                        "omniq_limit_running" => u64::from(l.running),
                        "omniq_limit_started_in_window" => u64::from(l.started_in_window),
                        _ => l.waiting,
                    };
                    let _ = writeln!(out, "{name}{{scope=\"{scope}\",name=\"{}\"}} {v}", esc(n));
                }
            }
        }
        // Schedules: ticks fired and skipped since created.
        if let Ok(schedules) = queue.schedules() {
            header(
                &mut out,
                "omniq_schedule_ticks_total",
                "counter",
                "Schedule ticks, by schedule and outcome (fired, or skipped by the missed-tick policy).",
            );
            for s in &schedules {
                let _ = writeln!(
                    out,
                    "omniq_schedule_ticks_total{{schedule=\"{}\",outcome=\"fired\"}} {}",
                    esc(&s.name),
                    s.fired
                );
                let _ = writeln!(
                    out,
                    "omniq_schedule_ticks_total{{schedule=\"{}\",outcome=\"skipped\"}} {}",
                    esc(&s.name),
                    s.skipped
                );
            }
        }
        {
            let s = self.state.lock();
            header(
                &mut out,
                "omniq_transitions_total",
                "counter",
                "Transitions committed since the admin server started, by cause and new state.",
            );
            for ((cause, to), n) in &s.transitions {
                let _ = writeln!(
                    out,
                    "omniq_transitions_total{{cause=\"{}\",to=\"{to}\"}} {n}",
                    esc(cause)
                );
            }
            header(
                &mut out,
                "omniq_executions_total",
                "counter",
                "Executions started (claims), by task kind.",
            );
            for (kind, n) in &s.executions {
                let _ = writeln!(out, "omniq_executions_total{{kind=\"{}\"}} {n}", esc(kind));
            }
            header(
                &mut out,
                "omniq_execution_failures_total",
                "counter",
                "Failed executions, by task kind and error_type.",
            );
            for ((kind, et), n) in &s.failures {
                let _ = writeln!(
                    out,
                    "omniq_execution_failures_total{{kind=\"{}\",error_type=\"{}\"}} {n}",
                    esc(kind),
                    esc(et)
                );
            }
            header(
                &mut out,
                "omniq_execution_duration_seconds",
                "histogram",
                "How long executions ran, per queue.",
            );
            for (q, h) in &s.duration {
                histogram_lines(
                    &mut out,
                    "omniq_execution_duration_seconds",
                    &format!("queue=\"{}\"", esc(q)),
                    &h.snapshot(),
                );
            }
            header(
                &mut out,
                "omniq_enqueue_to_start_seconds",
                "histogram",
                "From when a task was due to when it was claimed, per queue.",
            );
            for (q, h) in &s.latency {
                histogram_lines(
                    &mut out,
                    "omniq_enqueue_to_start_seconds",
                    &format!("queue=\"{}\"", esc(q)),
                    &h.snapshot(),
                );
            }
        }
        if let Some(m) = queue.inner.backend.commit_metrics() {
            header(
                &mut out,
                "omniq_commit_group_size",
                "histogram",
                "Transitions per atomic commit group.",
            );
            histogram_lines(
                &mut out,
                "omniq_commit_group_size",
                "",
                &m.group_size.snapshot(),
            );
            header(
                &mut out,
                "omniq_fsync_duration_seconds",
                "histogram",
                "Duration of each flush + fsync that makes commits durable.",
            );
            histogram_lines(
                &mut out,
                "omniq_fsync_duration_seconds",
                "",
                &m.sync_seconds.snapshot(),
            );
        }
        let r = queue.recovery_report();
        header(
            &mut out,
            "omniq_recovery_tasks",
            "gauge",
            "What crash recovery found at open: tasks left running, requeued, failed.",
        );
        for (k, n) in [
            ("recovered", r.recovered),
            ("requeued", r.requeued),
            ("failed", r.failed),
            ("corrupt", r.corrupt.len()),
        ] {
            let _ = writeln!(out, "omniq_recovery_tasks{{outcome=\"{k}\"}} {n}");
        }
        header(
            &mut out,
            "omniq_recovery_duration_seconds",
            "gauge",
            "How long crash recovery took at open.",
        );
        let _ = writeln!(
            out,
            "omniq_recovery_duration_seconds {}",
            r.duration.as_secs_f64()
        );
        out
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.stop();
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram_lines(out: &mut String, name: &str, labels: &str, s: &Snapshot) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (le, n) in &s.buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", s.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", s.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", s.count);
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn label_sets_are_bounded() {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..MAX_SERIES + 10 {
            let k = bounded_key(&m, format!("k{i}"), "other".into());
            *m.entry(k).or_insert(0) += 1;
        }
        assert_eq!(m.len(), MAX_SERIES + 1);
        assert_eq!(m.get("other"), Some(&10));
    }
}
