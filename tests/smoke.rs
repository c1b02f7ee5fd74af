use std::time::Duration;

use omniq::testing::{self, ManualClock};
use omniq::{EnqueueOptions, ListFilter, Queue, Status, Task, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Echo {
    n: u32,
}
impl Task for Echo {
    const NAME: &'static str = "echo";
    type Output = u32;
}

#[test]
fn enqueue_run_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let q = Queue::open(dir.path()).unwrap();
        q.register(|e: Echo, _: &TaskContext| -> Result<u32, TaskError> { Ok(e.n * 2) });
        id = q.enqueue(Echo { n: 21 }).unwrap();
        let ids = q.enqueue_many((0..100).map(|n| Echo { n })).unwrap();
        assert_eq!(ids.len(), 100);
        let pool = q.workers().concurrency(4).start().unwrap();
        let t = q.wait(id, Duration::from_secs(10)).unwrap();
        assert_eq!(t.status, Status::Completed);
        assert_eq!(t.result::<u32>().unwrap(), Some(42));
        for i in &ids {
            q.wait(*i, Duration::from_secs(10)).unwrap();
        }
        pool.stop();
        let report = q.check_consistency().unwrap();
        assert!(report.is_consistent(), "{:?}", report.problems);
        assert_eq!(q.stats().unwrap().count(Status::Completed), 101);
    }
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.get(id).unwrap().unwrap().status, Status::Completed);
    let page = q.list(&ListFilter::new().limit(30)).unwrap();
    assert_eq!(page.tasks.len(), 30);
    assert_eq!(q.history(id).unwrap().len(), 3);
}

#[test]
fn manual_clock_runs_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_at_epoch_plus(Duration::from_secs(1000));
    let q = Queue::builder(dir.path())
        .clock(clock.clone())
        .jitter_seed(1)
        .open()
        .unwrap();
    q.register(|_: Echo, ctx: &TaskContext| -> Result<u32, TaskError> {
        if ctx.attempt() < 3 {
            Err(TaskError::transient("network", "down"))
        } else {
            Ok(ctx.attempt())
        }
    });
    let id = q
        .enqueue_with(Echo { n: 1 }, EnqueueOptions::new().max_retries(3))
        .unwrap();
    let r = testing::run_until_idle(&q, &clock, 100).unwrap();
    assert_eq!(r.executions, 3);
    let t = q.get(id).unwrap().unwrap();
    assert_eq!(t.status, Status::Completed);
    assert_eq!(t.attempts, 3);
    assert_eq!(t.errors.len(), 2);
    assert!(q.check_consistency().unwrap().is_consistent());
}
