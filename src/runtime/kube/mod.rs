//! The Kubernetes runtime (`RACK_RUNTIME=kube`): each app is a namespace `<rack>-<app>`, each
//! build a Job that pushes images to `RACK_REGISTRY`, each service of a release a Deployment
//! (and a Service when it has a port) applied with server-side apply and watched until it has
//! rolled out. Everything lives in the cluster, so any rack replica can pick up any job.

mod analysis;
mod build;
mod build_transfer;
mod certificates;
pub mod database_rollout;
pub mod databases;
pub mod events;
mod logs;
mod nodes;
pub mod process;
mod prometheus;
#[cfg(test)]
mod prometheus_tests;
mod redis_import;
mod registries;
mod registry_client;
#[cfg(test)]
mod registry_client_tests;
mod resource_dump;
mod resource_restore;
pub mod resources;
mod rights;
mod rollout;
mod traffic;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, Client};

use super::{
    BuildFailure, BuildJob, BuildOutput, ExecRequest, ExecSession, LogSink, OneOff, ProcessInfo, ProcessKind,
    ProcessStatus, ReleaseSpec, Runtime, RuntimeError,
};
use crate::archive::Limits;
use crate::config::KubeConfig;
use crate::objects::Objects;
use resources::{MANAGER, namespace_name};

/// A Kubernetes cluster.
#[derive(Clone)]
pub struct KubeRuntime(Arc<Inner>);

struct Inner {
    client: Client,
    settings: KubeSettings,
    /// The CronJob API the server has, found on first use.
    cronjobs: tokio::sync::OnceCell<(String, ApiResource)>,
}

/// The CronJobs of an app's namespace, as the server serves them.
pub struct CronJobs {
    /// `batch/v1` (Kubernetes 1.21 and later) or `batch/v1beta1`.
    pub version: String,
    pub api: Api<DynamicObject>,
}

impl std::fmt::Debug for KubeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRuntime")
            .field("rack", &self.0.settings.rack)
            .field("registry", &self.0.settings.config.registry)
            .finish_non_exhaustive()
    }
}

/// What the runtime needs from the rest of rack.
#[derive(Debug)]
pub struct KubeSettings {
    pub rack: String,
    pub config: KubeConfig,
    pub objects: Objects,
    /// Issues and revokes the tokens build pods fetch their source with.
    pub tokens: Arc<dyn super::SourceTokens>,
    /// Scratch space where a build's source is checked before the cluster builds it.
    pub scratch: PathBuf,
    /// rack's data directory, where a restore leaves the resources' exports for the runtime
    /// to load into the resources it creates (`crate::backup::pending_import`).
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub build_timeout: std::time::Duration,
    /// The private registries, whose credentials each release's pods pull with.
    pub registries: Arc<dyn super::Registries>,
}

