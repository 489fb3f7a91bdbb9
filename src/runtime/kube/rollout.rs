//! Rolling a release out on Kubernetes: server-side apply of each service's Deployment (and
//! Service), removal of services the release no longer has, then a watch until every
//! Deployment has rolled out (see `watch`), with the namespace's Events written to the deploy log as they
//! come. A crash-looping or unpullable new pod, or a Deployment past its progress deadline,
//! fails the rollout at once (the deploy job then re-applies the previous release). Once rolled
//! out, a deployment's own release is watched for its analysis window (`analysis.rs`).
//!
//! Applying is idempotent: a replica that takes a deployment over applies the same objects
//! again (nothing changes, no new ReplicaSet) and goes on watching from where the cluster is.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;

use super::events::Forwarder;
use super::resources::{self, MANAGER, ServiceTarget};
use super::watch::Watch;
use super::{KubeRuntime, delete};
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// How long a rollout waits for the event watch to start, and for the last events at its end.
const WATCH_PATIENCE: Duration = Duration::from_secs(10);

/// Waiting reasons of a new pod that will not fix themselves.
const FATAL_WAITING: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Messages of those reasons that the kubelet reports while it is still catching up, and retries
/// by itself: its secret and configmap caches time out on a busy node ("failed to sync secret
/// cache: timed out waiting for the condition") and then sync. Failing the rollout on them rolled
/// back good releases (seen in CI on a loaded 2-core machine); a real misconfiguration still
/// ends the rollout, by its own message or by the progress deadline.
const TRANSIENT_MESSAGES: &[&str] = &["failed to sync secret cache", "failed to sync configmap cache"];

pub async fn apply(
    runtime: &KubeRuntime,
    app: &str,
    release: Option<&ReleaseSpec>,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    let rt = &runtime.0.settings;
    runtime.ensure_namespace(app).await?;
    // Watching starts before anything is applied, so every event the rollout causes is logged.
    let forwarder = Forwarder::start(runtime.api::<Event>(app), log.clone(), WATCH_PATIENCE).await;

    let deployments: Api<Deployment> = runtime.api(app);
    let services: Api<Service> = runtime.api(app);
    let ingresses: Api<Ingress> = runtime.api(app);
    // Certificates given with `ssl update` (`certificates.rs`).
    let secrets: Api<Secret> = runtime.api(app);
    let params = PatchParams::apply(MANAGER).force();
    let mut wanted = BTreeSet::new();
    let by_app = ListParams::default().labels(&resources::selector(app, "service"));
    if let Some(release) = release {
        // The private registries' pull secret before any pod that pulls with it.
        super::registries::apply(runtime, app).await?;
        // Resources first: a service that links one starts with it ready.
        super::database_rollout::apply(runtime, app, release, log).await?;
        for (name, service) in &release.manifest.services {
            let target = ServiceTarget {
                rack: &rt.rack,
                registry: &rt.config.registry,
                name,
                service,
            };
            let body = resources::deployment(&target, release, service.scale.count_min)?;
            drop_stale_probe(&deployments, name, &body).await?;
            deployments
                .patch(name, &params, &Patch::Apply(body))
                .await
                .map_err(RuntimeError::kube(format!("applying deployment {name}")))?;
            match service.port {
                Some(port) => {
                    services
                        .patch(
                            name,
                            &params,
                            &Patch::Apply(resources::service(&rt.rack, app, name, port)),
                        )
                        .await
                        .map_err(RuntimeError::kube(format!("applying service {name}")))?;
                }
                None => {
                    delete(&services, name).await?;
                    // Nothing to serve a certificate for (rack forgets its use too).
                    delete(&secrets, &super::certificates::secret_name(name)).await?;
                }
            }
            // The Ingress points at the Service, whose selector follows the pods that are
            // ready, so it switches with the rollout and never ahead of it.
            let hosts = resources::ingress_hosts(&rt.config.ingress, app, name, service, &release.env)?;
            match service.port.filter(|_| !hosts.is_empty()) {
                Some(port) => {
                    let certificate = super::certificates::secret_of(runtime, app, name).await?;
                    let body = resources::ingress(
                        &rt.rack,
                        app,
                        name,
                        port,
                        &hosts,
                        &rt.config.ingress,
                        certificate.as_deref(),
                    );
                    ingresses
                        .patch(name, &params, &Patch::Apply(body))
                        .await
                        .map_err(RuntimeError::kube(format!("applying ingress {name}")))?;
                }
                None => delete(&ingresses, name).await?,
            }
            wanted.insert(name.clone());
        }
    }
    apply_balancers(runtime, app, release, log).await?;
    if release.is_none() {
        apply_timers(runtime, app, None, log).await?;
    }
    let existing = deployments
        .list(&by_app)
        .await
        .map_err(RuntimeError::kube("listing deployments"))?;
    for deployment in existing.items {
        let Some(name) = deployment.metadata.name else { continue };
        if !wanted.contains(&name) {
            log.line(&crate::stream_names::atom("k8s"), format!("Removing service {name}"))
                .await;
            delete(&deployments, &name).await?;
            delete(&services, &name).await?;
            delete(&ingresses, &name).await?;
            delete(&secrets, &super::certificates::secret_name(&name)).await?;
        }
    }

    let mut result = wait(runtime, app, release, &wanted).await;
    // Judged by what the cluster tells of the new pods (`analysis.rs`): only a deployment's own
    // release, and only the services that replaced an earlier one (read from the ReplicaSets,
    // so a replica that took the deployment over judges it too).
    if result.is_ok()
        && let Some(release) = release.filter(|r| r.analyse)
    {
        result = match super::analysis::replaced(runtime, app, release).await {
            Ok(replaced) => {
                let judged: BTreeMap<String, super::analysis::Judged> = release
                    .manifest
                    .services
                    .iter()
                    .filter_map(|(name, s)| {
                        Some((
                            name.clone(),
                            super::analysis::Judged {
                                settings: s.deployment.analysis?,
                                previous: replaced.get(name)?.clone(),
                            },
                        ))
                    })
                    .collect();
                super::analysis::judge(runtime, app, release, &judged, log).await
            }
            Err(e) => Err(e),
        };
    }
    // Timers switch to a release once it runs: a rollout that fails (and is rolled back) never
    // moved them.
    if result.is_ok()
        && let Some(release) = release
    {
        result = apply_timers(runtime, app, Some(release), log).await;
    }
    // The last events trail the status that ended the wait.
    forwarder.finish(WATCH_PATIENCE).await;
    result
}

