//! The build worker: claims queued builds, runs them through the runtime with a deadline, a
//! cancel switch and a renewed lease, and ends each one `complete` (with a new release) or
//! `failed` with its reason.

use std::time::Duration;

use uuid::Uuid;

use super::{Lease, OwnedOwner, persist_lines};
use crate::AppState;
use crate::ids::ReleaseId;
use crate::runtime::BUILD_STREAM;
use crate::runtime::{BuildFailure, BuildJob, BuildOutput, LogSink};
use crate::store::builds::{self, Build, BuildStatus, Finish};
use crate::store::events::{self, Outcome, Owner};
use crate::store::releases::{self, NewRelease};

/// Starts `count` build workers; they stop when the server shuts down.
pub fn spawn_workers(state: &AppState, count: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count).map(|n| tokio::spawn(worker(state.clone(), n))).collect()
}

async fn worker(state: AppState, n: usize) {
    super::claim_loop(
        state,
        "build",
        |state| async move { builds::claim_next(&state.pool, state.replica, state.config.job_lease).await },
        |state, build| async move {
            tracing::info!(build.id = %build.id, app.name = %build.app, worker = n, "running build {}", build.id);
            run(&state, build).await;
        },
    )
    .await;
}

/// Runs one claimed build to its end (or hands it back).
#[tracing::instrument(skip_all, fields(build.id = %build.id, app.name = %build.app))]
pub async fn run(state: &AppState, build: Build) {
    let owner = OwnedOwner {
        app: build.app.clone(),
        build: Some(build.id.clone()),
        deployment: None,
    };
    // The release it will make, named now: image builds get it as their RELEASE argument.
    let release = ReleaseId::generate();
    if build.claim.attempts > 1 && !state.runtime.capabilities().resumes_builds {
        // Its previous holder died mid-build; a half-done build directory is not trustworthy.
        end(state, &build, &owner, &release, Err(BuildFailure::Interrupted)).await;
        return;
    }
    let Some(key) = build
        .source_url
        .strip_prefix(&format!("object://{}/", build.app))
        .map(str::to_owned)
    else {
        let reason = format!(
            "the source url {:?} is not an object of app {}",
            build.source_url, build.app
        );
        end(state, &build, &owner, &release, Err(BuildFailure::Failed(reason))).await;
        return;
    };
    let source_location = match crate::store::objects::get(&state.pool, &build.app, &key).await {
        Ok(Some(object)) => object.location,
        Ok(None) => {
            let reason = format!("the source object {key} no longer exists: upload it again");
            end(state, &build, &owner, &release, Err(BuildFailure::Failed(reason))).await;
            return;
        }
        Err(e) => {
            // Postgres is away: leave the build to a later claim rather than fail it.
            tracing::warn!(error = %e, build.id = %build.id, "reading the source of build {}", build.id);
            let _ = builds::hand_back(&state.pool, &build.id, state.replica).await;
            return;
        }
    };
    let env = match latest_env(state, &build.app).await {
        Ok(env) => env,
        Err(e) => {
            // Postgres is away: leave the build to a later claim rather than fail it.
            tracing::warn!(error = %e, build.id = %build.id, "reading the environment of {}", build.app);
            let _ = builds::hand_back(&state.pool, &build.id, state.replica).await;
            return;
        }
    };
    let rack_linked = match crate::store::rack_resources::linked_to(&state.pool, &build.app).await {
        Ok(linked) => linked.into_iter().map(|r| r.name).collect(),
        Err(e) => {
            tracing::warn!(error = %e, build.id = %build.id, "reading the rack resources linked to {}", build.app);
            let _ = builds::hand_back(&state.pool, &build.id, state.replica).await;
            return;
        }
    };
    let job = BuildJob {
        rack_linked,
        app: build.app.clone(),
        id: build.id.clone(),
        release: release.clone(),
        description: build.description.clone(),
        env,
        source_key: key,
        source_location,
        manifest_path: build.manifest_path.clone(),
        git_sha: build.git_sha.clone(),
    };

    let (log, rx) = LogSink::new();
    let writer = tokio::spawn(persist_lines(state.pool.clone(), owner.clone(), rx));
    let id = build.id.clone();
    let lease = Lease::keep(state, format!("build {id}"), move |state| {
        let id = id.clone();
        Box::pin(async move { builds::renew_lease(&state.pool, &id, state.replica, state.config.job_lease).await })
    });
    // `rack params set build_timeout=…` applies from the next build.
    let timeout = crate::rack_params::seconds(&state.pool, &state.config, &crate::rack_params::BUILD_TIMEOUT).await;
    let result = tokio::select! {
        result = state.runtime.build(&job, &log) => Ended::Built(result),
        () = lease.cancel.cancelled() => Ended::Built(Err(BuildFailure::Cancelled)),
        () = tokio::time::sleep(timeout) => Ended::Built(Err(BuildFailure::TimedOut(timeout))),
        () = lease.lost.cancelled() => Ended::Lost,
        () = state.shutdown.cancelled() => Ended::Stopping,
    };
    drop(lease);
    let result = match result {
        Ended::Built(result) => result,
        Ended::Lost => {
            // Deleted with its app, or taken over: what runs for it is its new holder's.
            tracing::warn!(build.id = %build.id, "lost the lease of build {}; leaving it to its new holder", build.id);
            drop(log);
            let _ = writer.await;
            return;
        }
        Ended::Stopping => {
            // This server is stopping: hand the build back so another replica (or this one,
            // once restarted) runs or resumes it, instead of failing it.
            log.line(
                BUILD_STREAM,
                "rack is shutting down; the build will restart on another server",
            )
            .await;
            drop(log);
            let _ = writer.await;
            if let Err(e) = builds::hand_back(&state.pool, &build.id, state.replica).await {
                tracing::warn!(error = %e, build.id = %build.id, "handing back build {}; its lease will expire", build.id);
            }
            return;
        }
    };
    if matches!(result, Err(BuildFailure::Cancelled | BuildFailure::TimedOut(_))) {
        if let Err(e) = state.runtime.cancel_build(&build.app, &build.id).await {
            tracing::warn!(error = %e, build.id = %build.id, "stopping what build {} left running", build.id);
        }
    }
    drop(log);
    let _ = writer.await;
    end(state, &build, &owner, &release, result).await;
}

