//! The local runtime: builds run on this host. A build unpacks its source into a directory of
//! its own and runs each service's build command there (the `build.command` extension of
//! convox.yml), with a clean environment that holds none of rack's secrets.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::process::{pipe_output, spawn_group};
use super::sandbox::{Sandbox, Tie};
use super::source::inside;
use super::supervisor::{AppLogFactory, Supervisor};
use super::{ApplyError, BuildFailure, BuildJob, BuildOutput, LogSink, ProcessInfo, ReleaseSpec, Runtime};
use crate::archive::Limits;
use crate::objects::Objects;

/// The stream name of build output.
pub const BUILD_STREAM: &str = "build";

/// Processes on this host.
#[derive(Debug)]
pub struct LocalRuntime {
    objects: Objects,
    /// Builds live in `<root>/<app>/<build id>/src`.
    builds_dir: PathBuf,
    limits: Limits,
    sandbox: Sandbox,
    supervisor: Supervisor,
}

impl LocalRuntime {
    /// A runtime keeping its builds under `builds_dir`; process output and supervisor events
    /// go to the event log through `pool` and `bus`.
    pub fn new(
        objects: Objects,
        builds_dir: PathBuf,
        limits: Limits,
        sandbox: Sandbox,
        pool: sqlx::PgPool,
        bus: crate::events::EventBus,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let writer_pool = pool.clone();
        let app_log = AppLogFactory(Box::new(move |app: &str| {
            let (sink, rx) = LogSink::new();
            let owner = crate::jobs::OwnedOwner {
                app: app.to_owned(),
                build: None,
                deployment: None,
            };
            tokio::spawn(crate::jobs::persist_lines(writer_pool.clone(), bus.clone(), owner, rx));
            sink
        }));
        let supervisor = Supervisor::new(builds_dir.clone(), sandbox.clone(), pool, app_log, shutdown);
        Self {
            objects,
            builds_dir,
            limits,
            sandbox,
            supervisor,
        }
    }
}

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn restores_on_start(&self) -> bool {
        true
    }

    async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), ApplyError> {
        self.supervisor.apply(app, release, log).await
    }

    async fn processes(&self, app: &str) -> Vec<ProcessInfo> {
        self.supervisor.processes(app)
    }

    async fn restart_process(&self, app: &str, id: &str) -> bool {
        self.supervisor.restart_process(app, id)
    }

    async fn prune_builds(&self, app: &str, ids: &[String]) {
        for id in ids {
            let dir = self.builds_dir.join(app).join(id);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => tracing::info!(app.name = app, build.id = %id, "pruned the sources of build {id}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(error = %e, app.name = app, "pruning the sources of build {id}"),
            }
        }
    }

    async fn delete_app(&self, app: &str) {
        self.supervisor.delete_app(app).await;
        let _ = tokio::fs::remove_dir_all(self.builds_dir.join(app)).await;
    }

    fn router_addr(&self, app: &str) -> Option<std::net::SocketAddr> {
        self.supervisor.router_addr(app)
    }

    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure> {
        let failed = |message: String| BuildFailure::Failed(message);
        let build_dir = self.builds_dir.join(&job.app).join(&job.id);
        let super::source::Source {
            dir: src,
            text,
            manifest,
        } = super::source::fetch(&self.objects, job, &build_dir, self.limits, log).await?;
        self.sandbox
            .hand_over(&build_dir)
            .await
            .map_err(|e| failed(format!("could not prepare the build directory for the sandbox: {e}")))?;

        for (name, service) in &manifest.services {
            let Some(build) = &service.build else { continue };
            log.line(BUILD_STREAM, format!("Building: {name}")).await;
            let Some(command) = &build.command else { continue };
            let dir = inside(&src, &build.path).filter(|dir| dir.is_dir()).ok_or_else(|| {
                failed(format!(
                    "services.{name}.build.path: {:?} is not a directory",
                    build.path
                ))
            })?;
            log.line(BUILD_STREAM, format!("Running: {command}")).await;
            run_build_command(&self.sandbox, command, &dir, &build_dir, job, log)
                .await
                .map_err(|e| failed(format!("service {name}: {e}")))?;
        }
        Ok(BuildOutput {
            manifest: text,
            images: std::collections::BTreeMap::new(),
        })
    }
}

/// Runs one service's build command in the sandbox, with the build directory (`home`) as its
/// only writable place and a clean environment: nothing of rack's own (no `DATABASE_URL`, no
/// password) is in its reach.
async fn run_build_command(
    sandbox: &Sandbox,
    command: &str,
    dir: &Path,
    home: &Path,
    job: &BuildJob,
    log: &LogSink,
) -> Result<(), String> {
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()];
    let mut cmd: Command = sandbox.command(home, dir, &argv, Tie::DiesWithRack);
    cmd.stdin(std::process::Stdio::null());
    cmd.env(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
    )
    .env("HOME", home)
    .env("LANG", "C.UTF-8")
    .env("BUILD_APP", &job.app)
    .env("BUILD_ID", &job.id)
    .env("BUILD_GIT_SHA", &job.git_sha);
    let (mut child, _group) = spawn_group(cmd).map_err(|e| format!("could not start the build command: {e}"))?;
    pipe_output(&mut child, BUILD_STREAM, log).await;
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for the build command: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the build command failed ({status})"))
    }
}
