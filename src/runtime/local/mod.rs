//! The local runtime: builds and app instances on this host. Builds run their services' build
//! commands in a sandbox (see `build`); releases roll out as instances supervised here (see
//! `supervisor`, `rollout`, `instance`, `health`), started by a driver (see `driver`), each
//! service with a port behind a router (see `router`).

#[cfg(test)]
mod adoption_tests;
mod analysis;
pub mod app_accounts;
mod app_network;
mod build;
mod cgroups;
mod container;
mod context;
mod cpu;
mod disk_cap;
mod dockerfile;
pub mod driver;
pub mod exec;
pub mod exit;
pub mod forwarder;
mod health;
mod instance;
pub mod keeper;
mod kept;
mod metrics;
pub mod podman;
pub mod process;
pub mod pty;
pub(crate) mod registry_auth;
mod resources;
mod rollout;
pub mod router;
pub mod sandbox;
mod supervisor;
mod transfer;
mod user_network;

pub use supervisor::MAX_ONE_OFFS_PER_APP;

use std::path::PathBuf;
use std::sync::Arc;

use build::Builder;
use supervisor::Supervisor;

use super::{
    AppLogs, BuildFailure, BuildJob, BuildOutput, Capabilities, ExecRequest, ExecSession, LogSink, OneOff, PortBook,
    ProcessInfo, ReleaseSpec, ResourceEndpoint, Runtime, RuntimeError,
};
use crate::archive::Limits;
use crate::objects::Objects;

/// How long rack's shutdown waits for the apps' log writers to store what is queued.
const LOGS_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the local runtime is given.
#[derive(Debug)]
pub struct LocalSettings {
    pub objects: Objects,
    /// Builds live in `<builds_dir>/<app>/<build id>`.
    pub builds_dir: PathBuf,
    pub limits: Limits,
    /// Largest size of a build's directory while its build commands run (0: no cap).
    pub build_dir_max_bytes: u64,
    pub sandbox: sandbox::Sandbox,
    /// The uid each app's sandboxed processes run as (when rack is root).
    pub accounts: app_accounts::AppAccounts,
    /// podman, when it is installed: Dockerfile builds and containers.
    pub podman: Option<podman::Podman>,
    /// Where app output and process events go.
    pub logs: Arc<dyn AppLogs>,
    /// Where router ports are kept.
    pub ports: Arc<dyn PortBook>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The rack binary, run again as the resource forwarder of containers (see `forwarder`).
    pub program: PathBuf,
}

/// Builds and instances on this host.
#[derive(Debug)]
pub struct LocalRuntime {
    builder: Builder,
    resources: resources::Resources,
    supervisor: Supervisor,
    logs: Arc<dyn AppLogs>,
    /// The apps' network namespaces (see `app_network`).
    networks: Arc<app_network::AppNetworks>,
    /// The instances' cgroups, read for their memory and CPU (`metrics`).
    cgroups: Option<cgroups::Cgroups>,
    /// The instances' last CPU readings (`metrics`, `ps`).
    cpu: Arc<cpu::CpuRates>,
}

impl LocalRuntime {
    /// A runtime with `settings`.
    pub fn new(settings: LocalSettings) -> Self {
        let data_dir = settings.builds_dir.parent().unwrap_or(&settings.builds_dir);
        // Sandboxes in a user-mode network (an app's, a build command's) cannot reach a
        // loopback resolver of the host.
        let resolver = nix::unistd::geteuid()
            .is_root()
            .then(|| user_network::resolver_for_sandboxes(&data_dir.join("network")))
            .flatten();
        let sandbox = settings.sandbox.with_resolver(resolver);
        let cgroups = match cgroups::Cgroups::detect(&podman::host_id(data_dir)) {
            Ok(cgroups) => Some(cgroups),
            Err(why) => {
                tracing::warn!("app processes run without memory, CPU and process limits: {why}");
                None
            }
        };
        let forwarders = forwarder::Forwarders {
            program: settings.program.clone(),
        };
        let networks = Arc::new(app_network::AppNetworks::new(
            forwarders.clone(),
            data_dir.join("app-networks"),
        ));
        let processes = Arc::new(driver::ProcessDriver {
            sandbox: sandbox.clone(),
            accounts: settings.accounts.clone(),
            cgroups: cgroups.clone(),
            networks: networks.clone(),
            keepers: kept::Keepers {
                dir: data_dir.join("keepers"),
                program: settings.program.clone(),
            },
        });
        let containers = settings.podman.clone().map(|podman| -> Arc<dyn driver::Driver> {
            Arc::new(container::ContainerDriver {
                podman,
                forwarders: forwarders.clone(),
            })
        });
        let logs = settings.logs.clone();
        let supervisor = Supervisor::new(
            settings.builds_dir.clone(),
            processes,
            containers,
            settings.logs,
            settings.ports,
            settings.shutdown,
        );
        Self {
            resources: resources::Resources::new(data_dir),
            builder: Builder {
                objects: settings.objects,
                builds_dir: settings.builds_dir,
                limits: settings.limits,
                max_dir_bytes: settings.build_dir_max_bytes,
                sandbox,
                accounts: settings.accounts,
                podman: settings.podman,
            },
            supervisor,
            logs,
            networks,
            cgroups,
            cpu: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            restores_on_start: true,
            restores_resource_data: true,
            restores_redis: true,
            runs_rack_resources: true,
            transfers_builds: true,
            ..Capabilities::default()
        }
    }

