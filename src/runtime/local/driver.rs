//! How an instance runs: a [`Driver`] starts it and hands back a [`Running`] handle that waits
//! for it, stops it and forwards its output to the app's log. Processes are one driver
//! ([`ProcessDriver`]: a command in the sandbox, under a keeper that outlives rack for a
//! service's instance, see `keeper`, or a child tied to rack's life by a watchdog), containers
//! another (`container::ContainerDriver`: podman); the rollout, health checks, router and
//! process API are the same whatever the driver.

use std::path::PathBuf;
use std::time::Duration;

use super::process::{pipe_streams, spawn_group};
use super::sandbox::{Sandbox, Tie};
use crate::runtime::{ExecRequest, ExecSession, LogSink};

/// What an instance runs and with what (the driver decides how).
#[derive(Debug, Clone)]
pub struct Start {
    /// The process id rack gives it (`web-abcdef-xyz12`).
    pub id: String,
    pub app: String,
    pub service: String,
    pub release: String,
    pub build: String,
    /// The environment (the release's and rack's variables; the driver adds `PORT`).
    pub env: crate::env::Env,
    /// The port on 127.0.0.1 where rack reaches it (a process listens there; a container's
    /// port is published there).
    pub port: Option<u16>,
    /// Where its output goes: `service/<service>/<id>` lines in the app's log.
    pub log: LogSink,
    pub what: Runnable,
    /// Whether it outlives rack (a service's instance, under a keeper: see `keeper`), or dies
    /// with it (a one-off).
    pub kept: bool,
}

/// What runs: a process on the host, or a container.
#[derive(Debug, Clone)]
pub enum Runnable {
    Process {
        /// The build's directory: the only place of the host the process may write.
        workspace: PathBuf,
        /// Where the command starts.
        dir: PathBuf,
        argv: Vec<String>,
        /// What it may use (the service's `scale`).
        limits: super::cgroups::Limits,
        /// The ports of 127.0.0.1 of the resources it links, forwarded into its app's network
        /// namespace (see `app_network`).
        forward: Vec<u16>,
    },
    Container {
        image: String,
        /// Replaces the image's entrypoint and command when given.
        command: Option<Vec<String>>,
        /// The port the container listens on (the manifest's; its `PORT`).
        port: Option<u16>,
        cpu: Option<u32>,
        memory: Option<u32>,
        /// The ports of 127.0.0.1 of the resources it links, forwarded into its network
        /// namespace (see `forwarder`).
        forward: Vec<u16>,
    },
}

/// A running instance.
#[async_trait::async_trait]
pub trait Running: Send {
    /// The host's process id, when it has one (0 otherwise).
    fn pid(&self) -> u32;

    /// Waits until it has exited and its output is written; says how it ended.
    async fn wait(&mut self) -> super::exit::Exit;

    /// Asks it to stop (SIGTERM), without waiting: it then exits and [`Running::wait`] returns.
    fn terminate(&self);

    /// Stops it now (SIGKILL).
    fn kill(&self);

    /// Asks it to stop, gives it `grace` to finish, then kills what is left; returns once it is
    /// gone.
    async fn stop(&mut self, grace: Duration);

    /// The app network it runs in, when not the host's (the router and health checks reach it
    /// there).
    fn network(&self) -> Option<std::sync::Arc<super::app_network::AppNetwork>> {
        None
    }

    /// Lets go of it because rack is stopping: a one-off goes with rack (its watchdog stops
    /// it), an instance under a keeper and a container stay to be adopted by the next start.
    async fn detach(&mut self) {
        self.stop(Duration::from_secs(10)).await;
    }
}

