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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::driver::{Driver, Start};
use super::health::{HealthCheck, health_loop};
use crate::manifest::{Command as ServiceCommand, Service};
use crate::runtime::{LogSink, ProcessStatus, ReleaseSpec, RuntimeError};

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
    pub port: Option<u16>,
    pub command: String,
    pub started: DateTime<Utc>,
    pub pid: AtomicU32,
    pub health: watch::Sender<Health>,
    /// Set when rack is stopping it on purpose (not a crash).
    pub stopping: AtomicBool,
    /// A restart was asked for (`ps stop`, `restart`).
    pub restart: Notify,
    pub stop: CancellationToken,
    pub done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Instance {
    /// Whether the router may send it traffic.
    pub fn is_ready(&self) -> bool {
        *self.health.borrow() == Health::Ready && !self.stopping.load(Ordering::SeqCst)
    }

    /// What `ps` shows.
    pub fn status(&self) -> ProcessStatus {
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
    pub workspace: PathBuf,
    pub dir: PathBuf,
    pub argv: Vec<String>,
    /// The command as `ps` shows it.
    pub display: String,
    pub env: crate::env::Env,
    pub has_port: bool,
    pub check: HealthCheck,
}

impl Launch {
    /// The launch of `name` of `release`, whose build lives under `builds_dir`.
    ///
    /// # Errors
    /// When the service has no command, its environment lacks a required variable, or the
    /// build's directory is gone from this host.
    pub fn new(
        builds_dir: &std::path::Path,
        release: &ReleaseSpec,
        name: &str,
        service: &Service,
    ) -> Result<Self, RuntimeError> {
        let argv = match &service.command {
            Some(ServiceCommand::Shell(text)) => vec!["/bin/sh".to_owned(), "-c".to_owned(), text.clone()],
            Some(ServiceCommand::Exec(argv)) if !argv.is_empty() => argv.clone(),
            _ => {
                return Err(RuntimeError::Failed(format!(
                    "service {name} has no command: the local runtime runs `command` in the build directory"
                )));
            }
        };
        let display = match &service.command {
            Some(ServiceCommand::Shell(text)) => text.clone(),
            Some(ServiceCommand::Exec(argv)) => argv.join(" "),
            None => String::new(),
        };
        let env = release.service_env(name, service)?;
        let workspace = builds_dir.join(&release.app).join(&release.build_id);
        let dir = workspace.join("src");
        if !dir.is_dir() {
            return Err(RuntimeError::Failed(format!(
                "the build directory of {} is missing on this host",
                release.build_id
            )));
        }
        Ok(Self {
            service: name.to_owned(),
            release: release.id.to_string(),
            build: release.build_id.to_string(),
            workspace,
            dir,
            argv,
            display,
            env,
            has_port: service.port.is_some(),
            check: HealthCheck::of(service),
        })
    }

    /// What the driver starts for `instance` of `app`: the release's environment plus rack's
    /// variables, and nothing of rack's own.
    fn start(&self, app: &str, instance: &Instance, log: LogSink) -> Start {
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
        if let Some(port) = instance.port {
            env.insert("PORT".to_owned(), port.to_string());
        }
        Start {
            id: instance.id.clone(),
            app: app.to_owned(),
            service: self.service.clone(),
            release: self.release.clone(),
            build: self.build.clone(),
            workspace: self.workspace.clone(),
            dir: self.dir.clone(),
            argv: self.argv.clone(),
            env,
            log,
        }
    }
}

/// What an instance's task is told when its routes must change.
pub type RouteRefresh = Arc<dyn Fn() + Send + Sync>;

/// Runs one instance until it is stopped: start, watch health, restart after a crash.
pub async fn supervise(
    driver: Arc<dyn Driver>,
    app: String,
    instance: Arc<Instance>,
    launch: Launch,
    log: LogSink,
    refresh_routes: RouteRefresh,
    health_client: reqwest::Client,
) {
    let system = format!("system/local/{}", instance.id);
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut running = match driver.start(launch.start(&app, &instance, log.clone())).await {
            Ok(running) => running,
            Err(e) => {
                instance
                    .health
                    .send_replace(Health::Failed(format!("could not start: {e}")));
                return;
            }
        };
        instance.pid.store(running.pid(), Ordering::SeqCst);
        instance.health.send_replace(Health::Starting);
        let since = tokio::time::Instant::now();
        let checks = health_loop(&health_client, &instance, &launch.check, &log, &refresh_routes);
        enum Ended {
            Exited(String),
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
            Ended::Stop => {
                running.stop(STOP_GRACE).await;
                return;
            }
            Ended::Restart => {
                running.stop(STOP_GRACE).await;
                ("restarted on request".to_owned(), Duration::ZERO)
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
        log.line(&system, message).await;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = instance.stop.cancelled() => return,
        }
        if !wait.is_zero() {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}
