//! The retry rule and the backoff schedule, as small pure functions.
//!
//! `max_retries = N` allows at most `N + 1` executions. After a failed execution whose attempt
//! number (1-based, already counted) is `attempts`, the task is retried iff the error is
//! transient and `attempts <= max_retries`; otherwise it fails for good in the same commit that
//! records the error.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What happens after a failed execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Back to `Pending`, due after a backoff.
    Retry,
    /// `Failed`, for good.
    Fail,
}

/// The retry rule. `attempts` is the number of executions started, including the one that just
/// failed.
///
/// ```
/// use omniq::retry::{decide, Decision};
/// // max_retries = 3: executions 1, 2, 3 may be retried; the 4th failure is final.
/// assert_eq!(decide(3, 3, false), Decision::Retry);
/// assert_eq!(decide(4, 3, false), Decision::Fail);
/// // max_retries = 0: one execution, no retry.
/// assert_eq!(decide(1, 0, false), Decision::Fail);
/// // permanent errors never retry.
/// assert_eq!(decide(1, 3, true), Decision::Fail);
/// ```
pub fn decide(attempts: u32, max_retries: u32, permanent: bool) -> Decision {
    if !permanent && attempts <= max_retries {
        Decision::Retry
    } else {
        Decision::Fail
    }
}

/// Exponential backoff with jitter:
/// `delay(n) = min(base * 2^(n-1), cap) * U(1 - jitter, 1 + jitter)` before retry `n` (1-based).
///
/// With the defaults (base 1 s, cap 60 s, jitter 0.25) retry 1 waits 0.75-1.25 s, retry 2
/// 1.5-2.5 s, retry 3 3-5 s, ... retry 7 and later 45-75 s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// Delay before the first retry, before jitter, in milliseconds.
    pub base_ms: u64,
    /// Upper bound of the un-jittered delay, in milliseconds.
    pub cap_ms: u64,
    /// Relative jitter in `[0, 1]`: 0.25 means ±25 %.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base_ms: 1_000,
            cap_ms: 60_000,
            jitter: 0.25,
        }
    }
}

impl Backoff {
    /// A backoff with the given base, cap and jitter (jitter is clamped to `[0, 1]`).
    pub fn new(base: Duration, cap: Duration, jitter: f64) -> Backoff {
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Backoff {
            base_ms: millis(base),
            cap_ms: millis(cap),
            jitter,
        }
    }

    /// The un-jittered delay before retry `n` (1-based): `min(base * 2^(n-1), cap)`.
    pub fn nominal_ms(&self, n: u32) -> u64 {
        let shift = n.saturating_sub(1).min(63);
        let grown = self.base_ms.saturating_mul(1u64 << shift);
        grown.min(self.cap_ms)
    }

    /// Inclusive bounds `(low, high)` of the delay before retry `n`, in milliseconds.
    pub fn bounds_ms(&self, n: u32) -> (u64, u64) {
        let nominal = self.nominal_ms(n) as f64;
        let j = self.jitter.clamp(0.0, 1.0);
        (
            (nominal * (1.0 - j)).floor() as u64,
            (nominal * (1.0 + j)).ceil() as u64,
        )
    }

    /// The delay before retry `n`, given `unit`, a uniform sample in `[0, 1]`.
    pub fn delay_ms(&self, n: u32, unit: f64) -> u64 {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let j = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - j + 2.0 * j * unit;
        let (low, high) = self.bounds_ms(n);
        ((self.nominal_ms(n) as f64 * factor).round() as u64).clamp(low, high)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Default retry budget and backoff for a queue (or for the whole store).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries allowed after the first execution (default 3: four executions in all).
    pub max_retries: u32,
    /// Delay schedule between executions.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            backoff: Backoff::default(),
        }
    }
}

/// Where backoff jitter comes from. Seed it to make retry schedules reproducible.
pub trait JitterSource: Send + 'static {
    /// A uniform sample in `[0, 1]`.
    fn unit(&mut self) -> f64;
}

/// Jitter from a seeded (or OS-seeded) PRNG.
pub struct RandomJitter(StdRng);

impl RandomJitter {
    /// Seeded from the operating system: different every run.
    pub fn from_entropy() -> RandomJitter {
        RandomJitter(StdRng::from_os_rng())
    }
    /// Reproducible: the same seed gives the same schedule.
    pub fn seeded(seed: u64) -> RandomJitter {
        RandomJitter(StdRng::seed_from_u64(seed))
    }
}

impl JitterSource for RandomJitter {
    fn unit(&mut self) -> f64 {
        self.0.random_range(0.0..=1.0)
    }
}

/// Always the same sample: `FixedJitter(0.5)` gives exactly the nominal delay.
pub struct FixedJitter(pub f64);

impl JitterSource for FixedJitter {
    fn unit(&mut self) -> f64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_exactly_n_plus_one_executions() {
        for max in 0..10u32 {
            let executions = (1..=max + 5)
                .take_while(|&a| a == 1 || decide(a - 1, max, false) == Decision::Retry)
                .count() as u32;
            assert_eq!(executions, max + 1, "max_retries = {max}");
        }
    }

    #[test]
    fn the_tutorials_table_holds() {
        let b = Backoff::default();
        let table = [
            (1, 750, 1_250),
            (2, 1_500, 2_500),
            (3, 3_000, 5_000),
            (4, 6_000, 10_000),
            (5, 12_000, 20_000),
            (6, 24_000, 40_000),
            (7, 45_000, 75_000),
            (8, 45_000, 75_000),
            (50, 45_000, 75_000),
        ];
        for (n, lo, hi) in table {
            assert_eq!(b.bounds_ms(n), (lo, hi), "retry {n}");
            assert_eq!(b.delay_ms(n, 0.0), lo);
            assert_eq!(b.delay_ms(n, 1.0), hi);
        }
    }

    #[test]
    fn huge_retry_numbers_do_not_overflow() {
        let b = Backoff::new(Duration::from_secs(u64::MAX / 1000), Duration::MAX, 0.25);
        let _ = b.delay_ms(u32::MAX, 0.3);
    }
}
