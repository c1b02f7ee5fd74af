//! Unique keys, rate and concurrency limits and schedules on PostgreSQL (schema version 2,
//! `schema/0002_rules.sql`). The rules are the sled backend's pure functions
//! ([`rules::unique`](crate::rules::unique), [`rules::limit`](crate::rules::limit) with the
//! claim planner of [`limiter`](crate::limiter), [`rules::schedule`](crate::rules::schedule));
//! this module reads what they need and writes what they decide, in the transition's own
//! transaction:
//!
//! - **Unique keys**: `omniq_unique` has one row per held digest (primary key). An insert takes
//!   its keys with `INSERT ... ON CONFLICT DO NOTHING` in the insert's transaction; a conflict
//!   waits for the other inserter's commit, so of producers racing on one key in any number of
//!   processes exactly one inserts and the others read its id. The fenced row write of every
//!   transition deletes the key of a task that leaves its hold set (`ops::UPDATE_FENCED`); a
//!   purge deletes it with the task; a manual retry takes it back or is refused
//!   ([`Error::UniqueConflict`]).
//! - **Limits**: a claim that a limit may concern locks the limit rows `FOR UPDATE` (in order),
//!   then reads the starts in each window and the running tasks per scope *after* the lock,
//!   builds a [`Limiter`] from them and lets [`limiter::plan_with`] pick within the budgets;
//!   the starts it makes are written in the same transaction. Claimers of limited work take
//!   turns on those rows, so the numbers are exact across processes.
//! - **Schedules**: a tick locks its schedule row, computes the owed ticks from the row as
//!   locked, inserts their tasks and advances `last_fired` with `WHERE last_fired = $seen`, in
//!   one transaction: every node may run the scheduler, and each tick fires once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use postgres::{GenericClient, Statement, Transaction};

use super::node::Signal;
use super::ops::{self, Batch, Stmts};
use super::rows::{to_i32, to_i64, to_json};
use super::{pg_error, Shared};
use crate::commit::NewTask;
use crate::error::{Error, Result};
use crate::extras::{Inserted, LimitStatus, ScheduleInfo, TaskExtras};
use crate::limiter::{self, Limiter};
use crate::log::Cause;
use crate::rules::limit::{Limit, LimitScope, Rate};
use crate::rules::schedule;
use crate::rules::unique::{self, Hold};
use crate::store::{DueScan, DueTask, QueueSet, SideWrite};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

// ----- unique keys and extras ----------------------------------------------------------------

/// Takes unique keys, in digest order (so that two transactions taking overlapping sets wait
/// for each other instead of deadlocking), and in the same statement writes the extras of the
/// tasks that need no key (`keyed` false) or got theirs; returns the digests taken.
const TAKE_KEYS: &str = "WITH taken AS (INSERT INTO omniq_unique (digest, task_id, states) \
     SELECT d, t, s FROM unnest($1::bytea[], $2::uuid[], $3::int2[]) AS u(d, t, s) ORDER BY d \
     ON CONFLICT (digest) DO NOTHING RETURNING digest, task_id), \
     extras AS (INSERT INTO omniq_extras (task_id, extras) \
     SELECT e.t, e.x FROM unnest($4::uuid[], $5::jsonb[], $6::bool[]) AS e(t, x, keyed) \
     WHERE NOT e.keyed OR e.t IN (SELECT task_id FROM taken)) \
     SELECT digest FROM taken";

const HOLDERS: &str = "SELECT digest, task_id FROM omniq_unique WHERE digest = ANY($1)";

const READ_STARTS: &str = "SELECT r.scope, r.name, r.at, r.task_id FROM omniq_rate_starts r \
     JOIN unnest($1::text[], $2::text[]) AS u(s, n) ON r.scope = u.s AND r.name = u.n";

const COUNT_RUNNING: &str = "SELECT queue, kind, count(*)::int8 FROM omniq_tasks \
     WHERE state = 'running' GROUP BY queue, kind";

const DEL_STARTS: &str = "DELETE FROM omniq_rate_starts r USING unnest($1::text[], $2::text[], \
     $3::int8[], $4::uuid[]) AS u(s, n, a, t) WHERE r.scope = u.s AND r.name = u.n \
     AND r.at = u.a AND r.task_id = u.t";

const ADD_STARTS: &str = "INSERT INTO omniq_rate_starts (scope, name, at, task_id) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::uuid[]) ON CONFLICT DO NOTHING";

/// The statements of unique inserts and limited claims, prepared once per pooled connection
/// with the transition statements (an unprepared query costs an extra round trip).
pub(crate) struct RuleStmts {
    take_keys: Statement,
    lock_limits: Statement,
    read_limits: Statement,
    read_starts: Statement,
    count_running: Statement,
    scan_due: Statement,
    claim_ids: Statement,
    add_starts: Statement,
    del_starts: Statement,
}

