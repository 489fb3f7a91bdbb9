//! The rollout state machine, pure: given where a deployment is and what just happened, [`next`]
//! says where it goes, what the log says about it, whether the release becomes the app's, and
//! what the driver does next. It touches nothing; the job driver performs what it says and the
//! store records it (only if the deployment is still where the transition starts).

use serde::Serialize;
use uuid::Uuid;

/// Where a deployment is: Convox's atom states, plus `Superseded` for a deployment replaced by
/// a forced promote before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize, serde::Deserialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    Pending,
    /// Running the release's `release:` commands, before anything that runs changes.
    Releasing,
    Updating,
    Running,
    Deadline,
    Error,
    Cancelled,
    Rollback,
    Reverted,
    Failure,
    Superseded,
}

impl DeployState {
    /// Every state.
    pub const ALL: [Self; 11] = [
        Self::Pending,
        Self::Releasing,
        Self::Updating,
        Self::Running,
        Self::Deadline,
        Self::Error,
        Self::Cancelled,
        Self::Rollback,
        Self::Reverted,
        Self::Failure,
        Self::Superseded,
    ];

    /// The states of a deployment in progress (the one-per-app index covers exactly these).
    pub const ACTIVE: [Self; 7] = [
        Self::Pending,
        Self::Releasing,
        Self::Updating,
        Self::Deadline,
        Self::Error,
        Self::Cancelled,
        Self::Rollback,
    ];

    /// Whether the deployment has ended.
    pub fn is_terminal(self) -> bool {
        !Self::ACTIVE.contains(&self)
    }

    /// The name in the database and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Releasing => "releasing",
            Self::Updating => "updating",
            Self::Running => "running",
            Self::Deadline => "deadline",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
            Self::Rollback => "rollback",
            Self::Reverted => "reverted",
            Self::Failure => "failure",
            Self::Superseded => "superseded",
        }
    }

    /// The name in `Status: A => B` lines.
    pub fn title(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Releasing => "Releasing",
            Self::Updating => "Updating",
            Self::Running => "Running",
            Self::Deadline => "Deadline",
            Self::Error => "Error",
            Self::Cancelled => "Cancelled",
            Self::Rollback => "Rollback",
            Self::Reverted => "Reverted",
            Self::Failure => "Failure",
            Self::Superseded => "Superseded",
        }
    }

    /// The app status convox derives from it.
    pub fn app_status(self) -> &'static str {
        match self {
            Self::Pending | Self::Releasing | Self::Updating => "updating",
            Self::Running | Self::Reverted | Self::Failure | Self::Superseded => "running",
            Self::Deadline | Self::Error | Self::Cancelled | Self::Rollback => "rollback",
        }
    }
}

/// How a finished job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize, serde::Deserialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It did what was asked: the release runs, the build is complete.
    Ok,
    /// It did not (and the last log line says why).
    Error,
}

/// What a deployment is, as far as the machine needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot<'a> {
    pub state: DeployState,
    /// Why it failed, once it has (kept across the rollback for the final message).
    pub reason: &'a str,
    /// The release it deploys.
    pub release: &'a str,
    /// Whether that release has a release phase (`release:` commands to run first).
    pub release_phase: bool,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A worker holds the deployment (it claimed it, or took it over after its holder died)
    /// and does what its state calls for.
    Proceed,
    /// The runtime has converged on what it was asked to run (or the release phase passed).
    Applied,
    /// The runtime could not (or the release could not be loaded): why.
    ApplyFailed(String),
    /// The new release took traffic and served it worse than its analysis allows: the line
    /// with the figures (the reason the rollback ends with).
    AnalysisFailed(String),
    /// The deadline passed (its length, for the message).
    DeadlinePassed(std::time::Duration),
    /// Someone asked to cancel.
    CancelRequested,
    /// A forced promote started another deployment.
    Superseded(Uuid),
    /// The worker no longer holds the deployment (another took it over, or it was deleted).
    LeaseLost,
    /// This server is stopping.
    ShuttingDown,
}

/// What the driver does after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the release's `release:` commands (as one-off processes of the new release).
    RunReleasePhase,
    /// Roll the deployment's release out.
    ApplyRelease,
    /// Roll the app's previous release out again (or stop everything when it had none).
    ApplyPrevious,
    /// Signal [`Signal::Proceed`] at once (a failure is recorded; the rollback comes next).
    Proceed,
    /// Nothing more: the deployment ended, or is no longer this worker's.
    Stop,
    /// Give the deployment back to the queue for another worker, as it is.
    HandBack,
}

