//! The local runtime's supervisor: which instances and routers each app has on this host. It
//! starts and stops instances (each kept alive by its own task, see `instance`), keeps each
//! service's router pointed at its ready instances, and applies releases (see `rollout`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::driver::{Driver, Found};
use super::instance::{Health, Instance, Launch, RouteRefresh, STOP_GRACE, Supervised, run_once, supervise};
use super::router::Router;
use crate::runtime::{AppLogs, LogSink, PortBook, ProcessInfo, ProcessKind, ReleaseSpec, RuntimeError};

/// One-off processes (`run`, timers, the release phase) one app may have running at once on
/// this host: more are refused (429) rather than let one app fill the host with them.
pub const MAX_ONE_OFFS_PER_APP: usize = 32;

/// How long an ended one-off process stays in `ps`.
const ONE_OFF_RETENTION: Duration = Duration::from_secs(600);

/// An app's instances and routers on this host.
#[derive(Debug, Default)]
pub(super) struct AppProcesses {
    pub instances: Vec<Arc<Instance>>,
    pub routers: HashMap<String, Router>,
    /// What routers stopped by a release (or the app's stop) served and had not handed over
    /// yet: the next `drain_minutes` takes it, so their last seconds reach the history.
    pub retired: Vec<crate::runtime::TrafficMinute>,
    /// Whether the instances it had before this server started were looked for.
    pub adopted: bool,
    /// The tasks stopping instances a rollout retired (see `retire_instance`).
    pub retiring: Vec<tokio::task::JoinHandle<()>>,
}

/// What the supervisor works with.
#[derive(Debug)]
pub struct Inner {
    apps: Mutex<HashMap<String, AppProcesses>>,
    pub(super) builds_dir: PathBuf,
    processes: Arc<dyn Driver>,
    containers: Option<Arc<dyn Driver>>,
    pub(super) logs: Arc<dyn AppLogs>,
    ports: Arc<dyn PortBook>,
    health_client: reqwest::Client,
    shutdown: CancellationToken,
}

/// The supervisor (cheap to clone).
#[derive(Debug, Clone)]
pub struct Supervisor(pub(super) Arc<Inner>);

impl Supervisor {
    /// A supervisor running processes from builds in `builds_dir` (through `processes`) and
    /// containers (through `containers`, when podman is here), writing to `logs` and keeping
    /// router ports in `ports`.
    pub fn new(
        builds_dir: PathBuf,
        processes: Arc<dyn Driver>,
        containers: Option<Arc<dyn Driver>>,
        logs: Arc<dyn AppLogs>,
        ports: Arc<dyn PortBook>,
        shutdown: CancellationToken,
    ) -> Self {
        let health_client = reqwest::Client::builder().build().unwrap_or_default();
        Self(Arc::new(Inner {
            apps: Mutex::default(),
            builds_dir,
            processes,
            containers,
            logs,
            ports,
            health_client,
            shutdown,
        }))
    }

    /// Calls `f` with each app's processes on this host.
    pub(super) fn for_each_app(&self, mut f: impl FnMut(&str, &mut AppProcesses)) {
        let mut apps = self.0.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (app, procs) in apps.iter_mut() {
            f(app, procs);
        }
    }