impl RuleStmts {
    pub(crate) fn prepare(
        c: &mut postgres::Client,
    ) -> std::result::Result<RuleStmts, postgres::Error> {
        Ok(RuleStmts {
            take_keys: c.prepare(TAKE_KEYS)?,
            lock_limits: c.prepare(LOCK_LIMITS)?,
            read_limits: c.prepare(READ_LIMITS)?,
            read_starts: c.prepare(READ_STARTS)?,
            count_running: c.prepare(COUNT_RUNNING)?,
            scan_due: c.prepare(SCAN_DUE)?,
            claim_ids: c.prepare(CLAIM_IDS)?,
            add_starts: c.prepare(ADD_STARTS)?,
            del_starts: c.prepare(DEL_STARTS)?,
        })
    }
}

/// A key wanted by a task: (digest, task, hold set).
type Want = ([u8; 32], TaskId, u8);

/// Extras to write for the tasks that will be inserted: (task, extras, whether it needs its
/// unique key to be inserted).
type Extra = (TaskId, serde_json::Value, bool);

/// Takes every key of `wanted` that no other task holds; answers the holders of the others
/// (those keys are not taken). A conflict with a transaction in flight waits for its outcome.
/// Writes `extras` for the tasks that need no key and those whose key was taken.
fn take_keys(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    wanted: Vec<Want>,
    extras: Vec<Extra>,
) -> Result<HashMap<[u8; 32], TaskId>> {
    let t = &sh.target;
    let mut held = HashMap::new();
    let mut todo = wanted;
    todo.sort_by_key(|a| a.0);
    let mut extras = extras;
    // A holder can let go between the conflict and the read of who holds it: then try again.
    for _ in 0..16 {
        if todo.is_empty() && extras.is_empty() {
            return Ok(held);
        }
        let digests: Vec<&[u8]> = todo.iter().map(|w| &w.0[..]).collect();
        let ids: Vec<uuid::Uuid> = todo.iter().map(|w| w.1 .0).collect();
        let states: Vec<i16> = todo.iter().map(|w| i16::from(w.2)).collect();
        let (e_ids, e_json, e_keyed): (Vec<uuid::Uuid>, Vec<&serde_json::Value>, Vec<bool>) = {
            let mut a = (Vec::new(), Vec::new(), Vec::new());
            for (id, x, keyed) in &extras {
                a.0.push(id.0);
                a.1.push(x);
                a.2.push(*keyed);
            }
            a
        };
        let rows = tx
            .query(
                &stmts.rules.take_keys,
                &[&digests, &ids, &states, &e_ids, &e_json, &e_keyed],
            )
            .map_err(pg_error(t, "take unique keys"))?;
        // Written now: those with no key, and those whose key was taken; the others' extras
        // go with their next try.
        let still: HashSet<TaskId> = todo.iter().map(|w| w.1).collect();
        let taken: HashSet<Vec<u8>> = rows
            .iter()
            .filter_map(|r| r.try_get::<_, Vec<u8>>(0).ok())
            .collect();
        let conflicts: Vec<Want> = todo
            .into_iter()
            .filter(|w| !taken.contains(&w.0[..]))
            .collect();
        let retry: HashSet<TaskId> = conflicts.iter().map(|w| w.1).collect();
        extras.retain(|(id, _, keyed)| *keyed && still.contains(id) && retry.contains(id));
        if conflicts.is_empty() {
            return Ok(held);
        }
        let digests: Vec<&[u8]> = conflicts.iter().map(|w| &w.0[..]).collect();
        let rows = tx
            .query(HOLDERS, &[&digests])
            .map_err(pg_error(t, "read unique key holders"))?;
        let mut holders: HashMap<Vec<u8>, TaskId> = HashMap::new();
        for r in &rows {
            let d: Vec<u8> = r.try_get(0).map_err(pg_error(t, "read a unique key"))?;
            let id: uuid::Uuid = r.try_get(1).map_err(pg_error(t, "read a unique key"))?;
            holders.insert(d, TaskId(id));
        }
        todo = Vec::new();
        for w in conflicts {
            match holders.get(&w.0[..]) {
                Some(h) => {
                    held.insert(w.0, *h);
                }
                None => todo.push(w),
            }
        }
        let again: HashSet<TaskId> = todo.iter().map(|w| w.1).collect();
        extras.retain(|(id, _, _)| again.contains(id));
    }
    Err(Error::Storage(format!(
        "PostgreSQL {}: unique keys kept changing hands while being taken",
        t.label()
    )))
}

