//! The sled backend: one directory, one process. Every transition goes through the group-commit
//! writer (`commit.rs`), the only mutator, which validates each against the current record with
//! the pure rules and makes each group durable once; reads go straight to the store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use crate::backend::{Backend, ClaimRequest, DueSummary, FinishRequest};
use crate::clock::Clock;
use crate::commit::{self, BackoffTable, Command, Writer};
use crate::error::{Error, Result};
use crate::events::Notify;
use crate::inspect::{ConsistencyReport, ListFilter, Page, RecoveryReport};
use crate::log::LogEntry;
use crate::queue::Durability;
use crate::recovery;
use crate::retry::JitterSource;
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
}

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
        let writer = Writer {
            store: store.clone(),
            clock: config.clock,
            notify,
            jitter: config.jitter,
            backoff: config.backoff,
            durability: config.durability,
            poisoned: Arc::default(),
            corrupt: corrupt.clone(),
        }
        .spawn(rx)?;
        Ok(SledBackend {
            store,
            corrupt,
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
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

    fn call<T>(&self, make: impl FnOnce(commit::Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(make(reply))?;
        rx.recv().map_err(|_| Error::Closed)?
    }
}

impl Backend for SledBackend {
    fn insert(&self, tasks: Vec<TaskInfo>) -> Result<()> {
        self.call(|reply| Command::Insert { tasks, reply })
    }

    fn submit(&self, finishes: Vec<FinishRequest>, claim: Option<ClaimRequest>) -> Result<()> {
        let mut commands: Vec<Command> = finishes
            .into_iter()
            .map(|f| Command::Finish {
                id: f.id,
                lease: f.lease,
                outcome: f.outcome,
                reply: f.reply,
            })
            .collect();
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
        let scan = self.store.due(queues, now, limit, &corrupt)?;
        Ok(DueSummary {
            ready: scan.ready.len(),
            next_wake: scan.next_wake,
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
