//! Rate and concurrency limits per queue and per kind, as arithmetic.
//!
//! A [`Limit`] allows at most `max` executions *started* in any sliding window of `per`
//! (a start at `s` counts while `now < s + per`) and at most `concurrency` running at once.
//! Limits are enforced when claiming: a task over a limit stays `Pending`, is not claimed and is
//! charged nothing; claims keep priority and due order within what the limits leave.
//!
//! In SQL (the PostgreSQL backend) the same functions run in the claim's transaction: it locks
//! the limit rows `FOR UPDATE`, then reads each rate-limited scope's starts (a table keyed by
//! scope and start time) and the running tasks per scope, and plans with the same planner as
//! the sled writer.
//!
//! ```
//! use std::time::Duration;
//! use omniq::rules::limit::{remaining, slot_frees_at, Limit};
//! use omniq::Timestamp;
//! let l = Limit::new().rate(2, Duration::from_secs(1)).concurrency(5);
//! let starts = [Timestamp(1_000), Timestamp(1_500)];
//! assert_eq!(remaining(&l, &starts, 0, Timestamp(1_900)), 0);
//! // The start at 1.000 s leaves the window at 2.000 s.
//! assert_eq!(slot_frees_at(&l, &starts, Timestamp(1_900)), Some(Timestamp(2_000)));
//! assert_eq!(remaining(&l, &starts, 0, Timestamp(2_000)), 1);
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::task::Timestamp;

/// What a limit allows. `Limit::new()` allows everything; add a rate, a concurrency cap, or
/// both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// At most `max` starts in any window of `per_ms` milliseconds.
    pub rate: Option<Rate>,
    /// At most this many running at once.
    pub concurrency: Option<u32>,
}

/// A sliding-window rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    /// Starts allowed per window.
    pub max: u32,
    /// The window, in milliseconds (at least 1).
    pub per_ms: u64,
}

impl Limit {
    /// No limit yet.
    pub fn new() -> Limit {
        Limit::default()
    }
    /// At most `max` executions started in any window of `per`.
    pub fn rate(mut self, max: u32, per: Duration) -> Limit {
        self.rate = Some(Rate {
            max,
            per_ms: u64::try_from(per.as_millis()).unwrap_or(u64::MAX).max(1),
        });
        self
    }
    /// At most `max` running at once.
    pub fn concurrency(mut self, max: u32) -> Limit {
        self.concurrency = Some(max);
        self
    }
    /// True when it limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none() && self.concurrency.is_none()
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(r) = self.rate {
            parts.push(format!(
                "{} per {}",
                r.max,
                humantime::format_duration(Duration::from_millis(r.per_ms))
            ));
        }
        if let Some(c) = self.concurrency {
            parts.push(format!("{c} at once"));
        }
        if parts.is_empty() {
            parts.push("unlimited".into());
        }
        f.write_str(&parts.join(", "))
    }
}

/// What a limit applies to: every task of a queue, or every task of a kind (on any queue).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LimitScope {
    /// All tasks on this queue.
    Queue(String),
    /// All tasks of this kind, whatever their queue.
    Kind(String),
}

impl LimitScope {
    /// A queue's scope.
    pub fn queue(name: impl Into<String>) -> LimitScope {
        LimitScope::Queue(name.into())
    }
    /// A kind's scope.
    pub fn kind(name: impl Into<String>) -> LimitScope {
        LimitScope::Kind(name.into())
    }
    /// The queue or kind name.
    pub fn name(&self) -> &str {
        match self {
            LimitScope::Queue(n) | LimitScope::Kind(n) => n,
        }
    }
    /// Byte used for the scope type in storage keys. Part of the on-disk format.
    pub(crate) fn code(&self) -> u8 {
        match self {
            LimitScope::Queue(_) => b'q',
            LimitScope::Kind(_) => b'k',
        }
    }
    pub(crate) fn from_code(code: u8, name: String) -> Option<LimitScope> {
        match code {
            b'q' => Some(LimitScope::Queue(name)),
            b'k' => Some(LimitScope::Kind(name)),
            _ => None,
        }
    }
}

impl fmt::Display for LimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitScope::Queue(q) => write!(f, "queue {q}"),
            LimitScope::Kind(k) => write!(f, "kind {k}"),
        }
    }
}