    #[tracing::instrument(skip_all, fields(app.name = %app, release.id = release.map_or("", |r| r.id.as_str())))]
    async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError> {
        if let Some(release) = release
            && !release.manifest.balancers.is_empty()
        {
            // Said, not refused: the same convox.yml deploys to a Kubernetes rack, where they run.
            let names: Vec<&str> = release.manifest.balancers.keys().map(String::as_str).collect();
            log.line(
                &crate::stream_names::system("local", "app"),
                format!(
                    "Balancers are not run by the local runtime (its router serves the services' ports): {}",
                    names.join(", ")
                ),
            )
            .await;
        }
        // Resources first: the services' processes get their variables.
        if let Some(release) = release {
            self.resources.ensure_all(release, log).await?;
        }
        self.supervisor.apply(app, release, log).await
    }

    async fn processes(&self, app: &str) -> Result<Vec<ProcessInfo>, RuntimeError> {
        let mut processes = self.supervisor.processes(app);
        let measured = self.measured(app);
        for p in &mut processes {
            if let Some(m) = measured.iter().find(|m| m.id == p.id) {
                p.cpu = self.instance_cpu(app, m).unwrap_or(0.0);
            }
        }
        Ok(processes)
    }

    async fn restart_process(&self, app: &str, id: &str) -> Result<(), RuntimeError> {
        if self.supervisor.restart_process(app, id).await {
            Ok(())
        } else {
            Err(RuntimeError::NoProcess(id.to_owned()))
        }
    }

