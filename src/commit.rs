//! The commit protocol: one writer thread owns every state change.
//!
//! Callers send a [`Command`] with a reply channel. The writer takes the first command, then
//! everything else already waiting (up to [`MAX_GROUP`]), applies each to the records (reading
//! through an overlay so later commands in a group see earlier ones), writes the whole group with
//! one atomic `Store::commit`, makes it durable once, and only then answers every waiter. One
//! fsync thus acknowledges many producers (group commit). Because the writer is the only
//! mutator, validation (is it still Pending? is this lease current?) cannot race.
//!
//! "The writer" is the writer's state ([`Core`]) more than its thread: a caller that waits for
//! its reply anyway may take that state when it is idle and run the same group on its own
//! thread ([`FastPath`]), which saves two thread switches per call. Groups are still applied one
//! at a time, under the `Core` lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::events::Notify;
use crate::extras::{Inserted, ScheduleInfo, ScheduledFrom, TaskExtras};
use crate::lifecycle::{self, Refusal};
use crate::limiter::{self, Limiter};
use crate::log::{Cause, LogEntry};
use crate::queue::Durability;
use crate::retry::{Backoff, JitterSource};
use crate::rules::limit::{Limit, LimitScope};
use crate::rules::schedule;
use crate::rules::unique::{self, Hold, Unique};
use crate::store::{Change, QueueSet, SideWrite, Store};
use crate::task::{Status, TaskError, TaskId, TaskInfo, Timestamp};

/// Groups that go through the syncer pipeline after a group synced on the writer thread found
/// commands waiting once it was durable (see `Writer::run`).
const INLINE_PAUSE_GROUPS: u32 = 256;

/// Most commands applied in one group.
pub(crate) const MAX_GROUP: usize = 1024;

/// How long a group of nothing but workers' outcomes may wait for its sync, in the hope that
/// the next group's sync covers it too ([`Command::Outcomes`]). The case it is for: one producer
/// enqueueing while workers run, where each outcome arrives while the producer's enqueue is
/// syncing and the producer's next enqueue follows within tens of microseconds; syncing the
/// outcome on its own put a second fsync between every two enqueues. The cost: a worker's
/// outcome on an otherwise idle queue is acknowledged this much later.
pub(crate) const DEFER_OUTCOMES: std::time::Duration = std::time::Duration::from_micros(500);

/// How an execution ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Success(Vec<u8>),
    Failure(TaskError),
    /// Cancellation was requested while it ran: the attempt ends `Cancelled`.
    Cancelled,
    /// Claimed ahead and never started: back to `Pending`, the attempt given back
    /// ([`lifecycle::release`]).
    Released,
}

/// What a `Finish` command did.
#[derive(Clone, Debug)]
pub(crate) enum Finished {
    /// The outcome was recorded; the task as it now is.
    Applied(Box<TaskInfo>),
    /// The lease was no longer current (the attempt timed out or was recovered): ignored.
    Stale,
}

pub(crate) type Reply<T> = Sender<Result<T>>;

/// A task to insert, with its extras (unique key, schedule tick) if it has any.
#[derive(Clone, Debug)]
pub(crate) struct NewTask {
    pub task: TaskInfo,
    pub extras: Option<TaskExtras>,
}

pub(crate) enum Command {
    /// Inserts tasks, all or none; a task whose unique key is held is answered with the
    /// holder's id as a duplicate instead.
    Insert {
        tasks: Vec<NewTask>,
        reply: Reply<Vec<Inserted>>,
    },
    /// Sets (`Some`) or removes a limit.
    SetLimit {
        scope: LimitScope,
        limit: Option<Limit>,
        reply: Reply<()>,
    },
    /// Creates or updates a schedule (an update keeps its `last_fired`, counters and pause).
    /// Replies whether it was created.
    PutSchedule {
        info: Box<ScheduleInfo>,
        reply: Reply<bool>,
    },
    /// Pauses or resumes a schedule (resuming skips the ticks of the pause).
    PauseSchedule {
        name: String,
        paused: bool,
        reply: Reply<()>,
    },
    /// Removes a schedule; replies whether it existed.
    RemoveSchedule {
        name: String,
        reply: Reply<bool>,
    },
    /// Fires every tick owed at `now` (or the writer's now if later): inserts the tasks and
    /// advances each schedule's `last_fired` in the same commit. Replies the new tasks.
    Tick {
        now: Timestamp,
        reply: Reply<Vec<TaskId>>,
    },
    /// Claims up to `n` tasks of `queues` due at `now` (the claimer's idea of now, or the
    /// writer's if later), best first.
    Claim {
        queues: QueueSet,
        n: usize,
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
    /// Sets (`paused`) or clears a queue's durable pause flag. A paused queue's tasks are not
    /// claimed (claims in the same or later groups skip them) and nothing is charged.
    SetPaused {
        queue: String,
        paused: bool,
        reply: Reply<()>,
    },
    /// Several commands applied in order in the same group (so in one atomic, durable commit);
    /// each still gets its own reply. The worker pool sends its workers' outcomes together with
    /// its next claim this way: one fsync per round instead of two.
    Many(Vec<Command>),
    /// A worker pool's outcomes (`Finish` commands). Applied at once like [`Command::Many`],
    /// but a group made of nothing else that claims nothing may wait up to [`DEFER_OUTCOMES`]
    /// for its sync, so that the next group's sync covers it (see [`Core::process`]).
    Outcomes(Vec<Command>),
    /// Registers a worker pool's standing claim (see [`Standing`]); it takes part in this
    /// group already.
    Stand {
        standing: Standing,
        reply: Reply<()>,
    },
    /// Withdraws a standing claim; replies how many tasks it took in all (the pool waits for
    /// that many before it stops).
    Sit {
        id: u64,
        reply: Reply<u64>,
    },
    /// Does nothing but form a group, in which the standing claims look for due work (a pool
    /// whose task came due by the clock, not by a write).
    Poke {
        reply: Reply<()>,
    },
}

impl Command {
    /// Whether the command's sync may wait for the next group's (see [`Command::Outcomes`]).
    fn is_lazy(&self) -> bool {
        matches!(self, Command::Outcomes(_))
    }
}

/// A worker pool's standing claim: the free slots it has granted (`granted`, raised by the pool
/// only) are filled by the writer, in whatever group makes work due, with that group's commit.
/// So a task enqueued while a worker is idle is claimed in its own enqueue's group, with no
/// second fsync for the claim (issue 12: one producer + 4 workers went from two syncs per
/// task to one). The claimed tasks go to `reply`, once durable, like any claim's.
pub(crate) struct Standing {
    pub shared: Arc<StandingShared>,
    pub queues: QueueSet,
    pub reply: Sender<Result<Vec<TaskInfo>>>,
}

impl Standing {
    pub(crate) fn new(
        shared: Arc<StandingShared>,
        queues: QueueSet,
        reply: Sender<Result<Vec<TaskInfo>>>,
    ) -> Standing {
        Standing {
            shared,
            queues,
            reply,
        }
    }
}

impl StandingShared {
    /// Slots granted and not yet filled.
    pub(crate) fn free(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.granted
            .load(Ordering::Acquire)
            .saturating_sub(self.taken.load(Ordering::Acquire))
    }
}

/// What a pool and the writer share about a standing claim.
#[derive(Debug, Default)]
pub(crate) struct StandingShared {
    /// Names the claim for [`Command::Sit`].
    pub id: u64,
    /// Slots granted so far, in all (only the pool raises it).
    pub granted: std::sync::atomic::AtomicU64,
    /// Tasks claimed for it so far, in all (only the writer raises it). While it is below
    /// `granted`, every group looks for due work for it.
    pub taken: std::sync::atomic::AtomicU64,
    /// `granted` as the writer last looked for work for it: a pool that granted more since
    /// knows a look is still to come.
    pub seen: std::sync::atomic::AtomicU64,
    /// The pool died ([`WorkerPool::simulate_crash`](crate::WorkerPool::simulate_crash)): claim
    /// nothing more for it.
    pub closed: std::sync::atomic::AtomicBool,
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
    /// Set when a sync failed: the store may hold writes that never reached disk.
    pub poisoned: Arc<Mutex<Option<String>>>,
    /// Pending tasks whose records do not decode: never claimed, and left out of due counts so
    /// a worker pool does not ask for them again and again. Reported once each.
    pub corrupt: Arc<Mutex<HashSet<TaskId>>>,
    /// Limits and their state (shared with readers deciding whether to claim).
    pub limiter: Arc<Mutex<Limiter>>,
    /// Schedules (shared with readers listing them).
    pub schedules: Arc<Mutex<BTreeMap<String, ScheduleInfo>>>,
    /// The earliest next tick of any schedule, in ms (`u64::MAX`: none).
    pub next_tick: Arc<AtomicU64>,
    /// Whether any task may have extras (else transitions skip looking them up).
    pub has_extras: bool,
    /// Worker pools' standing claims, in registration order.
    pub standing: Vec<Standing>,
    /// How long a group of nothing but workers' outcomes may wait for the next group's sync
    /// ([`DEFER_OUTCOMES`]; tests set others).
    pub defer_outcomes: std::time::Duration,
}

/// The earliest next tick among `schedules` (`u64::MAX` when none).
pub(crate) fn earliest_tick(schedules: &BTreeMap<String, ScheduleInfo>) -> u64 {
    schedules
        .values()
        .filter_map(ScheduleInfo::next_tick)
        .map(|t| t.0)
        .min()
        .unwrap_or(u64::MAX)
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
    /// Extras read or written in this group (`None`: the task has none).
    extras: HashMap<TaskId, Option<TaskExtras>>,
    /// Unique holders changed in this group (`None`: released).
    holders: HashMap<[u8; 32], Option<TaskId>>,
    /// Writes beside task records, in order; committed with the group.
    side: Vec<SideWrite>,
    has_extras: bool,
    limiter: &'a mut Limiter,
    schedules: &'a mut BTreeMap<String, ScheduleInfo>,
    /// The time log entries record, when not the group's (a claim logs its claimer's now,
    /// the instant its rate limits counted).
    log_at: Option<Timestamp>,
    standing: &'a mut Vec<Standing>,
    /// A task became due-able (`Pending`) in this group: a claim cannot see it until the
    /// group is committed.
    made_due: bool,
    /// A standing claim had more slots than due work.
    pool_idle: bool,
}

impl Group<'_> {
    /// A task's extras, through the group's overlay. An extras record that does not decode is
    /// reported and treated as absent (its task keeps no unique hold).
    fn extras_of(&mut self, id: TaskId) -> Option<TaskExtras> {
        if !self.has_extras {
            return None;
        }
        if let Some(e) = self.extras.get(&id) {
            return e.clone();
        }
        let e = match self.store.extras(id) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(task = %id, error = %e, "task extras do not decode; its unique key is not tracked");
                None
            }
        };
        self.extras.insert(id, e.clone());
        e
    }

    /// Who holds a unique digest, through the group's overlay.
    fn holder(&self, digest: &[u8; 32]) -> Result<Option<TaskId>> {
        match self.holders.get(digest) {
            Some(h) => Ok(*h),
            None => self.store.unique_holder(digest),
        }
    }

    /// Records a task's extras and takes its unique key (the caller checked it is free).
    fn attach(&mut self, id: TaskId, extras: TaskExtras) {
        self.has_extras = true;
        if let Some(u) = &extras.unique {
            self.holders.insert(u.digest, Some(id));
            self.side.push(SideWrite::UniqueHold {
                digest: u.digest,
                holder: Some(id),
            });
        }
        self.extras.insert(id, Some(extras.clone()));
        self.side.push(SideWrite::Extras {
            id,
            extras: Some(extras),
        });
    }

    /// The unique bookkeeping of a transition of an existing task.
    fn unique_step(&mut self, before: &TaskInfo, after: Option<&TaskInfo>) {
        let to = after.map(|a| a.status);
        if to == Some(before.status) {
            return;
        }
        let id = before.id;
        let Some(extras) = self.extras_of(id) else {
            return;
        };
        if let Some(u) = &extras.unique {
            match unique::hold_change(u.states, Some(before.status), to) {
                Hold::Release => {
                    self.holders.insert(u.digest, None);
                    self.side.push(SideWrite::UniqueHold {
                        digest: u.digest,
                        holder: None,
                    });
                    tracing::debug!(task = %id, key = %u.key, "unique key released");
                }
                Hold::Acquire => {
                    self.holders.insert(u.digest, Some(id));
                    self.side.push(SideWrite::UniqueHold {
                        digest: u.digest,
                        holder: Some(id),
                    });
                }
                Hold::Keep | Hold::Nothing => {}
            }
        }
        if after.is_none() {
            self.extras.insert(id, None);
            self.side.push(SideWrite::Extras { id, extras: None });
        }
    }

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
        self.limiter.on_change(before.as_ref(), after.as_ref());
        if after.as_ref().is_some_and(|a| a.status == Status::Pending) {
            self.made_due = true;
        }
        if let Some(b) = &before {
            self.unique_step(b, after.as_ref());
        }
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
                    at: self.log_at.unwrap_or(self.now),
                    run_id: self.run_id,
                })
            }
            _ => None,
        };
        let id = after.as_ref().or(before.as_ref()).map(|t| t.id);
        if let Some(id) = id {
            self.overlay.insert(id, after.clone());
        }
        self.changes.push(Change {
            before,
            after,
            log,
            side: Vec::new(),
        });
    }
}

