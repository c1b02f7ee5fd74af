//! This process as a node: its row, its session (advisory lock, LISTEN, heartbeat), and the
//! two threads that serve it.
//!
//! - The **session thread** owns the node's dedicated connection. It waits for notifications
//!   (waking local dispatchers and `wait` callers), writes the heartbeat, polls as a fallback,
//!   runs the rescuer and the retention pass. If the connection breaks, or the node's row is
//!   gone (another process judged it dead), the node is lost: it claims nothing any more.
//! - The **notifier thread** sends `NOTIFY` after commits, at most once per (queue, kind) per
//!   `notify_interval`: a notifying commit takes a global lock in PostgreSQL, so a busy queue
//!   must not notify on every transition. The last signal of a burst is delayed, never dropped.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::rows::to_i64;
use super::{describe, pg_error, quote_ident, Liveness, Shared, Target};
use crate::error::{Error, Result};

/// What other processes are told after a commit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Signal {
    /// A queue has new pending work: wake dispatchers.
    Work(String),
    /// A task of a queue finished (or was deleted): wake `wait` callers.
    Done(String),
    /// Shut the notifier down.
    Stop,
}

/// How often retention runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Inserts the node row and, in session-lock mode, takes the advisory lock on it in the same
/// transaction (so no rescuer can see the row without the lock), then LISTENs.
pub(crate) fn register(
    client: &mut Client,
    target: &Target,
    liveness: Liveness,
) -> Result<(u64, i32)> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let pid = i32::try_from(std::process::id()).unwrap_or(0);
    let mode = match liveness {
        Liveness::SessionLock => "session_lock",
        Liveness::Heartbeat => "heartbeat",
    };
    let mut tx = client
        .transaction()
        .map_err(pg_error(target, "register this node"))?;
    let row = tx
        .query_one(
            "INSERT INTO omniq_nodes (host, pid, session_pid, liveness) \
             VALUES ($1, $2, pg_backend_pid(), $3) RETURNING id, session_pid",
            &[&host, &pid, &mode],
        )
        .map_err(pg_error(target, "register this node"))?;
    let id: i64 = row
        .try_get(0)
        .map_err(pg_error(target, "register this node"))?;
    let session_pid: i32 = row
        .try_get(1)
        .map_err(pg_error(target, "register this node"))?;
    let lock_key = i32::try_from(id).map_err(|_| {
        Error::Storage(format!(
            "PostgreSQL {}: node id {id} no longer fits an advisory lock key; \
             restart the omniq_nodes_id_seq sequence",
            target.label()
        ))
    })?;
    if liveness == Liveness::SessionLock {
        // Session-level: it outlives this transaction, and ends with the session.
        tx.execute(
            "SELECT pg_advisory_lock(hashtext(current_schema()), $1)",
            &[&lock_key],
        )
        .map_err(pg_error(target, "lock this node's row"))?;
    }
    tx.commit()
        .map_err(pg_error(target, "register this node"))?;
    client
        .batch_execute(&format!("LISTEN {}", quote_ident(&target.channel())))
        .map_err(pg_error(target, "listen for notifications"))?;
    let node = u64::try_from(id).unwrap_or(0);
    tracing::info!(node, schema = %target.label(), liveness = mode, "registered as a node");
    Ok((node, session_pid))
}

pub(crate) fn spawn(
    sh: &Arc<Shared>,
    session: Client,
    signals: Receiver<Signal>,
) -> Result<Vec<JoinHandle<()>>> {
    let s1 = sh.clone();
    let session_thread = std::thread::Builder::new()
        .name("omniq-pg-session".into())
        .spawn(move || run_session(&s1, session))
        .map_err(|e| Error::Storage(format!("cannot start the PostgreSQL session thread: {e}")))?;
    let s2 = sh.clone();
    let notifier = std::thread::Builder::new()
        .name("omniq-pg-notifier".into())
        .spawn(move || run_notifier(&s2, signals))
        .map_err(|e| Error::Storage(format!("cannot start the PostgreSQL notifier thread: {e}")))?;
    Ok(vec![session_thread, notifier])
}

/// Asks both threads to stop (the session thread hears it as a notification).
pub(crate) fn wake_session(sh: &Shared) {
    let _ = sh.to_notify.send(Signal::Stop);
    if let Ok(mut conn) = sh.pool.get() {
        let _ = conn.execute(
            "SELECT pg_notify($1, $2)",
            &[&sh.target.channel(), &format!("{}:s:", sh.node)],
        );
    }
}

/// Removes this node's row at shutdown. Executions still running (a shutdown past its grace
/// period) are then orphans, rescued by the other nodes as crashes.
pub(crate) fn unregister(sh: &Shared) -> Result<()> {
    if sh.lost.lock().is_some() {
        return Ok(());
    }
    let mut conn = sh.pool.get()?;
    conn.execute("DELETE FROM omniq_nodes WHERE id = $1", &[&to_i64(sh.node)])
        .map_err(pg_error(&sh.target, "unregister this node"))?;
    Ok(())
}

