//! The sled backend: one directory, one process. Every transition goes through the group-commit
//! writer (`commit.rs`), the only mutator, which validates each against the current record with
//! the pure rules and makes each group durable once; reads go straight to the store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use crate::backend::{Backend, ClaimRequest, DueSummary, FinishRequest, StandingLink};
use crate::clock::Clock;
use crate::commit::{self, BackoffTable, Command, NewTask, Standing, StandingShared, Writer};
use crate::error::{Error, Result};
use crate::events::Notify;
use crate::extras::{Inserted, LimitStatus, ScheduleInfo, TaskExtras};
use crate::inspect::{ConsistencyReport, ListFilter, Page, RecoveryReport};
use crate::limiter::{self, Limiter};
use crate::log::LogEntry;
use crate::queue::Durability;
use crate::recovery;
use crate::retry::JitterSource;
use crate::rules::limit::{Limit, LimitScope};
use crate::store::sled_store::{SledOptions, SledStore};
use crate::store::{QueueSet, Store};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

/// What the writer needs besides the store.
pub(crate) struct WriterConfig {
    pub clock: Arc<dyn Clock>,
    pub jitter: Box<dyn JitterSource>,
    pub backoff: BackoffTable,
    pub durability: Durability,
}

pub(crate) struct SledBackend {
    store: Arc<dyn Store>,
    /// Shared with the writer: pending tasks that do not decode, left out of due counts.
    corrupt: Arc<Mutex<HashSet<TaskId>>>,
    /// `None` once shut down: every later operation is refused with [`Error::Closed`].
    tx: RwLock<Option<Sender<Command>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Lets a blocking call apply its own command when the writer is idle.
    fast: commit::FastPath,
    /// Shared with the writer: limits and their windows.
    limiter: Arc<Mutex<Limiter>>,
    /// Shared with the writer: schedules by name.
    schedules: Arc<Mutex<BTreeMap<String, ScheduleInfo>>>,
    /// Shared with the writer: the earliest next tick (ms; `u64::MAX` = none).
    next_tick: Arc<AtomicU64>,
    notify: Arc<Notify>,
}

/// A worker's outcome as the writer's command.
fn finish_command(f: FinishRequest) -> Command {
    Command::Finish {
        id: f.id,
        lease: f.lease,
        outcome: f.outcome,
        reply: f.reply,
    }
}

/// Due tasks counted per limit for `waiting` in stats.
const WAITING_CAP: usize = 10_000;

impl SledBackend {
    /// Opens (or creates) the directory and starts the writer. Orphans are not rescued yet:
    /// the queue calls [`Backend::rescue`] before anyone can claim.
    pub(crate) fn open(
        path: &Path,
        options: &SledOptions,
        config: WriterConfig,
        notify: Arc<Notify>,
    ) -> Result<SledBackend> {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(path, options)?);
        // Whatever the store holds at open was read from disk.
        notify.start_at(store.last_seq());
        let (tx, rx) = crossbeam_channel::unbounded();
        let corrupt = Arc::<Mutex<HashSet<TaskId>>>::default();
        let limiter = Arc::new(Mutex::new(Limiter::load(&*store)?));
        notify.set_wake_on_exit(limiter.lock().has_concurrency());
        let schedules: BTreeMap<String, ScheduleInfo> = store
            .schedules()?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let next_tick = Arc::new(AtomicU64::new(commit::earliest_tick(&schedules)));
        let schedules = Arc::new(Mutex::new(schedules));
        let has_extras = store.has_extras()?;
        let writer = Writer {
            store: store.clone(),
            clock: config.clock,
            notify: notify.clone(),
            jitter: config.jitter,
            backoff: config.backoff,
            durability: config.durability,
            poisoned: Arc::default(),
            corrupt: corrupt.clone(),
            limiter: limiter.clone(),
            schedules: schedules.clone(),
            next_tick: next_tick.clone(),
            has_extras,
            standing: Vec::new(),
            defer_outcomes: commit::DEFER_OUTCOMES,
        }
        .spawn(rx)?;
        let (writer, fast) = writer;
        Ok(SledBackend {
            store,
            corrupt,
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            fast,
            limiter,
            schedules,
            next_tick,
            notify,
        })
    }

    fn send(&self, command: Command) -> Result<()> {
        self.tx
            .read()
            .as_ref()
            .ok_or(Error::Closed)?
            .send(command)
            .map_err(|_| Error::Closed)
    }

    /// Sends a command and waits for its reply. When the writer is idle the command is applied
    /// on this thread instead (`FastPath`): the caller waits either way.
    fn call<T>(&self, make: impl FnOnce(commit::Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        {
            // Held while the command is applied here, so a close waits for it.
            let tx = self.tx.read();
            let tx = tx.as_ref().ok_or(Error::Closed)?;
            if let Some(command) = self.fast.try_here(make(reply)) {
                tx.send(command).map_err(|_| Error::Closed)?;
            }
        }
        rx.recv().map_err(|_| Error::Closed)?
    }
}