impl Writer {
    /// Starts the writer thread. It runs until every `Sender<Command>` is dropped.
    /// Starts the writer thread (and, unless `Immediate`, the syncer threads). Returns the
    /// thread and the [`FastPath`] through which a waiting caller may apply its own command.
    pub(crate) fn spawn(self, rx: Receiver<Command>) -> Result<(JoinHandle<()>, FastPath)> {
        // Pipelining: the thread applying group N+1 to sled runs while a syncer thread makes
        // group N durable, so the CPU work of a group overlaps the previous group's fsync.
        // Replies and notifications are sent by the syncer, in group order, only once their
        // group is durable. `Immediate` keeps everything on the applying thread: each write is
        // its own flush + fsync; so does `Group` for a lone group while nothing else is in
        // flight (see `Core::process`).
        let (sync_tx, sync_rx) = crossbeam_channel::unbounded::<Applied>();
        let order = SyncOrder::default();
        let sequencer = Arc::new(Sequencer::default());
        let mut syncer_threads = Vec::new();
        if self.durability != Durability::Immediate {
            for _ in 0..syncers() {
                let store = self.store.clone();
                let notify = self.notify.clone();
                let poisoned = self.poisoned.clone();
                let synced = order.synced.clone();
                let sequencer = sequencer.clone();
                let rx = sync_rx.clone();
                match std::thread::Builder::new()
                    .name("omniq-syncer".into())
                    .spawn(move || run_syncer(&*store, &notify, &poisoned, &synced, &sequencer, rx))
                {
                    Ok(h) => syncer_threads.push(h),
                    Err(e) => tracing::error!(error = %e, "cannot start a syncer thread"),
                }
            }
            if syncer_threads.is_empty() {
                tracing::error!("no syncer thread; syncing on the writer");
            }
        }
        drop(sync_rx);
        let max = match self.durability {
            Durability::Immediate => 1,
            _ => MAX_GROUP,
        };
        let core = Arc::new(Mutex::new(Core {
            sync_tx: (!syncer_threads.is_empty()).then_some(sync_tx),
            writer: self,
            order,
            inline_pause: 0,
            deferred: None,
        }));
        let fast = FastPath {
            core: core.clone(),
            rx: rx.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("omniq-writer".into())
            .spawn(move || {
                // Polls briefly before sleeping after a lone command (see `next_command`).
                let mut lone = false;
                loop {
                    let deadline = core.lock().deferred.as_ref().map(|d| d.1);
                    let first = match next_command(&rx, lone, deadline) {
                        Next::Command(c) => c,
                        Next::Deadline => {
                            core.lock().flush_deferred(&rx, false);
                            continue;
                        }
                        Next::Closed => break,
                    };
                    let mut core = core.lock();
                    let mut commands = vec![first];
                    while commands.len() < max {
                        match rx.try_recv() {
                            Ok(c) => commands.push(c),
                            Err(_) => break,
                        }
                    }
                    lone = commands.len() == 1;
                    core.process(commands, &rx, false);
                }
                // Every sender is gone: sync what waits, let the syncers finish what they
                // hold, then stop.
                let mut last = core.lock();
                if let Some((d, _)) = last.deferred.take() {
                    let here = last.would_sync_here(false) && rx.is_empty();
                    last.settle(d, &rx, here);
                }
                last.sync_tx = None;
                drop(last);
                for h in syncer_threads {
                    let _ = h.join();
                }
            })
            .map_err(|e| Error::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok((thread, fast))
    }
}

/// What the writer keeps between groups. Whichever thread applies the next group holds it: the
/// writer thread, or a caller on the [`FastPath`].
pub(crate) struct Core {
    writer: Writer,
    order: SyncOrder,
    /// Groups left before a lone group may be synced on the applying thread again.
    inline_pause: u32,
    /// The syncer threads' queue (`None`: `Immediate`, or none could start, or closing).
    sync_tx: Option<Sender<Applied>>,
    /// Groups of workers' outcomes applied but not yet synced, and when they must be at the
    /// latest ([`Command::Outcomes`]): the next group takes them along.
    deferred: Option<(Applied, std::time::Instant)>,
}

impl Core {
    /// Whether a lone group now would be synced by the thread applying it (see `process`). A
    /// caller on the [`FastPath`] ignores the pause the writer takes after contention: it waits
    /// for its own sync either way, and syncing it here saves the hand-offs (one producer + 4
    /// workers: 0.38x the raw rate when callers respected the pause, 0.48x when they did not).
    fn would_sync_here(&self, caller: bool) -> bool {
        self.sync_tx.is_none()
            || (self.writer.durability == Durability::Group
                && (caller || self.inline_pause == 0)
                && self.order.idle())
    }

    /// Applies `commands` as one group, then acknowledges it here or hands it to the syncers
    /// (with any deferred outcomes before it), or defers it (see [`Command::Outcomes`]).
    /// `rx` is the command queue (only looked at: whether anything waits).
    fn process(&mut self, commands: Vec<Command>, rx: &Receiver<Command>, caller: bool) {
        self.inline_pause = self.inline_pause.saturating_sub(1);
        let pipelined = self.sync_tx.is_some();
        // Deferred only on the writer thread, which wakes up for the deadline.
        let lazy = pipelined
            && !caller
            && self.writer.durability == Durability::Group
            && commands.iter().all(Command::is_lazy);
        // `Group`: a lone group with nothing in flight and nothing waiting is synced right
        // here (in `settle`), since a hand-off to a syncer thread would only add a thread
        // wake-up to its latency. `Immediate` syncs every group as it is written. Decided
        // before the group is applied (8 producers: 5 % fewer enqueues/s when commands that
        // arrived during the apply sent it to the syncers instead).
        let here = self.would_sync_here(caller) && rx.is_empty();
        let mut applied = self.writer.apply_group(commands, !pipelined);
        if let Some((earlier, _)) = self.deferred.take() {
            applied = earlier.then(applied);
        }
        if lazy
            && !applied.claimed
            && applied.pool_idle
            && applied.durable
            && applied.error.is_none()
        {
            // Nothing but outcomes, no worker waits for a task from this group, and a pool
            // has idle slots with nothing due for them: its sync may wait briefly for the
            // next group's (while work is due, pools keep the writer busy anyway, and a
            // deferred outcome would only hold its worker back).
            let deadline = std::time::Instant::now() + self.writer.defer_outcomes;
            self.deferred = Some((applied, deadline));
            return;
        }
        self.settle(applied, rx, here);
        // `Relaxed`: a group that needs no fsync is acknowledged without one, but a claim needs
        // one; so the standing claims look in a group of their own, which waits for its fsync
        // without holding up the enqueue that brought the work.
        if self.writer.durability == Durability::Relaxed && self.writer.standing_may_claim() {
            let here = self.would_sync_here(caller) && rx.is_empty();
            let (pass, _) = self.writer.apply_commands(None);
            self.settle(pass, rx, here);
        }
    }

    /// Syncs deferred outcomes whose time is up (the writer thread, when no group came).
    fn flush_deferred(&mut self, rx: &Receiver<Command>, caller: bool) {
        match self.deferred.take() {
            Some((d, at)) if at <= std::time::Instant::now() => {
                let here = self.would_sync_here(caller) && rx.is_empty();
                self.settle(d, rx, here)
            }
            other => self.deferred = other,
        }
    }

    /// Makes an applied group durable and acknowledges it: on this thread if `here` (see
    /// `process`), else through the syncers (in order behind the groups they hold).
    fn settle(&mut self, mut applied: Applied, rx: &Receiver<Command>, here: bool) {
        let notify = self.writer.notify.clone();
        let Some(tx) = &self.sync_tx else {
            // `Immediate` (synced as it was written), or no syncer.
            return finish(applied, None, &notify);
        };
        if applied.error.is_some() {
            return finish(applied, None, &notify);
        }
        if applied.durable && here {
            // While it syncs this thread cannot apply anything else: when commands arrived
            // meanwhile (other producers, workers), the pipeline is used for a while.
            let result = self.writer.store.sync();
            if let Err(e) = &result {
                *self.writer.poisoned.lock() = Some(e.to_string());
            }
            if !rx.is_empty() {
                self.inline_pause = INLINE_PAUSE_GROUPS;
            }
            return finish(applied, result.err().as_ref(), &notify);
        }
        if !applied.durable && self.order.may_skip_syncer(&applied) {
            // `Relaxed`, no claim, and no task in it still waiting in the syncer: it needs no
            // fsync, so it must not wait behind an earlier claim's. (Not synced here either:
            // there a claim's fsync must not hold up later acks.)
            return finish(applied, None, &notify);
        }
        let tx = tx.clone();
        self.order.sent_to_syncer(&mut applied);
        if let Err(e) = tx.send(applied) {
            // The syncer is gone (it panicked): nothing can be acknowledged any more.
            finish(e.into_inner(), Some(&Error::Closed), &notify);
        }
    }
}

/// A caller that will block until its command is acknowledged may apply it itself when the
/// writer is idle: no command waits and no thread holds the [`Core`]. It then runs exactly what
/// the writer thread would (the same group rules, the same sync), but its command needs no
/// hand-off to the writer thread and its reply no wake-up back: two thread switches saved per
/// call, which on a 2-core VM was most of what a lone `enqueue` cost beyond its `fdatasync`
/// (issue 12). When the writer is busy, the command is queued for it as before.
pub(crate) struct FastPath {
    core: Arc<Mutex<Core>>,
    rx: Receiver<Command>,
}

impl FastPath {
    /// Applies `command` on this thread if the writer is idle (`None`); otherwise gives it
    /// back to be sent.
    pub(crate) fn try_here(&self, command: Command) -> Option<Command> {
        if !self.rx.is_empty() {
            return Some(command);
        }
        let Some(mut core) = self.core.try_lock() else {
            return Some(command);
        };
        // Checked again under the lock: a command queued meanwhile goes first. And only a group
        // the writer would sync on its own thread anyway (or `Immediate`): under contention the
        // writer's groups batch many commands per sync, where callers' groups hold one each
        // (8 producers: -10 to -15 % when callers applied their own there too).
        if !self.rx.is_empty() || !core.would_sync_here(true) {
            return Some(command);
        }
        core.process(vec![command], &self.rx, true);
        None
    }
}

impl Writer {
    /// Applies one group to the store. With `sync_here` it is also made durable on this
    /// thread (as the mode requires); otherwise the syncer does that.
    fn apply_group(&mut self, commands: Vec<Command>, sync_here: bool) -> Applied {
        let (mut applied, made_due) = self.apply_commands(Some(commands));
        // Standing claims look for work at the end of the group itself, its own new due tasks
        // included (not `Relaxed`: see `Core::process`). With limits, a claim plans from the
        // store's index, which the group's own writes reach only at its commit: if the group
        // made tasks due and slots are still free, they look again in a second commit, in the
        // same sync.
        if made_due
            && applied.error.is_none()
            && self.durability != Durability::Relaxed
            && self.standing_may_claim()
        {
            applied = applied.then(self.apply_commands(None).0);
        }
        if sync_here && applied.durable && applied.error.is_none() {
            if let Err(e) = self.store.sync() {
                *self.poisoned.lock() = Some(e.to_string());
                applied.error = Some(e);
            }
            applied.durable = false;
        }
        applied
    }

    /// Whether a standing claim has a slot to fill.
    fn standing_may_claim(&self) -> bool {
        self.standing.iter().any(|s| {
            !s.shared.closed.load(std::sync::atomic::Ordering::Acquire) && s.shared.free() > 0
        })
    }

    /// Applies `commands` as one atomic write to the store, not yet synced, with the standing
    /// claims' look for work at its end; the second value: whether it made tasks due that the
    /// look could not see. `None`: only the standing claims' look.
    fn apply_commands(&mut self, commands: Option<Vec<Command>>) -> (Applied, bool) {
        let limiter = self.limiter.clone();
        let mut limiter = limiter.lock();
        let schedules = self.schedules.clone();
        let mut schedules = schedules.lock();
        let mut group = Group {
            store: &*self.store,
            overlay: HashMap::new(),
            changes: Vec::new(),
            seq: self.store.last_seq(),
            now: self.clock.now(),
            run_id: self.store.run_id(),
            has_claim: false,
            extras: HashMap::new(),
            holders: HashMap::new(),
            side: Vec::new(),
            has_extras: self.has_extras,
            limiter: &mut limiter,
            schedules: &mut schedules,
            log_at: None,
            standing: &mut self.standing,
            made_due: false,
            pool_idle: false,
        };
        if let Some(reason) = self.poisoned.lock().clone() {
            let err = Error::Storage(format!(
                "an earlier commit failed to reach disk ({reason}); reopen the queue"
            ));
            let replies = commands
                .into_iter()
                .flatten()
                .map(|c| refuse(c, &err))
                .collect();
            return (
                Applied {
                    changes: Vec::new(),
                    replies,
                    seq: group.seq,
                    durable: false,
                    claimed: false,
                    pool_idle: false,
                    error: Some(err),
                    ticket: 0,
                },
                false,
            );
        }
        let mut replies: Vec<Pending> = Vec::new();
        let pass_only = commands.is_none();
        match commands {
            Some(commands) => {
                for cmd in commands {
                    replies.push(apply(
                        &mut group,
                        cmd,
                        &mut *self.jitter,
                        &self.backoff,
                        &self.corrupt,
                    ));
                }
            }
            None => replies.extend(claim_for_standing(&mut group, &self.corrupt)),
        }
        // Tasks the group made due that its look could not see (see `claim_due`).
        let made_due = group.made_due && !group.limiter.is_empty();
        if !pass_only && !group.standing.is_empty() && self.durability != Durability::Relaxed {
            replies.extend(claim_for_standing(&mut group, &self.corrupt));
        }
        self.has_extras = group.has_extras;
        if !group.side.is_empty() {
            // Writes beside task records ride in the group's last change, applied after the
            // task writes, all in one atomic commit.
            let side = std::mem::take(&mut group.side);
            group.changes.push(Change {
                before: None,
                after: None,
                log: None,
                side,
            });
        }
        self.next_tick.store(
            earliest_tick(group.schedules),
            std::sync::atomic::Ordering::Release,
        );
        let claimed = group.has_claim;
        let pool_idle = group.pool_idle;
        let durable = self.durability != Durability::Relaxed || claimed;
        let (changes, seq) = (std::mem::take(&mut group.changes), group.seq);
        // The limits and schedules are not needed for the write itself: readers (a pool asking
        // what is due, `limits()`) need not wait for the sled write or an `Immediate` fsync.
        drop(group);
        drop(limiter);
        drop(schedules);
        let result = if changes.is_empty() {
            Ok(())
        } else {
            // Reads may see the group from here on: `wait` uses this to know which group it
            // must see acknowledged before it reports what it read.
            self.notify.applying(seq);
            self.store.commit(&changes, seq, false)
        };
        if let Err(e) = &result {
            // The group may be partly applied in memory: nothing after it can be trusted until
            // a reopen replays or discards it.
            *self.poisoned.lock() = Some(e.to_string());
        }
        let applied = Applied {
            changes,
            replies,
            seq,
            durable,
            claimed,
            pool_idle,
            error: result.err(),
            ticket: 0,
        };
        (applied, made_due)
    }
}

/// The next command. After a group of one command (`spin`) the writer first polls for up to
/// [`SPIN_MICROS`] before it blocks: a lone producer sends its next command a few microseconds
/// after its reply, and catching it without sleeping saves a thread wake-up on every call
/// (issue 12, measured interleaved on a quiet machine: one producer +10-14 %, one producer + 4
/// workers unchanged; 80 us cost the workers 5 %). Not after larger groups: with more busy
/// threads than cores (8 producers, 16 workers) the poll took CPU from them (-7 %, -10 %). An
/// idle writer polls once, for that long, then sleeps until a command arrives, or until the
/// `deadline` of deferred outcomes.
fn next_command(rx: &Receiver<Command>, spin: bool, deadline: Option<std::time::Instant>) -> Next {
    use crossbeam_channel::{RecvTimeoutError, TryRecvError};
    let block = |rx: &Receiver<Command>| match deadline {
        None => rx.recv().map_or(Next::Closed, Next::Command),
        Some(at) => match rx.recv_deadline(at) {
            Ok(c) => Next::Command(c),
            Err(RecvTimeoutError::Timeout) => Next::Deadline,
            Err(RecvTimeoutError::Disconnected) => Next::Closed,
        },
    };
    if !spin {
        return block(rx);
    }
    let until = std::time::Instant::now() + std::time::Duration::from_micros(SPIN_MICROS);
    loop {
        match rx.try_recv() {
            Ok(c) => return Next::Command(c),
            Err(TryRecvError::Disconnected) => return Next::Closed,
            Err(TryRecvError::Empty) => {}
        }
        if std::time::Instant::now() >= until {
            return block(rx);
        }
        std::hint::spin_loop();
    }
}

/// What the writer thread woke up for.
enum Next {
    Command(Command),
    /// Deferred outcomes are due for their sync.
    Deadline,
    /// Every sender is gone.
    Closed,
}

/// How long the writer polls for its next command before it blocks (see [`next_command`]).
const SPIN_MICROS: u64 = 30;

/// Keeps `Relaxed` acknowledgements in order per task while letting groups that need no fsync
/// skip the syncer. Groups go to the syncer numbered (`ticket`); the syncer publishes the last
/// ticket it finished. A group that needs no fsync is acknowledged by the writer at once unless
/// one of its tasks is in a group the syncer has not finished (then it queues behind it, so a
/// task's events never arrive out of order).
#[derive(Default)]
struct SyncOrder {
    next_ticket: u64,
    /// Tasks in groups handed to the syncer, with the ticket of the latest such group.
    waiting: HashMap<TaskId, u64>,
    /// The last ticket the syncer finished (acknowledged or refused).
    synced: Arc<std::sync::atomic::AtomicU64>,
}

impl SyncOrder {
    fn may_skip_syncer(&mut self, applied: &Applied) -> bool {
        let done = self.synced.load(std::sync::atomic::Ordering::Acquire);
        if self.waiting.len() > 4096 {
            self.waiting.retain(|_, t| *t > done);
        }
        applied.error.is_none()
            && applied
                .task_ids()
                .all(|id| self.waiting.get(&id).is_none_or(|t| *t <= done))
    }

    /// Every group handed to the syncer has been finished.
    fn idle(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire) == self.next_ticket
    }

    fn sent_to_syncer(&mut self, applied: &mut Applied) {
        self.next_ticket += 1;
        applied.ticket = self.next_ticket;
        let ids: Vec<TaskId> = applied.task_ids().collect();
        for id in ids {
            self.waiting.insert(id, self.next_ticket);
        }
    }
}

/// A group applied to the store, waiting to be made durable and acknowledged.
struct Applied {
    changes: Vec<Change>,
    replies: Vec<Pending>,
    /// Needs a sync before its replies go out.
    durable: bool,
    /// It claimed a task (someone waits to run it).
    claimed: bool,
    /// In its last look, a standing claim found less due work than it had slots for.
    pool_idle: bool,
    /// The sequence number of its last transition.
    seq: u64,
    /// Applying it failed: its replies get this error.
    error: Option<Error>,
    /// Its place in the syncer's queue (0 when it never went there).
    ticket: u64,
}

impl Applied {
    /// `self` followed by `later`, acknowledged together (`later`'s sync covers both).
    fn then(mut self, later: Applied) -> Applied {
        self.changes.extend(later.changes);
        self.replies.extend(later.replies);
        self.durable |= later.durable;
        self.claimed |= later.claimed;
        self.pool_idle = later.pool_idle;
        self.seq = self.seq.max(later.seq);
        self.error = self.error.or(later.error);
        self
    }

