//! Instances as podman containers: each labelled with rack, app, service, release, build and
//! process id, its port published on a port of 127.0.0.1 that rack's router and health checks
//! use, its output followed into the app's log. Containers outlive rack: when rack stops they are
//! left running, and the next start adopts them by label (`Driver::survivors`, `Driver::attach`). A
//! container that links resources is created, given its resource forwarder (see `forwarder`),
//! and only then started.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::driver::{Driver, Found, Runnable, Running, Start};
use super::forwarder::Forwarders;
use super::podman::{
    LABEL_APP, LABEL_BUILD, LABEL_FORWARD, LABEL_HOST, LABEL_PORT, LABEL_PROCESS, LABEL_RACK, LABEL_RELEASE,
    LABEL_SERVICE, Podman, RunSpec,
};
use super::process::pipe_streams;
use crate::runtime::{ExecRequest, ExecSession, LogSink};

/// Starts containers.
#[derive(Debug)]
pub struct ContainerDriver {
    pub podman: Podman,
    pub forwarders: Forwarders,
}

#[async_trait::async_trait]
impl Driver for ContainerDriver {
    async fn start(&self, start: Start) -> std::io::Result<Box<dyn Running>> {
        let Runnable::Container {
            image,
            command,
            port,
            cpu,
            memory,
            forward,
        } = &start.what
        else {
            return Err(std::io::Error::other("the container driver runs containers only"));
        };
        let podman = &self.podman;
        let name = podman.container_name(&start.app, &start.id);
        let mut labels = BTreeMap::from([
            (LABEL_RACK.to_owned(), podman.rack.clone()),
            (LABEL_HOST.to_owned(), podman.host.clone()),
            (LABEL_APP.to_owned(), start.app.clone()),
            (LABEL_SERVICE.to_owned(), start.service.clone()),
            (LABEL_RELEASE.to_owned(), start.release.clone()),
            (LABEL_BUILD.to_owned(), start.build.clone()),
            (LABEL_PROCESS.to_owned(), start.id.clone()),
        ]);
        let mut env = start.env.clone();
        env.insert("RACK".to_owned(), podman.rack.clone());
        if !forward.is_empty() {
            labels.insert(LABEL_FORWARD.to_owned(), super::forwarder::ports_label(forward));
        }
        if let Some(port) = port {
            labels.insert(LABEL_PORT.to_owned(), port.to_string());
            // As convox sets it: the port the container listens on.
            env.insert("PORT".to_owned(), port.to_string());
        }
        let spec = RunSpec {
            name,
            image: image.clone(),
            labels,
            env,
            command: command.clone(),
            publish: start.port.zip(*port),
            cpu: *cpu,
            memory: *memory,
        };
        let (id, pid) = if forward.is_empty() {
            podman.run(&spec).await.map_err(std::io::Error::other)?
        } else {
            // Its namespace first, its forwarder listening there, then its command: the app
            // reaches its resources from its first instruction.
            podman.ensure_image(image).await.map_err(std::io::Error::other)?;
            let id = podman.create(&spec).await.map_err(std::io::Error::other)?;
            let forwarded = match self.forwarders.start(podman.pid(&id).await, forward).await {
                Ok(()) => podman.start(&id).await,
                Err(e) => Err(format!("forwarding its resources into the container: {e}")),
            };
            if let Err(e) = forwarded {
                podman.remove(&id, Duration::ZERO).await;
                return Err(std::io::Error::other(e));
            }
            (id.clone(), podman.pid(&id).await)
        };
        // A pid file podman did not write (an older podman): asked for instead.
        let pid = if pid == 0 { podman.pid(&id).await } else { pid };
        let stream = crate::stream_names::service(&start.service, &start.id);
        Ok(Box::new(Container {
            podman: podman.clone(),
            id: id.clone(),
            pid,
            output: Some(follow(podman, &id, None, stream, start.log)),
        }))
    }

    async fn exec(&self, start: &Start, request: &ExecRequest) -> std::io::Result<ExecSession> {
        let name = self.podman.container_name(&start.app, &start.id);
        let mut command = if request.tty.is_some() {
            let mut command = self.podman.tied_command();
            // A terminal of its own for podman, which hands it on into the container.
            let program = command.as_std().get_program().to_owned();
            let args: Vec<std::ffi::OsString> = command.as_std().get_args().map(ToOwned::to_owned).collect();
            command = tokio::process::Command::new("setsid");
            command.arg("--ctty").arg(program).args(args);
            self.podman.configure(command.as_std_mut());
            command
        } else {
            self.podman.tied_command()
        };
        command.arg("exec");
        if request.stdin {
            command.arg("--interactive");
        }
        if request.tty.is_some() {
            command.args(["--tty", "--env", "TERM=xterm"]);
        }
        // A mark only this session's command (and what it starts) carries: `podman exec` ends
        // with its client, but the command it started in the container does not.
        let marker = format!("{EXEC_MARKER}={}", uuid::Uuid::new_v4().simple());
        command.args(["--env", &marker]);
        command.arg(&name).args(&request.command);
        Ok(reap_on_abandon(super::exec::spawn(command, request)?, marker))
    }

