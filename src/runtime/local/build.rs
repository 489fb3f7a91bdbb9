//! Builds on this host: the source unpacked into the build's own directory, then each service
//! built the way its manifest says:
//!
//! - `build.command` (rack's extension of convox.yml): the command runs in the sandbox, with a
//!   clean environment that holds none of rack's secrets; the service then runs as a process;
//! - a Dockerfile in `build.path` (convox's way): podman builds an image
//!   `<rack>/<app>:<service>.<build>`, with convox's build arguments; the service runs as a
//!   container;
//! - `image:`: nothing to build (the image is pulled when the release is deployed).

use std::path::Path;

use super::podman::{LABEL_APP, LABEL_BUILD, LABEL_HOST, LABEL_RACK, LABEL_SERVICE, Podman};
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
    /// Builds images from Dockerfiles, when installed.
    pub podman: Option<Podman>,
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

        let mut images = std::collections::BTreeMap::new();
        for (name, service) in &manifest.services {
            let Some(build) = &service.build else {
                if let Some(image) = &service.image {
                    log.line(BUILD_STREAM, format!("Using image {image} for {name}")).await;
                }
                continue;
            };
            log.line(BUILD_STREAM, format!("Building: {name}")).await;
            let dir = inside(&src, &build.path).filter(|dir| dir.is_dir()).ok_or_else(|| {
                failed(format!(
                    "services.{name}.build.path: {:?} is not a directory",
                    build.path
                ))
            })?;
            if let Some(command) = &build.command {
                log.line(BUILD_STREAM, format!("Running: {command}")).await;
                run_command(&self.sandbox, command, &dir, &build_dir, job, log)
                    .await
                    .map_err(|e| failed(format!("service {name}: {e}")))?;
                continue;
            }
            let Some(dockerfile) = inside(&dir, &build.manifest).filter(|f| f.is_file()) else {
                // Nothing to build: the service runs its `command` in the source.
                continue;
            };
            let Some(podman) = &self.podman else {
                return Err(failed(format!(
                    "service {name} is built from {}, which needs podman: install it with \
                     `apt-get install -y podman buildah runc catatonit` (scripts/install-deps does)",
                    build.manifest
                )));
            };
            let image = podman.image_name(&job.app, name, &job.id);
            build_image(podman, job, name, &dir, &dockerfile, &image, log)
                .await
                .map_err(|e| failed(format!("service {name}: {e}")))?;
            images.insert(name.clone(), image);
        }
        Ok(BuildOutput { manifest: text, images })
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

/// Builds `service`'s image from its Dockerfile with podman, its output in the build log. The
/// Dockerfile's declared `ARG`s get values as convox gives them: from the app's environment,
/// and `APP`, `BUILD`, `BUILD_DESCRIPTION`, `RACK`, `RELEASE`, `SERVICE`. `.dockerignore` is
/// honoured; a `FROM` image already here is not pulled again. Killed with the build (cancel,
/// timeout): podman runs in a process group of its own.
async fn build_image(
    podman: &Podman,
    job: &BuildJob,
    service: &str,
    context: &Path,
    dockerfile: &Path,
    image: &str,
    log: &LogSink,
) -> Result<(), String> {
    let text = tokio::fs::read_to_string(dockerfile)
        .await
        .map_err(|e| format!("reading {}: {e}", dockerfile.display()))?;
    let mut values = job.env.clone();
    for (key, value) in [
        ("APP", job.app.as_str()),
        ("BUILD", job.id.as_str()),
        ("BUILD_DESCRIPTION", job.description.as_str()),
        ("RACK", podman.rack.as_str()),
        ("RELEASE", job.release.as_str()),
        ("SERVICE", service),
    ] {
        values.insert(key.to_owned(), value.to_owned());
    }
    let mut cmd = podman.contained_command();
    cmd.args(["build", "--pull=missing", "--layers", "--force-rm"])
        .arg("--file")
        .arg(dockerfile)
        .args(["--tag", image]);
    for (key, value) in [
        (LABEL_RACK, podman.rack.as_str()),
        (LABEL_HOST, podman.host.as_str()),
        (LABEL_APP, job.app.as_str()),
        (LABEL_BUILD, job.id.as_str()),
        (LABEL_SERVICE, service),
    ] {
        cmd.arg("--label").arg(format!("{key}={value}"));
    }
    for name in declared_args(&text) {
        if let Some(value) = values.get(&name) {
            cmd.arg("--build-arg").arg(format!("{name}={value}"));
        }
    }
    cmd.arg(context);
    log.line(BUILD_STREAM, format!("Building image {image}")).await;
    let (mut child, _group) = spawn_group(cmd).map_err(|e| format!("could not start podman: {e}"))?;
    pipe_output(&mut child, BUILD_STREAM, log).await;
    let status = child.wait().await.map_err(|e| format!("waiting for podman: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the image build failed ({status})"))
    }
}

/// The names of the build arguments a Dockerfile declares (`ARG NAME` or `ARG NAME=default`).
fn declared_args(dockerfile: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        let Some((instruction, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if !instruction.eq_ignore_ascii_case("ARG") {
            continue;
        }
        for arg in rest.split_whitespace() {
            let name = arg.split_once('=').map_or(arg, |(name, _)| name);
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_build_arguments_are_found() {
        let dockerfile = "FROM scratch\nARG GREETING\narg RELEASE=none\nRUN echo $GREETING\n  ARG A=1 B\n# ARG NOT\n";
        assert_eq!(declared_args(dockerfile), ["GREETING", "RELEASE", "A", "B"]);
    }
}
