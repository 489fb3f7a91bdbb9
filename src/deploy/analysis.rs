//! The verdict of a rollout's traffic analysis, pure: given what the new release and the old one
//! served (requests, failures, p95 latency) and how long the new one has been watched, [`judge`]
//! says whether to keep watching, pass, fail (with the figures) or skip for lack of traffic.
//!
//! It decides before the window ends when more traffic could not change the verdict: the error
//! rate's confidence interval (Wilson score, three standard deviations) lies wholly above the
//! limit (fail) or below it (pass, once the p95 rests on enough samples too).

use std::time::Duration;

use crate::manifest::Analysis;

/// The old release's p95 counts as at least this: on loopback, a 1 ms release against a 0.3 ms
/// one is noise, not a regression, and so is 40 ms against 15 ms on a busy machine (a new
/// instance's first requests are slower). With the default ratio, a p95 under 100 ms is never
/// judged slow.
pub const LATENCY_FLOOR: Duration = Duration::from_millis(50);

/// Samples a p95 needs before an early verdict on latency (the window's end needs only
/// `min_requests`).
pub const EARLY_LATENCY_SAMPLES: u64 = 100;

/// Standard deviations of the confidence interval an early verdict needs.
const Z: f64 = 3.0;

/// What one release served during the analysis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub requests: u64,
    /// 5xx responses and requests that found no answer (connection refused or reset).
    pub errors: u64,
    /// The 95th percentile of the time to the response's head; `None` with no requests.
    pub p95: Option<Duration>,
}

impl Figures {
    /// The error rate in percent (0 with no requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            100.0 * self.errors as f64 / self.requests as f64
        }
    }
}

/// What the analysis says now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not certain yet: keep watching.
    Watching,
    /// The new release is as good as the limits ask; the line says so with the figures.
    Passed(String),
    /// The new release fails; the line says why with the figures (it ends in `rolling back`).
    Failed(String),
    /// Too little traffic to judge; the rollout proceeds and the line says why.
    Skipped(String),
}

/// The two releases compared, for the lines.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    pub new: &'a str,
    pub old: &'a str,
}

/// Whether the traffic before the switch is too little to analyse at all: then the rollout
/// goes on at once (an app nobody uses is not made to wait a window).
pub fn too_quiet(settings: &Analysis, recent_requests: u64) -> Option<Verdict> {
    (recent_requests < u64::from(settings.min_requests)).then(|| {
        Verdict::Skipped(format!(
            "analysis skipped: {recent_requests} requests in the last {}s (fewer than {})",
            settings.window, settings.min_requests
        ))
    })
}

/// The verdict after `elapsed` of watching `new` (since it took traffic) against `old`.
pub fn judge(settings: &Analysis, names: Names<'_>, new: &Figures, old: &Figures, elapsed: Duration) -> Verdict {
    let over = elapsed.as_secs_f64().round();
    let ended = elapsed >= Duration::from_secs(u64::from(settings.window));
    let enough = new.requests >= u64::from(settings.min_requests);
    if !enough {
        return if ended {
            Verdict::Skipped(format!(
                "analysis skipped: {} served {} requests in {over}s (fewer than {})",
                names.new, new.requests, settings.min_requests
            ))
        } else {
            Verdict::Watching
        };
    }
    let limit = settings.max_error_rate;
    let (low, high) = wilson(new.errors, new.requests);
    // Errors the old release has too are not the new one's fault.
    let worse = new.error_rate() > old.error_rate();
    let errors_fail = worse && if ended { new.error_rate() > limit } else { low > limit };
    if errors_fail {
        return Verdict::Failed(format!(
            "analysis: {} 5xx {:.1}% ({} of {}) vs {} {:.1}% over {over}s (limit {}%): rolling back",
            names.new,
            new.error_rate(),
            new.errors,
            new.requests,
            names.old,
            old.error_rate(),
            limit
        ));
    }
    let (new_p95, old_p95) = (new.p95.unwrap_or_default(), old.p95.unwrap_or_default());
    let base = old_p95.max(LATENCY_FLOOR);
    let ratio = settings.max_latency_ratio;
    let slow = new_p95.as_secs_f64() > ratio * base.as_secs_f64();
    let latency_known = ended || new.requests >= EARLY_LATENCY_SAMPLES;
    if slow && latency_known {
        return Verdict::Failed(format!(
            "analysis: {} p95 {} vs {} {} over {over}s (ratio {:.1}, limit {ratio}): rolling back",
            names.new,
            millis(new_p95),
            names.old,
            millis(old_p95),
            new_p95.as_secs_f64() / base.as_secs_f64(),
        ));
    }
    let errors_pass = ended || high < limit || (!worse && high <= limit.max(old.error_rate()));
    if errors_pass && latency_known {
        return Verdict::Passed(format!(
            "analysis passed: {} 5xx {:.1}% ({} of {}) vs {} {:.1}%, p95 {} vs {} over {over}s",
            names.new,
            new.error_rate(),
            new.errors,
            new.requests,
            names.old,
            old.error_rate(),
            millis(new_p95),
            millis(old_p95)
        ));
    }
    Verdict::Watching
}