/// An instance of an app found running when rack started: one a driver left behind when rack
/// stopped (a container, a process under its keeper), to be taken over ([`Driver::attach`]) or removed
/// ([`Driver::discard`]).
#[derive(Debug, Clone)]
pub struct Found {
    /// The driver's own name for it (podman's container id, a keeper's directory).
    pub handle: String,
    pub process: String,
    pub service: String,
    pub release: String,
    pub build: String,
    /// Where rack reaches it (its published port).
    pub port: Option<u16>,
    pub started: chrono::DateTime<chrono::Utc>,
    pub running: bool,
    /// The ports of its linked resources (forwarded into its network namespace).
    pub forward: Vec<u16>,
    /// Where the copy of its output into the app's log stopped, as the log's store says
    /// (filled in by the supervisor; a keeper's output is copied on from there).
    pub copied_until: Option<String>,
}

/// Starts instances, and takes over those that outlived the previous start.
#[async_trait::async_trait]
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// Starts `start`.
    ///
    /// # Errors
    /// When it cannot be started at all.
    async fn start(&self, start: Start) -> std::io::Result<Box<dyn Running>>;

    /// Runs `request` in the context of the running instance `start` (its environment, its
    /// directory or container).
    ///
    /// # Errors
    /// When the command cannot be started.
    async fn exec(&self, start: &Start, request: &ExecRequest) -> std::io::Result<ExecSession>;

    /// The instances of `app` this driver left running when rack last stopped, for the
    /// supervisor to adopt on the app's first apply. None by default: a driver whose instances
    /// go with rack has nothing to adopt.
    ///
    /// # Errors
    /// When they cannot be listed (the message; the supervisor logs it and adopts nothing).
    async fn survivors(&self, _app: &str) -> Result<Vec<Found>, String> {
        Ok(Vec::new())
    }

    /// Takes over `found` (running, of a service of the release being applied): follows its
    /// output into `log` from now on, and waits for it as if rack had started it.
    async fn attach(&self, found: &Found, log: LogSink) -> Box<dyn Running> {
        let _ = log;
        unreachable!("{self:?} found {} but cannot take it over", found.process)
    }

    /// Removes `found`, which is not taken over (stopped, or of a service no longer deployed),
    /// giving it `grace` to stop.
    async fn discard(&self, found: &Found, grace: Duration) {
        let _ = grace;
        unreachable!("{self:?} found {} but cannot remove it", found.process)
    }
}

/// Runs an app's command so that it dies with whoever holds its stdin (rack for a one-off, the
/// keeper for a service's instance): when that end of the pipe closes (it stopped or was
/// killed), the watcher sends SIGTERM to the whole process group (the
/// command and whatever it started: a shell running a shell running the server left the server
/// behind when only the command was told). The script stays until the command has exited,
/// forwarding SIGTERM: it is the first process of the sandbox's pid namespace, whose end would
/// kill the app before its graceful shutdown finished.
const WATCHDOG: &str = r#"
exec 3<&0
"$@" 3<&- </dev/null &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT HUP
(cat >/dev/null; kill -TERM 0 2>/dev/null) <&3 &
while :; do
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || exit "$status"
done
"#;

/// Instances as child processes of rack, in the sandbox, each in cgroups of its own when the
/// host has them, and in their app's network namespace when rack can make one.
#[derive(Debug)]
pub struct ProcessDriver {
    pub sandbox: Sandbox,
    /// The uid each app's processes run as.
    pub accounts: super::app_accounts::AppAccounts,
    pub cgroups: Option<super::cgroups::Cgroups>,
    pub networks: std::sync::Arc<super::app_network::AppNetworks>,
    /// Where service instances' keepers keep their state.
    pub keepers: super::kept::Keepers,
}

impl ProcessDriver {
    /// The sandbox of a process of `app` linking the resources on `forward`: in the app's
    /// network when it has one (made, with its forwarders, if need be), and that network.
    async fn sandbox_of(
        &self,
        app: &str,
        forward: &[u16],
    ) -> std::io::Result<(Sandbox, Option<std::sync::Arc<super::app_network::AppNetwork>>)> {
        let sandbox = self.accounts.sandbox(&self.sandbox, app).await?;
        Ok(match self.networks.ensure(app, forward).await? {
            Some(network) => (sandbox.in_network(network.namespace()), Some(network)),
            None => (sandbox, None),
        })
    }
}

