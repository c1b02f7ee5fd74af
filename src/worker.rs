//! The worker pool: N OS threads fed by one dispatcher through a crossbeam channel.
//!
//! The dispatcher claims as many tasks as there are free workers (plus up to
//! [`claim_ahead`](WorkerPoolBuilder::claim_ahead) more, default none), in order (priority,
//! then due time, then enqueue order), durably before any handler runs. On a local directory
//! it does so through a standing claim: it grants its free slots to the commit writer, which
//! fills them in the very commit that makes work due (an enqueue's, an outcome's), so a task
//! enqueued while a worker idles costs no commit of its own to claim. Elsewhere (PostgreSQL)
//! it sends a claim per batch, together with the outcomes workers handed it. When nothing is due it blocks until new work commits,
//! the earliest `next_run_at` or running deadline arrives, a worker frees up, or `stop()` is
//! called: no fixed-interval polling, so an idle pool uses no CPU.
//!
//! Timeouts: when an execution outlives its deadline the dispatcher closes the attempt in the
//! store (a `"timeout"` failure), flags the handler's context as cancelled, and starts a
//! replacement thread so the pool keeps its concurrency. The stuck thread exits once its handler
//! returns; its late result is rejected by lease fencing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use parking_lot::Mutex;

use crate::backend::{ClaimRequest, FinishRequest, StandingLink};
use crate::commit::{Finished, Outcome};
use crate::error::{Error, Result};
use crate::handler::{
    self, TaskContext, EXEC_CANCEL_REQUESTED, EXEC_DONE, EXEC_RUNNING, EXEC_TIMED_OUT,
};
use crate::queue::Queue;
use crate::shutdown::{self, Listener, ShutdownHandle, Signal};
use crate::store::QueueSet;
use crate::task::{TaskError, TaskId, TaskInfo, Timestamp};

/// What a worker that does not wait for its outcome's commit leaves to the acknowledgement
/// thread (claim-ahead mode): the commit's reply, and what to do once it arrives.
struct Ack {
    id: TaskId,
    lease: u64,
    attempt: u32,
    ctx: Arc<TaskContext>,
    /// For the direct fallback if the dispatcher exits without sending the outcome.
    outcome: Outcome,
    reply: Receiver<Result<Finished>>,
}

/// Configures a worker pool. Start from [`Queue::workers`].
///
/// ```no_run
/// # fn demo(queue: omniq::Queue) -> omniq::Result<()> {
/// use std::time::Duration;
/// let pool = queue
///     .workers()
///     .concurrency(8)
///     .queues(["default", "emails"])
///     .grace_period(Duration::from_secs(30))
///     .start()?;
/// // ... later
/// let report = pool.stop();
/// println!("{} executions abandoned to recovery", report.abandoned);
/// # Ok(()) }
/// ```
pub struct WorkerPoolBuilder {
    queue: Queue,
    concurrency: usize,
    queues: QueueSet,
    grace: Duration,
    claim_ahead: usize,
}

impl WorkerPoolBuilder {
    pub(crate) fn new(queue: Queue) -> WorkerPoolBuilder {
        WorkerPoolBuilder {
            queue,
            concurrency: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(4)
                .max(2),
            queues: QueueSet::All,
            grace: Duration::from_secs(30),
            claim_ahead: 0,
        }
    }

