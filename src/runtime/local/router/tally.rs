//! What a router records of the responses of one release, for a rollout's traffic analysis:
//! per second, requests, failures (5xx and requests no instance answered) and a latency
//! histogram, in a ring of the last [`SLOTS`] seconds. Recording is a few relaxed atomic adds
//! on the proxy's hot path; no lock, no allocation.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::deploy::analysis::Figures;

/// Seconds of history kept: at least the longest analysis window (a window of the old release
/// before the switch, then the window itself).
pub const SLOTS: usize = 256;

/// Latency buckets: four per power of two of microseconds (a bucket is at most 19 % wide), up
/// to about 2^27 µs (134 s); longer lands in the last.
const BUCKETS: usize = 104;

/// One release's figures.
#[derive(Debug)]
pub struct Tally {
    slots: Box<[Slot]>,
}

#[derive(Debug)]
struct Slot {
    /// The second (since the router started) this slot counts; another second resets it.
    second: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU32; BUCKETS],
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            second: AtomicU64::new(u64::MAX),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }
}

impl Tally {
    /// Counts one response (or failure) finished in `second`, after `latency`.
    pub fn record(&self, second: u64, latency: Duration, error: bool) {
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The first request of a new second clears what the slot held SLOTS seconds ago.
            // A request of that second racing with this may be lost: figures are samples.
            slot.requests.store(0, Ordering::Relaxed);
            slot.errors.store(0, Ordering::Relaxed);
            for bucket in &slot.latency {
                bucket.store(0, Ordering::Relaxed);
            }
        }
        slot.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
        slot.latency[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the seconds `from..=to` to `sum`.
    pub fn add_to(&self, sum: &mut Sum, from: u64, to: u64) {
        for slot in self.slots.iter() {
            let second = slot.second.load(Ordering::Acquire);
            if (from..=to).contains(&second) {
                sum.requests += slot.requests.load(Ordering::Relaxed);
                sum.errors += slot.errors.load(Ordering::Relaxed);
                for (total, bucket) in sum.latency.iter_mut().zip(&slot.latency) {
                    *total += u64::from(bucket.load(Ordering::Relaxed));
                }
            }
        }
    }
}

/// Figures summed over releases and seconds.
#[derive(Debug, Clone)]
pub struct Sum {
    requests: u64,
    errors: u64,
    latency: [u64; BUCKETS],
}

impl Default for Sum {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

impl Sum {
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The figures, with the p95 as the upper edge of the bucket it falls in.
    pub fn figures(&self) -> Figures {
        let total: u64 = self.latency.iter().sum();
        let p95 = (total > 0).then(|| {
            let rank = total - total / 20;
            let mut seen = 0;
            let bucket = self
                .latency
                .iter()
                .position(|n| {
                    seen += n;
                    seen >= rank
                })
                .unwrap_or(BUCKETS - 1);
            upper_edge(bucket)
        });
        Figures {
            requests: self.requests,
            errors: self.errors,
            p95,
        }
    }
}

fn bucket_of(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
    if us < 8 {
        return us as usize;
    }
    let power = 63 - us.leading_zeros() as usize; // at least 3
    let quarter = ((us >> (power - 2)) & 3) as usize;
    (4 * (power - 1) + quarter).min(BUCKETS - 1)
}

fn upper_edge(bucket: usize) -> Duration {
    if bucket < 8 {
        return Duration::from_micros(bucket as u64 + 1);
    }
    let power = bucket / 4 + 1;
    let quarter = (bucket % 4) as u64;
    Duration::from_micros((4 + quarter + 1) << (power - 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_latencies() {
        for us in [1u64, 7, 8, 9, 15, 16, 100, 1_000, 2_500, 300_000, 5_000_000] {
            let d = Duration::from_micros(us);
            let bucket = bucket_of(d);
            let upper = upper_edge(bucket);
            assert!(upper > d, "{us}µs in bucket {bucket} up to {upper:?}");
            if us >= 8 {
                assert!(upper.as_secs_f64() <= d.as_secs_f64() * 1.26, "{us}µs: {upper:?}");
            }
            if bucket > 0 {
                assert!(upper_edge(bucket - 1) <= d, "{us}µs: the bucket below reaches it");
            }
        }
        assert_eq!(bucket_of(Duration::from_secs(100_000)), BUCKETS - 1);
    }

    #[test]
    fn a_window_sums_its_seconds_and_old_seconds_are_replaced() {
        let tally = Tally::default();
        for i in 0..100 {
            tally.record(10, Duration::from_millis(1), i % 10 == 0);
        }
        for _ in 0..5 {
            tally.record(11, Duration::from_millis(300), true);
        }
        let mut sum = Sum::default();
        tally.add_to(&mut sum, 10, 11);
        let figures = sum.figures();
        assert_eq!((figures.requests, figures.errors), (105, 15));
        // 5 of 105 slow: the p95 is still the fast bucket.
        assert!(figures.p95.unwrap() < Duration::from_millis(2), "{figures:?}");
        let mut later = Sum::default();
        tally.add_to(&mut later, 11, 11);
        assert!(later.figures().p95.unwrap() >= Duration::from_millis(300));
        // The same slot, SLOTS seconds on, starts afresh.
        tally.record(10 + SLOTS as u64, Duration::from_millis(1), false);
        let mut again = Sum::default();
        tally.add_to(&mut again, 0, 10 + SLOTS as u64);
        assert_eq!(again.requests(), 6);
    }
}
