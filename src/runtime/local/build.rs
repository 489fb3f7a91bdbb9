//! Builds on this host: the source unpacked into the build's own directory, then each service
//! built the way its manifest says:
//!
//! - `build.command` (rack's extension of convox.yml): the command runs in the sandbox, with a
//!   clean environment that holds none of rack's secrets, and (rack as root) in a user-mode
//!   network of its own that does not reach the host's loopback; the service then runs as a
//!   process;
//! - a Dockerfile in `build.path` (convox's way): podman builds an image
//!   `<rack>/<app>:<service>.<build>`, with convox's build arguments; the service runs as a
//!   container;
//! - `image:`: nothing to build (the image is pulled when the release is deployed).
//!
//! An image build never reaches the host (see README, Security): it builds from a copy of the
//! service's context that rack makes (`context`), from a Dockerfile rack has checked
//! (`dockerfile`), with podman seeing nothing of rack's data directory but that copy (see
//! `Podman::build_command`), its build caches the app's own, its network user-mode
//! (`user_network`).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::dockerfile::{check_mounts, declared_args, from_images, runs_commands, with_labels};
use super::podman::{LABEL_APP, LABEL_BUILD, LABEL_HOST, LABEL_RACK, LABEL_SERVICE, Podman};
use super::process::{pipe_output, spawn_group};
use super::registry_auth::{self, AuthFile};
use super::sandbox::{Sandbox, Tie};
use crate::runtime::source;
use crate::runtime::{BUILD_STREAM, BuildFailure, BuildJob, BuildOutput, LogSink};

/// Where builds happen and what they may use.
#[derive(Debug)]
pub struct Builder {
    pub objects: crate::objects::Objects,
    /// Builds live in `<builds_dir>/<app>/<build id>/src`.
    pub builds_dir: std::path::PathBuf,
    pub limits: crate::archive::Limits,
    /// Largest size of a build's directory while its build commands run (0: no cap; see
    /// `disk_cap`).
    pub max_dir_bytes: u64,
    pub sandbox: Sandbox,
    /// The uid each app's build commands run as.
    pub accounts: super::app_accounts::AppAccounts,
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
        let sandbox = self
            .accounts
            .sandbox(&self.sandbox, &job.app)
            .await
            .map_err(|e| failed(format!("could not find the app's sandbox user: {e}")))?;
        sandbox
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
            // Resolved without leaving the source: a build command may have made links.
            let dir = super::context::resolve_inside(&src, &build.path)
                .ok()
                .filter(|dir| dir.is_dir())
                .ok_or_else(|| {
                    failed(format!(
                        "services.{name}.build.path: {:?} is not a directory in the source",
                        build.path
                    ))
                })?;
            if let Some(command) = &build.command {
                log.line(BUILD_STREAM, format!("Running: {command}")).await;
                run_command(&sandbox, command, &dir, &build_dir, self.max_dir_bytes, job, log)
                    .await
                    .map_err(|e| failed(format!("service {name}: {e}")))?;
                continue;
            }
            // The Dockerfile's own entry, not what it links to: no Dockerfile, nothing to build
            // (the service runs its `command` in the source); one leading out is refused.
            let entry = source::inside(&dir, &build.manifest).filter(|f| std::fs::symlink_metadata(f).is_ok());
            if entry.is_none() {
                continue;
            }
            if !super::context::resolve_inside(&dir, &build.manifest).is_ok_and(|f| f.is_file()) {
                return Err(failed(format!(
                    "services.{name}.build.manifest: {} is not a file inside the build context",
                    build.manifest
                )));
            }
            let Some(podman) = &self.podman else {
                return Err(failed(format!(
                    "service {name} is built from {}, which needs podman: install it with \
                     `apt-get install -y podman buildah runc catatonit` (scripts/install-deps does)",
                    build.manifest
                )));
            };
            let image = podman.image_name(&job.app, name, &job.id);
            let workspace = podman.build_workspace(&job.app, &job.id, name);
            let built = self
                .build_image(podman, job, name, &dir, &build.manifest, &workspace, &image, log)
                .await;
            let _ = tokio::fs::remove_dir_all(&workspace).await;
            built.map_err(|e| failed(format!("service {name}: {e}")))?;
            images.insert(name.clone(), image);
        }
        Ok(BuildOutput { manifest: text, images })
    }
}

