//! The limit state the sled writer keeps in memory (configured limits, the starts counted in
//! each window, how many run per limited scope), and the claim planner that applies
//! [`rules::limit`](crate::rules::limit) to the due scan. The writer owns it and changes it
//! only while applying a group; worker pools read it (under its lock) to decide whether to
//! claim and how long to sleep.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::Result;
use crate::rules::limit::{self, Limit, LimitScope};
use crate::store::{DueScan, DueTask, QueueSet, SideWrite, Store};
use crate::task::{Status, TaskId, TaskInfo, Timestamp};

#[derive(Clone, Debug, Default)]
struct ScopeState {
    limit: Limit,
    /// Starts counted by the rate, oldest first (parallel to `ids`).
    times: Vec<Timestamp>,
    ids: Vec<TaskId>,
    running: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Limiter {
    scopes: BTreeMap<LimitScope, ScopeState>,
}

fn scopes_of(t: &TaskInfo) -> [LimitScope; 2] {
    [
        LimitScope::Queue(t.queue.clone()),
        LimitScope::Kind(t.kind.clone()),
    ]
}

impl Limiter {
    /// Loads the configured limits and counted starts, and counts running tasks per scope.
    pub(crate) fn load(store: &dyn Store) -> Result<Limiter> {
        let state = store.limit_state()?;
        let mut l = Limiter::default();
        for (scope, limit) in state.limits {
            l.scopes.insert(
                scope,
                ScopeState {
                    limit,
                    ..ScopeState::default()
                },
            );
        }
        let mut starts = state.starts;
        starts.sort();
        for (scope, at, id) in starts {
            if let Some(s) = l.scopes.get_mut(&scope) {
                s.times.push(at);
                s.ids.push(id);
            }
        }
        if !l.scopes.is_empty() {
            for id in store.ids_in_state(Status::Running)? {
                if let Ok(Some(t)) = store.get(id) {
                    l.on_change(None, Some(&t));
                }
            }
        }
        Ok(l)
    }