/// Inserts `tasks` with their extras in `tx`, all or none, under the unique rule: a task whose
/// key is held (by a stored task or an earlier one of the batch) is not inserted and is
/// answered with the holder's id.
pub(crate) fn insert_in(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    batch: &mut Batch,
    tasks: Vec<NewTask>,
    now: Timestamp,
) -> Result<Vec<Inserted>> {
    let t = &sh.target;
    if let Some(bad) = tasks.iter().find(|x| x.task.status != Status::Pending) {
        return Err(Error::Invalid {
            what: "new task",
            reason: format!("task {} is {}, not PENDING", bad.task.id, bad.task.status),
        });
    }
    let spec = |nt: &NewTask| nt.extras.as_ref().and_then(|e| e.unique.clone());
    let mut first: HashMap<[u8; 32], TaskId> = HashMap::new();
    let mut wanted = Vec::new();
    let mut extras = Vec::new();
    for nt in &tasks {
        let keyed = match spec(nt) {
            Some(u) => match first.entry(u.digest) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(nt.task.id);
                    wanted.push((u.digest, nt.task.id, u.states));
                    true
                }
                // A duplicate of an earlier task of the batch: never inserted.
                std::collections::hash_map::Entry::Occupied(_) => continue,
            },
            None => false,
        };
        if let Some(x) = nt.extras.as_ref().filter(|e| !e.is_empty()) {
            extras.push((nt.task.id, to_json("task extras", x)?, keyed));
        }
    }
    let held = take_keys(sh, tx, stmts, wanted, extras)?;
    let mut out = Vec::with_capacity(tasks.len());
    for nt in tasks {
        if let Some(u) = spec(&nt) {
            let holder = held
                .get(&u.digest)
                .copied()
                .or_else(|| first.get(&u.digest).copied().filter(|f| *f != nt.task.id));
            if let Some(holder) = holder {
                tracing::debug!(kind = %nt.task.kind, key = %u.key, holder = %holder, "duplicate refused: unique key held");
                out.push(Inserted {
                    id: holder,
                    duplicate: true,
                });
                continue;
            }
        }
        let id = nt.task.id;
        let p = super::rows::TaskParams::new(&nt.task, None)?;
        tx.execute(&stmts.insert_task, &p.all())
            .map_err(pg_error(t, "insert a task"))?;
        batch.record(sh, None, Some(nt.task), Some(Cause::Enqueued), now);
        out.push(Inserted {
            id,
            duplicate: false,
        });
    }
    Ok(out)
}

/// New pending tasks with extras, all or none, under the unique rule.
pub(crate) fn insert_new(sh: &Shared, tasks: Vec<NewTask>) -> Result<Vec<Inserted>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let now = sh.clock.now();
    let mut batch = Batch::new(stmts.clone());
    let out = insert_in(sh, &mut tx, &stmts, &mut batch, tasks, now)?;
    batch.write(sh, &mut tx)?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    batch.publish(sh);
    Ok(out)
}

fn extras_in(sh: &Shared, c: &mut impl GenericClient, id: TaskId) -> Result<Option<TaskExtras>> {
    let t = &sh.target;
    let row = c
        .query_opt(
            "SELECT extras FROM omniq_extras WHERE task_id = $1",
            &[&id.0],
        )
        .map_err(pg_error(t, "read task extras"))?;
    let Some(row) = row else { return Ok(None) };
    let v: serde_json::Value = row.try_get(0).map_err(pg_error(t, "read task extras"))?;
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            what: "task extras",
            key: format!("{}.omniq_extras task_id={id}", t.label()),
            reason: e.to_string(),
        })
}

/// A task's extras (unique key, schedule tick), if any.
pub(crate) fn extras(sh: &Shared, id: TaskId) -> Result<Option<TaskExtras>> {
    let mut conn = sh.pool.get()?;
    extras_in(sh, &mut *conn, id)
}

/// A manual retry brings `rec` back into its hold set: takes its key back in `tx`, or refuses
/// with [`Error::UniqueConflict`] while another task holds it.
pub(crate) fn retake_key(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    rec: &TaskInfo,
) -> Result<()> {
    let Some(u) = extras_in(sh, tx, rec.id)?.and_then(|e| e.unique) else {
        return Ok(());
    };
    if unique::hold_change(u.states, Some(rec.status), Some(Status::Pending)) != Hold::Acquire {
        return Ok(());
    }
    match take_keys(
        sh,
        tx,
        stmts,
        vec![(u.digest, rec.id, u.states)],
        Vec::new(),
    )?
    .remove(&u.digest)
    {
        Some(holder) if holder != rec.id => Err(Error::UniqueConflict {
            id: rec.id,
            holder,
            key: u.key,
        }),
        _ => Ok(()),
    }
}

/// Deletes the keys and extras of purged tasks (in the purge's transaction).
pub(crate) fn forget(sh: &Shared, tx: &mut Transaction<'_>, ids: &[uuid::Uuid]) -> Result<()> {
    tx.execute(
        "WITH k AS (DELETE FROM omniq_unique WHERE task_id = ANY($1)) \
         DELETE FROM omniq_extras WHERE task_id = ANY($1)",
        &[&ids],
    )
    .map_err(pg_error(
        &sh.target,
        "delete purged tasks' unique keys and extras",
    ))?;
    Ok(())
}

/// Keys whose holder is missing or outside its hold set (for `check`).
pub(crate) const CHECK_KEYS: &str = "SELECT encode(u.digest, 'hex'), u.task_id::text, t.state \
     FROM omniq_unique u LEFT JOIN omniq_tasks t ON t.id = u.task_id \
     WHERE t.id IS NULL OR (u.states::int & (CASE t.state WHEN 'pending' THEN 2 \
     WHEN 'running' THEN 4 WHEN 'completed' THEN 8 WHEN 'failed' THEN 16 ELSE 32 END)) = 0 \
     LIMIT 100";