/// Applies the release's balancers (Services of type LoadBalancer) and removes the app's others.
async fn apply_balancers(
    runtime: &KubeRuntime,
    app: &str,
    release: Option<&ReleaseSpec>,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    let services: Api<Service> = runtime.api(app);
    let params = PatchParams::apply(MANAGER).force();
    let mut wanted = BTreeSet::new();
    for (name, balancer) in release.iter().flat_map(|r| &r.manifest.balancers) {
        let object = resources::balancer_name(name);
        let body = resources::balancer_service(&runtime.0.settings.rack, app, name, balancer);
        services
            .patch(&object, &params, &Patch::Apply(body))
            .await
            .map_err(RuntimeError::kube(format!("applying balancer {name}")))?;
        wanted.insert(object);
    }
    remove_others(&services, &resources::selector(app, "balancer"), &wanted, log).await
}

/// Applies the release's timers (CronJobs) and removes the app's others (with their runs).
async fn apply_timers(
    runtime: &KubeRuntime,
    app: &str,
    release: Option<&ReleaseSpec>,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    let rt = &runtime.0.settings;
    let cronjobs = runtime.cronjobs(app).await?;
    let params = PatchParams::apply(MANAGER).force();
    let mut wanted = BTreeSet::new();
    if let Some(release) = release {
        for (name, timer) in &release.manifest.timers {
            let service = release.manifest.services.get(&timer.service).ok_or_else(|| {
                RuntimeError::Failed(format!(
                    "timers.{name}: release {} has no service {}",
                    release.id, timer.service
                ))
            })?;
            let target = ServiceTarget {
                rack: &rt.rack,
                registry: &rt.config.registry,
                name: &timer.service,
                service,
            };
            let object = resources::timer_name(name);
            let body = resources::timer_cronjob(&target, release, name, timer, &cronjobs.version)?;
            cronjobs
                .api
                .patch(&object, &params, &Patch::Apply(body))
                .await
                .map_err(RuntimeError::kube(format!("applying timer {name}")))?;
            wanted.insert(object);
        }
    }
    remove_others(&cronjobs.api, &resources::selector(app, "timer"), &wanted, log).await
}

