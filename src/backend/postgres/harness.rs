//! Not public API: a handle on the PostgreSQL backend's operations for the integration tests
//! (`tests/postgres.rs`) and the multi-process test workers, with public types only. Exempt
//! from semver.

use std::collections::BTreeMap;
use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::{PgBackend, PgOptions};
use crate::backend::{Backend, ClaimRequest, FinishRequest};
use crate::clock::Clock;
use crate::commit::{BackoffTable, Finished, Outcome};
use crate::error::{Error, Result};
use crate::events::{Notify, TransitionEvent};
use crate::inspect::{ConsistencyReport, ListFilter, Page, RecoveryReport};
use crate::log::LogEntry;
use crate::retry::{Backoff, JitterSource};
use crate::store::QueueSet;
use crate::task::{Status, TaskError, TaskId, TaskInfo, Timestamp};

/// What a finish did.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum FinishResult {
    /// Recorded: the task as it now is.
    Applied(TaskInfo),
    /// The lease was not current: nothing changed.
    Stale,
}

/// The reply to one finish queued with [`PgHarness::submit`].
pub struct FinishReply(Receiver<Result<Finished>>);

impl FinishReply {
    /// Waits for the reply (sent once the finish's transaction committed).
    pub fn wait(&self) -> Result<FinishResult> {
        self.0.recv().map_err(|_| Error::Closed)?.map(finished)
    }
}

/// One process's view of a PostgreSQL queue (one node).
pub struct PgHarness {
    backend: PgBackend,
    notify: Arc<Notify>,
}

fn finished(f: Finished) -> FinishResult {
    match f {
        Finished::Applied(t) => FinishResult::Applied(*t),
        Finished::Stale => FinishResult::Stale,
    }
}

fn queue_set(queues: Option<&[&str]>) -> QueueSet {
    match queues {
        None => QueueSet::All,
        Some(q) => QueueSet::Named(q.iter().map(|s| s.to_string()).collect()),
    }
}

impl PgHarness {
    /// Connects as a new node.
    pub fn connect(
        url: &str,
        options: PgOptions,
        clock: Arc<dyn Clock>,
        jitter: Box<dyn JitterSource>,
        backoff: Backoff,
    ) -> Result<PgHarness> {
        let notify = Arc::new(Notify::default());
        let backend = PgBackend::connect(
            url,
            options,
            notify.clone(),
            clock,
            jitter,
            BackoffTable {
                default: backoff,
                per_queue: Default::default(),
            },
        )?;
        Ok(PgHarness { backend, notify })
    }

    /// This node's id (the `run_id` of its log rows).
    pub fn node_id(&self) -> u64 {
        self.backend.node_id()
    }

    /// The server process id of this node's session.
    pub fn session_pid(&self) -> i32 {
        self.backend.session_pid()
    }

    /// True once this node lost its session (it claims nothing any more).
    pub fn is_lost(&self) -> bool {
        self.backend.is_lost()
    }

    /// Inserts pending tasks, all or none.
    pub fn insert(&self, tasks: Vec<TaskInfo>) -> Result<()> {
        self.backend.insert(tasks)
    }

    /// Claims up to `n` tasks due at `now` (`queues: None` = all queues).
    pub fn claim(
        &self,
        queues: Option<&[&str]>,
        n: usize,
        now: Timestamp,
    ) -> Result<Vec<TaskInfo>> {
        self.backend.claim(queue_set(queues), n, now)
    }

    /// Records a success, fenced by `lease`.
    pub fn succeed(&self, id: TaskId, lease: u64, result: &[u8]) -> Result<FinishResult> {
        self.backend
            .finish(id, lease, Outcome::Success(result.to_vec()))
            .map(finished)
    }

    /// Records a failure, fenced by `lease`.
    pub fn fail(&self, id: TaskId, lease: u64, error: TaskError) -> Result<FinishResult> {
        self.backend
            .finish(id, lease, Outcome::Failure(error))
            .map(finished)
    }

    /// Finishes and a claim in one transaction.
    #[allow(clippy::type_complexity)]
    pub fn finish_and_claim(
        &self,
        finishes: Vec<(TaskId, u64, std::result::Result<Vec<u8>, TaskError>)>,
        queues: Option<&[&str]>,
        n: usize,
        now: Timestamp,
    ) -> Result<(Vec<Result<FinishResult>>, Result<Vec<TaskInfo>>)> {
        let mut reqs = Vec::new();
        let mut rxs = Vec::new();
        for (id, lease, outcome) in finishes {
            let (reply, rx) = crossbeam_channel::bounded(1);
            reqs.push(FinishRequest {
                id,
                lease,
                outcome: match outcome {
                    Ok(b) => Outcome::Success(b),
                    Err(e) => Outcome::Failure(e),
                },
                reply,
            });
            rxs.push(rx);
        }
        let (reply, claim_rx) = crossbeam_channel::bounded(1);
        self.backend.submit(
            reqs,
            Some(ClaimRequest {
                queues: queue_set(queues),
                n,
                now,
                reply,
            }),
        )?;
        let results = rxs
            .into_iter()
            .map(|rx| rx.recv().map_err(|_| Error::Closed)?.map(finished))
            .collect();
        let claimed = claim_rx.recv().map_err(|_| Error::Closed)?;
        Ok((results, claimed))
    }