impl Backend for SledBackend {
    fn insert(&self, tasks: Vec<TaskInfo>) -> Result<()> {
        let tasks = tasks
            .into_iter()
            .map(|task| NewTask { task, extras: None })
            .collect();
        self.call(|reply| Command::Insert { tasks, reply })
            .map(|_| ())
    }

    fn insert_new(&self, tasks: Vec<NewTask>) -> Result<Vec<Inserted>> {
        self.call(|reply| Command::Insert { tasks, reply })
    }

    fn set_limit(&self, scope: LimitScope, limit: Option<Limit>) -> Result<()> {
        self.call(|reply| Command::SetLimit {
            scope,
            limit,
            reply,
        })?;
        self.notify
            .set_wake_on_exit(self.limiter.lock().has_concurrency());
        // A raised or removed limit may free work a pool is sleeping past.
        self.notify.wake_all();
        Ok(())
    }

    fn limits(&self, now: Timestamp) -> Result<Vec<LimitStatus>> {
        let views = self.limiter.lock().status(now);
        views
            .into_iter()
            .map(|v| {
                let waiting =
                    limiter::waiting(&*self.store, &v.scope, v.remaining, now, WAITING_CAP)?;
                Ok(LimitStatus {
                    scope: v.scope,
                    limit: v.limit,
                    running: v.running,
                    started_in_window: v.started_in_window,
                    remaining: v.remaining,
                    waiting,
                    frees_at: v.frees_at,
                })
            })
            .collect()
    }

    fn put_schedule(&self, info: ScheduleInfo) -> Result<bool> {
        let created = self.call(|reply| Command::PutSchedule {
            info: Box::new(info),
            reply,
        })?;
        self.notify.wake_all();
        Ok(created)
    }

    fn pause_schedule(&self, name: &str, paused: bool) -> Result<()> {
        let name = name.to_string();
        self.call(|reply| Command::PauseSchedule {
            name,
            paused,
            reply,
        })?;
        self.notify.wake_all();
        Ok(())
    }

    fn remove_schedule(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.call(|reply| Command::RemoveSchedule { name, reply })
    }

    fn tick(&self, now: Timestamp) -> Result<Vec<TaskId>> {
        if now.0 < self.next_tick.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        self.call(|reply| Command::Tick { now, reply })
    }

    fn next_tick(&self) -> Option<Timestamp> {
        match self.next_tick.load(Ordering::Acquire) {
            u64::MAX => None,
            t => Some(Timestamp(t)),
        }
    }

    fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        Ok(self.schedules.lock().values().cloned().collect())
    }

    fn extras(&self, id: TaskId) -> Result<Option<TaskExtras>> {
        self.store.extras(id)
    }

    fn submit(&self, finishes: Vec<FinishRequest>, claim: Option<ClaimRequest>) -> Result<()> {
        let mut commands: Vec<Command> = finishes.into_iter().map(finish_command).collect();
        if let Some(c) = claim {
            commands.push(Command::Claim {
                queues: c.queues,
                n: c.n,
                now: c.now,
                reply: c.reply,
            });
        }
        match commands.len() {
            0 => Ok(()),
            1 => self.send(commands.remove(0)),
            _ => self.send(Command::Many(commands)),
        }
    }

    fn submit_outcomes(&self, finishes: Vec<FinishRequest>) -> Result<()> {
        if finishes.is_empty() {
            return Ok(());
        }
        let commands = finishes.into_iter().map(finish_command).collect();
        self.send(Command::Outcomes(commands))
    }

    fn stand(&self, queues: &QueueSet) -> Result<Option<StandingLink>> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let shared = Arc::new(StandingShared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ..StandingShared::default()
        });
        let (tx, tasks) = crossbeam_channel::unbounded();
        let standing = Standing::new(shared.clone(), queues.clone(), tx);
        self.call(|reply| Command::Stand { standing, reply })?;
        Ok(Some(StandingLink { shared, tasks }))
    }

    fn sit(&self, id: u64) -> Result<u64> {
        self.call(|reply| Command::Sit { id, reply })
    }

    fn poke(&self) -> Result<crossbeam_channel::Receiver<Result<()>>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Poke { reply })?;
        Ok(rx)
    }

    fn cancel(&self, id: TaskId) -> Result<TaskInfo> {
        self.call(|reply| Command::Cancel { id, reply })
    }

    fn retry(&self, id: TaskId) -> Result<TaskInfo> {
        self.call(|reply| Command::Retry { id, reply })
    }

    fn purge(&self, cutoff: Timestamp, limit: usize) -> Result<usize> {
        self.call(|reply| Command::Purge {
            cutoff,
            limit,
            reply,
        })
    }

    fn rescue(&self) -> Result<RecoveryReport> {
        // One process per directory: every `Running` task at open belongs to a dead process.
        recovery::recover(&*self.store, |id, lease, outcome| {
            let (reply, rx) = crossbeam_channel::bounded(1);
            self.send(Command::Finish {
                id,
                lease,
                outcome,
                reply,
            })?;
            Ok(rx)
        })
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        let queue = queue.to_string();
        self.call(|reply| Command::SetPaused {
            queue,
            paused,
            reply,
        })
    }

    fn paused(&self) -> BTreeSet<String> {
        self.store.paused()
    }

    fn commit_metrics(&self) -> Option<&crate::histogram::StoreMetrics> {
        self.store.metrics()
    }

    fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        self.store.get(id)
    }

    fn list(&self, filter: &ListFilter) -> Result<Page> {
        self.store.list(filter)
    }

    fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        self.store.history(id)
    }

    fn counts(&self) -> Result<BTreeMap<(String, Status), u64>> {
        Ok(self.store.counts())
    }

    fn due_summary(&self, queues: &QueueSet, now: Timestamp, limit: usize) -> Result<DueSummary> {
        let corrupt = self.corrupt.lock().clone();
        let (mut budgets, frees) = {
            let l = self.limiter.lock();
            (l.budgets(now), l.next_free(now))
        };
        let plan = limiter::plan(&*self.store, &mut budgets, queues, now, limit, &corrupt)?;
        let mut next_wake = plan.next_wake;
        // A window that frees a slot is a due time too (no polling while a limit holds work).
        if let Some(t) = frees {
            next_wake = Some(next_wake.map_or(t, |w: Timestamp| w.min(t)));
        }
        Ok(DueSummary {
            ready: plan.picks.len(),
            next_wake,
        })
    }

    fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
        self.store.finished_before(cutoff, limit)
    }

    fn check(&self) -> Result<ConsistencyReport> {
        self.store.check()
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.store.size_on_disk()
    }

    fn log_bytes(&self) -> u64 {
        self.store.log_bytes()
    }

    fn compact(&self) -> Result<crate::inspect::CompactReport> {
        // The store holds commits off itself (its write lock): the writer's next group waits.
        Ok(match self.store.compact()? {
            Some(c) => crate::inspect::CompactReport {
                compacted: true,
                note: None,
                bytes_before: c.bytes_before,
                bytes_after: c.bytes_after,
                keys_copied: c.keys_copied,
                live_bytes: c.live_bytes,
                log_bytes: self.store.log_bytes(),
                duration: c.duration,
                write_pause: c.write_pause,
            },
            None => crate::inspect::CompactReport {
                note: Some("the store has nothing to compact".into()),
                ..Default::default()
            },
        })
    }

    fn sync(&self) -> Result<()> {
        self.store.sync()
    }

    fn shut_down(&self) -> Result<()> {
        // Dropping the last command sender ends the writer after it drains what is queued.
        self.tx.write().take();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
        self.store.sync()
    }
}