fn run_session(sh: &Arc<Shared>, mut client: Client) {
    let o = &sh.options;
    let start = Instant::now();
    let mut next_beat = start + o.heartbeat_interval;
    let mut next_poll = start + o.poll_interval;
    // The queue runs the first rescue itself at open (and reports it); this thread's passes
    // follow every `rescue_interval`.
    let mut next_rescue = start + o.rescue_interval;
    let mut next_purge = start + o.rescue_interval;
    let me = sh.node.to_string();
    while !sh.stopping.load(Ordering::SeqCst) {
        let mut deadline = next_beat.min(next_poll).min(next_rescue);
        if o.retention.is_some() {
            deadline = deadline.min(next_purge);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let mut payloads: Vec<String> = Vec::new();
        let heard = {
            let mut notes = client.notifications();
            let first = notes.timeout_iter(wait).next();
            match first {
                Ok(Some(n)) => {
                    payloads.push(n.payload().to_string());
                    let mut more = notes.iter();
                    loop {
                        match more.next() {
                            Ok(Some(n)) => payloads.push(n.payload().to_string()),
                            Ok(None) => break Ok(()),
                            Err(e) => break Err(e),
                        }
                    }
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = heard {
            sh.mark_lost(format!("the session connection failed: {}", describe(&e)));
            return;
        }
        if client.is_closed() {
            sh.mark_lost("the session connection closed".into());
            return;
        }
        let (mut work, mut done) = (false, false);
        for p in &payloads {
            let mut parts = p.splitn(3, ':');
            let (from, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if from == me {
                continue;
            }
            match kind {
                "w" => work = true,
                "d" => done = true,
                _ => {}
            }
        }
        let now = Instant::now();
        if now >= next_poll {
            // Fallback for a missed notification: re-check due work and waited-for tasks.
            work = true;
            done = true;
            next_poll = now + o.poll_interval;
        }
        // Another process's task that finished may free a concurrency-limit slot.
        if work || (done && sh.notify.wakes_on_exit()) {
            sh.notify.wake_all();
        }
        if done {
            sh.notify.wake_waiters();
        }
        if now >= next_beat {
            next_beat = now + o.heartbeat_interval;
            match client.execute(
                "UPDATE omniq_nodes SET heartbeat_at = now() WHERE id = $1",
                &[&to_i64(sh.node)],
            ) {
                Ok(1) => {}
                Ok(_) => {
                    sh.mark_lost("its node row was deleted: another process found it dead".into());
                    return;
                }
                Err(e) => {
                    sh.mark_lost(format!("the heartbeat failed: {}", describe(&e)));
                    return;
                }
            }
        }
        if now >= next_rescue {
            next_rescue = now + o.rescue_interval;
            if let Err(e) = super::rescue::rescue(sh) {
                tracing::warn!(error = %e, "rescue pass failed; retrying at the next interval");
            }
        }
        if let Some(age) = o.retention {
            if now >= next_purge {
                next_purge = now + PURGE_EVERY;
                let cutoff = sh.clock.now().minus(age);
                for _ in 0..10 {
                    match super::ops::purge(sh, cutoff, 1000) {
                        Ok(1000) => continue,
                        Ok(n) => {
                            if n > 0 {
                                tracing::info!(removed = n, "retention purge");
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "retention purge failed");
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn run_notifier(sh: &Arc<Shared>, rx: Receiver<Signal>) {
    let interval = sh.options.notify_interval;
    let mut last: HashMap<Signal, Instant> = HashMap::new();
    let mut pending: BTreeSet<Signal> = BTreeSet::new();
    let mut stop = false;
    while !stop || !pending.is_empty() {
        let next_due = pending
            .iter()
            .filter_map(|s| last.get(s).map(|t| *t + interval))
            .min();
        let got = match (stop, next_due) {
            (true, _) => Err(RecvTimeoutError::Timeout),
            (false, Some(at)) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            (false, None) if pending.is_empty() => {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            }
            (false, None) => Err(RecvTimeoutError::Timeout),
        };
        match got {
            Ok(s) => {
                let mut add = |s: Signal| match s {
                    Signal::Stop => stop = true,
                    s => {
                        pending.insert(s);
                    }
                };
                add(s);
                while let Ok(s) = rx.try_recv() {
                    add(s);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => stop = true,
        }
        let now = Instant::now();
        let ready: Vec<Signal> = pending
            .iter()
            .filter(|s| stop || last.get(*s).is_none_or(|t| *t + interval <= now))
            .cloned()
            .collect();
        if ready.is_empty() {
            continue;
        }
        let payloads: Vec<String> = ready
            .iter()
            .filter_map(|s| match s {
                Signal::Work(q) => Some(format!("{}:w:{q}", sh.node)),
                Signal::Done(q) => Some(format!("{}:d:{q}", sh.node)),
                Signal::Stop => None,
            })
            .collect();
        let sent = sh.pool.get().and_then(|mut conn| {
            conn.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                &[&sh.target.channel(), &payloads],
            )
            .map_err(pg_error(&sh.target, "notify other processes"))
        });
        if let Err(e) = sent {
            // The other processes' fallback poll covers a lost notification.
            tracing::warn!(error = %e, "could not notify other processes");
            if stop {
                return;
            }
        }
        for s in ready {
            pending.remove(&s);
            last.insert(s, now);
        }
        if last.len() > 4096 {
            last.retain(|_, t| *t + interval > now);
        }
    }
}
