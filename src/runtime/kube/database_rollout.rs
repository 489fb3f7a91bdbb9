//! Running a release's resources (its databases and caches) on Kubernetes: their Secret,
//! Service and StatefulSet (see `databases`) applied with server-side apply before any
//! Deployment of the release, and watched until each one's pod is ready, with
//! `system/k8s/resource/<name>` lines on the deployment's log. Nothing here ever prunes: a
//! resource a release stops declaring keeps running with its data, until `delete_resource` (or
//! the app's namespace) removes it.
//!
//! Rack-wide resources (`POST /resources`) are the same objects in the namespace of the pseudo-app
//! `system` (`ensure_rack`); an app linked to one gets a copy of its Secret (`apply_links`).
//!
//! Also what the API needs to reach one (`endpoint`: a port-forward to its pod, on 127.0.0.1).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret, Service};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;

use super::databases::{self, object_name};
use super::resource_restore::{self, Plan};
use super::resources::MANAGER;
use super::rollout::failing_pod;
use super::watch::Watch;
use super::{KubeRuntime, delete};
use crate::resource::ResourceSpec;
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// The log stream of resource `name`.
fn stream(name: &str) -> String {
    crate::stream_names::resource("k8s", name)
}

/// Applies every resource of `release` and waits until each is ready (bounded by the caller,
/// which drops this at the deployment's deadline, as it does the rollout's wait).
pub async fn apply(runtime: &KubeRuntime, app: &str, release: &ReleaseSpec, log: &LogSink) -> Result<(), RuntimeError> {
    let all = release.resources.keys().cloned().collect();
    apply_links(runtime, app, release, true).await?;
    apply_some(runtime, app, &release.resources, all, false, log).await
}

/// The rack-wide resources a service of `release` names that the app does not declare itself.
fn linked_rack_resources(release: &ReleaseSpec) -> impl Iterator<Item = &ResourceSpec> {
    release.rack_linked.values().filter(|spec| {
        !release.resources.contains_key(&spec.name)
            && release
                .manifest
                .services
                .values()
                .any(|s| s.resources.contains(&spec.name))
    })
}

/// Copies into the app's namespace the Secret of each rack-wide resource its services link
/// (`databases::linked_secret`); with `prune`, removes the copies of those no longer linked
/// (unlinked with `rack rack resources unlink`, or no longer named), so an app keeps no
/// credentials of a resource it lost.
async fn apply_links(runtime: &KubeRuntime, app: &str, release: &ReleaseSpec, prune: bool) -> Result<(), RuntimeError> {
    let rack = &runtime.0.settings.rack;
    let secrets: Api<Secret> = runtime.api(app);
    let params = PatchParams::apply(MANAGER).force();
    let mut kept = BTreeSet::new();
    for spec in linked_rack_resources(release) {
        let object = object_name(&spec.name);
        secrets
            .patch(
                &object,
                &params,
                &Patch::Apply(databases::linked_secret(rack, app, spec)),
            )
            .await
            .map_err(RuntimeError::kube(format!("applying secret {object}")))?;
        kept.insert(object);
    }
    if !prune {
        return Ok(());
    }
    // Rack may not list an app's Secrets (docker/k8s/rbac.yaml), so the namespace's annotation
    // `LINKS_ANNOTATION` remembers which copies it made.
    let namespaces: Api<Namespace> = Api::all(runtime.0.client.clone());
    let namespace = runtime.namespace(app);
    let before = namespaces
        .get_opt(&namespace)
        .await
        .map_err(RuntimeError::kube(format!("reading namespace {namespace}")))?
        .and_then(|n| n.metadata.annotations?.get(LINKS_ANNOTATION).cloned())
        .unwrap_or_default();
    for name in before.split(',').filter(|n| !n.is_empty()) {
        if !kept.contains(name) {
            delete(&secrets, name).await?;
        }
    }
    let now = kept.into_iter().collect::<Vec<_>>().join(",");
    if now != before {
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": namespace, "annotations": { LINKS_ANNOTATION: now } },
        });
        namespaces
            .patch(
                &namespace,
                &PatchParams::apply(LINKS_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(RuntimeError::kube(format!("annotating namespace {namespace}")))?;
    }
    Ok(())
}

/// The annotation of an app's namespace that lists the Secrets copied there for the rack-wide
/// resources its release links (comma-separated).
const LINKS_ANNOTATION: &str = "convox.com/rack-resource-secrets";

