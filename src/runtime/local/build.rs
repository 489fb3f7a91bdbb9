//! Builds on this host: the source unpacked into the build's own directory, then each service's
//! build command (the `build.command` extension of convox.yml) run in the sandbox with a clean
//! environment that holds none of rack's secrets.

use std::path::Path;

use super::process::{pipe_output, spawn_group};
use super::sandbox::{Sandbox, Tie};
use crate::runtime::source::{self, inside};
use crate::runtime::{BUILD_STREAM, BuildFailure, BuildJob, BuildOutput, LogSink};

/// Where builds happen and what they may use.
#[derive(Debug)]
pub struct Builder {
    pub objects: crate::objects::Objects,
    /// Builds live in `<builds_dir>/<app>/<build id>/src`.
    pub builds_dir: std::path::PathBuf,
    pub limits: crate::archive::Limits,
    pub sandbox: Sandbox,
}

impl Builder {
    /// Builds `job`, writing its output to `log`.
    pub async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure> {
        let failed = BuildFailure::Failed;
        let build_dir = self.builds_dir.join(&job.app).join(&job.id);
        let source::Source {
            dir: src,
            text,
            manifest,
        } = source::fetch(&self.objects, job, &build_dir, self.limits, log).await?;
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
            run_command(&self.sandbox, command, &dir, &build_dir, job, log)
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
async fn run_command(
    sandbox: &Sandbox,
    command: &str,
    dir: &Path,
    home: &Path,
    job: &BuildJob,
    log: &LogSink,
) -> Result<(), String> {
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()];
    let mut cmd = sandbox.command(home, dir, &argv, Tie::DiesWithRack);
    cmd.stdin(std::process::Stdio::null())
        .env(
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
