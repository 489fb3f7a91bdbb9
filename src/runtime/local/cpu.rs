//! The CPU each instance uses now, in cores (1.0: one core busy all the time), from the CPU time
//! its cgroup has used (`cpuacct.usage`): the time used between two readings over the wall-clock
//! time between them. A reading is kept per instance; the rate is renewed once the kept reading
//! is at least [`MIN_SPAN`] old, so frequent readers (each metrics request, `ps`, the history
//! every 10 s) share one measure instead of dividing by a few milliseconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest span a rate is measured over.
const MIN_SPAN: Duration = Duration::from_secs(1);

/// Each instance's last reading and the rate it gave.
#[derive(Debug, Default)]
pub struct CpuRates(Mutex<HashMap<String, Reading>>);

#[derive(Debug, Clone, Copy)]
struct Reading {
    used_ns: u64,
    at: Instant,
    cores: Option<f64>,
}

impl CpuRates {
    /// The cores instance `id` uses, given it has used `used_ns` of CPU by `now`; `None` at its
    /// first reading (nothing to compare with yet).
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds of CPU far below 2^52 per span")]
    pub fn cores(&self, id: &str, used_ns: u64, now: Instant) -> Option<f64> {
        let mut readings = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(last) = readings.get_mut(id) else {
            readings.insert(
                id.to_owned(),
                Reading {
                    used_ns,
                    at: now,
                    cores: None,
                },
            );
            return None;
        };
        let span = now.saturating_duration_since(last.at);
        if span >= MIN_SPAN {
            let used = used_ns.saturating_sub(last.used_ns);
            *last = Reading {
                used_ns,
                at: now,
                cores: Some(used as f64 / span.as_nanos() as f64),
            };
        }
        last.cores
    }

    /// Forgets the instances not in `running` (ended ones).
    pub fn keep_only(&self, running: &[&str]) {
        let mut readings = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        readings.retain(|id, _| running.contains(&id.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_the_cpu_time_over_the_wall_time_between_readings_a_second_apart() {
        let rates = CpuRates::default();
        let start = Instant::now();
        assert_eq!(rates.cores("a", 1_000, start), None, "nothing to compare with yet");
        // Too soon to measure: still nothing.
        assert_eq!(rates.cores("a", 2_000, start + Duration::from_millis(10)), None);
        // Half a core over two seconds.
        let two = start + Duration::from_secs(2);
        assert_eq!(rates.cores("a", 1_000 + 1_000_000_000, two), Some(0.5));
        // A reader soon after gets the same measure.
        assert_eq!(
            rates.cores("a", 1_000 + 1_000_000_000, two + Duration::from_millis(5)),
            Some(0.5)
        );
        // Idle for a second: zero.
        assert_eq!(
            rates.cores("a", 1_000 + 1_000_000_000, two + Duration::from_secs(1)),
            Some(0.0)
        );
        rates.keep_only(&[]);
        assert_eq!(rates.cores("a", 5, two + Duration::from_secs(9)), None, "forgotten");
    }
}
