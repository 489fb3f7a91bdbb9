//! The local runtime's process supervisor: runs each instance of a release's services as a
//! child process (tied to rack's life by a watchdog), health-checks it, restarts it when it
//! crashes (with backoff), keeps each service's router pointed at its healthy instances, and
//! rolls releases out within the manifest's surge and unavailability budget.
//!
//! ```text
//! apply(R) ─► per service: start new ─► wait healthy ─► route to it ─► unroute + stop an old ─► …
//!              instance task: spawn ─► pipe output ─► health loop ─► exit? ─► backoff ─► spawn
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::process::{pipe_streams, spawn_group};
use super::router::Router;
use super::sandbox::{Sandbox, Tie};
use super::{ApplyError, LogSink, ProcessInfo, ReleaseSpec};
use crate::manifest::{Command as ServiceCommand, Service};

/// Consecutive failed checks that make an instance unhealthy.
const FAILURE_THRESHOLD: u32 = 3;

/// How long an instance gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs an app's command so that it dies with rack: when rack's end of the stdin pipe closes
/// (rack stopped or was killed), the watcher stops the command. The script stays until the
/// command has exited, forwarding SIGTERM: it is the first process of the sandbox's pid
/// namespace, whose end would kill the app before its graceful shutdown finished.
const WATCHDOG: &str = r#"
exec 3<&0
"$@" 3<&- </dev/null &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT HUP
(cat >/dev/null; kill -TERM $$ 2>/dev/null) <&3 &
while :; do
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || exit "$status"
done
"#;

/// Where an instance is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Starting,
    Ready,
    Unhealthy,
    /// It exited or never passed a check before becoming ready.
    Failed(String),
}

/// One instance of a service of a release.
#[derive(Debug)]
struct Instance {
    id: String,
    service: String,
    release: String,
    port: Option<u16>,
    command: String,
    started: DateTime<Utc>,
    pid: AtomicU32,
    health: watch::Sender<Health>,
    /// Set when rack is stopping it on purpose (not a crash).
    stopping: AtomicBool,
    /// Set by a restart request: the next exit restarts at once.
    restart_now: AtomicBool,
    stop: CancellationToken,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Instance {
    fn is_ready(&self) -> bool {
        *self.health.borrow() == Health::Ready && !self.stopping.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Default)]
struct AppProcesses {
    instances: Vec<Arc<Instance>>,
    routers: HashMap<String, Router>,
}

/// What every instance task needs.
#[derive(Debug)]
pub struct Inner {
    apps: Mutex<HashMap<String, AppProcesses>>,
    builds_dir: PathBuf,
    sandbox: Sandbox,
    pool: sqlx::PgPool,
    app_log: AppLogFactory,
    health_client: reqwest::Client,
    shutdown: CancellationToken,
}

/// The supervisor (cheap to clone).
#[derive(Debug, Clone)]
pub struct Supervisor(Arc<Inner>);

/// Makes the sink an app's process output and supervisor events go to.
pub struct AppLogFactory(pub Box<dyn Fn(&str) -> LogSink + Send + Sync>);

impl std::fmt::Debug for AppLogFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppLogFactory")
    }
}

impl Supervisor {
    /// A supervisor running builds' sources from `builds_dir`.
    pub fn new(
        builds_dir: PathBuf,
        sandbox: Sandbox,
        pool: sqlx::PgPool,
        app_log: AppLogFactory,
        shutdown: CancellationToken,
    ) -> Self {
        let health_client = reqwest::Client::builder().build().unwrap_or_default();
        Self(Arc::new(Inner {
            apps: Mutex::default(),
            builds_dir,
            sandbox,
            pool,
            app_log,
            health_client,
            shutdown,
        }))
    }

    fn with_app<T>(&self, app: &str, f: impl FnOnce(&mut AppProcesses) -> T) -> T {
        let mut apps = self.0.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(apps.entry(app.to_owned()).or_default())
    }

