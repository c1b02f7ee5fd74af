//! The commit protocol: one writer thread owns every state change.
//!
//! Callers send a [`Command`] with a reply channel. The writer takes the first command, then
//! everything else already waiting (up to [`MAX_GROUP`]), applies each to the records (reading
//! through an overlay so later commands in a group see earlier ones), writes the whole group with
//! one atomic `Store::commit`, makes it durable once, and only then answers every waiter. One
//! fsync thus acknowledges many producers (group commit). Because the writer is the only
//! mutator, validation (is it still Pending? is this lease current?) cannot race.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::events::Notify;
use crate::lifecycle::{self, Refusal};
use crate::log::{Cause, LogEntry};
use crate::queue::Durability;
use crate::retry::{Backoff, JitterSource};
use crate::store::{Change, Store};
use crate::task::{Status, TaskError, TaskId, TaskInfo, Timestamp};

/// Most commands applied in one group.
pub(crate) const MAX_GROUP: usize = 1024;

/// How an execution ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Success(Vec<u8>),
    Failure(TaskError),
}

/// What a `Finish` command did.
#[derive(Clone, Debug)]
pub(crate) enum Finished {
    /// The outcome was recorded; the task as it now is.
    Applied(Box<TaskInfo>),
    /// The lease was no longer current (the attempt timed out or was recovered): ignored.
    Stale,
}

type Reply<T> = Sender<Result<T>>;

pub(crate) enum Command {
    Insert {
        tasks: Vec<TaskInfo>,
        reply: Reply<()>,
    },
    /// Claims those of `ids` still claimable; `now` is the claimer's idea of now (it picked
    /// them as due by it).
    Claim {
        ids: Vec<TaskId>,
        now: Timestamp,
        reply: Reply<Vec<TaskInfo>>,
    },
    Finish {
        id: TaskId,
        lease: u64,
        outcome: Outcome,
        reply: Reply<Finished>,
    },
    Cancel {
        id: TaskId,
        reply: Reply<TaskInfo>,
    },
    Retry {
        id: TaskId,
        reply: Reply<TaskInfo>,
    },
    Purge {
        cutoff: Timestamp,
        limit: usize,
        reply: Reply<usize>,
    },
    /// Several commands applied in order in the same group (so in one atomic, durable commit);
    /// each still gets its own reply. The worker pool sends its workers' outcomes together with
    /// its next claim this way: one fsync per round instead of two.
    Many(Vec<Command>),
}

/// Retry backoff per queue, for tasks that carry none of their own.
#[derive(Clone, Debug, Default)]
pub(crate) struct BackoffTable {
    pub default: Backoff,
    pub per_queue: HashMap<String, Backoff>,
}

impl BackoffTable {
    fn for_task(&self, t: &TaskInfo) -> Backoff {
        t.backoff
            .or_else(|| self.per_queue.get(&t.queue).copied())
            .unwrap_or(self.default)
    }
}

pub(crate) struct Writer {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub notify: Arc<Notify>,
    pub jitter: Box<dyn JitterSource>,
    pub backoff: BackoffTable,
    pub durability: Durability,
}

/// A reply waiting for its group's commit: called with the commit error, if any.
type Pending = Box<dyn FnOnce(Option<&Error>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, result: Result<T>) -> Pending {
    Box::new(move |commit_err| {
        let _ = reply.send(match commit_err {
            Some(e) => Err(e.duplicate()),
            None => result,
        });
    })
}

/// The writable view of one group: reads go through the overlay of changes made earlier in the
/// same group.
struct Group<'a> {
    store: &'a dyn Store,
    overlay: HashMap<TaskId, Option<TaskInfo>>,
    changes: Vec<Change>,
    seq: u64,
    now: Timestamp,
    run_id: u64,
    has_claim: bool,
}

impl Group<'_> {
    fn current(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        match self.overlay.get(&id) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(id),
        }
    }

    fn existing(&self, id: TaskId) -> Result<TaskInfo> {
        self.current(id)?.ok_or(Error::NotFound(id))
    }

    fn record(&mut self, before: Option<TaskInfo>, after: Option<TaskInfo>, cause: Option<Cause>) {
        let log = match (&after, cause) {
            (Some(a), Some(cause)) => {
                self.seq += 1;
                Some(LogEntry {
                    seq: self.seq,
                    task_id: a.id,
                    from: before.as_ref().map(|b| b.status),
                    to: a.status,
                    attempt: a.attempts,
                    cause,
                    at: self.now,
                    run_id: self.run_id,
                })
            }
            _ => None,
        };
        let id = after.as_ref().or(before.as_ref()).map(|t| t.id);
        if let Some(id) = id {
            self.overlay.insert(id, after.clone());
        }
        self.changes.push(Change { before, after, log });
    }
}

fn refusal_to_error(id: TaskId, op: &'static str, expected: &'static str, r: Refusal) -> Error {
    match r {
        Refusal::WrongState(status) => Error::InvalidState {
            id,
            status,
            op,
            expected,
        },
        Refusal::NotDue => Error::InvalidState {
            id,
            status: Status::Pending,
            op,
            expected: "due",
        },
        Refusal::Stale => Error::InvalidState {
            id,
            status: Status::Running,
            op,
            expected: "held by this execution",
        },
    }
}

