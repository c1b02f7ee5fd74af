//! The rules of unique jobs, rate and concurrency limits and recurring schedules, as pure
//! functions (no I/O), the way [`retry`](crate::retry) is for retries: every backend reads the
//! row, calls the rule, and writes the result conditionally (the sled writer by being the only
//! mutator; SQL by a constraint or a `WHERE` on what the rule saw).
//!
//! - [`unique`]: the key digest, the states that hold it, when it is taken and released
//!   (SQL: a holder table keyed by the digest, taken with `ON CONFLICT DO NOTHING` in the
//!   insert's transaction and released by the transition that leaves the hold set).
//! - [`limit`]: what a sliding window and a concurrency cap leave for a claim, and when the
//!   window frees a slot (SQL: the same arithmetic and planner, run under a `FOR UPDATE` lock
//!   on the limit rows in the claim's transaction).
//! - [`schedule`]: cron and interval arithmetic in a time zone, missed-tick policies, and
//!   which ticks a schedule owes at a given time (SQL: advance `last_fired` with
//!   `UPDATE ... WHERE last_fired = $seen` in the transaction that inserts the tasks).

pub mod limit;
pub mod schedule;
pub mod unique;