    /// The app's processes.
    pub fn processes(&self, app: &str) -> Vec<ProcessInfo> {
        self.with_app(app, |procs| {
            procs
                .instances
                .iter()
                .map(|i| ProcessInfo {
                    id: i.id.clone(),
                    app: app.to_owned(),
                    command: i.command.clone(),
                    cpu: 0.0,
                    memory: 0.0,
                    host: "127.0.0.1".to_owned(),
                    image: String::new(),
                    instance: "local".to_owned(),
                    name: i.service.clone(),
                    ports: i.port.map(|p| vec![p.to_string()]).unwrap_or_default(),
                    release: i.release.clone(),
                    started: i.started,
                    status: if i.stopping.load(Ordering::SeqCst) {
                        "stopping"
                    } else {
                        match *i.health.borrow() {
                            Health::Starting => "starting",
                            Health::Ready => "running",
                            Health::Unhealthy => "unhealthy",
                            Health::Failed(_) => "crashed",
                        }
                    },
                    pid: i.pid.load(Ordering::SeqCst),
                })
                .collect()
        })
    }

    /// The address of the app's first router.
    pub fn router_addr(&self, app: &str) -> Option<SocketAddr> {
        self.with_app(app, |procs| {
            let mut routers: Vec<(&String, &Router)> = procs.routers.iter().collect();
            routers.sort_by_key(|(service, _)| *service);
            routers.first().map(|(_, r)| r.local_addr())
        })
    }

    /// Kills one process so that it restarts. False if there is no such process.
    pub fn restart_process(&self, app: &str, id: &str) -> bool {
        let instance = self.with_app(app, |procs| procs.instances.iter().find(|i| i.id == id).cloned());
        let Some(instance) = instance else { return false };
        instance.restart_now.store(true, Ordering::SeqCst);
        signal_group(&instance, nix::sys::signal::Signal::SIGTERM);
        true
    }

