//! Transitions and reads in SQL. Every transition: read the row (locked), apply the pure rule
//! from `lifecycle.rs`, write the result fenced by lease and state, write its log row and
//! counter deltas, all in one transaction; reply after `COMMIT`; then tell local listeners
//! ([`Notify::after_commit`](crate::events::Notify::after_commit)) and, throttled, the other
//! processes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use postgres::{Statement, Transaction};

use super::node::Signal;
use super::rows::{
    log_cols, log_from_row, parse_state, state_name, task_cols, task_from_row, to_i32, to_i64,
    to_json, TaskParams,
};
use super::{pg_error, Shared};
use crate::backend::{ClaimRequest, DueSummary, FinishRequest};
use crate::commit::{Finished, Outcome};
use crate::error::{Error, Result};
use crate::inspect::{ConsistencyReport, CorruptEntry, ListFilter, Page};
use crate::lifecycle::{self, Refusal};
use crate::log::{Cause, LogEntry};
use crate::retry::Backoff;
use crate::store::{Change, QueueSet};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

const READ_FOR_UPDATE: &str = concat!(
    "SELECT ",
    task_cols!(),
    " FROM omniq_tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
);

/// The fence: each row is written only if it still has the lease and state the rule saw. One
/// statement for every transition of a transaction. The same statement releases the unique key
/// of every task it takes out of its hold set (`rules::unique`; bit `1 << status code`).
const UPDATE_FENCED: &str =
    "WITH upd AS (UPDATE omniq_tasks t SET state = u.state, attempts = u.attempts, \
     run_at = u.run_at, started_at = u.started_at, finished_at = u.finished_at, \
     result = u.result, last_error = u.last_error, errors = u.errors, node = u.node, \
     lease = u.lease \
     FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int4[], $5::int8[], $6::int8[], \
     $7::int8[], $8::bytea[], $9::jsonb[], $10::jsonb[], $11::int8[], $12::int8[], $13::text[]) \
     AS u(id, old_lease, state, attempts, run_at, started_at, finished_at, result, last_error, \
     errors, node, lease, old_state) \
     WHERE t.id = u.id AND t.lease = u.old_lease AND t.state = u.old_state \
     RETURNING t.id, t.state), \
     released AS (DELETE FROM omniq_unique k USING upd WHERE k.task_id = upd.id \
     AND (k.states::int & (CASE upd.state WHEN 'pending' THEN 2 WHEN 'running' THEN 4 \
     WHEN 'completed' THEN 8 WHEN 'failed' THEN 16 ELSE 32 END)) = 0) \
     SELECT id FROM upd";

const INSERT_TASK: &str = concat!(
    "INSERT INTO omniq_tasks (",
    task_cols!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
);

/// The claim: one statement. The CTE picks at most `$3` due pending rows in claim order from
/// the partial index, skipping rows other transactions hold; the UPDATE moves exactly those to
/// running, counts the attempt and draws a new lease.
///
/// The pause filter is written `NOT EXISTS (any pause) OR NOT EXISTS (this queue's pause)` on
/// purpose: as a plain anti-join with `omniq_paused` (never analyzed, so estimated at 1,200
/// rows, against a queue column with one distinct value) the planner expects almost no row to
/// survive, sorts every pending row instead of walking the claim-order index, and a claim at
/// 200,000 pending took 140 ms instead of 0.2 ms (issue 9's deep-queue drain).
macro_rules! claim_sql {
    ($queue_filter:literal) => {
        concat!(
            "WITH due AS (SELECT id AS due_id, lease AS old_lease, started_at AS old_started \
             FROM omniq_tasks WHERE state = 'pending' AND run_at <= $1",
            $queue_filter,
            " AND (NOT EXISTS (SELECT 1 FROM omniq_paused) \
             OR NOT EXISTS (SELECT 1 FROM omniq_paused p WHERE p.queue = omniq_tasks.queue))",
            " ORDER BY priority DESC, run_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             UPDATE omniq_tasks SET state = 'running', attempts = attempts + 1, started_at = $1, \
             lease = nextval('omniq_lease_seq'), node = $4 FROM due WHERE id = due.due_id \
             RETURNING old_lease, old_started, ",
            task_cols!()
        )
    };
}
const CLAIM_ANY: &str = claim_sql!(" AND $2::text[] IS NULL");
const CLAIM_QUEUES: &str = claim_sql!(" AND queue = ANY($2)");

/// This node still counts as alive: its row exists (a rescuer deletes it before charging its
/// executions). `FOR KEY SHARE` makes a rescuer's delete wait for this claim's commit. It also
/// takes the pause lock shared: a pause waits for claims in flight, and later claims see it.
/// Its one column says whether any limit exists (then the claims of this transaction go
/// through `rules::claim_limited`, which locks the limit rows and reads them again; a limit set
/// while this claim is in flight applies from the next claim, as if set just after it).
const NODE_ALIVE: &str = "SELECT EXISTS (SELECT 1 FROM omniq_limits) FROM omniq_nodes, \
     (SELECT pg_advisory_xact_lock_shared(hashtext(current_schema()), -1)) AS pause_lock \
     WHERE id = $1 FOR KEY SHARE OF omniq_nodes";

const INSERT_LOG: &str = "INSERT INTO omniq_log (task_id, from_state, to_state, attempt, cause, \
     at, run_id) SELECT t, f, s, a, c, w, r FROM unnest($1::uuid[], $2::text[], $3::text[], \
     $4::int4[], $5::jsonb[], $6::int8[], $7::int8[]) WITH ORDINALITY AS u(t, f, s, a, c, w, r, o) \
     ORDER BY o RETURNING seq";

/// Counter deltas, in (queue, state) order so that concurrent transactions lock counter rows
/// in the same order; each connection writes its own shard.
const ADD_COUNTS: &str = "INSERT INTO omniq_counts (queue, state, shard, n) \
     SELECT q, s, pg_backend_pid() % 16, d FROM unnest($1::text[], $2::text[], $3::int8[]) \
     AS u(q, s, d) ORDER BY q, s \
     ON CONFLICT (queue, state, shard) DO UPDATE SET n = omniq_counts.n + EXCLUDED.n";