    /// A limiter built from stored state (the PostgreSQL backend reads it in the claim's
    /// transaction): the limits, the starts counted so far (any order), and how many tasks run
    /// per (queue, kind).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn from_state(
        limits: Vec<(LimitScope, Limit)>,
        starts: Vec<(LimitScope, Timestamp, TaskId)>,
        running: &[(String, String, u32)],
    ) -> Limiter {
        let mut l = Limiter::default();
        for (scope, limit) in limits {
            l.scopes.insert(
                scope,
                ScopeState {
                    limit,
                    ..ScopeState::default()
                },
            );
        }
        let mut starts = starts;
        starts.sort();
        for (scope, at, id) in starts {
            if let Some(s) = l.scopes.get_mut(&scope) {
                s.times.push(at);
                s.ids.push(id);
            }
        }
        for (queue, kind, n) in running {
            for sc in [
                LimitScope::Queue(queue.clone()),
                LimitScope::Kind(kind.clone()),
            ] {
                if let Some(s) = l.scopes.get_mut(&sc) {
                    s.running = s.running.saturating_add(*n);
                }
            }
        }
        l
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    pub(crate) fn has_concurrency(&self) -> bool {
        self.scopes.values().any(|s| s.limit.concurrency.is_some())
    }

    /// Keeps running counts in step with a transition.
    pub(crate) fn on_change(&mut self, before: Option<&TaskInfo>, after: Option<&TaskInfo>) {
        if self.scopes.is_empty() {
            return;
        }
        let was = before.filter(|t| t.status == Status::Running);
        let is = after.filter(|t| t.status == Status::Running);
        if let Some(t) = was {
            for sc in scopes_of(t) {
                if let Some(s) = self.scopes.get_mut(&sc) {
                    s.running = s.running.saturating_sub(1);
                }
            }
        }
        if let Some(t) = is {
            for sc in scopes_of(t) {
                if let Some(s) = self.scopes.get_mut(&sc) {
                    s.running += 1;
                }
            }
        }
    }

    /// What each limited scope leaves at `now`.
    pub(crate) fn budgets(&self, now: Timestamp) -> Budgets {
        let left = self
            .scopes
            .iter()
            .map(|(sc, s)| {
                (
                    sc.clone(),
                    limit::remaining(&s.limit, &s.times, s.running, now),
                )
            })
            .collect();
        Budgets { left }
    }

    /// Counts a start (a claim of `t` at `now`) against its rate-limited scopes; returns the
    /// writes that persist it.
    pub(crate) fn charge(&mut self, t: &TaskInfo, now: Timestamp) -> Vec<SideWrite> {
        let mut out = Vec::new();
        for sc in scopes_of(t) {
            if let Some(s) = self.scopes.get_mut(&sc) {
                if s.limit.rate.is_some() {
                    let at = s.times.partition_point(|x| *x <= now);
                    s.times.insert(at, now);
                    s.ids.insert(at, t.id);
                    out.push(SideWrite::RateStart {
                        scope: sc,
                        at: now,
                        id: t.id,
                        present: true,
                    });
                }
            }
        }
        out
    }

    /// Forgets starts that no longer count at `now`; returns the writes that delete them.
    pub(crate) fn prune(&mut self, now: Timestamp) -> Vec<SideWrite> {
        let mut out = Vec::new();
        for (sc, s) in &mut self.scopes {
            let Some(rate) = s.limit.rate else { continue };
            let n = limit::expired(&rate, &s.times, now);
            for (at, id) in s.times.drain(..n).zip(s.ids.drain(..n)) {
                out.push(SideWrite::RateStart {
                    scope: sc.clone(),
                    at,
                    id,
                    present: false,
                });
            }
        }
        out
    }

    /// Sets (`Some`) or removes a scope's limit; `running` is how many of its tasks run now.
    /// Returns the writes that persist it (removing a limit forgets its starts).
    pub(crate) fn set(
        &mut self,
        scope: LimitScope,
        new: Option<Limit>,
        running: u32,
    ) -> Vec<SideWrite> {
        let mut out = Vec::new();
        match new {
            Some(limit) => {
                let s = self.scopes.entry(scope.clone()).or_default();
                s.limit = limit;
                s.running = running;
                if limit.rate.is_none() {
                    for (at, id) in s.times.drain(..).zip(s.ids.drain(..)) {
                        out.push(SideWrite::RateStart {
                            scope: scope.clone(),
                            at,
                            id,
                            present: false,
                        });
                    }
                }
            }
            None => {
                if let Some(s) = self.scopes.remove(&scope) {
                    for (at, id) in s.times.into_iter().zip(s.ids) {
                        out.push(SideWrite::RateStart {
                            scope: scope.clone(),
                            at,
                            id,
                            present: false,
                        });
                    }
                }
            }
        }
        out.push(SideWrite::Limit { scope, limit: new });
        out
    }

    /// The earliest time a rate-blocked scope's window frees a slot.
    pub(crate) fn next_free(&self, now: Timestamp) -> Option<Timestamp> {
        self.scopes
            .values()
            .filter_map(|s| limit::slot_frees_at(&s.limit, &s.times, now))
            .min()
    }

    /// Every limit with its state at `now`: (scope, limit, running, started in window,
    /// remaining, frees at).
    pub(crate) fn status(&self, now: Timestamp) -> Vec<LimitView> {
        self.scopes
            .iter()
            .map(|(sc, s)| LimitView {
                scope: sc.clone(),
                limit: s.limit,
                running: s.running,
                started_in_window: s.limit.rate.map_or(0, |r| {
                    u32::try_from(limit::in_window(&r, &s.times, now)).unwrap_or(u32::MAX)
                }),
                remaining: limit::remaining(&s.limit, &s.times, s.running, now),
                frees_at: limit::slot_frees_at(&s.limit, &s.times, now),
            })
            .collect()
    }
}

/// One limit's state, for `stats`.
#[derive(Clone, Debug)]
pub(crate) struct LimitView {
    pub scope: LimitScope,
    pub limit: Limit,
    pub running: u32,
    pub started_in_window: u32,
    pub remaining: u32,
    pub frees_at: Option<Timestamp>,
}

/// How many more starts each limited scope allows in one claim.
#[derive(Clone, Debug, Default)]
pub(crate) struct Budgets {
    left: HashMap<LimitScope, u32>,
}

/// Whether a due task may be claimed under the budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Yes,
    /// Its queue's limit is spent.
    QueueSpent,
    /// Its kind's limit is spent.
    KindSpent,
}

impl Budgets {
    pub(crate) fn is_unlimited(&self) -> bool {
        self.left.is_empty()
    }

    fn has_kinds(&self) -> bool {
        self.left.keys().any(|k| matches!(k, LimitScope::Kind(_)))
    }

    fn spent_kinds(&self) -> HashSet<String> {
        self.left
            .iter()
            .filter_map(|(sc, n)| match sc {
                LimitScope::Kind(k) if *n == 0 => Some(k.clone()),
                _ => None,
            })
            .collect()
    }

    fn spent_queues(&self) -> HashSet<String> {
        self.left
            .iter()
            .filter_map(|(sc, n)| match sc {
                LimitScope::Queue(q) if *n == 0 => Some(q.clone()),
                _ => None,
            })
            .collect()
    }

    /// Admits a task of `queue` and `kind` (unknown kind: only the queue is checked),
    /// taking one from each budget it is under.
    pub(crate) fn admit(&mut self, queue: &str, kind: Option<&str>) -> Admit {
        let q = LimitScope::Queue(queue.to_string());
        if self.left.get(&q) == Some(&0) {
            return Admit::QueueSpent;
        }
        let k = kind.map(|k| LimitScope::Kind(k.to_string()));
        if let Some(k) = &k {
            if self.left.get(k) == Some(&0) {
                return Admit::KindSpent;
            }
        }
        for sc in std::iter::once(q).chain(k) {
            if let Some(n) = self.left.get_mut(&sc) {
                *n -= 1;
            }
        }
        Admit::Yes
    }
}