#[async_trait::async_trait]
impl Driver for ProcessDriver {
    async fn start(&self, start: Start) -> std::io::Result<Box<dyn Running>> {
        let Runnable::Process {
            workspace,
            dir,
            argv: command,
            limits,
            forward,
        } = &start.what
        else {
            return Err(std::io::Error::other("the process driver runs processes only"));
        };
        let mut argv = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            WATCHDOG.to_owned(),
            "rack-process".to_owned(),
        ];
        argv.extend(command.iter().cloned());
        let cgroup = match &self.cgroups {
            Some(cgroups) => Some(cgroups.instance(&start.app, &start.id, *limits)?),
            None => None,
        };
        let procs = cgroup.as_ref().map(super::cgroups::Instance::procs).unwrap_or_default();
        let (sandbox, network) = self.sandbox_of(&start.app, forward).await?;
        sandbox.adopt(workspace).await?;
        let mut command = sandbox.limited_command(workspace, dir, &argv, Tie::Watchdog, &procs);
        sandbox_env(&mut command, dir, &start).stdin(std::process::Stdio::piped());
        if let Some(port) = start.port {
            command.env("PORT", port.to_string());
        }
        if start.kept {
            let kept = super::kept::Command {
                command: &command,
                ids: sandbox.direct_ids(&procs),
                forward,
            };
            let (dir, state) = self.keepers.start(&start, &kept).await?;
            let stream = crate::stream_names::service(&start.service, &start.id);
            return Ok(Box::new(super::kept::Kept::attach(
                dir,
                state,
                None,
                stream,
                start.log.clone(),
                cgroup,
                network,
            )));
        }
        let (mut child, group) = spawn_group(command)?;
        let pid = child.id().unwrap_or(0);
        let output = {
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let stream = crate::stream_names::service(&start.service, &start.id);
            let log = start.log.clone();
            tokio::spawn(async move {
                pipe_streams(stdout, stderr, &stream, &log).await;
            })
        };
        // Kept open for as long as the process should live (see WATCHDOG).
        let watchdog = child.stdin.take();
        Ok(Box::new(Process {
            child,
            pid,
            group: Some(group),
            watchdog,
            output: Some(output),
            cgroup,
            network,
        }))
    }

    async fn exec(&self, start: &Start, request: &ExecRequest) -> std::io::Result<ExecSession> {
        let Runnable::Process {
            workspace,
            dir,
            forward,
            ..
        } = &start.what
        else {
            return Err(std::io::Error::other("the process driver runs processes only"));
        };
        // A sandbox of its own with the process's files, directory, environment, network and
        // cgroups (its memory, CPU and process limits count what it runs).
        let (sandbox, _) = self.sandbox_of(&start.app, forward).await?;
        let procs = self
            .cgroups
            .as_ref()
            .map(|cgroups| cgroups.procs_of(&start.app, &start.id))
            .unwrap_or_default();
        let mut command = sandbox.command_in(
            workspace,
            dir,
            &request.command,
            Tie::DiesWithRack,
            &procs,
            request.tty.is_some(),
        );
        sandbox_env(&mut command, dir, start);
        if request.tty.is_some() {
            command.env("TERM", "xterm");
        }
        if let Some(port) = start.port {
            command.env("PORT", port.to_string());
        }
        super::exec::spawn(command, request)
    }

    /// The keepers of `app`'s instances that outlived the previous start of rack.
    async fn survivors(&self, app: &str) -> Result<Vec<Found>, String> {
        Ok(self.keepers.survivors(app))
    }

    /// Follows the keeper of `found` again, in its app's network.
    async fn attach(&self, found: &Found, log: LogSink) -> Box<dyn Running> {
        let stream = crate::stream_names::service(&found.service, &found.process);
        let Some((dir, state)) = super::kept::Kept::state_of(found) else {
            // Its files are gone since it was found: it reads as ended at once.
            let (dir, state) = (PathBuf::from(&found.handle), super::keeper::State::lost(found));
            return Box::new(super::kept::Kept::attach(dir, state, None, stream, log, None, None));
        };
        let network = match self.networks.ensure(&state.app, &found.forward).await {
            Ok(network) => network,
            Err(e) => {
                tracing::warn!(process = %found.process, "the network of {} is gone: {e}", found.process);
                None
            }
        };
        let cgroup = self.cgroups.as_ref().map(|c| c.existing(&state.app, &found.process));
        let from = found.copied_until.clone();
        Box::new(super::kept::Kept::attach(
            dir, state, from, stream, log, cgroup, network,
        ))
    }

    async fn discard(&self, found: &Found, grace: Duration) {
        let cgroup = super::kept::Kept::state_of(found)
            .and_then(|(_, state)| Some(self.cgroups.as_ref()?.existing(&state.app, &found.process)));
        super::kept::discard(found, grace, cgroup).await;
    }
}

