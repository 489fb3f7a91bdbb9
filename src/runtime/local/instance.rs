//! One instance of a service of a release, and the task that keeps it running: start it through
//! the driver, watch its health, restart it (with backoff) when it exits or stays unhealthy,
//! stop it when asked.
//!
//! ```text
//! start ─► output to the app log ─► health loop ─┬─ exit ─────────► backoff ─► start
//!                                                ├─ unhealthy ────► kill ──► backoff ─► start
//!                                                ├─ restart asked ► stop ──► start
//!                                                └─ stop asked ───► stop (TERM, grace, KILL)
//! ```

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::driver::{Driver, Runnable, Running, Start};
use super::exit::Exit;
use super::health::{HealthCheck, health_loop};
use crate::manifest::{Command as ServiceCommand, Service};
use crate::runtime::{LogSink, ProcessKind, ProcessStatus, ReleaseSpec, RuntimeError};

/// How long an instance gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where an instance is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Starting,
    Ready,
    Unhealthy,
    /// It exited or never passed a check before becoming ready.
    Failed(String),
}

/// One instance of a service of a release.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub release: String,
    /// The host port it listens on (0: none); see `port`.
    pub port: AtomicU16,
    pub command: String,
    /// The image it runs (containers).
    pub image: String,
    pub started: DateTime<Utc>,
    pub pid: AtomicU32,
    pub health: watch::Sender<Health>,
    /// Set when rack is stopping it on purpose (not a crash).
    pub stopping: AtomicBool,
    /// A restart was asked for (`ps stop`, `restart`).
    pub restart: Notify,
    pub stop: CancellationToken,
    pub done: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A service's instance, or a one-off process.
    pub kind: ProcessKind,
    /// A one-off process's exit code, once it has ended.
    pub exit: watch::Sender<Option<i32>>,
    /// How it runs (for `exec`).
    pub launch: Launch,
    /// The app network it runs in, when not the host's (see `app_network`).
    pub network: Mutex<Option<Arc<super::app_network::AppNetwork>>>,
}

impl Instance {
    /// A new instance `id` of `launch`, not started yet: listening on `port` (when it takes
    /// traffic), stopped when `stop` is cancelled.
    pub fn new(id: String, kind: ProcessKind, launch: &Launch, port: Option<u16>, stop: CancellationToken) -> Self {
        Self {
            id,
            service: launch.service.clone(),
            release: launch.release.clone(),
            port: AtomicU16::new(port.unwrap_or(0)),
            command: launch.display.clone(),
            image: launch.image.clone(),
            started: Utc::now(),
            pid: AtomicU32::new(0),
            health: watch::channel(Health::Starting).0,
            stopping: AtomicBool::new(false),
            restart: Notify::new(),
            stop,
            done: Mutex::new(None),
            kind,
            exit: watch::channel(None).0,
            launch: launch.clone(),
            network: Mutex::new(None),
        }
    }