impl KubeRuntime {
    /// Connects to the cluster of the environment (KUBECONFIG, ~/.kube/config or in-cluster)
    /// and checks that it answers.
    ///
    /// # Errors
    /// When no cluster is configured or it cannot be reached.
    pub async fn connect(settings: KubeSettings) -> anyhow::Result<Self> {
        use anyhow::Context;
        let client = match &settings.config.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {} (KUBECONFIG)", path.display()))?;
                let config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("loading the kubeconfig {} (KUBECONFIG)", path.display()))?;
                Client::try_from(config)?
            }
            None => Client::try_default().await.context(
                "finding the Kubernetes cluster (KUBECONFIG, ~/.kube/config or the in-cluster service account)",
            )?,
        };
        let version = client
            .apiserver_version()
            .await
            .context("reaching the Kubernetes API server")?;
        tracing::info!(
            "Kubernetes runtime: API server {}.{} ({})",
            version.major,
            version.minor,
            version.git_version
        );
        Ok(Self(Arc::new(Inner {
            client,
            settings,
            cronjobs: tokio::sync::OnceCell::new(),
        })))
    }

    pub(crate) fn namespace(&self, app: &str) -> String {
        namespace_name(&self.0.settings.rack, app)
    }

    fn api<K>(&self, app: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.0.client.clone(), &self.namespace(app))
    }

    /// The CronJobs of `app`'s namespace, in the newest version the server has: `batch/v1`
    /// from Kubernetes 1.21, `batch/v1beta1` before (found once, by discovery).
    async fn cronjobs(&self, app: &str) -> Result<CronJobs, RuntimeError> {
        let (version, resource) = self
            .0
            .cronjobs
            .get_or_try_init(|| async {
                let v1 = self
                    .0
                    .client
                    .list_api_group_resources("batch/v1")
                    .await
                    .map_err(RuntimeError::kube("discovering the batch API"))?;
                let version = if v1.resources.iter().any(|r| r.name == "cronjobs") {
                    "v1"
                } else {
                    "v1beta1"
                };
                let gvk = GroupVersionKind::gvk("batch", version, "CronJob");
                Ok::<_, RuntimeError>((
                    format!("batch/{version}"),
                    ApiResource::from_gvk_with_plural(&gvk, "cronjobs"),
                ))
            })
            .await?;
        Ok(CronJobs {
            version: version.clone(),
            api: Api::namespaced_with(self.0.client.clone(), &self.namespace(app), resource),
        })
    }

    /// Creates (or updates) the app's namespace and, when rack runs as a service account, the
    /// RoleBinding that gives it its rights there.
    pub(crate) async fn ensure_namespace(&self, app: &str) -> Result<(), RuntimeError> {
        let params = PatchParams::apply(MANAGER).force();
        let namespaces: Api<Namespace> = Api::all(self.0.client.clone());
        let name = self.namespace(app);
        let existed = self.owned_namespace(app).await?;
        namespaces
            .patch(
                &name,
                &params,
                &Patch::Apply(resources::namespace(&self.0.settings.rack, app)),
            )
            .await
            .map_err(RuntimeError::kube(format!("creating namespace {name}")))?;
        if let Some(account) = &self.0.settings.config.service_account {
            let bindings: Api<RoleBinding> = self.api(app);
            bindings
                .patch(
                    "rack",
                    &params,
                    &Patch::Apply(resources::role_binding(&self.0.settings.rack, app, account)),
                )
                .await
                .map_err(RuntimeError::kube(format!("binding rack's rights in namespace {name}")))?;
            // A new binding is not in effect at once; an existing namespace's has been for long.
            if !existed {
                rights::wait_for_rights(&self.0.client, &name).await?;
            }
        }
        Ok(())
    }

    /// Checks that the app's namespace, if it exists, is this app's (labels `rack` and `app`):
    /// a namespace of someone else's with the same name must never be adopted or deleted.
    async fn owned_namespace(&self, app: &str) -> Result<bool, RuntimeError> {
        let namespaces: Api<Namespace> = Api::all(self.0.client.clone());
        let name = self.namespace(app);
        let existing = namespaces
            .get_opt(&name)
            .await
            .map_err(RuntimeError::kube(format!("reading namespace {name}")))?;
        let Some(existing) = existing else { return Ok(false) };
        let labels = existing.metadata.labels.unwrap_or_default();
        if labels.get("rack") == Some(&self.0.settings.rack) && labels.get("app").map(String::as_str) == Some(app) {
            Ok(true)
        } else {
            Err(RuntimeError::Failed(format!(
                "namespace {name} already exists and is not rack's namespace of app {app}; rename the app"
            )))
        }
    }
}

/// A Kubernetes error as a short message (the API's own text when it gave one).
pub fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

/// Whether `error` is the API's 404.
fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Deletes `name` (and, in the background, what it owns); one that is already gone is not an
/// error.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), RuntimeError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(RuntimeError::kube(format!("deleting {name}"))(e)),
    }
}