    fn task_ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.changes
            .iter()
            .filter_map(|c| c.after.as_ref().or(c.before.as_ref()).map(|t| t.id))
    }
}

/// Acknowledges a group: notifications and replies on success, the error otherwise.
fn finish(applied: Applied, sync_error: Option<&Error>, notify: &Notify) {
    match applied.error.as_ref().or(sync_error) {
        None => {
            notify.acknowledged(applied.seq);
            notify.after_commit(&applied.changes);
            for r in applied.replies {
                r(None);
            }
        }
        Some(e) => {
            tracing::error!(error = %e, "group commit failed; every command in it is refused");
            notify.commit_failed(&e.to_string());
            for r in applied.replies {
                r(Some(e));
            }
        }
    }
}

/// How many syncer threads run (`OMNIQ_SYNCERS`, 1 or 2; default 2). With two, a group that
/// arrives while a sync is in flight starts its own at once instead of waiting for it: a lone
/// caller no longer waits out a sync that began before its command arrived. The sequencer still
/// acknowledges in ticket order. On a quiet machine (BENCHMARKS.md, issue 12, final) two took
/// one producer + 4 workers from 0.44-0.46x to 0.52-0.53x the raw fdatasync rate; `1` keeps the
/// single pipelined syncer (a measurement and fallback knob).
fn syncers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("OMNIQ_SYNCERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2usize)
            .clamp(1, 2)
    })
}

