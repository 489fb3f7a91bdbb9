//! Throttling of failed authentication: an address (or a user name) that fails too often in a
//! window is refused with 429 and `Retry-After` until the window ends, without its credentials
//! being checked. Successful requests are never slowed: only failures are counted. Counts are
//! per replica (an attacker spread over replicas gets each one's allowance).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many keys are remembered before old windows are swept.
const SWEEP_AT: usize = 10_000;

/// Failure counts per key, in fixed windows.
#[derive(Debug)]
pub struct Throttle {
    limit: u32,
    window: Duration,
    counts: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Throttle {
    /// At most `limit` failures per key in each `window` (a limit of 0 throttles nothing).
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            counts: Mutex::default(),
        }
    }

    /// `Err(retry after)` when any of `keys` has used up its failures in this window.
    pub fn check(&self, keys: &[String]) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let wait = keys
            .iter()
            .filter_map(|key| counts.get(key))
            .filter(|(count, start)| *count >= self.limit && now.duration_since(*start) < self.window)
            .map(|(_, start)| self.window.saturating_sub(now.duration_since(*start)))
            .max();
        match wait {
            Some(wait) => Err(wait.max(Duration::from_secs(1))),
            None => Ok(()),
        }
    }

    /// Counts a failure for each of `keys`.
    pub fn failed(&self, keys: &[String]) {
        if self.limit == 0 {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if counts.len() > SWEEP_AT {
            counts.retain(|_, (_, start)| now.duration_since(*start) < self.window);
        }
        for key in keys {
            let entry = counts.entry(key.clone()).or_insert((0, now));
            if now.duration_since(entry.1) >= self.window {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_limit_are_refused_until_the_window_ends() {
        let throttle = Throttle::new(3, Duration::from_millis(200));
        let keys = ["addr:10.9.9.9".to_owned()];
        for _ in 0..3 {
            assert!(throttle.check(&keys).is_ok());
            throttle.failed(&keys);
        }
        let wait = throttle.check(&keys).unwrap_err();
        assert!(wait >= Duration::from_secs(1));
        assert!(throttle.check(&["addr:10.9.9.8".to_owned()]).is_ok(), "another address");
        std::thread::sleep(Duration::from_millis(250));
        assert!(throttle.check(&keys).is_ok(), "a new window");
        assert!(Throttle::new(0, Duration::from_secs(1)).check(&keys).is_ok());
    }
}
