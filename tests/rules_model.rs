//! Model-based property test for unique jobs, limits and schedules (design.md sections 5 and 9).
//!
//! Random sequences of enqueue (unique or not, on a limited or a free queue), enqueue_many,
//! claim, succeed, fail, cancel, manual retry, purge, clock advance, schedule firing and
//! crash + reopen run against a real queue on a `ManualClock`. After every step:
//!
//! - no two live (`Pending`/`Running`) tasks share a unique key, and every enqueue was refused
//!   as a duplicate exactly when a task held its key (in its hold set) just before, with that
//!   task's id;
//! - a manual retry is refused with `UniqueConflict` exactly when another task holds the key;
//! - no window of the limited queue ever starts more than N executions (checked over every
//!   start recorded across crashes), and it never runs more than M at once; a limited kind
//!   (on any queue) never runs more than its cap;
//! - a claim that returns nothing leaves no due task unclaimed that no limit holds back, and a
//!   task held back by a limit is never charged (attempts equal the claims in the log:
//!   `check_consistency`);
//! - the schedule fires once per tick: the ticks fired are exactly the interval's ticks up to
//!   its last-fired time, none missing and none twice (its policy catches up every missed tick);
//! - `check_consistency()` finds no problem.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use omniq::testing::{self, Claimed, ManualClock};
use omniq::{
    EnqueueOptions, Error, Limit, LimitScope, ListFilter, Missed, Queue, Spec, Status, TaskError,
    TaskId, Timestamp, Unique,
};
use proptest::prelude::*;
use serde_json::json;

const RATE_MAX: usize = 2;
const RATE_PER: Duration = Duration::from_millis(1_000);
const CONCURRENCY: usize = 2;
const TICK: Duration = Duration::from_millis(700);

#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        key: Option<u8>,
        keep_completed: bool,
        limited: bool,
    },
    EnqueueMany(Vec<u8>),
    Claim,
    Finish {
        index: usize,
        ok: bool,
    },
    Cancel(usize),
    Retry(usize),
    Purge,
    Advance(u64),
    Fire,
    CrashReopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (proptest::option::of(0u8..3), any::<bool>(), any::<bool>()).prop_map(
            |(key, keep_completed, limited)| Op::Enqueue { key, keep_completed, limited }
        ),
        1 => proptest::collection::vec(0u8..3, 1..5).prop_map(Op::EnqueueMany),
        4 => Just(Op::Claim),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(index, ok)| Op::Finish { index, ok }),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::Retry),
        1 => Just(Op::Purge),
        3 => (0u64..1_500).prop_map(Op::Advance),
        2 => Just(Op::Fire),
        1 => Just(Op::CrashReopen),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    queue: Option<Queue>,
    held: Vec<Claimed>,
    /// Start times of executions on the limited queue, across every reopen.
    starts: Vec<Timestamp>,
    /// Ticks the schedule fired (from its tasks' extras), with how often.
    ticks: BTreeMap<Timestamp, u32>,
    created: Timestamp,
    /// Every task ever inserted (the engine may purge some).
    ids: Vec<TaskId>,
}

fn unique(key: u8, keep_completed: bool) -> EnqueueOptions {
    let u = Unique::key(format!("key-{key}"));
    let u = if keep_completed {
        u.states([Status::Completed])
    } else {
        u
    };
    EnqueueOptions::new().unique(u).max_retries(1)
}

