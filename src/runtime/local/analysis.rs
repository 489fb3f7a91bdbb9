//! A rollout's traffic analysis on this host: once the first instance of the new release takes
//! traffic (beside the old ones, which keep theirs until the analysis ends), the router's tallies
//! of the two releases are compared every [`TICK`] until `deploy::analysis::judge` decides, at
//! the latest after the window. An app that served fewer than `min_requests` in the window before
//! the switch is not analysed at all, so a deploy nobody is using waits for nothing.

use std::time::Duration;

use super::supervisor::Supervisor;
use crate::deploy::analysis::{Figures, Names, Verdict, judge, too_quiet};
use crate::manifest::Analysis;
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// How often the figures are read while the analysis watches.
const TICK: Duration = Duration::from_millis(200);

impl Supervisor {
    /// Judges `release`'s service `name` by its traffic against `old` (the releases it
    /// replaces); an error when it fails (the line with the figures).
    pub(super) async fn analyse(
        &self,
        release: &ReleaseSpec,
        name: &str,
        settings: &Analysis,
        old: &str,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        let app = release.app.as_str();
        let Some(router) = self.with_app(app, |procs| procs.routers.get(name).cloned()) else {
            return Ok(());
        };
        let stream = crate::stream_names::system("local", name);
        let new_id = release.id.to_string();
        let report = Report {
            log,
            stream: &stream,
            app,
            service: name,
            new: &new_id,
            old,
            settings,
        };
        let switch = router.second();
        let window = u64::from(settings.window);
        let recent = router.sum(|_| true, switch.saturating_sub(window), switch).requests();
        if let Some(Verdict::Skipped(line)) = too_quiet(settings, recent) {
            report.send("skipped", line, None, Duration::ZERO).await;
            return Ok(());
        }
        let names = Names { new: &new_id, old };
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(TICK).await;
            let now = router.second();
            let new = router.sum(|r| r == new_id, switch, now).figures();
            // The old release's figures include the window before the switch.
            let before = router
                .sum(|r| r != new_id, switch.saturating_sub(window), now)
                .figures();
            let elapsed = started.elapsed();
            let figures = Some((new, before));
            match judge(settings, names, &new, &before, elapsed) {
                Verdict::Watching => {}
                Verdict::Passed(line) => {
                    report.send("passed", line, figures, elapsed).await;
                    return Ok(());
                }
                Verdict::Skipped(line) => {
                    report.send("skipped", line, figures, elapsed).await;
                    return Ok(());
                }
                Verdict::Failed(line) => {
                    report.send("failed", line.clone(), figures, elapsed).await;
                    let reason = line.strip_suffix(": rolling back").unwrap_or(&line).to_owned();
                    return Err(RuntimeError::AnalysisFailed(reason));
                }
            }
        }
    }
}

/// Where a verdict goes: the rollout's log and the feed (`deployment.analysis`).
struct Report<'a> {
    log: &'a LogSink,
    stream: &'a str,
    app: &'a str,
    service: &'a str,
    new: &'a str,
    old: &'a str,
    settings: &'a Analysis,
}

impl Report<'_> {
    async fn send(&self, verdict: &str, line: String, figures: Option<(Figures, Figures)>, elapsed: Duration) {
        let side = |f: &Figures| {
            serde_json::json!({
                "requests": f.requests,
                "errors": f.errors,
                "error_rate": (f.error_rate() * 10.0).round() / 10.0,
                "p95_ms": f.p95.map(|d| d.as_secs_f64() * 1000.0),
            })
        };
        let data = serde_json::json!({
            "service": self.service,
            "verdict": verdict,
            "release": self.new,
            "previous_release": self.old,
            "seconds": elapsed.as_secs(),
            "new": figures.as_ref().map(|(new, _)| side(new)),
            "old": figures.as_ref().map(|(_, old)| side(old)),
            "window": self.settings.window,
            "min_requests": self.settings.min_requests,
            "max_error_rate": self.settings.max_error_rate,
            "max_latency_ratio": self.settings.max_latency_ratio,
        });
        self.log.analysis(self.stream, line, self.app, self.new, data).await;
    }
}
