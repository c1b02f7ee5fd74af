//! Exact rescue: executions whose node is dead are charged their attempt as a `"crash"` under
//! the ordinary rule; executions of a live node are never touched.
//!
//! A node is dead when (session-lock mode) its advisory lock can be taken — its session ended —
//! or (heartbeat mode) its heartbeat is older than `dead_after`. In session-lock mode a node
//! whose lock is held but whose heartbeat is older than `dead_after` is wedged: its session is
//! terminated, which makes it dead at the next pass (and its late finishes fenced).
//!
//! The rescuer first deletes the dead node's row (in the same transaction, under the dead
//! node's lock taken transaction-level so two rescuers do not both work on it). Claims check
//! their node's row `FOR KEY SHARE` in their own transaction, so once the delete commits no
//! claim can commit for that node, and every claim that committed before it is visible to the
//! rescuer's next statement. Then each of the node's running tasks is read, locked, failed with
//! `lifecycle::fail` and written fenced by lease, with its log row and counters. Finally,
//! running tasks whose node row is missing altogether (a rescuer that crashed half-way cannot
//! leave any: its transaction rolled back; but an operator may delete rows) are rescued too.

use std::sync::Arc;
use std::time::Instant;

use postgres::Transaction;

use super::ops::{Batch, Stmts};
use super::rows::{task_cols, task_from_row, to_i64};
use super::{pg_error, Shared};
use crate::error::{Error, Result};
use crate::inspect::{CorruptEntry, RecoveryReport};
use crate::lifecycle;
use crate::task::TaskError;

const NODES: &str = "SELECT id, session_pid, liveness, \
     extract(epoch FROM now() - heartbeat_at)::float8 AS age FROM omniq_nodes WHERE id <> $1 \
     ORDER BY id";

const RUNNING_OF_NODE: &str = concat!(
    "SELECT ",
    task_cols!(),
    " FROM omniq_tasks WHERE state = 'running' AND node = $1 ORDER BY id FOR UPDATE"
);

const RUNNING_WITHOUT_NODE: &str = concat!(
    "SELECT ",
    task_cols!(),
    " FROM omniq_tasks t WHERE state = 'running' AND (node IS NULL OR NOT EXISTS \
     (SELECT 1 FROM omniq_nodes n WHERE n.id = t.node)) ORDER BY id FOR UPDATE"
);

/// One rescue pass over every other node.
pub(crate) fn rescue(sh: &Shared) -> Result<RecoveryReport> {
    let started = Instant::now();
    let mut report = RecoveryReport {
        run_id: sh.node,
        ..RecoveryReport::default()
    };
    if let Some(e) = sh.session_lost() {
        // A dead node rescues nobody: it may be the one being rescued.
        return Err(e);
    }
    let t = &sh.target;
    let dead_after = sh.options.dead_after.as_secs_f64();
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let nodes = conn
        .query(NODES, &[&to_i64(sh.node)])
        .map_err(pg_error(t, "list nodes"))?;
    for row in &nodes {
        let id: i64 = row.try_get(0).map_err(pg_error(t, "list nodes"))?;
        let session_pid: i32 = row.try_get(1).map_err(pg_error(t, "list nodes"))?;
        let liveness: String = row.try_get(2).map_err(pg_error(t, "list nodes"))?;
        let age: f64 = row.try_get(3).map_err(pg_error(t, "list nodes"))?;
        let mut tx = conn.transaction().map_err(pg_error(t, "begin a rescue"))?;
        let reason =
            if liveness == "session_lock" {
                let key = i32::try_from(id).unwrap_or(i32::MAX);
                let free: bool = tx
                    .query_one(
                        "SELECT pg_try_advisory_xact_lock(hashtext(current_schema()), $1)",
                        &[&key],
                    )
                    .and_then(|r| r.try_get(0))
                    .map_err(pg_error(t, "test a node's lock"))?;
                if free {
                    Some("its database session ended".to_string())
                } else {
                    if age > dead_after {
                        tracing::warn!(node = id, session_pid, heartbeat_age_s = age,
                        "node holds its lock but its heartbeat is stale: terminating its session");
                        tx.execute("SELECT pg_terminate_backend($1, 5000)", &[&session_pid])
                            .map_err(pg_error(t, "terminate a wedged node's session"))?;
                    }
                    None
                }
            } else if age > dead_after {
                Some(format!(
                    "its heartbeat is {age:.1} s old, over the {dead_after:.1} s bound"
                ))
            } else {
                None
            };
        let Some(reason) = reason else {
            tx.rollback().map_err(pg_error(t, "end a rescue"))?;
            continue;
        };
        tx.execute("DELETE FROM omniq_nodes WHERE id = $1", &[&id])
            .map_err(pg_error(t, "remove a dead node"))?;
        let batch = charge(
            sh,
            &mut tx,
            &stmts,
            RUNNING_OF_NODE,
            Some(id),
            &reason,
            &mut report,
        )?;
        tx.commit().map_err(pg_error(t, "commit a rescue"))?;
        tracing::warn!(node = id, %reason, "removed a dead node");
        batch.publish(sh);
    }
    let mut tx = conn.transaction().map_err(pg_error(t, "begin a rescue"))?;
    let batch = charge(
        sh,
        &mut tx,
        &stmts,
        RUNNING_WITHOUT_NODE,
        None,
        "its node is no longer registered",
        &mut report,
    )?;
    tx.commit().map_err(pg_error(t, "commit a rescue"))?;
    batch.publish(sh);
    report.duration = started.elapsed();
    if report.recovered > 0 {
        tracing::info!(
            recovered = report.recovered,
            requeued = report.requeued,
            failed = report.failed,
            "rescued executions of dead nodes"
        );
    }
    Ok(report)
}

/// Charges every running task `query` selects (locked, in id order) a `"crash"`.
fn charge(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Arc<Stmts>,
    query: &str,
    node: Option<i64>,
    reason: &str,
    report: &mut RecoveryReport,
) -> Result<Batch> {
    let t = &sh.target;
    let rows = match node {
        Some(id) => tx.query(query, &[&id]),
        None => tx.query(query, &[]),
    }
    .map_err(pg_error(t, "find orphaned executions"))?;
    let now = sh.clock.now();
    let mut batch = Batch::new(stmts.clone());
    for row in &rows {
        let rec = match task_from_row(row, t) {
            Ok(r) => r,
            Err(e) => {
                let key = match &e {
                    Error::Corrupt { key, .. } => key.clone(),
                    _ => format!("{}.omniq_tasks", t.label()),
                };
                tracing::error!(error = %e, "orphaned task's row does not decode; left as it is");
                report.corrupt.push(CorruptEntry {
                    key,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let dead = node.map(|n| format!(" (node {n})")).unwrap_or_default();
        let error = TaskError::transient(
            "crash",
            format!(
                "the process running attempt {}{dead} stopped before the attempt finished: \
                 {reason} (found by node {})",
                rec.attempts, sh.node
            ),
        );
        let backoff = rec
            .backoff
            .or_else(|| sh.backoff.per_queue.get(&rec.queue).copied())
            .unwrap_or(sh.backoff.default);
        let unit = sh.jitter.lock().unit();
        let Ok((next, cause)) = lifecycle::fail(&rec, rec.lease, error, now, &backoff, unit) else {
            continue;
        };
        batch.update(&rec, &next);
        report.count(
            &rec,
            next.status,
            "rescued an execution orphaned by a dead node",
        );
        batch.record(sh, Some(rec), Some(next), Some(cause), now);
    }
    batch.write(sh, tx)?;
    Ok(batch)
}