#[async_trait::async_trait]
impl Runtime for KubeRuntime {
    fn name(&self) -> &'static str {
        "k8s"
    }

    #[tracing::instrument(skip_all, fields(app.name = %app))]
    async fn create_app(&self, app: &str) -> Result<(), RuntimeError> {
        self.ensure_namespace(app).await
    }

    #[tracing::instrument(skip_all, fields(app.name = %app))]
    async fn serve_certificate(
        &self,
        app: &str,
        service: &str,
        certificate_pem: &str,
        key_pem: &str,
    ) -> Result<Option<std::net::SocketAddr>, RuntimeError> {
        // Served by the Ingress, at the service's hosts: no address of rack's own.
        certificates::serve(self, app, service, certificate_pem, key_pem).await?;
        Ok(None)
    }

    #[tracing::instrument(skip_all, fields(app.name = %app))]
    async fn unserve_certificate(&self, app: &str, service: &str) -> Result<(), RuntimeError> {
        certificates::unserve(self, app, service).await
    }

    async fn traffic(
        &self,
        app: &str,
        service: Option<&str>,
        window: &crate::runtime::MetricsWindow,
    ) -> Result<Option<crate::runtime::Traffic>, RuntimeError> {
        self.kube_traffic(app, service, window).await.map(Some)
    }

    fn capabilities(&self) -> crate::runtime::Capabilities {
        crate::runtime::Capabilities {
            resumes_builds: true,
            runs_timers: true,
            restores_on_start: false,
            restores_resource_data: true,
            restores_redis: true,
            runs_rack_resources: true,
            transfers_builds: true,
        }
    }

    fn process_logs(&self, request: super::ProcessLogs) -> Option<super::LineStream> {
        Some(logs::stream(self, request))
    }

    #[tracing::instrument(skip_all, fields(app.name = %job.app, build.id = %job.id))]
    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure> {
        build::run(self, job, log).await
    }

    async fn cancel_build(&self, app: &str, id: &str) -> Result<(), RuntimeError> {
        build::cancel(self, app, id).await
    }

    #[tracing::instrument(skip_all, fields(app.name = %app, release.id = release.map_or("", |r| r.id.as_str())))]
    async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError> {
        rollout::apply(self, app, release, log).await
    }

    async fn instances(&self) -> Result<Vec<crate::runtime::InstanceInfo>, RuntimeError> {
        nodes::list(&self.0.client).await
    }

    async fn processes(&self, app: &str) -> Result<Vec<ProcessInfo>, RuntimeError> {
        let pods: Api<Pod> = self.api(app);
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app},type in (service,process,timer)")))
            .await
            .map_err(RuntimeError::kube(format!("listing the pods of {app}")))?;
        let mut processes: Vec<_> = list.items.iter().filter_map(|pod| process_info(app, pod)).collect();
        processes.sort_by(|a, b| (&a.name, a.started, &a.id).cmp(&(&b.name, b.started, &b.id)));
        Ok(processes)
    }

    async fn restart_process(&self, app: &str, id: &str) -> Result<(), RuntimeError> {
        let pods: Api<Pod> = self.api(app);
        let gone = || RuntimeError::NoProcess(id.to_owned());
        // Only the app's service and one-off pods are processes (not its build pods). Deleting
        // a service pod restarts it (its Deployment makes another); a one-off's is gone.
        let pod = pods
            .get_opt(id)
            .await
            .map_err(RuntimeError::kube(format!("reading pod {id}")))?;
        if pod.is_none_or(|pod| process_info(app, &pod).is_none()) {
            return Err(gone());
        }
        match pods.delete(id, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Err(gone()),
            Err(e) => Err(RuntimeError::kube(format!("deleting pod {id}"))(e)),
        }
    }

    async fn run(&self, release: &ReleaseSpec, one_off: OneOff) -> Result<ProcessInfo, RuntimeError> {
        let name = process::run(self, release, &one_off).await?;
        let pods: Api<Pod> = self.api(&release.app);
        let pod = pods
            .get(&name)
            .await
            .map_err(RuntimeError::kube(format!("reading pod {name}")))?;
        process_info(&release.app, &pod).ok_or_else(|| RuntimeError::Failed(format!("pod {name} is not a process")))
    }

    async fn wait_process(&self, app: &str, id: &str) -> Result<i32, RuntimeError> {
        process::wait(&self.api(app), id).await
    }

    async fn exec(&self, app: &str, id: &str, request: ExecRequest) -> Result<ExecSession, RuntimeError> {
        process::exec(&self.api(app), id, request).await
    }

    async fn export_build(
        &self,
        app: &str,
        id: &str,
        images: &[String],
        scratch: &std::path::Path,
    ) -> Result<crate::runtime::ExportedBuild, RuntimeError> {
        build_transfer::export(self, app, id, images, scratch).await
    }

    async fn import_build(
        &self,
        app: &str,
        id: &str,
        _files: &std::path::Path,
        images: Option<&std::path::Path>,
        images_by_service: &std::collections::BTreeMap<String, String>,
    ) -> Result<std::collections::BTreeMap<String, String>, RuntimeError> {
        build_transfer::import(self, app, id, images, images_by_service).await
    }

    async fn prune_builds(&self, app: &str, ids: &[crate::ids::BuildId]) -> Result<(), RuntimeError> {
        let jobs: Api<Job> = self.api(app);
        let mut first_failure = Ok(());
        for id in ids {
            first_failure = first_failure.and(delete(&jobs, &resources::build_job_name(id)).await);
        }
        first_failure
    }

    /// Sends the RDB file into the resource's pod and restarts redis on it (`redis_import`).
    async fn restore_redis(
        &self,
        app: &str,
        spec: &crate::resource::ResourceSpec,
        rdb: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        redis_import::restore(self, databases::owner_app(app), &spec.name, rdb).await
    }

    #[tracing::instrument(skip_all, fields(app.name = %app))]
    /// Removes the resource's StatefulSet, Service, Secret and volume claims (its data).
    async fn delete_resource(&self, app: &str, name: &str) -> Result<(), RuntimeError> {
        database_rollout::delete_resource(self, databases::owner_app(app), name).await
    }

    /// Runs it in the rack's namespace, `<rack>-system`, as the StatefulSet of an app's
    /// resource is run; bounded, since a request waits on it.
    async fn ensure_rack_resource(
        &self,
        spec: &crate::resource::ResourceSpec,
        _restart: bool,
    ) -> Result<(), RuntimeError> {
        // A changed spec rolls the pod by itself; an unchanged one needs no restart.
        database_rollout::ensure_rack(self, spec).await
    }

    /// Its Service's in-cluster name and the kind's port, as the Secret tells linked pods
    /// (no port-forward is opened to say so).
    async fn resource_address(&self, app: &str, name: &str, kind: crate::resource::Kind) -> Option<(String, u16)> {
        Some((
            databases::host(&self.0.settings.rack, databases::owner_app(app), name),
            kind.default_port(),
        ))
    }

    /// A port on 127.0.0.1 that port-forwards each connection to the resource's pod, while the
    /// guard lives.
    async fn dump_resource(
        &self,
        app: &str,
        name: &str,
        kind: crate::resource::Kind,
        credentials: &crate::resource::Credentials,
    ) -> Result<Option<crate::runtime::ByteStream>, RuntimeError> {
        resource_dump::dump(self, app, name, kind, credentials).await
    }

    async fn resource_endpoint(&self, app: &str, name: &str) -> Result<crate::runtime::ResourceEndpoint, RuntimeError> {
        let (addr, guard) = database_rollout::endpoint(self, databases::owner_app(app), name).await?;
        Ok(crate::runtime::ResourceEndpoint {
            addr,
            guard: Some(Box::new(guard)),
        })
    }

    async fn delete_app(&self, app: &str) -> Result<(), RuntimeError> {
        let namespaces: Api<Namespace> = Api::all(self.0.client.clone());
        let name = self.namespace(app);
        // Exports a restore left for its resources go with the app.
        resource_restore::forget_all(&self.0.settings.data_dir, app, None);
        // A namespace rack did not make is left alone.
        if !self.owned_namespace(app).await? {
            return Ok(());
        }
        delete(&namespaces, &name).await?;
        tracing::info!(app.name = app, "deleting namespace {name}");
        Ok(())
    }

    fn app_router(&self, _app: &str) -> String {
        // The ingress controller, which the rack's wildcard domain points at (as convox's
        // `router.<domain>`): what custom domains are CNAMEs of.
        self.0
            .settings
            .config
            .ingress
            .domain
            .as_ref()
            .map(|domain| format!("router.{domain}"))
            .unwrap_or_default()
    }

    fn service_route(
        &self,
        app: &str,
        name: &str,
        service: &crate::manifest::Service,
        env: &crate::env::Env,
    ) -> Option<super::ServiceRoute> {
        let port = service.port?;
        let ingress = &self.0.settings.config.ingress;
        let hosts = resources::ingress_hosts(ingress, app, name, service, env).unwrap_or_default();
        if hosts.is_empty() {
            // Internal (or no host configured): reached inside the cluster only, by its Service.
            return Some(super::ServiceRoute {
                hosts: vec![format!("{name}.{}.svc.cluster.local", self.namespace(app))],
                port,
            });
        }
        let port = if ingress.cert_issuer.is_some() { 443 } else { 80 };
        Some(super::ServiceRoute { hosts, port })
    }

    async fn balancers(&self, app: &str) -> Result<Vec<super::BalancerInfo>, RuntimeError> {
        let services: Api<k8s_openapi::api::core::v1::Service> = self.api(app);
        let list = services
            .list(&ListParams::default().labels(&resources::selector(app, "balancer")))
            .await
            .map_err(RuntimeError::kube("listing balancers"))?;
        let mut balancers: Vec<super::BalancerInfo> = list.items.iter().map(balancer_info).collect();
        balancers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(balancers)
    }
}

