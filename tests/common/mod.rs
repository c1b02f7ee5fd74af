//! Helpers shared by the integration tests (each test file includes this with `mod common;`).
#![allow(dead_code)]

use std::sync::Once;

use omniq::{Error, Queue};

// sled 0.34 releases its file lock from its background I/O threads shortly *after* a `Db` (or
// the last `Queue`) is dropped, so an immediate reopen in the same process can briefly find the
// directory locked. These helpers retry that one error for a bounded time; nothing else.
pub fn retry_while_locked<T, E: std::fmt::Debug>(
    mut open: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match open() {
            Err(e) if locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            other => return other,
        }
    }
}

/// The segment size sled recorded in `dir/conf` (omniq creates stores with 128 KiB segments,
/// older ones have sled's default 512 KiB; sled refuses to open a store with another size).
pub fn sled_config(dir: &std::path::Path) -> sled::Config {
    let segment = std::fs::read(dir.join("conf"))
        .ok()
        .and_then(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .find_map(|l| l.strip_prefix("segment_size: ")?.trim().parse().ok())
        })
        .unwrap_or(128 << 10);
    sled::Config::new().path(dir).segment_size(segment)
}

/// `sled::open`, once sled's previous holder in this process has let go of the lock.
pub fn raw_db(dir: &std::path::Path) -> sled::Db {
    retry_while_locked(
        || sled_config(dir).open(),
        |e| e.to_string().contains("could not acquire lock"),
    )
    .unwrap()
}

/// `QueueBuilder::open`, once a queue just closed in this process has let go of the lock.
pub fn reopen(open: impl FnMut() -> omniq::Result<Queue>) -> omniq::Result<Queue> {
    retry_while_locked(open, |e| matches!(e, Error::Locked { .. }))
}

/// Keeps expected panics (messages starting with `prefix`) out of the test output; any other
/// panic still prints. The first caller's prefix wins for the whole test binary.
pub fn quiet_panics(prefix: &'static str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.starts_with(prefix) {
                default(info);
            }
        }));
    });
}

#[cfg(feature = "postgres")]
pub mod pg;
