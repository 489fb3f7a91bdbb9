//! The local runtime: builds run on this host. A build unpacks its source into a directory of
//! its own and runs each service's build command there (the `build.command` extension of
//! convox.yml), with a clean environment that holds none of rack's secrets.

use std::path::{Component, Path, PathBuf};

use tokio::process::Command;

use super::process::{pipe_output, spawn_group};
use super::supervisor::{AppLogFactory, Supervisor};
use super::{ApplyError, BuildFailure, BuildJob, BuildOutput, LogSink, ProcessInfo, ReleaseSpec, Runtime};
use crate::archive::{Limits, unpack_tgz};
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
    supervisor: Supervisor,
}

impl LocalRuntime {
    /// A runtime keeping its builds under `builds_dir`; process output and supervisor events
    /// go to the event log through `pool` and `bus`.
    pub fn new(
        objects: Objects,
        builds_dir: PathBuf,
        limits: Limits,
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
        let supervisor = Supervisor::new(builds_dir.clone(), pool, app_log, shutdown);
        Self {
            objects,
            builds_dir,
            limits,
            supervisor,
        }
    }
}

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
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
        let src = build_dir.join("src");
        // A retried build starts from scratch.
        if build_dir.exists() {
            tokio::fs::remove_dir_all(&build_dir)
                .await
                .map_err(|e| failed(format!("could not clear the build directory: {e}")))?;
        }
        tokio::fs::create_dir_all(&src)
            .await
            .map_err(|e| failed(format!("could not create the build directory: {e}")))?;

        log.line(BUILD_STREAM, format!("Fetching source {}", job.source_key))
            .await;
        let tarball = build_dir.join("source.tgz");
        self.objects
            .download(&job.app, &job.source_key, &tarball)
            .await
            .map_err(|e| failed(format!("could not fetch the source object {}: {e:#}", job.source_key)))?;
        let limits = self.limits;
        let (from, into) = (tarball.clone(), src.clone());
        let stats = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&from)?;
            unpack_tgz(std::io::BufReader::new(file), &into, limits).map_err(std::io::Error::other)
        })
        .await
        .map_err(|e| failed(format!("unpacking the source failed: {e}")))?
        .map_err(|e| failed(format!("invalid source archive: {e}")))?;
        let _ = tokio::fs::remove_file(&tarball).await;
        log.line(
            BUILD_STREAM,
            format!("Unpacked {} files ({} bytes)", stats.files, stats.bytes),
        )
        .await;

        let manifest_file = inside(&src, &job.manifest_path)
            .ok_or_else(|| failed(format!("invalid manifest path {:?}", job.manifest_path)))?;
        let text = tokio::fs::read_to_string(&manifest_file)
            .await
            .map_err(|_| failed(format!("no {} found in the source", job.manifest_path)))?;
        let manifest = crate::manifest::parse(&text).map_err(|e| failed(e.to_string()))?;

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
            run_build_command(command, &dir, &build_dir, job, log)
                .await
                .map_err(|e| failed(format!("service {name}: {e}")))?;
        }
        Ok(BuildOutput { manifest: text })
    }
}

async fn run_build_command(
    command: &str,
    dir: &Path,
    home: &Path,
    job: &BuildJob,
    log: &LogSink,
) -> Result<(), String> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .stdin(std::process::Stdio::null());
    // A clean environment: the build must not see DATABASE_URL or the rack password.
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

/// `relative` joined to `root`, or `None` if it is absolute or climbs out with `..`.
/// (Symlinks in the tree cannot point outside: the unpacker refuses such archives.)
fn inside(root: &Path, relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    let mut joined = root.to_path_buf();
    for component in path.components() {
        match component {
            Component::Normal(part) => joined.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_source() {
        let root = Path::new("/b/src");
        assert_eq!(inside(root, "convox.yml"), Some(root.join("convox.yml")));
        assert_eq!(inside(root, "./a/b"), Some(root.join("a/b")));
        assert_eq!(inside(root, "."), Some(root.to_path_buf()));
        assert_eq!(inside(root, "../x"), None);
        assert_eq!(inside(root, "/etc/passwd"), None);
    }
}
