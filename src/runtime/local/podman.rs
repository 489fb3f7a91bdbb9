//! podman, as the local runtime uses it: image builds and containers on this host, without a
//! daemon. Every call goes through [`Podman::command`], which points podman at rack's own
//! containers.conf (written at startup, nothing system-wide is changed): the `runc` runtime when
//! it is installed (crun fails on hybrid cgroups), cgroupfs and file events (no systemd needed),
//! and rlimits within this host's hard limits (podman's defaults can exceed them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

/// The label every object rack makes carries, with the rack's name.
pub const LABEL_RACK: &str = "rack";
/// This host's rack (a data directory): containers of another rack on the same host are not
/// this one's to adopt or remove.
pub const LABEL_HOST: &str = "rack.host";
pub const LABEL_APP: &str = "rack.app";
pub const LABEL_SERVICE: &str = "rack.service";
pub const LABEL_RELEASE: &str = "rack.release";
pub const LABEL_BUILD: &str = "rack.build";
pub const LABEL_PROCESS: &str = "rack.process";
/// The port the container listens on (the manifest's).
pub const LABEL_PORT: &str = "rack.port";
/// The ports of the resources the container reaches through its forwarder (`5432,6379`; see
/// `forwarder`).
pub const LABEL_FORWARD: &str = "rack.forward";

/// How podman is run.
#[derive(Debug, Clone)]
pub struct Podman {
    program: PathBuf,
    conf: PathBuf,
    /// rack's data directory.
    data: PathBuf,
    /// Scratch space only root writes (in `data`): the configuration, build contexts and the
    /// apps' build caches.
    work: PathBuf,
    /// The rack's name (image names, labels).
    pub rack: String,
    /// This rack's identity on the host (labels, container names).
    pub host: String,
    /// The host uid and gid that container root maps to, when containers get a user namespace
    /// (rack is root, and /etc/subuid and /etc/subgid give the `containers` user ranges).
    userns: Option<(u32, u32)>,
    /// The private registries' credentials, for builds and pulls (see `registry_auth`).
    registries: Option<std::sync::Arc<dyn crate::runtime::Registries>>,
}

/// How long a podman command that should answer at once may take (a podman stuck on its
/// storage lock must not stall a rollout forever).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Runs a podman build (`"$@"` after `--`) in this mount namespace: first binds the network
/// namespace of process `$1` (when not empty) onto the file `$2`, then hides every entry of each
/// directory given as `DIR KEEP[:KEEP...]` pairs but those named (directories get an empty
/// read-only tmpfs, anything else /dev/null), then runs podman as the first process of a pid
/// namespace of its own, as [`Podman::contained_command`] does. The mounts stay in this
/// namespace (private propagation).
const BUILD_SCRIPT: &str = r#"set -e
if [ -n "$1" ]; then
  : > "$2"
  mount --bind "/proc/$1/ns/net" "$2"
fi
shift 2
while [ "$1" != "--" ]; do
  dir=$1 keep=$2
  shift 2
  for entry in "$dir"/* "$dir"/.[!.]* "$dir"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case ":$keep:" in *":${entry##*/}:"*) continue ;; esac
    if [ -d "$entry" ] && [ ! -L "$entry" ]; then
      mount -t tmpfs -o ro,size=4k,mode=0 rack-hidden "$entry"
    else
      mount --bind /dev/null "$entry"
    fi
  done
done
shift
exec unshare --pid --fork --kill-child --mount-proc -- "$@"
"#;

/// How long pulling an image may take.
const PULL_WITHIN: Duration = Duration::from_secs(600);

/// Ids a container's user namespace maps (root and the usual system and user ids).
const USERNS_SIZE: u32 = 65536;

/// What a container runs.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// The command (replacing the image's entrypoint and command), as convox's `command`.
    pub command: Option<Vec<String>>,
    /// `(host port on 127.0.0.1, container port)`.
    pub publish: Option<(u16, u16)>,
    /// CPU, in convox units (1024 = one core).
    pub cpu: Option<u32>,
    /// Memory limit, in MB.
    pub memory: Option<u32>,
}

