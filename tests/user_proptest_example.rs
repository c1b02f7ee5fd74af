//! How a *user* of omniq property-tests their own task's retry behaviour.
//!
//! This file is documentation as much as a test: copy it into your project as a starting point.
//!
//! The idea: your handler talks to something unreliable (here a payment gateway). In a test you
//! replace that something with a scripted fake, let proptest generate every sequence of
//! responses it can think of, and run the queue *on the test thread* with `omniq::testing` and
//! a `ManualClock` — so a retry schedule of minutes runs in microseconds, deterministically,
//! without a worker pool and without sleeping. Then you assert what your business rules say
//! must hold, whatever the gateway did: here, "a card is charged at most once", "a declined card
//! is never retried", and "the task succeeds iff some attempt within the budget got through".

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use omniq::testing::{self, ManualClock};
use omniq::{EnqueueOptions, Queue, Status, Task, TaskContext, TaskError};
use parking_lot::Mutex;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

// ----- the user's code ----------------------------------------------------------------------

/// The task: charge an order. `order_id` doubles as the gateway's idempotency key.
#[derive(Serialize, Deserialize)]
struct ChargeCard {
    order_id: u64,
    cents: u64,
}

impl Task for ChargeCard {
    const NAME: &'static str = "charge_card";
    /// The gateway's receipt number.
    type Output = String;
}

/// What a payment gateway can answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GatewayReply {
    /// Charged (or already charged for this idempotency key).
    Ok,
    /// 429 Too Many Requests: try again later.
    RateLimited,
    /// 503 Service Unavailable: try again later.
    Unavailable,
    /// 402 card declined: retrying will not help.
    Declined,
    /// The request went through but the reply was lost (a network timeout). The charge *did*
    /// happen; only an idempotency key keeps the retry from charging twice.
    ChargedButReplyLost,
}

/// The gateway interface the handler uses; in production this would do HTTP.
trait Gateway: Send + Sync + 'static {
    fn charge(&self, idempotency_key: u64, cents: u64) -> Result<String, GatewayReply>;
}

/// The handler, written once and used both in production and in the test. Transient replies
/// become transient errors (omniq retries them within the budget), a decline is permanent.
fn charge_card<G: Gateway>(
    gateway: &G,
    job: ChargeCard,
    _ctx: &TaskContext,
) -> Result<String, TaskError> {
    match gateway.charge(job.order_id, job.cents) {
        Ok(receipt) => Ok(receipt),
        Err(GatewayReply::RateLimited) => {
            Err(TaskError::transient("rate_limited", "gateway said 429"))
        }
        Err(GatewayReply::Unavailable) => {
            Err(TaskError::transient("unavailable", "gateway said 503"))
        }
        Err(GatewayReply::ChargedButReplyLost) => {
            Err(TaskError::transient("network", "no reply from gateway"))
        }
        Err(GatewayReply::Declined) => Err(TaskError::permanent("declined", "card declined (402)")),
        Err(GatewayReply::Ok) => unreachable!("Ok is returned as Ok"),
    }
}

// ----- the test's fake ----------------------------------------------------------------------

/// A scripted gateway: answers with the next reply in `script` (then `Ok` forever), and
/// remembers which idempotency keys it really charged, and how often it was called.
#[derive(Default)]
struct FakeGateway {
    script: Mutex<VecDeque<GatewayReply>>,
    charged: Mutex<HashSet<u64>>,
    charges: Mutex<u32>,
    calls: Mutex<u32>,
}

impl Gateway for Arc<FakeGateway> {
    fn charge(&self, key: u64, _cents: u64) -> Result<String, GatewayReply> {
        *self.calls.lock() += 1;
        let reply = self.script.lock().pop_front().unwrap_or(GatewayReply::Ok);
        let charge = |key| {
            // Idempotency: a key is charged at most once, like a real gateway.
            if self.charged.lock().insert(key) {
                *self.charges.lock() += 1;
            }
        };
        match reply {
            GatewayReply::Ok => {
                charge(key);
                Ok(format!("receipt-{key}"))
            }
            GatewayReply::ChargedButReplyLost => {
                charge(key);
                Err(reply)
            }
            other => Err(other),
        }
    }
}

fn reply() -> impl Strategy<Value = GatewayReply> {
    prop_oneof![
        Just(GatewayReply::Ok),
        Just(GatewayReply::RateLimited),
        Just(GatewayReply::Unavailable),
        Just(GatewayReply::Declined),
        Just(GatewayReply::ChargedButReplyLost),
    ]
}

