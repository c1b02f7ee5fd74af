//! The committer thread: [`submit`](crate::backend::Backend::submit) only enqueues, and this
//! thread commits what is queued, the sled writer's way. It takes the first submission plus
//! every one already waiting (up to [`MAX_GROUP`]), runs them in one transaction
//! ([`ops::commit_group`]), and replies after `COMMIT`, in submission order: a dispatcher's
//! claims are answered in the order it sent them, so its FIFO of claims in flight holds.
//!
//! One transaction for many submissions turns a WAL flush and a handful of round trips per
//! dispatcher step into one per group: while a transaction runs, the next group queues up.

use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::ops::{self, Submission};
use super::Shared;

/// At most this many submissions per transaction (a bound on its row locks and statement
/// sizes; a dispatcher's submissions are small).
pub(crate) const MAX_GROUP: usize = 256;

/// Runs until every sender is gone and the queue is drained.
pub(crate) fn run(sh: &Arc<Shared>, rx: Receiver<Submission>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(s) => group.push(s),
                Err(_) => break,
            }
        }
        ops::commit_group(sh, group);
    }
}