/// A container as `podman ps` shows it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Listed {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "Created", default)]
    pub created: i64,
}

impl Podman {
    /// Finds podman and writes rack's containers.conf into `data_dir`. `None` when podman is not
    /// installed (services that need it then fail with a message that says so).
    ///
    /// # Errors
    /// When the configuration cannot be written.
    pub fn detect(data_dir: &Path, rack: &str) -> std::io::Result<Option<Self>> {
        let Some(program) = super::sandbox::find_on_path("podman") else {
            return Ok(None);
        };
        let root = nix::unistd::geteuid().is_root();
        let userns = if root {
            subordinate_start("/etc/subuid", "containers").zip(subordinate_start("/etc/subgid", "containers"))
        } else {
            None
        };
        let host = host_id(data_dir);
        let work = data_dir.join("podman");
        std::fs::DirBuilder::new().recursive(true).create(&work)?;
        // Only root writes here, and nobody may list it.
        std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let conf = work.join("containers.conf");
        std::fs::write(&conf, containers_conf())?;
        // Where an older rack kept it: in the data directory itself.
        let _ = std::fs::remove_file(data_dir.join("containers.conf"));
        Ok(Some(Self {
            program,
            conf,
            data: data_dir.to_path_buf(),
            work,
            rack: rack.to_owned(),
            host,
            userns,
            registries: None,
        }))
    }

    /// This podman with the private registries' credentials for its builds and pulls.
    #[must_use]
    pub fn with_registries(self, registries: std::sync::Arc<dyn crate::runtime::Registries>) -> Self {
        Self {
            registries: Some(registries),
            ..self
        }
    }

    /// The private registries' credentials, when they can be read (see `registry_auth`).
    ///
    /// # Errors
    /// Why they could not be read.
    pub async fn registry_credentials(&self) -> Result<Vec<crate::runtime::RegistryCredential>, String> {
        super::registry_auth::credentials(self.registries.as_deref()).await
    }