    pub(super) fn with_app<T>(&self, app: &str, f: impl FnOnce(&mut AppProcesses) -> T) -> T {
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
                    image: i.image.clone(),
                    instance: "local".to_owned(),
                    name: i.service.clone(),
                    ports: i.port().map(|p| vec![p.to_string()]).unwrap_or_default(),
                    release: i.release.clone(),
                    started: i.started,
                    status: i.status(),
                    pid: i.pid.load(Ordering::SeqCst),
                    kind: i.kind,
                })
                .collect()
        })
    }

    /// The router of `app`'s `service`, if it has one.
    pub fn router(&self, app: &str, service: &str) -> Option<Router> {
        self.with_app(app, |procs| procs.routers.get(service).cloned())
    }

    /// The address of the app's first router.
    pub fn router_addr(&self, app: &str) -> Option<SocketAddr> {
        self.with_app(app, |procs| {
            let mut routers: Vec<(&String, &Router)> = procs.routers.iter().collect();
            routers.sort_by_key(|(service, _)| *service);
            routers.first().map(|(_, r)| r.local_addr())
        })
    }

    /// Restarts one instance, or stops and forgets a one-off process. False if there is no
    /// such process.
    pub async fn restart_process(&self, app: &str, id: &str) -> bool {
        let Some(instance) = self.instance(app, id) else {
            return false;
        };
        match instance.kind {
            ProcessKind::Service => instance.restart.notify_one(),
            ProcessKind::Run => {
                let (quiet, _) = LogSink::new();
                self.stop_instance(app, &instance, &quiet).await;
            }
        }
        true
    }

    fn instance(&self, app: &str, id: &str) -> Option<Arc<Instance>> {
        self.with_app(app, |procs| procs.instances.iter().find(|i| i.id == id).cloned())
    }

    /// Starts a one-off process of `launch`, writing its output to `log`.
    ///
    /// # Errors
    /// When `app` already has [`MAX_ONE_OFFS_PER_APP`] one-offs running (the number).
    pub fn run(&self, app: &str, launch: Launch, log: LogSink, timeout: Duration) -> Result<Arc<Instance>, usize> {
        let id = format!("{}-run-{}", launch.service, crate::ids::random_token(8).to_lowercase());
        let stop = self.0.shutdown.child_token();
        let instance = Arc::new(Instance::new(id, ProcessKind::Run, &launch, None, stop));
        // Counted and added under one lock: concurrent requests cannot pass the cap together.
        self.with_app(app, |procs| {
            let running = procs
                .instances
                .iter()
                .filter(|i| matches!(i.kind, ProcessKind::Run) && i.exit.borrow().is_none())
                .count();
            if running >= MAX_ONE_OFFS_PER_APP {
                return Err(running);
            }
            procs.instances.push(instance.clone());
            Ok(())
        })?;
        let mut job = self.supervised(app, &instance, launch, None, false);
        job.log = log;
        let (supervisor, app, ended) = (self.clone(), app.to_owned(), instance.clone());
        let task = tokio::spawn(async move {
            run_once(job, timeout).await;
            // An ended one-off stays in `ps` for a while, then goes (DELETE removes it sooner).
            tokio::select! {
                () = tokio::time::sleep(ONE_OFF_RETENTION) => {}
                () = ended.stop.cancelled() => {}
            }
            supervisor.with_app(&app, |procs| procs.instances.retain(|i| !Arc::ptr_eq(i, &ended)));
        });
        *instance.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        Ok(instance)
    }

    /// Waits until the one-off process `id` of `app` has ended; its exit code (`None`: there
    /// is no such process).
    pub async fn wait_process(&self, app: &str, id: &str) -> Option<i32> {
        let instance = self.instance(app, id)?;
        let mut exit = instance.exit.subscribe();
        loop {
            if let Some(code) = *exit.borrow_and_update() {
                return Some(code);
            }
            if exit.changed().await.is_err() {
                return Some(1);
            }
        }
    }

    /// Runs `request` inside the running process `id` of `app`.
    pub async fn exec(
        &self,
        app: &str,
        id: &str,
        request: &crate::runtime::ExecRequest,
    ) -> Result<crate::runtime::ExecSession, RuntimeError> {
        let instance = self
            .instance(app, id)
            .filter(|i| i.exit.borrow().is_none() && !i.stopping.load(Ordering::SeqCst))
            .ok_or_else(|| RuntimeError::Failed(format!("process {id} is not running")))?;
        let driver = self.driver_for(&instance.launch);
        let (quiet, _) = LogSink::new();
        let start = instance.launch.start(app, &instance, quiet);
        driver
            .exec(&start, request)
            .await
            .map_err(RuntimeError::io(format!("running a command in process {id}")))
    }

    fn driver_for(&self, launch: &Launch) -> Arc<dyn Driver> {
        match (launch.is_container(), &self.0.containers) {
            (true, Some(containers)) => containers.clone(),
            _ => self.0.processes.clone(),
        }
    }

    /// Rolls `release` out (or stops everything for `None`).
    pub async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError> {
        self.adopt(app, release, log).await;
        let Some(release) = release else {
            let all = self.with_app(app, |procs| procs.instances.clone());
            for instance in all {
                self.stop_instance(app, &instance, log).await;
            }
            self.with_app(app, |procs| {
                for (service, router) in procs.routers.drain() {
                    router.stop();
                    procs.retired.extend(router.drain_last(&service, chrono::Utc::now()));
                }
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
            let AppProcesses { routers, retired, .. } = procs;
            routers.retain(|service, router| {
                let keep = release.manifest.services.get(service).is_some_and(|s| s.port.is_some());
                if !keep {
                    router.stop();
                    retired.extend(router.drain_last(service, chrono::Utc::now()));
                }
                keep
            });
        });
        Ok(())
    }

    /// Waits (a bounded time) until every instance's task has ended, once rack's shutdown
    /// has told them to let go: kept instances have then stored their output up to their
    /// cursor, which the next start goes on from.
    pub async fn let_go(&self) {
        let tasks: Vec<_> = {
            let mut apps = self.0.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            apps.values_mut()
                .flat_map(|procs| {
                    let retiring = std::mem::take(&mut procs.retiring);
                    procs
                        .instances
                        .iter()
                        .filter_map(|i| i.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take())
                        .chain(retiring)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(Duration::from_secs(15), all).await.is_err() {
            tracing::warn!("some instances were still letting go when rack stopped");
        }
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

    /// Whether containers can run here.
    pub(super) fn has_containers(&self) -> bool {
        self.0.containers.is_some()
    }

    /// On the first apply of `app` since this server started, takes over the instances it left
    /// running (containers, and processes under their keepers): those of `release`'s services
    /// become its instances (the rollout then counts them, health-checks them and routes to
    /// them, instead of starting new ones), those of other releases serve until the rollout
    /// retires them, and ended ones are removed.
    async fn adopt(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) {
        if self.with_app(app, |procs| std::mem::replace(&mut procs.adopted, true)) {
            return;
        }
        let drivers = [
            Some((false, self.0.processes.clone())),
            self.0.containers.clone().map(|c| (true, c)),
        ];
        for (containers, driver) in drivers.into_iter().flatten() {
            self.adopt_from(app, release, log, containers, &driver).await;
        }
    }

    /// [`Supervisor::adopt`] of what `driver` (of containers or not) left running.
    async fn adopt_from(
        &self,
        app: &str,
        release: Option<&ReleaseSpec>,
        log: &LogSink,
        containers: bool,
        driver: &Arc<dyn Driver>,
    ) {
        let found = match driver.survivors(app).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(app.name = app, "looking for the instances of {app}: {e}");
                return;
            }
        };
        let kind = if containers { "container" } else { "process" };
        for mut found in found {
            let service = release.and_then(|r| r.manifest.services.get(&found.service).map(|s| (r, s)));
            let launch = service.and_then(|(release, service)| {
                Launch::new(
                    &self.0.builds_dir,
                    self.has_containers(),
                    release,
                    &found.service,
                    service,
                )
                .ok()
            });
            let launch = launch.filter(|launch| launch.is_container() == containers);
            let (Some(launch), true) = (launch, found.running) else {
                // Ended, or of a service that no longer exists (or runs otherwise now).
                driver.discard(&found, STOP_GRACE).await;
                continue;
            };
            found.copied_until = self.0.logs.copied_until(app, &found.process).await;
            let running = driver.attach(&found, self.0.logs.sink(app)).await;
            let restarts = found.release == release.map(|r| r.id.as_str()).unwrap_or_default();
            self.register(app, &launch, &found, running, restarts);
            log.line(
                &crate::stream_names::system("local", &found.process),
                format!("Adopted {kind} {} of release {}", found.process, found.release),
            )
            .await;
        }
    }

    /// Registers an adopted instance and starts watching it.
    fn register(
        &self,
        app: &str,
        launch: &Launch,
        found: &Found,
        running: Box<dyn super::driver::Running>,
        restarts: bool,
    ) {
        let (health, _) = watch::channel(Health::Starting);
        let instance = Arc::new(Instance {
            id: found.process.clone(),
            service: found.service.clone(),
            release: found.release.clone(),
            port: AtomicU16::new(found.port.unwrap_or(0)),
            command: launch.display.clone(),
            image: launch.image.clone(),
            started: found.started,
            pid: AtomicU32::new(running.pid()),
            health,
            stopping: AtomicBool::new(false),
            restart: Notify::new(),
            stop: self.0.shutdown.child_token(),
            done: Mutex::new(None),
            kind: ProcessKind::Service,
            exit: watch::channel(None).0,
            launch: launch.clone(),
            network: Mutex::new(None),
        });
        let mut launch = launch.clone();
        launch.release.clone_from(&found.release);
        launch.build.clone_from(&found.build);
        self.with_app(app, |procs| procs.instances.push(instance.clone()));
        let task = tokio::spawn(supervise(self.supervised(
            app,
            &instance,
            launch,
            Some(running),
            restarts,
        )));
        *instance.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    /// What the task of `instance` works with.
    fn supervised(
        &self,
        app: &str,
        instance: &Arc<Instance>,
        launch: Launch,
        adopted: Option<Box<dyn super::driver::Running>>,
        restarts: bool,
    ) -> Supervised {
        let refresh: RouteRefresh = {
            let (supervisor, app, service) = (self.clone(), app.to_owned(), launch.service.clone());
            Arc::new(move || supervisor.refresh_routes(&app, &service))
        };
        Supervised {
            driver: self.driver_for(&launch),
            app: app.to_owned(),
            instance: instance.clone(),
            launch,
            log: self.0.logs.sink(app),
            refresh_routes: refresh,
            health_client: self.0.health_client.clone(),
            adopted,
            restarts,
            shutdown: self.0.shutdown.clone(),
        }
    }

    /// The service's instances of `release` and of other releases, oldest first, skipping
    /// those being stopped.
    pub(super) fn split(&self, app: &str, service: &str, release: &str) -> (Vec<Arc<Instance>>, Vec<Arc<Instance>>) {
        self.with_app(app, |procs| {
            procs
                .instances
                .iter()
                .filter(|i| {
                    i.service == service && i.kind == ProcessKind::Service && !i.stopping.load(Ordering::SeqCst)
                })
                .cloned()
                .partition(|i| i.release == release)
        })
    }

    /// Starts the router of `app`'s `service` if it has none, on the port it had before when
    /// that port is still free.
    pub(super) async fn ensure_router(&self, app: &str, service: &str) -> Result<(), RuntimeError> {
        if self.with_app(app, |procs| procs.routers.contains_key(service)) {
            return Ok(());
        }
        let stored = self
            .0
            .ports
            .get(app, service)
            .await
            .map_err(RuntimeError::capability(format!(
                "reading the router port of {service}"
            )))?;
        let start = |port| Router::start(app.to_owned(), port, self.0.shutdown.clone());
        let router = match start(stored.unwrap_or(0)).await {
            Ok(router) => router,
            // The old port is taken by something else now: take any.
            Err(_) if stored.is_some() => start(0)
                .await
                .map_err(RuntimeError::io(format!("starting the router of {service}")))?,
            Err(e) => return Err(RuntimeError::io(format!("starting the router of {service}"))(e)),
        };
        let port = router.local_addr().port();
        if stored != Some(port) {
            self.0
                .ports
                .set(app, service, port)
                .await
                .map_err(RuntimeError::capability(format!(
                    "recording the router port of {service}"
                )))?;
        }
        tracing::info!(
            app.name = app,
            service,
            port,
            "router of {app}/{service} on port {port}"
        );
        self.with_app(app, |procs| procs.routers.insert(service.to_owned(), router));
        Ok(())
    }

    /// Points the router of `app`'s `service` at its ready instances.
    pub(super) fn refresh_routes(&self, app: &str, service: &str) {
        self.with_app(app, |procs| {
            if let Some(router) = procs.routers.get(service) {
                let backends: Vec<(super::router::Backend, String)> = procs
                    .instances
                    .iter()
                    .filter(|i| i.service == service && i.is_ready())
                    .filter_map(|i| Some((i.backend()?, i.release.clone())))
                    .collect();
                router.set_routes(backends);
            }
        });
    }

    /// Starts an instance of `launch` and waits (a few seconds at most) until it has a pid.
    pub(super) async fn start_instance(&self, app: &str, launch: &Launch, log: &LogSink) -> Arc<Instance> {
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
        let stop = self.0.shutdown.child_token();
        let instance = Arc::new(Instance::new(id.clone(), ProcessKind::Service, launch, port, stop));
        self.with_app(app, |procs| procs.instances.push(instance.clone()));
        let task = tokio::spawn(supervise(self.supervised(app, &instance, launch.clone(), None, true)));
        *instance.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut rx = instance.health.subscribe();
            while instance.pid.load(Ordering::SeqCst) == 0 && matches!(*rx.borrow(), Health::Starting) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        let pid = instance.pid.load(Ordering::SeqCst);
        let port_text = port.map_or(String::new(), |p| format!(", port {p}"));
        let event = crate::runtime::ProcessEvent {
            app,
            service: &instance.service,
            process: &id,
            pid,
            exit: None,
        };
        log.process(
            &crate::stream_names::system("local", &id),
            format!("Started process {id} (pid {pid}{port_text})"),
            event,
        )
        .await;
        instance
    }

    /// Stops an instance (taken out of its router first) and forgets it.
    pub(super) async fn stop_instance(&self, app: &str, instance: &Arc<Instance>, log: &LogSink) {
        instance.stopping.store(true, Ordering::SeqCst);
        self.refresh_routes(app, &instance.service);
        stopped(signal_stop(instance)).await;
        self.with_app(app, |procs| procs.instances.retain(|i| !Arc::ptr_eq(i, instance)));
        self.tell_stopped(app, instance, log).await;
    }
}

/// Tells an instance's task to stop its process and hands that task back to be waited on
/// (`None` when another stop has it already).
pub(super) fn signal_stop(instance: &Instance) -> Option<tokio::task::JoinHandle<()>> {
    instance.stop.cancel();
    instance
        .done
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// Waits for a task `signal_stop` handed back: its process's grace, and a margin for podman.
pub(super) async fn stopped(task: Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = task {
        let _ = tokio::time::timeout(STOP_GRACE + Duration::from_secs(5), task).await;
    }
}

/// A port that was free a moment ago.
pub(super) fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}