    /// Number of worker threads (default: the number of CPUs, at least 2).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Serve only these queues (default: all queues).
    pub fn queues<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = QueueSet::Named(names.into_iter().map(Into::into).collect());
        self
    }

    /// How long `stop()` waits for running handlers before giving up on them (default 30 s).
    pub fn grace_period(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// Claim up to `n` tasks beyond the idle workers, and let a worker take its next task
    /// without waiting for its last outcome's commit (default 0: claim only for idle workers,
    /// and each worker waits for its outcome to be durable).
    ///
    /// Worth it where a commit is slow next to a handler (PostgreSQL: a commit is a WAL flush
    /// and several round trips, so with 0 a pool completes at most `concurrency` tasks per
    /// commit); the claimed tasks and the outcomes of many workers then share each commit.
    /// What changes, exactly:
    ///
    /// - A task claimed ahead is `Running` (its attempt charged, as at every claim) while it
    ///   waits for a worker, so `max_retries + 1` executions at most still holds. Its timeout
    ///   counts from when a worker takes it. It counts as running for concurrency limits, and
    ///   its claim as a start for rate limits.
    /// - On a graceful stop ([`WorkerPool::stop`], a signal, a [`ShutdownHandle`]) the tasks
    ///   claimed ahead and not started are released: back to `Pending`, due as before, the
    ///   attempt given back, with a [`Cause::Released`](crate::Cause::Released) log entry
    ///   (fenced by the claim's lease like every finish).
    /// - If the process dies, they are recovered like the running ones: each is charged one
    ///   `"crash"` failure (an attempt used without running). So is a task whose handler
    ///   returned but whose outcome was not yet committed (as with 0).
    /// - Acknowledgement is unchanged: [`Queue::wait`], subscriptions and the task's status
    ///   see an outcome only once it is durable. [`Queue::cancel_running`] on a task claimed
    ///   ahead stops it from starting; it ends `Cancelled`.
    pub fn claim_ahead(mut self, n: usize) -> Self {
        self.claim_ahead = n;
        self
    }

    /// Starts the dispatcher and the worker threads.
    pub fn start(self) -> Result<WorkerPool> {
        if let QueueSet::Named(names) = &self.queues {
            for n in names {
                crate::queue::validate_name("queue name", n)?;
            }
        }
        let inner = &self.queue.inner;
        let wake = inner.notify.add_waker();
        let weak = Arc::downgrade(&inner.notify);
        inner.clock.on_change(Box::new(move || {
            if let Some(n) = weak.upgrade() {
                n.wake_all();
            }
        }));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let cancel_all = Arc::new(AtomicBool::new(false));
        let (claim_tx, claim_rx) = crossbeam_channel::unbounded();
        let killed = Arc::new(AtomicBool::new(false));
        // With claim-ahead, workers hand their outcome's reply to this thread instead of
        // waiting for it.
        let (ack_tx, ack_thread) = if self.claim_ahead > 0 {
            let (tx, rx) = crossbeam_channel::unbounded::<Ack>();
            let queue = self.queue.clone();
            let killed = killed.clone();
            let h = std::thread::Builder::new()
                .name("omniq-acks".into())
                .spawn(move || ack_loop(queue, rx, killed))
                .map_err(|e| Error::Storage(format!("cannot start the ack thread: {e}")))?;
            (Some(tx), Some(h))
        } else {
            (None, None)
        };
        let mut d = Dispatcher {
            queue: self.queue.clone(),
            queues: self.queues,
            grace: self.grace,
            job_tx: Some(job_tx),
            job_rx,
            done_tx,
            done_rx,
            wake,
            stop_rx,
            cancel_all,
            idle: self.concurrency,
            ahead: self.claim_ahead,
            buffer: VecDeque::new(),
            ack_tx,
            ack_thread,
            killed: killed.clone(),
            running: HashMap::new(),
            threads: Vec::new(),
            outbox: Vec::new(),
            claim_tx,
            claim_rx,
            in_flight: VecDeque::new(),
            last_full: false,
            standing: None,
        };
        d.standing = inner.backend.stand(&d.queues)?.map(|link| StandingClaim {
            link,
            received: 0,
            poke: None,
            unsent_grant: false,
        });
        for _ in 0..self.concurrency {
            d.spawn_worker()?;
        }
        let handle = std::thread::Builder::new()
            .name("omniq-dispatcher".into())
            .spawn(move || d.run())
            .map_err(|e| Error::Storage(format!("cannot start the dispatcher: {e}")))?;
        Ok(WorkerPool {
            handle: ShutdownHandle::new(stop_tx),
            dispatcher: Some(handle),
            signals: Mutex::new(None),
            killed,
        })
    }
}

/// What [`WorkerPool::stop`] (or [`WorkerPool::wait`]) saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopReport {
    /// Executions still running when the grace period ran out. They stay `Running` in the store
    /// until they finish (if the queue is still open) or until the next open recovers them.
    pub abandoned: usize,
    /// The first `SIGINT` / `SIGTERM` the pool received while it listened to signals
    /// ([`WorkerPool::stop_on_signals`]), if any. A program usually exits with
    /// [`Signal::exit_code`] (130 or 143) when this is set.
    pub signal: Option<Signal>,
}

/// A running worker pool. Dropping it stops it gracefully, like [`stop`](WorkerPool::stop).
///
/// Three ways to end it: [`stop`](WorkerPool::stop) from the thread that owns it; a
/// [`ShutdownHandle`] from [`stopper`](WorkerPool::stopper) on any other thread; or `SIGINT` /
/// `SIGTERM` after [`stop_on_signals`](WorkerPool::stop_on_signals). Each is the same graceful
/// stop; [`wait`](WorkerPool::wait) blocks until one of them has happened and the pool drained.
pub struct WorkerPool {
    handle: ShutdownHandle,
    dispatcher: Option<JoinHandle<StopReport>>,
    /// Registered with the process's signal watcher while this pool listens to signals.
    signals: Mutex<Option<Listener>>,
    /// Set by [`WorkerPool::simulate_crash`].
    killed: Arc<AtomicBool>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("stopping", &self.handle.is_stopping())
            .field("stop_on_signals", &self.signals.lock().is_some())
            .finish()
    }
}

impl WorkerPool {
    /// Stops claiming, waits for running handlers to finish (up to the grace period), then
    /// returns.
    pub fn stop(mut self) -> StopReport {
        self.shutdown(true)
    }

