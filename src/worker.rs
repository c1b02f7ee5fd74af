//! The worker pool: N OS threads fed by one dispatcher through a crossbeam channel.
//!
//! The dispatcher claims only as many tasks as there are free workers (no claim-ahead), in
//! order (priority, then due time, then enqueue order), with one durable commit for the whole
//! claim batch before any handler runs. When nothing is due it blocks until new work commits,
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

use crate::backend::{ClaimRequest, FinishRequest};
use crate::commit::{Finished, Outcome};
use crate::error::{Error, Result};
use crate::handler::{
    self, TaskContext, EXEC_CANCEL_REQUESTED, EXEC_DONE, EXEC_RUNNING, EXEC_TIMED_OUT,
};
use crate::queue::Queue;
use crate::shutdown::{self, Listener, ShutdownHandle, Signal};
use crate::store::QueueSet;
use crate::task::{TaskError, TaskId, TaskInfo, Timestamp};

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
            free: self.concurrency,
            running: HashMap::new(),
            threads: Vec::new(),
            outbox: Vec::new(),
            claim_tx,
            claim_rx,
            in_flight: VecDeque::new(),
        };
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
    free: usize,
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
}

impl Dispatcher {
    fn spawn_worker(&mut self) -> Result<()> {
        let jobs = self.job_rx.clone();
        let done = self.done_tx.clone();
        let queue = self.queue.clone();
        let h = std::thread::Builder::new()
            .name("omniq-worker".into())
            .spawn(move || worker_loop(queue, jobs, done))
            .map_err(|e| Error::Storage(format!("cannot start a worker thread: {e}")))?;
        self.threads.retain(|t| !t.is_finished());
        self.threads.push(h);
        Ok(())
    }

    fn run(mut self) -> StopReport {
        let mut stopping: Option<Instant> = None;
        loop {
            // `select!` picks among ready channels at random; a pending stop must win over a
            // worker's completion, or stop() could be followed by one more claim.
            if stopping.is_none() && self.stop_rx.try_recv().is_ok() {
                stopping = Some(Instant::now());
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
        if abandoned == 0 {
            for t in self.threads.drain(..) {
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

    fn finished(&mut self, done: Done) {
        if self.running.remove(&done.id).is_some() {
            self.free += 1;
        }
        self.outbox.push(done.finish);
    }

    /// Sends outcomes that no claim took along. Their replies go to the workers.
    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let finishes = std::mem::take(&mut self.outbox);
        if let Err(e) = self.queue.inner.backend.submit(finishes, None) {
            tracing::error!(error = %e, "could not send outcomes to the writer; their workers record them directly");
        }
    }

    /// How long to block: until the earliest due time or deadline; forever if neither.
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
        if stopping.is_none() && self.free > 0 {
            let asked = self.asked();
            if let Ok(due) = self
                .queue
                .inner
                .backend
                .due_summary(&self.queues, now, asked + 1)
            {
                if due.ready > asked {
                    return Duration::ZERO;
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

    /// Asks the backend to claim as many due tasks as there are free workers (reserving their
    /// slots), together with any outcomes waiting in the outbox. Does not wait for the reply.
    fn request_claims(&mut self) -> Result<()> {
        if self.free == 0 {
            return Ok(());
        }
        let now = self.queue.now();
        // Claims in flight will take the first of the due tasks (or already have): ask only for
        // what is due beyond them, so an idle queue costs no commits.
        let asked = self.asked();
        let due = self
            .queue
            .inner
            .backend
            .due_summary(&self.queues, now, asked + self.free)?;
        let n = due.ready.saturating_sub(asked).min(self.free);
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
        self.free -= n;
        self.in_flight.push_back(n);
        Ok(())
    }

    /// A claim's reply: hand the claimed tasks to workers, give back the slots of the rest.
    fn claimed(&mut self, result: Result<Vec<TaskInfo>>) {
        self.free += self.in_flight.pop_front().unwrap_or_default();
        match result {
            Ok(tasks) => {
                for task in tasks {
                    self.dispatch(task);
                }
            }
            Err(e) => tracing::error!(error = %e, "a claim failed; retrying when woken"),
        }
    }

    fn dispatch(&mut self, task: TaskInfo) {
        let deadline = task
            .timeout()
            .map(|t| task.started_at.unwrap_or_else(|| self.queue.now()).plus(t));
        let ctx = Arc::new(TaskContext::new(
            &task,
            deadline,
            self.cancel_all.clone(),
            self.queue.downgrade(),
        ));
        self.running.insert(
            task.id,
            Running {
                lease: task.lease,
                deadline,
                timeout: task.timeout(),
                ctx: ctx.clone(),
            },
        );
        self.free -= 1;
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
            self.free += 1;
            if let Err(e) = self.spawn_worker() {
                tracing::error!(error = %e, "could not replace a timed-out worker; the pool runs one thread short");
                self.free -= 1;
            }
        }
    }
}

fn worker_loop(queue: Queue, jobs: Receiver<Job>, done: Sender<Done>) {
    for job in jobs {
        let mut outcome = handler::execute(&queue.inner.registry, &job.task, &job.ctx);
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
            match done
                .send(Done { id, finish })
                .ok()
                .and_then(|()| reply_rx.recv().ok())
            {
                Some(r) => r,
                None => direct(outcome),
            }
        } else {
            direct(outcome)
        };
        // Only now (the outcome committed) may a cancel request fall back to closing the
        // attempt in the store itself.
        queue.inner.executions.remove(&job.ctx);
        match result {
            Ok(Finished::Applied(_)) => {}
            Ok(Finished::Stale) => {
                tracing::info!(task = %id, attempt = job.task.attempts, "late result of a closed attempt rejected")
            }
            Err(e) => {
                tracing::error!(task = %id, error = %e, "could not record the outcome; the task stays RUNNING until the next open recovers it")
            }
        }
        if !in_time {
            // A replacement thread took our place when this execution timed out.
            return;
        }
    }
}
