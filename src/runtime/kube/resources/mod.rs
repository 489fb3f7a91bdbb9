//! The Kubernetes objects rack writes, as plain functions of a release or build: namespaces,
//! Deployments, Services and build Jobs. Kept free of I/O so their shape is unit-tested.

use serde_json::{Value, json};

use crate::manifest::{Command, Service};
use crate::runtime::{ReleaseSpec, RuntimeError};

mod build_job;
mod ingress;

pub use build_job::{BuildSpec, DOCKER_CONFIG_KEY, ServiceBuild, build_job, build_secret, builder_docker_config};
pub use ingress::{certificate_secret, ingress, ingress_hosts};

/// The field manager of every server-side apply rack makes.
pub const MANAGER: &str = "rack";
/// The Secret (type kubernetes.io/dockerconfigjson) an app namespace may hold with the
/// registry's credentials: builders push with it, pods pull with it.
pub const REGISTRY_SECRET: &str = "rack-registry";
/// The Secret (type kubernetes.io/dockerconfigjson) rack applies in each app namespace with
/// the private registries of `convox registries add` (see `kube/registries.rs`).
pub const REGISTRIES_SECRET: &str = "rack-registries";
/// The container name of every service (what `Started container main` refers to).
pub const CONTAINER: &str = "main";

/// The namespace of `app` in rack `rack`.
pub fn namespace_name(rack: &str, app: &str) -> String {
    format!("{rack}-{app}")
}

/// A Kubernetes object name for a build id (ids are upper case; names may not be).
pub fn build_job_name(build_id: &str) -> String {
    format!("build-{}", build_id.to_ascii_lowercase())
}

/// The image a build pushes for `service`: `<registry>/<app>:<service>.<build id>`.
pub fn image_ref(registry: &str, app: &str, service: &str, build_id: &str) -> String {
    format!("{registry}/{app}:{service}.{build_id}")
}

/// Labels every object of `app` carries (convox's), so rack finds them again.
fn app_labels(rack: &str, app: &str) -> serde_json::Map<String, Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("system".into(), "convox".into());
    labels.insert("rack".into(), rack.into());
    labels.insert("app".into(), app.into());
    labels
}

/// The label selector of everything of one kind (`service`, `build`) of an app.
pub fn selector(app: &str, kind: &str) -> String {
    format!("app={app},type={kind}")
}

/// The namespace of an app.
pub fn namespace(rack: &str, app: &str) -> Value {
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "app".into());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": namespace_name(rack, app), "labels": labels },
    })
}

/// The RoleBinding that gives rack's own service account the `rack-app` rights in an app's
/// namespace (see docker/k8s/rbac.yaml).
pub fn role_binding(rack: &str, app: &str, account: &(String, String)) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": "rack",
            "namespace": namespace_name(rack, app),
            "labels": app_labels(rack, app),
        },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "rack-app" },
        "subjects": [{ "kind": "ServiceAccount", "namespace": account.0, "name": account.1 }],
    })
}

/// Everything the Deployment of one service needs besides the release.
#[derive(Debug, Clone)]
pub struct ServiceTarget<'a> {
    pub rack: &'a str,
    pub registry: &'a str,
    pub name: &'a str,
    pub service: &'a Service,
}

/// The image a release runs for a service: the manifest's `image`, else what its build pushed.
pub fn service_image(target: &ServiceTarget<'_>, release: &ReleaseSpec) -> String {
    match &target.service.image {
        Some(image) => image.clone(),
        None => image_ref(target.registry, &release.app, target.name, &release.build_id),
    }
}

/// The pull secrets of every pod of an app: the operator's `rack-registry` (RACK_REGISTRY's
/// credentials) and rack's `rack-registries`. Either may be absent: the kubelet pulls with those
/// that exist.
pub fn pull_secrets() -> Value {
    json!([{ "name": REGISTRY_SECRET }, { "name": REGISTRIES_SECRET }])
}

/// The Secret of the private registries in `app`'s namespace (an empty `auths` when there are
/// none, so removing the last one takes its credentials away from the next pulls).
pub fn registries_secret(rack: &str, app: &str, credentials: &[crate::runtime::RegistryCredential]) -> Value {
    use base64::Engine;
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "registries".into());
    let config = crate::runtime::docker_config_json(credentials);
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": { "name": REGISTRIES_SECRET, "namespace": namespace_name(rack, app), "labels": labels },
        "data": { ".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config) },
    })
}

/// The rolling-update bounds from the manifest's `deployment` percentages, as the local
/// runtime follows them too (the manifest parser refuses bounds that leave no room to move, as
/// Kubernetes would).
fn rolling_update(service: &Service) -> Value {
    let (surge, unavailable) = crate::deploy::plan::Percentages::of(&service.deployment).rolling_update();
    json!({ "maxSurge": surge, "maxUnavailable": unavailable })
}