    /// Makes the first `SIGINT` or `SIGTERM` stop this pool gracefully (what
    /// [`stop`](WorkerPool::stop) does), and a second one end the process at once. See
    /// [`shutdown`](crate::shutdown) for exactly what happens, the exit codes, and what a
    /// program with its own signal handling should do instead.
    ///
    /// The process's handlers are installed on the first call (from any pool) and stay; calling
    /// this again on the same pool does nothing. Once the pool has stopped, the signals end
    /// the process again as they do by default (unless another pool still listens). Errors
    /// ([`Error::Signals`]) only if the handlers cannot be installed, or on a platform without
    /// Unix signals.
    ///
    /// ```no_run
    /// # fn demo(queue: omniq::Queue) -> omniq::Result<()> {
    /// let pool = queue.workers().start()?;
    /// pool.stop_on_signals()?;
    /// let report = pool.wait(); // until Ctrl-C / SIGTERM, then the graceful drain
    /// let code = report.signal.map_or(0, |s| i32::from(s.exit_code())); // 130 or 143
    /// # Ok(()) }
    /// ```
    pub fn stop_on_signals(&self) -> Result<()> {
        let mut slot = self.signals.lock();
        if slot.is_none() && self.dispatcher.is_some() {
            *slot = Some(shutdown::listen(&self.handle)?);
        }
        Ok(())
    }

    /// For tests of crash recovery: the pool ends as if its process died at this instant. No
    /// further write is made: claimed tasks (running or claimed ahead) stay `Running`,
    /// outcomes not yet committed are dropped, nothing is released. Running handlers see
    /// [`TaskContext::is_cancelled`]; this returns once every thread of the pool has exited
    /// (so a handler that never returns blocks it). Not for production use.
    #[doc(hidden)]
    pub fn simulate_crash(mut self) {
        self.killed.store(true, Ordering::Release);
        self.shutdown(true);
    }