/// A child process (and its process group).
struct Process {
    child: tokio::process::Child,
    pid: u32,
    group: Option<super::process::GroupGuard>,
    watchdog: Option<tokio::process::ChildStdin>,
    output: Option<tokio::task::JoinHandle<()>>,
    cgroup: Option<super::cgroups::Instance>,
    network: Option<std::sync::Arc<super::app_network::AppNetwork>>,
}

impl Process {
    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Ok(pid) = i32::try_from(self.pid)
            && pid > 0
        {
            // ESRCH (already gone) is fine.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Whether a process of the group still runs. Zombies do not count: the sandbox's first
    /// process, orphaned when bubblewrap exits, waits as a zombie of the group until the host's
    /// init reaps it, which some inits do lazily (it made every stop take 1.5 s more here).
    fn group_alive(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        if pid <= 0 || nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_err() {
            return false;
        }
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return true;
        };
        entries.filter_map(Result::ok).any(|entry| {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // `pid (comm) state ppid pgrp ...`: comm may hold spaces, so read after the `)`.
            let mut fields = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace();
            let state = fields.next().unwrap_or("Z");
            let pgrp = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
            pgrp == Some(pid) && state != "Z" && state != "X"
        })
    }

    /// Lets go of the group (killing what is left of it) and waits for the output to be written.
    async fn release(&mut self) {
        drop(self.group.take());
        drop(self.watchdog.take());
        if let Some(output) = self.output.take() {
            let _ = output.await;
        }
        // (One still holding a dying process stays; the next start of rack removes it.)
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
    }
}

#[async_trait::async_trait]
impl Running for Process {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn network(&self) -> Option<std::sync::Arc<super::app_network::AppNetwork>> {
        self.network.clone()
    }

    async fn wait(&mut self) -> super::exit::Exit {
        let status = self.child.wait().await;
        self.release().await;
        super::exit::Exit::of(status)
    }

    fn terminate(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    fn kill(&self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    async fn stop(&mut self, grace: Duration) {
        self.terminate();
        let _ = self.child.wait().await;
        let deadline = tokio::time::Instant::now() + grace;
        // The group outlives its leader while the app finishes its own shutdown.
        while self.group_alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        self.release().await;
    }
}

/// The environment of a sandboxed process of `start`, and of a command run inside it (`exec`):
/// rack's `PATH`, its directory as `HOME`, a UTF-8 locale, then the release's variables.
fn sandbox_env<'c>(
    command: &'c mut tokio::process::Command,
    dir: &std::path::Path,
    start: &Start,
) -> &'c mut tokio::process::Command {
    command
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .envs(&start.env)
}
