//! What a router records of the responses of one release, for a rollout's traffic analysis:
//! per second, requests, failures (5xx and requests no instance answered) and a latency
//! histogram, in a ring of the last [`SLOTS`] seconds. Recording is a few relaxed atomic adds
//! on the proxy's hot path; no lock, no allocation.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::deploy::analysis::Figures;
use crate::runtime::{latency_bucket as bucket_of, latency_quantile};

/// Seconds of history kept: at least the longest analysis window (a window of the old release
/// before the switch, then the window itself).
pub const SLOTS: usize = 256;

const BUCKETS: usize = crate::runtime::LATENCY_BUCKETS;

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

    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The latency histogram (`crate::runtime::LATENCY_BUCKETS` counts).
    pub fn latency(&self) -> &[u64] {
        &self.latency
    }

    /// The figures, with the p95 as the upper edge of the bucket it falls in.
    pub fn figures(&self) -> Figures {
        Figures {
            requests: self.requests,
            errors: self.errors,
            p95: latency_quantile(&self.latency, 950),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