    /// Rolls `release` out (or stops everything for `None`).
    pub async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), ApplyError> {
        let Some(release) = release else {
            let all = self.with_app(app, |procs| procs.instances.clone());
            for instance in all {
                self.stop_instance(app, &instance, log).await;
            }
            self.with_app(app, |procs| {
                for router in procs.routers.values() {
                    router.stop();
                }
                procs.routers.clear();
            });
            return Ok(());
        };
        for (name, service) in &release.manifest.services {
            self.roll_service(release, name, service, log).await?;
        }
        // Services the release no longer has.
        let gone = self.with_app(app, |procs| {
            procs
                .instances
                .iter()
                .filter(|i| !release.manifest.services.contains_key(&i.service))
                .cloned()
                .collect::<Vec<_>>()
        });
        for instance in gone {
            self.stop_instance(app, &instance, log).await;
        }
        self.with_app(app, |procs| {
            procs.routers.retain(|service, router| {
                let keep = release.manifest.services.get(service).is_some_and(|s| s.port.is_some());
                if !keep {
                    router.stop();
                }
                keep
            });
        });
        Ok(())
    }

    /// Stops everything of an app and forgets it.
    pub async fn delete_app(&self, app: &str) {
        let (quiet, _) = LogSink::new();
        let _ = self.apply(app, None, &quiet).await;
        self.0
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(app);
    }

    async fn roll_service(
        &self,
        release: &ReleaseSpec,
        name: &str,
        service: &Service,
        log: &LogSink,
    ) -> Result<(), ApplyError> {
        let app = release.app.as_str();
        let stream = format!("system/local/{name}");
        let desired = service.scale.count_min as usize;
        let (surge, unavailable) = budget(desired, service.deployment.minimum, service.deployment.maximum);
        if let Some(port) = service.port {
            self.ensure_router(app, name, port).await?;
        }
        let launch = Launch::new(&self.0.builds_dir, release, name, service)?;
        loop {
            let (new, old) = self.split(app, name, &release.id);
            let new_ready = new.iter().filter(|i| i.is_ready()).count();
            if new_ready >= desired {
                break;
            }
            // Start a new instance while the surge allows it, or when there is nothing old left
            // to stop; stop an old one while availability stays above the minimum; otherwise
            // exceed the surge rather than drop below the minimum.
            let within_surge = old.len() + new.len() < desired + surge;
            let can_lose_one = old.len() + new_ready > desired.saturating_sub(unavailable);
            if within_surge || old.is_empty() || !can_lose_one {
                log.line(
                    &stream,
                    format!("Scaled up {name} release {} to {}", release.id, new.len() + 1),
                )
                .await;
                let instance = self.start_instance(app, &launch, log).await;
                self.wait_ready(&instance, service, log).await?;
                self.refresh_routes(app, name);
                // Keep capacity at `desired`: one new ready instance lets one old go.
                let (new, old) = self.split(app, name, &release.id);
                let ready = new.iter().filter(|i| i.is_ready()).count();
                if ready + old.len() > desired {
                    self.scale_down_oldest(app, name, &old, log).await;
                }
            } else {
                self.scale_down_oldest(app, name, &old, log).await;
            }
        }
        let (new, old) = self.split(app, name, &release.id);
        for instance in &old {
            self.stop_instance(app, instance, log).await;
        }
        // More new instances than wanted (a resumed rollout, a lower scale): the newest go.
        for extra in new.iter().skip(desired) {
            self.stop_instance(app, extra, log).await;
        }
        if !old.is_empty() {
            log.line(&stream, format!("Scaled down {name} to 0 of the previous release"))
                .await;
        }
        self.refresh_routes(app, name);
        Ok(())
    }

    /// Stops the oldest of `old` (instances of earlier releases of `service`).
    async fn scale_down_oldest(&self, app: &str, service: &str, old: &[Arc<Instance>], log: &LogSink) {
        let Some(oldest) = old.first() else { return };
        self.stop_instance(app, oldest, log).await;
        let message = format!("Scaled down {service} release {} to {}", oldest.release, old.len() - 1);
        log.line(&format!("system/local/{service}"), message).await;
    }

    /// The service's instances of `release` and of other releases, oldest first, skipping
    /// those being stopped.
    fn split(&self, app: &str, service: &str, release: &str) -> (Vec<Arc<Instance>>, Vec<Arc<Instance>>) {
        self.with_app(app, |procs| {
            procs
                .instances
                .iter()
                .filter(|i| i.service == service && !i.stopping.load(Ordering::SeqCst))
                .cloned()
                .partition(|i| i.release == release)
        })
    }

    async fn ensure_router(&self, app: &str, service: &str, container_port: u16) -> Result<(), ApplyError> {
        if self.with_app(app, |procs| procs.routers.contains_key(service)) {
            return Ok(());
        }
        let stored = crate::store::routers::get(&self.0.pool, app, service)
            .await
            .map_err(|e| ApplyError(format!("reading the router port of {service}: {e}")))?;
        let preferred = stored.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
        let router = match Router::start(app.to_owned(), preferred, self.0.shutdown.clone()).await {
            Ok(router) => router,
            // The old port is taken by something else now: take any.
            Err(_) if preferred != 0 => Router::start(app.to_owned(), 0, self.0.shutdown.clone())
                .await
                .map_err(|e| ApplyError(format!("starting the router of {service}: {e}")))?,
            Err(e) => return Err(ApplyError(format!("starting the router of {service}: {e}"))),
        };
        let port = router.local_addr().port();
        if stored != Some(i32::from(port)) {
            crate::store::routers::set(&self.0.pool, app, service, i32::from(port))
                .await
                .map_err(|e| ApplyError(format!("recording the router port of {service}: {e}")))?;
        }
        tracing::info!(
            app.name = app,
            service,
            port,
            container_port,
            "router of {app}/{service} on port {port}"
        );
        self.with_app(app, |procs| procs.routers.insert(service.to_owned(), router));
        Ok(())
    }

    fn refresh_routes(&self, app: &str, service: &str) {
        self.with_app(app, |procs| {
            if let Some(router) = procs.routers.get(service) {
                let backends = procs
                    .instances
                    .iter()
                    .filter(|i| i.service == service && i.is_ready())
                    .filter_map(|i| i.port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
                    .collect();
                router.set_backends(backends);
            }
        });
    }

    async fn start_instance(&self, app: &str, launch: &Launch, log: &LogSink) -> Arc<Instance> {
        let port = launch.has_port.then(free_port).flatten();
        let id = format!(
            "{}-{}-{}",
            launch.service,
            launch
                .release
                .to_lowercase()
                .chars()
                .skip(1)
                .take(6)
                .collect::<String>(),
            crate::ids::random_token(5).to_lowercase()
        );
        let (health, _) = watch::channel(Health::Starting);
        let instance = Arc::new(Instance {
            id: id.clone(),
            service: launch.service.clone(),
            release: launch.release.clone(),
            port,
            command: launch.display.clone(),
            started: Utc::now(),
            pid: AtomicU32::new(0),
            health,
            stopping: AtomicBool::new(false),
            restart_now: AtomicBool::new(false),
            stop: self.0.shutdown.child_token(),
            done: Mutex::new(None),
        });
        self.with_app(app, |procs| procs.instances.push(instance.clone()));
        let task = tokio::spawn(supervise(
            self.clone(),
            app.to_owned(),
            instance.clone(),
            launch.clone(),
        ));
        *instance.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        let stream = format!("system/local/{id}");
        let started = tokio::time::timeout(Duration::from_secs(5), async {
            let mut rx = instance.health.subscribe();
            while instance.pid.load(Ordering::SeqCst) == 0 && matches!(*rx.borrow(), Health::Starting) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        let _ = started;
        let pid = instance.pid.load(Ordering::SeqCst);
        let port_text = port.map_or(String::new(), |p| format!(", port {p}"));
        log.line(&stream, format!("Started process {id} (pid {pid}{port_text})"))
            .await;
        instance
    }

    async fn wait_ready(&self, instance: &Instance, service: &Service, log: &LogSink) -> Result<(), ApplyError> {
        let stream = format!("system/local/{}", instance.id);
        let mut rx = instance.health.subscribe();
        loop {
            let health = rx.borrow_and_update().clone();
            match health {
                Health::Ready => {
                    let what = if service.port.is_some() {
                        format!("Health check passed: GET {}", service.health.path)
                    } else {
                        "Process is up".to_owned()
                    };
                    log.line(&stream, what).await;
                    return Ok(());
                }
                Health::Failed(reason) => {
                    log.line(&stream, format!("Health check failed: {reason}")).await;
                    return Err(ApplyError(format!(
                        "process {} of {} failed: {reason}",
                        instance.id, instance.service
                    )));
                }
                Health::Starting | Health::Unhealthy => {}
            }
            if rx.changed().await.is_err() {
                return Err(ApplyError(format!("process {} stopped", instance.id)));
            }
        }
    }

    async fn stop_instance(&self, app: &str, instance: &Arc<Instance>, log: &LogSink) {
        instance.stopping.store(true, Ordering::SeqCst);
        self.refresh_routes(app, &instance.service);
        instance.stop.cancel();
        let task = instance
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(STOP_GRACE + Duration::from_secs(5), task).await;
        }
        self.with_app(app, |procs| procs.instances.retain(|i| !Arc::ptr_eq(i, instance)));
        log.line(
            &format!("system/local/{}", instance.id),
            format!("Stopped process {}", instance.id),
        )
        .await;
    }
}

/// How many instances may be added (surge) and missing (unavailable) during a rollout, from
/// the manifest's `deployment` percentages, as Kubernetes computes them (surge rounds up,
/// unavailability down). At least one of them is non-zero, or nothing could move.
fn budget(desired: usize, minimum: u32, maximum: u32) -> (usize, usize) {
    let desired_u = desired as u64;
    let surge = (desired_u * u64::from(maximum.saturating_sub(100))).div_ceil(100) as usize;
    let unavailable = (desired_u * u64::from(100u32.saturating_sub(minimum))) / 100;
    let unavailable = unavailable as usize;
    if surge == 0 && unavailable == 0 {
        (1, 0)
    } else {
        (surge, unavailable)
    }
}

/// A port that was free a moment ago.
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}