    /// The app network it runs in, when not the host's.
    pub fn network(&self) -> Option<Arc<super::app_network::AppNetwork>> {
        self.network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Where the router and the health checks reach it: its port, in its network.
    pub fn backend(&self) -> Option<super::router::Backend> {
        let port = self.port()?;
        Some(super::router::Backend {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            network: self.network(),
        })
    }

    /// The host port it listens on, if it takes traffic.
    pub fn port(&self) -> Option<u16> {
        Some(self.port.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    /// Whether the router may send it traffic.
    pub fn is_ready(&self) -> bool {
        *self.health.borrow() == Health::Ready && !self.stopping.load(Ordering::SeqCst)
    }

    /// What `ps` shows.
    pub fn status(&self) -> ProcessStatus {
        match *self.exit.borrow() {
            Some(0) => return ProcessStatus::Complete,
            Some(_) => return ProcessStatus::Failed,
            None => {}
        }
        if self.stopping.load(Ordering::SeqCst) {
            return ProcessStatus::Stopping;
        }
        match *self.health.borrow() {
            Health::Starting => ProcessStatus::Starting,
            Health::Ready => ProcessStatus::Running,
            Health::Unhealthy => ProcessStatus::Unhealthy,
            Health::Failed(_) => ProcessStatus::Crashed,
        }
    }
}

/// How to start instances of one service of one release.
#[derive(Debug, Clone)]
pub struct Launch {
    pub service: String,
    pub release: String,
    pub build: String,
    pub what: Runnable,
    /// The command as `ps` shows it.
    pub display: String,
    /// The image, for `ps` (containers).
    pub image: String,
    pub env: crate::env::Env,
    pub has_port: bool,
    pub check: HealthCheck,
}

impl Launch {
    /// The launch of `name` of `release`: a container when the service names an `image` or its
    /// build made one (from its Dockerfile), else a process running `command` in the build's
    /// directory under `builds_dir`.
    ///
    /// # Errors
    /// When the service has nothing to run, needs podman where there is none, its environment
    /// lacks a required variable, or the build's directory is gone from this host.
    pub fn new(
        builds_dir: &std::path::Path,
        containers: bool,
        release: &ReleaseSpec,
        name: &str,
        service: &Service,
    ) -> Result<Self, RuntimeError> {
        Self::with_command(builds_dir, containers, release, name, service, None)
    }

    /// [`Launch::new`] running `command` instead of the service's own (a one-off process).
    ///
    /// # Errors
    /// As [`Launch::new`].
    pub fn with_command(
        builds_dir: &std::path::Path,
        containers: bool,
        release: &ReleaseSpec,
        name: &str,
        service: &Service,
        command: Option<Vec<String>>,
    ) -> Result<Self, RuntimeError> {
        let display = match (&command, &service.command) {
            (Some(argv), _) => shell_words::join(argv),
            (None, Some(own)) => own.display(),
            (None, None) => String::new(),
        };
        let argv = command
            .or_else(|| service.command.as_ref().map(ServiceCommand::argv))
            .filter(|argv| !argv.is_empty());
        let mut env = release.service_env(name, service)?;
        let data_dir = builds_dir.parent().unwrap_or(builds_dir);
        let forward = super::resources::link(data_dir, release, service, &mut env)?;
        let image = service.image.clone().or_else(|| release.images.get(name).cloned());
        let what = match image.clone() {
            Some(image) if !containers => {
                return Err(RuntimeError::Failed(format!(
                    "service {name} runs as a container ({image}), which needs podman: install it with \
                     `apt-get install -y podman buildah runc catatonit` (scripts/install-deps does)"
                )));
            }
            Some(_) if !forward.is_empty() && !nix::unistd::geteuid().is_root() => {
                return Err(RuntimeError::Failed(format!(
                    "service {name} runs as a container and links resources ({}), which it reaches through \
                     a forwarder inside its network namespace: that needs rack to run as root (run rack as \
                     root, or run the service as a process: a `command` and no Dockerfile or image)",
                    service.resources.join(", ")
                )));
            }
            Some(image) => Runnable::Container {
                image,
                command: argv,
                port: service.port,
                cpu: service.scale.cpu,
                memory: service.scale.memory,
                forward,
            },
            None => {
                let Some(argv) = argv else {
                    return Err(RuntimeError::Failed(format!(
                        "service {name} has nothing to run: give it a `command` (run in the build directory), \
                         a Dockerfile (built into an image), or an `image`"
                    )));
                };
                let workspace = builds_dir.join(&release.app).join(&release.build_id);
                let dir = workspace.join("src");
                if !dir.is_dir() {
                    return Err(RuntimeError::Failed(format!(
                        "the build directory of {} is missing on this host",
                        release.build_id
                    )));
                }
                Runnable::Process {
                    workspace,
                    dir,
                    argv,
                    limits: super::cgroups::Limits {
                        memory: service.scale.memory,
                        cpu: service.scale.cpu,
                    },
                    forward,
                }
            }
        };
        Ok(Self {
            service: name.to_owned(),
            release: release.id.to_string(),
            build: release.build_id.to_string(),
            what,
            display,
            image: image.unwrap_or_default(),
            env,
            has_port: service.port.is_some(),
            check: HealthCheck::of(service),
        })
    }

    /// Whether its instances are containers.
    pub fn is_container(&self) -> bool {
        matches!(self.what, Runnable::Container { .. })
    }

    /// What the driver starts for `instance` of `app`: the release's environment plus rack's
    /// variables, and nothing of rack's own.
    pub fn start(&self, app: &str, instance: &Instance, log: LogSink) -> Start {
        let mut env = self.env.clone();
        for (key, value) in [
            ("APP", app),
            ("SERVICE", &self.service),
            ("RELEASE", &self.release),
            ("BUILD", &self.build),
            ("PROCESS", &instance.id),
        ] {
            env.insert(key.to_owned(), value.to_owned());
        }
        Start {
            id: instance.id.clone(),
            app: app.to_owned(),
            service: self.service.clone(),
            release: self.release.clone(),
            build: self.build.clone(),
            env,
            port: instance.port(),
            log,
            what: self.what.clone(),
            kept: instance.kind == ProcessKind::Service,
        }
    }
}

/// What an instance's task is told when its routes must change.
pub type RouteRefresh = Arc<dyn Fn() + Send + Sync>;

/// What an instance's task works with.
pub struct Supervised {
    pub driver: Arc<dyn Driver>,
    pub app: String,
    pub instance: Arc<Instance>,
    pub launch: Launch,
    pub log: LogSink,
    pub refresh_routes: RouteRefresh,
    pub health_client: reqwest::Client,
    /// An instance that already runs (a container adopted after a restart): watched first,
    /// started anew only if it exits.
    pub adopted: Option<Box<dyn Running>>,
    /// Whether it is started again when it exits (an adopted instance of a release that is no
    /// longer wanted is not: it only serves until the rollout retires it).
    pub restarts: bool,
    /// rack is stopping: instances are let go, not stopped.
    pub shutdown: CancellationToken,
}

/// Runs one instance until it is stopped: start, watch health, restart after a crash.
pub async fn supervise(job: Supervised) {
    let Supervised {
        driver,
        app,
        instance,
        launch,
        log,
        refresh_routes,
        health_client,
        mut adopted,
        restarts,
        shutdown,
    } = job;
    let system = crate::stream_names::system("local", &instance.id);
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    loop {
        // Each start after the first gets a fresh host port: podman can leave the port
        // forwarding of a removed container behind for a while, which would send the new
        // container's traffic to the old one's address. The router and the health checks
        // follow the instance's port.
        if !std::mem::take(&mut first)
            && instance.port().is_some()
            && let Some(port) = super::supervisor::free_port()
        {
            instance.port.store(port, Ordering::SeqCst);
        }
        let started = match adopted.take() {
            Some(running) => Ok(running),
            None => driver.start(launch.start(&app, &instance, log.clone())).await,
        };
        let mut running = match started {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!(app.name = %app, process = %instance.id, "could not start {}: {e}", instance.id);
                instance
                    .health
                    .send_replace(Health::Failed(format!("could not start: {e}")));
                if !restarts || instance.stop.is_cancelled() {
                    return;
                }
                // A service's instance keeps trying, backing off, as after a crash: a rollout
                // watching it sees the failure (and stops it); one that served before comes back
                // once the cause (a busy engine, a port) is gone.
                log.line(
                    &system,
                    format!(
                        "Process {} could not start ({e}); trying again in {}s",
                        instance.id,
                        backoff.as_secs()
                    ),
                )
                .await;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = instance.stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        instance.pid.store(running.pid(), Ordering::SeqCst);
        *instance
            .network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = running.network();
        instance.health.send_replace(Health::Starting);
        let since = tokio::time::Instant::now();
        let checks = health_loop(&health_client, &instance, &launch.check, &log, &refresh_routes);
        enum Ended {
            Exited(Exit),
            Unhealthy,
            Restart,
            Stop,
        }
        let ended = tokio::select! {
            status = running.wait() => Ended::Exited(status),
            () = checks => Ended::Unhealthy,
            () = instance.restart.notified() => Ended::Restart,
            () = instance.stop.cancelled() => Ended::Stop,
        };
        let (status, wait) = match ended {
            Ended::Stop if shutdown.is_cancelled() && !instance.stopping.load(Ordering::SeqCst) => {
                running.detach().await;
                return;
            }
            Ended::Stop => {
                running.stop(STOP_GRACE).await;
                return;
            }
            Ended::Restart => {
                running.stop(STOP_GRACE).await;
                (Exit::Restarted, Duration::ZERO)
            }
            Ended::Unhealthy => {
                // Unhealthy for too long: kill it, the crash path restarts it.
                running.kill();
                (running.wait().await, backoff)
            }
            Ended::Exited(status) => (status, backoff),
        };
        if instance.stop.is_cancelled() || instance.stopping.load(Ordering::SeqCst) {
            return;
        }
        if !restarts {
            instance
                .health
                .send_replace(Health::Failed(format!("the process exited ({status})")));
            refresh_routes();
            return;
        }
        let was_ready = *instance.health.borrow() == Health::Ready;
        instance
            .health
            .send_replace(Health::Failed(format!("the process exited ({status})")));
        instance.pid.store(0, Ordering::SeqCst);
        refresh_routes();
        if since.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let verb = if was_ready { "crashed" } else { "exited" };
        let message = if wait.is_zero() {
            format!("Process {} {status}; starting it again", instance.id)
        } else {
            format!(
                "Process {} {verb} ({status}); restarting in {}s",
                instance.id,
                wait.as_secs()
            )
        };
        let event = crate::runtime::ProcessEvent {
            app: &app,
            service: &instance.service,
            process: &instance.id,
            pid: 0,
            exit: Some(status.code()),
        };
        log.process(&system, message, event).await;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = instance.stop.cancelled() => return,
        }
        if !wait.is_zero() {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Runs a one-off process once: it is never restarted, and is stopped once it has run for
/// `timeout` or when asked; its exit code is recorded for `ps` and whoever waits for it.
pub async fn run_once(job: Supervised, timeout: Duration) {
    let Supervised {
        driver,
        app,
        instance,
        launch,
        log,
        ..
    } = job;
    let system = crate::stream_names::system("local", &instance.id);
    let mut running = match driver.start(launch.start(&app, &instance, log.clone())).await {
        Ok(running) => running,
        Err(e) => {
            log.line(&system, format!("Process {} could not start: {e}", instance.id))
                .await;
            instance.exit.send_replace(Some(127));
            return;
        }
    };
    instance.pid.store(running.pid(), Ordering::SeqCst);
    *instance
        .network
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = running.network();
    instance.health.send_replace(Health::Ready);
    let event = crate::runtime::ProcessEvent {
        app: &app,
        service: &instance.service,
        process: &instance.id,
        pid: running.pid(),
        exit: None,
    };
    log.process(
        &system,
        format!("Started process {} (pid {})", instance.id, running.pid()),
        event,
    )
    .await;
    let code = tokio::select! {
        status = running.wait() => status.code(),
        () = tokio::time::sleep(timeout) => {
            log.line(&system, format!("Process {} ran past its {}s timeout; stopping it", instance.id, timeout.as_secs())).await;
            running.stop(STOP_GRACE).await;
            124
        }
        () = instance.stop.cancelled() => {
            running.stop(STOP_GRACE).await;
            143
        }
    };
    instance.pid.store(0, Ordering::SeqCst);
    let event = crate::runtime::ProcessEvent {
        app: &app,
        service: &instance.service,
        process: &instance.id,
        pid: 0,
        exit: Some(code),
    };
    log.process(
        &system,
        format!("Process {} exited with code {code}", instance.id),
        event,
    )
    .await;
    instance.exit.send_replace(Some(code));
}