/// The environment of the app's latest release (what a new release from this build starts
/// with).
async fn latest_env(state: &AppState, app: &str) -> Result<crate::env::Env, sqlx::Error> {
    let mut conn = state.pool.acquire().await?;
    let latest = releases::latest(&mut conn, app).await?;
    Ok(latest.and_then(|r| crate::env::parse(&r.env).ok()).unwrap_or_default())
}

/// How running a build ended.
enum Ended {
    Built(Result<BuildOutput, BuildFailure>),
    /// The lease is gone: touch nothing more.
    Lost,
    /// This server is stopping.
    Stopping,
}

/// Records the end of a build: on success a new release (the build, the env of the app's
/// latest release, the manifest) and `complete`; otherwise `failed` with the reason. The
/// terminal event goes in the same transaction, so streams end exactly when the status does.
async fn end(
    state: &AppState,
    build: &Build,
    owner: &OwnedOwner,
    release: &ReleaseId,
    mut result: Result<BuildOutput, BuildFailure>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match try_end(state, build, owner, release, &result).await {
            Ok(()) => break,
            // A write that can never succeed (its text cannot be stored) is not retried as if
            // Postgres were down: the build fails with what went wrong.
            Err(e) if !crate::store::is_transient(&e) && result.is_ok() => {
                tracing::warn!(error = %e, build.id = %build.id, "the result of build {} cannot be stored", build.id);
                result = Err(BuildFailure::Failed(format!(
                    "the build's result could not be stored: {e}"
                )));
            }
            Err(e)
                if crate::store::is_transient(&e)
                    && delay < Duration::from_secs(60)
                    && !state.shutdown.is_cancelled() =>
            {
                tracing::warn!(error = %e, build.id = %build.id, "recording the end of build {}; retrying", build.id);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                // The lease will expire and another worker will fail the build as interrupted.
                tracing::error!(error = %e, build.id = %build.id, "could not record the end of build {}", build.id);
                return;
            }
        }
    }
    // Deleting a large tree takes a while: never on the worker's path. A failed build's
    // partial source goes at once (it can be gigabytes: a refused archive bomb).
    let (pruner, app, failed) = (
        state.clone(),
        build.app.clone(),
        result.is_err().then(|| build.id.clone()),
    );
    tokio::spawn(async move {
        if let Some(id) = failed {
            prune_ids(&pruner, &app, &[id]).await;
        }
        prune(&pruner, &app).await;
    });
    match &result {
        Ok(_) => tracing::info!(build.id = %build.id, app.name = %build.app, "build {} complete", build.id),
        Err(reason) => {
            tracing::info!(build.id = %build.id, app.name = %build.app, "build {} failed: {reason}", build.id)
        }
    }
}

