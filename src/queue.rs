//! The public face of the engine: [`Queue`] (open, enqueue, inspect, cancel, retry, wait,
//! purge, subscribe, register handlers) and [`QueueBuilder`] (options).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::backend::sled::{SledBackend, WriterConfig};
use crate::backend::Backend;
use crate::clock::{Clock, SystemClock};
use crate::commit::{BackoffTable, NewTask};
use crate::error::{Error, Result};
use crate::events::{BarrierMiss, Notify, TransitionEvent};
use crate::extras::{Inserted, LimitStatus, ScheduleInfo, ScheduledTaskOptions, TaskExtras};
use crate::handler::{self, CancelRequest, Executions, Registry, TaskContext};
use crate::inspect::{
    CompactReport, ConsistencyReport, ListFilter, Page, PurgeReport, RecoveryReport, Stats,
};
use crate::keys::MAX_QUEUE_NAME;
use crate::log::LogEntry;
use crate::retry::{JitterSource, RandomJitter, RetryPolicy};
use crate::rules::limit::{Limit, LimitScope};
use crate::rules::schedule::{Missed, Spec};
use crate::rules::unique;
use crate::store::sled_store::SledOptions;
use crate::task::{EnqueueOptions, Status, Task, TaskError, TaskId, TaskInfo, Timestamp};
use crate::worker::WorkerPoolBuilder;

/// The queue every task goes to unless told otherwise.
pub const DEFAULT_QUEUE: &str = "default";

/// When a write is acknowledged relative to when it is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every write is its own commit: logged and `fdatasync`'d before the call returns. Lowest
    /// throughput under concurrency, simplest to reason about.
    Immediate,
    /// Default. Concurrent writes are grouped: one `fdatasync` of the log acknowledges the
    /// whole group.
    /// Every acknowledged write, everything `wait` returns and every event is on disk, exactly
    /// as with `Immediate`.
    #[default]
    Group,
    /// Writes are acknowledged once appended to the write-ahead log and applied in memory,
    /// without waiting for any fsync (not even one in progress for an earlier claim); a
    /// background `fdatasync` of the log runs every `flush_every` (default 500 ms). A process
    /// kill loses none of them; a power loss can lose the transitions of the last
    /// `flush_every`, and `wait` and events report acknowledged, not durable, state. Claims stay durable before the handler runs, so even here no execution
    /// goes uncounted.
    Relaxed,
}

/// When a purge compacts the store afterwards (see [`Queue::compact`] and
/// [`QueueBuilder::auto_compact`]): when its size on disk, less its write-ahead log (which a
/// compaction does not shrink), exceeds both `min_bytes` and `ratio` times an estimate of what
/// its live data needs. The estimate is the number of tasks times the bytes per task the last
/// compaction of this process measured (a compacted store's size without its log over its
/// tasks, once it held at least 1,000), or [`AutoCompact::DEFAULT_TASK_BYTES`] until then.
///
/// ```
/// use omniq::AutoCompact;
/// let rule = AutoCompact { min_bytes: 16 << 20, ratio: 4 };
/// assert!(rule.wants(100 << 20, 1_000, None));
/// assert!(!rule.wants(100 << 20, 40_000, None));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoCompact {
    /// Never compact a store smaller than this (default 16 MiB).
    pub min_bytes: u64,
    /// Compact when the store is more than this many times its live estimate (default 3).
    pub ratio: u64,
}

impl Default for AutoCompact {
    fn default() -> Self {
        AutoCompact {
            min_bytes: 16 << 20,
            ratio: 3,
        }
    }
}

impl AutoCompact {
    /// Bytes per task assumed before a compaction measured them: format 4 measured ~0.4 KB
    /// per completed task and ~1.1 KB per pending one with a small payload, storage overhead
    /// included (BENCHMARKS.md, "Format 4"); this leans to the pending side.
    pub const DEFAULT_TASK_BYTES: u64 = 1024;

    /// Whether a store of `size_on_disk` bytes holding `tasks` tasks should be compacted,
    /// given the bytes per task a previous compaction measured (if any).
    pub fn wants(&self, size_on_disk: u64, tasks: u64, task_bytes: Option<u64>) -> bool {
        let estimate = tasks.saturating_mul(task_bytes.unwrap_or(Self::DEFAULT_TASK_BYTES));
        size_on_disk > self.min_bytes.max(estimate.saturating_mul(self.ratio))
    }
}

/// Options for opening a queue directory. Start from [`Queue::builder`].
pub struct QueueBuilder {
    path: PathBuf,
    durability: Durability,
    cache_bytes: u64,
    flush_every: Duration,
    policy: RetryPolicy,
    queue_policies: HashMap<String, RetryPolicy>,
    clock: Arc<dyn Clock>,
    jitter: Option<Box<dyn JitterSource>>,
    max_payload_bytes: usize,
    retention: Option<Duration>,
    purge_interval: Duration,
    auto_compact: Option<AutoCompact>,
    /// Write-ahead log segment size and checkpoint period (tests make them tiny).
    wal_segment_bytes: u64,
    checkpoint_bytes: u64,
    checkpoint_every: Duration,
    /// `Some`: the queue lives in PostgreSQL (feature `postgres`), not in `path`.
    #[cfg(feature = "postgres")]
    postgres: Option<(String, crate::backend::postgres::PgOptions)>,
}

impl QueueBuilder {
    /// Puts the queue in PostgreSQL at `url` (a `postgres://` URL or `key=value` string)
    /// instead of a directory: several processes, on one or more machines, then share it, each
    /// running its own workers (feature `postgres`). The schema is migrated at open unless
    /// [`PgOptions::auto_migrate`](crate::postgres::PgOptions::auto_migrate) is off. Every
    /// write is acknowledged after its `COMMIT` (synchronous commit), whatever
    /// [`durability`](QueueBuilder::durability) says; `retention`, when set, replaces the
    /// backend's default of 7 days.
    #[cfg(feature = "postgres")]
    pub fn postgres(self, url: impl Into<String>) -> Self {
        self.postgres_with(url, crate::backend::postgres::PgOptions::default())
    }

