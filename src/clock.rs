//! Time, injectable. The engine never reads the system clock directly, so tests can run a whole
//! retry schedule by advancing a [`ManualClock`](crate::testing::ManualClock) instead of sleeping.

use crate::task::Timestamp;

/// A source of "now".
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// Registers a callback to run whenever this clock jumps (manual clocks). Worker pools use it
    /// to re-check due work at once instead of sleeping on a stale deadline. Real clocks, whose
    /// time flows by itself, ignore it.
    fn on_change(&self, _callback: Box<dyn Fn() + Send + Sync>) {}
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}