    /// A podman command with rack's configuration.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        self.configure(cmd.as_std_mut());
        cmd.kill_on_drop(true);
        cmd
    }

    /// Points a command at rack's configuration, with no standard input.
    pub fn configure(&self, cmd: &mut std::process::Command) {
        cmd.env("CONTAINERS_CONF", &self.conf)
            .stdin(std::process::Stdio::null());
    }

    /// A long-running podman command (following logs) that dies with rack, even when rack is
    /// killed (`setpriv --pdeathsig`): it is no use to anyone else.
    pub fn tied_command(&self) -> Command {
        let mut cmd = dying_with_rack();
        cmd.arg(&self.program);
        self.configure(cmd.as_std_mut());
        cmd.kill_on_drop(true);
        cmd
    }

    /// A podman command run as the first process of a pid namespace of its own, dying with
    /// rack: killing it kills everything it started, the processes of a build's `RUN` step
    /// included (they are not podman's children, and would outlive a cancelled build otherwise).
    pub fn contained_command(&self) -> Command {
        let mut cmd = dying_with_rack();
        cmd.args(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"])
            .arg(&self.program);
        self.configure(cmd.as_std_mut());
        cmd.kill_on_drop(true);
        cmd
    }

    /// `podman build`, contained as [`Podman::contained_command`] is, for an image of `app`
    /// from `workspace`, joining the network namespace of process `network` when given. In
    /// its mount namespace, rack's data directory shows nothing but podman's configuration,
    /// this build's workspace and `app`'s build cache (the rest, the password and the Postgres
    /// data among it, are covered by empty mounts): a builder bug that resolves a path on the
    /// host (as buildah 1.28's cache ids did) finds none of rack's secrets, nor another app's
    /// build. As root only (a normal user cannot mount; rootless podman cannot read rack's
    /// files, and has a user-mode network of its own).
    pub fn build_command(&self, app: &str, workspace: &Path, network: Option<u32>) -> Command {
        if !nix::unistd::geteuid().is_root() {
            let mut cmd = self.contained_command();
            cmd.arg("build");
            return cmd;
        }
        let name = |path: &Path| path.file_name().unwrap_or_default().to_os_string();
        // The namespace, seen through a file in the workspace: podman's own /proc (of its pid
        // namespace) does not show the process that holds it.
        let netns = workspace.join("netns");
        let mut cmd = dying_with_rack();
        cmd.args(["unshare", "--mount", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", BUILD_SCRIPT, "build"])
            .arg(network.map(|pid| pid.to_string()).unwrap_or_default())
            .arg(&netns)
            .arg(&self.data)
            .arg(name(&self.work))
            .arg(&self.work)
            .arg("containers.conf:contexts:cache")
            .arg(self.work.join("contexts"))
            .arg(name(workspace))
            .arg(self.work.join("cache"))
            .arg(app)
            .arg("--")
            .arg(&self.program)
            .arg("build");
        if network.is_some() {
            cmd.arg("--network").arg(format!("ns:{}", netns.display()));
        }
        self.configure(cmd.as_std_mut());
        cmd.kill_on_drop(true);
        cmd
    }

    /// A blocking podman command with rack's configuration, killed after a minute (for
    /// cleanups that cannot be async).
    pub fn std_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("timeout");
        cmd.arg(ANSWER_WITHIN.as_secs().to_string()).arg(&self.program);
        self.configure(&mut cmd);
        cmd
    }

    /// Runs podman with `args` (for at most a minute); its standard output on success.
    ///
    /// # Errors
    /// podman's own message (its standard error) when it fails, or that it did not answer.
    pub async fn output(&self, args: &[&str]) -> Result<String, String> {
        self.output_within(args, Some(ANSWER_WITHIN)).await
    }

    /// [`Podman::output`] with a time limit of `within` (`None`: none).
    ///
    /// # Errors
    /// As [`Podman::output`].
    pub async fn output_within<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        within: Option<Duration>,
    ) -> Result<String, String> {
        let what = args
            .first()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .unwrap_or_default();
        let running = self.command().args(args).output();
        let out = match within {
            Some(limit) => tokio::time::timeout(limit, running)
                .await
                .map_err(|_| format!("podman {what} did not answer within {}s", limit.as_secs()))?,
            None => running.await,
        }
        .map_err(|e| format!("running podman: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            let message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            Err(if message.is_empty() {
                format!("podman {what} failed ({})", out.status)
            } else {
                message
            })
        }
    }

    /// Where the image of `service` of `app`'s build `build` is built from: a directory only
    /// root may write, made anew by the build (see `context`).
    pub fn build_workspace(&self, app: &str, build: &str, service: &str) -> PathBuf {
        self.work.join("contexts").join(format!("{app}.{build}.{service}"))
    }

    /// `app`'s own directory for the build caches of `RUN --mount=type=cache` (buildah keeps
    /// them under `TMPDIR`): one app's cache is never another's.
    pub fn cache_dir(&self, app: &str) -> PathBuf {
        self.work.join("cache").join(app)
    }

    /// The image name a build gives `service` of `app`: `<rack>/<app>:<service>.<build>`.
    pub fn image_name(&self, app: &str, service: &str, build: &str) -> String {
        format!("{}/{app}:{service}.{build}", self.rack)
    }

    /// The container name of process `id` of `app` (unique on the host).
    pub fn container_name(&self, app: &str, id: &str) -> String {
        format!("{}-{}-{app}-{id}", self.rack, self.host)
    }

    /// Whether `image` is in local storage.
    pub async fn image_exists(&self, image: &str) -> bool {
        self.output(&["image", "exists", image]).await.is_ok()
    }

    /// Makes sure `image` is here, pulling it when it is not.
    ///
    /// # Errors
    /// The registry's message when the pull fails.
    pub async fn ensure_image(&self, image: &str) -> Result<(), String> {
        if self.image_exists(image).await {
            return Ok(());
        }
        // The private registries' credentials, in a file of this one pull's.
        let credentials = self.registry_credentials().await.unwrap_or_else(|e| {
            tracing::warn!("pulling {image} without private registries: {e}");
            Vec::new()
        });
        let auth = if credentials.is_empty() {
            None
        } else {
            let file = super::registry_auth::AuthFile::write_in(&self.work, &credentials)
                .map_err(|e| format!("pulling image {image}: writing the registries' auth file: {e}"))?;
            Some(file)
        };
        let extra = super::registry_auth::podman_args(auth.as_ref(), &[image.to_owned()]);
        let mut args: Vec<&std::ffi::OsStr> = vec!["pull".as_ref(), "--quiet".as_ref()];
        args.extend(extra.iter().map(std::ffi::OsString::as_os_str));
        args.push(image.as_ref());
        let pulled = self.output_within(&args, Some(PULL_WITHIN)).await;
        drop(auth);
        pulled.map(drop).map_err(|e| format!("pulling image {image}: {e}"))
    }

    /// Starts a container, detached (it outlives rack); returns its id and the host pid of its
    /// first process (0 when podman did not say). The image is looked for (and pulled) only
    /// when the run finds it missing: each podman call costs a quarter of a second on a loaded
    /// host, and the image is nearly always here (rack built it). The pid comes from the
    /// runtime's pid file, written before `run` returns, not from a `podman inspect` after it.
    ///
    /// # Errors
    /// podman's message, or the pull's.
    pub async fn run(&self, spec: &RunSpec) -> Result<(String, u32), String> {
        let pids = self.work.join("pids");
        tokio::fs::create_dir_all(&pids)
            .await
            .map_err(|e| format!("making {}: {e}", pids.display()))?;
        let pidfile = pids.join(&spec.name);
        let pidfile_arg = format!("--pidfile={}", pidfile.display());
        let args = self.container_args(&["run", "--detach", "--pull=never", &pidfile_arg], spec)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = match self.output(&args).await {
            Err(e) if e.contains("image not known") => {
                self.ensure_image(&spec.image).await?;
                self.output(&args).await?
            }
            ran => ran?,
        };
        let pid = tokio::fs::read_to_string(&pidfile)
            .await
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        let _ = tokio::fs::remove_file(&pidfile).await;
        Ok((id, pid))
    }

    /// Creates a container and initialises it without starting its command: its namespaces
    /// exist (its first process waits), for [`Podman::start`] to start it; returns its id.
    ///
    /// # Errors
    /// podman's message (a container created but not initialised is removed).
    pub async fn create(&self, spec: &RunSpec) -> Result<String, String> {
        let args = self.container_args(&["create"], spec)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = self.output(&args).await?;
        if let Err(e) = self.output(&["init", &id]).await {
            self.remove(&id, Duration::ZERO).await;
            return Err(e);
        }
        Ok(id)
    }

    /// Starts a container made by [`Podman::create`].
    ///
    /// # Errors
    /// podman's message.
    pub async fn start(&self, id: &str) -> Result<(), String> {
        self.output(&["start", id]).await.map(drop)
    }

    /// The arguments of `podman <verb...>` for `spec`.
    fn container_args(&self, verb: &[&str], spec: &RunSpec) -> Result<Vec<String>, String> {
        let mut args: Vec<String> = verb.iter().map(|s| (*s).to_owned()).collect();
        // `--replace`: a container of the same name left behind (its rack died while restarting
        // it) goes in the same podman call, not a `podman rm` before each start (~0.1 s each).
        args.extend(
            ["--init", "--replace", "--name", &spec.name]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        if let Some((uid, gid)) = self.userns {
            // Container root is an unprivileged host user, as sandboxed processes are. A fixed
            // map: podman 4.3's --userns=auto deadlocks against a build running at the same time.
            args.push(format!("--uidmap=0:{uid}:{USERNS_SIZE}"));
            args.push(format!("--gidmap=0:{gid}:{USERNS_SIZE}"));
        }
        for (key, value) in &spec.labels {
            args.extend(["--label".to_owned(), format!("{key}={value}")]);
        }
        for (key, value) in &spec.env {
            args.extend(["--env".to_owned(), format!("{key}={value}")]);
        }
        if let Some((host, container)) = spec.publish {
            args.extend(["--publish".to_owned(), format!("127.0.0.1:{host}:{container}")]);
        }
        if let Some(cpu) = spec.cpu {
            args.push(format!("--cpus={:.3}", f64::from(cpu) / 1024.0));
        }
        if let Some(memory) = spec.memory {
            args.push(format!("--memory={memory}m"));
        }
        if let Some(command) = &spec.command {
            let entrypoint = serde_json::to_string(command).map_err(|e| e.to_string())?;
            args.extend(["--entrypoint".to_owned(), entrypoint]);
        }
        args.push(spec.image.clone());
        Ok(args)
    }

    /// This rack's containers of `app` (running or not).
    pub async fn list(&self, app: &str) -> Result<Vec<Listed>, String> {
        let host = format!("label={LABEL_HOST}={}", self.host);
        let app = format!("label={LABEL_APP}={app}");
        let text = self
            .output(&["ps", "--all", "--format", "json", "--filter", &host, "--filter", &app])
            .await?;
        if text.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text).map_err(|e| format!("reading podman ps: {e}"))
    }

    /// The host pid of a container's first process (0 when it is not running).
    pub async fn pid(&self, id: &str) -> u32 {
        self.output(&["inspect", "--format", "{{.State.Pid}}", id])
            .await
            .ok()
            .and_then(|pid| pid.parse().ok())
            .unwrap_or(0)
    }

    /// The host port a container's `container_port` is published on.
    pub async fn host_port(&self, id: &str, container_port: u16) -> Option<u16> {
        let text = self
            .output(&["port", id, &format!("{container_port}/tcp")])
            .await
            .ok()?;
        text.lines().next()?.rsplit(':').next()?.trim().parse().ok()
    }

    /// Waits until the container exits; its exit code.
    pub async fn wait(&self, id: &str) -> Result<i32, String> {
        let code = self.output_within(&["wait", id], None).await?;
        code.parse().map_err(|_| format!("podman wait said {code:?}"))
    }

    /// Sends `signal` to the container's first process.
    pub async fn signal(&self, id: &str, signal: &str) {
        let _ = self.output(&["kill", "--signal", signal, id]).await;
    }

    /// Stops a container (SIGTERM, then SIGKILL after `grace`) and removes it.
    pub async fn remove(&self, id: &str, grace: Duration) {
        // One podman call, not `stop` then `rm`: `rm --force --time` stops the same way (SIGTERM,
        // SIGKILL after the grace), and each podman start costs a tenth of a second or more.
        let grace = grace.as_secs().to_string();
        let _ = self.output(&["rm", "--force", "--time", &grace, "--volumes", id]).await;
    }

    /// Removes the images this rack built for `app`'s build `build` (images a running
    /// container uses stay).
    pub async fn remove_build_images(&self, app: &str, build: &str) {
        let filters = [
            format!("label={LABEL_HOST}={}", self.host),
            format!("label={LABEL_APP}={app}"),
            format!("label={LABEL_BUILD}={build}"),
        ];
        let Ok(ids) = self
            .output(&[
                "images",
                "--quiet",
                "--filter",
                &filters[0],
                "--filter",
                &filters[1],
                "--filter",
                &filters[2],
            ])
            .await
        else {
            return;
        };
        for id in ids.lines().filter(|l| !l.is_empty()) {
            if let Err(e) = self.output(&["rmi", id]).await {
                tracing::debug!(app.name = app, build.id = build, "keeping image {id}: {e}");
            }
        }
    }
}