    /// [`postgres`](QueueBuilder::postgres) with options (schema, pool size, liveness mode,
    /// heartbeat and rescue intervals...).
    #[cfg(feature = "postgres")]
    pub fn postgres_with(
        mut self,
        url: impl Into<String>,
        options: crate::backend::postgres::PgOptions,
    ) -> Self {
        self.postgres = Some((url.into(), options));
        self
    }

    /// How writes are made durable (default [`Durability::Group`]).
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }
    /// sled's page cache size in bytes (default 64 MiB).
    ///
    /// It does not bound the process's memory: sled counts pages by their size on disk, and
    /// pages it evicts still cost memory, so a smaller cache can *raise* RSS (measured: 200,000
    /// pending tasks, 16 MiB cache 1,166 MiB peak vs 867 MiB with the default; BENCHMARKS.md,
    /// "Issue 12").
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }
    /// Background flush period, used by [`Durability::Relaxed`] (default 500 ms).
    pub fn flush_every(mut self, d: Duration) -> Self {
        self.flush_every = d;
        self
    }
    /// Write-ahead log tuning, for tests that need its rare windows often: the segment size
    /// (default 8 MiB), and the log bytes (default 32 MiB) or time (default 30 s) after which a
    /// checkpoint makes sled durable and deletes the segments it covers.
    #[doc(hidden)]
    pub fn wal_tuning(
        mut self,
        segment_bytes: u64,
        checkpoint_bytes: u64,
        every: Duration,
    ) -> Self {
        self.wal_segment_bytes = segment_bytes.max(1);
        self.checkpoint_bytes = checkpoint_bytes.max(1);
        self.checkpoint_every = every;
        self
    }
    /// Default retry budget and backoff for every queue (default: 3 retries, 1 s .. 60 s, ±25 %).
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.policy = p;
        self
    }
    /// Retry budget and backoff for one named queue.
    pub fn queue_retry_policy(mut self, queue: impl Into<String>, p: RetryPolicy) -> Self {
        self.queue_policies.insert(queue.into(), p);
        self
    }
    /// The time source (tests pass a [`ManualClock`](crate::testing::ManualClock)).
    pub fn clock(mut self, c: impl Clock) -> Self {
        self.clock = Arc::new(c);
        self
    }
    /// Where backoff jitter comes from (default: OS-seeded).
    pub fn jitter(mut self, j: impl JitterSource) -> Self {
        self.jitter = Some(Box::new(j));
        self
    }
    /// Shorthand for a reproducible jitter sequence.
    pub fn jitter_seed(self, seed: u64) -> Self {
        self.jitter(RandomJitter::seeded(seed))
    }
    /// Largest JSON-encoded payload accepted by `enqueue` (default 256 KiB). Queues carry
    /// references to big data, not the data.
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }
    /// Purge finished tasks (and their logs) older than `age` automatically, checking every
    /// `purge_interval` (default 60 s). Without it, call [`Queue::purge`] yourself.
    pub fn retention(mut self, age: Duration) -> Self {
        self.retention = Some(age);
        self
    }
    /// How often automatic retention runs.
    pub fn purge_interval(mut self, d: Duration) -> Self {
        self.purge_interval = d;
        self
    }
    /// When a purge (yours or retention's) compacts the store afterwards (see
    /// [`Queue::compact`]); `None` never does. Default: [`AutoCompact::default`] (stores over
    /// 16 MiB and over 3 times their live estimate). The compaction runs on the purging
    /// thread and holds commits off while it copies the live data.
    pub fn auto_compact(mut self, rule: Option<AutoCompact>) -> Self {
        self.auto_compact = rule;
        self
    }

    /// Opens (creating if needed) the directory, recovers tasks orphaned by a previous process,
    /// and returns the queue. Fails with [`Error::Locked`] if another process holds it.
    pub fn open(mut self) -> Result<Queue> {
        let notify = Arc::new(Notify::default());
        let backoff = BackoffTable {
            default: self.policy.backoff,
            per_queue: self
                .queue_policies
                .iter()
                .map(|(q, p)| (q.clone(), p.backoff))
                .collect(),
        };
        #[cfg(feature = "postgres")]
        if let Some((url, mut options)) = self.postgres.take() {
            if self.retention.is_some() {
                options.retention = self.retention.take();
            }
            let backend = crate::backend::postgres::PgBackend::connect(
                &url,
                options,
                notify.clone(),
                self.clock.clone(),
                self.jitter
                    .take()
                    .unwrap_or_else(|| Box::new(RandomJitter::from_entropy())),
                backoff,
            )?;
            // Several queues of one process may share a schema: each is its own node.
            return self.finish_open(Box::new(backend), notify, OpenHere { key: None });
        }
        // sled's lock cannot tell this process from another; this registry can.
        let registration = OpenHere::register(&self.path)?;
        let backend = SledBackend::open(
            &self.path,
            &SledOptions {
                cache_bytes: self.cache_bytes,
                flush_every_ms: Some(
                    u64::try_from(self.flush_every.as_millis())
                        .unwrap_or(500)
                        .max(1),
                ),
                wal_segment_bytes: self.wal_segment_bytes,
                checkpoint_bytes: self.checkpoint_bytes,
                checkpoint_every: self.checkpoint_every,
            },
            WriterConfig {
                clock: self.clock.clone(),
                jitter: self
                    .jitter
                    .take()
                    .unwrap_or_else(|| Box::new(RandomJitter::from_entropy())),
                backoff,
                durability: self.durability,
            },
            notify.clone(),
        )?;
        self.finish_open(Box::new(backend), notify, registration)
    }

    fn finish_open(
        self,
        backend: Box<dyn Backend>,
        notify: Arc<Notify>,
        registration: OpenHere,
    ) -> Result<Queue> {
        // Rescue runs before the queue is returned, so no worker can claim first.
        let report = backend.rescue()?;
        let (janitor_stop, janitor_rx) = crossbeam_channel::bounded::<()>(0);
        let inner = Arc::new(Inner {
            path: self.path,
            backend,
            clock: self.clock,
            notify,
            registry: Registry::default(),
            executions: Executions::default(),
            policy: self.policy,
            queue_policies: self.queue_policies,
            max_payload_bytes: self.max_payload_bytes,
            recovery: report,
            auto_compact: self.auto_compact,
            task_bytes: Mutex::new(None),
            janitor_stop: Some(janitor_stop),
            _registration: registration,
        });
        if let Some(age) = self.retention {
            spawn_janitor(Arc::downgrade(&inner), janitor_rx, age, self.purge_interval)?;
        }
        Ok(Queue { inner })
    }
}

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    /// Every transition and read goes through the backend (the storage seam).
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) notify: Arc<Notify>,
    pub(crate) registry: Registry,
    /// Executions running in this process (for [`Queue::cancel_running`]).
    pub(crate) executions: Executions,
    policy: RetryPolicy,
    queue_policies: HashMap<String, RetryPolicy>,
    max_payload_bytes: usize,
    recovery: RecoveryReport,
    auto_compact: Option<AutoCompact>,
    /// Bytes per task the last compaction measured (for `auto_compact`'s estimate).
    task_bytes: Mutex<Option<u64>>,
    janitor_stop: Option<Sender<()>>,
    /// Must stay the last field: fields drop in declaration order, so the directory is marked
    /// closed in this process only after `store` (and with it sled's lock) is gone.
    _registration: OpenHere,
}

