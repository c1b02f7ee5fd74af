//! The PostgreSQL backend (feature `postgres`): several processes, on one or more machines,
//! share one queue in one database schema (design.md section 7).
//!
//! - **Transitions in SQL, rules in Rust.** A claim is one statement (a CTE picks due pending
//!   rows `FOR UPDATE SKIP LOCKED` from a partial index, an `UPDATE` moves them to running with
//!   `attempts + 1` and a new lease). A finish, cancel, retry or rescue reads the row, asks the
//!   pure rules of `lifecycle.rs` (so `retry.rs`) for the next record, and writes it fenced by
//!   lease and state (`WHERE id = $1 AND lease = $2 AND state = $3`). Each transition writes its
//!   log row and its counter deltas in the same transaction, and nothing is answered before
//!   `COMMIT` returns (with `synchronous_commit = on`, set on every connection).
//! - **One committer.** `submit` (a worker pool's finishes and claim) only queues; the committer
//!   thread (`committer.rs`) commits everything queued in one transaction and replies in order.
//!   A pool with `claim_ahead` keeps many submissions queued (its workers do not wait for their
//!   outcomes' commits), so each transaction carries many finishes and claims; consecutive
//!   claims on the same queues run as one statement. Inserts, cancels, retries and reads run on
//!   the caller's thread.
//! - **Wake-ups.** Local listeners hear every commit at once ([`Notify::after_commit`]); other
//!   processes hear a `NOTIFY`, at most one per queue per `notify_interval` (every notifying
//!   commit takes a global lock in PostgreSQL), sent after the commit by a notifier thread, and
//!   poll every `poll_interval` in case one is missed.
//! - **Exact rescue** (`rescue.rs`): each process is a node row, alive while its session holds
//!   an advisory lock on it ([`Liveness::SessionLock`]) or, behind poolers that break session
//!   state, while its heartbeat is fresh ([`Liveness::Heartbeat`]).
//!
//! [`Notify::after_commit`]: crate::events::Notify::after_commit

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::{Backend, ClaimRequest, DueSummary, FinishRequest};
use crate::clock::Clock;
use crate::commit::BackoffTable;
use crate::commit::NewTask;
use crate::error::{Error, Result};
use crate::events::Notify;
use crate::extras::{Inserted, LimitStatus, ScheduleInfo, TaskExtras};
use crate::inspect::{ConsistencyReport, ListFilter, Page, RecoveryReport};
use crate::log::LogEntry;
use crate::retry::JitterSource;
use crate::rules::limit::{Limit, LimitScope};
use crate::store::QueueSet;
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

mod committer;
#[doc(hidden)]
pub mod harness;
mod node;
mod ops;
mod pool;
mod rescue;
mod rows;
mod rules;
pub(crate) mod schema;

pub use schema::{MigrateReport, SCHEMA_VERSION};

/// How other processes tell whether this one is alive (see the crate's `ARCHITECTURE.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The default: the node's session holds a session-level advisory lock on its node row. A
    /// node is dead as soon as its lock can be taken (its session ended: process killed,
    /// connection cut, `pg_terminate_backend`). A node whose session lives on but whose
    /// heartbeat is older than `dead_after` (a stopped or wedged process) has its session
    /// terminated by the rescuer, which makes it dead the same way: never rescued while it
    /// can still act.
    SessionLock,
    /// For transaction-mode poolers (PgBouncer and the like), which do not keep session state:
    /// a node is dead when its heartbeat is older than `dead_after`. A live node's
    /// heartbeat thread refreshes it every `heartbeat_interval`, so `dead_after` must exceed
    /// that by the longest pause a live process may have; a node that finds its row gone
    /// stops claiming.
    Heartbeat,
}

