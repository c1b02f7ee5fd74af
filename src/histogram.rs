//! A fixed-bucket histogram updated with atomics: cheap enough for the commit path (one
//! `fetch_add` per bucket search), read by the admin server's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket upper bounds for durations, in seconds (100 µs .. 60 s).
pub(crate) const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Bucket upper bounds for counts (commit group sizes).
pub(crate) const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Observations per bucket (not cumulative), their count and their sum (in millionths).
pub(crate) struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micro: AtomicU64,
}

/// A consistent-enough copy of a histogram for rendering.
#[derive(Clone, Debug, Default)]
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) struct Snapshot {
    /// (upper bound, cumulative count) per bucket, then `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v * 1e6).round() as u64, Ordering::Relaxed);
    }

    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*b, cumulative)
            })
            .collect();
        Snapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed).max(cumulative),
            sum: self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// What the store measures about its own commits.
pub(crate) struct StoreMetrics {
    /// Transitions per committed group.
    pub group_size: Histogram,
    /// Seconds per flush + fsync.
    pub sync_seconds: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> StoreMetrics {
        StoreMetrics {
            group_size: Histogram::new(COUNTS),
            sync_seconds: Histogram::new(SECONDS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_adds_up() {
        let h = Histogram::new(COUNTS);
        for v in [1.0, 3.0, 3.0, 5000.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (1.0, 1));
        assert_eq!(s.buckets[2], (4.0, 3));
        assert_eq!(
            s.buckets.last().map(|b| b.1),
            Some(3),
            "5000 is only in +Inf"
        );
        assert!((s.sum - 5007.0).abs() < 1e-6);
    }
}