impl Inner {
    /// Stops the backend (after it drains what is queued) and makes everything durable.
    fn shut_down(&mut self) -> Result<()> {
        self.janitor_stop.take();
        self.backend.shut_down()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::error!(error = %e, "final sync at close failed");
        }
    }
}

/// The directories this process has open, so a second open of the same directory is told
/// apart from another process's lock ([`Error::AlreadyOpen`] rather than [`Error::Locked`]).
struct OpenHere {
    key: Option<PathBuf>,
}

static OPEN_HERE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

impl OpenHere {
    fn register(path: &Path) -> Result<OpenHere> {
        // A directory that does not exist yet cannot be open; it is registered under the name
        // it will have once created (its parent canonicalised).
        let key = std::fs::canonicalize(path).ok().or_else(|| {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty())?;
            Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
        });
        if let Some(key) = &key {
            let mut open = OPEN_HERE.lock();
            if open.contains(key) {
                return Err(Error::AlreadyOpen {
                    path: path.to_path_buf(),
                });
            }
            open.push(key.clone());
        }
        Ok(OpenHere { key })
    }
}

impl Drop for OpenHere {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            OPEN_HERE.lock().retain(|k| *k != key);
        }
    }
}

/// A handle to a [`Queue`] that does not keep it open: what a handler should hold (see
/// [`TaskContext::queue_handle`]), and what background helpers that must not outlive the
/// application's own handles can keep.
#[derive(Clone, Debug)]
pub struct WeakQueue {
    inner: Weak<Inner>,
}

impl WeakQueue {
    /// The queue, if some [`Queue`] handle still keeps it open.
    pub fn upgrade(&self) -> Option<Queue> {
        self.inner.upgrade().map(|inner| Queue { inner })
    }
}