/// Deletes the objects `selector` finds that are not `wanted` (what a release no longer has),
/// saying so in the log.
async fn remove_others<K>(
    api: &Api<K>,
    selector: &str,
    wanted: &BTreeSet<String>,
    log: &LogSink,
) -> Result<(), RuntimeError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let existing = api
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(RuntimeError::kube(format!("listing {selector}")))?;
    for object in existing.items {
        let Some(name) = object.meta().name.clone() else {
            continue;
        };
        if !wanted.contains(&name) {
            log.line(&crate::stream_names::atom("k8s"), format!("Removing {name}"))
                .await;
            delete(api, &name).await?;
        }
    }
    Ok(())
}

/// Removes the live Deployment's readiness probe when the release's has none (its service lost
/// its port or its health check). A server-side apply that leaves the probe out does not remove
/// all of it on Kubernetes 1.20: defaulted parts stay, and the merged Deployment is refused
/// (`readinessProbe: must specify a handler type`).
async fn drop_stale_probe(
    deployments: &Api<Deployment>,
    name: &str,
    body: &serde_json::Value,
) -> Result<(), RuntimeError> {
    if body["spec"]["template"]["spec"]["containers"][0]
        .get("readinessProbe")
        .is_some()
    {
        return Ok(());
    }
    let live = deployments
        .get_opt(name)
        .await
        .map_err(RuntimeError::kube(format!("reading deployment {name}")))?;
    let has_probe = live
        .and_then(|d| d.spec)
        .and_then(|s| s.template.spec)
        .is_some_and(|s| s.containers.first().is_some_and(|c| c.readiness_probe.is_some()));
    if has_probe {
        // A strategic merge patch: `null` removes the field; containers merge by name.
        let patch = serde_json::json!({
            "spec": { "template": { "spec": { "containers": [
                { "name": resources::CONTAINER, "readinessProbe": null }
            ] } } }
        });
        deployments
            .patch(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .map_err(RuntimeError::kube(format!(
                "removing the readiness probe of deployment {name}"
            )))?;
    }
    Ok(())
}

/// Waits until every Deployment in `wanted` has rolled out, or one of them cannot. The
/// Deployments and the new release's pods are watched (one list and one watch request each,
/// however long the rollout takes), and looked at again on every change.
async fn wait(
    runtime: &KubeRuntime,
    app: &str,
    release: Option<&ReleaseSpec>,
    wanted: &BTreeSet<String>,
) -> Result<(), RuntimeError> {
    let mut deployments = Watch::start(
        runtime.api::<Deployment>(app),
        watcher::Config::default().labels(&resources::selector(app, "service")),
        format!("the deployments of {app}"),
    );
    // Without a release there are no new pods to look at: the selector matches none.
    let release_id = release.map_or("none", |r| r.id.as_str());
    let mut pods = Watch::start(
        runtime.api::<Pod>(app),
        watcher::Config::default().labels(&format!("app={app},type=service,release={release_id}")),
        format!("the pods of {app}"),
    );
    loop {
        let (listed, new_pods) = (deployments.current(), pods.current());
        if listed.listed && new_pods.listed {
            let relevant: Vec<&Deployment> = wanted.iter().filter_map(|name| listed.objects.get(name)).collect();
            if relevant.len() == wanted.len() && relevant.iter().all(|d| rolled_out(d)) {
                return Ok(());
            }
            if let Some(reason) = relevant.iter().find_map(|d| stalled(d)) {
                return Err(RuntimeError::Failed(reason));
            }
            if let Some(reason) = new_pods.objects.values().find_map(failing_pod) {
                return Err(RuntimeError::Failed(reason));
            }
        }
        tokio::select! {
            changed = deployments.changed() => changed?,
            changed = pods.changed() => changed?,
        }
    }
}

/// Whether a Deployment has finished rolling out: the controller has seen its latest spec, and
/// every replica runs that spec and is available, with no old ones left.
pub fn rolled_out(deployment: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&deployment.spec, &deployment.status) else {
        return false;
    };
    let desired = spec.replicas.unwrap_or(1);
    let generation = deployment.metadata.generation.unwrap_or(0);
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) == desired
        && status.replicas.unwrap_or(0) == desired
        && status.available_replicas.unwrap_or(0) == desired
}

