//! What every bench shares: the allocator and the no-op task.

use omniq::Task;
use serde::{Deserialize, Serialize};

// The allocator the `omniq` binary uses and the README recommends (see BENCHMARKS.md for the
// same benchmarks on the system allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A task whose handler does nothing: the benches measure the queue, not the work.
#[derive(Serialize, Deserialize)]
pub struct Noop {
    /// Makes every payload distinct.
    pub n: u64,
}

impl Task for Noop {
    const NAME: &'static str = "noop";
    type Output = ();
}