fn spawn_janitor(
    queue: Weak<Inner>,
    stop: Receiver<()>,
    age: Duration,
    every: Duration,
) -> Result<()> {
    std::thread::Builder::new()
        .name("omniq-retention".into())
        .spawn(move || loop {
            match stop.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let Some(inner) = queue.upgrade() else { return };
            let q = Queue { inner };
            match q.purge(age) {
                Ok(r) if r.tasks_removed > 0 => {
                    tracing::info!(removed = r.tasks_removed, "retention purge")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention purge failed"),
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Storage(format!("cannot start the retention thread: {e}")))
}

/// A durable task queue stored in one directory. Cheap to clone; all clones share one engine.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use omniq::{Queue, Task, TaskContext, TaskError, Status};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add { a: i64, b: i64 }
/// impl Task for Add {
///     const NAME: &'static str = "add";
///     type Output = i64;
/// }
///
/// # fn main() -> omniq::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let queue = Queue::open(dir.path().join("jobs"))?;
/// queue.register(|t: Add, _ctx: &TaskContext| -> Result<i64, TaskError> { Ok(t.a + t.b) });
/// let id = queue.enqueue(Add { a: 2, b: 3 })?;
///
/// let pool = queue.workers().concurrency(2).start()?;
/// let done = queue.wait(id, std::time::Duration::from_secs(10))?;
/// pool.stop();
///
/// assert_eq!(done.status, Status::Completed);
/// assert_eq!(done.result::<i64>()?, Some(5));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Queue {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens a queue directory with default options (creating it if needed).
    pub fn open(path: impl AsRef<Path>) -> Result<Queue> {
        Queue::builder(path).open()
    }

    /// Starts configuring a queue directory.
    pub fn builder(path: impl AsRef<Path>) -> QueueBuilder {
        QueueBuilder {
            path: path.as_ref().to_path_buf(),
            durability: Durability::default(),
            cache_bytes: 64 << 20,
            flush_every: Duration::from_millis(500),
            policy: RetryPolicy::default(),
            queue_policies: HashMap::new(),
            clock: Arc::new(SystemClock),
            jitter: None,
            max_payload_bytes: 256 << 10,
            retention: None,
            purge_interval: Duration::from_secs(60),
            auto_compact: Some(AutoCompact::default()),
            wal_segment_bytes: crate::store::wal::DEFAULT_SEGMENT_BYTES,
            checkpoint_bytes: crate::store::sled_store::DEFAULT_CHECKPOINT_BYTES,
            checkpoint_every: Duration::from_secs(30),
            #[cfg(feature = "postgres")]
            postgres: None,
        }
    }

    /// Starts configuring a queue in PostgreSQL at `url` (feature `postgres`): the same as
    /// `Queue::builder(..).postgres(url)`. [`Queue::path`] then names the database and schema.
    ///
    /// ```no_run
    /// # fn main() -> omniq::Result<()> {
    /// let queue = omniq::Queue::postgres("host=127.0.0.1 user=postgres dbname=app").open()?;
    /// # let _ = queue; Ok(()) }
    /// ```
    #[cfg(feature = "postgres")]
    pub fn postgres(url: &str) -> QueueBuilder {
        Queue::postgres_with(url, crate::backend::postgres::PgOptions::default())
    }

    /// [`Queue::postgres`] with options (schema, pool size, liveness mode, intervals,
    /// retention).
    #[cfg(feature = "postgres")]
    pub fn postgres_with(url: &str, options: crate::backend::postgres::PgOptions) -> QueueBuilder {
        let label = format!("postgresql:{}", options.schema);
        Queue::builder(label).postgres_with(url, options)
    }

    /// The directory this queue lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What crash recovery did when this queue was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// The current time by this queue's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    // ----- enqueue -------------------------------------------------------------------------

    /// Enqueues a task with default options. Returns once the task is durable (per the
    /// queue's [`Durability`]).
    pub fn enqueue<T: Task>(&self, task: T) -> Result<TaskId> {
        self.enqueue_with(task, EnqueueOptions::default())
    }

    /// Enqueues a task with options (queue, delay or run time, retries, priority, timeout,
    /// unique key). With a unique key, a duplicate is not inserted and the id returned is the
    /// existing task's; use [`insert_with`](Queue::insert_with) to be told which happened.
    pub fn enqueue_with<T: Task>(&self, task: T, options: EnqueueOptions) -> Result<TaskId> {
        self.insert_with(task, options).map(|i| i.id)
    }

    /// Enqueues a task and says whether it was inserted or refused as a duplicate of a task
    /// holding the same unique key (whose id it returns). The decision is atomic with the
    /// insert: of two producers racing with the same key, exactly one inserts.
    ///
    /// ```
    /// use omniq::{EnqueueOptions, Queue, Unique};
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let queue = Queue::open(dir.path())?;
    /// let once = || EnqueueOptions::new().unique(Unique::by_args());
    /// let args = serde_json::json!({"account": 42});
    /// let first = queue.insert_json("sync_account", &args, once())?;
    /// let again = queue.insert_json("sync_account", &args, once())?;
    /// assert!(!first.duplicate && again.duplicate);
    /// assert_eq!(again.id, first.id);
    /// # Ok(()) }
    /// ```
    pub fn insert_with<T: Task>(&self, task: T, options: EnqueueOptions) -> Result<Inserted> {
        let new = self.build_new(T::NAME, encode_payload(&task)?, &options)?;
        self.insert_one(new)
    }

    /// [`insert_with`](Queue::insert_with) by kind name with a JSON payload.
    pub fn insert_json(
        &self,
        kind: &str,
        payload: &serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<Inserted> {
        let new = self.build_new(kind, json_bytes(payload)?, &options)?;
        self.insert_one(new)
    }

    /// Enqueues many tasks of one kind in one atomic, durable write: all or none.
    pub fn enqueue_many<T: Task>(&self, tasks: impl IntoIterator<Item = T>) -> Result<Vec<TaskId>> {
        self.enqueue_many_with(tasks, EnqueueOptions::default())
    }

    /// [`enqueue_many`](Queue::enqueue_many) with the same options for every task. With a
    /// unique key, duplicates (of stored tasks or of earlier tasks in the batch) are not
    /// inserted; their ids are the holders'.
    pub fn enqueue_many_with<T: Task>(
        &self,
        tasks: impl IntoIterator<Item = T>,
        options: EnqueueOptions,
    ) -> Result<Vec<TaskId>> {
        Ok(self
            .insert_many_with(tasks, options)?
            .into_iter()
            .map(|i| i.id)
            .collect())
    }

    /// [`enqueue_many_with`](Queue::enqueue_many_with), saying for each task whether it was
    /// inserted or refused as a duplicate.
    pub fn insert_many_with<T: Task>(
        &self,
        tasks: impl IntoIterator<Item = T>,
        options: EnqueueOptions,
    ) -> Result<Vec<Inserted>> {
        let records = tasks
            .into_iter()
            .map(|t| self.build_new(T::NAME, encode_payload(&t)?, &options))
            .collect::<Result<Vec<_>>>()?;
        self.insert_new(records)
    }

    /// Enqueues a task by kind name with a JSON payload, for handlers registered with
    /// [`register_fn`](Queue::register_fn) and for tools that do not link the task types.
    pub fn enqueue_json(
        &self,
        kind: &str,
        payload: &serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<TaskId> {
        self.insert_json(kind, payload, options).map(|i| i.id)
    }

    fn insert_one(&self, task: NewTask) -> Result<Inserted> {
        self.insert_new(vec![task])?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Storage("the backend answered an insert with no result".into()))
    }

    fn insert_new(&self, tasks: Vec<NewTask>) -> Result<Vec<Inserted>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.inner.backend.insert_new(tasks)
    }

    fn build_new(&self, kind: &str, payload: Vec<u8>, o: &EnqueueOptions) -> Result<NewTask> {
        let task = self.build(kind, payload, o)?;
        let extras = match &o.unique {
            Some(u) => Some(TaskExtras {
                unique: Some(unique::spec(u, kind, &task.payload, task.created_at)?),
                scheduled: None,
            }),
            None => None,
        };
        Ok(NewTask { task, extras })
    }

    fn build(&self, kind: &str, payload: Vec<u8>, o: &EnqueueOptions) -> Result<TaskInfo> {
        validate_name("task kind", kind)?;
        let queue = o.queue.as_deref().unwrap_or(DEFAULT_QUEUE);
        validate_name("queue name", queue)?;
        if payload.len() > self.inner.max_payload_bytes {
            return Err(Error::Invalid {
                what: "payload",
                reason: format!(
                    "{kind} payload is {} bytes, over the limit of {} (QueueBuilder::max_payload_bytes)",
                    payload.len(),
                    self.inner.max_payload_bytes
                ),
            });
        }
        let now = self.inner.clock.now();
        let next_run_at = match (o.run_at, o.delay) {
            (Some(at), _) => at,
            (None, Some(d)) => now.plus(d),
            (None, None) => now,
        };
        let policy = self
            .inner
            .queue_policies
            .get(queue)
            .unwrap_or(&self.inner.policy);
        Ok(TaskInfo {
            id: TaskId::generate(),
            kind: kind.to_string(),
            queue: queue.to_string(),
            payload,
            status: Status::Pending,
            attempts: 0,
            max_retries: o.max_retries.unwrap_or(policy.max_retries),
            priority: o.priority,
            created_at: now,
            next_run_at,
            started_at: None,
            finished_at: None,
            timeout_ms: o
                .timeout
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            backoff: o.backoff,
            result: None,
            last_error: None,
            errors: Vec::new(),
            lease: 0,
        })
    }

    // ----- inspect -------------------------------------------------------------------------

    /// One task, or `None` if there is no such task. A record that no longer decodes gives
    /// [`Error::Corrupt`] naming its key; other tasks still load.
    pub fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        self.inner.backend.get(id)
    }

    /// A page of tasks, newest first. Pass `page.next_cursor` back as the filter's cursor to
    /// get the next page; every task appears exactly once across pages.
    pub fn list(&self, filter: &ListFilter) -> Result<Page> {
        self.inner.backend.list(filter)
    }

    /// Counts per status and per queue (O(queues): counters are maintained with every commit).
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        for ((queue, status), n) in self.inner.backend.counts()? {
            *stats.by_status.entry(status).or_insert(0) += n;
            *stats
                .by_queue
                .entry(queue)
                .or_default()
                .entry(status)
                .or_insert(0) += n;
            stats.total += n;
        }
        Ok(stats)
    }

    /// A task's transitions, oldest first (empty if the task does not exist or was purged).
    pub fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        self.inner.backend.history(id)
    }

    /// Blocks until the task is terminal (woken by the engine, not by polling), or `timeout`,
    /// and returns it.
    ///
    /// What `wait` reports has been acknowledged: in [`Durability::Immediate`] and
    /// [`Durability::Group`] it is on disk, so a crash right after `wait` returns cannot undo
    /// it. (A plain [`get`](Queue::get) can see a group up to one fsync before that.) In
    /// [`Durability::Relaxed`] it is as durable as that mode's acknowledgements: a crash within
    /// the flush interval can lose it.
    ///
    /// Fails with [`Error::WaitTimeout`] if the task is not terminal (and acknowledged) in time,
    /// and [`Error::NotFound`] if there is no such task.
    pub fn wait(&self, id: TaskId, timeout: Duration) -> Result<TaskInfo> {
        self.wait_until(id, Instant::now() + timeout, timeout)
    }

    /// Waits for every task in `ids` as [`wait`](Queue::wait) does, all within one `timeout`,
    /// and returns them in the order given. Fails with the first task that is not terminal by
    /// then ([`Error::WaitTimeout`]) or does not exist ([`Error::NotFound`]).
    ///
    /// ```
    /// # use omniq::{Queue, Status, TaskContext, TaskError};
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let queue = Queue::open(dir.path())?;
    /// queue.register_fn("double", |v: serde_json::Value, _ctx: &TaskContext| -> Result<_, TaskError> {
    ///     Ok(serde_json::json!(v.as_i64().unwrap_or(0) * 2))
    /// });
    /// let ids = (0..10)
    ///     .map(|n| queue.enqueue_json("double", &serde_json::json!(n), Default::default()))
    ///     .collect::<omniq::Result<Vec<_>>>()?;
    /// let pool = queue.workers().concurrency(2).start()?;
    /// let done = queue.wait_all(&ids, std::time::Duration::from_secs(10))?;
    /// pool.stop();
    /// assert!(done.iter().all(|t| t.status == Status::Completed));
    /// # Ok(()) }
    /// ```
    pub fn wait_all(&self, ids: &[TaskId], timeout: Duration) -> Result<Vec<TaskInfo>> {
        let deadline = Instant::now() + timeout;
        ids.iter()
            .map(|id| self.wait_until(*id, deadline, timeout))
            .collect()
    }

    fn wait_until(&self, id: TaskId, deadline: Instant, timeout: Duration) -> Result<TaskInfo> {
        let notify = &self.inner.notify;
        loop {
            let (token, rx) = notify.add_waiter(id);
            let task = self.get(id);
            let terminal = matches!(&task, Ok(Some(t)) if t.status.is_terminal());
            if terminal || !matches!(task, Ok(Some(_))) || rx.recv_deadline(deadline).is_err() {
                notify.remove_waiter(id, token);
                let task = match task {
                    Ok(Some(t)) if t.status.is_terminal() => t,
                    Ok(Some(_)) => self.get(id)?.ok_or(Error::NotFound(id))?,
                    Ok(None) => return Err(Error::NotFound(id)),
                    Err(e) => return Err(e),
                };
                if !task.status.is_terminal() {
                    return Err(Error::WaitTimeout {
                        id,
                        timeout,
                        status: task.status,
                    });
                }
                return self.acknowledged(task, deadline, timeout);
            }
        }
    }

    /// Returns `task` (just read) once the group that wrote what was read is acknowledged.
    /// The read may reflect any group applied so far, so wait for all of them: at most the
    /// fsync in progress.
    fn acknowledged(
        &self,
        task: TaskInfo,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<TaskInfo> {
        let notify = &self.inner.notify;
        match notify.wait_acknowledged(notify.applied_seq(), deadline) {
            Ok(()) => Ok(task),
            Err(BarrierMiss::Failed(reason)) => Err(Error::Storage(format!(
                "task {} reached {} but the commit that recorded it failed ({reason}); reopen the queue",
                task.id, task.status
            ))),
            Err(BarrierMiss::Timeout) => Err(Error::WaitTimeout {
                id: task.id,
                timeout,
                status: Status::Running,
            }),
        }
    }

    /// A channel that receives every transition committed from now on (enqueue, claim,
    /// success, failure, cancel, retry). For metrics and audit.
    pub fn subscribe(&self) -> Receiver<TransitionEvent> {
        self.inner.notify.subscribe()
    }

    /// Reads everything and checks that records, indexes, counters and the log agree.
    /// Meant for tests and operators (`omniq check`); it is a full scan.
    pub fn check_consistency(&self) -> Result<ConsistencyReport> {
        self.inner.backend.check()
    }

    /// Bytes the directory uses on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.inner.backend.size_on_disk()
    }

    // ----- operate -------------------------------------------------------------------------

    /// Cancels a `Pending` task. Any other state gives [`Error::InvalidState`].
    pub fn cancel(&self, id: TaskId) -> Result<TaskInfo> {
        self.inner.backend.cancel(id)
    }

    /// Re-queues a `Failed` or `Cancelled` task, due now, with a fresh budget: `attempts`
    /// restarts at 0, so it gets `max_retries + 1` more executions. Its error history and log
    /// are kept (the log records the manual retry).
    pub fn retry(&self, id: TaskId) -> Result<TaskInfo> {
        self.inner.backend.retry(id)
    }

    /// Deletes finished (terminal) tasks that finished at least `older_than` ago, with their
    /// log entries. `Duration::ZERO` removes every terminal task, including one that finished in
    /// the current millisecond.
    pub fn purge(&self, older_than: Duration) -> Result<PurgeReport> {
        let cutoff = purge_cutoff(self.inner.clock.now(), older_than);
        let mut report = PurgeReport::default();
        loop {
            let removed = self.inner.backend.purge(cutoff, 1000)?;
            report.tasks_removed += removed;
            if removed == 0 {
                break;
            }
        }
        if report.tasks_removed > 0 {
            if let Some(rule) = self.inner.auto_compact {
                let tasks: u64 = self.inner.backend.counts()?.values().sum();
                let task_bytes = *self.inner.task_bytes.lock();
                // The log's preallocated segments are not what a compaction gives back.
                let size = self
                    .size_on_disk()?
                    .saturating_sub(self.inner.backend.log_bytes());
                if rule.wants(size, tasks, task_bytes) {
                    // The purge itself succeeded: a compaction that fails is said, not raised
                    // (the store keeps working on its current files; a failure that leaves it
                    // unusable refuses every later commit by itself).
                    match self.compact() {
                        Ok(r) if r.compacted => report.compaction = Some(r),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "compaction after a purge failed")
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Rewrites the store into fresh files holding only its live data, and deletes the old
    /// ones: how the directory shrinks back after a purge (sled never gives space back by
    /// itself). Safe while producers and workers run: commits wait while the live data is
    /// copied and the new files are made durable and switched to (the report's
    /// `write_pause`), reads do not; a crash at any point leaves either the old files or the
    /// new ones, both complete. A purge runs it by itself when the store has grown much larger
    /// than what it holds ([`QueueBuilder::auto_compact`]). On PostgreSQL it does nothing and
    /// says so (autovacuum reclaims space there).
    ///
    /// ```
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let queue = omniq::Queue::open(dir.path().join("jobs"))?;
    /// queue.enqueue_json("noop", &serde_json::json!({}), omniq::EnqueueOptions::new())?;
    /// let report = queue.compact()?;
    /// assert!(report.compacted);
    /// assert_eq!(queue.stats()?.total, 1);
    /// # Ok(()) }
    /// ```
    pub fn compact(&self) -> Result<CompactReport> {
        let report = self.inner.backend.compact()?;
        if report.compacted {
            let tasks: u64 = self.inner.backend.counts()?.values().sum();
            if tasks >= 1000 {
                let data = report.bytes_after.saturating_sub(report.log_bytes);
                *self.inner.task_bytes.lock() = Some(data / tasks);
            }
        }
        Ok(report)
    }

    /// Closes this handle and, if it is the last one, the queue: the writer drains, everything
    /// is made durable, and the directory's lock is released before `close` returns `Ok`.
    ///
    /// Every clone of the queue, every running [`WorkerPool`](crate::WorkerPool) and any
    /// [`Queue`] captured by a registered handler is a handle. If others remain, what was
    /// committed so far is still made durable, this handle is dropped, and
    /// [`Error::StillOpen`] says how many keep the directory open (a handler should use
    /// [`TaskContext::queue_handle`] or [`TaskContext::enqueue`] rather than capture a clone).
    pub fn close(self) -> Result<()> {
        self.inner.backend.sync()?;
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                let result = inner.shut_down();
                // Dropping it releases sled's lock (and waits until sled has let go of it).
                drop(inner);
                result
            }
            Err(inner) => Err(Error::StillOpen {
                path: inner.path.clone(),
                others: Arc::strong_count(&inner) - 1,
            }),
        }
    }

    /// A handle that does not keep the queue open.
    pub fn downgrade(&self) -> WeakQueue {
        WeakQueue {
            inner: Arc::downgrade(&self.inner),
        }
    }

    // ----- handlers and workers ------------------------------------------------------------

    /// A task's extras: its unique key and the schedule tick that enqueued it (`None` for a
    /// task with neither, or no such task).
    pub fn extras(&self, id: TaskId) -> Result<Option<TaskExtras>> {
        self.inner.backend.extras(id)
    }

    // ----- limits --------------------------------------------------------------------------

    /// Sets the rate and/or concurrency limit of a queue or a kind, durably; it applies to the
    /// next claim. A task a limit holds back stays `Pending`, is not claimed and is charged
    /// no attempt; worker pools sleep until the window frees a slot (or a running task of the
    /// scope finishes). Priority and due order are kept within the limit. An unlimited
    /// [`Limit::new()`] is the same as [`remove_limit`](Queue::remove_limit).
    ///
    /// ```
    /// use std::time::Duration;
    /// use omniq::{Limit, LimitScope, Queue};
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let queue = Queue::open(dir.path())?;
    /// // At most 10 emails started per second, and 3 at once.
    /// queue.set_limit(
    ///     LimitScope::queue("emails"),
    ///     Limit::new().rate(10, Duration::from_secs(1)).concurrency(3),
    /// )?;
    /// // At most 2 "render_pdf" tasks at once, whatever their queue.
    /// queue.set_limit(LimitScope::kind("render_pdf"), Limit::new().concurrency(2))?;
    /// assert_eq!(queue.limits()?.len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn set_limit(&self, scope: LimitScope, limit: Limit) -> Result<()> {
        validate_name("limit scope name", scope.name())?;
        let limit = (!limit.is_unlimited()).then_some(limit);
        self.inner.backend.set_limit(scope, limit)
    }

    /// Removes a queue's or kind's limit.
    pub fn remove_limit(&self, scope: LimitScope) -> Result<()> {
        self.inner.backend.set_limit(scope, None)
    }

    /// Every limit and how it stands now: running, started in the window, what remains, how
    /// many due tasks it holds back, and when the window frees a slot.
    pub fn limits(&self) -> Result<Vec<LimitStatus>> {
        self.inner.backend.limits(self.inner.clock.now())
    }

    // ----- schedules -----------------------------------------------------------------------

    /// Registers (or updates) a durable recurring schedule named `name`: at every tick of
    /// `spec`, one `task` is enqueued with `options` (its queue, priority, retries, timeout,
    /// backoff, unique key; a delay is ignored), due at the tick's time. Worker pools fire ticks
    /// (the dispatcher sleeps until the next one); [`testing::run_due`](crate::testing::run_due)
    /// does too.
    ///
    /// Exactly once: each tick's task is inserted in the same atomic commit that advances the
    /// schedule's last-fired time, so a crash at any instant neither loses nor doubles a tick.
    /// Ticks that came due while nothing was ticking follow `missed`
    /// ([`Missed::Skip`] by default in [`schedule`](Queue::schedule)). Updating a schedule keeps
    /// when it last fired, so no tick is repeated or lost by the update.
    ///
    /// ```
    /// use omniq::{EnqueueOptions, Missed, Queue, Spec};
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let queue = Queue::open(dir.path())?;
    /// queue.schedule_json(
    ///     "nightly-report",
    ///     Spec::cron("0 3 * * *", "Europe/Paris")?,
    ///     Missed::RunOnce,
    ///     "build_report",
    ///     &serde_json::json!({"kind": "daily"}),
    ///     EnqueueOptions::new().queue("reports"),
    /// )?;
    /// let s = &queue.schedules()?[0];
    /// assert_eq!(s.name, "nightly-report");
    /// assert!(s.next_tick().is_some());
    /// # Ok(()) }
    /// ```
    pub fn schedule<T: Task>(
        &self,
        name: &str,
        spec: Spec,
        task: T,
        options: EnqueueOptions,
    ) -> Result<bool> {
        self.put_schedule(
            name,
            spec,
            Missed::Skip,
            T::NAME,
            encode_payload(&task)?,
            &options,
        )
    }

    /// [`schedule`](Queue::schedule) by kind name with a JSON payload and an explicit missed-tick
    /// policy. Returns whether the schedule was created (`false`: updated).
    pub fn schedule_json(
        &self,
        name: &str,
        spec: Spec,
        missed: Missed,
        kind: &str,
        payload: &serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<bool> {
        self.put_schedule(name, spec, missed, kind, json_bytes(payload)?, &options)
    }

    fn put_schedule(
        &self,
        name: &str,
        spec: Spec,
        missed: Missed,
        kind: &str,
        payload: Vec<u8>,
        o: &EnqueueOptions,
    ) -> Result<bool> {
        validate_name("schedule name", name)?;
        spec.validate()?;
        // Resolve the options now (queue policy defaults, unique key check) so every tick
        // builds the same task.
        let probe = self.build_new(kind, payload, o)?;
        let now = self.inner.clock.now();
        let t = probe.task;
        let info = ScheduleInfo {
            name: name.to_string(),
            spec,
            missed,
            kind: t.kind,
            payload: t.payload,
            options: ScheduledTaskOptions {
                queue: t.queue,
                priority: t.priority,
                max_retries: t.max_retries,
                timeout_ms: t.timeout_ms,
                backoff: t.backoff,
                unique: o.unique.as_ref().map(|u| {
                    (
                        u.key.clone(),
                        u.state_mask(),
                        u.period
                            .map(|p| u64::try_from(p.as_millis()).unwrap_or(u64::MAX)),
                    )
                }),
            },
            paused: false,
            last_fired: now,
            created_at: now,
            fired: 0,
            skipped: 0,
        };
        self.inner.backend.put_schedule(info)
    }

    /// Pauses a schedule: it fires nothing until resumed.
    pub fn pause_schedule(&self, name: &str) -> Result<()> {
        self.inner.backend.pause_schedule(name, true)
    }

    /// Resumes a paused schedule. Ticks that fell during the pause are skipped.
    pub fn resume_schedule(&self, name: &str) -> Result<()> {
        self.inner.backend.pause_schedule(name, false)
    }

    /// Removes a schedule (tasks it already enqueued stay). Returns whether it existed.
    pub fn remove_schedule(&self, name: &str) -> Result<bool> {
        self.inner.backend.remove_schedule(name)
    }

    /// Every schedule, by name, with when it last fired and its next tick.
    pub fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        self.inner.backend.schedules()
    }

    /// Fires the schedule ticks owed now (worker pools do this on their own; for tools and
    /// tests driving a queue by hand). Returns the tasks enqueued.
    pub fn fire_due_schedules(&self) -> Result<Vec<TaskId>> {
        self.inner.backend.tick(self.inner.clock.now())
    }

    /// Registers the handler for task type `T` (replacing any previous one).
    ///
    /// A handler returns `Ok(output)`, or `Err(TaskError)`: transient errors (including any
    /// `std::error::Error` via `?`) are retried within the budget, permanent ones fail at once.
    /// A panic counts as a transient failure with `error_type = "panic"`.
    pub fn register<T, F>(&self, handler: F)
    where
        T: Task,
        F: Fn(T, &TaskContext) -> Result<T::Output, TaskError> + Send + Sync + 'static,
    {
        self.inner
            .registry
            .insert(T::NAME, handler::typed::<T, F>(handler));
    }

    /// Registers a plain closure over JSON for a kind name.
    pub fn register_fn<F>(&self, kind: &str, handler: F)
    where
        F: Fn(serde_json::Value, &TaskContext) -> Result<serde_json::Value, TaskError>
            + Send
            + Sync
            + 'static,
    {
        self.inner.registry.insert(kind, handler::plain(handler));
    }

    /// Kinds that have a handler.
    pub fn registered_kinds(&self) -> Vec<String> {
        self.inner.registry.kinds()
    }

    /// Configures a worker pool for this queue.
    pub fn workers(&self) -> WorkerPoolBuilder {
        WorkerPoolBuilder::new(self.clone())
    }

    // ----- purge preview (read-only) -------------------------------------------------------

    /// What [`purge`](Queue::purge) with the same `older_than` would delete now, without
    /// deleting anything: how many finished (terminal) tasks finished at least `older_than`
    /// ago, and the first `sample` of them, oldest finish first.
    ///
    /// On sled it reads the task records up to the newest one that finished before the cutoff
    /// (format 4 keeps per-minute finish buckets, not a per-task index); on PostgreSQL, an
    /// index. A purge called afterwards
    /// computes its own cutoff, so it also removes tasks that finish in between.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let queue = omniq::Queue::open(dir.path()).unwrap();
    /// let preview = queue.purge_preview(std::time::Duration::from_secs(7 * 86_400), 5)?;
    /// println!("would remove {} task(s)", preview.tasks);
    /// # Ok::<(), omniq::Error>(())
    /// ```
    pub fn purge_preview(
        &self,
        older_than: Duration,
        sample: usize,
    ) -> Result<crate::inspect::PurgePreview> {
        let cutoff = purge_cutoff(self.inner.clock.now(), older_than);
        let ids = self.inner.backend.finished_before(cutoff, usize::MAX)?;
        let mut shown = Vec::with_capacity(sample.min(ids.len()));
        for id in ids.iter().take(sample) {
            if let Some(t) = self.inner.backend.get(*id)? {
                shown.push(t);
            }
        }
        Ok(crate::inspect::PurgePreview {
            cutoff,
            tasks: ids.len(),
            sample: shown,
        })
    }
}