// ----- limits ----------------------------------------------------------------------------------

fn scope_sql(s: &LimitScope) -> (&'static str, &str) {
    match s {
        LimitScope::Queue(n) => ("queue", n),
        LimitScope::Kind(n) => ("kind", n),
    }
}

/// Every limit, unlocked (reads and `due_summary`).
const READ_LIMITS: &str = "SELECT scope, name, rate_max, rate_per_ms, concurrency \
     FROM omniq_limits ORDER BY scope, name";

/// Every limit of a claim on `$1` (queue names; NULL: every queue): its queues' limits and
/// every kind limit, locked in key order.
const LOCK_LIMITS: &str = "SELECT scope, name, rate_max, rate_per_ms, concurrency \
     FROM omniq_limits WHERE scope = 'kind' OR $1::text[] IS NULL OR name = ANY($1) \
     ORDER BY scope, name FOR UPDATE";

fn limit_rows(sh: &Shared, rows: &[postgres::Row]) -> Result<Vec<(LimitScope, Limit)>> {
    let t = &sh.target;
    let bad = |reason: String| Error::Corrupt {
        what: "limit",
        key: format!("{}.omniq_limits", t.label()),
        reason,
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let scope: String = r.try_get(0).map_err(|e| bad(e.to_string()))?;
        let name: String = r.try_get(1).map_err(|e| bad(e.to_string()))?;
        let rate_max: Option<i32> = r.try_get(2).map_err(|e| bad(e.to_string()))?;
        let per: Option<i64> = r.try_get(3).map_err(|e| bad(e.to_string()))?;
        let conc: Option<i32> = r.try_get(4).map_err(|e| bad(e.to_string()))?;
        let scope = match scope.as_str() {
            "queue" => LimitScope::Queue(name),
            "kind" => LimitScope::Kind(name),
            other => return Err(bad(format!("unknown scope {other:?}"))),
        };
        let rate = match (rate_max, per) {
            (Some(m), Some(p)) => Some(Rate {
                max: u32::try_from(m).map_err(|_| bad(format!("negative rate {m}")))?,
                per_ms: u64::try_from(p).map_err(|_| bad(format!("negative window {p}")))?,
            }),
            _ => None,
        };
        let concurrency = conc
            .map(|c| u32::try_from(c).map_err(|_| bad(format!("negative concurrency {c}"))))
            .transpose()?;
        out.push((scope, Limit { rate, concurrency }));
    }
    Ok(out)
}

/// The limiter for `limits` as the database holds it now: the starts of the rate-limited
/// scopes and the running tasks per (queue, kind).
fn load_limiter(
    sh: &Shared,
    c: &mut impl GenericClient,
    stmts: &Stmts,
    limits: Vec<(LimitScope, Limit)>,
) -> Result<Limiter> {
    let t = &sh.target;
    let rated: Vec<&LimitScope> = limits
        .iter()
        .filter(|(_, l)| l.rate.is_some())
        .map(|(s, _)| s)
        .collect();
    let mut starts = Vec::new();
    if !rated.is_empty() {
        let scopes: Vec<&str> = rated.iter().map(|s| scope_sql(s).0).collect();
        let names: Vec<&str> = rated.iter().map(|s| scope_sql(s).1).collect();
        let rows = c
            .query(&stmts.rules.read_starts, &[&scopes, &names])
            .map_err(pg_error(t, "read rate-limit starts"))?;
        for r in &rows {
            let scope: String = r.try_get(0).map_err(pg_error(t, "read a start"))?;
            let name: String = r.try_get(1).map_err(pg_error(t, "read a start"))?;
            let at: i64 = r.try_get(2).map_err(pg_error(t, "read a start"))?;
            let id: uuid::Uuid = r.try_get(3).map_err(pg_error(t, "read a start"))?;
            let scope = if scope == "queue" {
                LimitScope::Queue(name)
            } else {
                LimitScope::Kind(name)
            };
            starts.push((scope, Timestamp(u64::try_from(at).unwrap_or(0)), TaskId(id)));
        }
    }
    let mut running = Vec::new();
    if limits.iter().any(|(_, l)| l.concurrency.is_some()) {
        let rows = c
            .query(&stmts.rules.count_running, &[])
            .map_err(pg_error(t, "count running tasks"))?;
        for r in &rows {
            let q: String = r.try_get(0).map_err(pg_error(t, "count running tasks"))?;
            let k: String = r.try_get(1).map_err(pg_error(t, "count running tasks"))?;
            let n: i64 = r.try_get(2).map_err(pg_error(t, "count running tasks"))?;
            running.push((q, k, u32::try_from(n).unwrap_or(u32::MAX)));
        }
    }
    Ok(Limiter::from_state(limits, starts, &running))
}