/// A balancer's Service as convox shows it: its address from the cloud's load balancer.
fn balancer_info(service: &k8s_openapi::api::core::v1::Service) -> super::BalancerInfo {
    let labels = service.metadata.labels.clone().unwrap_or_default();
    let endpoint = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|ingress| ingress.first())
        .and_then(|first| first.hostname.clone().or_else(|| first.ip.clone()))
        .unwrap_or_default();
    let ports = service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .map(|port| super::BalancerPortInfo {
            protocol: port.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            source: u16::try_from(port.port).unwrap_or_default(),
            target: match &port.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    u16::try_from(*n).unwrap_or_default()
                }
                _ => 0,
            },
        })
        .collect();
    super::BalancerInfo {
        name: labels.get("balancer").cloned().unwrap_or_default(),
        service: labels.get("service").cloned().unwrap_or_default(),
        endpoint,
        ports,
    }
}

/// A pod of a service as a convox process.
fn process_info(app: &str, pod: &Pod) -> Option<ProcessInfo> {
    let labels = pod.metadata.labels.as_ref()?;
    let kind = match labels.get("type").map(String::as_str) {
        Some("service") => ProcessKind::Service,
        // A timer's run is a one-off process of its service.
        Some("process" | "timer") => ProcessKind::Run,
        _ => return None,
    };
    let spec = pod.spec.as_ref()?;
    let status = pod.status.clone().unwrap_or_default();
    let container = spec.containers.first()?;
    let state = status
        .container_statuses
        .as_ref()
        .and_then(|s| s.first())
        .and_then(|s| s.state.clone())
        .unwrap_or_default();
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let waiting = state
        .waiting
        .as_ref()
        .and_then(|w| w.reason.clone())
        .unwrap_or_default();
    let status_now = if pod.metadata.deletion_timestamp.is_some() {
        ProcessStatus::Stopping
    } else if kind == ProcessKind::Run && status.phase.as_deref() == Some("Succeeded") {
        ProcessStatus::Complete
    } else if kind == ProcessKind::Run && status.phase.as_deref() == Some("Failed") {
        ProcessStatus::Failed
    } else if kind == ProcessKind::Run && status.phase.as_deref() == Some("Running") {
        ProcessStatus::Running
    } else if kind == ProcessKind::Run {
        ProcessStatus::Pending
    } else if waiting == "CrashLoopBackOff" || state.terminated.is_some() {
        ProcessStatus::Crashed
    } else if status.phase.as_deref() == Some("Running") && ready {
        ProcessStatus::Running
    } else if status.phase.as_deref() == Some("Running") {
        ProcessStatus::Unhealthy
    } else {
        ProcessStatus::Starting
    };
    let command = container.command.clone().unwrap_or_default();
    let command = match command.as_slice() {
        [sh, c, text] if sh == "/bin/sh" && c == "-c" => text.clone(),
        argv => argv.join(" "),
    };
    Some(ProcessInfo {
        id: pod.metadata.name.clone()?,
        app: app.to_owned(),
        command,
        cpu: 0.0,
        memory: 0.0,
        host: status.pod_ip.clone().unwrap_or_default(),
        image: container.image.clone().unwrap_or_default(),
        instance: spec.node_name.clone().unwrap_or_default(),
        name: labels.get("service").cloned().unwrap_or_default(),
        ports: container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port.to_string())
            .collect(),
        release: labels.get("release").cloned().unwrap_or_default(),
        started: status
            .start_time
            .as_ref()
            .or(pod.metadata.creation_timestamp.as_ref())
            .and_then(time)
            .unwrap_or_else(chrono::Utc::now),
        status: status_now,
        pid: 0,
        kind,
    })
}

/// A Kubernetes time as a chrono one.
pub(super) fn time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.0.as_second(), u32::try_from(t.0.subsec_nanosecond()).unwrap_or(0))
}

#[cfg(test)]
#[path = "mod_tests.rs"]
mod tests;