/// The Deployment of one service of a release.
///
/// # Errors
/// When the manifest needs an environment variable the release lacks.
pub fn deployment(target: &ServiceTarget<'_>, release: &ReleaseSpec, replicas: u32) -> Result<Value, RuntimeError> {
    let (rack, app, name, service) = (target.rack, release.app.as_str(), target.name, target.service);
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "service".into());
    labels.insert("service".into(), name.into());
    let mut pod_labels = labels.clone();
    pod_labels.insert("release".into(), release.id.as_str().into());
    labels.insert("release".into(), release.id.as_str().into());

    let mut container = main_container(target, release, None, &Default::default())?;
    if let Some(port) = service.port {
        container["env"]
            .as_array_mut()
            .expect("env is an array")
            .push(json!({ "name": "PORT", "value": port.to_string() }));
        container["ports"] = json!([{ "name": "main", "containerPort": port, "protocol": "TCP" }]);
        if !service.health.disabled {
            container["readinessProbe"] = json!({
                "httpGet": {
                    "path": service.health.path,
                    "port": port,
                    "scheme": service.port_scheme.to_ascii_uppercase(),
                },
                "initialDelaySeconds": service.health.grace,
                "periodSeconds": service.health.interval.max(1),
                "timeoutSeconds": service.health.timeout.max(1),
                "failureThreshold": 3,
                "successThreshold": 1,
            });
        }
    }
    let mut requests = serde_json::Map::new();
    if let Some(cpu) = service.scale.cpu {
        requests.insert("cpu".into(), format!("{cpu}m").into());
    }
    if let Some(memory) = service.scale.memory {
        requests.insert("memory".into(), format!("{memory}Mi").into());
    }
    if !requests.is_empty() {
        container["resources"] = json!({ "requests": requests });
    }

    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace_name(rack, app),
            "labels": labels,
        },
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": { "matchLabels": { "app": app, "service": name } },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": rolling_update(service) },
            "template": {
                "metadata": { "labels": pod_labels },
                "spec": {
                    "containers": [container],
                    "imagePullSecrets": pull_secrets(),
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }))
}

/// The main container of a service's pods: its image, its command (or `command` instead),
/// the release's environment plus rack's variables and `extra`.
///
/// # Errors
/// When the manifest needs an environment variable the release lacks.
fn main_container(
    target: &ServiceTarget<'_>,
    release: &ReleaseSpec,
    command: Option<&[String]>,
    extra: &crate::env::Env,
) -> Result<Value, RuntimeError> {
    let (rack, app, name, service) = (target.rack, release.app.as_str(), target.name, target.service);
    let mut variables = release.service_env(name, service)?;
    variables.extend(extra.clone());
    // The variables of the resources it links come from their Secrets, except those the user
    // set (`env set`, or a one-off's own): those win, and a manifest default loses to the link.
    let explicit = |key: &str| release.env.contains_key(key) || extra.contains_key(key);
    let linked = super::databases::link_env(name, service, &release.resources, &release.rack_linked, explicit)?;
    for entry in &linked {
        variables.remove(entry["name"].as_str().unwrap_or_default());
    }
    let mut env: Vec<Value> = variables
        .into_iter()
        .map(|(k, v)| json!({ "name": k, "value": v }))
        .chain(linked)
        .collect();
    for (key, value) in [
        ("APP", app),
        ("SERVICE", name),
        ("RELEASE", release.id.as_str()),
        ("BUILD", release.build_id.as_str()),
        ("RACK", rack),
    ] {
        env.push(json!({ "name": key, "value": value }));
    }
    env.push(json!({ "name": "PROCESS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }));
    let mut container = json!({
        "name": CONTAINER,
        "image": service_image(target, release),
        "env": env,
    });
    match (command, &service.command) {
        (Some(argv), _) => container["command"] = json!(argv),
        (None, Some(Command::Shell(text))) => container["command"] = json!(["/bin/sh", "-c", text]),
        (None, Some(Command::Exec(argv))) if !argv.is_empty() => container["command"] = json!(argv),
        _ => {}
    }
    Ok(container)
}

/// A one-off process of a service (`run`, a release phase): a Pod named `pod` with the
/// service's image and environment running `command`, never restarted, gone after `deadline`
/// seconds at most.
///
/// # Errors
/// When the manifest needs an environment variable the release lacks.
pub fn one_off_pod(
    target: &ServiceTarget<'_>,
    release: &ReleaseSpec,
    pod: &str,
    command: &[String],
    extra: &crate::env::Env,
    deadline: u64,
) -> Result<Value, RuntimeError> {
    let app = release.app.as_str();
    let mut labels = app_labels(target.rack, app);
    labels.insert("type".into(), "process".into());
    labels.insert("service".into(), target.name.into());
    labels.insert("release".into(), release.id.as_str().into());
    let container = main_container(target, release, Some(command), extra)?;
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": pod, "namespace": namespace_name(target.rack, app), "labels": labels },
        "spec": {
            "containers": [container],
            "restartPolicy": "Never",
            "activeDeadlineSeconds": deadline.max(1),
            "imagePullSecrets": pull_secrets(),
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
        },
    }))
}

