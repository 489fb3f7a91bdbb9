//! The local runtime's supervisor: which instances and routers each app has on this host. It
//! starts and stops instances (each kept alive by its own task, see `instance`), keeps each
//! service's router pointed at its ready instances, and applies releases (see `rollout`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::driver::Driver;
use super::instance::{Health, Instance, Launch, RouteRefresh, STOP_GRACE, supervise};
use super::router::Router;
use crate::runtime::{AppLogs, LogSink, PortBook, ProcessInfo, ReleaseSpec, RuntimeError};

/// An app's instances and routers on this host.
#[derive(Debug, Default)]
pub(super) struct AppProcesses {
    pub instances: Vec<Arc<Instance>>,
    pub routers: HashMap<String, Router>,
}

/// What the supervisor works with.
#[derive(Debug)]
pub struct Inner {
    apps: Mutex<HashMap<String, AppProcesses>>,
    pub(super) builds_dir: PathBuf,
    driver: Arc<dyn Driver>,
    logs: Arc<dyn AppLogs>,
    ports: Arc<dyn PortBook>,
    health_client: reqwest::Client,
    shutdown: CancellationToken,
}

/// The supervisor (cheap to clone).
#[derive(Debug, Clone)]
pub struct Supervisor(pub(super) Arc<Inner>);

impl Supervisor {
    /// A supervisor running builds' sources from `builds_dir` through `driver`, writing to
    /// `logs` and keeping router ports in `ports`.
    pub fn new(
        builds_dir: PathBuf,
        driver: Arc<dyn Driver>,
        logs: Arc<dyn AppLogs>,
        ports: Arc<dyn PortBook>,
        shutdown: CancellationToken,
    ) -> Self {
        let health_client = reqwest::Client::builder().build().unwrap_or_default();
        Self(Arc::new(Inner {
            apps: Mutex::default(),
            builds_dir,
            driver,
            logs,
            ports,
            health_client,
            shutdown,
        }))
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
                    image: String::new(),
                    instance: "local".to_owned(),
                    name: i.service.clone(),
                    ports: i.port.map(|p| vec![p.to_string()]).unwrap_or_default(),
                    release: i.release.clone(),
                    started: i.started,
                    status: i.status(),
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

    /// Restarts one process. False if there is no such process.
    pub fn restart_process(&self, app: &str, id: &str) -> bool {
        let instance = self.with_app(app, |procs| procs.instances.iter().find(|i| i.id == id).cloned());
        let Some(instance) = instance else { return false };
        instance.restart.notify_one();
        true
    }

    /// Rolls `release` out (or stops everything for `None`).
    pub async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError> {
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

    /// The service's instances of `release` and of other releases, oldest first, skipping
    /// those being stopped.
    pub(super) fn split(&self, app: &str, service: &str, release: &str) -> (Vec<Arc<Instance>>, Vec<Arc<Instance>>) {
        self.with_app(app, |procs| {
            procs
                .instances
                .iter()
                .filter(|i| i.service == service && !i.stopping.load(Ordering::SeqCst))
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
            restart: Notify::new(),
            stop: self.0.shutdown.child_token(),
            done: Mutex::new(None),
        });
        self.with_app(app, |procs| procs.instances.push(instance.clone()));
        let refresh: RouteRefresh = {
            let (supervisor, app, service) = (self.clone(), app.to_owned(), launch.service.clone());
            Arc::new(move || supervisor.refresh_routes(&app, &service))
        };
        let task = tokio::spawn(supervise(
            self.0.driver.clone(),
            app.to_owned(),
            instance.clone(),
            launch.clone(),
            self.0.logs.sink(app),
            refresh,
            self.0.health_client.clone(),
        ));
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
        log.line(
            &format!("system/local/{id}"),
            format!("Started process {id} (pid {pid}{port_text})"),
        )
        .await;
        instance
    }

    /// Stops an instance (taken out of its router first) and forgets it.
    pub(super) async fn stop_instance(&self, app: &str, instance: &Arc<Instance>, log: &LogSink) {
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

/// A port that was free a moment ago.
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}