/// The field manager of that annotation (apart from `rack`'s, which applies the namespace
/// without it).
const LINKS_MANAGER: &str = "rack-links";

/// How long creating or updating a rack-wide resource may wait for its pod to be ready (an
/// image to pull, a volume to bind): a request waits on it.
const RACK_RESOURCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Makes sure rack-wide resource `spec` runs in the rack's namespace (`databases::RACK_APP`),
/// applying its objects (a changed spec rolls its pod) and waiting until it is ready, within
/// `RACK_RESOURCE_TIMEOUT`.
pub async fn ensure_rack(runtime: &KubeRuntime, spec: &ResourceSpec) -> Result<(), RuntimeError> {
    tokio::time::timeout(RACK_RESOURCE_TIMEOUT, ensure_rack_untimed(runtime, spec))
        .await
        .unwrap_or_else(|_| {
            Err(RuntimeError::Failed(format!(
                "rack resource {} was not ready within {} s",
                spec.name,
                RACK_RESOURCE_TIMEOUT.as_secs()
            )))
        })
}

async fn ensure_rack_untimed(runtime: &KubeRuntime, spec: &ResourceSpec) -> Result<(), RuntimeError> {
    let app = databases::RACK_APP;
    runtime.ensure_namespace(app).await?;
    let specs = BTreeMap::from([(spec.name.clone(), spec.clone())]);
    let names = BTreeSet::from([spec.name.clone()]);
    // Its lines have no deployment to go to.
    let log = LogSink::new().0;
    apply_some(runtime, app, &specs, names, false, &log).await
}

/// Makes sure the resources that service `service` of `release` links exist and are ready
/// before one of its one-off processes starts: the release phase runs before its release is
/// applied, and needs its database. Creates those that do not exist yet; never changes one
/// that does (a one-off of an older release must not roll a resource back).
pub async fn ensure_linked(
    runtime: &KubeRuntime,
    release: &ReleaseSpec,
    service: &crate::manifest::Service,
    log: Option<&LogSink>,
) -> Result<(), RuntimeError> {
    let linked: BTreeSet<String> = service
        .resources
        .iter()
        .filter(|name| release.resources.contains_key(*name))
        .cloned()
        .collect();
    if service.resources.is_empty() {
        return Ok(());
    }
    apply_links(runtime, &release.app, release, false).await?;
    // Without a log of its own (a `run`), the lines go nowhere.
    let log = log.cloned().unwrap_or_else(|| LogSink::new().0);
    apply_some(runtime, &release.app, &release.resources, linked, true, &log).await
}

/// Applies the resources `names` of `specs` (only those that do not exist yet when
/// `create_only`), then waits until all of `names` are ready.
async fn apply_some(
    runtime: &KubeRuntime,
    app: &str,
    specs: &BTreeMap<String, ResourceSpec>,
    names: BTreeSet<String>,
    create_only: bool,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    if names.is_empty() {
        return Ok(());
    }
    let rack = &runtime.0.settings.rack;
    let secrets: Api<Secret> = runtime.api(app);
    let services: Api<Service> = runtime.api(app);
    let sets: Api<StatefulSet> = runtime.api(app);
    let params = PatchParams::apply(MANAGER).force();
    // The exports a restore left to load into their resources once ready (`resource_restore`).
    let mut loads = Vec::new();
    for name in &names {
        let spec = specs
            .get(name)
            .ok_or_else(|| RuntimeError::Failed(format!("{app} has no resource {name}")))?;
        let object = object_name(name);
        let live = sets
            .get_opt(&object)
            .await
            .map_err(RuntimeError::kube(format!("reading statefulset {object}")))?;
        let plan = restore_plan(runtime, app, spec, live.as_ref());
        match &plan {
            Plan::Load(file) => loads.push((spec, file.clone())),
            Plan::Forget(file) => {
                log.line(
                    &stream(name),
                    "kept its data: it existed before the restore, so the backup's export is not loaded over it",
                )
                .await;
                resource_restore::forget(file);
            }
            Plan::KeepMark | Plan::Nothing => {}
        }
        if create_only && live.is_some() {
            continue;
        }
        let mut storage = databases::storage_gb(spec)?;
        // A StatefulSet's claim templates cannot change: the claim keeps its size.
        if let Some(kept) = live.as_ref().and_then(databases::live_storage_gb)
            && kept != storage
        {
            log.line(
                &stream(name),
                format!("storage stays at {kept} GB: Kubernetes cannot change the size of a resource's volume claim template (asked: {storage} GB)"),
            )
            .await;
            storage = kept;
        }
        // Rendered (and its options checked) before anything is applied.
        let mut body = databases::stateful_set(rack, app, spec, storage)?;
        if plan.marks() {
            resource_restore::mark(&mut body);
        }
        if live.is_none() {
            log.line(&stream(name), "creating").await;
        }
        secrets
            .patch(&object, &params, &Patch::Apply(databases::secret(rack, app, spec)))
            .await
            .map_err(RuntimeError::kube(format!("applying secret {object}")))?;
        services
            .patch(&object, &params, &Patch::Apply(databases::service(rack, app, spec)))
            .await
            .map_err(RuntimeError::kube(format!("applying service {object}")))?;
        let applied = sets
            .patch(&object, &params, &Patch::Apply(body))
            .await
            .map_err(RuntimeError::kube(format!("applying statefulset {object}")))?;
        if let Some(live) = live
            && live.metadata.generation != applied.metadata.generation
        {
            log.line(&stream(name), "updating").await;
        }
    }
    wait(runtime, app, names, log).await?;
    for (spec, file) in loads {
        log.line(&stream(&spec.name), "loading its data from the backup").await;
        resource_restore::load(runtime, app, spec, &file).await?;
        log.line(&stream(&spec.name), "restored from the backup").await;
    }
    Ok(())
}