/// How to start instances of one service of one release.
#[derive(Debug, Clone)]
struct Launch {
    service: String,
    release: String,
    build: String,
    /// The build's directory: the only place of the host the process may write.
    workspace: PathBuf,
    dir: PathBuf,
    argv: Vec<String>,
    display: String,
    env: crate::env::Env,
    has_port: bool,
    health_path: String,
    grace: Duration,
    interval: Duration,
    timeout: Duration,
    health_disabled: bool,
}

impl Launch {
    fn new(
        builds_dir: &std::path::Path,
        release: &ReleaseSpec,
        name: &str,
        service: &Service,
    ) -> Result<Self, ApplyError> {
        let argv = match &service.command {
            Some(ServiceCommand::Shell(text)) => vec!["/bin/sh".to_owned(), "-c".to_owned(), text.clone()],
            Some(ServiceCommand::Exec(argv)) if !argv.is_empty() => argv.clone(),
            _ => {
                return Err(ApplyError(format!(
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
            return Err(ApplyError(format!(
                "the build directory of {} is missing on this host",
                release.build_id
            )));
        }
        Ok(Self {
            service: name.to_owned(),
            release: release.id.clone(),
            build: release.build_id.clone(),
            workspace,
            dir,
            argv,
            display,
            env,
            has_port: service.port.is_some(),
            health_path: service.health.path.clone(),
            grace: Duration::from_secs(u64::from(service.health.grace)),
            interval: Duration::from_secs(u64::from(service.health.interval.max(1))),
            timeout: Duration::from_secs(u64::from(service.health.timeout.max(1))),
            health_disabled: service.health.disabled,
        })
    }

    fn command(&self, sandbox: &Sandbox, app: &str, instance: &Instance) -> Command {
        let mut argv = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            WATCHDOG.to_owned(),
            "rack-process".to_owned(),
        ];
        argv.extend(self.argv.iter().cloned());
        let mut cmd = sandbox.command(&self.workspace, &self.dir, &argv, Tie::Watchdog);
        // Like a build, a process sees its release's env and nothing of rack's own.
        cmd.env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", &self.dir)
        .env("LANG", "C.UTF-8")
        .envs(&self.env)
        .env("APP", app)
        .env("SERVICE", &self.service)
        .env("RELEASE", &self.release)
        .env("BUILD", &self.build)
        .env("PROCESS", &instance.id);
        if let Some(port) = instance.port {
            cmd.env("PORT", port.to_string());
        }
        cmd
    }
}

/// Runs one instance until it is stopped: start, watch health, restart after a crash.
async fn supervise(supervisor: Supervisor, app: String, instance: Arc<Instance>, launch: Launch) {
    let sink = (supervisor.0.app_log.0)(&app);
    let system = format!("system/local/{}", instance.id);
    let output = format!("service/{}/{}", instance.service, instance.id);
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut command = launch.command(&supervisor.0.sandbox, &app, &instance);
        command.stdin(std::process::Stdio::piped());
        let spawned = spawn_group(command);
        let (mut child, group) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                instance
                    .health
                    .send_replace(Health::Failed(format!("could not start: {e}")));
                return;
            }
        };
        // Keep the watchdog's pipe open for as long as the process should live.
        let stdin = child.stdin.take();
        instance.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        instance.health.send_replace(Health::Starting);
        let since = tokio::time::Instant::now();
        let pipe = {
            let sink = sink.clone();
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let output = output.clone();
            tokio::spawn(async move { pipe_streams(stdout, stderr, &output, &sink).await })
        };
        let checks = health_loop(&supervisor, &app, &instance, &launch, &sink);
        let exit = tokio::select! {
            status = child.wait() => Some(status),
            () = checks => {
                // Unhealthy for too long: kill it, the crash path restarts it.
                signal_group(&instance, nix::sys::signal::Signal::SIGKILL);
                Some(child.wait().await)
            }
            () = instance.stop.cancelled() => None,
        };
        match exit {
            None => {
                terminate(&instance, &mut child).await;
                drop(group);
                drop(stdin);
                let _ = pipe.await;
                return;
            }
            Some(status) => {
                drop(group);
                drop(stdin);
                let _ = pipe.await;
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                if instance.stop.is_cancelled() || instance.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let was_ready = *instance.health.borrow() == Health::Ready;
                instance
                    .health
                    .send_replace(Health::Failed(format!("the process exited ({status})")));
                instance.pid.store(0, Ordering::SeqCst);
                supervisor.refresh_routes(&app, &instance.service);
                if since.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                let wait = if instance.restart_now.swap(false, Ordering::SeqCst) {
                    Duration::ZERO
                } else {
                    backoff
                };
                let verb = if was_ready { "crashed" } else { "exited" };
                sink.line(
                    &system,
                    format!(
                        "Process {} {verb} ({status}); restarting in {}s",
                        instance.id,
                        wait.as_secs()
                    ),
                )
                .await;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = instance.stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Checks the instance's health until it has failed `FAILURE_THRESHOLD` checks in a row after
/// having been ready (then returns, so it is restarted). Before it is first ready, failures
/// past the threshold mark it failed (the rollout gives up on it).
async fn health_loop(supervisor: &Supervisor, app: &str, instance: &Instance, launch: &Launch, sink: &LogSink) {
    tokio::time::sleep(launch.grace).await;
    let mut failures = 0;
    let mut ever_ready = false;
    // Failures count once per `interval`, however often we look: a slow starter gets
    // grace + threshold × interval, as Kubernetes would give it.
    let mut last_counted: Option<tokio::time::Instant> = None;
    loop {
        let result = if launch.has_port && !launch.health_disabled {
            check(
                &supervisor.0.health_client,
                instance.port,
                &launch.health_path,
                launch.timeout,
            )
            .await
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                failures = 0;
                last_counted = None;
                if *instance.health.borrow() != Health::Ready {
                    instance.health.send_replace(Health::Ready);
                    supervisor.refresh_routes(app, &instance.service);
                }
                ever_ready = true;
            }
            Err(reason) => {
                let now = tokio::time::Instant::now();
                if last_counted.is_none_or(|at| now.duration_since(at) >= launch.interval) {
                    failures += 1;
                    last_counted = Some(now);
                }
                if failures >= FAILURE_THRESHOLD {
                    if !ever_ready {
                        instance.health.send_replace(Health::Failed(reason));
                    } else {
                        instance.health.send_replace(Health::Unhealthy);
                        supervisor.refresh_routes(app, &instance.service);
                        sink.line(
                            &format!("system/local/{}", instance.id),
                            format!("Health check failed: {reason}"),
                        )
                        .await;
                        return;
                    }
                }
            }
        }
        // Until the first pass, look often so rollouts move fast; then every `interval`.
        let pause = if ever_ready {
            launch.interval
        } else {
            launch.interval.min(Duration::from_millis(250))
        };
        tokio::time::sleep(pause).await;
    }
}

async fn check(client: &reqwest::Client, port: Option<u16>, path: &str, timeout: Duration) -> Result<(), String> {
    let Some(port) = port else { return Ok(()) };
    let url = format!("http://127.0.0.1:{port}{path}");
    match client.get(&url).timeout(timeout).send().await {
        Ok(response) if response.status().is_success() || response.status().is_redirection() => Ok(()),
        Ok(response) => Err(format!("GET {path} answered {}", response.status())),
        Err(e) if e.is_timeout() => Err(format!("GET {path} timed out")),
        Err(_) => Err(format!("GET {path}: connection refused")),
    }
}

fn signal_group(instance: &Instance, signal: nix::sys::signal::Signal) {
    let pid = instance.pid.load(Ordering::SeqCst);
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// SIGTERM to the whole group, then SIGKILL if it is still there after the grace period.
async fn terminate(instance: &Instance, child: &mut tokio::process::Child) {
    signal_group(instance, nix::sys::signal::Signal::SIGTERM);
    let pid = instance.pid.load(Ordering::SeqCst);
    let group_alive = || {
        i32::try_from(pid)
            .is_ok_and(|pid| pid > 0 && nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok())
    };
    let _ = child.wait().await;
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    // The group outlives its leader while the app finishes its own shutdown.
    while group_alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(instance, nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_follow_kubernetes_rounding() {
        assert_eq!(budget(1, 50, 200), (1, 0));
        assert_eq!(budget(3, 50, 200), (3, 1));
        assert_eq!(budget(4, 75, 125), (1, 1));
        assert_eq!(budget(2, 100, 100), (1, 0));
        assert_eq!(budget(2, 50, 100), (0, 1));
    }
}