    /// A handle that stops this pool gracefully from any thread (a program's own signal
    /// handling, an admin command, a test). Cloneable; see [`ShutdownHandle`].
    pub fn stopper(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Blocks until the pool is stopped (by a [`ShutdownHandle`] or a signal after
    /// [`stop_on_signals`](WorkerPool::stop_on_signals)) and has drained, then returns what
    /// [`stop`](WorkerPool::stop) would. Nothing else ends the wait: without signals or a
    /// handle, it never returns.
    pub fn wait(mut self) -> StopReport {
        self.shutdown(false)
    }

    fn shutdown(&mut self, request: bool) -> StopReport {
        if request {
            self.handle.stop();
        }
        let mut report = match self.dispatcher.take() {
            Some(h) => h.join().unwrap_or_default(),
            None => StopReport::default(),
        };
        // Drained: from now on the signals do what they do by default (unless another pool
        // listens).
        self.signals.lock().take();
        report.signal = self.handle.signal();
        report
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

struct Job {
    task: TaskInfo,
    ctx: Arc<TaskContext>,
}

/// A worker's handler returned in time: its slot is free, and `finish` (whose reply goes
/// straight to the worker) is for the dispatcher to commit together with its next claim.
struct Done {
    id: TaskId,
    finish: FinishRequest,
}

struct Running {
    lease: u64,
    deadline: Option<Timestamp>,
    timeout: Option<Duration>,
    ctx: Arc<TaskContext>,
}

struct Dispatcher {
    queue: Queue,
    queues: QueueSet,
    grace: Duration,
    job_tx: Option<Sender<Job>>,
    job_rx: Receiver<Job>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    wake: Receiver<()>,
    stop_rx: Receiver<()>,
    cancel_all: Arc<AtomicBool>,
    /// Workers without a job.
    idle: usize,
    /// How many tasks to claim beyond the idle workers ([`WorkerPoolBuilder::claim_ahead`]).
    ahead: usize,
    /// Tasks claimed and not yet handed to a worker (claim-ahead), oldest first, each with the
    /// context registered for it (so a cancel request can reach it before it starts).
    buffer: VecDeque<(TaskInfo, Arc<TaskContext>)>,
    /// Claim-ahead mode: where workers send their outcomes' replies, and the thread that
    /// takes them.
    ack_tx: Option<Sender<Ack>>,
    ack_thread: Option<JoinHandle<()>>,
    /// The pool ends as if its process died ([`WorkerPool::simulate_crash`]).
    killed: Arc<AtomicBool>,
    running: HashMap<TaskId, Running>,
    threads: Vec<JoinHandle<()>>,
    /// Workers' outcomes not yet sent to the backend: they ride with the next claim (one
    /// commit for both) and are flushed on their own before the dispatcher blocks.
    outbox: Vec<FinishRequest>,
    /// Claims are asynchronous: their replies arrive here, in the order they were sent, while
    /// the dispatcher goes on collecting outcomes and sending further claims. Several claims in
    /// flight let the commit pipeline put more work behind each fsync.
    claim_tx: Sender<Result<Vec<TaskInfo>>>,
    claim_rx: Receiver<Result<Vec<TaskInfo>>>,
    /// How many tasks each claim in flight asked for (slots are reserved for them), oldest
    /// first.
    in_flight: VecDeque<usize>,
    /// The last claim's reply had every task it asked for: more are probably due. With
    /// claim-ahead the next claim then skips the due count (a round trip on PostgreSQL) and
    /// asks for all it wants; a short reply brings the count back.
    last_full: bool,
    /// The backend's standing claim for this pool, if it has them (sled): free slots are
    /// granted to it rather than asked for, and the writer fills them in the very commit that
    /// makes work due (an enqueue's, an outcome's), so no claim needs a commit of its own.
    standing: Option<StandingClaim>,
}

/// The pool's side of a standing claim ([`Backend::stand`](crate::backend::Backend::stand)).
struct StandingClaim {
    link: StandingLink,
    /// Tasks received from it so far.
    received: u64,
    /// A poke in flight: work came due by the clock, and the writer was asked to look.
    poke: Option<Receiver<Result<()>>>,
    /// Slots were granted and nothing was sent since, so no group is sure to look at them.
    unsent_grant: bool,
}

impl StandingClaim {
    /// Slots granted and not yet filled (or filled, with the tasks on their way).
    fn outstanding(&self) -> usize {
        let granted = self.link.shared.granted.load(Ordering::Acquire);
        usize::try_from(granted.saturating_sub(self.received)).unwrap_or(usize::MAX)
    }
}

impl Dispatcher {
    fn spawn_worker(&mut self) -> Result<()> {
        let jobs = self.job_rx.clone();
        let done = self.done_tx.clone();
        let queue = self.queue.clone();
        let acks = self.ack_tx.clone();
        let killed = self.killed.clone();
        let h = std::thread::Builder::new()
            .name("omniq-worker".into())
            .spawn(move || worker_loop(queue, jobs, done, acks, killed))
            .map_err(|e| Error::Storage(format!("cannot start a worker thread: {e}")))?;
        self.threads.retain(|t| !t.is_finished());
        self.threads.push(h);
        Ok(())
    }

    fn run(mut self) -> StopReport {
        let mut stopping: Option<Instant> = None;
        loop {
            if self.killed.load(Ordering::Acquire) {
                return self.crash();
            }
            // `select!` picks among ready channels at random; a pending stop must win over a
            // worker's completion, or stop() could be followed by one more claim.
            if stopping.is_none() && self.stop_rx.try_recv().is_ok() {
                stopping = Some(Instant::now());
            }
            if stopping.is_some() {
                // No more claims for this pool; tasks claimed ahead and not started go back,
                // uncharged.
                self.sit();
                self.release_buffer();
            }
            if stopping.is_none() {
                // Schedule ticks owed now become tasks first (a no-op until the next tick).
                if let Err(e) = self.queue.inner.backend.tick(self.queue.now()) {
                    tracing::error!(error = %e, "firing schedule ticks failed; retrying when woken");
                }
                if let Err(e) = self.request_claims() {
                    tracing::error!(error = %e, "claiming failed; retrying when woken");
                }
            }
            self.flush_outbox();
            self.expire_deadlines();
            if let Some(since) = stopping {
                if self.running.is_empty() && self.in_flight.is_empty() {
                    break;
                }
                if since.elapsed() >= self.grace {
                    self.cancel_all.store(true, Ordering::Release);
                    break;
                }
            }
            let timeout = self.sleep_for(stopping);
            let (standing_rx, poke_rx) = match &self.standing {
                Some(s) => (
                    s.link.tasks.clone(),
                    s.poke.clone().unwrap_or_else(crossbeam_channel::never),
                ),
                None => (crossbeam_channel::never(), crossbeam_channel::never()),
            };
            select! {
                recv(self.done_rx) -> done => {
                    if let Ok(done) = done {
                        self.finished(done);
                    }
                    // Take every other completion too, so the next claim is one batch.
                    while let Ok(done) = self.done_rx.try_recv() {
                        self.finished(done);
                    }
                }
                recv(self.claim_rx) -> claimed => {
                    if let Ok(claimed) = claimed {
                        self.claimed(claimed);
                    }
                }
                recv(standing_rx) -> claimed => {
                    match claimed {
                        Ok(Ok(tasks)) => {
                            if let Some(s) = &mut self.standing {
                                s.received += tasks.len() as u64;
                            }
                            self.take_claimed(tasks);
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "a standing claim's commit failed"),
                        Err(_) => {
                            tracing::error!("the backend dropped this pool's standing claim; claiming on request");
                            self.standing = None;
                        }
                    }
                }
                recv(poke_rx) -> _ => {
                    if let Some(s) = &mut self.standing {
                        s.poke = None;
                    }
                }
                recv(self.wake) -> _ => {}
                recv(self.stop_rx) -> _ => {
                    stopping.get_or_insert_with(Instant::now);
                }
                default(timeout) => {}
            }
        }
        // Claims still in flight after the grace period: their tasks are RUNNING with nobody to
        // run them, exactly like abandoned executions (the next open recovers them).
        let abandoned = self.running.len() + self.asked();
        // Idle workers exit when the job channel closes; stuck ones are detached.
        self.job_tx.take();
        self.ack_tx.take();
        if abandoned == 0 {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
            // Every outcome handed to the acknowledgement thread is committed (or recorded
            // directly) before stop() returns, as when workers wait for their own.
            if let Some(t) = self.ack_thread.take() {
                let _ = t.join();
            }
        }
        if abandoned > 0 {
            tracing::warn!(abandoned, "grace period over: executions left running; the next open recovers any that do not finish");
        }
        StopReport {
            abandoned,
            signal: None,
        }
    }

    /// [`WorkerPool::simulate_crash`]: end without another write, as a dead process would.
    fn crash(mut self) -> StopReport {
        self.cancel_all.store(true, Ordering::Release);
        if let Some(s) = &self.standing {
            s.link.shared.closed.store(true, Ordering::Release);
        }
        self.outbox.clear();
        let abandoned = self.running.len() + self.asked() + self.buffer.len();
        for (_, ctx) in self.buffer.drain(..) {
            self.queue.inner.executions.remove(&ctx);
        }
        self.job_tx.take();
        self.ack_tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(t) = self.ack_thread.take() {
            let _ = t.join();
        }
        StopReport {
            abandoned,
            signal: None,
        }
    }

    fn finished(&mut self, done: Done) {
        if self.running.remove(&done.id).is_some() {
            self.idle += 1;
        }
        self.outbox.push(done.finish);
        self.hand_out();
    }

    /// How many more tasks to claim: idle workers plus the claim-ahead allowance, less what
    /// is buffered or asked for already.
    fn want(&self) -> usize {
        (self.idle + self.ahead)
            .saturating_sub(self.buffer.len() + self.asked() + self.outstanding())
    }

    /// Slots granted to the standing claim and not yet filled.
    fn outstanding(&self) -> usize {
        self.standing.as_ref().map_or(0, StandingClaim::outstanding)
    }

    /// Withdraws the standing claim (a stop): once the backend confirms, it claims nothing
    /// more for this pool. Tasks it claimed that have not arrived yet are waited for and
    /// handled like a claim in flight at a stop: started on idle workers (the stop waits for
    /// them), the rest buffered, so the stop releases them like tasks claimed ahead.
    fn sit(&mut self) {
        let Some(mut s) = self.standing.take() else {
            return;
        };
        let taken = match self.queue.inner.backend.sit(s.link.shared.id) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "could not withdraw the standing claim; tasks it took and this pool never saw are recovered at the next open");
                return;
            }
        };
        while s.received < taken {
            match s.link.tasks.recv() {
                Ok(Ok(tasks)) => {
                    s.received += tasks.len() as u64;
                    self.take_claimed(tasks);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a standing claim's commit failed");
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Gives buffered tasks to idle workers.
    fn hand_out(&mut self) {
        while self.idle > 0 {
            let Some((task, ctx)) = self.buffer.pop_front() else {
                break;
            };
            self.dispatch(task, Some(ctx));
        }
    }

    /// Graceful stop: every task claimed ahead and not started goes back to `Pending` with
    /// its attempt given back (fenced by its lease), or ends `Cancelled` if a cancel request
    /// reached it. Waits for the commit.
    fn release_buffer(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let mut finishes = Vec::with_capacity(self.buffer.len());
        let mut replies = Vec::with_capacity(self.buffer.len());
        let mut contexts = Vec::with_capacity(self.buffer.len());
        for (task, ctx) in self.buffer.drain(..) {
            let outcome = match ctx.state.compare_exchange(
                EXEC_RUNNING,
                EXEC_DONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => Outcome::Released,
                Err(_) => {
                    ctx.state.store(EXEC_DONE, Ordering::Release);
                    Outcome::Cancelled
                }
            };
            let (reply, rx) = crossbeam_channel::bounded(1);
            finishes.push(FinishRequest {
                id: task.id,
                lease: task.lease,
                outcome,
                reply,
            });
            replies.push((task.id, rx));
            contexts.push(ctx);
        }
        let n = finishes.len();
        match self.queue.inner.backend.submit(finishes, None) {
            Ok(()) => {
                for (id, rx) in replies {
                    match rx.recv() {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(task = %id, error = %e, "could not release a task claimed ahead; it stays RUNNING until recovery charges it a crash")
                        }
                        Err(_) => {
                            tracing::error!(task = %id, "the backend closed before releasing a task claimed ahead; recovery charges it a crash")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, tasks = n, "could not release tasks claimed ahead; they stay RUNNING until recovery charges each a crash")
            }
        }
        for ctx in contexts {
            self.queue.inner.executions.remove(&ctx);
        }
    }

    /// Sends outcomes that no claim took along. Their replies go to the workers.
    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let finishes = std::mem::take(&mut self.outbox);
        if let Some(s) = &mut self.standing {
            s.unsent_grant = false;
        }
        if let Err(e) = self.queue.inner.backend.submit_outcomes(finishes) {
            tracing::error!(error = %e, "could not send outcomes to the writer; their workers record them directly");
        }
    }

    /// How long to block: until the earliest due time or deadline; forever if neither. With a
    /// standing claim, due work its slots could take but no write will bring to the writer
    /// (it came due by the clock, or slots were granted after the last group) gets a poke.
    fn sleep_for(&mut self, stopping: Option<Instant>) -> Duration {
        let now = self.queue.now();
        let mut wake_at: Option<Timestamp> = None;
        let mut consider =
            |t: Timestamp| wake_at = Some(wake_at.map_or(t, |w: Timestamp| w.min(t)));
        for r in self.running.values() {
            if let Some(d) = r.deadline {
                consider(d);
            }
        }
        if stopping.is_none() {
            if let Some(t) = self.queue.inner.backend.next_tick() {
                consider(t);
            }
        }
        if stopping.is_none() && (self.want() > 0 || self.outstanding() > 0) {
            let asked = self.asked();
            if let Ok(due) = self
                .queue
                .inner
                .backend
                .due_summary(&self.queues, now, asked + 1)
            {
                match &mut self.standing {
                    Some(s) => {
                        // Due work with free slots, and no group is sure to look at them: the
                        // slots were granted with nothing sent after, or the writer has
                        // looked since the last grant (so the work came due by the clock).
                        let shared = &s.link.shared;
                        let looked = shared.seen.load(Ordering::Acquire)
                            >= shared.granted.load(Ordering::Acquire);
                        let unlooked = s.unsent_grant || looked;
                        if due.ready > 0 && shared.free() > 0 && unlooked && s.poke.is_none() {
                            s.unsent_grant = false;
                            match self.queue.inner.backend.poke() {
                                Ok(rx) => s.poke = Some(rx),
                                Err(e) => {
                                    tracing::error!(error = %e, "could not ask the writer to claim")
                                }
                            }
                        }
                    }
                    None if due.ready > asked => return Duration::ZERO,
                    None => {}
                }
                if let Some(w) = due.next_wake {
                    consider(w);
                }
            }
        }
        let mut sleep = match wake_at {
            Some(t) => t.since(now),
            None => Duration::from_secs(3600),
        };
        if let Some(since) = stopping {
            sleep = sleep.min(self.grace.saturating_sub(since.elapsed()));
        }
        sleep
    }

    /// Slots reserved by claims in flight.
    fn asked(&self) -> usize {
        self.in_flight.iter().sum()
    }

    /// Asks the backend to claim as many due tasks as there are free workers and claim-ahead
    /// slots (reserving them), together with any outcomes waiting in the outbox. Does not wait
    /// for the reply.
    fn request_claims(&mut self) -> Result<()> {
        let want = self.want();
        if let Some(s) = &mut self.standing {
            if want > 0 {
                // Before the outcomes that freed these slots are sent: their commit may fill
                // them.
                s.link
                    .shared
                    .granted
                    .fetch_add(want as u64, Ordering::AcqRel);
                s.unsent_grant = true;
            }
            return Ok(());
        }
        if want == 0 {
            return Ok(());
        }
        let now = self.queue.now();
        // Claims in flight will take the first of the due tasks (or already have): ask only for
        // what is due beyond them, so an idle queue costs no commits.
        let asked = self.asked();
        let n = if self.ahead > 0 && self.last_full {
            want
        } else {
            let due = self
                .queue
                .inner
                .backend
                .due_summary(&self.queues, now, asked + want)?;
            due.ready.saturating_sub(asked).min(want)
        };
        if n == 0 {
            return Ok(());
        }
        // Workers' outcomes go in the same commit as this claim.
        let finishes = std::mem::take(&mut self.outbox);
        self.queue.inner.backend.submit(
            finishes,
            Some(ClaimRequest {
                queues: self.queues.clone(),
                n,
                now,
                reply: self.claim_tx.clone(),
            }),
        )?;
        self.in_flight.push_back(n);
        Ok(())
    }

    /// A claim's reply: hand the claimed tasks to idle workers and buffer the rest (claim-ahead;
    /// released at once if the pool is stopping).
    fn claimed(&mut self, result: Result<Vec<TaskInfo>>) {
        let asked = self.in_flight.pop_front().unwrap_or_default();
        self.last_full = matches!(&result, Ok(tasks) if tasks.len() == asked && asked > 0);
        match result {
            Ok(tasks) => self.take_claimed(tasks),
            Err(e) => tracing::error!(error = %e, "a claim failed; retrying when woken"),
        }
    }

    /// Claimed tasks: the best go straight to idle workers (if none wait before them), the
    /// rest to the buffer (released at a stop). The buffered ones are registered first, so a cancel
    /// request can reach every task of a claim by the time any of its handlers runs.
    fn take_claimed(&mut self, mut tasks: Vec<TaskInfo>) {
        let direct = if self.buffer.is_empty() {
            self.idle.min(tasks.len())
        } else {
            0
        };
        for task in tasks.split_off(direct) {
            let ctx = Arc::new(TaskContext::new(
                &task,
                None,
                self.cancel_all.clone(),
                self.queue.downgrade(),
            ));
            self.queue.inner.executions.insert(ctx.clone());
            self.buffer.push_back((task, ctx));
        }
        for task in tasks {
            self.dispatch(task, None);
        }
    }

    /// Starts `task` on an idle worker. `buffered` is the context it was registered with while
    /// it waited (claim-ahead): its timeout counts from now, and a cancel request it received
    /// carries over.
    fn dispatch(&mut self, task: TaskInfo, buffered: Option<Arc<TaskContext>>) {
        let deadline = task.timeout().map(|t| match &buffered {
            None => task.started_at.unwrap_or_else(|| self.queue.now()).plus(t),
            Some(_) => self.queue.now().plus(t),
        });
        let mut ctx = TaskContext::new(
            &task,
            deadline,
            self.cancel_all.clone(),
            self.queue.downgrade(),
        );
        if let Some(b) = &buffered {
            ctx.state = b.state.clone();
        }
        let ctx = Arc::new(ctx);
        self.running.insert(
            task.id,
            Running {
                lease: task.lease,
                deadline,
                timeout: task.timeout(),
                ctx: ctx.clone(),
            },
        );
        self.idle -= 1;
        self.queue.inner.executions.insert(ctx.clone());
        if let Some(tx) = &self.job_tx {
            let _ = tx.send(Job { task, ctx });
        }
    }

    fn expire_deadlines(&mut self) {
        let now = self.queue.now();
        let expired: Vec<TaskId> = self
            .running
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let Some(r) = self.running.get(&id) else {
                continue;
            };
            // Whoever flips the state first decides: the worker (finished in time) or us. An
            // execution an operator asked to cancel ends `Cancelled` rather than timed out.
            let to_timed_out = |from: u8| {
                r.ctx.state.compare_exchange(
                    from,
                    EXEC_TIMED_OUT,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
            };
            let cancelled = match to_timed_out(EXEC_RUNNING) {
                Ok(_) => false,
                Err(EXEC_CANCEL_REQUESTED) if to_timed_out(EXEC_CANCEL_REQUESTED).is_ok() => true,
                Err(_) => continue,
            };
            let lease = r.lease;
            let limit = r.timeout.unwrap_or_default();
            let outcome = if cancelled {
                Outcome::Cancelled
            } else {
                Outcome::Failure(TaskError::transient(
                    "timeout",
                    format!(
                        "attempt {} exceeded its timeout of {limit:?}",
                        r.ctx.attempt()
                    ),
                ))
            };
            self.queue.inner.executions.remove(&r.ctx);
            let outcome = self.queue.inner.backend.finish(id, lease, outcome);
            if let Err(e) = outcome {
                tracing::error!(task = %id, error = %e, "could not record a timeout");
            }
            tracing::warn!(task = %id, "execution timed out; replacing its worker thread");
            self.running.remove(&id);
            self.idle += 1;
            if let Err(e) = self.spawn_worker() {
                tracing::error!(error = %e, "could not replace a timed-out worker; the pool runs one thread short");
                self.idle -= 1;
            }
            self.hand_out();
        }
    }
}

fn worker_loop(
    queue: Queue,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    acks: Option<Sender<Ack>>,
    killed: Arc<AtomicBool>,
) {
    for job in jobs {
        if killed.load(Ordering::Acquire) {
            // The pool "died" (a test's simulated crash): nothing more runs or is written.
            return;
        }
        let mut outcome = if job.ctx.state.load(Ordering::Acquire) == EXEC_CANCEL_REQUESTED {
            // Cancelled while it waited to start (claim-ahead): it never runs.
            Outcome::Cancelled
        } else {
            handler::execute(&queue.inner.registry, &job.task, &job.ctx)
        };
        if killed.load(Ordering::Acquire) {
            // The pool "died" (a test's simulated crash): nothing more is written.
            return;
        }
        let to_done = |from: u8| {
            job.ctx
                .state
                .compare_exchange(from, EXEC_DONE, Ordering::AcqRel, Ordering::Acquire)
        };
        let in_time = match to_done(EXEC_RUNNING) {
            Ok(_) => true,
            // An operator cancelled it while it ran: the attempt ends Cancelled, whatever it
            // returned (unless the timeout watchdog closed it first).
            Err(EXEC_CANCEL_REQUESTED) if to_done(EXEC_CANCEL_REQUESTED).is_ok() => {
                outcome = Outcome::Cancelled;
                true
            }
            Err(_) => false,
        };
        let id = job.task.id;
        let lease = job.task.lease;
        let direct = |outcome: Outcome| queue.inner.backend.finish(id, lease, outcome);
        let result = if in_time {
            // Hand the outcome to the dispatcher, which commits it in the same group as its next
            // claim, and wait until it is durable. Should the dispatcher exit without sending it
            // (stop() gave up on this execution), the reply channel closes unanswered and the
            // outcome is committed directly; lease fencing makes a repeat harmless.
            let (reply, reply_rx) = crossbeam_channel::bounded(1);
            let finish = FinishRequest {
                id,
                lease,
                outcome: outcome.clone(),
                reply,
            };
            let sent = done.send(Done { id, finish }).is_ok();
            if let (true, Some(acks)) = (sent, &acks) {
                // Claim-ahead: the acknowledgement thread waits for the commit; this worker
                // takes its next task now.
                let ack = Ack {
                    id,
                    lease,
                    attempt: job.task.attempts,
                    ctx: job.ctx.clone(),
                    outcome,
                    reply: reply_rx,
                };
                if let Err(e) = acks.send(ack) {
                    settle(&queue, e.0, &killed);
                }
                continue;
            }
            match sent.then(|| reply_rx.recv().ok()).flatten() {
                Some(r) => r,
                None => direct(outcome),
            }
        } else {
            direct(outcome)
        };
        // Only now (the outcome committed) may a cancel request fall back to closing the
        // attempt in the store itself.
        queue.inner.executions.remove(&job.ctx);
        report(id, job.task.attempts, result);
        if !in_time {
            // A replacement thread took our place when this execution timed out.
            return;
        }
    }
}

/// Logs what recording an outcome came to.
fn report(id: TaskId, attempt: u32, result: Result<Finished>) {
    match result {
        Ok(Finished::Applied(_)) => {}
        Ok(Finished::Stale) => {
            tracing::info!(task = %id, attempt, "late result of a closed attempt rejected")
        }
        Err(e) => {
            tracing::error!(task = %id, error = %e, "could not record the outcome; the task stays RUNNING until the next open recovers it")
        }
    }
}

/// Waits for one outcome's commit (recording it directly if the dispatcher exited without
/// sending it), then forgets its execution: from then on a cancel request closes the attempt
/// in the store itself.
fn settle(queue: &Queue, ack: Ack, killed: &AtomicBool) {
    let result = match ack.reply.recv() {
        Ok(r) => r,
        Err(_) if killed.load(Ordering::Acquire) => return,
        Err(_) => queue.inner.backend.finish(ack.id, ack.lease, ack.outcome),
    };
    queue.inner.executions.remove(&ack.ctx);
    report(ack.id, ack.attempt, result);
}

/// The acknowledgement thread of a claim-ahead pool: settles workers' outcomes in the order
/// they were handed over (the committer replies in that order too), until every worker and
/// the dispatcher are gone.
fn ack_loop(queue: Queue, acks: Receiver<Ack>, killed: Arc<AtomicBool>) {
    for ack in acks {
        settle(&queue, ack, &killed);
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::{Durability, Status, TaskError};

    #[derive(Serialize, Deserialize)]
    struct Noop;

    impl crate::Task for Noop {
        const NAME: &'static str = "noop";
        type Output = ();
    }

    fn syncs(q: &Queue) -> u64 {
        q.inner
            .backend
            .commit_metrics()
            .map_or(0, |m| m.sync_seconds.snapshot().count)
    }

    /// Issue 12: a task enqueued while a worker idles is claimed in its enqueue's own commit
    /// (the pool's standing claim), and its outcome needs the only other sync: two syncs for
    /// the task's whole life, where a claim of its own made three.
    #[test]
    fn an_idle_pool_claims_new_work_in_the_enqueues_own_sync() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::builder(dir.path().join("q"))
            .durability(Durability::Group)
            .open()
            .unwrap();
        q.register(|_: Noop, _: &TaskContext| -> std::result::Result<(), TaskError> { Ok(()) });
        let pool = q.workers().concurrency(1).start().unwrap();
        // Once the first task is acknowledged complete, the pool has granted the slot it
        // freed (grants go before the outcome that frees them).
        let first = q.enqueue(Noop).unwrap();
        q.wait(first, Duration::from_secs(30)).unwrap();
        let before = syncs(&q);
        let second = q.enqueue(Noop).unwrap();
        let done = q.wait(second, Duration::from_secs(30)).unwrap();
        assert_eq!((done.status, done.attempts), (Status::Completed, 1));
        assert_eq!(syncs(&q), before + 2, "enqueue + claim, then the outcome");
        assert_eq!(pool.stop().abandoned, 0);
    }
}