/// What to do about an export a restore left for resource `spec` of `app` (the rack's own
/// resources are not in backups).
fn restore_plan(runtime: &KubeRuntime, app: &str, spec: &ResourceSpec, live: Option<&StatefulSet>) -> Plan {
    let pending = (app != databases::RACK_APP)
        .then(|| crate::backup::pending_import(&runtime.0.settings.data_dir, app, &spec.name, spec.definition.kind))
        .flatten();
    Plan::of(pending, live)
}

/// Waits until the StatefulSet of each resource in `pending` has its one pod ready with its
/// latest spec (logging `ready` for each as it gets there), or until one of those pods cannot
/// start (an image that cannot be pulled, a server that crash-loops).
async fn wait(
    runtime: &KubeRuntime,
    app: &str,
    mut pending: BTreeSet<String>,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    let selector = format!("app={app},type=resource");
    let mut sets = Watch::start(
        runtime.api::<StatefulSet>(app),
        watcher::Config::default().labels(&selector),
        format!("the resources of {app}"),
    );
    let mut pods = Watch::start(
        runtime.api::<Pod>(app),
        watcher::Config::default().labels(&selector),
        format!("the resource pods of {app}"),
    );
    loop {
        let (listed, pods_now) = (sets.current(), pods.current());
        if listed.listed && pods_now.listed {
            let ready: Vec<String> = pending
                .iter()
                .filter(|name| listed.objects.get(&object_name(name)).is_some_and(is_ready))
                .cloned()
                .collect();
            for name in ready {
                log.line(&stream(&name), "ready").await;
                pending.remove(&name);
            }
            if pending.is_empty() {
                return Ok(());
            }
            let failing = pods_now
                .objects
                .values()
                .filter(|pod| {
                    pod.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("resource"))
                        .is_some_and(|r| pending.contains(r))
                })
                .find_map(failing_pod);
            if let Some(reason) = failing {
                return Err(RuntimeError::Failed(format!("a resource cannot start: {reason}")));
            }
        }
        tokio::select! {
            changed = sets.changed() => changed?,
            changed = pods.changed() => changed?,
        }
    }
}

/// Whether a resource's StatefulSet runs its latest spec on a ready pod: the controller has
/// seen that spec, its one pod has it, and is ready.
pub fn is_ready(set: &StatefulSet) -> bool {
    let (Some(spec), Some(status)) = (&set.spec, &set.status) else {
        return false;
    };
    let desired = spec.replicas.unwrap_or(1);
    status.observed_generation.unwrap_or(0) >= set.metadata.generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) == desired
        && status.ready_replicas.unwrap_or(0) == desired
}