/// Persists the starts a limiter charged (`present`) or pruned.
fn write_starts(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    writes: Vec<SideWrite>,
) -> Result<()> {
    let (mut add, mut del): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for w in writes {
        if let SideWrite::RateStart {
            scope,
            at,
            id,
            present,
        } = w
        {
            let (s, n) = scope_sql(&scope);
            let row = (s, n.to_string(), to_i64(at.0), id.0);
            if present {
                add.push(row);
            } else {
                del.push(row);
            }
        }
    }
    for (rows, sql) in [
        (del, &stmts.rules.del_starts),
        (add, &stmts.rules.add_starts),
    ] {
        if rows.is_empty() {
            continue;
        }
        let s: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let n: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let a: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let i: Vec<uuid::Uuid> = rows.iter().map(|r| r.3).collect();
        tx.execute(sql, &[&s, &n, &a, &i])
            .map_err(pg_error(&sh.target, "write rate-limit starts"))?;
    }
    Ok(())
}

/// Due pending tasks in claim order, leaving out spent queues and kinds and `seen` (the pause
/// filter as in the claim statement).
const SCAN_DUE: &str = "SELECT id, queue, kind, priority, run_at FROM omniq_tasks t \
     WHERE state = 'pending' AND run_at <= $1 AND ($2::text[] IS NULL OR queue = ANY($2)) \
     AND queue <> ALL($3) AND kind <> ALL($4) AND id <> ALL($5) \
     AND (NOT EXISTS (SELECT 1 FROM omniq_paused) \
     OR NOT EXISTS (SELECT 1 FROM omniq_paused p WHERE p.queue = t.queue)) \
     ORDER BY priority DESC, run_at, id LIMIT $6";

/// Plans a claim of up to `n` tasks of `names` at `now` within `limiter`'s budgets.
fn plan(
    sh: &Shared,
    c: &mut impl GenericClient,
    stmts: &Stmts,
    limiter: &Limiter,
    names: &Option<Vec<String>>,
    now: Timestamp,
    n: usize,
) -> Result<limiter::Plan> {
    let t = &sh.target;
    let mut budgets = limiter.budgets(now);
    limiter::plan_with(&mut budgets, n, &HashSet::new(), |spent, need, seen| {
        let queues: Vec<&str> = spent.queues.iter().map(String::as_str).collect();
        let kinds: Vec<&str> = spent.kinds.iter().map(String::as_str).collect();
        let seen: Vec<uuid::Uuid> = seen.iter().map(|i| i.0).collect();
        let rows = c
            .query(
                &stmts.rules.scan_due,
                &[
                    &to_i64(now.0),
                    names,
                    &queues,
                    &kinds,
                    &seen,
                    &i64::try_from(need).unwrap_or(i64::MAX),
                ],
            )
            .map_err(pg_error(t, "look for due tasks within the limits"))?;
        let mut ready = Vec::with_capacity(rows.len());
        for r in &rows {
            let get = pg_error(t, "read a due task");
            let id: uuid::Uuid = r.try_get(0).map_err(&get)?;
            let priority: i16 = r.try_get(3).map_err(&get)?;
            let run_at: i64 = r.try_get(4).map_err(&get)?;
            ready.push(DueTask {
                id: TaskId(id),
                queue: r.try_get(1).map_err(&get)?,
                kind: Some(r.try_get(2).map_err(&get)?),
                priority: i8::try_from(priority).unwrap_or(0),
                next_run: Timestamp(u64::try_from(run_at).unwrap_or(0)),
            });
        }
        Ok(DueScan {
            ready,
            next_wake: None,
        })
    })
}

/// Claims exactly these tasks, if they are still pending and due (rows another transaction
/// holds are skipped).
const CLAIM_IDS: &str = concat!(
    "WITH due AS (SELECT id AS due_id, lease AS old_lease, started_at AS old_started \
     FROM omniq_tasks WHERE id = ANY($2) AND state = 'pending' AND run_at <= $1 \
     ORDER BY id FOR UPDATE SKIP LOCKED) \
     UPDATE omniq_tasks SET state = 'running', attempts = attempts + 1, started_at = $1, \
     lease = nextval('omniq_lease_seq'), node = $3 FROM due WHERE id = due.due_id \
     RETURNING old_lease, old_started, ",
    super::rows::task_cols!()
);

/// The claim of up to `n` tasks of `queues` at `at` when limits may concern it, in the
/// group's transaction: `None` when no limit does (the caller runs the plain claim).
/// Otherwise the limit rows are locked, the plan made within their budgets, the planned tasks
/// claimed and their starts written; returns the claimed tasks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn claim_limited(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    stmts: &Stmts,
    queues: &QueueSet,
    n: usize,
    at: Timestamp,
    batch: &mut Batch,
) -> Result<Option<Vec<TaskInfo>>> {
    let t = &sh.target;
    let names: Option<Vec<String>> = match queues {
        QueueSet::All => None,
        QueueSet::Named(v) => Some(v.clone()),
    };
    let rows = tx
        .query(&stmts.rules.lock_limits, &[&names])
        .map_err(pg_error(t, "lock the limits"))?;
    let limits = limit_rows(sh, &rows)?;
    if limits.is_empty() {
        return Ok(None);
    }
    let mut limiter = load_limiter(sh, tx, stmts, limits)?;
    let pruned = limiter.prune(at);
    write_starts(sh, tx, stmts, pruned)?;
    let plan = plan(sh, tx, stmts, &limiter, &names, at, n)?;
    if plan.held > 0 {
        tracing::debug!(
            held = plan.held,
            "due tasks held back by limits (not claimed, not charged)"
        );
    }
    if plan.picks.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let ids: Vec<uuid::Uuid> = plan.picks.iter().map(|d| d.id.0).collect();
    let rows = tx
        .query(
            &stmts.rules.claim_ids,
            &[&to_i64(at.0), &ids, &to_i64(sh.node)],
        )
        .map_err(pg_error(t, "claim due tasks"))?;
    let claimed = ops::claimed_rows(sh, &rows, at, batch)?;
    let mut starts = Vec::new();
    for task in &claimed {
        starts.extend(limiter.charge(task, at));
    }
    write_starts(sh, tx, stmts, starts)?;
    Ok(Some(claimed))
}