    /// Queues finishes and an optional claim (its reply goes to `claim_reply`, as a
    /// dispatcher's claims share one channel) without waiting: what the committer thread
    /// commits together with whatever else is queued.
    #[allow(clippy::type_complexity)]
    pub fn submit(
        &self,
        finishes: Vec<(TaskId, u64, std::result::Result<Vec<u8>, TaskError>)>,
        claim: Option<(Option<&[&str]>, usize, Timestamp)>,
        claim_reply: &crossbeam_channel::Sender<Result<Vec<TaskInfo>>>,
    ) -> Result<Vec<FinishReply>> {
        let mut reqs = Vec::new();
        let mut rxs = Vec::new();
        for (id, lease, outcome) in finishes {
            let (reply, rx) = crossbeam_channel::bounded(1);
            reqs.push(FinishRequest {
                id,
                lease,
                outcome: match outcome {
                    Ok(b) => Outcome::Success(b),
                    Err(e) => Outcome::Failure(e),
                },
                reply,
            });
            rxs.push(FinishReply(rx));
        }
        let claim = claim.map(|(queues, n, now)| ClaimRequest {
            queues: queue_set(queues),
            n,
            now,
            reply: claim_reply.clone(),
        });
        self.backend.submit(reqs, claim)?;
        Ok(rxs)
    }

    /// Transactions the committer thread has committed so far.
    pub fn transactions(&self) -> u64 {
        self.backend.transactions()
    }

    /// `Pending -> Cancelled`.
    pub fn cancel(&self, id: TaskId) -> Result<TaskInfo> {
        self.backend.cancel(id)
    }

    /// `Failed | Cancelled -> Pending`.
    pub fn retry(&self, id: TaskId) -> Result<TaskInfo> {
        self.backend.retry(id)
    }

    /// Deletes up to `limit` terminal tasks finished before `cutoff`.
    pub fn purge(&self, cutoff: Timestamp, limit: usize) -> Result<usize> {
        self.backend.purge(cutoff, limit)
    }

    /// Pauses (`true`) or resumes a queue.
    pub fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        self.backend.set_paused(queue, paused)
    }

    /// Sets (`Some`) or removes a rate / concurrency limit.
    pub fn set_limit(
        &self,
        scope: crate::rules::limit::LimitScope,
        limit: Option<crate::rules::limit::Limit>,
    ) -> Result<()> {
        self.backend.set_limit(scope, limit)
    }

    /// The paused queues.
    pub fn paused(&self) -> std::collections::BTreeSet<String> {
        self.backend.paused()
    }

    /// One rescue pass.
    pub fn rescue(&self) -> Result<RecoveryReport> {
        self.backend.rescue()
    }

    /// One task.
    pub fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        self.backend.get(id)
    }

    /// A page of tasks, newest first.
    pub fn list(&self, filter: &ListFilter) -> Result<Page> {
        self.backend.list(filter)
    }

    /// A task's log rows, oldest first.
    pub fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        self.backend.history(id)
    }

    /// The counters.
    pub fn counts(&self) -> Result<BTreeMap<(String, Status), u64>> {
        self.backend.counts()
    }

    /// `(ready, next_wake)`.
    pub fn due_summary(
        &self,
        queues: Option<&[&str]>,
        now: Timestamp,
        limit: usize,
    ) -> Result<(usize, Option<Timestamp>)> {
        self.backend
            .due_summary(&queue_set(queues), now, limit)
            .map(|d| (d.ready, d.next_wake))
    }

    /// Terminal tasks finished before `cutoff`.
    pub fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
        self.backend.finished_before(cutoff, limit)
    }

    /// The consistency check.
    pub fn check(&self) -> Result<ConsistencyReport> {
        self.backend.check()
    }

    /// Bytes used by the schema.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.backend.size_on_disk()
    }

    /// Every transition this process hears of (its own commits).
    pub fn subscribe(&self) -> Receiver<TransitionEvent> {
        self.notify.subscribe()
    }

    /// A dispatcher's wake-up channel.
    pub fn waker(&self) -> Receiver<()> {
        self.notify.add_waker()
    }

    /// A `wait` caller's wake-up channel for `id`.
    pub fn waiter(&self, id: TaskId) -> Receiver<()> {
        self.notify.add_waiter(id).1
    }

    /// Makes acknowledged writes durable (a no-op: every write replied after COMMIT).
    pub fn sync(&self) -> Result<()> {
        self.backend.sync()
    }

    /// Stops the node's threads and removes its row.
    pub fn shut_down(&self) -> Result<()> {
        self.backend.shut_down()
    }
}

/// A new pending task (fresh time-ordered id) with JSON payload `{"n": n}`.
pub fn new_task(
    queue: &str,
    priority: i8,
    run_at: Timestamp,
    max_retries: u32,
    n: u64,
) -> TaskInfo {
    TaskInfo {
        id: TaskId::generate(),
        kind: "test".into(),
        queue: queue.into(),
        payload: format!("{{\"n\": {n}}}").into_bytes(),
        status: Status::Pending,
        attempts: 0,
        max_retries,
        priority,
        created_at: run_at,
        next_run_at: run_at,
        started_at: None,
        finished_at: None,
        timeout_ms: None,
        backoff: None,
        result: None,
        last_error: None,
        errors: Vec::new(),
        lease: 0,
    }
}