/// Acknowledges groups in ticket order whichever syncer thread finished them; once one group's
/// sync failed, every later group is refused too.
#[derive(Default)]
struct Sequencer {
    state: Mutex<SeqState>,
}

#[derive(Default)]
struct SeqState {
    /// The last ticket acknowledged.
    last: u64,
    done: BTreeMap<u64, (Applied, Option<Error>)>,
    failed: Option<Error>,
}

impl Sequencer {
    fn complete(
        &self,
        batch: Vec<Applied>,
        result: &Result<()>,
        notify: &Notify,
        synced: &std::sync::atomic::AtomicU64,
    ) {
        let mut st = self.state.lock();
        for applied in batch {
            let err = result.as_ref().err().map(Error::duplicate);
            st.done.insert(applied.ticket, (applied, err));
        }
        loop {
            let next = st.last + 1;
            let Some((applied, err)) = st.done.remove(&next) else {
                break;
            };
            st.last = next;
            let err = err.or_else(|| st.failed.as_ref().map(Error::duplicate));
            if let (Some(e), None) = (&err, &st.failed) {
                st.failed = Some(e.duplicate());
            }
            finish(applied, err.as_ref(), notify);
            synced.fetch_max(next, std::sync::atomic::Ordering::Release);
        }
    }
}

/// A syncer: takes every group applied since it last looked, makes them durable with one sync,
/// then hands them to the sequencer, which acknowledges in order. A failed sync poisons the
/// queue: what was applied after it can no longer be promised, so every later command is
/// refused.
fn run_syncer(
    store: &dyn Store,
    notify: &Notify,
    poisoned: &Mutex<Option<String>>,
    synced: &std::sync::atomic::AtomicU64,
    sequencer: &Sequencer,
    rx: Receiver<Applied>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        // Once a sync has failed, later groups (applied on top of what may never have reached
        // disk) are refused too, even if a later fsync would report success.
        let poison = poisoned.lock().clone();
        let result = match poison {
            Some(reason) => Err(Error::Storage(format!(
                "an earlier commit failed to reach disk ({reason}); reopen the queue"
            ))),
            None if batch.iter().any(|a| a.durable) => store.sync(),
            None => Ok(()),
        };
        if let Err(e) = &result {
            *poisoned.lock() = Some(e.to_string());
        }
        sequencer.complete(batch, &result, notify, synced);
    }
}