/// Sets or removes a limit. A limit without a rate forgets the scope's starts.
pub(crate) fn set_limit(sh: &Shared, scope: LimitScope, limit: Option<Limit>) -> Result<()> {
    let t = &sh.target;
    let (s, name) = scope_sql(&scope);
    let mut conn = sh.pool.get()?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    match limit {
        Some(l) => {
            let (max, per) = match l.rate {
                Some(r) => (Some(to_i32(r.max)), Some(to_i64(r.per_ms.max(1)))),
                None => (None, None),
            };
            tx.execute(
                "INSERT INTO omniq_limits (scope, name, rate_max, rate_per_ms, concurrency) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, name) DO UPDATE SET \
                 rate_max = EXCLUDED.rate_max, rate_per_ms = EXCLUDED.rate_per_ms, \
                 concurrency = EXCLUDED.concurrency",
                &[&s, &name, &max, &per, &l.concurrency.map(to_i32)],
            )
            .map_err(pg_error(t, "set a limit"))?;
        }
        None => {
            tx.execute(
                "DELETE FROM omniq_limits WHERE scope = $1 AND name = $2",
                &[&s, &name],
            )
            .map_err(pg_error(t, "remove a limit"))?;
        }
    }
    if limit.is_none_or(|l| l.rate.is_none()) {
        tx.execute(
            "DELETE FROM omniq_rate_starts WHERE scope = $1 AND name = $2",
            &[&s, &name],
        )
        .map_err(pg_error(t, "forget a limit's starts"))?;
    }
    let concurrency = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM omniq_limits WHERE concurrency IS NOT NULL)",
            &[],
        )
        .and_then(|r| r.try_get::<_, bool>(0))
        .map_err(pg_error(t, "read the limits"))?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    tracing::info!(scope = %scope, limit = ?limit, "limit set");
    sh.notify.set_wake_on_exit(concurrency);
    // A raised or removed limit may free work a pool is sleeping past, here and elsewhere.
    sh.notify.wake_all();
    if let LimitScope::Queue(q) = &scope {
        let _ = sh.to_notify.send(Signal::Work(q.clone()));
    }
    Ok(())
}

/// Whether any limit caps concurrency (a finish then frees a slot: wake dispatchers on it).
pub(crate) fn has_concurrency(sh: &Shared, c: &mut impl GenericClient) -> Result<bool> {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM omniq_limits WHERE concurrency IS NOT NULL)",
        &[],
    )
    .and_then(|r| r.try_get::<_, bool>(0))
    .map_err(pg_error(&sh.target, "read the limits"))
}

fn read_limiter(sh: &Shared, c: &mut impl GenericClient, stmts: &Stmts) -> Result<Limiter> {
    let rows = c
        .query(&stmts.rules.read_limits, &[])
        .map_err(pg_error(&sh.target, "read the limits"))?;
    let limits = limit_rows(sh, &rows)?;
    load_limiter(sh, c, stmts, limits)
}

/// Due tasks held back by limits counted up to this many in `limits`.
const WAITING_CAP: i64 = 10_000;

/// Every limit and how it stands at `now`.
pub(crate) fn limits(sh: &Shared, now: Timestamp) -> Result<Vec<LimitStatus>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let limiter = read_limiter(sh, &mut *conn, &stmts)?;
    let mut out = Vec::new();
    for v in limiter.status(now) {
        let (s, name) = scope_sql(&v.scope);
        let sql = if s == "queue" {
            "SELECT count(*) FROM (SELECT 1 FROM omniq_tasks WHERE state = 'pending' \
             AND run_at <= $1 AND queue = $2 LIMIT $3) d"
        } else {
            "SELECT count(*) FROM (SELECT 1 FROM omniq_tasks WHERE state = 'pending' \
             AND run_at <= $1 AND kind = $2 LIMIT $3) d"
        };
        let due: i64 = conn
            .query_one(sql, &[&to_i64(now.0), &name, &WAITING_CAP])
            .and_then(|r| r.try_get(0))
            .map_err(pg_error(t, "count tasks waiting on a limit"))?;
        out.push(LimitStatus {
            scope: v.scope,
            limit: v.limit,
            running: v.running,
            started_in_window: v.started_in_window,
            remaining: v.remaining,
            waiting: u64::try_from(due)
                .unwrap_or(0)
                .saturating_sub(u64::from(v.remaining)),
            frees_at: v.frees_at,
        });
    }
    Ok(out)
}