fn json_bytes(payload: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec(payload).map_err(|e| Error::Encode {
        what: "payload",
        reason: e.to_string(),
    })
}

fn encode_payload<T: Task>(task: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(task).map_err(|e| Error::Encode {
        what: "payload",
        reason: format!("{}: {e}", T::NAME),
    })
}

pub(crate) fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::Invalid {
            what,
            reason: format!("{name:?} {reason}"),
        })
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_QUEUE_NAME {
        return bad(&format!("is longer than {MAX_QUEUE_NAME} bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("contains control characters");
    }
    Ok(())
}

// ----- operator controls (pause / resume, cancelling a running execution) -----------------

impl Queue {
    /// Pauses a queue: from the moment this returns, none of its tasks is claimed (they stay
    /// `Pending`; nothing is charged) until [`resume`](Queue::resume). Executions already running
    /// finish normally. The flag is durable: it survives a restart.
    pub fn pause(&self, queue: &str) -> Result<()> {
        self.set_paused(queue, true)
    }

    /// Resumes a paused queue; its due tasks are claimed again at once. Resuming a queue that
    /// is not paused does nothing.
    pub fn resume(&self, queue: &str) -> Result<()> {
        self.set_paused(queue, false)?;
        self.inner.notify.wake_all();
        Ok(())
    }

    /// The queues that are paused, sorted.
    pub fn paused_queues(&self) -> Vec<String> {
        self.inner.backend.paused().into_iter().collect()
    }

    /// Whether `queue` is paused.
    pub fn is_paused(&self, queue: &str) -> bool {
        self.inner.backend.paused().contains(queue)
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        validate_name("queue name", queue)?;
        self.inner.backend.set_paused(queue, paused)
    }

    /// Cancels a `Running` task, cooperatively: its handler's
    /// [`TaskContext::is_cancelled`] turns true, and the attempt ends `Cancelled` (whatever the
    /// handler returns) when the handler returns or its timeout fires. Returns the task as it
    /// is now (usually still `Running`; [`wait`](Queue::wait) for the end). If no execution of
    /// it runs in this process (its pool stopped and gave up on it), the attempt is closed as
    /// `Cancelled` at once. Like every finish, this is fenced by the attempt's lease: it can
    /// never touch a later attempt. A task that is not `Running` gives
    /// [`Error::InvalidState`]; use [`cancel`](Queue::cancel) for a `Pending` one.
    ///
    /// The request lives in memory until the attempt ends: if the process dies first, crash
    /// recovery treats the attempt like any other interrupted one.
    pub fn cancel_running(&self, id: TaskId) -> Result<TaskInfo> {
        let task = self.get(id)?.ok_or(Error::NotFound(id))?;
        if task.status != Status::Running {
            return Err(Error::InvalidState {
                id,
                status: task.status,
                op: "cancel_running",
                expected: "RUNNING",
            });
        }
        match self.inner.executions.request_cancel(id, task.attempts) {
            CancelRequest::Flagged => Ok(task),
            CancelRequest::TooLate => Err(Error::InvalidState {
                id,
                status: Status::Running,
                op: "cancel_running",
                expected: "still running (its handler already returned)",
            }),
            CancelRequest::NotRunningHere => {
                match self.inner.backend.finish(
                    id,
                    task.lease,
                    crate::commit::Outcome::Cancelled,
                )? {
                    crate::commit::Finished::Applied(t) => Ok(*t),
                    crate::commit::Finished::Stale => {
                        let now = self.get(id)?.ok_or(Error::NotFound(id))?;
                        Err(Error::InvalidState {
                            id,
                            status: now.status,
                            op: "cancel_running",
                            expected: "RUNNING",
                        })
                    }
                }
            }
        }
    }
}

/// The backends' `finished_before(cutoff)` is strict (finished at `< cutoff`); a purge removes
/// what finished *at least* `older_than` ago, so its cutoff is one millisecond later. Without
/// that, `purge(Duration::ZERO)` skipped a task finished in the same millisecond.
fn purge_cutoff(now: Timestamp, older_than: Duration) -> Timestamp {
    now.minus(older_than).plus(Duration::from_millis(1))
}
