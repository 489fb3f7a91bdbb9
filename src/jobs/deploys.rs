//! The deploy worker: claims pending deployments, rolls the release out through the runtime
//! under the deployment's deadline, and always ends in Running, Reverted or Failure.
//!
//! ```text
//! Pending ─► Updating ─┬─► Running                        (the app's release switches here)
//!                      └─► Deadline | Error | Cancelled ─► Rollback ─┬─► Reverted
//!                                                                    └─► Failure
//! ```
//! A deployment whose holder died is taken over when the lease expires and resumed from its
//! state: an update is applied again (the runtime converges on the release), a rollback is
//! finished.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Lease, OwnedOwner, persist_lines};
use crate::AppState;
use crate::events::Wake;
use crate::runtime::{LogSink, ReleaseSpec};
use crate::store::deployments::{self, DeployState, Deployment};
use crate::store::releases;

/// The shortest time a rollback gets.
const ROLLBACK_MIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts `count` deploy workers; they stop when the server shuts down.
pub fn spawn_workers(state: &AppState, count: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count).map(|_| tokio::spawn(worker(state.clone()))).collect()
}

async fn worker(state: AppState) {
    let mut wake = state.bus.subscribe();
    loop {
        if state.shutdown.is_cancelled() {
            return;
        }
        match deployments::claim_next(&state.pool, state.replica, state.config.job_lease).await {
            Ok(Some(deployment)) => {
                tracing::info!(deployment.id = %deployment.id, app.name = %deployment.app, "running deployment {}", deployment.id);
                run(&state, deployment).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "claiming a deployment"),
        }
        if !super::wait_for_work(&state, &mut wake).await {
            return;
        }
    }
}

/// How a phase of the rollout ended.
enum Phase {
    Done,
    Failed(DeployState, String),
    /// The lease is gone (superseded, deleted, taken over): touch nothing more.
    Lost,
    /// This server is stopping: hand the deployment back.
    Stopping,
}

async fn run(state: &AppState, deployment: Deployment) {
    let owner = OwnedOwner {
        app: deployment.app.clone(),
        build: None,
        deployment: Some(deployment.id),
    };
    let (log, rx) = LogSink::new();
    let writer = tokio::spawn(persist_lines(state.pool.clone(), state.bus.clone(), owner, rx));
    let id = deployment.id;
    let lease = Lease::keep(state, format!("deployment {id}"), move |state| {
        Box::pin(async move { deployments::renew_lease(&state.pool, id, state.replica, state.config.job_lease).await })
    });
    let timeout = Duration::from_secs(u64::try_from(deployment.timeout_secs).unwrap_or(1800));
    let started = deployment.started_at.unwrap_or_else(chrono::Utc::now);
    let elapsed = (chrono::Utc::now() - started).to_std().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + timeout.saturating_sub(elapsed);

    let outcome = drive(state, &deployment, &log, &lease.cancel, &lease.lost, deadline, timeout).await;
    drop(lease);
    drop(log);
    let _ = writer.await;
    if let Err(e) = outcome {
        // The lease will expire and another worker will resume the deployment.
        tracing::error!(error = format!("{e:#}"), deployment.id = %deployment.id, "deployment {} stalled", deployment.id);
    }
    state.bus.poke(Wake::Events(deployment.app.clone()));
}