/// Why a Deployment will not finish on its own: it is past its progress deadline. A condition
/// the controller set before it saw the latest spec (a previous rollout's) does not count.
pub fn stalled(deployment: &Deployment) -> Option<String> {
    let name = deployment.metadata.name.as_deref().unwrap_or_default();
    let status = deployment.status.as_ref()?;
    if status.observed_generation.unwrap_or(0) < deployment.metadata.generation.unwrap_or(0) {
        return None;
    }
    let conditions = status.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| {
            c.type_ == "Progressing" && c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| {
            format!(
                "deployment {name} exceeded its progress deadline: {}",
                c.message.as_deref().unwrap_or_default()
            )
        })
}

/// Why a pod of the new release cannot become ready.
pub fn failing_pod(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|status| {
        let waiting = status.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        let message = waiting.message.as_deref().unwrap_or_default();
        let transient = TRANSIENT_MESSAGES.iter().any(|t| message.contains(t));
        (FATAL_WAITING.contains(&reason) && !transient).then(|| {
            let message = waiting.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
            format!("pod {name} is failing ({reason}){message}")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "web", "generation": 2 },
            "spec": { "replicas": 2, "selector": {}, "template": {} },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn rolled_out_needs_every_replica_new_and_available() {
        let done = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2});
        assert!(rolled_out(&deployment(done)));
        let old_left = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2});
        assert!(!rolled_out(&deployment(old_left)));
        let unseen = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2});
        assert!(!rolled_out(&deployment(unseen)));
        let unready = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1});
        assert!(!rolled_out(&deployment(unready)));
    }

    #[test]
    fn a_progress_deadline_stalls_the_rollout() {
        let d = deployment(json!({"observedGeneration": 2, "conditions": [{
            "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet \"web-5d9\" has timed out progressing."
        }]}));
        assert_eq!(
            stalled(&d).unwrap(),
            "deployment web exceeded its progress deadline: ReplicaSet \"web-5d9\" has timed out progressing."
        );
        assert_eq!(stalled(&deployment(json!({}))), None);
        let mut old = d.clone();
        old.status.as_mut().unwrap().observed_generation = Some(1);
        assert_eq!(stalled(&old), None, "a previous rollout's condition");
    }

    #[test]
    fn crash_looping_pods_fail_the_rollout() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": "web-5d9-abc" },
            "status": { "containerStatuses": [{
                "name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 4,
                "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container" } }
            }]}
        }))
        .unwrap();
        assert_eq!(
            failing_pod(&pod).unwrap(),
            "pod web-5d9-abc is failing (CrashLoopBackOff): back-off 40s restarting failed container"
        );
        let mut starting = pod.clone();
        starting.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0].state =
            serde_json::from_value(json!({ "waiting": { "reason": "ContainerCreating" } })).unwrap();
        assert_eq!(failing_pod(&starting), None);
    }

    #[test]
    fn a_kubelet_still_syncing_its_secrets_is_waited_for() {
        let waiting = |message: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": { "name": "resource-cache-0" },
                "status": { "containerStatuses": [{
                    "name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                    "state": { "waiting": { "reason": "CreateContainerConfigError", "message": message } }
                }]}
            }))
            .unwrap()
        };
        let syncing = waiting("failed to sync secret cache: timed out waiting for the condition");
        assert_eq!(failing_pod(&syncing), None);
        let missing = waiting("secret \"resource-cache\" not found");
        assert_eq!(
            failing_pod(&missing).unwrap(),
            "pod resource-cache-0 is failing (CreateContainerConfigError): secret \"resource-cache\" not found"
        );
    }
}
