//! The runtime: what builds sources and runs releases. One object-safe trait, [`Runtime`], with
//! `local` (processes on this host) as the embedded default and `kube` (a Kubernetes cluster);
//! the types it takes and returns are in the modules below, re-exported here.

mod build_job;
mod capabilities;
mod capability_set;
mod error;
pub mod fake;
mod host;
pub mod kube;
pub mod local;
mod log_sink;
mod metrics;
mod process;
mod release;
mod routes;
pub mod source;

use std::net::SocketAddr;

pub use build_job::{BuildFailure, BuildJob, BuildOutput, ExportedBuild};
pub use capabilities::{
    AppLogs, AppUids, NoRegistries, PortBook, Registries, RegistryCredential, SourceTokens, docker_config_json,
};
pub use capability_set::Capabilities;
pub use error::{BoxError, RuntimeError};
pub use host::{InstanceInfo, this_host};
pub use log_sink::{Copied, LogItem, LogReceiver, LogSink, ProcessEvent, WeakLogSink};
pub use metrics::{
    LATENCY_BUCKETS, MAX_METRIC_PERIODS, MetricsWindow, PeriodFigures, Traffic, TrafficMinute, latency_bucket,
    latency_quantile, latency_upper_edge,
};
pub use process::{
    ExecRequest, ExecSession, LineStream, LogLine, OneOff, ProcessInfo, ProcessKind, ProcessLogs, ProcessStatus,
};
pub use release::ReleaseSpec;
pub use routes::{BalancerInfo, BalancerPortInfo, ServiceRoute};

/// The stream name of build output.
pub const BUILD_STREAM: &str = crate::stream_names::BUILD;

/// The owner rack-wide resources have in place of an app in the runtime's resource operations
/// (`resource_endpoint(RACK_OWNER, name)`, `delete_resource`...): no app is named so.
pub const RACK_OWNER: &str = "@rack";

/// Where rack itself reaches a resource: an address on 127.0.0.1, valid while `guard` lives
/// (the local runtime: the server's own port, no guard; Kubernetes: a port-forward).
/// Bytes as they come, ending with an error if what makes them failed half-way.
pub type ByteStream = futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

pub struct ResourceEndpoint {
    pub addr: SocketAddr,
    pub guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for ResourceEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceEndpoint")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// The name in event streams: `system/<name>/...`.
    fn name(&self) -> &'static str;