/// Removes resource `name` of `app` and its data: its StatefulSet (and pod), Service, Secret
/// and volume claims. One that is not there is not an error.
pub async fn delete_resource(runtime: &KubeRuntime, app: &str, name: &str) -> Result<(), RuntimeError> {
    let object = object_name(name);
    resource_restore::forget_all(&runtime.0.settings.data_dir, app, Some(name));
    delete(&runtime.api::<StatefulSet>(app), &object).await?;
    delete(&runtime.api::<Service>(app), &object).await?;
    delete(&runtime.api::<Secret>(app), &object).await?;
    // The claims outlive their StatefulSet on purpose (that is how Kubernetes keeps data);
    // deleting the resource is when they go. A claim still mounted goes once its pod has.
    let claims: Api<PersistentVolumeClaim> = runtime.api(app);
    let list = claims
        .list(&ListParams::default().labels(&databases::selector(app, name)))
        .await
        .map_err(RuntimeError::kube(format!(
            "listing the volume claims of resource {name}"
        )))?;
    for claim in list.items {
        if let Some(claim) = claim.metadata.name {
            delete(&claims, &claim).await?;
        }
    }
    Ok(())
}

/// Keeps a resource's port-forward open: dropping it closes the listener and every connection.
#[derive(Debug)]
pub struct EndpointGuard(tokio::task::JoinHandle<()>);

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An address on 127.0.0.1 that reaches resource `name` of `app` while the guard lives: each
/// connection to it is a port-forward to the resource's pod, through the API server.
///
/// # Errors
/// When the app has no such resource, or its pod is not running.
pub async fn endpoint(
    runtime: &KubeRuntime,
    app: &str,
    name: &str,
) -> Result<(SocketAddr, EndpointGuard), RuntimeError> {
    forward(&runtime.api::<Service>(app), runtime.api::<Pod>(app), app, name).await
}

/// The pod of resource `name` of `owner` (an app, or the rack's own), if it is running.
///
/// # Errors
/// When it is not running, or the cluster cannot be asked.
pub async fn running_pod(pods: &Api<Pod>, owner: &str, name: &str) -> Result<String, RuntimeError> {
    let pod = databases::pod_name(name);
    let running = pods
        .get_opt(&pod)
        .await
        .map_err(RuntimeError::kube(format!("reading pod {pod}")))?
        .and_then(|p| p.status?.phase)
        .is_some_and(|phase| phase == "Running");
    if running {
        Ok(pod)
    } else {
        Err(RuntimeError::Failed(format!(
            "resource {name} of {owner} is not running"
        )))
    }
}

/// [`endpoint`] with the Services and Pods of the app's namespace given.
///
/// # Errors
/// When the app has no such resource, or its pod is not running.
pub async fn forward(
    services: &Api<Service>,
    pods: Api<Pod>,
    app: &str,
    name: &str,
) -> Result<(SocketAddr, EndpointGuard), RuntimeError> {
    let object = object_name(name);
    let service = services
        .get_opt(&object)
        .await
        .map_err(RuntimeError::kube(format!("reading service {object}")))?
        .ok_or_else(|| RuntimeError::Failed(format!("app {app} has no resource {name}")))?;
    let port = service
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().map(|p| p.port))
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| RuntimeError::Failed(format!("service {object} has no port")))?;
    let pod = running_pod(&pods, app, name).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(RuntimeError::io("listening on 127.0.0.1"))?;
    let addr = listener
        .local_addr()
        .map_err(RuntimeError::io("reading the listener's address"))?;
    let task = tokio::spawn(async move {
        // Connections end with the guard: the accept loop owns them.
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let (pods, pod) = (pods.clone(), pod.clone());
            connections.spawn(async move {
                let mut forwarder = match pods.portforward(&pod, &[port]).await {
                    Ok(forwarder) => forwarder,
                    Err(e) => {
                        tracing::warn!("port-forward to pod {pod}: {}", super::describe(&e));
                        return;
                    }
                };
                if let Some(mut upstream) = forwarder.take_stream(port) {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                forwarder.abort();
            });
            // Reap the connections that have ended.
            while connections.try_join_next().is_some() {}
        }
    });
    Ok((addr, EndpointGuard(task)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(status: serde_json::Value) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": { "name": "resource-db", "generation": 2 },
            "spec": { "replicas": 1, "selector": {}, "serviceName": "resource-db", "template": {} },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_resource_is_ready_when_its_latest_pod_is() {
        assert!(is_ready(&set(
            json!({ "observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1 })
        )));
        assert!(!is_ready(&set(
            json!({ "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1 })
        )));
        assert!(!is_ready(&set(
            json!({ "observedGeneration": 2, "replicas": 1, "updatedReplicas": 0, "readyReplicas": 1 })
        )));
        assert!(!is_ready(&set(
            json!({ "observedGeneration": 2, "replicas": 1, "updatedReplicas": 1 })
        )));
    }
}
