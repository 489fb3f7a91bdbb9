//! The deploy worker: claims deployments and drives each through `deploy::machine`, turning
//! what happens (the runtime's result, the deadline, a cancel, a lost lease, shutdown) into
//! signals and performing what each transition says. It always ends in Running, Reverted or
//! Failure, or hands the deployment back; a deployment whose holder died is taken over when the
//! lease expires and resumed from its state (`Signal::Proceed`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Lease, OwnedOwner, persist_lines};
use crate::AppState;
use crate::deploy::{Action, Signal, Transition};
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};
use crate::store::deployments::{self, Deployment};
use crate::store::releases;

/// Starts `count` deploy workers; they stop when the server shuts down.
pub fn spawn_workers(state: &AppState, count: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count).map(|_| tokio::spawn(worker(state.clone()))).collect()
}

async fn worker(state: AppState) {
    super::claim_loop(
        state,
        "deployment",
        |state| async move { deployments::claim_next(&state.pool, state.replica, state.config.job_lease).await },
        |state, deployment| async move {
            tracing::info!(deployment.id = %deployment.id, app.name = %deployment.app, "running deployment {}", deployment.id);
            run(&state, deployment).await;
        },
    )
    .await;
}

/// Drives one claimed deployment until it ends, is handed back, or is no longer this
/// worker's.
#[tracing::instrument(skip_all, fields(deployment.id = %deployment.id, app.name = %deployment.app))]
pub async fn run(state: &AppState, deployment: Deployment) {
    let owner = OwnedOwner {
        app: deployment.app.clone(),
        build: None,
        deployment: Some(deployment.id),
    };
    let (log, rx) = LogSink::new();
    let writer = tokio::spawn(persist_lines(state.pool.clone(), owner, rx));
    let id = deployment.id;
    let lease = Lease::keep(state, format!("deployment {id}"), move |state| {
        Box::pin(async move { deployments::renew_lease(&state.pool, id, state.replica, state.config.job_lease).await })
    });
    let driver = Driver {
        state,
        log: &log,
        lease: &lease,
    };
    if let Err(e) = driver.drive(deployment).await {
        // The lease will expire and another worker will resume the deployment.
        tracing::error!(error = format!("{e:#}"), deployment.id = %id, "deployment {id} stalled");
    }
    drop(lease);
    drop(log);
    let _ = writer.await;
}

/// One deployment being driven by this worker.
struct Driver<'a> {
    state: &'a AppState,
    log: &'a LogSink,
    lease: &'a Lease,
}