/// Runs one service's build command in the sandbox, with the build directory (`home`) as its
/// only writable place and a clean environment: nothing of rack's own (no `DATABASE_URL`, no
/// password) is in its reach. Stopped (all of it) once `home` grows past `max_bytes`.
async fn run_command(
    sandbox: &Sandbox,
    command: &str,
    dir: &Path,
    home: &Path,
    max_bytes: u64,
    job: &BuildJob,
    log: &LogSink,
) -> Result<(), String> {
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()];
    // As root, a network of its own (the API and the apps' ports on the host's loopback out of
    // reach), alive until the command has ended.
    let network = if nix::unistd::geteuid().is_root() {
        Some(super::user_network::UserNetwork::start().await?)
    } else {
        None
    };
    let sandbox = match network.as_ref().and_then(super::user_network::UserNetwork::holder) {
        Some(holder) => sandbox.in_network(format!("/proc/{holder}/ns/net").into()),
        None => sandbox.clone(),
    };
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
    let (mut child, group) = spawn_group(cmd).map_err(|e| format!("could not start the build command: {e}"))?;
    let ran = async {
        pipe_output(&mut child, BUILD_STREAM, log).await;
        child.wait().await
    };
    // Either the command's end, or the size that stopped it.
    let ended = tokio::select! {
        status = ran => Ok(status),
        size = super::disk_cap::exceeded(home.to_owned(), max_bytes) => Err(size),
    };
    let status = match ended {
        Ok(status) => status.map_err(|e| format!("waiting for the build command: {e}"))?,
        Err(size) => {
            drop(group);
            let _ = child.kill().await;
            return Err(format!(
                "the build command was stopped: the build directory uses {size} bytes, more than \
                 RACK_BUILD_DIR_MAX_BYTES ({max_bytes} bytes)"
            ));
        }
    };
    drop(network);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the build command failed ({status})"))
    }
}