/// [`INSERT_LOG`] and [`ADD_COUNTS`] as one statement (one round trip instead of two): the
/// counter upsert runs as a data-modifying CTE, which PostgreSQL executes to completion whether
/// or not the main query reads it.
const INSERT_LOG_ADD_COUNTS: &str =
    "WITH counted AS (INSERT INTO omniq_counts (queue, state, shard, n) \
     SELECT q, s, pg_backend_pid() % 16, d FROM unnest($8::text[], $9::text[], $10::int8[]) \
     AS u(q, s, d) ORDER BY q, s \
     ON CONFLICT (queue, state, shard) DO UPDATE SET n = omniq_counts.n + EXCLUDED.n RETURNING 1) \
     INSERT INTO omniq_log (task_id, from_state, to_state, attempt, cause, \
     at, run_id) SELECT t, f, s, a, c, w, r FROM unnest($1::uuid[], $2::text[], $3::text[], \
     $4::int4[], $5::jsonb[], $6::int8[], $7::int8[]) WITH ORDINALITY AS u(t, f, s, a, c, w, r, o) \
     ORDER BY o RETURNING seq";

/// The statements of the transition path, prepared once per pooled connection (an unprepared
/// query costs an extra round trip each time).
pub(crate) struct Stmts {
    read_for_update: Statement,
    update_fenced: Statement,
    insert_log: Statement,
    add_counts: Statement,
    insert_log_add_counts: Statement,
    node_alive: Statement,
    claim_any: Statement,
    claim_queues: Statement,
    pub(crate) insert_task: Statement,
    /// Unique keys and limited claims (`rules.rs`).
    pub(crate) rules: super::rules::RuleStmts,
}

impl Stmts {
    pub(crate) fn prepare(c: &mut postgres::Client) -> std::result::Result<Stmts, postgres::Error> {
        Ok(Stmts {
            read_for_update: c.prepare(READ_FOR_UPDATE)?,
            update_fenced: c.prepare(UPDATE_FENCED)?,
            insert_log: c.prepare(INSERT_LOG)?,
            add_counts: c.prepare(ADD_COUNTS)?,
            insert_log_add_counts: c.prepare(INSERT_LOG_ADD_COUNTS)?,
            node_alive: c.prepare(NODE_ALIVE)?,
            claim_any: c.prepare(CLAIM_ANY)?,
            claim_queues: c.prepare(CLAIM_QUEUES)?,
            insert_task: c.prepare(INSERT_TASK)?,
            rules: super::rules::RuleStmts::prepare(c)?,
        })
    }
}

/// A fenced row write waiting for [`Batch::flush`].
struct Update {
    /// The row as read (its lease and state are the fence).
    old_lease: i64,
    old_state: &'static str,
    next: TaskInfo,
}

/// The transitions of one transaction, and what to tell once it commits.
pub(crate) struct Batch {
    stmts: Arc<Stmts>,
    changes: Vec<Change>,
    deltas: BTreeMap<(String, &'static str), i64>,
    signals: BTreeSet<Signal>,
    /// Fenced row writes not yet sent, by task (a second transition of the same task in one
    /// transaction replaces the new values and keeps the first fence).
    updates: Vec<Update>,
    update_index: HashMap<TaskId, usize>,
}

impl Batch {
    pub(crate) fn new(stmts: Arc<Stmts>) -> Batch {
        Batch {
            stmts,
            changes: Vec::new(),
            deltas: BTreeMap::new(),
            signals: BTreeSet::new(),
            updates: Vec::new(),
            update_index: HashMap::new(),
        }
    }

    /// Queues the write of `next` over `rec`, fenced by `rec`'s lease and state.
    pub(crate) fn update(&mut self, rec: &TaskInfo, next: &TaskInfo) {
        match self.update_index.get(&rec.id) {
            Some(&i) => self.updates[i].next = next.clone(),
            None => {
                self.update_index.insert(rec.id, self.updates.len());
                self.updates.push(Update {
                    old_lease: to_i64(rec.lease),
                    old_state: state_name(rec.status),
                    next: next.clone(),
                });
            }
        }
    }

    /// Sends the queued row writes in one statement. We hold every row's lock, so a row the
    /// fence refuses means the database and this code disagree: an error, not a skip.
    pub(crate) fn flush(&mut self, sh: &Shared, tx: &mut Transaction<'_>) -> Result<()> {
        if self.updates.is_empty() {
            return Ok(());
        }
        let updates = std::mem::take(&mut self.updates);
        self.update_index.clear();
        let mut ids = Vec::with_capacity(updates.len());
        let (mut old_lease, mut state, mut attempts, mut run_at) = (vec![], vec![], vec![], vec![]);
        let (mut started, mut finished, mut result, mut last_error) =
            (vec![], vec![], vec![], vec![]);
        let (mut errors, mut node, mut lease, mut old_state) = (vec![], vec![], vec![], vec![]);
        for u in &updates {
            let p = TaskParams::new(&u.next, None)?;
            ids.push(p.id);
            old_lease.push(u.old_lease);
            state.push(p.state);
            attempts.push(p.attempts);
            run_at.push(p.run_at);
            started.push(p.started_at);
            finished.push(p.finished_at);
            result.push(p.result);
            last_error.push(p.last_error);
            errors.push(p.errors);
            node.push(if u.next.status == Status::Running {
                Some(to_i64(sh.node))
            } else {
                None
            });
            lease.push(p.lease);
            old_state.push(u.old_state);
        }
        let rows = tx
            .query(
                &self.stmts.update_fenced,
                &[
                    &ids,
                    &old_lease,
                    &state,
                    &attempts,
                    &run_at,
                    &started,
                    &finished,
                    &result,
                    &last_error,
                    &errors,
                    &node,
                    &lease,
                    &old_state,
                ],
            )
            .map_err(pg_error(&sh.target, "write transitions"))?;
        if rows.len() != updates.len() {
            let written: HashSet<uuid::Uuid> =
                rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
            let missed = updates
                .iter()
                .find(|u| !written.contains(&u.next.id.0))
                .map(|u| u.next.id.to_string())
                .unwrap_or_default();
            return Err(Error::Storage(format!(
                "PostgreSQL {}: task {missed} changed under its row lock",
                sh.target.label()
            )));
        }
        Ok(())
    }