/// What [`plan`] chose: due tasks the limits admit, best first.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub picks: Vec<DueTask>,
    /// Due tasks looked at and held back by a limit.
    pub held: usize,
    /// The earliest future due time among the queues scanned.
    pub next_wake: Option<Timestamp>,
}

/// Chooses up to `want` due tasks of `queues` at `now` that the budgets admit, in claim order
/// (priority, due time, enqueue order), skipping `skip`. A queue whose limit is spent is left
/// out of the scan, and so (through the pending-by-kind index) is a kind whose limit is spent:
/// tasks waiting behind a spent limit cost the claim nothing, however many there are. When a
/// budget runs out part-way, the scan is redone without that scope (at most once per scope).
pub(crate) fn plan(
    store: &dyn Store,
    budgets: &mut Budgets,
    queues: &QueueSet,
    now: Timestamp,
    want: usize,
    skip: &HashSet<TaskId>,
) -> Result<Plan> {
    if want == 0 {
        return Ok(Plan::default());
    }
    if budgets.is_unlimited() {
        let scan = store.due(queues, now, want, skip)?;
        return Ok(Plan {
            picks: scan.ready,
            held: 0,
            next_wake: scan.next_wake,
        });
    }
    let by_kind = budgets.has_kinds();
    plan_with(budgets, want, skip, |spent, need, seen| {
        if by_kind {
            return store.due_by_kind(queues, &spent.queues, &spent.kinds, now, need, seen);
        }
        let names: Vec<String> = match queues {
            QueueSet::Named(v) => v.clone(),
            QueueSet::All => store
                .counts()
                .into_iter()
                .filter(|((_, s), n)| *s == Status::Pending && *n > 0)
                .map(|((q, _), _)| q)
                .collect(),
        }
        .into_iter()
        .filter(|q| !spent.queues.contains(q))
        .collect();
        if names.is_empty() {
            return Ok(DueScan::default());
        }
        store.due(&QueueSet::Named(names), now, need, seen)
    })
}

/// The queues and kinds whose limits are spent, as a [`plan_with`] scan is told them.
#[derive(Debug, Default)]
pub(crate) struct Spent {
    pub queues: HashSet<String>,
    pub kinds: HashSet<String>,
}

/// The planner itself, for any storage: `scan(spent, need, seen)` returns up to `need` due
/// tasks in claim order, leaving out spent queues and kinds and the ids in `seen` (tasks it
/// returns without a kind are checked against their queue's limit only). The budgets admit
/// them in order; when one runs out part-way, the scan is redone without that scope (at most
/// once per scope). The sled writer scans its indexes; PostgreSQL runs a query (under the
/// limit rows' locks, so the budgets are exact across processes).
pub(crate) fn plan_with(
    budgets: &mut Budgets,
    want: usize,
    skip: &HashSet<TaskId>,
    mut scan: impl FnMut(&Spent, usize, &HashSet<TaskId>) -> Result<DueScan>,
) -> Result<Plan> {
    let mut out = Plan::default();
    if want == 0 {
        return Ok(out);
    }
    let mut spent = Spent {
        queues: budgets.spent_queues(),
        kinds: budgets.spent_kinds(),
    };
    let mut seen: HashSet<TaskId> = skip.clone();
    loop {
        let need = want - out.picks.len();
        let scan = scan(&spent, need, &seen)?;
        if let Some(w) = scan.next_wake {
            out.next_wake = Some(out.next_wake.map_or(w, |x: Timestamp| x.min(w)));
        }
        let got = scan.ready.len();
        let mut newly_spent = false;
        for d in scan.ready {
            seen.insert(d.id);
            match budgets.admit(&d.queue, d.kind.as_deref()) {
                Admit::Yes => out.picks.push(d),
                Admit::QueueSpent => {
                    newly_spent |= spent.queues.insert(d.queue.clone());
                    out.held += 1;
                }
                Admit::KindSpent => {
                    if let Some(k) = d.kind {
                        newly_spent |= spent.kinds.insert(k);
                    }
                    out.held += 1;
                }
            }
        }
        if out.picks.len() >= want || got < need || !newly_spent {
            break;
        }
    }
    Ok(out)
}

/// How many of `queues`' due tasks in `scope` are held back at `now` (counted up to `cap`).
pub(crate) fn waiting(
    store: &dyn Store,
    scope: &LimitScope,
    remaining: u32,
    now: Timestamp,
    cap: usize,
) -> Result<u64> {
    let due: usize = match scope {
        LimitScope::Queue(q) => store
            .due(&QueueSet::Named(vec![q.clone()]), now, cap, &HashSet::new())?
            .ready
            .len(),
        LimitScope::Kind(k) => store.due_count_of_kind(k, now, cap)?,
    };
    Ok((due as u64).saturating_sub(u64::from(remaining)))
}