/// Options of the PostgreSQL backend.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// The schema holding the queue's tables (created by migration). Default `"omniq"`.
    pub schema: String,
    /// Connections for transitions and reads (default 4). The node session and the notifier
    /// use one more each.
    pub pool_size: usize,
    /// How liveness is decided (default [`Liveness::SessionLock`]).
    pub liveness: Liveness,
    /// How often the node's heartbeat is written (default 1 s).
    pub heartbeat_interval: Duration,
    /// A heartbeat older than this marks a node dead (heartbeat mode) or wedged (session-lock
    /// mode). Default 30 s.
    pub dead_after: Duration,
    /// How often this process looks for dead nodes' executions (default 1 s): an orphan is
    /// rescued within `rescue_interval` of its node's session ending (session-lock mode), or of
    /// its heartbeat passing `dead_after` (heartbeat mode).
    pub rescue_interval: Duration,
    /// Fallback poll when no notification arrives (default 5 s).
    pub poll_interval: Duration,
    /// At most one `NOTIFY` per queue per this interval (default 20 ms).
    pub notify_interval: Duration,
    /// Terminal tasks older than this are deleted with their history by every node's retention
    /// pass (default 7 days; `None` keeps everything).
    pub retention: Option<Duration>,
    /// Migrate the schema at connect when it is older than this build (default true). With
    /// `false`, an older schema is refused: run `omniq migrate` first.
    pub auto_migrate: bool,
    /// Bound on connecting and on waiting for a free pooled connection (default 10 s).
    pub connect_timeout: Duration,
    /// Open for reading only (default false), as `omniq list`, `show`, `stats`... do: the
    /// process registers no node, runs no rescue, retention, heartbeat or committer, never
    /// migrates (an older schema is [`Error::SchemaTooOld`]), and its connections are
    /// `default_transaction_read_only`, so nothing it does writes to the database. Every
    /// transition is refused.
    pub read_only: bool,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            schema: "omniq".into(),
            pool_size: 4,
            liveness: Liveness::SessionLock,
            heartbeat_interval: Duration::from_secs(1),
            dead_after: Duration::from_secs(30),
            rescue_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(5),
            notify_interval: Duration::from_millis(20),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            auto_migrate: true,
            connect_timeout: Duration::from_secs(10),
            read_only: false,
        }
    }
}

/// Where the queue lives: connection settings, database and schema.
#[derive(Clone)]
pub(crate) struct Target {
    pub config: postgres::Config,
    pub database: String,
    pub schema: String,
    /// Every connection refuses writes (`default_transaction_read_only`).
    pub read_only: bool,
}

impl Target {
    pub(crate) fn parse(url: &str, schema: &str, connect_timeout: Duration) -> Result<Target> {
        let mut config = postgres::Config::from_str(url).map_err(|e| Error::Invalid {
            what: "PostgreSQL connection string",
            reason: e.to_string(),
        })?;
        if schema.is_empty() || schema.len() > 63 {
            return Err(Error::Invalid {
                what: "PostgreSQL schema name",
                reason: format!("{schema:?} must be 1 to 63 bytes long"),
            });
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        config.application_name("omniq");
        let database = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("(default)")
            .to_string();
        Ok(Target {
            config,
            database,
            schema: schema.to_string(),
            read_only: false,
        })
    }

    /// `database/schema`, for messages.
    pub(crate) fn label(&self) -> String {
        format!("{}/{}", self.database, self.schema)
    }

    /// The LISTEN/NOTIFY channel of this schema.
    pub(crate) fn channel(&self) -> String {
        format!("omniq:{}", self.schema)
    }

    /// A new connection whose `search_path` is the schema, with synchronous commits.
    pub(crate) fn connect(&self) -> Result<postgres::Client> {
        let mut client = self
            .config
            .connect(postgres::NoTls)
            .map_err(pg_error(self, "connect"))?;
        client
            .batch_execute(&format!(
                "SET search_path TO {}; SET synchronous_commit TO on; \
                 SET default_transaction_read_only TO {}",
                quote_ident(&self.schema),
                if self.read_only { "on" } else { "off" }
            ))
            .map_err(pg_error(self, "set up the session"))?;
        Ok(client)
    }
}

/// `"name"`, quoted for SQL.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Maps a driver error to [`Error::Storage`] naming the database, the schema and the step.
pub(crate) fn pg_error<'a>(
    target: &'a Target,
    what: &'a str,
) -> impl Fn(postgres::Error) -> Error + 'a {
    move |e| {
        Error::Storage(format!(
            "PostgreSQL {}: cannot {what}: {}",
            target.label(),
            describe(&e)
        ))
    }
}

pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// Applies the schema migrations to `options.schema` of the database at `url`.
pub fn migrate(url: &str, options: &PgOptions) -> Result<MigrateReport> {
    let target = Target::parse(url, &options.schema, options.connect_timeout)?;
    let mut client = target.connect()?;
    schema::migrate(&mut client, &target)
}