impl std::str::FromStr for LimitScope {
    type Err = Error;
    /// `queue:NAME` or `kind:NAME`.
    fn from_str(s: &str) -> Result<LimitScope> {
        match s.split_once(':') {
            Some(("queue", n)) if !n.is_empty() => Ok(LimitScope::Queue(n.into())),
            Some(("kind", n)) if !n.is_empty() => Ok(LimitScope::Kind(n.into())),
            _ => Err(Error::Invalid {
                what: "limit scope",
                reason: format!("{s:?} is not queue:NAME or kind:NAME"),
            }),
        }
    }
}

/// How many of `starts` (sorted, oldest first) still count at `now`.
pub fn in_window(rate: &Rate, starts: &[Timestamp], now: Timestamp) -> usize {
    let cutoff = now.0.saturating_sub(rate.per_ms);
    // A start counts while now < start + per, i.e. start > now - per.
    starts.len() - starts.partition_point(|s| s.0 <= cutoff && now.0 >= rate.per_ms)
}

/// How many more tasks the limit lets start at `now`, given the starts so far (sorted, oldest
/// first) and how many run. `u32::MAX` when unlimited.
pub fn remaining(limit: &Limit, starts: &[Timestamp], running: u32, now: Timestamp) -> u32 {
    let by_rate = limit.rate.map_or(u32::MAX, |r| {
        let used = u32::try_from(in_window(&r, starts, now)).unwrap_or(u32::MAX);
        r.max.saturating_sub(used)
    });
    let by_running = limit
        .concurrency
        .map_or(u32::MAX, |m| m.saturating_sub(running));
    by_rate.min(by_running)
}

/// When the rate window next frees a slot, if the rate is what blocks now.
pub fn slot_frees_at(limit: &Limit, starts: &[Timestamp], now: Timestamp) -> Option<Timestamp> {
    let r = limit.rate?;
    let n = in_window(&r, starts, now);
    if n < r.max as usize || n == 0 {
        return None;
    }
    // Counting ones are the last n; the (n - max + 1)-th of them must leave.
    let first_counting = starts.len() - n;
    let leaving = starts[first_counting + (n - r.max as usize)];
    Some(Timestamp(leaving.0.saturating_add(r.per_ms)))
}

/// How many of `starts` (oldest first) no longer count at `now` and can be forgotten.
pub fn expired(rate: &Rate, starts: &[Timestamp], now: Timestamp) -> usize {
    starts.len() - in_window(rate, starts, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    #[test]
    fn the_window_is_sliding_and_half_open() {
        let l = Limit::new().rate(3, Duration::from_millis(100));
        let starts = [t(1000), t(1010), t(1050)];
        assert_eq!(remaining(&l, &starts, 0, t(1050)), 0);
        assert_eq!(slot_frees_at(&l, &starts, t(1050)), Some(t(1100)));
        assert_eq!(remaining(&l, &starts, 0, t(1099)), 0);
        assert_eq!(remaining(&l, &starts, 0, t(1100)), 1);
        assert_eq!(remaining(&l, &starts, 0, t(1150)), 3);
        assert_eq!(expired(&l.rate.unwrap(), &starts, t(1110)), 2);
        assert_eq!(slot_frees_at(&l, &starts, t(1100)), None);
    }

    #[test]
    fn concurrency_and_rate_combine() {
        let l = Limit::new().rate(10, Duration::from_secs(1)).concurrency(2);
        assert_eq!(remaining(&l, &[], 1, t(5)), 1);
        assert_eq!(remaining(&l, &[], 3, t(5)), 0);
        assert_eq!(remaining(&Limit::new(), &[], 99, t(5)), u32::MAX);
        let zero = Limit::new().rate(0, Duration::from_secs(1));
        assert_eq!(remaining(&zero, &[], 0, t(5)), 0);
        assert_eq!(
            slot_frees_at(&zero, &[], t(5)),
            None,
            "nothing will free a slot"
        );
    }

    #[test]
    fn early_times_do_not_underflow() {
        let l = Limit::new().rate(1, Duration::from_secs(10));
        assert_eq!(remaining(&l, &[t(0)], 0, t(5)), 0);
        assert_eq!(slot_frees_at(&l, &[t(0)], t(5)), Some(t(10_000)));
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            "queue:a".parse::<LimitScope>().unwrap(),
            LimitScope::queue("a")
        );
        assert_eq!(
            "kind:b".parse::<LimitScope>().unwrap(),
            LimitScope::kind("b")
        );
        assert!("b".parse::<LimitScope>().is_err());
        assert!("queue:".parse::<LimitScope>().is_err());
    }
}
