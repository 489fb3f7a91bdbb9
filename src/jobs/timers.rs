//! convox.yml `timers` on runtimes that do not schedule them (the local runtime; Kubernetes has
//! CronJobs): the replica that holds the scheduler's lock in Postgres looks just after each
//! minute, in UTC, at the apps' current releases, and starts each timer that came due as a
//! one-off process of its service. Each time is claimed in Postgres too
//! (`store::timers::claim`), so no time runs twice, even while the lock changes hands.
//!
//! As a CronJob would: a time missed while no replica was up is run late only within
//! `STARTING_DEADLINE` (and then once, however many were missed); a timer new to a release
//! first runs at its first time after the release became current; `concurrency` says what
//! happens when the previous run is still going.

use std::collections::HashMap;
use std::str::FromStr as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::AppState;
use crate::manifest::{Concurrency, Timer};
use crate::runtime::{OneOff, ProcessStatus, ReleaseSpec};
use crate::store::events::{self, Owner};

/// How late a missed run may still start.
const STARTING_DEADLINE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// The stream of the scheduler's lines in the app's log.
const STREAM: &str = crate::stream_names::RACK_TIMER;

/// Runs until the server stops.
pub async fn schedule(state: AppState) {
    let mut scheduler = Scheduler::default();
    // The connection whose session holds the scheduler's lock, while this replica leads.
    let mut leading: Option<sqlx::PgConnection> = None;
    loop {
        let now = Utc::now();
        leading = lead(&state, leading).await;
        if leading.is_some() {
            if let Err(e) = scheduler.tick(&state, now).await {
                tracing::warn!("running timers: {e}");
            }
        } else {
            // Another replica schedules; if this one leads again later, it starts afresh.
            scheduler.previous = None;
        }
        // Just after the next minute: a schedule's times are on the minute.
        let next = DateTime::from_timestamp((now.timestamp() / 60 + 1) * 60 + 1, 0).unwrap_or(now);
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The connection of the session that holds the scheduler's lock, if this replica holds it
/// (still, or now). One replica schedules at a time, so `forbid` and `replace` see the previous
/// run among its own processes; the claim of each time stays as the guard against two.
async fn lead(state: &AppState, held: Option<sqlx::PgConnection>) -> Option<sqlx::PgConnection> {
    if let Some(mut conn) = held {
        match crate::store::timers::still_leading(&mut conn).await {
            Ok(true) => return Some(conn),
            Ok(false) => tracing::warn!("the timer scheduler's lock is gone"),
            Err(e) => tracing::warn!("the timer scheduler's connection failed: {e}"),
        }
    }
    // A connection of its own, out of the pool: the lock lives as long as its session.
    let mut conn = state.pool.acquire().await.ok()?.detach();
    match crate::store::timers::try_lead(&mut conn).await {
        Ok(true) => {
            tracing::info!("this replica runs the timers");
            Some(conn)
        }
        _ => None,
    }
}

/// What the scheduler keeps between looks.
#[derive(Default)]
struct Scheduler {
    /// When this replica last looked: a timer that never ran runs the times after it (so one
    /// promoted at 16:05:32 first runs at 16:06 for `* * * * *`), and, right after the server
    /// starts, the times after now.
    previous: Option<DateTime<Utc>>,
    /// Releases already loaded, by id.
    releases: HashMap<String, std::sync::Arc<ReleaseSpec>>,
}

impl Scheduler {
    async fn tick(&mut self, state: &AppState, now: DateTime<Utc>) -> Result<(), String> {
        let apps = crate::store::apps::list(&state.pool)
            .await
            .map_err(|e| format!("listing apps: {e}"))?;
        let current: Vec<String> = apps
            .iter()
            .filter_map(|a| a.release_id.as_ref().map(ToString::to_string))
            .collect();
        self.releases.retain(|id, _| current.contains(id));
        for app in apps {
            let Some(release) = app.release_id.as_ref().map(ToString::to_string) else {
                continue;
            };
            let spec = match self.releases.get(&release) {
                Some(spec) => spec.clone(),
                None => match crate::jobs::deploys::load_spec(state, &app.name, &release).await {
                    Ok(spec) => {
                        let spec = std::sync::Arc::new(spec);
                        self.releases.insert(release.clone(), spec.clone());
                        spec
                    }
                    Err(e) => {
                        tracing::warn!(app.name = %app.name, "timers of release {release}: {e}");
                        continue;
                    }
                },
            };
            for (name, timer) in &spec.manifest.timers {
                if let Err(e) = self.consider(state, &spec, name, timer, now).await {
                    tracing::warn!(app.name = %app.name, timer = %name, "timer {name}: {e}");
                }
            }
        }
        self.previous = Some(now);
        Ok(())
    }

    /// Starts `timer` if a time of its came due since its last run.
    async fn consider(
        &mut self,
        state: &AppState,
        spec: &ReleaseSpec,
        name: &str,
        timer: &Timer,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let app = spec.app.as_str();
        let Some(due) = due_time(&timer.schedule, now)? else {
            return Ok(());
        };
        let last = crate::store::timers::last(&state.pool, app, name)
            .await
            .map_err(|e| e.to_string())?;
        let since = match &last {
            Some((at, _)) => *at,
            None => self.previous.unwrap_or(now),
        };
        if due <= since || due < now - STARTING_DEADLINE {
            return Ok(());
        }
        if !crate::store::timers::claim(&state.pool, app, name, due, spec.id.as_str())
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(()); // another replica has it
        }
        let previous = last.and_then(|(_, process)| process);
        let running = match &previous {
            Some(id) => match state.runtime.processes(app).await {
                Ok(processes) => processes.iter().any(|p| &p.id == id && still_running(p.status)),
                Err(e) => {
                    // Not knowing, the timer runs (as when the previous run ended).
                    tracing::warn!(error = %e, app.name = app, "listing the processes of {app}");
                    false
                }
            },
            None => false,
        };
        let outcome = match decide(timer.concurrency, previous.filter(|_| running)) {
            Decision::Skip(id) => Err(format!("skipped: the previous run, process {id}, is still running")),
            decision => {
                if let Decision::Replace(id) = decision {
                    match state.runtime.restart_process(app, &id).await {
                        Ok(()) | Err(crate::runtime::RuntimeError::NoProcess(_)) => {}
                        Err(e) => tracing::warn!(error = %e, app.name = app, "stopping process {id}"),
                    }
                    note(
                        state,
                        app,
                        format!("timer {name}: stopped process {id}, the previous run, to replace it"),
                    )
                    .await;
                }
                let timeout =
                    crate::rack_params::seconds(&state.pool, &state.config, &crate::rack_params::RUN_TIMEOUT).await;
                let one_off = OneOff {
                    service: timer.service.clone(),
                    command: timer.command.argv(),
                    env: [("TIMER".to_owned(), name.to_owned())].into(),
                    log: None,
                    timeout,
                };
                state
                    .runtime
                    .run(spec, one_off)
                    .await
                    .map(|process| process.id)
                    .map_err(|e| format!("could not start: {e}"))
            }
        };
        let recorded =
            crate::store::timers::record(&state.pool, app, name, due, outcome.as_deref().map_err(String::as_str)).await;
        let message = match &outcome {
            Ok(process) => format!(
                "timer {name} ({}, due {}) started process {process} of {}: {}",
                timer.schedule,
                due.format("%H:%M"),
                timer.service,
                timer.command.display()
            ),
            Err(reason) => format!(
                "timer {name} ({}, due {}) {reason}",
                timer.schedule,
                due.format("%H:%M")
            ),
        };
        tracing::info!(app.name = app, timer = name, "{message}");
        note(state, app, message).await;
        recorded.map_err(|e| e.to_string())
    }
}

/// The latest time at or before `now` that `schedule` names (`None` when it names none in the
/// last year: a February 30th).
///
/// # Errors
/// When the schedule cannot be read.
fn due_time(schedule: &str, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, String> {
    use chrono::DurationRound as _;
    let cron = croner::Cron::from_str(schedule).map_err(|e| format!("schedule {schedule:?}: {e}"))?;
    // On the minute exactly: it is the key replicas claim the run by, so it must not carry the
    // looking replica's fraction of a second.
    let minute = now
        .duration_trunc(chrono::TimeDelta::minutes(1))
        .map_err(|e| e.to_string())?;
    Ok(cron.find_previous_occurrence(&minute, true).ok())
}

/// What to do with a time that came due, given the previous run's process if it still runs.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Run,
    /// `Forbid`: not this time.
    Skip(String),
    /// `Replace`: stop that process, then run.
    Replace(String),
}

fn decide(concurrency: Concurrency, running: Option<String>) -> Decision {
    match (concurrency, running) {
        (Concurrency::Forbid, Some(id)) => Decision::Skip(id),
        (Concurrency::Replace, Some(id)) => Decision::Replace(id),
        _ => Decision::Run,
    }
}

/// Whether a process of a previous run still counts as running.
fn still_running(status: ProcessStatus) -> bool {
    matches!(
        status,
        ProcessStatus::Pending | ProcessStatus::Starting | ProcessStatus::Running | ProcessStatus::Unhealthy
    )
}

/// A line in the app's log (best effort: the run itself is recorded in `timer_runs`).
async fn note(state: &AppState, app: &str, message: String) {
    let owner = Owner {
        app,
        build: None,
        deployment: None,
    };
    let written = match state.pool.acquire().await {
        Ok(mut conn) => events::append(&mut conn, owner, &[(STREAM.to_owned(), message)], None)
            .await
            .map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::warn!(app.name = app, "writing a timer line: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn concurrency_decides_what_happens_to_a_run_still_going() {
        let going = || Some("web-run-abc".to_owned());
        assert_eq!(decide(Concurrency::Allow, going()), Decision::Run);
        assert_eq!(
            decide(Concurrency::Forbid, going()),
            Decision::Skip("web-run-abc".to_owned())
        );
        assert_eq!(
            decide(Concurrency::Replace, going()),
            Decision::Replace("web-run-abc".to_owned())
        );
        for concurrency in [Concurrency::Allow, Concurrency::Forbid, Concurrency::Replace] {
            assert_eq!(decide(concurrency, None), Decision::Run, "{concurrency:?}");
        }
        assert!(still_running(ProcessStatus::Running) && still_running(ProcessStatus::Pending));
        assert!(!still_running(ProcessStatus::Complete) && !still_running(ProcessStatus::Failed));
    }

    #[test]
    fn the_due_time_is_the_last_scheduled_minute() {
        let now = at("2026-12-02T15:37:01.123456789Z");
        assert_eq!(due_time("* * * * *", now).unwrap(), Some(at("2026-12-02T15:37:00Z")));
        // Another replica, a moment later, names the same time.
        let later = at("2026-12-02T15:37:02.5Z");
        assert_eq!(
            due_time("* * * * *", later).unwrap(),
            due_time("* * * * *", now).unwrap()
        );
        assert_eq!(due_time("*/5 * * * *", now).unwrap(), Some(at("2026-12-02T15:35:00Z")));
        assert_eq!(due_time("0 3 * * *", now).unwrap(), Some(at("2026-12-02T03:00:00Z")));
        assert_eq!(due_time("@daily", now).unwrap(), Some(at("2026-12-02T00:00:00Z")));
        assert_eq!(due_time("@hourly", now).unwrap(), Some(at("2026-12-02T15:00:00Z")));
        // Monday to Friday at 09:30; 2026-12-02 is a Wednesday.
        assert_eq!(
            due_time("30 9 * * MON-FRI", now).unwrap(),
            Some(at("2026-12-02T09:30:00Z"))
        );
        // Day of month or day of week, as cron reads them when both are given.
        assert_eq!(due_time("0 0 1 * SUN", now).unwrap(), Some(at("2026-12-01T00:00:00Z")));
        assert!(due_time("61 * * * *", now).is_err());
    }
}