async fn drive(
    state: &AppState,
    deployment: &Deployment,
    log: &LogSink,
    cancel: &CancellationToken,
    lost: &CancellationToken,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    let runtime = state.runtime.name();
    let step = |to: DeployState, reason: String| async move {
        // What the runtime wrote so far belongs before the state line.
        log.flush().await;
        deployments::transition(&state.pool, deployment.id, state.replica, to, &reason, runtime).await
    };
    let mut failure = match deployment.state {
        DeployState::Pending | DeployState::Updating => None,
        other => Some((other, deployment.reason.clone())),
    };
    if failure.is_none() {
        if !step(DeployState::Updating, String::new()).await? {
            return Ok(());
        }
        let target = match load_spec(state, &deployment.app, &deployment.release_id).await {
            Ok(spec) => Some(spec),
            Err(reason) => {
                failure = Some((DeployState::Error, reason));
                None
            }
        };
        if let Some(target) = target {
            match phase(state, deployment, Some(&target), log, cancel, lost, deadline, timeout).await {
                Phase::Done => {
                    step(DeployState::Running, String::new()).await?;
                    tracing::info!(deployment.id = %deployment.id, app.name = %deployment.app, "release {} is running", deployment.release_id);
                    return Ok(());
                }
                Phase::Failed(state_, reason) => failure = Some((state_, reason)),
                Phase::Lost => return clean_up_if_deleted(state, &deployment.app).await,
                Phase::Stopping => return hand_back(state, deployment).await,
            }
        }
    }
    let Some((failed_state, reason)) = failure else {
        return Ok(());
    };
    if matches!(
        failed_state,
        DeployState::Deadline | DeployState::Error | DeployState::Cancelled
    ) && !step(failed_state, reason.clone()).await?
    {
        return Ok(());
    }
    if !step(DeployState::Rollback, reason.clone()).await? {
        return Ok(());
    }
    let previous = match &deployment.previous_release_id {
        Some(id) => match load_spec(state, &deployment.app, id).await {
            Ok(spec) => Some(spec),
            Err(e) => {
                step(DeployState::Failure, format!("{reason}; rollback failed: {e}")).await?;
                return Ok(());
            }
        },
        None => None,
    };
    // The rollback gets a deadline of its own (the original one may be what ran out), and at
    // least five minutes: a short deadline given for the new release must not doom the old one.
    let rollback_timeout = timeout.max(ROLLBACK_MIN_TIMEOUT);
    let rollback_deadline = tokio::time::Instant::now() + rollback_timeout;
    let never = CancellationToken::new();
    match phase(
        state,
        deployment,
        previous.as_ref(),
        log,
        &never,
        lost,
        rollback_deadline,
        rollback_timeout,
    )
    .await
    {
        Phase::Done => {
            step(DeployState::Reverted, reason).await?;
        }
        Phase::Failed(_, why) => {
            step(DeployState::Failure, format!("{reason}; rollback failed: {why}")).await?;
        }
        Phase::Lost => return clean_up_if_deleted(state, &deployment.app).await,
        Phase::Stopping => return hand_back(state, deployment).await,
    }
    Ok(())
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site each for the update and the rollback"
)]
async fn phase(
    state: &AppState,
    deployment: &Deployment,
    release: Option<&ReleaseSpec>,
    log: &LogSink,
    cancel: &CancellationToken,
    lost: &CancellationToken,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Phase {
    tokio::select! {
        result = state.runtime.apply(&deployment.app, release, log) => match result {
            Ok(()) => Phase::Done,
            Err(e) => Phase::Failed(DeployState::Error, e.0),
        },
        () = tokio::time::sleep_until(deadline) => Phase::Failed(
            DeployState::Deadline,
            format!("the deployment did not become healthy within {}s", timeout.as_secs()),
        ),
        () = cancel.cancelled() => Phase::Failed(DeployState::Cancelled, "cancelled".to_owned()),
        () = lost.cancelled() => Phase::Lost,
        () = state.shutdown.cancelled() => Phase::Stopping,
    }
}

/// A lost lease can mean the app was deleted mid-rollout: then what the rollout started
/// must not outlive it.
async fn clean_up_if_deleted(state: &AppState, app: &str) -> anyhow::Result<()> {
    let name = crate::names::AppName::parse(app)?;
    if crate::store::apps::get(&state.pool, &name).await?.is_none() {
        state.runtime.delete_app(app).await;
    }
    Ok(())
}

async fn hand_back(state: &AppState, deployment: &Deployment) -> anyhow::Result<()> {
    deployments::hand_back(&state.pool, deployment.id, state.replica).await?;
    Ok(())
}

/// A release as the runtime needs it, with the counts set by `scale`.
///
/// # Errors
/// A reason, when the release or its manifest or env is unusable.
pub async fn load_spec(state: &AppState, app: &str, id: &str) -> Result<ReleaseSpec, String> {
    let release = releases::get(&state.pool, app, id)
        .await
        .map_err(|e| format!("reading release {id}: {e}"))?
        .ok_or_else(|| format!("release {id} no longer exists"))?;
    let build_id = release
        .build_id
        .clone()
        .ok_or_else(|| format!("release {id} has no build"))?;
    let mut manifest = crate::manifest::parse(&release.manifest).map_err(|e| e.to_string())?;
    let env = crate::env::parse(&release.env).map_err(|e| e.to_string())?;
    // Counts set with `scale` win over the manifest's, for this release and every later one.
    let scales = crate::store::scales::for_app(&state.pool, app)
        .await
        .map_err(|e| format!("reading the scale of {app}: {e}"))?;
    for (service, count) in scales {
        if let Some(s) = manifest.services.get_mut(&service) {
            let count = u32::try_from(count).unwrap_or(0);
            s.scale.count_min = count;
            s.scale.count_max = s.scale.count_max.max(count);
        }
    }
    Ok(ReleaseSpec {
        app: app.to_owned(),
        id: release.id,
        build_id,
        env,
        manifest,
    })
}

/// Brings back the processes of every app's current release (at startup: the local runtime's
/// processes do not outlive the server). Apps with a deployment in progress are left to the
/// deploy workers.
pub async fn reconcile_all(state: AppState) {
    if !state.runtime.restores_on_start() {
        return;
    }
    let apps = match crate::store::apps::list_released(&state.pool).await {
        Ok(apps) => apps,
        Err(e) => {
            tracing::error!(error = %e, "listing apps to bring back");
            return;
        }
    };
    for (app, release) in apps {
        match deployments::latest_state(&state.pool, &app).await {
            Ok(Some(s)) if !s.is_terminal() => continue,
            Err(e) => {
                tracing::warn!(error = %e, app.name = %app, "reading the deployments of {app}");
                continue;
            }
            _ => {}
        }
        let spec = match load_spec(&state, &app, &release).await {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(app.name = %app, "cannot bring back {app}: {e}");
                continue;
            }
        };
        let (log, rx) = LogSink::new();
        let owner = OwnedOwner {
            app: app.clone(),
            build: None,
            deployment: None,
        };
        let writer = tokio::spawn(persist_lines(state.pool.clone(), state.bus.clone(), owner, rx));
        log.line(
            "system/local/atom/app",
            format!("Restoring release {release} after a server restart"),
        )
        .await;
        let result = tokio::select! {
            result = state.runtime.apply(&app, Some(&spec), &log) => result,
            () = state.shutdown.cancelled() => return,
        };
        if let Err(e) = result {
            log.line(
                "system/local/atom/app",
                format!("Restoring release {release} failed: {e}"),
            )
            .await;
        }
        drop(log);
        let _ = writer.await;
        tracing::info!(app.name = %app, "restored release {release} of {app}");
    }
}
