//! Graceful shutdown of worker pools: on `SIGINT` / `SIGTERM`, or when your own code asks.
//!
//! A deploy or a Ctrl-C must not cost any task an attempt. Killing a process while handlers run
//! does: at the next open, every task left `Running` is charged a `crash` error (and a task with
//! `max_retries = 0` fails for good). [`WorkerPool::stop_on_signals`] turns the two usual
//! termination signals into the graceful stop that [`WorkerPool::stop`] already is:
//!
//! - **First `SIGINT` or `SIGTERM`**: every pool that listens stops claiming at once and lets its
//!   running handlers finish, up to its grace period
//!   ([`grace_period`](crate::WorkerPoolBuilder::grace_period), default 30 s). Their outcomes are
//!   recorded as usual, so nothing is charged for the stop. [`WorkerPool::wait`] (or `stop`)
//!   then returns a [`StopReport`] whose [`signal`](crate::StopReport::signal) names the signal; the
//!   program decides how to exit. The convention, which the `omniq` binary follows, is status
//!   128 + signal number: **130** after `SIGINT`, **143** after `SIGTERM`
//!   ([`Signal::exit_code`]). Handlers still running when the grace period runs out see
//!   [`TaskContext::is_cancelled`](crate::TaskContext::is_cancelled) turn true; whatever is
//!   still running when the process ends is recovered at the next open and charged `crash`.
//! - **Second `SIGINT` or `SIGTERM`** (while a pool is still draining): the process ends at
//!   once, killed by that signal as if no handler were installed (a shell reports 130 or 143;
//!   [`std::process::ExitStatus::code`] is `None`). Tasks still running are recovered at the
//!   next open and charged a `crash` attempt: that is the price of not waiting.
//! - **No pool listening** (before the first `stop_on_signals`, or once every listening pool has
//!   stopped): the signals do what they do by default, they end the process.
//!
//! Handlers are installed once per process, on the first call, with the `signal-hook` crate
//! (async-signal-safe registration that chains with other handlers); later calls, from any
//! number of pools, only add listeners. One signal stops every listening pool.
//!
//! During the graceful drain handlers are **not** cancelled: a handler that cut its work short
//! would have to report a failure (charged) or a success it did not earn. `is_cancelled` turns
//! true only when the grace period runs out (or the execution's own timeout passes).
//!
//! # Programs with their own signal handling
//!
//! `stop_on_signals` takes `SIGINT` and `SIGTERM` over for the process while a pool listens, and
//! its "no pool listening: end the process" rule runs before handlers registered later. A
//! program that handles signals itself (or embeds omniq in a larger server) should not call it:
//! take a [`ShutdownHandle`] with [`WorkerPool::stopper`] and call
//! [`ShutdownHandle::stop`] from its own handler or shutdown path. The handle is `Clone`,
//! `Send` and `Sync`, only sends a message, and can be called any number of times.
//!
//! # Example
//!
//! A worker process that runs until it is told to stop:
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! fn main() -> Result<ExitCode, omniq::Error> {
//!     let queue = omniq::Queue::open("./omniq_data")?;
//!     // queue.register(...) your handlers here.
//!     let pool = queue.workers().concurrency(4).start()?;
//!     pool.stop_on_signals()?;
//!     // Blocks until SIGINT / SIGTERM (or a ShutdownHandle) stops the pool and it has drained.
//!     let report = pool.wait();
//!     if report.abandoned > 0 {
//!         eprintln!("{} task(s) were still running; the next open recovers them", report.abandoned);
//!     }
//!     Ok(match report.signal {
//!         Some(signal) => ExitCode::from(signal.exit_code()), // 130 or 143
//!         None => ExitCode::SUCCESS,
//!     })
//! }
//! ```
//!
//! [`WorkerPool::stop_on_signals`]: crate::WorkerPool::stop_on_signals
//! [`WorkerPool::stop`]: crate::WorkerPool::stop
//! [`WorkerPool::wait`]: crate::WorkerPool::wait
//! [`WorkerPool::stopper`]: crate::WorkerPool::stopper
//! [`StopReport`]: crate::StopReport

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// A termination signal that stopped (or was received by) a worker pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Signal {
    /// `SIGINT`: Ctrl-C in a terminal.
    Interrupt,
    /// `SIGTERM`: `kill PID`, systemd, Docker and Kubernetes stopping a service.
    Terminate,
}

impl Signal {
    /// The signal's number: 2 for `SIGINT`, 15 for `SIGTERM` (fixed by POSIX, the same on every
    /// Unix).
    pub fn number(self) -> i32 {
        match self {
            Signal::Interrupt => 2,
            Signal::Terminate => 15,
        }
    }