/// A command (its program and arguments to come) that the kernel kills when rack dies.
fn dying_with_rack() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"]);
    cmd
}

/// rack's containers.conf: what this kind of host needs, within its limits.
fn containers_conf() -> String {
    let hard = |resource| {
        nix::sys::resource::getrlimit(resource)
            .map(|(_, hard)| hard)
            .unwrap_or(1024)
    };
    // Containers may not ask for more than rack itself may have; 4096 processes are plenty for
    // one container, and some hosts refuse much more even below the hard limit.
    let nofile = hard(nix::sys::resource::Resource::RLIMIT_NOFILE).min(1 << 20);
    let nproc = hard(nix::sys::resource::Resource::RLIMIT_NPROC).min(4096);
    let runtime = if super::sandbox::find_on_path("runc").is_some() {
        "runtime = \"runc\"\n"
    } else {
        ""
    };
    // User-mode networking (slirp4netns) for containers (image builds get theirs from
    // `user_network`: buildah ignores this setting when run as root): published ports
    // are served by a userland proxy on 127.0.0.1 that goes with its container. The default
    // bridge would put a private address on a host interface and publish through iptables NAT
    // rules, which podman 4.3 sometimes leaves behind when it removes a container: traffic to
    // that port on 127.0.0.1 then goes nowhere, for whatever listens there next.
    format!(
        "# Written by rack at startup: the configuration of rack's podman commands.\n\
         [containers]\n\
         default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         netns = \"slirp4netns\"\n\
         [engine]\n\
         {runtime}cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n"
    )
}