    /// Records a transition already written to its row (the log row comes in [`Batch::write`]).
    pub(crate) fn record(
        &mut self,
        sh: &Shared,
        before: Option<TaskInfo>,
        after: Option<TaskInfo>,
        cause: Option<Cause>,
        now: Timestamp,
    ) {
        if let Some(b) = &before {
            *self
                .deltas
                .entry((b.queue.clone(), state_name(b.status)))
                .or_default() -= 1;
        }
        match &after {
            Some(a) => {
                *self
                    .deltas
                    .entry((a.queue.clone(), state_name(a.status)))
                    .or_default() += 1;
                if a.status == Status::Pending {
                    self.signals.insert(Signal::Work(a.queue.clone()));
                } else if a.status.is_terminal() {
                    self.signals.insert(Signal::Done(a.queue.clone()));
                }
            }
            None => {
                if let Some(b) = &before {
                    self.signals.insert(Signal::Done(b.queue.clone()));
                }
            }
        }
        let log = match (&after, cause) {
            (Some(a), Some(cause)) => Some(LogEntry {
                seq: 0,
                task_id: a.id,
                from: before.as_ref().map(|b| b.status),
                to: a.status,
                attempt: a.attempts,
                cause,
                at: now,
                run_id: sh.node,
            }),
            _ => None,
        };
        self.changes.push(Change {
            before,
            after,
            log,
            side: Vec::new(),
        });
    }

    /// Writes the queued rows, the log rows (filling in their sequence numbers) and the counter
    /// deltas.
    pub(crate) fn write(&mut self, sh: &Shared, tx: &mut Transaction<'_>) -> Result<()> {
        self.flush(sh, tx)?;
        let t = &sh.target;
        let entries: Vec<&LogEntry> = self.changes.iter().filter_map(|c| c.log.as_ref()).collect();
        self.deltas.retain(|_, d| *d != 0);
        let queues: Vec<&str> = self.deltas.keys().map(|(q, _)| q.as_str()).collect();
        let states: Vec<&str> = self.deltas.keys().map(|(_, s)| *s).collect();
        let deltas: Vec<i64> = self.deltas.values().copied().collect();
        // The counters ride with the log rows when there are both.
        let mut counted = false;
        if !entries.is_empty() {
            let ids: Vec<uuid::Uuid> = entries.iter().map(|e| e.task_id.0).collect();
            let from: Vec<Option<&str>> = entries.iter().map(|e| e.from.map(state_name)).collect();
            let to: Vec<&str> = entries.iter().map(|e| state_name(e.to)).collect();
            let attempt: Vec<i32> = entries.iter().map(|e| to_i32(e.attempt)).collect();
            let cause = entries
                .iter()
                .map(|e| to_json("log cause", &e.cause))
                .collect::<Result<Vec<_>>>()?;
            let at: Vec<i64> = entries.iter().map(|e| to_i64(e.at.0)).collect();
            let run: Vec<i64> = entries.iter().map(|e| to_i64(e.run_id)).collect();
            let rows = if deltas.is_empty() {
                tx.query(
                    &self.stmts.insert_log,
                    &[&ids, &from, &to, &attempt, &cause, &at, &run],
                )
            } else {
                counted = true;
                tx.query(
                    &self.stmts.insert_log_add_counts,
                    &[
                        &ids, &from, &to, &attempt, &cause, &at, &run, &queues, &states, &deltas,
                    ],
                )
            }
            .map_err(pg_error(t, "write the transition log and counters"))?;
            let mut seqs = rows
                .iter()
                .map(|r| r.try_get::<_, i64>(0))
                .collect::<std::result::Result<Vec<i64>, _>>()
                .map_err(pg_error(t, "read the log sequence numbers"))?;
            seqs.sort_unstable();
            if seqs.len() != entries.len() {
                return Err(Error::Storage(format!(
                    "PostgreSQL {}: wrote {} log rows but got {} sequence numbers back",
                    t.label(),
                    entries.len(),
                    seqs.len()
                )));
            }
            let mut seqs = seqs.into_iter();
            for c in &mut self.changes {
                if let (Some(log), Some(seq)) = (c.log.as_mut(), seqs.next()) {
                    log.seq = u64::try_from(seq).unwrap_or(0);
                }
            }
        }
        if !counted && !deltas.is_empty() {
            tx.execute(&self.stmts.add_counts, &[&queues, &states, &deltas])
                .map_err(pg_error(t, "update the task counters"))?;
        }
        Ok(())
    }

    /// After COMMIT: local listeners at once, other processes through the notifier.
    pub(crate) fn publish(self, sh: &Shared) {
        if self.changes.is_empty() {
            return;
        }
        sh.notify.after_commit(&self.changes);
        for s in self.signals {
            let _ = sh.to_notify.send(s);
        }
    }
}

/// The backoff of a task: its own, else its queue's, else the default.
fn backoff_for(sh: &Shared, t: &TaskInfo) -> Backoff {
    t.backoff
        .or_else(|| sh.backoff.per_queue.get(&t.queue).copied())
        .unwrap_or(sh.backoff.default)
}

/// Reads and locks `ids` (in id order, so concurrent transactions cannot deadlock on them).
pub(crate) fn lock_rows(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    ids: &[TaskId],
) -> Result<HashMap<TaskId, Result<TaskInfo>>> {
    let mut uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    uuids.sort_unstable();
    uuids.dedup();
    let rows = tx
        .query(&stmts.read_for_update, &[&uuids])
        .map_err(pg_error(&sh.target, "read tasks"))?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: uuid::Uuid = row
            .try_get("id")
            .map_err(pg_error(&sh.target, "read a task id"))?;
        out.insert(TaskId(id), task_from_row(row, &sh.target));
    }
    Ok(out)
}