impl Harness {
    fn new() -> Harness {
        let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1_000_000));
        let mut h = Harness {
            dir: tempfile::tempdir().unwrap(),
            created: clock.now(),
            clock,
            queue: None,
            held: Vec::new(),
            starts: Vec::new(),
            ticks: BTreeMap::new(),
            ids: Vec::new(),
        };
        h.open();
        let q = h.q();
        q.set_limit(
            LimitScope::queue("lim"),
            Limit::new()
                .rate(RATE_MAX as u32, RATE_PER)
                .concurrency(CONCURRENCY as u32),
        )
        .unwrap();
        // A kind limit too: at most one "many" task running, on any queue.
        q.set_limit(LimitScope::kind("many"), Limit::new().concurrency(1))
            .unwrap();
        q.schedule_json(
            "every",
            Spec::every(TICK),
            Missed::CatchUp(1_000),
            "sched",
            &json!({}),
            EnqueueOptions::new().queue("sched"),
        )
        .unwrap();
        h
    }

    fn open(&mut self) {
        let q = common::reopen(|| {
            Queue::builder(self.dir.path())
                .clock(self.clock.clone())
                .jitter_seed(3)
                .open()
        })
        .unwrap();
        self.queue = Some(q);
    }

    fn q(&self) -> &Queue {
        self.queue.as_ref().unwrap()
    }

    fn all(&self) -> Vec<omniq::TaskInfo> {
        self.q()
            .list(&ListFilter::new().limit(10_000))
            .unwrap()
            .tasks
    }

    /// Who holds `key-k` now, by the engine's records and each task's hold set.
    fn holder_of(&self, key: &str) -> Option<TaskId> {
        let mut holders = self.all().into_iter().filter(|t| {
            self.q()
                .extras(t.id)
                .unwrap()
                .and_then(|e| e.unique)
                .is_some_and(|u| u.key == key && omniq::rules::unique::holds(u.states, t.status))
        });
        let first = holders.next().map(|t| t.id);
        assert!(holders.next().is_none(), "two tasks hold {key}");
        first
    }

    fn pick(&self, i: usize) -> Option<TaskId> {
        (!self.ids.is_empty()).then(|| self.ids[i % self.ids.len()])
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Enqueue {
                key,
                keep_completed,
                limited,
            } => {
                let queue = if *limited { "lim" } else { "free" };
                let opts = match key {
                    Some(k) => unique(*k, *keep_completed),
                    None => EnqueueOptions::new().max_retries(1),
                }
                .queue(queue);
                let expected = key.and_then(|k| self.holder_of(&format!("key-{k}")));
                let r = self.q().insert_json("t", &json!(key), opts).unwrap();
                match expected {
                    Some(holder) => assert_eq!((r.id, r.duplicate), (holder, true)),
                    None => {
                        assert!(!r.duplicate);
                        self.ids.push(r.id);
                    }
                }
            }
            Op::EnqueueMany(keys) => {
                #[derive(serde::Serialize, serde::Deserialize)]
                struct T(u8);
                impl omniq::Task for T {
                    const NAME: &'static str = "many";
                    type Output = ();
                }
                let out = self
                    .q()
                    .insert_many_with(
                        keys.iter().map(|k| T(*k)),
                        EnqueueOptions::new()
                            .unique(Unique::by_args())
                            .queue("free"),
                    )
                    .unwrap();
                // by_args keys differ from the explicit ones: check within the batch.
                let mut seen: HashMap<u8, TaskId> = HashMap::new();
                for (k, r) in keys.iter().zip(out) {
                    match seen.get(k) {
                        Some(first) => assert_eq!((r.id, r.duplicate), (*first, true)),
                        None => {
                            seen.insert(*k, r.id);
                            if !r.duplicate {
                                self.ids.push(r.id);
                            }
                        }
                    }
                }
            }
            Op::Claim => {
                let now = self.clock.now();
                match testing::claim_next(self.q()).unwrap() {
                    Some(c) => {
                        if c.task.queue == "lim" {
                            self.starts.push(now);
                        }
                        self.held.push(c);
                    }
                    None => self.nothing_claimable_is_explained(now),
                }
            }
            Op::Finish { index, ok } => {
                if self.held.is_empty() {
                    return;
                }
                let c = self.held.remove(index % self.held.len());
                if *ok {
                    c.succeed(&0).unwrap();
                } else {
                    c.fail(TaskError::transient("x", "y")).unwrap();
                }
            }
            Op::Cancel(i) => {
                if let Some(id) = self.pick(*i) {
                    let _ = self.q().cancel(id);
                }
            }
            Op::Retry(i) => {
                let Some(id) = self.pick(*i) else { return };
                let Some(t) = self.q().get(id).unwrap() else {
                    return;
                };
                let spec = self.q().extras(id).unwrap().and_then(|e| e.unique);
                let other = spec
                    .as_ref()
                    .and_then(|u| self.holder_of(&u.key))
                    .filter(|h| *h != id);
                let r = self.q().retry(id);
                match (&r, t.status) {
                    (_, Status::Failed | Status::Cancelled) => match other {
                        Some(holder) => assert!(
                            matches!(&r, Err(Error::UniqueConflict { holder: h, .. }) if *h == holder),
                            "{r:?}"
                        ),
                        None => assert!(r.is_ok(), "{r:?}"),
                    },
                    _ => assert!(matches!(r, Err(Error::InvalidState { .. })), "{r:?}"),
                }
            }
            Op::Purge => {
                self.clock.advance(Duration::from_millis(1));
                self.q().purge(Duration::ZERO).unwrap();
            }
            Op::Advance(ms) => self.clock.advance(Duration::from_millis(*ms)),
            Op::Fire => {
                for id in self.q().fire_due_schedules().unwrap() {
                    let at = self.q().extras(id).unwrap().unwrap().scheduled.unwrap().at;
                    *self.ticks.entry(at).or_default() += 1;
                }
            }
            Op::CrashReopen => {
                // Claimed executions are abandoned, as a crash would.
                self.held.clear();
                self.queue = None;
                self.open();
            }
        }
    }

    /// `claim_next` found nothing: every due task is on the limited queue, and that queue is
    /// at its rate or concurrency limit.
    fn nothing_claimable_is_explained(&self, now: Timestamp) {
        let tasks = self.all();
        let due: Vec<&omniq::TaskInfo> = tasks
            .iter()
            .filter(|t| t.status == Status::Pending && t.next_run_at <= now)
            .collect();
        let many_running = tasks
            .iter()
            .filter(|t| t.kind == "many" && t.status == Status::Running)
            .count();
        let due: Vec<&omniq::TaskInfo> = due
            .into_iter()
            .filter(|t| !(t.kind == "many" && many_running >= 1))
            .collect();
        assert!(
            due.iter().all(|t| t.queue == "lim"),
            "a due task no limit holds back was not claimed"
        );
        if !due.is_empty() {
            let running = tasks
                .iter()
                .filter(|t| t.queue == "lim" && t.status == Status::Running)
                .count();
            let in_window = self
                .starts
                .iter()
                .filter(|s| now.0 < s.0 + RATE_PER.as_millis() as u64)
                .count();
            assert!(
                running >= CONCURRENCY || in_window >= RATE_MAX,
                "a due limited task was held back with {running} running and {in_window} starts in the window"
            );
        }
    }

    fn check(&self) {
        let tasks = self.all();
        // No two live tasks share a unique key.
        let mut live: HashMap<[u8; 32], TaskId> = HashMap::new();
        for t in &tasks {
            if !matches!(t.status, Status::Pending | Status::Running) {
                continue;
            }
            if let Some(u) = self.q().extras(t.id).unwrap().and_then(|e| e.unique) {
                if let Some(other) = live.insert(u.digest, t.id) {
                    panic!("live tasks {other} and {} share unique key {}", t.id, u.key);
                }
            }
        }
        // Never more than M running on the limited queue.
        let running = tasks
            .iter()
            .filter(|t| t.queue == "lim" && t.status == Status::Running)
            .count();
        assert!(running <= CONCURRENCY, "{running} running");
        let many = tasks
            .iter()
            .filter(|t| t.kind == "many" && t.status == Status::Running)
            .count();
        assert!(many <= 1, "{many} tasks of the limited kind running");
        // No window ever started more than N.
        let per = RATE_PER.as_millis() as u64;
        for (i, s) in self.starts.iter().enumerate() {
            let n = self.starts[i..].iter().filter(|x| x.0 < s.0 + per).count();
            assert!(n <= RATE_MAX, "{n} starts in the window from {s}");
        }
        // The schedule fired each tick exactly once, up to its last-fired time.
        let s = self
            .q()
            .schedules()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "every")
            .unwrap();
        let tick = TICK.as_millis() as u64;
        let expected: Vec<Timestamp> = (1..)
            .map(|k| Timestamp(self.created.0 + k * tick))
            .take_while(|t| *t <= s.last_fired)
            .collect();
        let fired: Vec<Timestamp> = self.ticks.keys().copied().collect();
        assert_eq!(fired, expected, "ticks fired");
        assert!(self.ticks.values().all(|n| *n == 1), "a tick fired twice");
        assert_eq!(s.fired, expected.len() as u64);
        let report = self.q().check_consistency().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn unique_limits_and_schedules_hold(ops in proptest::collection::vec(op(), 1..40)) {
        let mut h = Harness::new();
        for op in &ops {
            h.step(op);
            h.check();
        }
    }
}
