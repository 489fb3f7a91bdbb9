//! A router's figures handed to rack's per-minute history (`metric_minutes`, `jobs::metrics`):
//! each call takes the whole seconds not taken before, per release and wall-clock minute, so
//! every second is recorded once however often it is called (by the periodic flush, and by a
//! metrics request that wants the current minute).

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

use super::Router;
use super::tally::{SLOTS, Sum};
use crate::runtime::{LATENCY_BUCKETS, TrafficMinute};

/// One release's minute, as it is summed.
#[derive(Default)]
struct Minute {
    seconds: u32,
    requests: u64,
    errors: u64,
    requests_range: Option<(u64, u64)>,
    errors_range: Option<(u64, u64)>,
    latency: Vec<u64>,
}

impl Router {
    /// The seconds finished since the last call (at most the ring's span), per release and
    /// minute, `now` being this second's wall-clock time. Minutes without a request are left
    /// out.
    pub fn drain(&self, service: &str, now: DateTime<Utc>) -> Vec<TrafficMinute> {
        self.drain_through(service, now, false)
    }

    /// The same for a router that has stopped: its present second too, as it will not finish.
    pub fn drain_last(&self, service: &str, now: DateTime<Utc>) -> Vec<TrafficMinute> {
        self.drain_through(service, now, true)
    }

    fn drain_through(&self, service: &str, now: DateTime<Utc>, present_too: bool) -> Vec<TrafficMinute> {
        let mut next = self
            .inner
            .drained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let present = self.second();
        // The ring may be reusing the oldest slots: leave them out.
        let from = (*next).max(present.saturating_sub(SLOTS as u64 - 2));
        let end = present + u64::from(present_too);
        *next = end;
        let tallies: Vec<_> = self
            .inner
            .tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(release, (tally, _))| (release.clone(), std::sync::Arc::clone(tally)))
            .collect();
        let mut minutes: BTreeMap<(String, DateTime<Utc>), Minute> = BTreeMap::new();
        for second in from..end {
            let ago = i64::try_from(present - second).unwrap_or(i64::MAX);
            let wall = now - TimeDelta::seconds(ago);
            let minute = wall.duration_trunc(TimeDelta::minutes(1)).unwrap_or(wall);
            for (release, tally) in &tallies {
                let mut sum = Sum::default();
                tally.add_to(&mut sum, second, second);
                let entry = minutes.entry((release.clone(), minute)).or_default();
                add(entry, &sum);
            }
        }
        minutes
            .into_iter()
            .filter(|(_, m)| m.requests > 0)
            .map(|((release, minute), m)| TrafficMinute {
                app: self.inner.app.clone(),
                service: service.to_owned(),
                release,
                minute,
                seconds: m.seconds,
                requests: m.requests,
                errors: m.errors,
                requests_range: m.requests_range.unwrap_or_default(),
                errors_range: m.errors_range.unwrap_or_default(),
                latency: m.latency,
                memory: None,
                cpu: None,
            })
            .collect()
    }
}

fn add(minute: &mut Minute, second: &Sum) {
    let widen = |range: Option<(u64, u64)>, n: u64| Some(range.map_or((n, n), |(lo, hi)| (lo.min(n), hi.max(n))));
    minute.seconds += 1;
    minute.requests += second.requests();
    minute.errors += second.errors();
    minute.requests_range = widen(minute.requests_range, second.requests());
    minute.errors_range = widen(minute.errors_range, second.errors());
    if minute.latency.is_empty() {
        minute.latency = vec![0; LATENCY_BUCKETS];
    }
    for (total, n) in minute.latency.iter_mut().zip(second.latency()) {
        *total += n;
    }
}