/// One `submit`: its finishes, then its claim, as the dispatcher sent them.
pub(crate) struct Submission {
    pub finishes: Vec<FinishRequest>,
    pub claim: Option<ClaimRequest>,
}

/// What one submission gets back once its transaction committed.
struct Answer {
    finishes: Vec<Result<Finished>>,
    claim: Option<Result<Vec<TaskInfo>>>,
}

/// Why a group's transaction did not commit, and whether `COMMIT` itself was under way (its
/// outcome is then unknown, and nothing may be tried again).
struct Failure {
    error: Error,
    at_commit: bool,
}

/// Commits a group of submissions in one transaction — every finish (each fenced by its lease
/// and decided by `lifecycle`), then each claim in order with its own `n` — and only then
/// replies, in submission order.
///
/// If the transaction fails before `COMMIT` was sent and the group holds more than one
/// submission, each submission is tried again alone, so one request that cannot be written
/// does not fail the others. If `COMMIT` itself failed (its outcome unknown), or a submission
/// alone fails, every request in the failed transaction is answered with the error: a finish
/// is then recorded by a later open's rescue, a claim is retried by the dispatcher.
pub(crate) fn commit_group(sh: &Shared, group: Vec<Submission>) {
    match run_group(sh, &group) {
        Ok((answers, batch)) => {
            sh.transactions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            batch.publish(sh);
            for (s, a) in group.into_iter().zip(answers) {
                for (f, r) in s.finishes.into_iter().zip(a.finishes) {
                    let _ = f.reply.send(r);
                }
                if let (Some(c), Some(r)) = (s.claim, a.claim) {
                    let _ = c.reply.send(r);
                }
            }
        }
        Err(f) if group.len() > 1 && !f.at_commit => {
            tracing::warn!(error = %f.error, submissions = group.len(), "a grouped transaction failed; committing its submissions one by one");
            for s in group {
                commit_group(sh, vec![s]);
            }
        }
        Err(f) => {
            for s in group {
                for r in s.finishes {
                    let _ = r.reply.send(Err(f.error.duplicate()));
                }
                if let Some(c) = s.claim {
                    let _ = c.reply.send(Err(f.error.duplicate()));
                }
            }
        }
    }
}

fn run_group(
    sh: &Shared,
    group: &[Submission],
) -> std::result::Result<(Vec<Answer>, Batch), Failure> {
    let before = |error: Error| Failure {
        error,
        at_commit: false,
    };
    let t = &sh.target;
    let mut conn = sh.pool.get().map_err(before)?;
    let stmts = conn
        .stmts()
        .map_err(pg_error(t, "prepare statements"))
        .map_err(before)?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))
        .map_err(before)?;
    let (answers, batch) = transitions(sh, &mut tx, &stmts, group).map_err(before)?;
    tx.commit().map_err(|e| Failure {
        error: pg_error(t, "commit")(e),
        at_commit: true,
    })?;
    Ok((answers, batch))
}

/// The statements of a group's transaction: node check, one row-lock read for every finish,
/// the rules, one fenced `UPDATE` for every finished row, the claims (one statement for each
/// run of consecutive claims on the same queues), then one statement for every log row and
/// counter delta.
fn transitions(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Arc<Stmts>,
    group: &[Submission],
) -> Result<(Vec<Answer>, Batch)> {
    let t = &sh.target;
    // A claim first checks that this node is still registered (see NODE_ALIVE), before the
    // finishes lock task rows: a rescuer deleting the node row never waits on a task row lock
    // held by this transaction, so the two cannot deadlock.
    let (alive, limited) = if group.iter().any(|s| s.claim.is_some()) && sh.session_lost().is_none()
    {
        match tx
            .query_opt(&stmts.node_alive, &[&to_i64(sh.node)])
            .map_err(pg_error(t, "check this node's row"))?
        {
            Some(row) => (
                true,
                row.try_get::<_, bool>(0)
                    .map_err(pg_error(t, "check this node's row"))?,
            ),
            None => (false, false),
        }
    } else {
        (false, false)
    };
    let now = sh.clock.now();
    let mut batch = Batch::new(stmts.clone());
    let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
    let ids: Vec<TaskId> = group
        .iter()
        .flat_map(|s| s.finishes.iter().map(|f| f.id))
        .collect();
    let mut current = if ids.is_empty() {
        HashMap::new()
    } else {
        lock_rows(sh, tx, stmts, &ids)?
    };
    for s in group {
        let mut results = Vec::with_capacity(s.finishes.len());
        for f in &s.finishes {
            let id = f.id;
            let rec = match current.get(&id) {
                None => {
                    results.push(Err(Error::NotFound(id)));
                    continue;
                }
                Some(Err(e)) => {
                    results.push(Err(e.duplicate()));
                    continue;
                }
                Some(Ok(rec)) => rec.clone(),
            };
            let step = match &f.outcome {
                Outcome::Success(bytes) => lifecycle::succeed(&rec, f.lease, bytes.clone(), now),
                Outcome::Failure(err) => {
                    let b = backoff_for(sh, &rec);
                    let unit = sh.jitter.lock().unit();
                    lifecycle::fail(&rec, f.lease, err.clone(), now, &b, unit)
                }
                Outcome::Cancelled => lifecycle::cancel_running(&rec, f.lease, now),
                Outcome::Released => lifecycle::release(&rec, f.lease, now),
            };
            results.push(match step {
                Ok((next, cause)) => {
                    batch.update(&rec, &next);
                    current.insert(id, Ok(next.clone()));
                    batch.record(sh, Some(rec), Some(next.clone()), Some(cause), now);
                    Ok(Finished::Applied(Box::new(next)))
                }
                Err(Refusal::Stale) | Err(Refusal::WrongState(_)) => Ok(Finished::Stale),
                Err(r) => Err(r.into_error(id, "finish", "running")),
            });
        }
        answers.push(Answer {
            finishes: results,
            claim: None,
        });
    }
    // The finishes' rows are written before the claims look for due work (a retried task
    // with no backoff is claimable in the same transaction, as with the sled writer).
    batch.flush(sh, tx)?;
    // Consecutive claims for the same queues run as one statement for all their tasks (a
    // dispatcher with claim-ahead sends many small claims): the best tasks go to the earliest
    // claim, in submission order, each getting at most what it asked for.
    let claims: Vec<(usize, &ClaimRequest)> = group
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.claim.as_ref().map(|c| (i, c)))
        .collect();
    for run in claims.chunk_by(|a, b| a.1.queues == b.1.queues) {
        let queues = &run[0].1.queues;
        let stmt = match queues {
            QueueSet::All => &stmts.claim_any,
            QueueSet::Named(_) => &stmts.claim_queues,
        };
        let n: usize = run.iter().map(|(_, c)| c.n).sum();
        let due_by = run.iter().map(|(_, c)| c.now).max().unwrap_or(now);
        match claim_in(
            sh,
            tx,
            stmts,
            stmt,
            queues,
            n,
            due_by,
            now,
            (alive, limited),
            &mut batch,
        )? {
            Ok(tasks) => {
                let mut tasks = tasks.into_iter();
                for (i, c) in run {
                    answers[*i].claim = Some(Ok(tasks.by_ref().take(c.n).collect()));
                }
            }
            Err(e) => {
                for (i, _) in run {
                    answers[*i].claim = Some(Err(e.duplicate()));
                }
            }
        }
    }
    batch.write(sh, tx)?;
    Ok((answers, batch))
}