/// The version of the schema `options.schema` of the database at `url`: `0` when it holds no
/// omniq queue (the schema or its tables do not exist). Reads only; creates nothing.
pub fn schema_version(url: &str, options: &PgOptions) -> Result<u32> {
    let target = Target::parse(url, &options.schema, options.connect_timeout)?;
    let mut client = target.connect()?;
    schema::version(&mut client, &target)
}

/// State shared by the backend's callers and its threads.
pub(crate) struct Shared {
    pub target: Target,
    pub options: PgOptions,
    pub pool: pool::Pool,
    pub notify: Arc<Notify>,
    pub clock: Arc<dyn Clock>,
    pub jitter: Mutex<Box<dyn JitterSource>>,
    pub backoff: BackoffTable,
    /// This process's node id.
    pub node: u64,
    /// The node's session process id on the server (what `pg_terminate_backend` takes).
    pub session_pid: i32,
    /// Why the node's session was lost, once it was.
    pub lost: Mutex<Option<String>>,
    pub stopping: AtomicBool,
    /// The paused queues as last read (what `paused()` answers if the database cannot be read).
    pub paused: Mutex<BTreeSet<String>>,
    /// Queues to `NOTIFY` about (sent by the notifier thread, throttled).
    pub to_notify: crossbeam_channel::Sender<node::Signal>,
    /// Transactions the committer has committed (each holds one or more submissions).
    pub transactions: AtomicU64,
    /// The earliest next schedule tick as last read (ms; `u64::MAX`: none; 0: not read yet).
    pub next_tick: AtomicU64,
    /// When the schedules were last read (`tick` reads them again after `poll_interval`, to
    /// see other processes' changes).
    pub ticks_read: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    pub(crate) fn session_lost(&self) -> Option<Error> {
        self.lost.lock().as_ref().map(|reason| Error::SessionLost {
            schema: self.target.label(),
            node: self.node,
            reason: reason.clone(),
        })
    }

    pub(crate) fn mark_lost(&self, reason: String) {
        let mut lost = self.lost.lock();
        if lost.is_none() {
            tracing::error!(node = self.node, schema = %self.target.label(), %reason, "lost the PostgreSQL session: no more claims");
            *lost = Some(reason);
        }
        drop(lost);
        // Dispatchers try to claim, and learn.
        self.notify.wake_all();
    }
}

/// The PostgreSQL implementation of [`Backend`].
pub(crate) struct PgBackend {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Where `submit` queues work for the committer thread (`None` once shut down).
    committer: Mutex<Option<(crossbeam_channel::Sender<ops::Submission>, JoinHandle<()>)>>,
}