/// A short, stable identity for the rack whose data directory is `data_dir`.
pub fn host_id(data_dir: &Path) -> String {
    use sha2::Digest;
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The start of `user`'s subordinate id range in `file` (`user:start:count`), when it is large
/// enough for a container's map.
fn subordinate_start(file: &str, user: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let start: u32 = fields.next()?.trim().parse().ok()?;
        let count: u64 = fields.next()?.trim().parse().ok()?;
        (count >= u64::from(USERNS_SIZE)).then_some(start)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_stays_within_this_hosts_limits() {
        let conf = containers_conf();
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!(conf.contains(&format!("nofile={0}:{0}", hard.min(1 << 20))), "{conf}");
        assert!(conf.contains("cgroup_manager = \"cgroupfs\""), "{conf}");
    }

    #[tokio::test]
    async fn an_image_build_sees_only_its_own_workspace_of_racks_data() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: hiding needs root (mounts)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = &dir.path().join("data");
        let work = data.join("podman");
        for (path, content) in [
            ("password", "the password"),
            ("postgres/PG_VERSION", "15"),
            ("podman/containers.conf", "conf"),
            ("podman/contexts/web.B1.web/Dockerfile", "mine"),
            ("podman/contexts/other.B2.web/Dockerfile", "theirs"),
            ("podman/cache/web/c", "my cache"),
            ("podman/cache/other/c", "their cache"),
        ] {
            let path = data.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        // A stand-in for podman (called as `podman build DATA`) that reads what a build could.
        let fake = dir.path().join("fake-podman");
        std::fs::write(
            &fake,
            "#!/bin/sh\ncd \"$2\"; for f in password postgres/PG_VERSION podman/containers.conf \
             podman/contexts/web.B1.web/Dockerfile podman/contexts/other.B2.web/Dockerfile \
             podman/cache/web/c podman/cache/other/c; do echo \"$f=$(cat $f 2>/dev/null)\"; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let podman = Podman {
            program: fake.clone(),
            conf: work.join("containers.conf"),
            data: data.to_path_buf(),
            work: work.clone(),
            rack: "rack".into(),
            host: "h".into(),
            userns: None,
            registries: None,
        };
        let out = podman
            .build_command("web", &work.join("contexts/web.B1.web"), None)
            .arg(data)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            "password=\npostgres/PG_VERSION=\npodman/containers.conf=conf\n\
             podman/contexts/web.B1.web/Dockerfile=mine\npodman/contexts/other.B2.web/Dockerfile=\n\
             podman/cache/web/c=my cache\npodman/cache/other/c=\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Nothing of it shows outside.
        assert_eq!(std::fs::read_to_string(data.join("password")).unwrap(), "the password");
    }

    #[test]
    fn a_data_directory_has_one_identity() {
        let a = host_id(Path::new("/var/lib/rack"));
        assert_eq!(a, host_id(Path::new("/var/lib/rack")));
        assert_ne!(a, host_id(Path::new("/srv/rack")));
        assert_eq!(a.len(), 8);
    }
}