impl Writer {
    /// Starts the writer thread. It runs until every `Sender<Command>` is dropped.
    pub(crate) fn spawn(self, rx: Receiver<Command>) -> Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("omniq-writer".into())
            .spawn(move || self.run(rx))
            .map_err(|e| Error::Storage(format!("cannot start the writer thread: {e}")))
    }

    fn run(mut self, rx: Receiver<Command>) {
        let max = match self.durability {
            Durability::Immediate => 1,
            _ => MAX_GROUP,
        };
        while let Ok(first) = rx.recv() {
            let mut commands = vec![first];
            while commands.len() < max {
                match rx.try_recv() {
                    Ok(c) => commands.push(c),
                    Err(_) => break,
                }
            }
            self.commit_group(commands);
        }
    }

    fn commit_group(&mut self, commands: Vec<Command>) {
        let mut group = Group {
            store: &*self.store,
            overlay: HashMap::new(),
            changes: Vec::new(),
            seq: self.store.last_seq(),
            now: self.clock.now(),
            run_id: self.store.run_id(),
            has_claim: false,
        };
        let mut replies: Vec<Pending> = Vec::with_capacity(commands.len());
        for cmd in commands {
            replies.push(apply(&mut group, cmd, &mut *self.jitter, &self.backoff));
        }
        let durable = self.durability != Durability::Relaxed || group.has_claim;
        let result = if group.changes.is_empty() {
            Ok(())
        } else {
            self.store.commit(&group.changes, group.seq, durable)
        };
        match &result {
            Ok(()) => {
                self.notify.after_commit(&group.changes);
                for r in replies {
                    r(None);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; every command in it is refused");
                for r in replies {
                    r(Some(e));
                }
            }
        }
    }
}

/// Applies one command to the group; returns the reply to send once the group is committed.
fn apply(
    g: &mut Group<'_>,
    cmd: Command,
    jitter: &mut dyn JitterSource,
    backoff: &BackoffTable,
) -> Pending {
    match cmd {
        Command::Insert { tasks, reply } => {
            for t in tasks {
                g.record(None, Some(t), Some(Cause::Enqueued));
            }
            pending(reply, Ok(()))
        }
        Command::Claim { ids, now, reply } => {
            let now = now.max(g.now);
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                // A task that vanished, changed state or is corrupt is simply not claimed.
                let Ok(Some(rec)) = g.current(id) else {
                    continue;
                };
                if let Ok((next, cause)) = lifecycle::claim(&rec, now, g.seq + 1) {
                    g.record(Some(rec), Some(next.clone()), Some(cause));
                    g.has_claim = true;
                    claimed.push(next);
                }
            }
            pending(reply, Ok(claimed))
        }
        Command::Finish {
            id,
            lease,
            outcome,
            reply,
        } => {
            let result = g.existing(id).and_then(|rec| {
                let step = match outcome {
                    Outcome::Success(bytes) => lifecycle::succeed(&rec, lease, bytes, g.now),
                    Outcome::Failure(err) => {
                        let b = backoff.for_task(&rec);
                        lifecycle::fail(&rec, lease, err, g.now, &b, jitter.unit())
                    }
                };
                match step {
                    Ok((next, cause)) => {
                        g.record(Some(rec), Some(next.clone()), Some(cause));
                        Ok(Finished::Applied(Box::new(next)))
                    }
                    Err(Refusal::Stale) | Err(Refusal::WrongState(_)) => Ok(Finished::Stale),
                    Err(r) => Err(refusal_to_error(id, "finish", "running", r)),
                }
            });
            pending(reply, result)
        }
        Command::Cancel { id, reply } => {
            let result = g
                .existing(id)
                .and_then(|rec| match lifecycle::cancel(&rec, g.now) {
                    Ok((next, cause)) => {
                        g.record(Some(rec), Some(next.clone()), Some(cause));
                        Ok(next)
                    }
                    Err(r) => Err(refusal_to_error(id, "cancel", "PENDING", r)),
                });
            pending(reply, result)
        }
        Command::Retry { id, reply } => {
            let result =
                g.existing(id)
                    .and_then(|rec| match lifecycle::manual_retry(&rec, g.now) {
                        Ok((next, cause)) => {
                            g.record(Some(rec), Some(next.clone()), Some(cause));
                            Ok(next)
                        }
                        Err(r) => Err(refusal_to_error(id, "retry", "FAILED or CANCELLED", r)),
                    });
            pending(reply, result)
        }
        Command::Many(commands) => {
            let replies: Vec<Pending> = commands
                .into_iter()
                .map(|c| apply(g, c, jitter, backoff))
                .collect();
            Box::new(move |commit_err| {
                for r in replies {
                    r(commit_err);
                }
            })
        }
        Command::Purge {
            cutoff,
            limit,
            reply,
        } => {
            let result = g.store.finished_before(cutoff, limit).map(|ids| {
                let mut removed = 0;
                for id in ids {
                    if let Ok(Some(rec)) = g.current(id) {
                        if rec.status.is_terminal() {
                            g.record(Some(rec), None, None);
                            removed += 1;
                        }
                    }
                }
                removed
            });
            pending(reply, result)
        }
    }
}

/// Sends a command and waits for its reply.
pub(crate) fn call<T>(tx: &Sender<Command>, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
    let (reply, rx) = crossbeam_channel::bounded(1);
    tx.send(make(reply)).map_err(|_| Error::Closed)?;
    rx.recv().map_err(|_| Error::Closed)?
}
