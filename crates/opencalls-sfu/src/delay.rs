//! How long a media worker holds what it forwards: a fixed-bucket histogram the worker
//! writes with relaxed atomics and `/metrics` reads without stopping it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds; one more bucket above the last holds
/// the rest. Fine below 2 ms, where a forwarding delay is judged.
pub const BOUNDS_US: [u64; 18] = [
    25, 50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 20_000,
    50_000, 100_000, 1_000_000,
];

/// Counts of delays per bucket, their sum and their number.
#[derive(Debug, Default)]
pub struct DelayHistogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl DelayHistogram {
    /// Counts `n` events that each took `delay`.
    pub fn observe(&self, delay: Duration, n: u64) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(n, Relaxed);
        self.sum_us.fetch_add(us.saturating_mul(n), Relaxed);
    }

    /// Events per bucket (not cumulative), the last one above every bound.
    pub fn counts(&self) -> [u64; BOUNDS_US.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Relaxed))
    }

    /// The sum of all delays counted, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = DelayHistogram::default();
        h.observe(Duration::from_micros(0), 1);
        h.observe(Duration::from_micros(25), 2);
        h.observe(Duration::from_micros(26), 3);
        h.observe(Duration::from_micros(1_999), 4);
        h.observe(Duration::from_micros(2_000), 5);
        h.observe(Duration::from_secs(5), 6);
        let c = h.counts();
        assert_eq!(c[0], 3, "0 and 25 µs are within 25");
        assert_eq!(c[1], 3, "26 µs is within 50");
        assert_eq!(c[BOUNDS_US.iter().position(|&b| b == 2_000).unwrap()], 9);
        assert_eq!(c[BOUNDS_US.len()], 6, "past the last bound");
        assert_eq!(c.iter().sum::<u64>(), 21);
        assert_eq!(
            h.sum_us(),
            25 * 2 + 26 * 3 + 1_999 * 4 + 2_000 * 5 + 5_000_000 * 6
        );
    }

    #[test]
    fn bounds_rise() {
        assert!(BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
    }
}