    /// This rack's containers of `app` on this host, by their labels.
    async fn survivors(&self, app: &str) -> Result<Vec<Found>, String> {
        let mut found = Vec::new();
        for listed in self.podman.list(app).await? {
            let labels = listed.labels.clone().unwrap_or_default();
            let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
            let container_port = labels.get(LABEL_PORT).and_then(|p| p.parse::<u16>().ok());
            let port = match container_port {
                Some(p) => self.podman.host_port(&listed.id, p).await,
                None => None,
            };
            found.push(Found {
                handle: listed.id.clone(),
                process: label(LABEL_PROCESS),
                service: label(LABEL_SERVICE),
                release: label(LABEL_RELEASE),
                build: label(LABEL_BUILD),
                port,
                started: DateTime::from_timestamp(listed.created, 0).unwrap_or_else(Utc::now),
                running: listed.state == "running",
                forward: super::forwarder::parse_ports(&label(LABEL_FORWARD)),
                copied_until: None,
            });
        }
        Ok(found)
    }

    /// Its resource forwarder outlived rack with it; one is started again if it is gone.
    async fn attach(&self, found: &Found, log: LogSink) -> Box<dyn Running> {
        let pid = self.podman.pid(&found.handle).await;
        if let Err(e) = self.forwarders.ensure(pid, &found.forward).await {
            tracing::warn!(process = %found.process, "the resources of {} are out of its reach: {e}", found.process);
            let system = crate::stream_names::system("local", &found.process);
            log.line(
                &system,
                format!("Process {} cannot reach its resources: {e}", found.process),
            )
            .await;
        }
        let stream = crate::stream_names::service(&found.service, &found.process);
        let since = Utc::now().to_rfc3339();
        Box::new(Container {
            podman: self.podman.clone(),
            id: found.handle.clone(),
            pid,
            output: Some(follow(&self.podman, &found.handle, Some(&since), stream, log)),
        })
    }

    async fn discard(&self, found: &Found, grace: Duration) {
        self.podman.remove(&found.handle, grace).await;
    }
}

/// The variable each `podman exec` command gets, with a value unique to its session.
const EXEC_MARKER: &str = "RACK_EXEC_SESSION";

/// `session`, whose command is killed in the container (with every process it started, which
/// inherit its environment) when the session is dropped before the command ended: the client
/// went away, as `kubectl exec`'s command ends with its connection.
fn reap_on_abandon(session: ExecSession, marker: String) -> ExecSession {
    let mut reaper = Reaper(Some(marker));
    let exit = session.exit;
    ExecSession {
        exit: Box::pin(async move {
            let code = exit.await;
            // It ended by itself: whatever it left running in the background stays, as with
            // any exec.
            reaper.disarm();
            code
        }),
        ..session
    }
}

/// Kills the processes marked with its mark when dropped while armed.
struct Reaper(Option<String>);

impl Reaper {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let Some(marker) = self.0.take() else { return };
        // A few passes: a command podman was still starting when its client went shows up a
        // moment later. /proc is read off the async runtime's threads.
        std::thread::spawn(move || {
            for pause in [0, 500, 2000] {
                std::thread::sleep(Duration::from_millis(pause));
                kill_marked(&marker);
            }
        });
    }
}

/// Sends SIGKILL to every process of this host whose environment holds `marker`
/// (`NAME=value`). Rootless, processes of the container's other users are not readable, so not
/// found: their command ends only when the container does.
fn kill_marked(marker: &str) {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Follows a container's output into `log` as `stream` lines (from `since`, or from its start).
fn follow(podman: &Podman, id: &str, since: Option<&str>, stream: String, log: LogSink) -> tokio::task::JoinHandle<()> {
    let mut command = podman.tied_command();
    command.args(["logs", "--follow"]);
    if let Some(since) = since {
        command.args(["--since", since]);
    }
    command
        .arg(id)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    tokio::spawn(async move {
        let Ok(mut child) = command.spawn() else { return };
        pipe_streams(child.stdout.take(), child.stderr.take(), &stream, &log).await;
        let _ = child.wait().await;
    })
}

/// A running container.
struct Container {
    podman: Podman,
    id: String,
    pid: u32,
    output: Option<tokio::task::JoinHandle<()>>,
}

impl Container {
    /// Waits (a little) for the last of its output, then stops following it.
    async fn drain_output(&mut self) {
        if let Some(mut output) = self.output.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut output).await.is_err()
        {
            output.abort();
        }
    }

    fn signal_later(&self, signal: &'static str) {
        let (podman, id) = (self.podman.clone(), self.id.clone());
        tokio::spawn(async move { podman.signal(&id, signal).await });
    }
}

#[async_trait::async_trait]
impl Running for Container {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait(&mut self) -> super::exit::Exit {
        let status = match self.podman.wait(&self.id).await {
            Ok(code) => super::exit::Exit::Code(code),
            Err(e) => super::exit::Exit::Lost(format!("lost: {e}")),
        };
        self.drain_output().await;
        self.podman.remove(&self.id, Duration::ZERO).await;
        status
    }

    fn terminate(&self) {
        self.signal_later("TERM");
    }

    fn kill(&self) {
        self.signal_later("KILL");
    }

    async fn stop(&mut self, grace: Duration) {
        self.podman.remove(&self.id, grace).await;
        self.drain_output().await;
    }

    async fn detach(&mut self) {
        if let Some(output) = self.output.take() {
            output.abort();
        }
    }
}
