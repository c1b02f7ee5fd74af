//! Handlers: the code that runs a task kind, how they are registered (typed or plain
//! closures), the context a running handler sees, and how one execution is run and turned into
//! an outcome (panics caught, unknown kinds failed visibly).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::commit::Outcome;
use crate::error::{Error, Result};
use crate::queue::{Queue, WeakQueue};
use crate::task::{EnqueueOptions, Task, TaskError, TaskId, TaskInfo, Timestamp};

/// A handler over raw JSON payload bytes, returning JSON result bytes.
pub(crate) type RawHandler =
    dyn Fn(&TaskContext, &[u8]) -> Result<Vec<u8>, TaskError> + Send + Sync;

/// Execution states shared between a running handler, its worker and the timeout watchdog.
pub(crate) const EXEC_RUNNING: u8 = 0;
pub(crate) const EXEC_DONE: u8 = 1;
pub(crate) const EXEC_TIMED_OUT: u8 = 2;
/// An operator asked for the running execution to stop
/// ([`Queue::cancel_running`](crate::Queue::cancel_running)): whoever moves it on (the worker
/// when the handler returns, or the timeout watchdog) ends the attempt `Cancelled`.
pub(crate) const EXEC_CANCEL_REQUESTED: u8 = 3;

/// What a running handler can know about its execution.
///
/// Threads cannot be killed, so timeouts and shutdown are cooperative: a long handler should
/// check [`is_cancelled`](TaskContext::is_cancelled) between steps and return early. Whatever it
/// returns after its attempt was closed (timed out) is rejected by the engine.
pub struct TaskContext {
    pub(crate) id: TaskId,
    pub(crate) kind: String,
    pub(crate) queue: String,
    pub(crate) attempt: u32,
    pub(crate) max_retries: u32,
    pub(crate) deadline: Option<Timestamp>,
    pub(crate) state: Arc<AtomicU8>,
    pub(crate) stop: Arc<AtomicBool>,
    /// The queue, without keeping it open: a handler that held a strong `Queue` would keep the
    /// directory locked for as long as its handler is registered (that is, forever).
    pub(crate) handle: WeakQueue,
}

impl TaskContext {
    pub(crate) fn new(
        task: &TaskInfo,
        deadline: Option<Timestamp>,
        stop: Arc<AtomicBool>,
        handle: WeakQueue,
    ) -> TaskContext {
        TaskContext {
            id: task.id,
            kind: task.kind.clone(),
            queue: task.queue.clone(),
            attempt: task.attempts,
            max_retries: task.max_retries,
            deadline,
            state: Arc::new(AtomicU8::new(EXEC_RUNNING)),
            stop,
            handle,
        }
    }

    /// The task being run.
    pub fn task_id(&self) -> TaskId {
        self.id
    }
    /// Its kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// Its queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// This execution's number, 1-based (already counted durably).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The task's retry budget.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }
    /// True when a transient failure now would be final.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt > self.max_retries
    }
    /// When this execution times out, if it has a timeout.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.deadline
    }
    /// True once the execution has timed out (its result will be ignored), an operator
    /// cancelled it ([`Queue::cancel_running`](crate::Queue::cancel_running): the attempt ends
    /// `Cancelled` when the handler returns), or the worker pool's grace period has run out.
    /// Check it between steps of long work.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self.state.load(Ordering::Acquire),
            EXEC_TIMED_OUT | EXEC_CANCEL_REQUESTED
        ) || self.stop.load(Ordering::Acquire)
    }

    /// The queue this task runs on, as a handle that does not keep it open. Use it (or the
    /// shortcuts below) instead of capturing a [`Queue`] clone in the handler: a registered
    /// handler lives as long as the queue, so a captured clone would keep the directory open
    /// after every other handle is closed.
    pub fn queue_handle(&self) -> &WeakQueue {
        &self.handle
    }

    fn live_queue(&self) -> Result<Queue> {
        self.handle.upgrade().ok_or(Error::Closed)
    }

    /// Enqueues a follow-up task on this queue.
    ///
    /// The follow-up is committed on its own, not together with this execution's outcome:
    /// should the process die after it and before the outcome is recorded, this task runs again
    /// and enqueues it again (delivery is at-least-once; make the follow-up idempotent).
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use omniq::{Queue, Task, TaskContext, TaskError};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Resize { image: String }
    /// impl Task for Resize { const NAME: &'static str = "resize"; type Output = (); }
    /// #[derive(Serialize, Deserialize)]
    /// struct Notify { image: String }
    /// impl Task for Notify { const NAME: &'static str = "notify"; type Output = (); }
    ///
    /// # fn main() -> omniq::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let queue = Queue::open(dir.path())?;
    /// queue.register(|job: Resize, ctx: &TaskContext| -> Result<(), TaskError> {
    ///     // ... resize ...
    ///     ctx.enqueue(Notify { image: job.image })?;
    ///     Ok(())
    /// });
    /// # Ok(()) }
    /// ```
    pub fn enqueue<T: Task>(&self, task: T) -> Result<TaskId> {
        self.live_queue()?.enqueue(task)
    }

    /// [`enqueue`](TaskContext::enqueue) with options.
    pub fn enqueue_with<T: Task>(&self, task: T, options: EnqueueOptions) -> Result<TaskId> {
        self.live_queue()?.enqueue_with(task, options)
    }

    /// Enqueues a follow-up task by kind name with a JSON payload (see
    /// [`Queue::enqueue_json`]).
    pub fn enqueue_json(
        &self,
        kind: &str,
        payload: &serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<TaskId> {
        self.live_queue()?.enqueue_json(kind, payload, options)
    }

    /// This task's record as stored now (`Running`, with its attempts and the errors of
    /// earlier attempts).
    pub fn current(&self) -> Result<TaskInfo> {
        self.live_queue()?
            .get(self.id)?
            .ok_or(Error::NotFound(self.id))
    }

    /// The schedule tick that enqueued this task (`None` if no schedule did): the time the run
    /// stands for, e.g. the day a nightly report covers, however late it runs.
    pub fn scheduled(&self) -> Result<Option<crate::ScheduledFrom>> {
        Ok(self
            .live_queue()?
            .extras(self.id)?
            .and_then(|e| e.scheduled))
    }
}