/// One move of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: DeployState,
    /// Equal to `from` when the deployment stays where it is (nothing to record).
    pub to: DeployState,
    /// The reason to record (`None`: keep the one recorded).
    pub reason: Option<String>,
    /// The lines of the rollout log about it, in order.
    pub lines: Vec<String>,
    /// Set when the deployment ends.
    pub outcome: Option<Outcome>,
    /// Whether the deployment's release becomes the app's release.
    pub activates_release: bool,
    pub then: Action,
}

impl Transition {
    /// Whether there is something to record (a new state).
    pub fn moves(&self) -> bool {
        self.to != self.from
    }

    fn stay(from: DeployState, then: Action) -> Self {
        Self {
            from,
            to: from,
            reason: None,
            lines: Vec::new(),
            outcome: None,
            activates_release: false,
            then,
        }
    }

    fn to(from: DeployState, to: DeployState, then: Action) -> Self {
        Self {
            lines: vec![status_line(from, to)],
            to,
            ..Self::stay(from, then)
        }
    }

    fn because(mut self, reason: String) -> Self {
        self.reason = Some(reason);
        self
    }

    /// Ends the deployment unsuccessfully, saying `why` as its last line.
    fn failed(mut self, why: String) -> Self {
        self.lines.push(why.clone());
        self.outcome = Some(Outcome::Error);
        self.because(why)
    }
}

/// `Status: A => B`, the line of every state change (as Convox's atom writes it).
pub fn status_line(from: DeployState, to: DeployState) -> String {
    format!("Status: {} => {}", from.title(), to.title())
}

/// The first line of a new deployment: `Status: <state of the app's previous deployment, or
/// None> => Pending`.
pub fn created_line(previous: Option<DeployState>) -> String {
    format!("Status: {} => Pending", previous.map_or("None", DeployState::title))
}

/// A move the machine does not make, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {state} deployment cannot take {signal}: {why}")]
pub struct IllegalTransition {
    pub state: &'static str,
    pub signal: String,
    pub why: &'static str,
}

