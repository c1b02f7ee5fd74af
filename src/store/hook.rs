//! Fault points for the crash tests. With `OMNIQ_FAULT_AT=<point>:<n>` in its environment, the
//! process aborts (as a `SIGKILL` would: no destructor runs, nothing more is written) the `n`th
//! time it reaches `<point>`, so a kill can be made to land inside a chosen window: `wal-append`
//! (before a record is written), `wal-torn` (half of a record written), `wal-rotate` (a segment being started), `wal-spare` (the next segment's zeros written, not yet
//! synced), `checkpoint` (sled being
//! flushed), `wal-prune` (segments being deleted), `wal-replay` (an open replaying the log) and
//! `migrate-4` (an open converting a format-3 store, before each batch of tasks); and a
//! compaction's steps (`compact.rs`): `compact-start`, `compact-copy`, `compact-synced`,
//! `compact-pointer`, `compact-switched`, `compact-delete`.
//! Without the variable, reaching a point costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the fault point.
pub const FAULT_ENV: &str = "OMNIQ_FAULT_AT";

static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
static COUNT: AtomicU64 = AtomicU64::new(0);

fn spec() -> &'static Option<(String, u64)> {
    SPEC.get_or_init(|| {
        let v = std::env::var(FAULT_ENV).ok()?;
        let (point, n) = v.split_once(':')?;
        Some((point.to_string(), n.parse().ok()?))
    })
}

/// Whether `point` is the armed fault point (so a caller can split a write around it).
pub(crate) fn armed(point: &str) -> bool {
    spec().as_ref().is_some_and(|(p, _)| p == point)
}

/// Marks that the process reached `point` (see the module documentation).
pub(crate) fn reached(point: &str) {
    if let Some((p, n)) = spec() {
        if p == point && COUNT.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("{FAULT_ENV}: aborting at {point} #{n}");
            std::process::abort();
        }
    }
}
