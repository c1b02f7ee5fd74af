//! Who hears about a commit: dispatchers (new due work), `wait` callers (a task finished),
//! subscribers (every transition), and `tracing`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use crate::log::LogEntry;
use crate::store::Change;
use crate::task::{Status, TaskError, TaskId};

/// One committed transition, as delivered to [`Queue::subscribe`](crate::Queue::subscribe).
#[derive(Clone, Debug)]
pub struct TransitionEvent {
    /// The log entry (sequence, task id, from, to, attempt, cause, time, run).
    pub entry: LogEntry,
    /// The task's kind.
    pub kind: String,
    /// The task's queue.
    pub queue: String,
    /// The error recorded by this transition, if it was a failure.
    pub error: Option<TaskError>,
    /// When the task was due before this transition (its `next_run_at`): for a claim,
    /// `entry.at - due_at` is the enqueue-to-start latency.
    pub due_at: Option<crate::task::Timestamp>,
    /// When the execution this transition ends started (for transitions out of `Running`).
    pub started_at: Option<crate::task::Timestamp>,
}

/// A `wait` caller: its token (to remove it if it gives up) and its wake-up channel.
type Waiter = (u64, Sender<()>);

#[derive(Default)]
pub(crate) struct Notify {
    /// One coalescing wake-up channel per dispatcher.
    wakers: Mutex<Vec<Sender<()>>>,
    /// `wait` callers, by task.
    waiters: Mutex<HashMap<TaskId, Vec<Waiter>>>,
    next_token: std::sync::atomic::AtomicU64,
    subscribers: Mutex<Vec<Sender<TransitionEvent>>>,
    /// The highest transition sequence number whose group may be visible to reads: the writer
    /// raises it *before* it starts writing a group to the store.
    applied: AtomicU64,
    /// The highest sequence number whose group has been acknowledged (in `Immediate` and
    /// `Group` mode: made durable), or why acknowledgements stopped.
    acked: Mutex<Acked>,
    acked_changed: Condvar,
    /// Wake dispatchers when a task stops running (a concurrency limit exists: the slot it
    /// frees may let held-back work be claimed).
    wake_on_exit: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Acked {
    seq: u64,
    failed: Option<String>,
}

/// Why [`Notify::wait_acknowledged`] returned without reaching its target.
pub(crate) enum BarrierMiss {
    /// The deadline passed first.
    Timeout,
    /// A commit failed: nothing later will be acknowledged.
    Failed(String),
}

impl Notify {
    /// Whether a task leaving `Running` wakes dispatchers (while concurrency limits exist).
    pub(crate) fn set_wake_on_exit(&self, on: bool) {
        self.wake_on_exit
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Whether a task leaving `Running` wakes dispatchers.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn wakes_on_exit(&self) -> bool {
        self.wake_on_exit.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A channel that receives (at most one queued) signal whenever new Pending work commits.
    pub(crate) fn add_waker(&self) -> Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.wakers.lock().push(tx);
        rx
    }

    /// Signals every dispatcher (clock jumps, new work).
    pub(crate) fn wake_all(&self) {
        self.wakers
            .lock()
            .retain(|w| !matches!(w.try_send(()), Err(TrySendError::Disconnected(_))));
    }

    /// Registers interest in `id` reaching a terminal state (or disappearing).
    /// Returns a token for [`remove_waiter`](Notify::remove_waiter).
    pub(crate) fn add_waiter(&self, id: TaskId) -> (u64, Receiver<()>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiters.lock().entry(id).or_default().push((token, tx));
        (token, rx)
    }

    /// Wakes every `wait` caller, so that each re-reads its task. For backends whose tasks can
    /// finish in another process (PostgreSQL): this process sees no local commit then, only a
    /// notification or its fallback poll. The waiters are removed, as [`after_commit`]
    /// removes those of finished tasks; a caller whose task is not finished registers again.
    ///
    /// [`after_commit`]: Notify::after_commit
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn wake_waiters(&self) {
        let all = std::mem::take(&mut *self.waiters.lock());
        for (_, w) in all.into_values().flatten() {
            let _ = w.try_send(());
        }
    }

    /// Forgets a waiter that gave up.
    pub(crate) fn remove_waiter(&self, id: TaskId, token: u64) {
        let mut w = self.waiters.lock();
        if let Some(list) = w.get_mut(&id) {
            list.retain(|(t, _)| *t != token);
            if list.is_empty() {
                w.remove(&id);
            }
        }
    }

    pub(crate) fn subscribe(&self) -> Receiver<TransitionEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.subscribers.lock().push(tx);
        rx
    }