/// The Wilson score interval of `errors` in `requests`, in percent.
fn wilson(errors: u64, requests: u64) -> (f64, f64) {
    let n = requests as f64;
    let p = errors as f64 / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    (100.0 * (centre - half).max(0.0), 100.0 * (centre + half).min(1.0))
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: Names<'static> = Names {
        new: "RNEW",
        old: "ROLD",
    };

    fn figures(requests: u64, errors: u64, p95_ms: u64) -> Figures {
        Figures {
            requests,
            errors,
            p95: Some(Duration::from_millis(p95_ms)),
        }
    }

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn verdicts_as_traffic_comes_in() {
        let s = Analysis::default();
        let good_old = figures(1000, 4, 2);
        #[rustfmt::skip]
        let table: Vec<(Figures, Duration, &str)> = vec![
            // Too few requests yet: watch, then skip at the window's end.
            (figures(5, 5, 2), at(3), "watching"),
            (figures(5, 5, 2), at(30), "skipped"),
            // Half failing: certain at once.
            (figures(20, 10, 2), at(1), "failed"),
            // 6% of 100: not certain early, a failure at the end.
            (figures(100, 6, 2), at(5), "watching"),
            (figures(100, 6, 2), at(30), "failed"),
            // Clean: passes once the interval is under the limit and the p95 has samples.
            (figures(50, 0, 2), at(2), "watching"),
            (figures(200, 0, 2), at(2), "passed"),
            (figures(30, 0, 2), at(30), "passed"),
            // Slow: 300 ms against 2 ms (the floor, 50 ms, is the base).
            (figures(40, 0, 300), at(5), "watching"),
            (figures(100, 0, 300), at(5), "failed"),
            (figures(40, 0, 300), at(30), "failed"),
            // Under the floor, never slow.
            (figures(200, 0, 15), at(5), "passed"),
            (figures(200, 0, 90), at(5), "passed"),
        ];
        for (new, elapsed, want) in table {
            let verdict = judge(&s, NAMES, &new, &good_old, elapsed);
            let got = match verdict {
                Verdict::Watching => "watching",
                Verdict::Passed(_) => "passed",
                Verdict::Failed(_) => "failed",
                Verdict::Skipped(_) => "skipped",
            };
            assert_eq!(got, want, "{new:?} after {elapsed:?}: {verdict:?}");
        }
    }

    #[test]
    fn the_lines_carry_the_figures() {
        let s = Analysis::default();
        let old = figures(1000, 4, 2);
        let Verdict::Failed(line) = judge(&s, NAMES, &figures(500, 91, 3), &old, at(30)) else {
            panic!("not failed")
        };
        assert_eq!(
            line,
            "analysis: RNEW 5xx 18.2% (91 of 500) vs ROLD 0.4% over 30s (limit 5%): rolling back"
        );
        let Verdict::Failed(line) = judge(&s, NAMES, &figures(100, 0, 310), &figures(900, 0, 40), at(8)) else {
            panic!("not failed")
        };
        assert_eq!(
            line,
            "analysis: RNEW p95 310ms vs ROLD 40ms over 8s (ratio 6.2, limit 2): rolling back"
        );
        let Verdict::Passed(line) = judge(&s, NAMES, &figures(300, 0, 3), &old, at(4)) else {
            panic!("not passed")
        };
        assert_eq!(
            line,
            "analysis passed: RNEW 5xx 0.0% (0 of 300) vs ROLD 0.4%, p95 3ms vs 2ms over 4s"
        );
        let Some(Verdict::Skipped(line)) = too_quiet(&s, 3) else {
            panic!("not skipped")
        };
        assert_eq!(line, "analysis skipped: 3 requests in the last 30s (fewer than 20)");
        assert_eq!(too_quiet(&s, 20), None);
    }

    #[test]
    fn errors_the_old_release_has_too_do_not_fail_the_new_one() {
        let s = Analysis::default();
        let bad_old = figures(1000, 200, 2);
        assert!(matches!(
            judge(&s, NAMES, &figures(300, 45, 2), &bad_old, at(30)),
            Verdict::Passed(_)
        ));
        assert!(matches!(
            judge(&s, NAMES, &figures(300, 150, 2), &bad_old, at(30)),
            Verdict::Failed(_)
        ));
    }

    #[test]
    fn the_interval_narrows_with_the_requests() {
        let (low, high) = wilson(0, 200);
        assert!(low == 0.0 && high < 5.0, "{low} {high}");
        let (low, high) = wilson(10, 20);
        assert!(low > 5.0 && high < 100.0, "{low} {high}");
        let (low, high) = wilson(6, 100);
        assert!(low < 5.0 && high > 5.0, "{low} {high}");
    }
}