/// What [`Executions::request_cancel`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CancelRequest {
    /// The execution was still running: its handler sees `is_cancelled()` and its attempt
    /// will end `Cancelled`.
    Flagged,
    /// Its handler had already returned (or timed out, or was already being cancelled): its
    /// outcome stands.
    TooLate,
    /// No execution of this task runs in this process.
    NotRunningHere,
}

/// The executions running in this process, by task, so an operator can cancel one.
#[derive(Default)]
pub(crate) struct Executions {
    map: parking_lot::Mutex<HashMap<TaskId, Arc<TaskContext>>>,
}

impl Executions {
    pub(crate) fn insert(&self, ctx: Arc<TaskContext>) {
        self.map.lock().insert(ctx.id, ctx);
    }

    /// Forgets `ctx` (only that execution: a later execution of the same task may have
    /// replaced it after a timeout).
    pub(crate) fn remove(&self, ctx: &Arc<TaskContext>) {
        let mut map = self.map.lock();
        if map.get(&ctx.id).is_some_and(|c| Arc::ptr_eq(c, ctx)) {
            map.remove(&ctx.id);
        }
    }

    /// Flags the running execution of `id` with lease `attempt`, if any.
    pub(crate) fn request_cancel(&self, id: TaskId, attempt: u32) -> CancelRequest {
        let Some(ctx) = self.map.lock().get(&id).cloned() else {
            return CancelRequest::NotRunningHere;
        };
        if ctx.attempt != attempt {
            return CancelRequest::NotRunningHere;
        }
        // One atomic decides: the worker (handler returned), the timeout watchdog and this
        // request each move `state` on from RUNNING with a compare-exchange; the first wins.
        match ctx.state.compare_exchange(
            EXEC_RUNNING,
            EXEC_CANCEL_REQUESTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => CancelRequest::Flagged,
            Err(_) => CancelRequest::TooLate,
        }
    }
}

/// Handlers by task kind, shared by every worker pool of a queue.
#[derive(Default)]
pub(crate) struct Registry {
    handlers: RwLock<HashMap<String, Arc<RawHandler>>>,
}

impl Registry {
    pub(crate) fn insert(&self, kind: &str, h: Arc<RawHandler>) {
        self.handlers.write().insert(kind.to_string(), h);
    }

    pub(crate) fn get(&self, kind: &str) -> Option<Arc<RawHandler>> {
        self.handlers.read().get(kind).cloned()
    }

    pub(crate) fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.handlers.read().keys().cloned().collect();
        k.sort();
        k
    }
}

/// Wraps a typed handler: decodes the payload as `T`, encodes the output.
pub(crate) fn typed<T, F>(handler: F) -> Arc<RawHandler>
where
    T: Task,
    F: Fn(T, &TaskContext) -> Result<T::Output, TaskError> + Send + Sync + 'static,
{
    Arc::new(move |ctx: &TaskContext, payload: &[u8]| {
        let args: T = serde_json::from_slice(payload).map_err(|e| {
            TaskError::permanent(
                "decode",
                format!(
                    "payload of task {} does not decode as {} ({}): {e}",
                    ctx.id,
                    T::NAME,
                    std::any::type_name::<T>()
                ),
            )
        })?;
        let out = handler(args, ctx)?;
        serde_json::to_vec(&out).map_err(|e| {
            TaskError::permanent(
                "encode",
                format!("cannot encode the result of {}: {e}", T::NAME),
            )
        })
    })
}

/// Wraps a plain closure over JSON values.
pub(crate) fn plain<F>(handler: F) -> Arc<RawHandler>
where
    F: Fn(serde_json::Value, &TaskContext) -> Result<serde_json::Value, TaskError>
        + Send
        + Sync
        + 'static,
{
    Arc::new(move |ctx: &TaskContext, payload: &[u8]| {
        let args: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
            TaskError::permanent(
                "decode",
                format!("payload of task {} is not JSON: {e}", ctx.id),
            )
        })?;
        let out = handler(args, ctx)?;
        serde_json::to_vec(&out).map_err(|e| TaskError::permanent("encode", e.to_string()))
    })
}

/// Runs one execution: looks up the handler, calls it with panics caught.
pub(crate) fn execute(registry: &Registry, task: &TaskInfo, ctx: &TaskContext) -> Outcome {
    let Some(handler) = registry.get(&task.kind) else {
        return Outcome::Failure(TaskError::permanent(
            "unregistered",
            format!(
                "no handler is registered for task kind {:?}; register one and call retry on this task",
                task.kind
            ),
        ));
    };
    match catch_unwind(AssertUnwindSafe(|| handler(ctx, &task.payload))) {
        Ok(Ok(bytes)) => Outcome::Success(bytes),
        Ok(Err(e)) => Outcome::Failure(e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked with a non-string payload".to_string());
            Outcome::Failure(TaskError::transient("panic", msg))
        }
    }
}