impl PgBackend {
    /// Connects (migrating the schema if allowed), registers this process as a node, and starts
    /// its session thread (listen, heartbeat, rescue, retention) and notifier thread.
    pub(crate) fn connect(
        url: &str,
        options: PgOptions,
        notify: Arc<Notify>,
        clock: Arc<dyn Clock>,
        jitter: Box<dyn JitterSource>,
        backoff: BackoffTable,
    ) -> Result<PgBackend> {
        let mut target = Target::parse(url, &options.schema, options.connect_timeout)?;
        target.read_only = options.read_only;
        let mut session = target.connect()?;
        let found = schema::version(&mut session, &target)?;
        if found > SCHEMA_VERSION {
            return Err(schema::too_new(&target, found));
        }
        if found < SCHEMA_VERSION {
            if !options.auto_migrate || options.read_only {
                return Err(schema::too_old(&target, found));
            }
            schema::migrate(&mut session, &target)?;
        }
        if options.read_only {
            return Self::reader(target, options, notify, clock, jitter, backoff);
        }
        let (node, session_pid) = node::register(&mut session, &target, options.liveness)?;
        let pool = pool::Pool::new(target.clone(), options.pool_size, options.connect_timeout);
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            target,
            options,
            pool,
            notify,
            clock,
            jitter: Mutex::new(jitter),
            backoff,
            node,
            session_pid,
            lost: Mutex::new(None),
            stopping: AtomicBool::new(false),
            paused: Mutex::new(BTreeSet::new()),
            to_notify: tx,
            transactions: AtomicU64::new(0),
            next_tick: AtomicU64::new(0),
            ticks_read: Mutex::new(None),
        });
        {
            let mut conn = shared.pool.get()?;
            let concurrency = rules::has_concurrency(&shared, &mut *conn)?;
            shared.notify.set_wake_on_exit(concurrency);
        }
        let threads = node::spawn(&shared, session, rx)?;
        let (submit_tx, submit_rx) = crossbeam_channel::unbounded();
        let sh = shared.clone();
        let committer = std::thread::Builder::new()
            .name("omniq-pg-committer".into())
            .spawn(move || committer::run(&sh, submit_rx));
        let backend = PgBackend {
            shared,
            threads: Mutex::new(threads),
            committer: Mutex::new(None),
        };
        let committer = committer.map_err(|e| {
            Error::Storage(format!("cannot start the PostgreSQL committer thread: {e}"))
        })?;
        *backend.committer.lock() = Some((submit_tx, committer));
        Ok(backend)
    }

    /// A read-only backend: a pool and nothing else (no node row, no threads).
    fn reader(
        target: Target,
        options: PgOptions,
        notify: Arc<Notify>,
        clock: Arc<dyn Clock>,
        jitter: Box<dyn JitterSource>,
        backoff: BackoffTable,
    ) -> Result<PgBackend> {
        let pool = pool::Pool::new(target.clone(), options.pool_size, options.connect_timeout);
        // Nobody listens: signals are dropped (a reader changes nothing to signal).
        let (tx, _) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            target,
            options,
            pool,
            notify,
            clock,
            jitter: Mutex::new(jitter),
            backoff,
            node: 0,
            session_pid: 0,
            lost: Mutex::new(None),
            stopping: AtomicBool::new(false),
            paused: Mutex::new(BTreeSet::new()),
            to_notify: tx,
            transactions: AtomicU64::new(0),
            next_tick: AtomicU64::new(0),
            ticks_read: Mutex::new(None),
        });
        Ok(PgBackend {
            shared,
            threads: Mutex::new(Vec::new()),
            committer: Mutex::new(None),
        })
    }

    /// Refuses a transition of a read-only backend.
    fn writable(&self) -> Result<()> {
        if self.shared.options.read_only {
            return Err(Error::Invalid {
                what: "operation",
                reason: format!(
                    "PostgreSQL {} is open read-only: it changes nothing",
                    self.shared.target.label()
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn node_id(&self) -> u64 {
        self.shared.node
    }

    pub(crate) fn session_pid(&self) -> i32 {
        self.shared.session_pid
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.shared.lost.lock().is_some()
    }

    /// Transactions committed by the committer thread so far.
    pub(crate) fn transactions(&self) -> u64 {
        self.shared.transactions.load(Ordering::Relaxed)
    }

    /// Stops taking submissions and waits until the committer has committed (and answered)
    /// every one already queued.
    fn stop_committer(&self) {
        let committer = self.committer.lock().take();
        if let Some((tx, thread)) = committer {
            drop(tx);
            let _ = thread.join();
        }
    }

    fn stop_threads(&self) {
        // What was submitted commits while the node is still registered and notifying.
        self.stop_committer();
        let threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        node::wake_session(&self.shared);
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl Backend for PgBackend {
    fn insert(&self, tasks: Vec<TaskInfo>) -> Result<()> {
        self.writable()?;
        ops::insert(&self.shared, tasks)
    }

    fn insert_new(&self, tasks: Vec<NewTask>) -> Result<Vec<Inserted>> {
        self.writable()?;
        if tasks.iter().all(|t| t.extras.is_none()) {
            let out = tasks
                .iter()
                .map(|t| Inserted {
                    id: t.task.id,
                    duplicate: false,
                })
                .collect();
            ops::insert(&self.shared, tasks.into_iter().map(|t| t.task).collect())?;
            return Ok(out);
        }
        rules::insert_new(&self.shared, tasks)
    }

    fn set_limit(&self, scope: LimitScope, limit: Option<Limit>) -> Result<()> {
        self.writable()?;
        rules::set_limit(&self.shared, scope, limit)
    }

    fn limits(&self, now: Timestamp) -> Result<Vec<LimitStatus>> {
        rules::limits(&self.shared, now)
    }

    fn put_schedule(&self, info: ScheduleInfo) -> Result<bool> {
        self.writable()?;
        rules::put_schedule(&self.shared, info)
    }

    fn pause_schedule(&self, name: &str, paused: bool) -> Result<()> {
        self.writable()?;
        rules::pause_schedule(&self.shared, name, paused)
    }

    fn remove_schedule(&self, name: &str) -> Result<bool> {
        self.writable()?;
        rules::remove_schedule(&self.shared, name)
    }

    fn tick(&self, now: Timestamp) -> Result<Vec<TaskId>> {
        if self.shared.options.read_only {
            // A reader fires nothing (a worker pool on it would find nothing to claim either).
            return Ok(Vec::new());
        }
        rules::tick(&self.shared, now)
    }

    fn next_tick(&self) -> Option<Timestamp> {
        rules::next_tick(&self.shared)
    }

    fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        rules::schedules(&self.shared)
    }

    fn extras(&self, id: TaskId) -> Result<Option<TaskExtras>> {
        rules::extras(&self.shared, id)
    }

    /// Queues the submission for the committer thread and returns; the replies arrive on
    /// the requests' channels after the group's `COMMIT` (see `committer.rs`).
    fn submit(&self, finishes: Vec<FinishRequest>, claim: Option<ClaimRequest>) -> Result<()> {
        self.writable()?;
        let committer = self.committer.lock();
        let (tx, _) = committer.as_ref().ok_or(Error::Closed)?;
        tx.send(ops::Submission { finishes, claim })
            .map_err(|_| Error::Closed)
    }

    fn cancel(&self, id: TaskId) -> Result<TaskInfo> {
        self.writable()?;
        ops::cancel(&self.shared, id)
    }

    fn retry(&self, id: TaskId) -> Result<TaskInfo> {
        self.writable()?;
        ops::retry(&self.shared, id)
    }

    fn purge(&self, cutoff: Timestamp, limit: usize) -> Result<usize> {
        self.writable()?;
        ops::purge(&self.shared, cutoff, limit)
    }

    fn rescue(&self) -> Result<RecoveryReport> {
        if self.shared.options.read_only {
            return Ok(RecoveryReport::default());
        }
        rescue::rescue(&self.shared)
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        self.writable()?;
        ops::set_paused(&self.shared, queue, paused)?;
        let mut cache = self.shared.paused.lock();
        if paused {
            cache.insert(queue.to_string());
        } else {
            cache.remove(queue);
        }
        Ok(())
    }

    fn paused(&self) -> BTreeSet<String> {
        // Read where other processes pause and resume too; if the database cannot be
        // reached, the last set read is the best answer there is.
        match ops::paused(&self.shared) {
            Ok(set) => {
                *self.shared.paused.lock() = set.clone();
                set
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the paused queues; using the last known set");
                self.shared.paused.lock().clone()
            }
        }
    }

    fn get(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        ops::get(&self.shared, id)
    }

    fn list(&self, filter: &ListFilter) -> Result<Page> {
        ops::list(&self.shared, filter)
    }

    fn history(&self, id: TaskId) -> Result<Vec<LogEntry>> {
        ops::history(&self.shared, id)
    }

    fn counts(&self) -> Result<BTreeMap<(String, Status), u64>> {
        ops::counts(&self.shared)
    }

    fn due_summary(&self, queues: &QueueSet, now: Timestamp, limit: usize) -> Result<DueSummary> {
        ops::due_summary(&self.shared, queues, now, limit)
    }

    fn finished_before(&self, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
        ops::finished_before(&self.shared, cutoff, limit)
    }

    fn check(&self) -> Result<ConsistencyReport> {
        ops::check(&self.shared)
    }

    fn size_on_disk(&self) -> Result<u64> {
        ops::size_on_disk(&self.shared)
    }

    fn compact(&self) -> Result<crate::inspect::CompactReport> {
        Ok(crate::inspect::CompactReport {
            note: Some(
                "nothing to do on PostgreSQL: autovacuum reclaims the space of deleted rows".into(),
            ),
            ..Default::default()
        })
    }

    fn sync(&self) -> Result<()> {
        // Every write was answered after its COMMIT (synchronous_commit = on).
        Ok(())
    }

    fn shut_down(&self) -> Result<()> {
        self.stop_threads();
        if self.shared.options.read_only {
            return Ok(());
        }
        node::unregister(&self.shared)
    }
}