    #[tracing::instrument(skip_all, fields(app.name = %release.app, service = %one_off.service))]
    async fn run(&self, release: &ReleaseSpec, one_off: OneOff) -> Result<ProcessInfo, RuntimeError> {
        let service = release.manifest.services.get(&one_off.service).ok_or_else(|| {
            RuntimeError::Failed(format!("release {} has no service {}", release.id, one_off.service))
        })?;
        // The release phase may run before any apply of its release: its resources first.
        let log = one_off.log.clone().unwrap_or_else(|| self.logs.sink(&release.app));
        self.resources.ensure_all(release, &log).await?;
        let mut launch = instance::Launch::with_command(
            &self.builder.builds_dir,
            self.supervisor.has_containers(),
            release,
            &one_off.service,
            service,
            Some(one_off.command.clone()),
        )?;
        launch.env.extend(one_off.env.clone());
        // Not routed to: a one-off gets no PORT of its own.
        launch.has_port = false;
        let instance = self
            .supervisor
            .run(&release.app, launch, log, one_off.timeout)
            .map_err(|running| {
                RuntimeError::Busy(format!(
                    "app {} already has {running} one-off processes running, the most this rack allows; \
                     wait for one to end (or stop one) and try again",
                    release.app
                ))
            })?;
        // It has a pid (or has failed) within moments; `ps` shows the rest.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut health = instance.health.subscribe();
            while matches!(*health.borrow_and_update(), instance::Health::Starting) && instance.exit.borrow().is_none()
            {
                if health.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        self.supervisor
            .processes(&release.app)
            .into_iter()
            .find(|p| p.id == instance.id)
            .ok_or_else(|| RuntimeError::Failed(format!("process {} ended at once", instance.id)))
    }

    async fn wait_process(&self, app: &str, id: &str) -> Result<i32, RuntimeError> {
        self.supervisor
            .wait_process(app, id)
            .await
            .ok_or_else(|| RuntimeError::NoProcess(id.to_owned()))
    }

    async fn exec(&self, app: &str, id: &str, request: ExecRequest) -> Result<ExecSession, RuntimeError> {
        self.supervisor.exec(app, id, &request).await
    }

    async fn traffic(
        &self,
        app: &str,
        service: Option<&str>,
        window: &crate::runtime::MetricsWindow,
    ) -> Result<Option<crate::runtime::Traffic>, RuntimeError> {
        Ok(Some(self.local_traffic(app, service, window)))
    }

    fn drain_traffic(&self, last: bool) -> Vec<crate::runtime::TrafficMinute> {
        self.drain_minutes(last)
    }

    async fn export_build(
        &self,
        app: &str,
        id: &str,
        images: &[String],
        scratch: &std::path::Path,
    ) -> Result<crate::runtime::ExportedBuild, RuntimeError> {
        transfer::export(&self.builder, app, id, images, scratch).await
    }

    async fn import_build(
        &self,
        app: &str,
        id: &str,
        files: &std::path::Path,
        images: Option<&std::path::Path>,
        images_by_service: &std::collections::BTreeMap<String, String>,
    ) -> Result<std::collections::BTreeMap<String, String>, RuntimeError> {
        transfer::import(&self.builder, app, id, files, images, images_by_service).await
    }

    #[tracing::instrument(skip_all, fields(app.name = %app))]
    async fn prune_builds(&self, app: &str, ids: &[crate::ids::BuildId]) -> Result<(), RuntimeError> {
        let mut first_failure = Ok(());
        for id in ids {
            // The sources first: they need no podman, whose every command may wait its turn for
            // the image store while other builds hold it (a refused archive's files must go at
            // once).
            let dir = self.builder.builds_dir.join(app).join(id);
            match remove_dir(&dir, &format!("pruning the sources of build {id}")).await {
                Ok(true) => tracing::info!(app.name = app, build.id = %id, "pruned the sources of build {id}"),
                Ok(false) => {}
                Err(e) => first_failure = first_failure.and(Err(e)),
            }
            if let Some(podman) = &self.builder.podman {
                podman.remove_build_images(app, id).await;
            }
        }
        first_failure
    }

    #[tracing::instrument(skip_all, fields(app.name = %app))]
    async fn delete_app(&self, app: &str) -> Result<(), RuntimeError> {
        self.supervisor.delete_app(app).await;
        // Its keepers' directories went with its instances.
        let _ = std::fs::remove_dir(self.builder.builds_dir.with_file_name("keepers").join(app));
        self.networks.remove(app).await;
        self.resources.delete_app(app).await;
        let builds = remove_dir(
            &self.builder.builds_dir.join(app),
            &format!("deleting the builds of {app}"),
        )
        .await;
        let cache = match &self.builder.podman {
            Some(podman) => remove_dir(&podman.cache_dir(app), &format!("deleting the build cache of {app}")).await,
            None => Ok(false),
        };
        builds.and(cache).map(drop)
    }

    async fn delete_resource(&self, app: &str, name: &str) -> Result<(), RuntimeError> {
        self.resources.delete(app, name).await
    }

    async fn resource_endpoint(&self, app: &str, name: &str) -> Result<ResourceEndpoint, RuntimeError> {
        let addr = self.resources.endpoint(app, name).await?;
        Ok(ResourceEndpoint { addr, guard: None })
    }

    async fn ensure_rack_resource(
        &self,
        spec: &crate::resource::ResourceSpec,
        restart: bool,
    ) -> Result<(), RuntimeError> {
        self.resources.ensure_rack(spec, restart).await
    }

    async fn restore_redis(
        &self,
        app: &str,
        spec: &crate::resource::ResourceSpec,
        rdb: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        self.resources.restore_redis(app, spec, rdb).await
    }

    async fn serve_certificate(
        &self,
        app: &str,
        service: &str,
        certificate_pem: &str,
        key_pem: &str,
    ) -> Result<Option<std::net::SocketAddr>, RuntimeError> {
        let key =
            router::certified_key(certificate_pem, key_pem).map_err(RuntimeError::io("loading the certificate"))?;
        let Some(router) = self.supervisor.router(app, service) else {
            return Ok(None);
        };
        let addr = router
            .serve_tls(key)
            .await
            .map_err(RuntimeError::io(format!("serving {app}/{service} over HTTPS")))?;
        Ok(Some(addr))
    }

    async fn unserve_certificate(&self, app: &str, service: &str) -> Result<(), RuntimeError> {
        if let Some(router) = self.supervisor.router(app, service) {
            router.stop_tls();
        }
        Ok(())
    }

    fn https_addr(&self, app: &str, service: &str) -> Option<std::net::SocketAddr> {
        self.supervisor.router(app, service)?.tls_addr()
    }

    async fn let_go(&self) {
        self.supervisor.let_go().await;
        // The instances' last events (a process that exited while rack stopped) may still be
        // queued for the app's log writer: stored before rack's database closes.
        if tokio::time::timeout(LOGS_SETTLE, self.supervisor.0.logs.settle())
            .await
            .is_err()
        {
            tracing::warn!("the apps' log writers were still writing when rack stopped");
        }
    }

    fn router_addr(&self, app: &str) -> Option<std::net::SocketAddr> {
        self.supervisor.router_addr(app)
    }

    #[tracing::instrument(skip_all, fields(app.name = %job.app, build.id = %job.id))]
    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure> {
        self.builder.build(job, log).await
    }
}

/// Removes `dir` and all it holds; whether it was there. Failures are `what` failing.
async fn remove_dir(dir: &std::path::Path, what: &str) -> Result<bool, RuntimeError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(RuntimeError::io(what)(e)),
    }
}