    /// Its name: `"SIGINT"` or `"SIGTERM"`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    /// The conventional exit status of a program that stopped because of this signal:
    /// 128 + its number, so **130** for `SIGINT` and **143** for `SIGTERM`. Shells and
    /// supervisors read it as "stopped by that signal".
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }

    /// The signal with this number, if it is one of the two.
    pub fn from_number(n: i32) -> Option<Signal> {
        match n {
            2 => Some(Signal::Interrupt),
            15 => Some(Signal::Terminate),
            _ => None,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a pool, its handles and the signal watcher share.
struct State {
    /// The pool dispatcher's stop channel (capacity 1: one message is enough).
    stop_tx: Sender<()>,
    requested: AtomicBool,
    /// Dropped when a stop is requested, which disconnects every [`ShutdownHandle::stopping`]
    /// receiver at once.
    notify: Mutex<Option<Sender<()>>>,
    notified: Receiver<()>,
    signal: Mutex<Option<Signal>>,
}

/// Asks a worker pool to stop gracefully, from any thread. Get one with
/// [`WorkerPool::stopper`](crate::WorkerPool::stopper).
///
/// [`stop`](ShutdownHandle::stop) does what the first `SIGINT` does for a pool that
/// [listens to signals](crate::WorkerPool::stop_on_signals): the pool stops claiming and drains
/// within its grace period; whoever waits on the pool ([`WorkerPool::wait`](crate::WorkerPool::wait)
/// or [`WorkerPool::stop`](crate::WorkerPool::stop)) gets the [`StopReport`](crate::StopReport).
/// Use it from a program's own signal handling, an admin endpoint, or a test.
///
/// ```no_run
/// # fn demo(queue: omniq::Queue) -> omniq::Result<()> {
/// let pool = queue.workers().start()?;
/// let stopper = pool.stopper();
/// std::thread::spawn(move || {
///     // ... your own shutdown trigger, e.g. a signal your program already handles ...
///     stopper.stop();
/// });
/// let report = pool.wait(); // returns once the pool has drained
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ShutdownHandle {
    state: Arc<State>,
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("stopping", &self.is_stopping())
            .field("signal", &self.signal())
            .finish()
    }
}

impl ShutdownHandle {
    pub(crate) fn new(stop_tx: Sender<()>) -> ShutdownHandle {
        let (notify, notified) = crossbeam_channel::bounded(0);
        ShutdownHandle {
            state: Arc::new(State {
                stop_tx,
                requested: AtomicBool::new(false),
                notify: Mutex::new(Some(notify)),
                notified,
                signal: Mutex::new(None),
            }),
        }
    }

    /// Asks the pool to stop: it claims nothing more and lets running handlers finish within
    /// its grace period. Returns at once; calling it again (or after the pool stopped) does
    /// nothing.
    pub fn stop(&self) {
        self.state.requested.store(true, Ordering::Release);
        // Full means a stop message is already waiting; disconnected means the pool is gone.
        let _ = self.state.stop_tx.try_send(());
        self.state.notify.lock().take();
    }

    /// True once a stop was requested (by [`stop`](ShutdownHandle::stop), a signal, or
    /// [`WorkerPool::stop`](crate::WorkerPool::stop)).
    pub fn is_stopping(&self) -> bool {
        self.state.requested.load(Ordering::Acquire)
    }

    /// A channel that never carries a message and disconnects when a stop is requested: a
    /// `recv` on it returns (with an error) at that moment. Meant for `crossbeam_channel::select!`
    /// next to your own channels, to notice a signal while waiting for something else.
    pub fn stopping(&self) -> Receiver<()> {
        self.state.notified.clone()
    }

    /// The first `SIGINT` / `SIGTERM` the pool received while it listened to signals, if any.
    pub fn signal(&self) -> Option<Signal> {
        *self.state.signal.lock()
    }

    /// A signal arrived: remember the first one, then stop.
    fn signalled(&self, signal: Signal) {
        self.state.signal.lock().get_or_insert(signal);
        self.stop();
    }
}

/// A pool's registration with the process-wide signal watcher; unregisters when dropped.
pub(crate) struct Listener {
    #[cfg(unix)]
    id: u64,
}

/// Makes `handle` stop on the next `SIGINT` / `SIGTERM`, installing the process's handlers on
/// first use.
pub(crate) fn listen(handle: &ShutdownHandle) -> Result<Listener> {
    #[cfg(unix)]
    {
        os::listen(handle)
    }
    #[cfg(not(unix))]
    {
        let _ = handle;
        Err(Error::Signals(
            "signal handling is only available on Unix; call WorkerPool::stopper() and stop the pool from your own shutdown code".into(),
        ))
    }
}

#[cfg(unix)]
impl Drop for Listener {
    fn drop(&mut self) {
        os::unlisten(self.id);
    }
}

#[cfg(unix)]
mod os {
    //! The process-wide part: handlers installed once, a watcher thread, the listening pools.
    //!
    //! In each signal handler, in this order (signal-hook runs a signal's actions in the order
    //! they were registered, and every action is async-signal-safe):
    //! 1. if no pool listens (`idle`), act as the default disposition: end the process;
    //! 2. if a signal was already taken as a stop request (`signalled`), end the process the
    //!    same way: this is the "second signal exits at once" rule;
    //! 3. set `signalled`;
    //! 4. wake the watcher thread (a self-pipe, `signal_hook::iterator`), which asks every
    //!    listening pool to stop. The watcher also ends the process if the last pool stopped
    //!    listening between the signal and its wake-up.
    //!
    //! signal-hook cannot restore a signal's previous disposition (`unregister` leaves its own
    //! handler in place), so "restoring the default after the pool stops" is rule 1.

    use super::*;

    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;
    use std::sync::OnceLock;

    struct Watcher {
        /// Listening pools, by listener id.
        listeners: Mutex<Vec<(u64, ShutdownHandle)>>,
        next_id: Mutex<u64>,
        /// No pool listens: signals end the process.
        idle: Arc<AtomicBool>,
        /// A signal was taken as a stop request: the next one ends the process.
        signalled: Arc<AtomicBool>,
    }

    static WATCHER: OnceLock<std::result::Result<Arc<Watcher>, String>> = OnceLock::new();

    fn install() -> std::result::Result<Arc<Watcher>, String> {
        let watcher = Arc::new(Watcher {
            listeners: Mutex::new(Vec::new()),
            next_id: Mutex::new(0),
            idle: Arc::new(AtomicBool::new(true)),
            signalled: Arc::new(AtomicBool::new(false)),
        });
        let fail = |e: std::io::Error| format!("cannot install SIGINT/SIGTERM handlers: {e}");
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_default(sig, watcher.idle.clone())
                .map_err(fail)?;
            signal_hook::flag::register_conditional_default(sig, watcher.signalled.clone())
                .map_err(fail)?;
            signal_hook::flag::register(sig, watcher.signalled.clone()).map_err(fail)?;
        }
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(fail)?;
        let w = watcher.clone();
        std::thread::Builder::new()
            .name("omniq-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    w.deliver(sig);
                }
            })
            .map_err(|e| format!("cannot start the signal watcher thread: {e}"))?;
        Ok(watcher)
    }

    impl Watcher {
        fn deliver(&self, sig: i32) {
            let Some(signal) = Signal::from_number(sig) else {
                return;
            };
            let listeners: Vec<ShutdownHandle> = self
                .listeners
                .lock()
                .iter()
                .map(|(_, h)| h.clone())
                .collect();
            if listeners.is_empty() {
                // The last pool stopped listening after the handler ran: behave as the
                // default disposition would have.
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                return;
            }
            tracing::warn!(
                signal = signal.name(),
                pools = listeners.len(),
                "signal received: worker pools stop claiming and drain within their grace period; \
                 a second SIGINT/SIGTERM ends the process at once"
            );
            for h in listeners {
                h.signalled(signal);
            }
        }
    }

    pub(super) fn listen(handle: &ShutdownHandle) -> Result<Listener> {
        let watcher = WATCHER
            .get_or_init(install)
            .as_ref()
            .map_err(|e| Error::Signals(e.clone()))?;
        let id = {
            let mut next = watcher.next_id.lock();
            *next += 1;
            *next
        };
        let mut listeners = watcher.listeners.lock();
        if listeners.is_empty() {
            // A new listening period: the first signal is graceful again.
            watcher.signalled.store(false, Ordering::SeqCst);
        }
        listeners.push((id, handle.clone()));
        watcher.idle.store(false, Ordering::SeqCst);
        Ok(Listener { id })
    }

    pub(super) fn unlisten(id: u64) {
        let Some(Ok(watcher)) = WATCHER.get() else {
            return;
        };
        let mut listeners = watcher.listeners.lock();
        listeners.retain(|(i, _)| *i != id);
        if listeners.is_empty() {
            watcher.idle.store(true, Ordering::SeqCst);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn signal_numbers_match_the_platform() {
            assert_eq!(Signal::Interrupt.number(), SIGINT);
            assert_eq!(Signal::Terminate.number(), SIGTERM);
            assert_eq!(Signal::from_number(SIGINT), Some(Signal::Interrupt));
            assert_eq!(Signal::from_number(SIGTERM), Some(Signal::Terminate));
            assert_eq!(Signal::from_number(9), None);
            for s in [Signal::Interrupt, Signal::Terminate] {
                assert_eq!(i32::from(s.exit_code()), 128 + s.number());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_stops_once_and_disconnects_its_waiters() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let h = ShutdownHandle::new(tx);
        let waiter = h.stopping();
        assert!(!h.is_stopping());
        assert!(waiter.try_recv().is_err_and(|e| e.is_empty()));
        h.clone().stop();
        h.stop();
        assert!(h.is_stopping());
        assert!(waiter.try_recv().is_err_and(|e| e.is_disconnected()));
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "one stop message is enough");
        h.signalled(Signal::Terminate);
        h.signalled(Signal::Interrupt);
        assert_eq!(
            h.signal(),
            Some(Signal::Terminate),
            "the first signal is kept"
        );
    }
}