/// The claim inside a transaction. `Ok(Err(_))` refuses the claim alone (session lost); the
/// finishes of the same transaction still commit.
/// `(alive, limited)` is what `NODE_ALIVE` answered.
#[allow(clippy::too_many_arguments)]
fn claim_in(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    stmt: &postgres::Statement,
    queues: &QueueSet,
    n: usize,
    due_by: Timestamp,
    now: Timestamp,
    (alive, limited): (bool, bool),
    batch: &mut Batch,
) -> Result<Result<Vec<TaskInfo>>> {
    let t = &sh.target;
    if let Some(e) = sh.session_lost() {
        return Ok(Err(e));
    }
    if n == 0 {
        return Ok(Ok(Vec::new()));
    }
    if !alive {
        sh.mark_lost("its node row was deleted: another process found it dead".into());
        return Ok(Err(sh.session_lost().unwrap_or(Error::Closed)));
    }
    let node = to_i64(sh.node);
    // Claimed at the later of the claimer's idea of now and the backend's clock, as the sled
    // writer does (the rule then checks the task is due by that time).
    let claim_at = due_by.max(now);
    if limited {
        if let Some(claimed) =
            super::rules::claim_limited(sh, tx, stmts, queues, n, claim_at, batch)?
        {
            return Ok(Ok(claimed));
        }
    }
    let names: Option<Vec<String>> = match queues {
        QueueSet::All => None,
        QueueSet::Named(v) => Some(v.clone()),
    };
    let limit = i64::try_from(n).unwrap_or(i64::MAX);
    let rows = tx
        .query(stmt, &[&to_i64(claim_at.0), &names, &limit, &node])
        .map_err(pg_error(t, "claim due tasks"))?;
    claimed_rows(sh, &rows, claim_at, batch).map(Ok)
}

/// The rows a claim statement returned, checked against the claim rule and recorded; best
/// first.
pub(crate) fn claimed_rows(
    sh: &Shared,
    rows: &[postgres::Row],
    claim_at: Timestamp,
    batch: &mut Batch,
) -> Result<Vec<TaskInfo>> {
    let t = &sh.target;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        let after_db = task_from_row(row, t)?;
        let old_lease: i64 = row
            .try_get("old_lease")
            .map_err(pg_error(t, "read a claimed task"))?;
        let old_started: Option<i64> = row
            .try_get("old_started")
            .map_err(pg_error(t, "read a claimed task"))?;
        let mut before = after_db.clone();
        before.status = Status::Pending;
        before.attempts = after_db.attempts.saturating_sub(1);
        before.lease = u64::try_from(old_lease).unwrap_or(0);
        before.started_at = old_started
            .and_then(|s| u64::try_from(s).ok())
            .map(Timestamp);
        // The SQL did the rule's work; check it agrees with the rule, exactly.
        let (after, cause) = lifecycle::claim(&before, claim_at, after_db.lease).map_err(|r| {
            Error::Storage(format!(
                "PostgreSQL {}: claimed task {} that the rules refuse to claim ({r:?})",
                t.label(),
                before.id
            ))
        })?;
        if after != after_db {
            return Err(Error::Storage(format!(
                "PostgreSQL {}: the claim of task {} disagrees with the rules",
                t.label(),
                before.id
            )));
        }
        batch.record(sh, Some(before), Some(after.clone()), Some(cause), claim_at);
        claimed.push(after);
    }
    // Best first, as the statement picked them (RETURNING does not keep that order).
    claimed.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.next_run_at.cmp(&b.next_run_at))
            .then(a.id.cmp(&b.id))
    });
    Ok(claimed)
}