    /// Starts both watermarks at `seq`: what a store holds when it is opened is on disk.
    pub(crate) fn start_at(&self, seq: u64) {
        self.applied.fetch_max(seq, Ordering::SeqCst);
        let mut a = self.acked.lock();
        a.seq = a.seq.max(seq);
    }

    /// Called by the writer before it writes a group whose last transition is `seq` to the
    /// store: from then on a read may see it.
    pub(crate) fn applying(&self, seq: u64) {
        self.applied.fetch_max(seq, Ordering::SeqCst);
    }

    /// The highest sequence number a read may already reflect.
    pub(crate) fn applied_seq(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Called when a group up to `seq` has been acknowledged to its callers.
    pub(crate) fn acknowledged(&self, seq: u64) {
        let mut a = self.acked.lock();
        if seq > a.seq {
            a.seq = seq;
            self.acked_changed.notify_all();
        }
    }

    /// Called when a commit failed: barrier waiters stop waiting.
    pub(crate) fn commit_failed(&self, reason: &str) {
        let mut a = self.acked.lock();
        a.failed.get_or_insert_with(|| reason.to_string());
        self.acked_changed.notify_all();
    }

    /// Blocks until every group up to `seq` has been acknowledged (so, outside `Relaxed`
    /// mode, is durable), or `deadline` passes, or a commit fails.
    pub(crate) fn wait_acknowledged(
        &self,
        seq: u64,
        deadline: Instant,
    ) -> std::result::Result<(), BarrierMiss> {
        let mut a = self.acked.lock();
        loop {
            if a.seq >= seq {
                return Ok(());
            }
            if let Some(reason) = &a.failed {
                return Err(BarrierMiss::Failed(reason.clone()));
            }
            if self.acked_changed.wait_until(&mut a, deadline).timed_out() {
                return if a.seq >= seq {
                    Ok(())
                } else {
                    Err(BarrierMiss::Timeout)
                };
            }
        }
    }

    /// Called by the writer after a group is durable.
    pub(crate) fn after_commit(&self, changes: &[Change]) {
        let mut new_work = false;
        let mut finished = Vec::new();
        let subscribers_present = !self.subscribers.lock().is_empty();
        let mut events = Vec::new();
        let wake_on_exit = self.wake_on_exit.load(std::sync::atomic::Ordering::Acquire);
        for ch in changes {
            if wake_on_exit
                && ch
                    .before
                    .as_ref()
                    .is_some_and(|b| b.status == Status::Running)
                && ch
                    .after
                    .as_ref()
                    .is_none_or(|a| a.status != Status::Running)
            {
                new_work = true;
            }
            match &ch.after {
                Some(a) if a.status == Status::Pending => new_work = true,
                Some(a) if a.status.is_terminal() => finished.push(a.id),
                None => finished.extend(ch.before.as_ref().map(|b| b.id)),
                _ => {}
            }
            if let (Some(a), Some(entry)) = (&ch.after, &ch.log) {
                let error = match (&entry.cause, &a.last_error) {
                    (crate::log::Cause::Failed { .. }, Some(e)) => Some(e.clone()),
                    _ => None,
                };
                tracing::debug!(
                    task = %a.id, kind = %a.kind, queue = %a.queue, attempt = a.attempts,
                    from = ?entry.from, to = %entry.to, cause = %entry.cause,
                    error_type = error.as_ref().map(|e| e.error_type.as_str()).unwrap_or(""),
                    "transition"
                );
                if subscribers_present {
                    events.push(TransitionEvent {
                        entry: entry.clone(),
                        kind: a.kind.clone(),
                        queue: a.queue.clone(),
                        error,
                        due_at: ch.before.as_ref().map(|b| b.next_run_at),
                        started_at: ch
                            .before
                            .as_ref()
                            .filter(|b| b.status == Status::Running)
                            .and_then(|b| b.started_at),
                    });
                }
            }
        }
        if new_work {
            self.wake_all();
        }
        if !finished.is_empty() {
            let mut waiters = self.waiters.lock();
            for id in finished {
                for (_, w) in waiters.remove(&id).unwrap_or_default() {
                    let _ = w.try_send(());
                }
            }
        }
        if !events.is_empty() {
            let mut subs = self.subscribers.lock();
            subs.retain(|s| events.iter().all(|e| s.send(e.clone()).is_ok()));
        }
    }
}