/// The Service in front of a service that has a port.
pub fn service(rack: &str, app: &str, name: &str, port: u16) -> Value {
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "service".into());
    labels.insert("service".into(), name.into());
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace_name(rack, app), "labels": labels },
        "spec": {
            "type": "ClusterIP",
            "selector": service_selector(app, name),
            "ports": [{ "name": "main", "port": port, "targetPort": port, "protocol": "TCP" }],
        },
    })
}

/// The CronJob of timer `name` (`timer-<name>`): the timer's command in its service's image
/// and environment on the timer's schedule, as `api_version` (`batch/v1`, or `batch/v1beta1`
/// before Kubernetes 1.21). Each run is a Job whose pod is never restarted; the last runs are
/// kept so `ps` and the logs show them.
///
/// # Errors
/// When the manifest needs an environment variable the release lacks.
pub fn timer_cronjob(
    target: &ServiceTarget<'_>,
    release: &ReleaseSpec,
    name: &str,
    timer: &crate::manifest::Timer,
    api_version: &str,
) -> Result<Value, RuntimeError> {
    let app = release.app.as_str();
    let mut labels = app_labels(target.rack, app);
    labels.insert("type".into(), "timer".into());
    labels.insert("timer".into(), name.into());
    labels.insert("service".into(), target.name.into());
    let mut pod_labels = labels.clone();
    pod_labels.insert("release".into(), release.id.as_str().into());
    let mut extra = crate::env::Env::new();
    extra.insert("TIMER".to_owned(), name.to_owned());
    let container = main_container(target, release, Some(&timer.command.argv()), &extra)?;
    Ok(json!({
        "apiVersion": api_version,
        "kind": "CronJob",
        "metadata": {
            "name": timer_name(name),
            "namespace": namespace_name(target.rack, app),
            "labels": labels,
        },
        "spec": {
            "schedule": timer.schedule,
            "concurrencyPolicy": timer.concurrency.as_str(),
            // A run missed by more than this (the controller was down) is skipped, not run late.
            "startingDeadlineSeconds": 300,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": { "labels": pod_labels },
                "spec": {
                    "backoffLimit": 0,
                    "template": {
                        "metadata": { "labels": pod_labels },
                        "spec": {
                            "containers": [container],
                            "restartPolicy": "Never",
                            "imagePullSecrets": pull_secrets(),
                            "automountServiceAccountToken": false,
                            "enableServiceLinks": false,
                        },
                    },
                },
            },
        },
    }))
}

/// The object name of timer `name`.
pub fn timer_name(name: &str) -> String {
    format!("timer-{name}")
}

/// The object name of balancer `name`.
pub fn balancer_name(name: &str) -> String {
    format!("balancer-{name}")
}

/// The Service of type LoadBalancer of balancer `name` (`balancer-<name>`): each of its ports
/// to its service's ready pods, open to its whitelist only when it has one. Client addresses
/// are kept (`externalTrafficPolicy: Local`) so the whitelist and the app see them.
pub fn balancer_service(rack: &str, app: &str, name: &str, balancer: &crate::manifest::Balancer) -> Value {
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "balancer".into());
    labels.insert("balancer".into(), name.into());
    labels.insert("service".into(), balancer.service.as_str().into());
    let ports: Vec<Value> = balancer
        .ports
        .iter()
        .map(|p| {
            json!({
                "name": format!("{}-{}", p.protocol.to_ascii_lowercase(), p.source),
                "port": p.source,
                "targetPort": p.target,
                "protocol": p.protocol,
            })
        })
        .collect();
    let mut spec = json!({
        "type": "LoadBalancer",
        "externalTrafficPolicy": "Local",
        "selector": service_selector(app, &balancer.service),
        "ports": ports,
    });
    if !balancer.whitelist.is_empty() {
        // Kubernetes wants CIDRs: a bare address is its own /32 (or /128).
        let ranges: Vec<String> = balancer
            .whitelist
            .iter()
            .map(|entry| match entry.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => format!("{entry}/32"),
                Ok(std::net::IpAddr::V6(_)) => format!("{entry}/128"),
                Err(_) => entry.clone(),
            })
            .collect();
        spec["loadBalancerSourceRanges"] = json!(ranges);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": balancer_name(name), "namespace": namespace_name(rack, app), "labels": labels },
        "spec": spec,
    })
}

/// The pods a Service of `service` sends traffic to: that service's own, never a one-off or
/// timer pod of it (they carry its labels too, and no readiness probe).
fn service_selector(app: &str, service: &str) -> Value {
    json!({ "app": app, "service": service, "type": "service" })
}

#[cfg(test)]
mod tests;