/// New pending tasks, all or none.
pub(crate) fn insert(sh: &Shared, tasks: Vec<TaskInfo>) -> Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let t = &sh.target;
    if let Some(bad) = tasks.iter().find(|x| x.status != Status::Pending) {
        return Err(Error::Invalid {
            what: "new task",
            reason: format!("task {} is {}, not PENDING", bad.id, bad.status),
        });
    }
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let now = sh.clock.now();
    let mut batch = Batch::new(stmts.clone());
    for task in tasks {
        let p = TaskParams::new(&task, None)?;
        tx.execute(&stmts.insert_task, &p.all())
            .map_err(pg_error(t, "insert a task"))?;
        batch.record(sh, None, Some(task), Some(Cause::Enqueued), now);
    }
    batch.write(sh, &mut tx)?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    batch.publish(sh);
    Ok(())
}

type Rule = fn(&TaskInfo, Timestamp) -> std::result::Result<(TaskInfo, Cause), Refusal>;

/// What a transition must also do in its transaction once the rule said yes (a manual retry
/// takes its unique key back).
type Also = fn(&Shared, &mut Transaction<'_>, &Stmts, &TaskInfo) -> Result<()>;

fn one_transition(
    sh: &Shared,
    id: TaskId,
    rule: Rule,
    also: Option<Also>,
    op: &'static str,
    expected: &'static str,
) -> Result<TaskInfo> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let now = sh.clock.now();
    let rec = lock_rows(sh, &mut tx, &stmts, &[id])?
        .remove(&id)
        .ok_or(Error::NotFound(id))??;
    let (next, cause) = rule(&rec, now).map_err(|r| r.into_error(id, op, expected))?;
    if let Some(also) = also {
        also(sh, &mut tx, &stmts, &rec)?;
    }
    let mut batch = Batch::new(stmts.clone());
    batch.update(&rec, &next);
    batch.record(sh, Some(rec), Some(next.clone()), Some(cause), now);
    batch.write(sh, &mut tx)?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    batch.publish(sh);
    Ok(next)
}

pub(crate) fn cancel(sh: &Shared, id: TaskId) -> Result<TaskInfo> {
    one_transition(sh, id, lifecycle::cancel, None, "cancel", "PENDING")
}

pub(crate) fn retry(sh: &Shared, id: TaskId) -> Result<TaskInfo> {
    one_transition(
        sh,
        id,
        lifecycle::manual_retry,
        // The state rule first: a task that cannot be retried at all is refused for that
        // reason, whoever holds its unique key.
        Some(super::rules::retake_key),
        "retry",
        "FAILED or CANCELLED",
    )
}

const PURGE: &str = concat!(
    "WITH victims AS (SELECT id AS victim FROM omniq_tasks \
     WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at < $1 \
     ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     DELETE FROM omniq_tasks USING victims WHERE id = victims.victim RETURNING ",
    task_cols!()
);

/// Deletes up to `limit` terminal tasks finished before `cutoff`, with their log rows.
pub(crate) fn purge(sh: &Shared, cutoff: Timestamp, limit: usize) -> Result<usize> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let rows = tx
        .query(
            PURGE,
            &[&to_i64(cutoff.0), &i64::try_from(limit).unwrap_or(i64::MAX)],
        )
        .map_err(pg_error(t, "delete finished tasks"))?;
    let now = sh.clock.now();
    let mut batch = Batch::new(stmts);
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let rec = task_from_row(row, t)?;
        ids.push(rec.id.0);
        batch.record(sh, Some(rec), None, None, now);
    }
    if !ids.is_empty() {
        tx.execute("DELETE FROM omniq_log WHERE task_id = ANY($1)", &[&ids])
            .map_err(pg_error(t, "delete finished tasks' history"))?;
        super::rules::forget(sh, &mut tx, &ids)?;
    }
    batch.write(sh, &mut tx)?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    batch.publish(sh);
    Ok(ids.len())
}

// ----- reads ------------------------------------------------------------------------------

const GET: &str = concat!("SELECT ", task_cols!(), " FROM omniq_tasks WHERE id = $1");

pub(crate) fn get(sh: &Shared, id: TaskId) -> Result<Option<TaskInfo>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let stmt = conn.prepared(GET).map_err(pg_error(t, "prepare a read"))?;
    let row = conn
        .query_opt(&stmt, &[&id.0])
        .map_err(pg_error(t, "read a task"))?;
    row.map(|r| task_from_row(&r, t)).transpose()
}

const LIST: &str = concat!(
    "SELECT ",
    task_cols!(),
    " FROM omniq_tasks WHERE ($1::text IS NULL OR state = $1) \
     AND ($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR kind = $3) \
     AND ($4::uuid IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
);

pub(crate) fn list(sh: &Shared, filter: &ListFilter) -> Result<Page> {
    let t = &sh.target;
    let limit = filter.effective_limit();
    let mut conn = sh.pool.get()?;
    let rows = conn
        .query(
            LIST,
            &[
                &filter.status.map(state_name),
                &filter.queue,
                &filter.kind,
                &filter.cursor.map(|c| c.0),
                &i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
            ],
        )
        .map_err(pg_error(t, "list tasks"))?;
    let mut page = Page {
        tasks: Vec::new(),
        next_cursor: None,
        corrupt: Vec::new(),
    };
    for (i, row) in rows.iter().enumerate() {
        if i == limit {
            break;
        }
        let id: Option<uuid::Uuid> = row.try_get("id").ok();
        match task_from_row(row, t) {
            Ok(task) => page.tasks.push(task),
            Err(e) => page.corrupt.push(CorruptEntry {
                key: format!(
                    "{}.omniq_tasks id={}",
                    t.label(),
                    id.map(|i| i.to_string()).unwrap_or_default()
                ),
                reason: e.to_string(),
            }),
        }
        if i + 1 == limit && rows.len() > limit {
            page.next_cursor = id.map(TaskId);
        }
    }
    Ok(page)
}

const HISTORY: &str = concat!(
    "SELECT ",
    log_cols!(),
    " FROM omniq_log WHERE task_id = $1 ORDER BY seq"
);

pub(crate) fn history(sh: &Shared, id: TaskId) -> Result<Vec<LogEntry>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let rows = conn
        .query(HISTORY, &[&id.0])
        .map_err(pg_error(t, "read a task's history"))?;
    rows.iter().map(|r| log_from_row(r, t)).collect()
}