    /// Prepares a new app (the Kubernetes runtime makes its namespace).
    ///
    /// # Errors
    /// A message for the client when the app cannot be hosted.
    async fn create_app(&self, _app: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// What the runtime does itself rather than leave to rack (none of it, by default).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Process output that the runtime keeps outside rack's event log (the Kubernetes
    /// runtime: pod logs); `None` when processes write to the event log.
    fn process_logs(&self, _request: ProcessLogs) -> Option<LineStream> {
        None
    }

    /// Stops what a cancelled or timed-out build left running outside rack (dropping the build
    /// future stops what runs inside it).
    ///
    /// # Errors
    /// When what the build left could not all be removed.
    async fn cancel_build(&self, _app: &str, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Builds `job`'s source, writing its output to `log`. Dropping the future stops the build
    /// (and every process it started).
    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure>;

    /// Rolls `release` out for its app (replacing whatever runs), writing progress to `log`;
    /// returns once every service is healthy. `None` for the release stops the app's
    /// processes. Dropping the future leaves what was started registered, so that a later
    /// `apply` (the rollback) can replace it.
    async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError>;

    /// The app's processes.
    ///
    /// # Errors
    /// When they cannot be listed.
    async fn processes(&self, app: &str) -> Result<Vec<ProcessInfo>, RuntimeError>;

    /// Restarts one instance of a service (it is stopped and started again), or stops a
    /// one-off process for good.
    ///
    /// # Errors
    /// [`RuntimeError::NoProcess`] when the app has no such process; or it could not be
    /// stopped.
    async fn restart_process(&self, app: &str, id: &str) -> Result<(), RuntimeError>;

    /// Starts a one-off process of `release`'s service.
    ///
    /// # Errors
    /// When the service cannot run here or the process cannot be started.
    async fn run(&self, release: &ReleaseSpec, one_off: OneOff) -> Result<ProcessInfo, RuntimeError>;

    /// Waits until the one-off process `id` of `app` ends; its exit code.
    ///
    /// # Errors
    /// When there is no such process, or it cannot be followed.
    async fn wait_process(&self, app: &str, id: &str) -> Result<i32, RuntimeError>;

    /// Runs a command inside the running process `id` of `app`.
    ///
    /// # Errors
    /// When there is no such process, or the command cannot be started.
    async fn exec(&self, app: &str, id: &str, request: ExecRequest) -> Result<ExecSession, RuntimeError>;

    /// Writes what build `id` of `app` produced into `scratch` for an export: its build
    /// directory packed as `files.tgz` and, when it has any, its `images` saved as
    /// `images.tar`. Only where `capabilities().transfers_builds`.
    ///
    /// # Errors
    /// [`RuntimeError::Failed`] when what the build made is no longer here (pruned).
    async fn export_build(
        &self,
        _app: &str,
        _id: &str,
        _images: &[String],
        _scratch: &std::path::Path,
    ) -> Result<ExportedBuild, RuntimeError> {
        Err(RuntimeError::Failed(format!(
            "the {} runtime does not export builds",
            self.name()
        )))
    }

    /// Installs an imported build as build `id` of `app`: the build directory from `files`
    /// (a `files.tgz`) and the images from `images` (an `images.tar`). `images_by_service`
    /// names them as the exporting rack did; the answer names them as this rack does.
    ///
    /// # Errors
    /// [`RuntimeError::Failed`] when the archive's content cannot be installed (nothing of it
    /// is left behind).
    async fn import_build(
        &self,
        _app: &str,
        _id: &str,
        _files: &std::path::Path,
        _images: Option<&std::path::Path>,
        _images_by_service: &std::collections::BTreeMap<String, String>,
    ) -> Result<std::collections::BTreeMap<String, String>, RuntimeError> {
        Err(RuntimeError::Failed(format!(
            "the {} runtime does not import builds",
            self.name()
        )))
    }

    /// The machines that run the apps (convox `instances`): this host by default. Their
    /// `processes` are counted by the caller.
    ///
    /// # Errors
    /// When the cluster cannot be asked.
    async fn instances(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        Ok(vec![this_host()])
    }

    /// Frees what the (ended) builds `ids` of `app` hold (their unpacked sources, images, build
    /// Jobs). It goes on past a build it cannot free.
    ///
    /// # Errors
    /// The first failure, once every build was tried.
    async fn prune_builds(&self, app: &str, ids: &[crate::ids::BuildId]) -> Result<(), RuntimeError>;

    /// Stops and removes everything of an app (it is being deleted). It goes on past what it
    /// cannot remove.
    ///
    /// # Errors
    /// The first failure, once everything was tried.
    async fn delete_app(&self, app: &str) -> Result<(), RuntimeError>;

    /// rack is stopping (its shutdown token is cancelled): returns once what the runtime runs
    /// is let go of for the next start to take over (the local runtime: its instances
    /// detached, their output stored up to a recorded place), before rack's database closes.
    async fn let_go(&self) {}

    /// The address on this host of the app's router (its first service with a port): only
    /// where rack itself routes the apps' traffic (local); `None` elsewhere.
    fn router_addr(&self, _app: &str) -> Option<SocketAddr> {
        None
    }

    /// Serves `service` of `app` over HTTPS with this certificate (PEM, chain included) and key
    /// (`convox ssl update`), where rack itself routes the apps' traffic (local): returns where
    /// it listens, or `None` when the service runs nowhere here yet. Elsewhere the ingress takes
    /// the certificate from the release (`None`).
    ///
    /// # Errors
    /// When the certificate cannot be served.
    async fn serve_certificate(
        &self,
        app: &str,
        service: &str,
        certificate_pem: &str,
        key_pem: &str,
    ) -> Result<Option<SocketAddr>, RuntimeError> {
        let _ = (app, service, certificate_pem, key_pem);
        Ok(None)
    }

    /// Stops serving `service` of `app` with the certificate it was given (`rack ssl unset`):
    /// on the local runtime its router's HTTPS listener closes; on Kubernetes its Ingress loses
    /// that TLS section (back to cert-manager's when an issuer is set) and its Secret goes.
    ///
    /// # Errors
    /// When what serves it cannot be changed.
    async fn unserve_certificate(&self, app: &str, service: &str) -> Result<(), RuntimeError> {
        let _ = (app, service);
        Ok(())
    }

    /// Where rack serves `service` of `app` over HTTPS on this host, if it does (local).
    fn https_addr(&self, _app: &str, _service: &str) -> Option<SocketAddr> {
        None
    }

    /// Where the app's traffic arrives (convox's app `router`): empty when nowhere.
    fn app_router(&self, app: &str) -> String {
        self.router_addr(app).map(|a| a.to_string()).unwrap_or_default()
    }

    /// Where service `name` of `app`'s release (with environment `env`) is reached, if it
    /// takes traffic.
    fn service_route(
        &self,
        app: &str,
        name: &str,
        service: &crate::manifest::Service,
        env: &crate::env::Env,
    ) -> Option<ServiceRoute> {
        let _ = (name, env);
        service.port.and(self.router_addr(app)).map(|router| ServiceRoute {
            hosts: vec![router.to_string()],
            port: router.port(),
        })
    }

    /// Removes resource `name` of `app` and its data (its release no longer declares it, or
    /// `rack resources delete`). Resources are created by `apply`, before the services start.
    ///
    /// # Errors
    /// When it cannot be removed (or the runtime has no resources).
    async fn delete_resource(&self, app: &str, name: &str) -> Result<(), RuntimeError> {
        let _ = (app, name);
        Err(RuntimeError::Failed(format!(
            "resources are not supported by the {} runtime yet",
            self.name()
        )))
    }

    /// Where linked processes reach resource `name` of `app` (of `kind`): the host and port its
    /// URL shows, and `/proxy/{host}/{port}` must name. `None` when it does not run here. The
    /// default is where rack reaches it, for runtimes where that is the same place.
    async fn resource_address(&self, app: &str, name: &str, kind: crate::resource::Kind) -> Option<(String, u16)> {
        let _ = kind;
        let endpoint = self.resource_endpoint(app, name).await.ok()?;
        Some((endpoint.addr.ip().to_string(), endpoint.addr.port()))
    }

    /// A dump of resource `name` of `app` (of `kind`) taken next to its server by the tool of
    /// its own image, where the runtime does that (Kubernetes: `pg_dump` in the postgres pod,
    /// so that its version is always the server's); `None` where rack's host tools dump it
    /// through [`Runtime::resource_endpoint`].
    ///
    /// # Errors
    /// When the dump cannot be started, or fails before its first byte.
    async fn dump_resource(
        &self,
        app: &str,
        name: &str,
        kind: crate::resource::Kind,
        credentials: &crate::resource::Credentials,
    ) -> Result<Option<ByteStream>, RuntimeError> {
        let _ = (app, name, kind, credentials);
        Ok(None)
    }

    /// Where rack itself can reach resource `name` of `app` (proxy, console, export, import).
    ///
    /// # Errors
    /// When it is not running (or the runtime has no resources).
    async fn resource_endpoint(&self, app: &str, name: &str) -> Result<ResourceEndpoint, RuntimeError> {
        let _ = (app, name);
        Err(RuntimeError::Failed(format!(
            "resources are not supported by the {} runtime yet",
            self.name()
        )))
    }

    /// Replaces the data of redis resource `spec` of `app` with the RDB file `rdb` (checked to
    /// be one): a running redis cannot load an RDB through its protocol, so the runtime restarts
    /// it on the file. On failure the resource keeps its data.
    ///
    /// # Errors
    /// When the RDB cannot be loaded (or the runtime cannot do this).
    async fn restore_redis(
        &self,
        app: &str,
        spec: &crate::resource::ResourceSpec,
        rdb: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        let _ = (app, spec, rdb);
        Err(RuntimeError::Failed(format!(
            "importing into redis resources is not supported by the {} runtime",
            self.name()
        )))
    }

    /// Makes sure rack-wide resource `spec` runs (creating, starting or adopting it), stopped
    /// first when `restart` (its options changed). It is then reached, and deleted, as resource
    /// `spec.name` of [`RACK_OWNER`].
    ///
    /// # Errors
    /// When it cannot run here or does not come up.
    async fn ensure_rack_resource(
        &self,
        spec: &crate::resource::ResourceSpec,
        restart: bool,
    ) -> Result<(), RuntimeError> {
        let _ = (spec, restart);
        Err(RuntimeError::Failed(format!(
            "rack-wide resources are not supported by the {} runtime",
            self.name()
        )))
    }

    /// What the app's router served in `window` (all services, or `service`'s), and the memory
    /// of its instances: `None` where the runtime does not route the apps' traffic itself.
    ///
    /// # Errors
    /// When the figures cannot be read.
    async fn traffic(
        &self,
        app: &str,
        service: Option<&str>,
        window: &MetricsWindow,
    ) -> Result<Option<Traffic>, RuntimeError> {
        let _ = (app, service, window);
        Ok(None)
    }

    /// What rack's own routers served since the last call, per release and minute, for the
    /// per-minute history (`jobs::metrics`): each second once. With `last` (rack is shutting
    /// down) the present second too, which the routers will not finish. Empty where rack routes
    /// nothing.
    fn drain_traffic(&self, last: bool) -> Vec<TrafficMinute> {
        let _ = last;
        Vec::new()
    }

    /// The app's balancers as they run (none where the runtime has no load balancers).
    ///
    /// # Errors
    /// When they cannot be read.
    async fn balancers(&self, app: &str) -> Result<Vec<BalancerInfo>, RuntimeError> {
        let _ = app;
        Ok(Vec::new())
    }
}
