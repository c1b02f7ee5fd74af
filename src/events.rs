//! Who hears about a commit: dispatchers (new due work), `wait` callers (a task finished),
//! subscribers (every transition), and `tracing`.

use std::collections::HashMap;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

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
}

impl Notify {
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

    /// Called by the writer after a group is durable.
    pub(crate) fn after_commit(&self, changes: &[Change]) {
        let mut new_work = false;
        let mut finished = Vec::new();
        let subscribers_present = !self.subscribers.lock().is_empty();
        let mut events = Vec::new();
        for ch in changes {
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