pub(crate) fn counts(sh: &Shared) -> Result<BTreeMap<(String, Status), u64>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let rows = conn
        .query(
            "SELECT queue, state, sum(n)::bigint FROM omniq_counts GROUP BY queue, state \
             HAVING sum(n) <> 0",
            &[],
        )
        .map_err(pg_error(t, "read the task counters"))?;
    let mut out = BTreeMap::new();
    for row in &rows {
        let bad = |reason: String| Error::Corrupt {
            what: "task counter",
            key: format!("{}.omniq_counts", t.label()),
            reason,
        };
        let queue: String = row.try_get(0).map_err(|e| bad(e.to_string()))?;
        let state: &str = row.try_get(1).map_err(|e| bad(e.to_string()))?;
        let n: i64 = row.try_get(2).map_err(|e| bad(e.to_string()))?;
        let status = parse_state(state).ok_or_else(|| bad(format!("unknown state {state:?}")))?;
        let n =
            u64::try_from(n).map_err(|_| bad(format!("negative count {n} for {queue}/{state}")))?;
        out.insert((queue, status), n);
    }
    Ok(out)
}

pub(crate) fn due_summary(
    sh: &Shared,
    queues: &QueueSet,
    now: Timestamp,
    limit: usize,
) -> Result<DueSummary> {
    let t = &sh.target;
    let names: Option<Vec<String>> = match queues {
        QueueSet::All => None,
        QueueSet::Named(v) => Some(v.clone()),
    };
    let mut conn = sh.pool.get()?;
    // The pause filter as in the claim (see `claim_sql!`): an index walk that stops at `$3`.
    let row = conn
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM omniq_tasks t WHERE state = 'pending' \
             AND run_at <= $1 AND ($2::text[] IS NULL OR queue = ANY($2)) \
             AND (NOT EXISTS (SELECT 1 FROM omniq_paused) \
             OR NOT EXISTS (SELECT 1 FROM omniq_paused p WHERE p.queue = t.queue)) LIMIT $3) d), \
             (SELECT min(run_at) FROM omniq_tasks t WHERE state = 'pending' AND run_at > $1 \
             AND ($2::text[] IS NULL OR queue = ANY($2)) \
             AND NOT EXISTS (SELECT 1 FROM omniq_paused p WHERE p.queue = t.queue)), \
             EXISTS (SELECT 1 FROM omniq_limits)",
            &[
                &to_i64(now.0),
                &names,
                &i64::try_from(limit).unwrap_or(i64::MAX),
            ],
        )
        .map_err(pg_error(t, "look for due tasks"))?;
    let ready: i64 = row.try_get(0).map_err(pg_error(t, "look for due tasks"))?;
    let next: Option<i64> = row.try_get(1).map_err(pg_error(t, "look for due tasks"))?;
    let limited: bool = row.try_get(2).map_err(pg_error(t, "look for due tasks"))?;
    // Limits set by other processes count too: a finish anywhere may then free a slot.
    if limited != sh.notify.wakes_on_exit() {
        sh.notify.set_wake_on_exit(limited);
    }
    let mut next_wake = next.and_then(|n| u64::try_from(n).ok()).map(Timestamp);
    let mut ready = usize::try_from(ready).unwrap_or(0);
    if limited && ready > 0 {
        // What the limits leave of it, and when a window frees a slot (no polling while a
        // limit holds work back).
        let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
        let (admitted, frees) =
            super::rules::due_within_limits(sh, &mut *conn, &stmts, queues, now, limit)?;
        ready = admitted;
        if let Some(f) = frees {
            next_wake = Some(next_wake.map_or(f, |w: Timestamp| w.min(f)));
        }
    }
    Ok(DueSummary { ready, next_wake })
}

pub(crate) fn finished_before(sh: &Shared, cutoff: Timestamp, limit: usize) -> Result<Vec<TaskId>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let rows = conn
        .query(
            "SELECT id FROM omniq_tasks WHERE state IN ('completed', 'failed', 'cancelled') \
             AND finished_at < $1 ORDER BY finished_at, id LIMIT $2",
            &[&to_i64(cutoff.0), &i64::try_from(limit).unwrap_or(i64::MAX)],
        )
        .map_err(pg_error(t, "list finished tasks"))?;
    rows.iter()
        .map(|r| {
            r.try_get::<_, uuid::Uuid>(0)
                .map(TaskId)
                .map_err(pg_error(t, "list finished tasks"))
        })
        .collect()
}