impl Driver<'_> {
    /// Feeds signals to the machine until it says to stop, recording each transition.
    async fn drive(&self, mut deployment: Deployment) -> anyhow::Result<()> {
        let timeout = Duration::from_secs(u64::try_from(deployment.timeout_secs).unwrap_or(1800));
        let started = deployment.claim.started_at.unwrap_or_else(chrono::Utc::now);
        let elapsed = (chrono::Utc::now() - started).to_std().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + timeout.saturating_sub(elapsed);
        let target = self.load(&deployment.app, Some(&deployment.release_id)).await;
        let release_phase = target.as_ref().is_ok_and(|t| {
            t.as_ref()
                .is_some_and(|spec| spec.manifest.services.values().any(|s| s.release.is_some()))
        });
        let mut signal = Signal::Proceed;
        loop {
            let mut snapshot = deployment.snapshot();
            snapshot.release_phase = release_phase;
            let transition = match crate::deploy::next(&snapshot, &signal) {
                Ok(transition) => transition,
                Err(e) => {
                    // A bug, not a state of the world: leave the deployment to its lease.
                    anyhow::bail!("{e}");
                }
            };
            if transition.moves() && !self.record(&mut deployment, &transition).await? {
                // Moved by someone else (superseded, taken over): it is theirs now.
                return self.clean_up_if_deleted(&deployment.app).await;
            }
            signal = match transition.then {
                Action::Proceed => Signal::Proceed,
                Action::RunReleasePhase => self.release_phase(&deployment, target.clone(), deadline, timeout).await,
                Action::ApplyRelease => self.apply(&deployment, target.clone(), deadline, timeout, true).await,
                Action::ApplyPrevious => {
                    // The rollback gets a deadline of its own (the first one may be what ran
                    // out), and at least `rollback_min_timeout` (five minutes).
                    let limit = timeout.max(self.state.config.rollback_min_timeout);
                    let previous = self
                        .load(&deployment.app, deployment.previous_release_id.as_deref())
                        .await;
                    self.apply(&deployment, previous, tokio::time::Instant::now() + limit, limit, false)
                        .await
                }
                Action::Stop if signal == Signal::LeaseLost => return self.clean_up_if_deleted(&deployment.app).await,
                Action::Stop => {
                    if transition.to == crate::deploy::DeployState::Running {
                        tracing::info!(deployment.id = %deployment.id, app.name = %deployment.app, "release {} is running", deployment.release_id);
                    }
                    return Ok(());
                }
                Action::HandBack => {
                    deployments::hand_back(&self.state.pool, deployment.id, self.state.replica).await?;
                    return Ok(());
                }
            };
        }
    }

    /// Records `transition` (after what the runtime wrote so far, which belongs before its
    /// lines); false when the deployment moved under us.
    async fn record(&self, deployment: &mut Deployment, transition: &Transition) -> anyhow::Result<bool> {
        self.log.flush().await;
        let stream = crate::stream_names::atom(self.state.runtime.name());
        let recorded =
            deployments::record(&self.state.pool, deployment, self.state.replica, transition, &stream).await?;
        if recorded {
            if transition.to.is_terminal() {
                let started = deployment.claim.started_at.or(Some(deployment.created_at));
                self.state
                    .metrics
                    .deployment(transition.to, crate::metrics::since(started));
            }
            deployment.state = transition.to;
            if let Some(reason) = &transition.reason {
                deployment.reason.clone_from(reason);
            }
        }
        Ok(recorded)
    }

    /// The release `id` as the runtime runs it (`None`: the app had none, so nothing runs), or
    /// why it cannot run.
    async fn load(&self, app: &str, id: Option<&str>) -> Result<Option<ReleaseSpec>, String> {
        match id {
            // The reason the deployment fails with.
            Some(id) => load_spec(self.state, app, id)
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    /// Has the runtime converge on `release` until `deadline`, watching for a cancel (unless
    /// `cancellable` is false: a rollback is not), a lost lease and shutdown; returns what
    /// happened as a signal.
    async fn apply(
        &self,
        deployment: &Deployment,
        release: Result<Option<ReleaseSpec>, String>,
        deadline: tokio::time::Instant,
        limit: Duration,
        cancellable: bool,
    ) -> Signal {
        let mut release = match release {
            Ok(release) => release,
            Err(reason) => return Signal::ApplyFailed(reason),
        };
        // Only the deployment's own release is judged by its traffic (`cancellable` is false
        // for the rollback).
        if let Some(spec) = release.as_mut() {
            spec.analyse = cancellable;
        }
        let never = CancellationToken::new();
        let cancel = if cancellable { &self.lease.cancel } else { &never };
        tokio::select! {
            result = self.state.runtime.apply(&deployment.app, release.as_ref(), self.log) => {
                let resources = release.as_ref().map(|r| &r.resources);
                super::resources::applied(&self.state.pool, &deployment.app, resources, result.is_ok()).await;
                match result {
                    Ok(()) => {
                        crate::api::certificates::serve_app(self.state, &deployment.app, release.as_ref()).await;
                        Signal::Applied
                    }
                    Err(RuntimeError::AnalysisFailed(why)) if cancellable => Signal::AnalysisFailed(why),
                    Err(e) => Signal::ApplyFailed(e.to_string()),
                }
            },
            () = tokio::time::sleep_until(deadline) => Signal::DeadlinePassed(limit),
            () = cancel.cancelled() => Signal::CancelRequested,
            () = self.lease.lost.cancelled() => Signal::LeaseLost,
            () = self.state.shutdown.cancelled() => Signal::ShuttingDown,
        }
    }

    /// Runs the release's `release:` commands, service by service, each as a one-off process
    /// of the new release with its output in the deployment's log; a non-zero exit fails the
    /// phase (nothing that runs has changed yet).
    async fn release_phase(
        &self,
        deployment: &Deployment,
        release: Result<Option<ReleaseSpec>, String>,
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Signal {
        let spec = match release {
            Ok(Some(spec)) => spec,
            Ok(None) => return Signal::ApplyFailed("the release no longer exists".to_owned()),
            Err(reason) => return Signal::ApplyFailed(reason),
        };
        let runtime = self.state.runtime.name();
        for (service, command) in spec
            .manifest
            .services
            .iter()
            .filter_map(|(name, s)| Some((name, s.release.as_ref()?)))
        {
            let stream = crate::stream_names::system(runtime, service);
            self.log
                .line(
                    &stream,
                    format!("Running release command of {service}: {}", command.display()),
                )
                .await;
            let one_off = crate::runtime::OneOff {
                service: service.clone(),
                command: command.argv(),
                env: crate::env::Env::new(),
                log: Some(self.log.clone()),
                timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
            };
            let process = match self.state.runtime.run(&spec, one_off).await {
                Ok(process) => process,
                Err(e) => return Signal::ApplyFailed(format!("the release command of {service} could not start: {e}")),
            };
            let waited = tokio::select! {
                code = self.state.runtime.wait_process(&deployment.app, &process.id) => Ok(code),
                () = tokio::time::sleep_until(deadline) => Err(Signal::DeadlinePassed(limit)),
                () = self.lease.cancel.cancelled() => Err(Signal::CancelRequested),
                () = self.lease.lost.cancelled() => Err(Signal::LeaseLost),
                () = self.state.shutdown.cancelled() => Err(Signal::ShuttingDown),
            };
            match waited {
                Ok(Ok(0)) => {
                    self.log
                        .line(&stream, format!("Release command of {service} succeeded"))
                        .await;
                }
                Ok(Ok(code)) => {
                    return Signal::ApplyFailed(format!(
                        "the release command of {service} ({}) exited with code {code}",
                        command.display()
                    ));
                }
                Ok(Err(e)) => return Signal::ApplyFailed(format!("the release command of {service}: {e}")),
                Err(signal) => {
                    // Whatever ended the wait, the command goes with it.
                    if let Err(e) = self.state.runtime.restart_process(&deployment.app, &process.id).await {
                        tracing::warn!(error = %e, deployment.id = %deployment.id, "stopping release command {}", process.id);
                    }
                    return signal;
                }
            }
        }
        Signal::Applied
    }

    async fn clean_up_if_deleted(&self, app: &str) -> anyhow::Result<()> {
        clean_up_if_deleted(self.state, app).await
    }
}

/// Why a deployment could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another deployment of the app is in progress (and `force` was not given).
    #[error("app is currently updating")]
    Busy,
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

/// Starts a deployment of `release` (one per app: [`StartError::Busy`] while another runs,
/// unless `force` supersedes it) and wakes the workers.
///
/// # Errors
/// When another deployment is in progress, or Postgres fails.
pub async fn start_deployment(
    state: &AppState,
    app: &str,
    release: &str,
    force: bool,
    timeout_secs: u64,
) -> Result<Deployment, StartError> {
    let mut tx = state.pool.begin().await?;
    let deployment = start_deployment_in(state, &mut tx, app, release, force, timeout_secs).await?;
    tx.commit().await?;
    woke(state);
    Ok(deployment)
}

/// [`start_deployment`] inside the caller's transaction (which must then commit and call
/// [`woke`]); a deployment in progress makes it [`StartError::Busy`], and the caller's whole
/// transaction with it.
///
/// # Errors
/// When another deployment is in progress, or Postgres fails.
pub async fn start_deployment_in(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    app: &str,
    release: &str,
    force: bool,
    timeout_secs: u64,
) -> Result<Deployment, StartError> {
    let stream = crate::stream_names::atom(state.runtime.name());
    let id = uuid::Uuid::now_v7();
    if force {
        supersede(&mut *conn, app, id, &stream).await?;
    }
    let timeout = Duration::from_secs(timeout_secs);
    deployments::insert(&mut *conn, id, app, release, timeout, &stream)
        .await
        .map_err(|e| {
            let busy = e.as_database_error().and_then(|d| d.constraint()) == Some(deployments::ONE_ACTIVE_PER_APP);
            if busy { StartError::Busy } else { e.into() }
        })
}

/// Wakes the deploy workers after a deployment was committed (its streams hear of it through
/// NOTIFY).
pub fn woke(state: &AppState) {
    state.bus.poke(crate::events::Wake::Jobs);
}

/// Ends the app's deployment in progress, if any, as `superseded` by `by` (a forced promote),
/// in the caller's transaction, its lines on `stream`. Its worker notices at its next lease
/// renewal and stops.
///
/// # Errors
/// When Postgres fails.
pub async fn supersede(
    conn: &mut sqlx::PgConnection,
    app: &str,
    by: uuid::Uuid,
    stream: &str,
) -> Result<Option<Deployment>, sqlx::Error> {
    let Some(old) = deployments::lock_active(&mut *conn, app).await? else {
        return Ok(None);
    };
    match crate::deploy::next(&old.snapshot(), &Signal::Superseded(by)) {
        Ok(transition) => {
            deployments::record_in(conn, &old, None, &transition, stream).await?;
        }
        // Every deployment in progress can be superseded; this is a bug, not the client's.
        Err(e) => tracing::error!(deployment.id = %old.id, "superseding: {e}"),
    }
    Ok(Some(old))
}

/// A lost lease can mean the app was deleted mid-rollout: then what the rollout started
/// must not outlive it.
async fn clean_up_if_deleted(state: &AppState, app: &str) -> anyhow::Result<()> {
    let name = crate::names::AppName::parse(app)?;
    if crate::store::apps::get(&state.pool, &name).await?.is_none() {
        if let Err(e) = state.runtime.delete_app(app).await {
            tracing::warn!(error = %e, app.name = app, "removing what the rollout of deleted app {app} started");
        }
    }
    Ok(())
}

/// Why a release cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum LoadSpecError {
    #[error("release {0} no longer exists")]
    Gone(String),
    #[error("release {0} has no build")]
    NoBuild(String),
    /// Its manifest or environment does not parse (the message says why).
    #[error("{reason}")]
    Invalid { release: String, reason: String },
    /// Postgres failed while reading `what`.
    #[error("reading {what}: {source}")]
    Store {
        what: String,
        #[source]
        source: sqlx::Error,
    },
}

impl LoadSpecError {
    fn store(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let what = what.into();
        move |source| Self::Store { what, source }
    }
}

/// A release as the runtime needs it, with the counts set by `scale`.
///
/// # Errors
/// When the release or its manifest or env is unusable, or Postgres fails.
pub async fn load_spec(state: &AppState, app: &str, id: &str) -> Result<ReleaseSpec, LoadSpecError> {
    let release = releases::get(&state.pool, app, id)
        .await
        .map_err(LoadSpecError::store(format!("release {id}")))?
        .ok_or_else(|| LoadSpecError::Gone(id.to_owned()))?;
    let build_id = release
        .build_id
        .clone()
        .ok_or_else(|| LoadSpecError::NoBuild(id.to_owned()))?;
    let invalid = |reason: String| LoadSpecError::Invalid {
        release: id.to_owned(),
        reason,
    };
    // The rack-wide resources linked to the app (`rack rack resources link`).
    let rack_linked: BTreeMap<String, crate::resource::ResourceSpec> =
        crate::store::rack_resources::linked_to(&state.pool, app)
            .await
            .map_err(LoadSpecError::store(format!("the rack resources linked to {app}")))?
            .iter()
            .filter_map(|row| Some((row.name.clone(), crate::api::rack_resources::spec_of(row).ok()?)))
            .collect();
    let names: Vec<String> = rack_linked.keys().cloned().collect();
    let mut manifest = crate::manifest::parse_linking(&release.manifest, &names).map_err(|e| invalid(e.to_string()))?;
    let env = crate::env::parse(&release.env).map_err(|e| invalid(e.to_string()))?;
    // Counts set with `scale` win over the manifest's, for this release and every later one.
    let scales = crate::store::scales::for_app(&state.pool, app)
        .await
        .map_err(LoadSpecError::store(format!("the scale of {app}")))?;
    for (service, count) in scales {
        if let Some(s) = manifest.services.get_mut(&service) {
            let count = u32::try_from(count).unwrap_or(0);
            s.scale.count_min = count;
            s.scale.count_max = s.scale.count_max.max(count);
        }
    }
    // The images its build made (services built from a Dockerfile run them).
    let images = crate::store::builds::get(&state.pool, app, &build_id)
        .await
        .map_err(LoadSpecError::store(format!("build {build_id}")))?
        .map(|build| build.images.0)
        .unwrap_or_default();
    // The resources it declares, with their credentials (created on first use).
    let resources = super::resources::for_release(&state.pool, app, &manifest.resources)
        .await
        .map_err(|e| match e {
            super::resources::ResourcesError::Store(source) => LoadSpecError::Store {
                what: format!("the resources of {app}"),
                source,
            },
            super::resources::ResourcesError::TypeChanged(reason) => LoadSpecError::Invalid {
                release: id.to_owned(),
                reason,
            },
        })?;
    Ok(ReleaseSpec {
        app: app.to_owned(),
        id: release.id,
        build_id,
        images,
        env,
        resources,
        rack_linked,
        manifest,
        analyse: false,
    })
}

/// How long bringing one app back may take (a deployment's default timeout).
const RECONCILE_LIMIT: Duration = Duration::from_secs(1800);

/// Brings back the rack-wide resources and the processes of every app's current release (at
/// startup: the local runtime's processes do not outlive the server), and on any runtime after a restore (a Kubernetes
/// cluster may have none of the restored apps, and the resources it creates load the backup's
/// exports): until every app has been applied, the restore's marker stays
/// (`crate::backup::REAPPLY`), so a server stopped half-way does it again. Apps with a
/// deployment in progress are left to the deploy workers.
pub async fn reconcile_all(state: AppState) {
    let marker = state.config.data_dir.join(crate::backup::REAPPLY);
    let restored = marker.exists();
    if !state.runtime.capabilities().restores_on_start && !restored {
        return;
    }
    let apps = match crate::store::apps::list_released(&state.pool).await {
        Ok(apps) => apps,
        Err(e) => {
            tracing::error!(error = %e, "listing apps to bring back");
            return;
        }
    };
    // Rack-wide resources first: the apps linked to them need them running.
    let mut all_applied = crate::api::rack_resources::ensure_all(&state).await;
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
        let writer = tokio::spawn(persist_lines(state.pool.clone(), owner, rx));
        let stream = crate::stream_names::atom(state.runtime.name());
        let after = if restored { "a restore" } else { "a server restart" };
        log.line(&stream, format!("Restoring release {release} after {after}"))
            .await;
        // Bounded as a deployment is by default: one app that cannot converge (a resource whose
        // volume never binds) must not keep the others from coming back.
        let result = tokio::select! {
            result = state.runtime.apply(&app, Some(&spec), &log) => result,
            () = tokio::time::sleep(RECONCILE_LIMIT) => Err(RuntimeError::Failed(format!(
                "not converged within {} s",
                RECONCILE_LIMIT.as_secs()
            ))),
            () = state.shutdown.cancelled() => return,
        };
        match result {
            Ok(()) => crate::api::certificates::serve_app(&state, &app, Some(&spec)).await,
            Err(e) => {
                all_applied = false;
                log.line(&stream, format!("Restoring release {release} failed: {e}"))
                    .await;
            }
        }
        drop(log);
        let _ = writer.await;
        tracing::info!(app.name = %app, "restored release {release} of {app}");
    }
    // One that failed is tried again at the next start (a resource's export still to load).
    if restored
        && all_applied
        && let Err(e) = std::fs::remove_file(&marker)
    {
        tracing::warn!(error = %e, "removing {}", marker.display());
    }
}