async fn try_end(
    state: &AppState,
    build: &Build,
    owner: &OwnedOwner,
    release_id: &ReleaseId,
    result: &Result<BuildOutput, BuildFailure>,
) -> Result<(), sqlx::Error> {
    let mut tx = state.pool.begin().await?;
    let holder = Some(state.replica);
    let (ended, line) = match result {
        Ok(output) => {
            let parent = releases::latest(&mut tx, &build.app).await?;
            releases::insert(
                &mut tx,
                &NewRelease {
                    id: release_id,
                    app: &build.app,
                    build_id: Some(&build.id),
                    env: parent.as_ref().map_or("", |p| p.env.as_str()),
                    manifest: &output.manifest,
                    description: &build.description,
                },
            )
            .await?;
            let finish = Finish {
                status: BuildStatus::Complete,
                reason: "",
                manifest: Some(&output.manifest),
                release_id: Some(release_id),
                images: Some(&output.images),
            };
            let ended = builds::finish(&mut tx, &build.id, holder, &finish).await?;
            (
                ended,
                (
                    format!("Build {} complete: release {release_id}", build.id),
                    Outcome::Ok,
                ),
            )
        }
        Err(failure) => {
            let reason = failure.to_string();
            let ended = builds::finish(&mut tx, &build.id, holder, &Finish::failed(&reason)).await?;
            (ended, (reason, Outcome::Error))
        }
    };
    if !ended {
        // Deleted with its app, or taken over: nothing to record.
        return Ok(());
    }
    let lines = [(BUILD_STREAM.to_owned(), line.0)];
    events::append(
        &mut tx,
        Owner {
            app: &owner.app,
            build: owner.build.as_deref(),
            deployment: None,
        },
        &lines,
        Some(line.1),
    )
    .await?;
    tx.commit().await?;
    let outcome = match result {
        Ok(_) => "ok",
        Err(BuildFailure::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    state
        .metrics
        .build(outcome, crate::metrics::since(build.claim.started_at));
    Ok(())
}

/// How many of an app's newest builds keep their sources on the host (beyond those that the
/// app's release and deployments in progress need), so old ones cannot fill the disk.
const KEEP_BUILDS: i64 = 10;

async fn prune(state: &AppState, app: &str) {
    match builds::prunable_ids(&state.pool, app, KEEP_BUILDS).await {
        Ok(ids) => prune_ids(state, app, &ids).await,
        Err(e) => tracing::warn!(error = %e, app.name = app, "listing the builds of {app} to prune"),
    }
}

/// Frees what builds `ids` of `app` hold in the runtime; what could not be freed waits for the
/// next prune.
async fn prune_ids(state: &AppState, app: &str, ids: &[crate::ids::BuildId]) {
    if let Err(e) = state.runtime.prune_builds(app, ids).await {
        tracing::warn!(error = %e, app.name = app, "pruning builds of {app}");
    }
}

/// Ends a build that never started (cancelled while queued): `failed`, reason `cancelled`.
///
/// # Errors
/// When Postgres fails.
pub async fn cancel_queued(conn: &mut sqlx::PgConnection, build: &Build) -> Result<(), sqlx::Error> {
    let reason = BuildFailure::Cancelled.to_string();
    if builds::finish(conn, &build.id, None::<Uuid>, &Finish::failed(&reason)).await? {
        let lines = [(BUILD_STREAM.to_owned(), reason.clone())];
        events::append(
            conn,
            Owner {
                app: &build.app,
                build: Some(&build.id),
                deployment: None,
            },
            &lines,
            Some(Outcome::Error),
        )
        .await?;
    }
    Ok(())
}