/// What `due_summary` says when limits exist: due tasks the limits admit now (up to `want`),
/// and when a rate window frees a slot.
pub(crate) fn due_within_limits(
    sh: &Shared,
    c: &mut impl GenericClient,
    stmts: &Stmts,
    queues: &QueueSet,
    now: Timestamp,
    want: usize,
) -> Result<(usize, Option<Timestamp>)> {
    let limiter = read_limiter(sh, c, stmts)?;
    let names: Option<Vec<String>> = match queues {
        QueueSet::All => None,
        QueueSet::Named(v) => Some(v.clone()),
    };
    let plan = plan(sh, c, stmts, &limiter, &names, now, want)?;
    Ok((plan.picks.len(), limiter.next_free(now)))
}

// ----- schedules -------------------------------------------------------------------------------

fn decode_schedule(sh: &Shared, name: &str, v: serde_json::Value) -> Result<ScheduleInfo> {
    serde_json::from_value(v).map_err(|e| Error::Corrupt {
        what: "schedule",
        key: format!("{}.omniq_schedules name={name}", sh.target.label()),
        reason: e.to_string(),
    })
}

/// Every schedule, by name.
pub(crate) fn schedules(sh: &Shared) -> Result<Vec<ScheduleInfo>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let rows = conn
        .query("SELECT name, info FROM omniq_schedules ORDER BY name", &[])
        .map_err(pg_error(t, "read the schedules"))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.try_get(0).map_err(pg_error(t, "read a schedule"))?;
        let info: serde_json::Value = r.try_get(1).map_err(pg_error(t, "read a schedule"))?;
        out.push(decode_schedule(sh, &name, info)?);
    }
    remember_next_tick(sh, &out);
    Ok(out)
}

/// Caches the earliest next tick (what [`next_tick`] answers without a query).
fn remember_next_tick(sh: &Shared, all: &[ScheduleInfo]) {
    let next = all
        .iter()
        .filter_map(ScheduleInfo::next_tick)
        .map(|t| t.0)
        .min()
        .unwrap_or(u64::MAX);
    sh.next_tick.store(next, Ordering::Release);
    *sh.ticks_read.lock() = Some(Instant::now());
}

/// The earliest next tick as last read (schedules are re-read every `poll_interval`, and at
/// once by this process's own changes).
pub(crate) fn next_tick(sh: &Shared) -> Option<Timestamp> {
    match sh.next_tick.load(Ordering::Acquire) {
        u64::MAX => None,
        t => Some(Timestamp(t)),
    }
}

/// Locks one schedule row; `None` if it does not exist.
fn lock_schedule(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    name: &str,
) -> Result<Option<ScheduleInfo>> {
    let row = tx
        .query_opt(
            "SELECT info FROM omniq_schedules WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .map_err(pg_error(&sh.target, "lock a schedule"))?;
    row.map(|r| {
        let v: serde_json::Value = r
            .try_get(0)
            .map_err(pg_error(&sh.target, "read a schedule"))?;
        decode_schedule(sh, name, v)
    })
    .transpose()
}

fn write_schedule(
    sh: &Shared,
    tx: &mut Transaction<'_>,
    s: &ScheduleInfo,
    seen: Timestamp,
) -> Result<u64> {
    tx.execute(
        "UPDATE omniq_schedules SET info = $2, last_fired = $3 WHERE name = $1 AND last_fired = $4",
        &[
            &s.name,
            &to_json("schedule", s)?,
            &to_i64(s.last_fired.0),
            &to_i64(seen.0),
        ],
    )
    .map_err(pg_error(&sh.target, "write a schedule"))
}

/// Creates or updates a schedule (an update keeps when it last fired, its counts and its pause);
/// returns whether it was created.
pub(crate) fn put_schedule(sh: &Shared, info: ScheduleInfo) -> Result<bool> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let created = tx
        .query_opt(
            "INSERT INTO omniq_schedules (name, last_fired, info) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING RETURNING name",
            &[
                &info.name,
                &to_i64(info.last_fired.0),
                &to_json("schedule", &info)?,
            ],
        )
        .map_err(pg_error(t, "create a schedule"))?
        .is_some();
    if !created {
        let Some(old) = lock_schedule(sh, &mut tx, &info.name)? else {
            return Err(Error::Storage(format!(
                "PostgreSQL {}: schedule {} vanished while being updated",
                t.label(),
                info.name
            )));
        };
        let mut next = info;
        next.last_fired = old.last_fired;
        next.created_at = old.created_at;
        next.fired = old.fired;
        next.skipped = old.skipped;
        next.paused = old.paused;
        write_schedule(sh, &mut tx, &next, old.last_fired)?;
    }
    tx.commit().map_err(pg_error(t, "commit"))?;
    drop(conn);
    let _ = schedules(sh);
    sh.notify.wake_all();
    Ok(created)
}