impl Builder {
    /// Builds `service`'s image from the Dockerfile `dockerfile` (relative to `context`) with
    /// podman, its output in the build log. podman sees a copy of the context and of the
    /// checked Dockerfile in `workspace`, never the build directory itself. The Dockerfile's
    /// declared `ARG`s get values as convox gives them: from the app's environment, and `APP`,
    /// `BUILD`, `BUILD_DESCRIPTION`, `RACK`, `RELEASE`, `SERVICE`. `.dockerignore` is honoured; a
    /// `FROM` image already here is not pulled again. Killed with the build (cancel, timeout):
    /// podman runs in a process group of its own.
    #[allow(clippy::too_many_arguments)]
    async fn build_image(
        &self,
        podman: &Podman,
        job: &BuildJob,
        service: &str,
        context: &Path,
        dockerfile: &str,
        workspace: &Path,
        image: &str,
        log: &LogSink,
    ) -> Result<(), String> {
        let copied = workspace.join("context");
        let (from, into, limits, name) = (
            context.to_owned(),
            workspace.to_owned(),
            self.limits,
            dockerfile.to_owned(),
        );
        let text = tokio::task::spawn_blocking(move || -> Result<String, String> {
            if into.exists() {
                std::fs::remove_dir_all(&into).map_err(|e| format!("clearing {}: {e}", into.display()))?;
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&into)
                .map_err(|e| format!("making {}: {e}", into.display()))?;
            super::context::copy(&from, &into.join("context"), limits)?;
            let file = super::context::resolve_inside(&into.join("context"), &name)?;
            let text = std::fs::read_to_string(&file).map_err(|e| format!("reading {name}: {e}"))?;
            check_mounts(&text).map_err(|e| format!("{name}: {e}"))?;
            // The checked text, under a name buildah takes as it is (a `.in` file would go
            // through cpp first, as root).
            std::fs::write(into.join("Dockerfile"), &text).map_err(|e| e.to_string())?;
            Ok(text)
        })
        .await
        .map_err(|e| e.to_string())??;
        let cache = podman.cache_dir(&job.app);
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&cache)
            .await
            .map_err(|e| format!("making the build cache directory: {e}"))?;

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
        // As root, the build's own user-mode network (rootless podman has one of its own); none
        // for a Dockerfile that runs no commands (only a `RUN` step uses the network).
        let commands = runs_commands(&text);
        let network = if commands && nix::unistd::geteuid().is_root() {
            Some(super::user_network::UserNetwork::start().await?)
        } else {
            None
        };
        let holder = network.as_ref().and_then(super::user_network::UserNetwork::holder);
        log.line(BUILD_STREAM, format!("Building image {image}")).await;
        for attempt in 1.. {
            // The second attempt weighs no cache candidates at all (see below).
            let cached = attempt == 1;
            let (status, last) = self
                .run_podman_build(
                    podman, job, service, workspace, holder, &values, &text, image, &copied, cached, log,
                )
                .await?;
            if status.success() {
                return Ok(());
            }
            // podman 4.3 races: an image removed while a build weighs it as a cache candidate
            // (another app's old build pruned, or its app deleted) fails the build with "layer
            // not known". Building again with the cache could meet the same half-removed image
            // (a loaded run did, twice in 15 s), so the retry uses no cache: slower, but it never
            // looks at another build's layers.
            if attempt == 1 && last.is_some_and(|line| line.contains("layer not known")) {
                log.line(
                    BUILD_STREAM,
                    "A cached layer was removed while this build looked at it: building again".to_owned(),
                )
                .await;
                continue;
            }
            return Err(format!("the image build failed ({status})"));
        }
        unreachable!("the loop returns")
    }

    /// Runs one `podman build` of the checked Dockerfile in `workspace`; says how it ended and
    /// its last line of output.
    #[allow(clippy::too_many_arguments)]
    async fn run_podman_build(
        &self,
        podman: &Podman,
        job: &BuildJob,
        service: &str,
        workspace: &Path,
        holder: Option<u32>,
        values: &std::collections::BTreeMap<String, String>,
        text: &str,
        image: &str,
        copied: &Path,
        cached: bool,
        log: &LogSink,
    ) -> Result<(std::process::ExitStatus, Option<String>), String> {
        let cache = podman.cache_dir(&job.app);
        let mut cmd = podman.build_command(&job.app, workspace, holder);
        // Without a `RUN` step, caching each step's layer saves nothing worth its commits (a
        // tenth of a second or more each): the image is committed once, at the end.
        let commands = runs_commands(text);
        let layers = if commands { "--layers" } else { "--layers=false" };
        cmd.env("TMPDIR", &cache).args(["--pull=missing", layers, "--force-rm"]);
        if !commands {
            cmd.args(["--network", "none"]);
        }
        cmd.arg("--file")
            .arg(workspace.join("Dockerfile"))
            .args(["--tag", image]);
        let labels = [
            (LABEL_RACK, podman.rack.as_str()),
            (LABEL_HOST, podman.host.as_str()),
            (LABEL_APP, job.app.as_str()),
            (LABEL_BUILD, job.id.as_str()),
            (LABEL_SERVICE, service),
        ];
        // One LABEL instruction (one commit) rather than a step per `--label`.
        if let Some(labelled) = with_labels(text, &labels) {
            tokio::fs::write(workspace.join("Dockerfile"), labelled)
                .await
                .map_err(|e| format!("writing the Dockerfile: {e}"))?;
        } else {
            for (key, value) in labels {
                cmd.arg("--label").arg(format!("{key}={value}"));
            }
        }
        for name in declared_args(text) {
            if let Some(value) = values.get(&name) {
                cmd.arg("--build-arg").arg(format!("{name}={value}"));
            }
        }
        // The private registries' credentials for its `FROM`s, in a file of this one call's, in
        // the workspace (the only place of rack's data podman sees here).
        let credentials = match podman.registry_credentials().await {
            Ok(credentials) => credentials,
            Err(e) => {
                log.line(BUILD_STREAM, format!("Warning: {e}")).await;
                Vec::new()
            }
        };
        let auth = if credentials.is_empty() {
            None
        } else {
            let file = AuthFile::write(workspace.join("registries.json"), &credentials)
                .map_err(|e| format!("writing the registries' auth file: {e}"))?;
            Some(file)
        };
        cmd.args(registry_auth::podman_args(auth.as_ref(), &from_images(text)));
        if !cached {
            cmd.arg("--no-cache");
        }
        cmd.arg(copied);
        let (mut child, _group) = spawn_group(cmd).map_err(|e| format!("could not start podman: {e}"))?;
        let last = pipe_output(&mut child, BUILD_STREAM, log).await;
        let status = child.wait().await.map_err(|e| format!("waiting for podman: {e}"))?;
        drop(auth);
        Ok((status, last))
    }
}
