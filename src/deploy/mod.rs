//! The deployment core: a pure state machine ([`machine`]) and rolling plan ([`plan`]). Jobs
//! drive them; the store records what they decide; runtimes carry out the effects.
//!
//! ```text
//!   api ── promote ──► store: deployment row (Pending) ──► jobs::deploys (claims it, holds a lease)
//!                                                              │
//!        signals: Proceed, Applied, ApplyFailed, Deadline,     ▼
//!        AnalysisFailed, CancelRequested, Superseded,          │
//!        LeaseLost, ShuttingDown ─────────────────────────────► deploy::machine::next
//!                                                              │  Transition { to, lines,
//!                                                              │  outcome, activates, then }
//!                          store: update … where state = from ◄┤
//!                          (+ events, + app release, one tx)   │
//!                                                              ▼ then = ApplyRelease/ApplyPrevious
//!                                              runtime.apply(release, log) ── deploy::plan
//!                                              (local: instances step by step;
//!                                               kube: rollingUpdate percentages)
//!
//! Pending ─► Updating ─┬─► Running                       (the app's release switches here)
//!                      └─► Deadline | Error | Cancelled ─► Rollback ─┬─► Reverted
//!                                                                    └─► Failure
//! any state in progress ─► Superseded                    (a forced promote)
//! ```

pub mod analysis;
pub mod machine;
pub mod plan;

pub use machine::{Action, DeployState, IllegalTransition, Outcome, Signal, Snapshot, Transition, next};