/// Pauses or resumes a schedule; resuming skips the ticks that came due during the pause.
pub(crate) fn pause_schedule(sh: &Shared, name: &str, paused: bool) -> Result<()> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let Some(mut s) = lock_schedule(sh, &mut tx, name)? else {
        return Err(Error::NoSuchSchedule { name: name.into() });
    };
    let seen = s.last_fired;
    if s.paused && !paused {
        s.last_fired = s.last_fired.max(sh.clock.now());
    }
    s.paused = paused;
    write_schedule(sh, &mut tx, &s, seen)?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    drop(conn);
    let _ = schedules(sh);
    sh.notify.wake_all();
    Ok(())
}

/// Removes a schedule; returns whether it existed.
pub(crate) fn remove_schedule(sh: &Shared, name: &str) -> Result<bool> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let n = conn
        .execute("DELETE FROM omniq_schedules WHERE name = $1", &[&name])
        .map_err(pg_error(t, "remove a schedule"))?;
    drop(conn);
    let _ = schedules(sh);
    Ok(n > 0)
}

/// Fires every tick owed at `now`. Each schedule's ticks are one transaction: lock its row,
/// compute what it owes from the row as locked, insert the tasks, advance `last_fired`
/// conditionally. A node that finds another has fired a tick first fires nothing for it.
pub(crate) fn tick(sh: &Shared, now: Timestamp) -> Result<Vec<TaskId>> {
    let fresh = sh
        .ticks_read
        .lock()
        .is_some_and(|at| at.elapsed() < sh.options.poll_interval);
    if fresh && now.0 < sh.next_tick.load(Ordering::Acquire) {
        return Ok(Vec::new());
    }
    let all = match schedules(sh) {
        Ok(all) => all,
        Err(e) => {
            // Not again until the next poll.
            sh.next_tick.store(u64::MAX, Ordering::Release);
            *sh.ticks_read.lock() = Some(Instant::now());
            return Err(e);
        }
    };
    let mut fired = Vec::new();
    let mut changed = false;
    for s in all
        .iter()
        .filter(|s| s.next_tick().is_some_and(|t| t <= now))
    {
        fired.extend(tick_one(sh, &s.name, now)?);
        changed = true;
    }
    if changed {
        let _ = schedules(sh);
    }
    Ok(fired)
}

fn tick_one(sh: &Shared, name: &str, now: Timestamp) -> Result<Vec<TaskId>> {
    let t = &sh.target;
    let mut conn = sh.pool.get()?;
    let stmts = conn.stmts().map_err(pg_error(t, "prepare statements"))?;
    let mut tx = conn
        .transaction()
        .map_err(pg_error(t, "begin a transaction"))?;
    let Some(mut s) = lock_schedule(sh, &mut tx, name)? else {
        return Ok(Vec::new());
    };
    if s.next_tick().is_none_or(|t| t > now) {
        // Another node fired it first (or it was paused or changed meanwhile).
        return Ok(Vec::new());
    }
    let owed = match schedule::owed(&s.spec, s.last_fired, now, s.missed) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(schedule = %name, error = %e, "schedule cannot be evaluated; it does not fire");
            return Ok(Vec::new());
        }
    };
    let created = sh.clock.now();
    let mut skipped = owed.skipped;
    let mut tasks = Vec::with_capacity(owed.fire.len());
    let mut ticks = Vec::with_capacity(owed.fire.len());
    for at in &owed.fire {
        match crate::commit::scheduled_task(&s, *at, created) {
            Ok(nt) => {
                tasks.push(nt);
                ticks.push(*at);
            }
            Err(e) => {
                tracing::error!(schedule = %name, error = %e, "scheduled task cannot be built; tick skipped");
                skipped += 1;
            }
        }
    }
    let mut batch = Batch::new(stmts.clone());
    let mut fired = Vec::new();
    for (r, at) in insert_in(sh, &mut tx, &stmts, &mut batch, tasks, created)?
        .into_iter()
        .zip(&ticks)
    {
        if r.duplicate {
            skipped += 1;
            tracing::info!(schedule = %name, tick = %at, holder = %r.id, "schedule tick skipped: its unique key is held");
        } else {
            tracing::info!(schedule = %name, tick = %at, task = %r.id, "schedule fired");
            s.fired += 1;
            fired.push(r.id);
        }
    }
    if owed.skipped > 0 {
        tracing::info!(schedule = %name, skipped = owed.skipped, policy = ?s.missed, "missed schedule ticks skipped");
    }
    let seen = s.last_fired;
    s.skipped += skipped;
    s.last_fired = owed.last_fired;
    if write_schedule(sh, &mut tx, &s, seen)? != 1 {
        // Cannot happen under the row lock; never fire a tick twice if it somehow did.
        return Ok(Vec::new());
    }
    batch.write(sh, &mut tx)?;
    tx.commit().map_err(pg_error(t, "commit"))?;
    batch.publish(sh);
    Ok(fired)
}