proptest! {
    // Each case opens a small queue in a temp dir; a few dozen cases run in well under a second.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn charging_is_safe_whatever_the_gateway_does(
        script in prop::collection::vec(reply(), 0..10),
        max_retries in 0u32..=5,
        seed in any::<u64>(),
    ) {
        // 1. A queue on a manual clock, with seeded jitter so a failing case replays exactly.
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_now();
        let queue = Queue::builder(dir.path()).clock(clock.clone()).jitter_seed(seed).open().unwrap();

        // 2. The real handler, wired to the fake gateway.
        let gateway = Arc::new(FakeGateway::default());
        gateway.script.lock().extend(script.iter().copied());
        let g = gateway.clone();
        queue.register(move |job: ChargeCard, ctx: &TaskContext| charge_card(&g, job, ctx));

        // 3. Enqueue as production code would, then run every execution the retry schedule
        //    allows, jumping the clock over each backoff instead of sleeping.
        let id = queue
            .enqueue_with(ChargeCard { order_id: 42, cents: 1_999 }, EnqueueOptions::new().max_retries(max_retries))
            .unwrap();
        let report = testing::run_until_idle(&queue, &clock, 1_000).unwrap();
        let task = queue.get(id).unwrap().unwrap();

        // 4. What an independent reading of the rules predicts: walk the replies the handler
        //    will see, attempt by attempt, until one succeeds, one is a decline, or the budget
        //    (max_retries + 1 executions) is spent.
        let budget = max_retries as usize + 1;
        let replies = script.iter().copied().chain(std::iter::repeat(GatewayReply::Ok));
        let mut expected_runs = 0;
        let mut expected_status = Status::Failed;
        for r in replies.take(budget) {
            expected_runs += 1;
            match r {
                GatewayReply::Ok => { expected_status = Status::Completed; break; }
                GatewayReply::Declined => break,
                _ => {}
            }
        }

        // 5. The properties.
        // The queue ran the handler exactly as often as the rules allow, and counted it.
        prop_assert_eq!(report.executions, expected_runs);
        prop_assert_eq!(*gateway.calls.lock() as usize, expected_runs);
        prop_assert_eq!(task.attempts as usize, expected_runs);
        prop_assert!(task.attempts <= max_retries + 1);
        prop_assert_eq!(task.status, expected_status);
        // Never charged twice, however many retries and lost replies there were.
        prop_assert!(*gateway.charges.lock() <= 1);
        if task.status == Status::Completed {
            prop_assert_eq!(task.result::<String>().unwrap().unwrap(), "receipt-42");
            prop_assert_eq!(*gateway.charges.lock(), 1);
        } else {
            // A failed task tells why: a decline is permanent and was never retried.
            let last = task.last_error.as_ref().unwrap();
            prop_assert_eq!(last.permanent, last.error_type == "declined");
        }
        // Every failure is in the task's error history with its retry number.
        let counts: Vec<u32> = task.errors.iter().map(|e| e.retry_count).collect();
        prop_assert_eq!(counts, (0..task.errors.len() as u32).collect::<Vec<_>>());
        // And nothing is left to run.
        prop_assert!(testing::next_due_at(&queue).unwrap().is_none());
    }
}

/// The same tools, one fixed scenario: a rate-limited gateway that recovers. Useful as a
/// regression test next to the property.
#[test]
fn a_rate_limited_charge_succeeds_on_the_third_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let queue = Queue::builder(dir.path())
        .clock(clock.clone())
        .jitter_seed(1)
        .open()
        .unwrap();
    let gateway = Arc::new(FakeGateway::default());
    gateway
        .script
        .lock()
        .extend([GatewayReply::RateLimited, GatewayReply::ChargedButReplyLost]);
    let g = gateway.clone();
    queue.register(move |job: ChargeCard, ctx: &TaskContext| charge_card(&g, job, ctx));
    let start = clock.now();
    let id = queue
        .enqueue(ChargeCard {
            order_id: 7,
            cents: 500,
        })
        .unwrap();
    testing::run_until_idle(&queue, &clock, 100).unwrap();
    let task = queue.get(id).unwrap().unwrap();
    assert_eq!(task.status, Status::Completed);
    assert_eq!(task.attempts, 3);
    assert_eq!(
        *gateway.charges.lock(),
        1,
        "the lost reply's charge was not repeated"
    );
    // Two backoffs (about 1 s and 2 s with the default policy) passed on the manual clock only.
    let waited = clock.now().since(start);
    assert!(
        waited >= Duration::from_millis(750 + 1_500)
            && waited <= Duration::from_millis(1_250 + 2_500),
        "{waited:?}"
    );
}