/// The reply for a command refused before it was applied.
fn refuse(cmd: Command, err: &Error) -> Pending {
    match cmd {
        Command::Insert { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Claim { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Finish { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Cancel { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Retry { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Purge { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::SetPaused { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::SetLimit { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::PutSchedule { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::PauseSchedule { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::RemoveSchedule { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Tick { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Stand { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Sit { reply, .. } => pending(reply, Err(err.duplicate())),
        Command::Poke { reply } => pending(reply, Err(err.duplicate())),
        Command::Many(commands) | Command::Outcomes(commands) => {
            let replies: Vec<Pending> = commands.into_iter().map(|c| refuse(c, err)).collect();
            Box::new(move |commit_err| {
                for r in replies {
                    r(commit_err);
                }
            })
        }
    }
}

/// Applies one command to the group; returns the reply to send once the group is committed.
fn apply(
    g: &mut Group<'_>,
    cmd: Command,
    jitter: &mut dyn JitterSource,
    backoff: &BackoffTable,
    corrupt: &Mutex<HashSet<TaskId>>,
) -> Pending {
    match cmd {
        Command::Insert { tasks, reply } => pending(reply, insert(g, tasks)),
        Command::SetLimit {
            scope,
            limit,
            reply,
        } => pending(reply, set_limit(g, scope, limit)),
        Command::PutSchedule { info, reply } => {
            let name = info.name.clone();
            let created = match g.schedules.get(&name) {
                Some(old) => {
                    let mut next = *info;
                    next.last_fired = old.last_fired;
                    next.created_at = old.created_at;
                    next.fired = old.fired;
                    next.skipped = old.skipped;
                    next.paused = old.paused;
                    g.schedules.insert(name.clone(), next);
                    false
                }
                None => {
                    g.schedules.insert(name.clone(), *info);
                    true
                }
            };
            let record = g.schedules.get(&name).cloned().map(Box::new);
            g.side.push(SideWrite::Schedule { name, record });
            pending(reply, Ok(created))
        }
        Command::PauseSchedule {
            name,
            paused,
            reply,
        } => {
            let now = g.now;
            let result = match g.schedules.get_mut(&name) {
                Some(s) => {
                    if s.paused && !paused {
                        // Resuming skips what came due during the pause.
                        s.last_fired = s.last_fired.max(now);
                    }
                    s.paused = paused;
                    let record = Some(Box::new(s.clone()));
                    g.side.push(SideWrite::Schedule { name, record });
                    Ok(())
                }
                None => Err(Error::NoSuchSchedule { name }),
            };
            pending(reply, result)
        }
        Command::RemoveSchedule { name, reply } => {
            let existed = g.schedules.remove(&name).is_some();
            if existed {
                g.side.push(SideWrite::Schedule { name, record: None });
            }
            pending(reply, Ok(existed))
        }
        Command::Tick { now, reply } => {
            let now = now.max(g.now);
            pending(reply, tick(g, now))
        }
        Command::Claim {
            queues,
            n,
            now,
            reply,
        } => {
            let now = now.max(g.now);
            pending(reply, claim_due(g, &queues, n, now, corrupt))
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
                    Outcome::Cancelled => lifecycle::cancel_running(&rec, lease, g.now),
                    Outcome::Released => lifecycle::release(&rec, lease, g.now),
                };
                match step {
                    Ok((next, cause)) => {
                        g.record(Some(rec), Some(next.clone()), Some(cause));
                        Ok(Finished::Applied(Box::new(next)))
                    }
                    Err(Refusal::Stale) | Err(Refusal::WrongState(_)) => Ok(Finished::Stale),
                    Err(r) => Err(r.into_error(id, "finish", "running")),
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
                    Err(r) => Err(r.into_error(id, "cancel", "PENDING")),
                });
            pending(reply, result)
        }
        Command::Retry { id, reply } => {
            // The state rule first: a task that cannot be retried at all is refused for that
            // reason, whoever holds its unique key.
            let result = g.existing(id).and_then(|rec| {
                let (next, cause) = lifecycle::manual_retry(&rec, g.now)
                    .map_err(|r| r.into_error(id, "retry", "FAILED or CANCELLED"))?;
                retry_keeps_uniqueness(g, &rec)?;
                g.record(Some(rec), Some(next.clone()), Some(cause));
                Ok(next)
            });
            pending(reply, result)
        }
        Command::SetPaused {
            queue,
            paused,
            reply,
        } => pending(reply, g.store.set_paused(&queue, paused)),
        Command::Stand { standing, reply } => {
            g.standing.push(standing);
            pending(reply, Ok(()))
        }
        Command::Sit { id, reply } => {
            let mut taken = 0;
            g.standing.retain(|s| {
                let this = s.shared.id == id;
                if this {
                    taken = s.shared.taken.load(std::sync::atomic::Ordering::Acquire);
                }
                !this
            });
            pending(reply, Ok(taken))
        }
        Command::Poke { reply } => pending(reply, Ok(())),
        Command::Many(commands) | Command::Outcomes(commands) => {
            let replies: Vec<Pending> = commands
                .into_iter()
                .map(|c| apply(g, c, jitter, backoff, corrupt))
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

/// Inserts `tasks`, all or none. Every unique key is checked first (against the store, the
/// group so far, and earlier tasks of the same batch), so a read error inserts nothing.
fn insert(g: &mut Group<'_>, tasks: Vec<NewTask>) -> Result<Vec<Inserted>> {
    let mut batch: HashMap<[u8; 32], TaskId> = HashMap::new();
    let mut verdicts: Vec<Option<TaskId>> = Vec::with_capacity(tasks.len());
    for nt in &tasks {
        let spec = nt.extras.as_ref().and_then(|e| e.unique.as_ref());
        let holder = match spec {
            Some(u) => match batch.get(&u.digest) {
                Some(id) => Some(*id),
                None => {
                    let h = g.holder(&u.digest)?;
                    if h.is_none() {
                        batch.insert(u.digest, nt.task.id);
                    }
                    h
                }
            },
            None => None,
        };
        verdicts.push(holder);
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (nt, holder) in tasks.into_iter().zip(verdicts) {
        if let Some(holder) = holder {
            if let Some(u) = nt.extras.as_ref().and_then(|e| e.unique.as_ref()) {
                tracing::debug!(kind = %nt.task.kind, key = %u.key, holder = %holder, "duplicate refused: unique key held");
            }
            out.push(Inserted {
                id: holder,
                duplicate: true,
            });
            continue;
        }
        let id = nt.task.id;
        if let Some(extras) = nt.extras.filter(|e| !e.is_empty()) {
            g.attach(id, extras);
        }
        g.record(None, Some(nt.task), Some(Cause::Enqueued));
        out.push(Inserted {
            id,
            duplicate: false,
        });
    }
    Ok(out)
}

/// A manual retry brings a task back into its unique hold set: refused while another task
/// holds its key (two live tasks would share it).
fn retry_keeps_uniqueness(g: &mut Group<'_>, rec: &TaskInfo) -> Result<()> {
    let Some(u) = g.extras_of(rec.id).and_then(|e| e.unique) else {
        return Ok(());
    };
    if unique::hold_change(u.states, Some(rec.status), Some(Status::Pending)) != Hold::Acquire {
        return Ok(());
    }
    match g.holder(&u.digest)? {
        Some(holder) if holder != rec.id => Err(Error::UniqueConflict {
            id: rec.id,
            holder,
            key: u.key,
        }),
        _ => Ok(()),
    }
}

/// Sets or removes a limit; a new limit starts from the scope's running tasks now.
fn set_limit(g: &mut Group<'_>, scope: LimitScope, limit: Option<Limit>) -> Result<()> {
    let mut running = 0u32;
    if limit.is_some() {
        for id in g.store.ids_in_state(Status::Running)? {
            if let Ok(Some(t)) = g.current(id) {
                let hit = match &scope {
                    LimitScope::Queue(q) => *q == t.queue,
                    LimitScope::Kind(k) => *k == t.kind,
                };
                if hit && t.status == Status::Running {
                    running += 1;
                }
            }
        }
    }
    tracing::info!(scope = %scope, limit = ?limit, "limit set");
    let writes = g.limiter.set(scope, limit, running);
    g.side.extend(writes);
    Ok(())
}

/// Fires the ticks every schedule owes at `now`, in this group: each tick's task is inserted
/// and the schedule's `last_fired` advanced in the same atomic commit.
fn tick(g: &mut Group<'_>, now: Timestamp) -> Result<Vec<TaskId>> {
    let due: Vec<String> = g
        .schedules
        .iter()
        .filter(|(_, s)| s.next_tick().is_some_and(|t| t <= now))
        .map(|(n, _)| n.clone())
        .collect();
    let mut fired = Vec::new();
    for name in due {
        let Some(mut s) = g.schedules.get(&name).cloned() else {
            continue;
        };
        let owed = match schedule::owed(&s.spec, s.last_fired, now, s.missed) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(schedule = %name, error = %e, "schedule cannot be evaluated; it does not fire");
                continue;
            }
        };
        let mut skipped = owed.skipped;
        let mut tasks = Vec::with_capacity(owed.fire.len());
        for at in &owed.fire {
            match scheduled_task(&s, *at, g.now) {
                Ok(nt) => tasks.push(nt),
                Err(e) => {
                    tracing::error!(schedule = %name, error = %e, "scheduled task cannot be built; tick skipped");
                    skipped += 1;
                }
            }
        }
        for (r, at) in insert(g, tasks)?.into_iter().zip(&owed.fire) {
            if r.duplicate {
                skipped += 1;
                tracing::info!(schedule = %name, tick = %at, holder = %r.id, "schedule tick skipped: its unique key is held");
            } else {
                tracing::info!(schedule = %name, tick = %at, task = %r.id, "schedule fired");
                s.fired += 1;
                fired.push(r.id);
            }
        }
        if owed.skipped > 0 {
            tracing::info!(schedule = %name, skipped = owed.skipped, policy = ?s.missed, "missed schedule ticks skipped");
        }
        s.skipped += skipped;
        s.last_fired = owed.last_fired;
        g.side.push(SideWrite::Schedule {
            name: name.clone(),
            record: Some(Box::new(s.clone())),
        });
        g.schedules.insert(name, s);
    }
    Ok(fired)
}

/// The task a schedule's tick at `at` enqueues (due at `at`, carrying the tick).
pub(crate) fn scheduled_task(s: &ScheduleInfo, at: Timestamp, now: Timestamp) -> Result<NewTask> {
    let o = &s.options;
    let unique = match &o.unique {
        Some((key, states, period)) => {
            let mut u = match key {
                Some(k) => Unique::key(k.clone()),
                None => Unique::by_args(),
            };
            u.states = *states;
            u.period = period.map(std::time::Duration::from_millis);
            Some(unique::spec(&u, &s.kind, &s.payload, at)?)
        }
        None => None,
    };
    Ok(NewTask {
        task: TaskInfo {
            id: TaskId::generate(),
            kind: s.kind.clone(),
            queue: o.queue.clone(),
            payload: s.payload.clone(),
            status: Status::Pending,
            attempts: 0,
            max_retries: o.max_retries,
            priority: o.priority,
            created_at: now,
            next_run_at: at,
            started_at: None,
            finished_at: None,
            timeout_ms: o.timeout_ms,
            backoff: o.backoff,
            result: None,
            last_error: None,
            errors: Vec::new(),
            lease: 0,
        },
        extras: Some(TaskExtras {
            unique,
            scheduled: Some(ScheduledFrom {
                schedule: s.name.clone(),
                at,
            }),
        }),
    })
}

/// Claims up to `n` due tasks of `queues`, best first, within the limits. The store's pending
/// index reflects every group applied before this one; tasks this group already changed are
/// read through the overlay instead (and left out of the scan, as their index entries are
/// stale). A task a limit holds back stays `Pending` and is charged nothing.
fn claim_due(
    g: &mut Group<'_>,
    queues: &QueueSet,
    n: usize,
    now: Timestamp,
    corrupt: &Mutex<HashSet<TaskId>>,
) -> Result<Vec<TaskInfo>> {
    let mut claimed = Vec::with_capacity(n);
    if n == 0 {
        return Ok(claimed);
    }
    let skip: HashSet<TaskId> = {
        let corrupt = corrupt.lock();
        g.overlay.keys().chain(corrupt.iter()).copied().collect()
    };
    if !g.limiter.is_empty() {
        let expired = g.limiter.prune(now);
        g.side.extend(expired);
    }
    let unlimited = g.limiter.is_empty();
    let mut budgets = g.limiter.budgets(now);
    let mut plan = limiter::plan(g.store, &mut budgets, queues, now, n, &skip)?;
    if plan.held > 0 {
        tracing::debug!(
            held = plan.held,
            "due tasks held back by limits (not claimed, not charged)"
        );
    }
    if unlimited && g.made_due {
        // Tasks this group made due are not in the store's index yet: with no limits to
        // plan, they compete with the store's picks in claim order here (with limits, the
        // standing claims look again after the commit; see `Writer::apply_group`).
        let paused = g.store.paused();
        let corrupt = corrupt.lock();
        for t in g.overlay.values().flatten() {
            let wanted = match queues {
                QueueSet::All => true,
                QueueSet::Named(names) => names.contains(&t.queue),
            };
            if t.status == Status::Pending
                && t.next_run_at <= now
                && wanted
                && !paused.contains(&t.queue)
                && !corrupt.contains(&t.id)
            {
                plan.picks.push(crate::store::DueTask {
                    id: t.id,
                    queue: t.queue.clone(),
                    kind: Some(t.kind.clone()),
                    priority: t.priority,
                    next_run: t.next_run_at,
                });
            }
        }
        drop(corrupt);
        plan.picks.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.next_run.cmp(&b.next_run))
                .then(a.id.cmp(&b.id))
        });
        plan.picks.truncate(n);
    }
    for due in plan.picks {
        let rec = match g.current(due.id) {
            Ok(Some(rec)) => rec,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(task = %due.id, error = %e, "pending task's record does not decode; it is never claimed");
                corrupt.lock().insert(due.id);
                continue;
            }
        };
        if let Ok((next, cause)) = lifecycle::claim(&rec, now, g.seq + 1) {
            g.log_at = Some(now);
            g.record(Some(rec), Some(next.clone()), Some(cause));
            g.log_at = None;
            g.has_claim = true;
            let starts = g.limiter.charge(&next, now);
            g.side.extend(starts);
            claimed.push(next);
        }
    }
    Ok(claimed)
}

/// Fills the standing claims' granted slots with what is due now, in this group (after every
/// command of it, so a task it inserted or made due is seen). Starts with a different pool
/// each group, so no pool's claim always goes first. A claim that cannot read the store is
/// skipped (logged): it is tried again in the next group.
fn claim_for_standing(g: &mut Group<'_>, corrupt: &Mutex<HashSet<TaskId>>) -> Vec<Pending> {
    use std::sync::atomic::Ordering;
    g.standing
        .retain(|s| !s.shared.closed.load(Ordering::Acquire));
    let n = g.standing.len();
    let mut replies = Vec::new();
    if n == 0 {
        return replies;
    }
    let first = (g.seq as usize) % n;
    for i in (first..n).chain(0..first) {
        let shared = &g.standing[i].shared;
        let granted = shared.granted.load(Ordering::Acquire);
        shared.seen.store(granted, Ordering::Release);
        let free = granted.saturating_sub(shared.taken.load(Ordering::Acquire));
        if free == 0 {
            continue;
        }
        let queues = g.standing[i].queues.clone();
        let want = usize::try_from(free).unwrap_or(usize::MAX);
        match claim_due(g, &queues, want, g.now, corrupt) {
            Ok(tasks) if tasks.len() < want => {
                g.pool_idle = true;
                if !tasks.is_empty() {
                    let s = &mut g.standing[i];
                    s.shared
                        .taken
                        .fetch_add(tasks.len() as u64, Ordering::AcqRel);
                    replies.push(pending(s.reply.clone(), Ok(tasks)));
                }
            }
            Ok(tasks) => {
                let s = &mut g.standing[i];
                s.shared
                    .taken
                    .fetch_add(tasks.len() as u64, Ordering::AcqRel);
                replies.push(pending(s.reply.clone(), Ok(tasks)));
            }
            Err(e) => {
                tracing::error!(error = %e, "a standing claim could not read what is due; tried again next group")
            }
        }
    }
    replies
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::inspect::{ConsistencyReport, ListFilter, Page};
    use crate::retry::FixedJitter;
    use crate::store::sled_store::{SledOptions, SledStore};
    use crate::store::DueScan;
    use crate::task::Status;

    /// A real store whose `sync` can be made to fail, as a disk error would, or held up (while
    /// a test holds `gate`), as a slow disk would.
    struct FailingSync {
        inner: SledStore,
        fail: AtomicBool,
        gate: Mutex<()>,
        /// The thread each sync was called on, in order (recorded before `gate`).
        sync_threads: Mutex<Vec<String>>,
    }

    impl FailingSync {
        fn open(dir: &std::path::Path) -> Arc<FailingSync> {
            let inner = SledStore::open(
                dir,
                &SledOptions {
                    cache_bytes: 8 << 20,
                    flush_every_ms: None,
                    ..SledOptions::default()
                },
            )
            .unwrap();
            Arc::new(FailingSync {
                inner,
                fail: AtomicBool::new(false),
                gate: Mutex::new(()),
                sync_threads: Mutex::new(Vec::new()),
            })
        }
    }

    fn spawn_writer(
        store: Arc<FailingSync>,
        durability: Durability,
    ) -> (Sender<Command>, JoinHandle<()>) {
        let (tx, writer, _) = spawn_writer_fast(store, durability);
        (tx, writer)
    }

    fn spawn_writer_fast(
        store: Arc<FailingSync>,
        durability: Durability,
    ) -> (Sender<Command>, JoinHandle<()>, FastPath) {
        spawn_writer_with(store, durability, DEFER_OUTCOMES)
    }

    fn spawn_writer_deferring(
        store: Arc<FailingSync>,
        defer_outcomes: std::time::Duration,
    ) -> (Sender<Command>, JoinHandle<()>) {
        let (tx, writer, _) = spawn_writer_with(store, Durability::Group, defer_outcomes);
        (tx, writer)
    }

    fn spawn_writer_with(
        store: Arc<FailingSync>,
        durability: Durability,
        defer_outcomes: std::time::Duration,
    ) -> (Sender<Command>, JoinHandle<()>, FastPath) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer {
            store,
            clock: Arc::new(crate::testing::ManualClock::new(Timestamp(10))),
            notify: Arc::new(Notify::default()),
            jitter: Box::new(FixedJitter(0.5)),
            backoff: BackoffTable::default(),
            durability,
            poisoned: Arc::default(),
            corrupt: Arc::default(),
            limiter: Arc::default(),
            schedules: Arc::default(),
            next_tick: Arc::new(AtomicU64::new(u64::MAX)),
            has_extras: false,
            standing: Vec::new(),
            defer_outcomes,
        }
        .spawn(rx)
        .unwrap();
        (tx, writer.0, writer.1)
    }

    /// Sends `make(reply)` and waits for its reply.
    fn call<T>(tx: &Sender<Command>, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        tx.send(make(reply)).unwrap();
        rx.recv().unwrap()
    }

    /// A standing claim (issue 12): granted slots are filled in the commit of the group that
    /// inserts the work, so the enqueue and its claim share one sync; never beyond the slots
    /// granted; a poke has it look for work again; once withdrawn it takes nothing, and it
    /// reports how many it took.
    #[test]
    fn a_standing_claim_takes_new_work_in_the_enqueues_own_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer) = spawn_writer(store.clone(), Durability::Group);
        let shared = Arc::new(StandingShared {
            id: 7,
            ..StandingShared::default()
        });
        shared.granted.store(1, Ordering::Release);
        let (to_pool, claimed) = crossbeam_channel::unbounded();
        let standing = Standing::new(shared.clone(), QueueSet::All, to_pool);
        call(&tx, |reply| Command::Stand { standing, reply }).unwrap();
        let syncs = store.sync_threads.lock().len();

        let first = crate::task::test_task(3);
        insert(&tx, first.clone()).recv().unwrap().unwrap();
        assert_eq!(
            store.sync_threads.lock().len(),
            syncs + 1,
            "the enqueue and its claim share one sync"
        );
        // Sent right after the insert's reply, in the same acknowledgement.
        let soon = std::time::Duration::from_secs(10);
        let tasks = claimed
            .recv_timeout(soon)
            .expect("claimed, and sent once durable")
            .unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].id, first.id);
        assert_eq!((tasks[0].status, tasks[0].attempts), (Status::Running, 1));

        // No slot left: the next task waits, Pending.
        let second = crate::task::test_task(3);
        insert(&tx, second.clone()).recv().unwrap().unwrap();
        assert!(
            claimed.try_recv().is_err(),
            "claimed beyond the slots granted"
        );
        assert_eq!(
            store.get(second.id).unwrap().unwrap().status,
            Status::Pending
        );

        // A slot granted and a poke: claimed in the poke's group.
        shared.granted.fetch_add(1, Ordering::AcqRel);
        call(&tx, |reply| Command::Poke { reply }).unwrap();
        let tasks = claimed.recv().unwrap().unwrap();
        assert_eq!(tasks[0].id, second.id);

        // With a limit, the claim plans from the store's index: it looks again after the
        // group's commit, still within the group's one sync. The limit holds the second of
        // two new tasks back.
        call(&tx, |reply| Command::SetLimit {
            scope: LimitScope::Queue(first.queue.clone()),
            limit: Some(Limit::default().concurrency(3)),
            reply,
        })
        .unwrap();
        shared.granted.fetch_add(2, Ordering::AcqRel);
        let syncs = store.sync_threads.lock().len();
        let (reply, inserted) = crossbeam_channel::bounded(1);
        let pair = [crate::task::test_task(3), crate::task::test_task(3)];
        tx.send(Command::Insert {
            tasks: pair
                .iter()
                .map(|t| NewTask {
                    task: t.clone(),
                    extras: None,
                })
                .collect(),
            reply,
        })
        .unwrap();
        inserted.recv().unwrap().unwrap();
        assert_eq!(store.sync_threads.lock().len(), syncs + 1);
        let tasks = claimed
            .recv_timeout(soon)
            .expect("claimed with the insert")
            .unwrap();
        assert_eq!(tasks.len(), 1, "two running and a limit of three");
        assert!(pair.iter().any(|t| t.id == tasks[0].id));

        // Withdrawn: it reports what it took and takes nothing more.
        assert_eq!(call(&tx, |reply| Command::Sit { id: 7, reply }).unwrap(), 3);
        shared.granted.fetch_add(5, Ordering::AcqRel);
        let third = crate::task::test_task(3);
        insert(&tx, third.clone()).recv().unwrap().unwrap();
        assert!(claimed.recv().is_err(), "the writer let go of the claim");
        assert_eq!(
            store.get(third.id).unwrap().unwrap().status,
            Status::Pending
        );
        drop(tx);
        writer.join().unwrap();
    }

    /// A pool that died claims nothing more, even with slots granted.
    #[test]
    fn a_closed_standing_claim_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer) = spawn_writer(store.clone(), Durability::Group);
        let shared = Arc::new(StandingShared::default());
        shared.granted.store(4, Ordering::Release);
        let (to_pool, claimed) = crossbeam_channel::unbounded();
        let standing = Standing::new(shared.clone(), QueueSet::All, to_pool);
        call(&tx, |reply| Command::Stand { standing, reply }).unwrap();
        shared.closed.store(true, Ordering::Release);
        let t = crate::task::test_task(3);
        insert(&tx, t.clone()).recv().unwrap().unwrap();
        assert!(claimed.recv().is_err(), "dropped, never answered");
        assert_eq!(store.get(t.id).unwrap().unwrap().status, Status::Pending);
        drop(tx);
        writer.join().unwrap();
    }

    /// Claims two tasks and returns (id, lease) of each.
    fn two_running(tx: &Sender<Command>) -> Vec<(TaskId, u64)> {
        for _ in 0..2 {
            insert(tx, crate::task::test_task(3))
                .recv()
                .unwrap()
                .unwrap();
        }
        let tasks = call(tx, |reply| Command::Claim {
            queues: QueueSet::All,
            n: 2,
            now: Timestamp(10),
            reply,
        })
        .unwrap();
        tasks.iter().map(|t| (t.id, t.lease)).collect()
    }

    fn outcome(id: TaskId, lease: u64) -> (Command, Receiver<Result<Finished>>) {
        let (reply, rx) = crossbeam_channel::bounded(1);
        let finish = Command::Finish {
            id,
            lease,
            outcome: Outcome::Success(Vec::new()),
            reply,
        };
        (Command::Outcomes(vec![finish]), rx)
    }

    /// Registers a standing claim with `slots` granted; returns what it claims.
    fn idle_pool(tx: &Sender<Command>, slots: u64) -> Receiver<Result<Vec<TaskInfo>>> {
        let shared = Arc::new(StandingShared::default());
        shared.granted.store(slots, Ordering::Release);
        let (to_pool, claimed) = crossbeam_channel::unbounded();
        let standing = Standing::new(shared, QueueSet::Named(vec!["elsewhere".into()]), to_pool);
        call(tx, |reply| Command::Stand { standing, reply }).unwrap();
        claimed
    }

    /// Workers' outcomes with nothing else to do while a pool idles: applied, but neither
    /// synced nor acknowledged until the next group's sync covers them (one sync for both), or
    /// until their deadline, or the writer's close. Without an idle pool (work is due, or no
    /// pool at all) they are synced at once.
    #[test]
    fn outcomes_wait_for_the_next_groups_sync_or_their_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer) =
            spawn_writer_deferring(store.clone(), std::time::Duration::from_secs(3600));
        let running = two_running(&tx);
        // No pool: synced at once.
        let syncs = store.sync_threads.lock().len();
        let (cmd, done) = outcome(running[0].0, running[0].1);
        tx.send(cmd).unwrap();
        assert!(matches!(done.recv(), Ok(Ok(Finished::Applied(_)))));
        assert_eq!(store.sync_threads.lock().len(), syncs + 1);

        let _claimed = idle_pool(&tx, 2);
        let running = two_running(&tx);
        let syncs = store.sync_threads.lock().len();
        let (cmd, done) = outcome(running[0].0, running[0].1);
        tx.send(cmd).unwrap();
        assert!(
            done.recv_timeout(std::time::Duration::from_millis(100))
                .is_err(),
            "acknowledged before any sync"
        );
        assert_eq!(store.sync_threads.lock().len(), syncs);
        insert(&tx, crate::task::test_task(3))
            .recv()
            .unwrap()
            .unwrap();
        assert!(matches!(done.try_recv(), Ok(Ok(Finished::Applied(_)))));
        assert_eq!(
            store.sync_threads.lock().len(),
            syncs + 1,
            "one sync for both"
        );

        // Closing syncs and acknowledges what still waits.
        let (cmd, done) = outcome(running[1].0, running[1].1);
        tx.send(cmd).unwrap();
        drop(tx);
        writer.join().unwrap();
        assert!(matches!(done.try_recv(), Ok(Ok(Finished::Applied(_)))));
        assert_eq!(store.sync_threads.lock().len(), syncs + 2);

        // With no group after them, the deadline syncs them.
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer) =
            spawn_writer_deferring(store.clone(), std::time::Duration::from_millis(20));
        let _claimed = idle_pool(&tx, 1);
        let running = two_running(&tx);
        let (cmd, done) = outcome(running[0].0, running[0].1);
        tx.send(cmd).unwrap();
        let acked = done.recv_timeout(std::time::Duration::from_secs(30));
        assert!(matches!(acked, Ok(Ok(Finished::Applied(_)))), "{acked:?}");
        drop(tx);
        writer.join().unwrap();
    }

    fn insert(tx: &Sender<Command>, t: TaskInfo) -> Receiver<Result<Vec<Inserted>>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        tx.send(Command::Insert {
            tasks: vec![NewTask {
                task: t,
                extras: None,
            }],
            reply,
        })
        .unwrap();
        rx
    }

    /// Sends enqueues until one is acknowledged (true) or 200 went unanswered (false). Each
    /// gets 50 ms: one that shares a group with a stalled claim never answers.
    fn acked_soon(tx: &Sender<Command>) -> bool {
        (0..200).any(|_| {
            insert(tx, crate::task::test_task(3))
                .recv_timeout(std::time::Duration::from_millis(50))
                .is_ok()
        })
    }

    /// `Group`: a lone command with nothing in flight is made durable on the writer thread (a
    /// hand-off to a syncer would only add a wake-up to its latency); once commands arrive while
    /// the writer syncs, the following groups go through the syncers, so that one can be
    /// applied while another's fsync runs.
    #[test]
    fn a_lone_group_is_synced_on_the_writer_and_contended_ones_on_the_syncers() {
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer) = spawn_writer(store.clone(), Durability::Group);
        insert(&tx, crate::task::test_task(3))
            .recv()
            .unwrap()
            .unwrap();
        assert_eq!(*store.sync_threads.lock(), ["omniq-writer"]);

        // The disk stalls in the next lone group's fsync, on the writer; a second command
        // arrives meanwhile.
        let stalled = store.gate.lock();
        let first = insert(&tx, crate::task::test_task(3));
        while store.sync_threads.lock().len() < 2 {
            std::thread::yield_now();
        }
        let second = insert(&tx, crate::task::test_task(3));
        drop(stalled);
        first.recv().unwrap().unwrap();
        second.recv().unwrap().unwrap();
        assert_eq!(
            *store.sync_threads.lock(),
            ["omniq-writer", "omniq-writer", "omniq-syncer"],
            "the command that waited behind a sync on the writer went to the syncers"
        );
        drop(tx);
        writer.join().unwrap();
    }

    /// `Relaxed`: a group without a claim is acknowledged without waiting for an earlier
    /// claim's fsync (issue 8, defect 4) — unless it touches a task of a group still waiting for
    /// its fsync, whose acknowledgement must come first.
    #[test]
    fn relaxed_acks_do_not_wait_for_a_claims_fsync_but_keep_task_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer) = spawn_writer(store.clone(), Durability::Relaxed);
        let task = crate::task::test_task(3);
        let id = task.id;
        insert(&tx, task).recv().unwrap().unwrap();

        // The disk stalls: the claim waits in the syncer.
        let stalled = store.gate.lock();
        let (claim_reply, claimed) = crossbeam_channel::bounded(1);
        tx.send(Command::Claim {
            queues: QueueSet::All,
            n: 1,
            now: Timestamp(10),
            reply: claim_reply,
        })
        .unwrap();
        // Enqueues behind it are acknowledged all the same (one sent with the claim may share
        // its group; a later one has a group of its own).
        assert!(
            acked_soon(&tx),
            "a Relaxed enqueue waited for another group's fsync"
        );
        assert!(
            claimed.try_recv().is_err(),
            "a claim was acknowledged before its fsync"
        );

        // A command on the claimed task queues behind the claim's group.
        let (finish_reply, finished) = crossbeam_channel::bounded(1);
        tx.send(Command::Finish {
            id,
            // The claim is the store's second transition (after the insert): its lease is 2.
            lease: 2,
            outcome: Outcome::Success(b"1".to_vec()),
            reply: finish_reply,
        })
        .unwrap();
        // Once an enqueue sent after it is acknowledged, that command has been applied.
        assert!(acked_soon(&tx));
        assert!(
            finished.try_recv().is_err(),
            "a command on a task was acknowledged before that task's earlier claim"
        );
        drop(stalled);
        let claimed = claimed.recv().unwrap().unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(matches!(finished.recv().unwrap(), Ok(Finished::Applied(_))));
        drop(tx);
        writer.join().unwrap();
    }

    impl Store for FailingSync {
        fn commit(&self, changes: &[Change], last_seq: u64, durable: bool) -> Result<()> {
            self.inner.commit(changes, last_seq, false)?;
            if durable {
                self.sync()?;
            }
            Ok(())
        }
        fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
            self.inner.get(id)
        }
        fn due(
            &self,
            q: &QueueSet,
            now: Timestamp,
            limit: usize,
            skip: &HashSet<TaskId>,
        ) -> Result<DueScan> {
            self.inner.due(q, now, limit, skip)
        }
        fn ids_in_state(&self, status: Status) -> Result<Vec<TaskId>> {
            self.inner.ids_in_state(status)
        }
        fn list(&self, filter: &ListFilter) -> Result<Page> {
            self.inner.list(filter)
        }
        fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
            self.inner.history(id)
        }
        fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
            self.inner.finished_before(cutoff, limit)
        }
        fn counts(&self) -> BTreeMap<(String, Status), u64> {
            self.inner.counts()
        }
        fn last_seq(&self) -> u64 {
            self.inner.last_seq()
        }
        fn run_id(&self) -> u64 {
            self.inner.run_id()
        }
        fn check(&self) -> Result<ConsistencyReport> {
            self.inner.check()
        }
        fn size_on_disk(&self) -> Result<u64> {
            self.inner.size_on_disk()
        }
        fn sync(&self) -> Result<()> {
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.sync_threads.lock().push(name);
            let _gate = self.gate.lock();
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Storage("injected fsync failure".into()));
            }
            self.inner.sync()
        }
    }

    /// The fast path: an idle writer lets the caller apply and sync its own command, acknowledged
    /// before `try_here` returns. A writer busy syncing, or a group in flight at a syncer, sends
    /// the command back to be queued (so under contention commands batch on the writer).
    #[test]
    fn a_caller_applies_its_own_command_only_when_the_writer_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let store = FailingSync::open(dir.path());
        let (tx, writer, fast) = spawn_writer_fast(store.clone(), Durability::Group);
        let insert_cmd = || {
            let (reply, rx) = crossbeam_channel::bounded(1);
            let cmd = Command::Insert {
                tasks: vec![NewTask {
                    task: crate::task::test_task(3),
                    extras: None,
                }],
                reply,
            };
            (cmd, rx)
        };
        let fast = Arc::new(fast);
        let on_caller = |fast: &Arc<FastPath>, cmd: Command| -> Option<Command> {
            let fast = fast.clone();
            std::thread::Builder::new()
                .name("caller".into())
                .spawn(move || fast.try_here(cmd))
                .unwrap()
                .join()
                .unwrap()
        };

        // Idle: applied and synced on the caller's thread, acknowledged when it returns.
        let (cmd, reply) = insert_cmd();
        assert!(on_caller(&fast, cmd).is_none());
        reply.try_recv().unwrap().unwrap();
        assert_eq!(*store.sync_threads.lock(), ["caller"]);

        // The writer stalls in a lone group's sync (holding the core): the caller queues.
        let stalled = store.gate.lock();
        let first = insert(&tx, crate::task::test_task(3));
        while store.sync_threads.lock().len() < 2 {
            std::thread::yield_now();
        }
        let (cmd, queued_reply) = insert_cmd();
        let cmd = on_caller(&fast, cmd).expect("the writer was busy");
        tx.send(cmd).unwrap();
        drop(stalled);
        first.recv().unwrap().unwrap();
        queued_reply.recv().unwrap().unwrap();

        // That contention sent the writer's next groups to the syncers: one stalls there.
        let stalled = store.gate.lock();
        let in_flight = insert(&tx, crate::task::test_task(3));
        while store.sync_threads.lock().len() < 4 {
            std::thread::yield_now();
        }
        assert_eq!(store.sync_threads.lock()[3], "omniq-syncer");
        let (cmd, reply) = insert_cmd();
        let cmd = on_caller(&fast, cmd).expect("a group was in flight at a syncer");
        tx.send(cmd).unwrap();
        drop(stalled);
        in_flight.recv().unwrap().unwrap();
        reply.recv().unwrap().unwrap();
        assert!(
            !store.sync_threads.lock()[1..].iter().any(|t| t == "caller"),
            "{:?}",
            store.sync_threads.lock()
        );
        drop(tx);
        writer.join().unwrap();
    }

    /// A failed sync is reported to the waiters of its group, and poisons the queue: every later
    /// command is refused, even once syncs would succeed again (after an fsync error the kernel
    /// may have dropped the dirty pages, so nothing built on them can be promised).
    #[test]
    fn a_failed_sync_is_reported_and_poisons_every_later_commit() {
        for durability in [Durability::Group, Durability::Immediate] {
            let dir = tempfile::tempdir().unwrap();
            let store = FailingSync::open(dir.path());
            let (tx, writer) = spawn_writer(store.clone(), durability);
            let insert = |t: TaskInfo| insert(&tx, t).recv().unwrap();

            insert(crate::task::test_task(3)).unwrap();
            store.fail.store(true, Ordering::SeqCst);
            let err = insert(crate::task::test_task(3)).unwrap_err();
            assert!(
                err.to_string().contains("injected fsync failure"),
                "{durability:?}: {err}"
            );
            store.fail.store(false, Ordering::SeqCst);
            let err = insert(crate::task::test_task(3)).unwrap_err();
            assert!(
                err.to_string().contains("reopen the queue"),
                "{durability:?}: {err}"
            );
            drop(tx);
            writer.join().unwrap();
        }
    }
}