/// Every invariant between rows, counters and the log, by full scans (an operator's tool).
pub(crate) fn check(sh: &Shared) -> Result<ConsistencyReport> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    // One snapshot for every query.
    let mut tx = conn
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg_error(t, "begin a read"))?;
    let mut report = ConsistencyReport::default();
    let q = |tx: &mut Transaction<'_>, sql: &str| {
        tx.query(sql, &[]).map_err(pg_error(t, "check consistency"))
    };
    let rows = q(
        &mut tx,
        concat!("SELECT ", task_cols!(), " FROM omniq_tasks"),
    )?;
    let mut actual: BTreeMap<(String, Status), u64> = BTreeMap::new();
    for row in &rows {
        report.tasks += 1;
        match task_from_row(row, t) {
            Ok(task) => {
                *actual.entry((task.queue.clone(), task.status)).or_default() += 1;
                let node: Option<i64> = row.try_get("node").unwrap_or(None);
                if task.status == Status::Running && (node.is_none() || task.lease == 0) {
                    report.problems.push(format!(
                        "task {} is RUNNING without a node or lease",
                        task.id
                    ));
                }
                if task.status != Status::Running && node.is_some() {
                    report.problems.push(format!(
                        "task {} is {} but names a node",
                        task.id, task.status
                    ));
                }
                if task.status.is_terminal() != task.finished_at.is_some() {
                    report.problems.push(format!(
                        "task {} is {} with finished_at {:?}",
                        task.id, task.status, task.finished_at
                    ));
                }
                if task.attempts > task.max_retries.saturating_add(1) {
                    report.problems.push(format!(
                        "task {} ran {} times, more than max_retries + 1 = {}",
                        task.id,
                        task.attempts,
                        task.max_retries.saturating_add(1)
                    ));
                }
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    let counted = {
        let rows = q(
            &mut tx,
            "SELECT queue, state, sum(n)::bigint FROM omniq_counts GROUP BY queue, state",
        )?;
        let mut m = BTreeMap::new();
        for row in &rows {
            let queue: String = row.try_get(0).map_err(pg_error(t, "read counters"))?;
            let state: String = row.try_get(1).map_err(pg_error(t, "read counters"))?;
            let n: i64 = row.try_get(2).map_err(pg_error(t, "read counters"))?;
            match parse_state(&state) {
                Some(s) => {
                    m.insert((queue, s), n);
                }
                None => report.problems.push(format!(
                    "counter for unknown state {state:?} on queue {queue}"
                )),
            }
        }
        m
    };
    let keys: BTreeSet<&(String, Status)> = actual.keys().chain(counted.keys()).collect();
    for k in keys {
        let a = actual.get(k).copied().unwrap_or(0);
        let c = counted.get(k).copied().unwrap_or(0);
        if i64::try_from(a).ok() != Some(c) {
            report.problems.push(format!(
                "counter for queue {} state {} says {c}, the table holds {a}",
                k.0, k.1
            ));
        }
    }
    let logs = q(&mut tx, "SELECT count(*) FROM omniq_log")?;
    let n: i64 = logs
        .first()
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(pg_error(t, "count log rows"))?
        .unwrap_or(0);
    report.log_entries = usize::try_from(n).unwrap_or(0);
    // The latest log row of each task names its state.
    let rows = q(
        &mut tx,
        "SELECT t.id::text, t.state, l.to_state FROM omniq_tasks t LEFT JOIN LATERAL \
         (SELECT to_state FROM omniq_log WHERE task_id = t.id ORDER BY seq DESC LIMIT 1) l \
         ON true WHERE l.to_state IS DISTINCT FROM t.state LIMIT 100",
    )?;
    for row in &rows {
        let id: String = row.try_get(0).unwrap_or_default();
        let state: String = row.try_get(1).unwrap_or_default();
        let last: Option<String> = row.try_get(2).unwrap_or(None);
        report.problems.push(format!(
            "task {id} is {state} but its last log row says {}",
            last.as_deref().unwrap_or("nothing")
        ));
    }
    // Every unique key is held by a task in its hold set.
    for row in &q(&mut tx, super::rules::CHECK_KEYS)? {
        let digest: String = row.try_get(0).unwrap_or_default();
        let id: String = row.try_get(1).unwrap_or_default();
        let state: Option<String> = row.try_get(2).unwrap_or(None);
        report.problems.push(format!(
            "unique key {digest} names task {id}, which is {} (outside its hold set)",
            state.as_deref().unwrap_or("missing")
        ));
    }
    // Attempts equal the claims logged since the last manual retry, less the releases (a
    // claimed-ahead task handed back unstarted gets its attempt back).
    let rows = q(
        &mut tx,
        "SELECT t.id::text, t.attempts, (SELECT count(*) FILTER (WHERE l.cause = '\"Claimed\"'::jsonb) \
         - count(*) FILTER (WHERE l.cause = '\"Released\"'::jsonb) FROM omniq_log l \
         WHERE l.task_id = t.id AND l.seq > coalesce((SELECT max(seq) FROM omniq_log m \
         WHERE m.task_id = t.id AND m.cause = '\"ManualRetry\"'::jsonb), 0)) AS claims \
         FROM omniq_tasks t",
    )?;
    for row in &rows {
        let attempts: i32 = row.try_get(1).unwrap_or(-1);
        let claims: i64 = row.try_get(2).unwrap_or(-1);
        if i64::from(attempts) != claims {
            let id: String = row.try_get(0).unwrap_or_default();
            report.problems.push(format!(
                "task {id} has attempts = {attempts} but {claims} claim(s) in its log"
            ));
        }
    }
    tx.commit().map_err(pg_error(t, "end the read"))?;
    Ok(report)
}

pub(crate) fn size_on_disk(sh: &Shared) -> Result<u64> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let row = conn
        .query_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'S')",
            &[],
        )
        .map_err(pg_error(t, "measure the schema"))?;
    let n: i64 = row.try_get(0).map_err(pg_error(t, "measure the schema"))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Sets or clears a queue's pause flag. Pausing waits for claims in flight (the pause lock):
/// once it returns, no claim in any process takes the queue's tasks.
pub(crate) fn set_paused(sh: &Shared, queue: &str, paused: bool) -> Result<()> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema()), -1)",
        &[],
    )
    .map_err(pg_error(t, "take the pause lock"))?;
    if paused {
        tx.execute(
            "INSERT INTO omniq_paused (queue) VALUES ($1) ON CONFLICT (queue) DO NOTHING",
            &[&queue],
        )
    } else {
        tx.execute("DELETE FROM omniq_paused WHERE queue = $1", &[&queue])
    }
    .map_err(pg_error(t, "set a queue's pause flag"))?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    if !paused {
        // Its due tasks are claimable again, here and elsewhere.
        sh.notify.wake_all();
        let _ = sh.to_notify.send(Signal::Work(queue.to_string()));
    }
    Ok(())
}

/// The paused queues.
pub(crate) fn paused(sh: &Shared) -> Result<BTreeSet<String>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let rows = conn
        .query("SELECT queue FROM omniq_paused", &[])
        .map_err(pg_error(t, "read the paused queues"))?;
    rows.iter()
        .map(|r| {
            r.try_get::<_, String>(0)
                .map_err(pg_error(t, "read the paused queues"))
        })
        .collect()
}
