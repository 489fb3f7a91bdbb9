//! Throttling of failed authentication, built so that it can never be turned against a valid
//! credential. An address (or a basic-auth user name) that fails too often in a window is
//! "throttled" until the window ends: its requests are still checked, and a valid credential
//! passes as always, but a wrong one gets 429 instead of 401, and checking a password for it
//! costs a turn at the [`Throttle::turn`] gate: a wait of [`TURN_DELAY`], with at most
//! [`TURNS_AT_ONCE`] such checks under way in the whole replica (fairly queued). So a guesser
//! who used up its failures gets at most `TURNS_AT_ONCE / TURN_DELAY` password guesses a
//! second, while the admin on the same address waits for a turn instead of being shut out.
//! Tokens need no gate: a token is 40 random characters, hopeless to guess, so while
//! throttled a `rack_…` secret is checked as a token only, at once. Counts are per replica (an
//! attacker spread over replicas gets each one's allowance).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many keys are remembered before old windows are swept.
const SWEEP_AT: usize = 10_000;

/// What a throttled password check waits before it is made.
pub const TURN_DELAY: Duration = Duration::from_secs(1);

/// Throttled password checks under way at once in a replica; more wait their turn.
pub const TURNS_AT_ONCE: usize = 16;

/// Failure counts per key, in fixed windows, and the gate of throttled password checks.
#[derive(Debug)]
pub struct Throttle {
    limit: u32,
    window: Duration,
    counts: Mutex<HashMap<String, (u32, Instant)>>,
    turns: Arc<tokio::sync::Semaphore>,
    delay: Duration,
}

/// A turn at the gate: held while a throttled password is checked.
#[derive(Debug)]
pub struct Turn(#[expect(dead_code, reason = "held, not read")] tokio::sync::OwnedSemaphorePermit);

impl Throttle {
    /// At most `limit` failures per key in each `window` (a limit of 0 throttles nothing).
    pub fn new(limit: u32, window: Duration) -> Self {
        Self::with_delay(limit, window, TURN_DELAY)
    }

    fn with_delay(limit: u32, window: Duration, delay: Duration) -> Self {
        Self {
            limit,
            window,
            counts: Mutex::default(),
            turns: Arc::new(tokio::sync::Semaphore::new(TURNS_AT_ONCE)),
            delay,
        }
    }

    /// `Err(retry after)` when any of `keys` has used up its failures in this window: a wrong
    /// credential gets 429 for that long, a password check waits its [`Self::turn`].
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

    /// Waits for a turn to check a password for a throttled client: for a free place among
    /// [`TURNS_AT_ONCE`] (first come, first served), then [`TURN_DELAY`]. Hold the turn until
    /// the check is made.
    pub async fn turn(&self) -> Turn {
        let permit = self
            .turns
            .clone()
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed");
        tokio::time::sleep(self.delay).await;
        Turn(permit)
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

    #[tokio::test]
    async fn throttled_checks_take_turns() {
        let delay = Duration::from_millis(100);
        let throttle = Arc::new(Throttle::with_delay(1, Duration::from_secs(60), delay));
        let started = Instant::now();
        let turns: Vec<_> = (0..TURNS_AT_ONCE * 2)
            .map(|_| {
                let throttle = throttle.clone();
                tokio::spawn(async move {
                    let _turn = throttle.turn().await;
                    Instant::now()
                })
            })
            .collect();
        let mut ends = Vec::new();
        for turn in turns {
            ends.push(turn.await.unwrap().duration_since(started));
        }
        // Every check waited, and no more than TURNS_AT_ONCE waited at once: the second half
        // waited for the first.
        assert!(ends.iter().all(|end| *end >= delay), "{ends:?}");
        assert!(ends.iter().max().unwrap() >= &(delay * 2), "{ends:?}");
    }
}