/// Where `deployment` goes on `signal`.
///
/// # Errors
/// When the move is not one the machine makes (an ended deployment, a result that does not
/// fit the state, a cancel during a rollback).
pub fn next(deployment: &Snapshot<'_>, signal: &Signal) -> Result<Transition, IllegalTransition> {
    use Action as A;
    use DeployState as S;
    let from = deployment.state;
    let illegal = |why| IllegalTransition {
        state: from.as_str(),
        signal: format!("{signal:?}"),
        why,
    };
    if from.is_terminal() {
        return Err(illegal("it has ended"));
    }
    let previous_reason = deployment.reason;
    let transition = match (from, signal) {
        (_, Signal::LeaseLost) => Transition::stay(from, A::Stop),
        (_, Signal::ShuttingDown) => Transition::stay(from, A::HandBack),
        (_, Signal::Superseded(by)) => {
            Transition::to(from, S::Superseded, A::Stop).failed(format!("superseded by deployment {by}"))
        }

        (S::Pending, Signal::Proceed) if deployment.release_phase => {
            Transition::to(from, S::Releasing, A::RunReleasePhase)
        }
        (S::Pending, Signal::Proceed) => Transition::to(from, S::Updating, A::ApplyRelease),
        // Taken over during the release phase: it runs again (release commands must be safe
        // to repeat, as migrations are).
        (S::Releasing, Signal::Proceed) => Transition::stay(from, A::RunReleasePhase),
        (S::Releasing, Signal::Applied) => Transition::to(from, S::Updating, A::ApplyRelease),
        // Taken over mid-rollout: applying again converges on the same release.
        (S::Updating, Signal::Proceed) => Transition::stay(from, A::ApplyRelease),
        (S::Deadline | S::Error | S::Cancelled, Signal::Proceed) => Transition::to(from, S::Rollback, A::ApplyPrevious),
        (S::Rollback, Signal::Proceed) => Transition::stay(from, A::ApplyPrevious),

        (S::Updating, Signal::Applied) => {
            let mut t = Transition::to(from, S::Running, A::Stop);
            t.lines.push(format!("Release {} is now active", deployment.release));
            t.outcome = Some(Outcome::Ok);
            t.activates_release = true;
            t
        }
        (S::Rollback, Signal::Applied) => {
            let why = if previous_reason.is_empty() {
                "rolled back".to_owned()
            } else {
                previous_reason.to_owned()
            };
            Transition::to(from, S::Reverted, A::Stop).failed(why)
        }

        (S::Pending | S::Releasing | S::Updating, Signal::ApplyFailed(why)) => {
            Transition::to(from, S::Error, A::Proceed).because(why.clone())
        }
        // Only a rollout that sent traffic to the new release can fail its analysis.
        (S::Updating, Signal::AnalysisFailed(why)) => Transition::to(from, S::Error, A::Proceed).because(why.clone()),
        (S::Pending | S::Releasing, Signal::AnalysisFailed(_)) => {
            return Err(illegal("nothing took traffic yet"));
        }
        (S::Rollback, Signal::AnalysisFailed(_)) => return Err(illegal("a rollback is not analysed")),
        (S::Pending | S::Releasing | S::Updating, Signal::DeadlinePassed(limit)) => {
            Transition::to(from, S::Deadline, A::Proceed).because(format!(
                "the deployment did not become healthy within {}s",
                limit.as_secs()
            ))
        }
        (S::Pending | S::Releasing | S::Updating, Signal::CancelRequested) => {
            Transition::to(from, S::Cancelled, A::Proceed).because("cancelled".to_owned())
        }

        (S::Rollback, Signal::ApplyFailed(why)) => {
            Transition::to(from, S::Failure, A::Stop).failed(format!("{previous_reason}; rollback failed: {why}"))
        }
        (S::Rollback, Signal::DeadlinePassed(limit)) => Transition::to(from, S::Failure, A::Stop).failed(format!(
            "{previous_reason}; rollback failed: it did not finish within {}s",
            limit.as_secs()
        )),
        (S::Rollback, Signal::CancelRequested) => return Err(illegal("a rollback cannot be cancelled")),

        (S::Pending, Signal::Applied) => return Err(illegal("nothing was applied yet")),
        (S::Deadline | S::Error | S::Cancelled, _) => {
            return Err(illegal("a failed deployment only proceeds to its rollback"));
        }
        (S::Running | S::Reverted | S::Failure | S::Superseded, _) => return Err(illegal("it has ended")),
    };
    Ok(transition)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeployState as S;
    use std::time::Duration;

    fn at(state: DeployState) -> Snapshot<'static> {
        Snapshot {
            state,
            reason: "",
            release: "RNEWRELEASE",
            release_phase: false,
        }
    }

    fn go(state: DeployState, signal: Signal) -> Transition {
        next(&at(state), &signal).unwrap_or_else(|e| panic!("{e}"))
    }

    /// One row of the table: (from, signal, to, then, outcome, activates, lines).
    type Row = (S, Signal, S, Action, Option<Outcome>, bool, Vec<&'static str>);

    /// Every legal move.
    #[test]
    fn the_table() {
        let by = Uuid::nil();
        let minute = Duration::from_secs(60);
        let failed = || Signal::ApplyFailed("boom".into());
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            (S::Pending, Signal::Proceed, S::Updating, Action::ApplyRelease, None, false, vec!["Status: Pending => Updating"]),
            (S::Updating, Signal::Proceed, S::Updating, Action::ApplyRelease, None, false, vec![]),
            (S::Updating, Signal::Applied, S::Running, Action::Stop, Some(Outcome::Ok), true,
                vec!["Status: Updating => Running", "Release RNEWRELEASE is now active"]),
            (S::Updating, failed(), S::Error, Action::Proceed, None, false, vec!["Status: Updating => Error"]),
            (S::Pending, failed(), S::Error, Action::Proceed, None, false, vec!["Status: Pending => Error"]),
            (S::Updating, Signal::AnalysisFailed("RNEW 5xx 50%".into()), S::Error, Action::Proceed, None, false, vec!["Status: Updating => Error"]),
            (S::Updating, Signal::DeadlinePassed(minute), S::Deadline, Action::Proceed, None, false, vec!["Status: Updating => Deadline"]),
            (S::Updating, Signal::CancelRequested, S::Cancelled, Action::Proceed, None, false, vec!["Status: Updating => Cancelled"]),
            (S::Pending, Signal::CancelRequested, S::Cancelled, Action::Proceed, None, false, vec!["Status: Pending => Cancelled"]),
            (S::Deadline, Signal::Proceed, S::Rollback, Action::ApplyPrevious, None, false, vec!["Status: Deadline => Rollback"]),
            (S::Error, Signal::Proceed, S::Rollback, Action::ApplyPrevious, None, false, vec!["Status: Error => Rollback"]),
            (S::Cancelled, Signal::Proceed, S::Rollback, Action::ApplyPrevious, None, false, vec!["Status: Cancelled => Rollback"]),
            // Resumed after a takeover: the rollback is finished.
            (S::Rollback, Signal::Proceed, S::Rollback, Action::ApplyPrevious, None, false, vec![]),
            (S::Rollback, Signal::Applied, S::Reverted, Action::Stop, Some(Outcome::Error), false,
                vec!["Status: Rollback => Reverted", "rolled back"]),
            (S::Rollback, failed(), S::Failure, Action::Stop, Some(Outcome::Error), false,
                vec!["Status: Rollback => Failure", "; rollback failed: boom"]),
            (S::Rollback, Signal::DeadlinePassed(minute), S::Failure, Action::Stop, Some(Outcome::Error), false,
                vec!["Status: Rollback => Failure", "; rollback failed: it did not finish within 60s"]),
        ];
        for (from, signal, to, then, outcome, activates, lines) in table {
            let t = go(from, signal.clone());
            let case = format!("{from:?} + {signal:?}");
            assert_eq!((t.from, t.to, t.then), (from, to, then), "{case}");
            assert_eq!((t.outcome, t.activates_release), (outcome, activates), "{case}");
            assert_eq!(t.lines, lines, "{case}");
            assert_eq!(t.moves(), from != to, "{case}");
        }
        // Supersede, lease loss and shutdown apply to every state in progress.
        for from in DeployState::ACTIVE {
            let t = go(from, Signal::Superseded(by));
            assert_eq!(
                (t.to, t.then, t.outcome),
                (S::Superseded, Action::Stop, Some(Outcome::Error))
            );
            assert_eq!(t.lines[1], format!("superseded by deployment {by}"));
            let lost = go(from, Signal::LeaseLost);
            assert_eq!(
                (lost.to, lost.then, lost.lines.len()),
                (from, Action::Stop, 0),
                "lost in {from:?}"
            );
            let stopping = go(from, Signal::ShuttingDown);
            assert_eq!(
                (stopping.to, stopping.then),
                (from, Action::HandBack),
                "stopping in {from:?}"
            );
        }
    }

    #[test]
    fn illegal_moves_are_refused() {
        let illegal = [
            (S::Rollback, Signal::CancelRequested, "a rollback cannot be cancelled"),
            (S::Pending, Signal::Applied, "nothing was applied yet"),
            (S::Error, Signal::Applied, "only proceeds to its rollback"),
            (
                S::Deadline,
                Signal::DeadlinePassed(Duration::from_secs(1)),
                "only proceeds to its rollback",
            ),
            (S::Cancelled, Signal::CancelRequested, "only proceeds to its rollback"),
            (
                S::Rollback,
                Signal::AnalysisFailed("x".into()),
                "a rollback is not analysed",
            ),
            (
                S::Pending,
                Signal::AnalysisFailed("x".into()),
                "nothing took traffic yet",
            ),
            (
                S::Releasing,
                Signal::AnalysisFailed("x".into()),
                "nothing took traffic yet",
            ),
            (
                S::Error,
                Signal::AnalysisFailed("x".into()),
                "only proceeds to its rollback",
            ),
        ];
        for (from, signal, why) in illegal {
            let err = next(&at(from), &signal).unwrap_err();
            assert!(err.to_string().contains(why), "{from:?} + {signal:?}: {err}");
        }
        for ended in DeployState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for signal in [
                Signal::Proceed,
                Signal::Applied,
                Signal::LeaseLost,
                Signal::Superseded(Uuid::nil()),
            ] {
                assert!(next(&at(ended), &signal).is_err(), "{ended:?} + {signal:?}");
            }
        }
    }

    #[test]
    fn the_failure_reason_survives_the_rollback() {
        let deadline = go(S::Updating, Signal::DeadlinePassed(Duration::from_secs(30)));
        let reason = deadline.reason.unwrap();
        assert_eq!(reason, "the deployment did not become healthy within 30s");
        let rolling = Snapshot {
            state: S::Rollback,
            reason: &reason,
            release: "R",
            release_phase: false,
        };
        let reverted = next(&rolling, &Signal::Applied).unwrap();
        assert_eq!(reverted.lines.last().unwrap(), &reason);
        let failed = next(&rolling, &Signal::ApplyFailed("image gone".into())).unwrap();
        assert_eq!(
            failed.reason.unwrap(),
            "the deployment did not become healthy within 30s; rollback failed: image gone"
        );
    }

    #[test]
    fn a_failed_analysis_rolls_back_with_its_figures() {
        let why = "analysis: RNEW 5xx 50.0% (10 of 20) vs ROLD 0.0% over 1s (limit 5%)";
        let error = go(S::Updating, Signal::AnalysisFailed(why.into()));
        assert_eq!((error.to, error.then), (S::Error, Action::Proceed));
        let reason = error.reason.unwrap();
        assert_eq!(reason, why);
        let mut rolling = at(S::Error);
        rolling.reason = &reason;
        let rollback = next(&rolling, &Signal::Proceed).unwrap();
        assert_eq!((rollback.to, rollback.then), (S::Rollback, Action::ApplyPrevious));
        rolling.state = S::Rollback;
        let reverted = next(&rolling, &Signal::Applied).unwrap();
        assert_eq!(reverted.to, S::Reverted);
        assert_eq!(reverted.lines.last().unwrap(), &reason);
        assert_eq!(reverted.outcome, Some(Outcome::Error));
    }

    #[test]
    fn a_whole_failed_rollout_reads_like_convox() {
        // Updating, health fails, the rollback succeeds: the worker follows `then`.
        let mut state = S::Pending;
        let mut reason = String::new();
        let mut log = Vec::new();
        let mut signals = vec![
            Signal::Applied,
            Signal::ApplyFailed("process web-1 failed".into()),
            Signal::Proceed,
        ];
        let mut signal = Signal::Proceed;
        loop {
            let t = next(
                &Snapshot {
                    state,
                    reason: &reason,
                    release: "R1",
                    release_phase: false,
                },
                &signal,
            )
            .unwrap();
            log.extend(t.lines.clone());
            state = t.to;
            if let Some(r) = t.reason {
                reason = r;
            }
            signal = match t.then {
                Action::Stop => break,
                Action::Proceed => Signal::Proceed,
                _ => signals.pop().unwrap(),
            };
        }
        assert_eq!(
            log,
            [
                "Status: Pending => Updating",
                "Status: Updating => Error",
                "Status: Error => Rollback",
                "Status: Rollback => Reverted",
                "process web-1 failed"
            ]
        );
        assert_eq!(state, S::Reverted);
    }

    #[test]
    fn a_release_phase_runs_first_and_a_failed_one_changes_nothing_that_runs() {
        let pending = Snapshot {
            state: S::Pending,
            reason: "",
            release: "R2",
            release_phase: true,
        };
        let t = next(&pending, &Signal::Proceed).unwrap();
        assert_eq!((t.to, t.then), (S::Releasing, Action::RunReleasePhase));
        assert_eq!(t.lines, ["Status: Pending => Releasing"]);
        let releasing = Snapshot {
            state: S::Releasing,
            ..pending.clone()
        };
        let passed = next(&releasing, &Signal::Applied).unwrap();
        assert_eq!((passed.to, passed.then), (S::Updating, Action::ApplyRelease));
        let again = next(&releasing, &Signal::Proceed).unwrap();
        assert_eq!((again.to, again.then), (S::Releasing, Action::RunReleasePhase));
        let failed = next(&releasing, &Signal::ApplyFailed("bin/migrate exited 3".into())).unwrap();
        assert_eq!((failed.to, failed.then), (S::Error, Action::Proceed));
        assert_eq!(failed.lines, ["Status: Releasing => Error"]);
        // Nothing changed yet: the rollback converges on what already runs.
        let cancelled = next(&releasing, &Signal::CancelRequested).unwrap();
        assert_eq!(cancelled.to, S::Cancelled);
        assert_eq!(S::Releasing.app_status(), "updating");
    }

    #[test]
    fn states_read_as_convox_shows_them() {
        assert_eq!(created_line(None), "Status: None => Pending");
        assert_eq!(created_line(Some(S::Running)), "Status: Running => Pending");
        for state in DeployState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(state.is_terminal(), !DeployState::ACTIVE.contains(&state));
        }
        assert_eq!(S::Rollback.app_status(), "rollback");
        assert_eq!(S::Failure.app_status(), "running");
    }
}
