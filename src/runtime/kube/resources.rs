//! The Kubernetes objects rack writes, as plain functions of a release or build: namespaces,
//! Deployments, Services and build Jobs. Kept free of I/O so their shape is unit-tested.

use serde_json::{Value, json};

use crate::manifest::{Command, Service};
use crate::runtime::{ReleaseSpec, RuntimeError};

/// The field manager of every server-side apply rack makes.
pub const MANAGER: &str = "rack";
/// The Secret (type kubernetes.io/dockerconfigjson) an app namespace may hold with the
/// registry's credentials: builders push with it, pods pull with it.
pub const REGISTRY_SECRET: &str = "rack-registry";
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
                    "imagePullSecrets": [{ "name": REGISTRY_SECRET }],
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
    let linked = super::databases::link_env(name, service, &release.resources, explicit)?;
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
            "imagePullSecrets": [{ "name": REGISTRY_SECRET }],
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

/// The hosts that reach service `name` of `app` from outside the cluster: its
/// `<service>.<app>.<RACK_DOMAIN>` and each of its `domain:` names (a string, comma-separated,
/// or a list; `${VAR}` taken from the release's env, as convox does). None for an
/// `internal: true` service or one without a port.
///
/// # Errors
/// A `domain:` that names a variable the release does not set, or is not a host name.
pub fn ingress_hosts(
    ingress: &crate::config::IngressConfig,
    app: &str,
    name: &str,
    service: &Service,
    env: &crate::env::Env,
) -> Result<Vec<String>, RuntimeError> {
    use serde_yaml_ng::Value as Yaml;
    let internal = matches!(service.extra.get("internal"), Some(Yaml::Bool(true)));
    if service.port.is_none() || internal {
        return Ok(Vec::new());
    }
    let mut hosts: Vec<String> = ingress
        .domain
        .iter()
        .map(|domain| format!("{name}.{app}.{domain}"))
        .collect();
    let named: Vec<String> = match service.extra.get("domain") {
        None | Some(Yaml::Null) => Vec::new(),
        Some(Yaml::String(list)) => list.split(',').map(str::to_owned).collect(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|item| match item {
                Yaml::String(text) => Ok(text.clone()),
                other => Err(RuntimeError::Failed(format!(
                    "services.{name}.domain: each entry must be a host name, got {other:?}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(RuntimeError::Failed(format!(
                "services.{name}.domain must be a host name or a list of them, got {other:?}"
            )));
        }
    };
    for raw in named {
        let host = interpolate(raw.trim(), env)
            .map_err(|var| {
                RuntimeError::Failed(format!(
                    "services.{name}.domain uses ${{{var}}}, which the release's env does not set"
                ))
            })?
            .to_lowercase();
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.trim_start_matches("*.").split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err(RuntimeError::Failed(format!(
                "services.{name}.domain: {host:?} is not a host name"
            )));
        }
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    Ok(hosts)
}

/// `text` with each `${VAR}` replaced by its value in `env`; the name of a missing one.
fn interpolate(text: &str, env: &crate::env::Env) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        out.push_str(env.get(var).ok_or_else(|| var.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The Ingress of service `name` (networking.k8s.io/v1): its `hosts` to its Service's port, in
/// the configured ingress class, with a TLS certificate from cert-manager when an issuer is set.
pub fn ingress(
    rack: &str,
    app: &str,
    name: &str,
    port: u16,
    hosts: &[String],
    settings: &crate::config::IngressConfig,
) -> Value {
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "service".into());
    labels.insert("service".into(), name.into());
    let mut annotations = serde_json::Map::new();
    if let Some(issuer) = &settings.cert_issuer {
        annotations.insert("cert-manager.io/cluster-issuer".into(), issuer.clone().into());
    }
    let backend = json!({ "service": { "name": name, "port": { "number": port } } });
    let rules: Vec<Value> = hosts
        .iter()
        .map(|host| {
            json!({
                "host": host,
                "http": { "paths": [{ "path": "/", "pathType": "Prefix", "backend": backend }] },
            })
        })
        .collect();
    let mut spec = json!({ "rules": rules });
    if let Some(class) = &settings.class {
        spec["ingressClassName"] = class.clone().into();
    }
    if settings.cert_issuer.is_some() {
        spec["tls"] = json!([{ "hosts": hosts, "secretName": format!("{name}-tls") }]);
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": name,
            "namespace": namespace_name(rack, app),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
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
                            "imagePullSecrets": [{ "name": REGISTRY_SECRET }],
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

/// One service's image, as a build makes it.
#[derive(Debug, Clone)]
pub struct ServiceBuild {
    pub service: String,
    /// Build context, relative to the source root.
    pub context: String,
    /// Dockerfile, relative to the context.
    pub dockerfile: String,
    /// Where it is pushed.
    pub image: String,
}

/// What a build Job is made of.
#[derive(Debug, Clone)]
pub struct BuildSpec<'a> {
    pub rack: &'a str,
    pub app: &'a str,
    pub build_id: &'a str,
    pub services: Vec<ServiceBuild>,
    pub source_url: String,
    /// Name of the Secret holding the source token (key `token`).
    pub secret: String,
    pub fetch_image: &'a str,
    pub builder_image: &'a str,
    pub deadline_secs: u64,
}

/// The shell script that downloads and unpacks the source (run by the fetch container). The
/// URL and token come from the environment, never from the command line.
const FETCH_SCRIPT: &str = r#"set -eu
wget -q -O /tmp/source.tgz --header "Authorization: Bearer $RACK_SOURCE_TOKEN" "$RACK_SOURCE_URL"
tar -xzf /tmp/source.tgz -C /workspace
rm -f /tmp/source.tgz
echo "Fetched source"
"#;

/// The Job that builds every service of a build: a fetch container, then one builder
/// container per service, in order (init containers run one after another), then a last
/// container that reports success.
pub fn build_job(spec: &BuildSpec<'_>) -> Value {
    let mut labels = app_labels(spec.rack, spec.app);
    labels.insert("type".into(), "build".into());
    labels.insert("build".into(), spec.build_id.into());
    let workspace = json!([{ "name": "workspace", "mountPath": "/workspace" }]);
    let mut init = vec![json!({
        "name": "fetch",
        "image": spec.fetch_image,
        "command": ["/bin/sh", "-c", FETCH_SCRIPT],
        "env": [
            { "name": "RACK_SOURCE_URL", "value": spec.source_url },
            { "name": "RACK_SOURCE_TOKEN", "valueFrom": { "secretKeyRef": { "name": spec.secret, "key": "token" } } },
        ],
        "volumeMounts": workspace,
    })];
    for ServiceBuild {
        service,
        context,
        dockerfile,
        image,
    } in &spec.services
    {
        let context = format!("/workspace/{}", context.trim_start_matches("./").trim_end_matches('/'));
        let context = context.trim_end_matches("/.").to_owned();
        init.push(json!({
            "name": format!("build-{service}"),
            "image": spec.builder_image,
            "args": [
                format!("--context=dir://{context}"),
                format!("--dockerfile={context}/{dockerfile}"),
                format!("--destination={image}"),
                format!("--label=convox.app={}", spec.app),
                format!("--label=convox.build={}", spec.build_id),
            ],
            "volumeMounts": [
                { "name": "workspace", "mountPath": "/workspace" },
                { "name": "registry", "mountPath": "/kaniko/.docker", "readOnly": true },
            ],
        }));
    }
    let summary = format!("Built {} image(s)", spec.services.len());
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": build_job_name(spec.build_id),
            "namespace": namespace_name(spec.rack, spec.app),
            "labels": labels,
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.deadline_secs,
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "initContainers": init,
                    "containers": [{
                        "name": "done",
                        "image": spec.fetch_image,
                        "command": ["/bin/sh", "-c", format!("echo '{summary}'")],
                    }],
                    "volumes": [
                        { "name": "workspace", "emptyDir": {} },
                        // Push credentials, when the app namespace has them.
                        { "name": "registry", "secret": {
                            "secretName": REGISTRY_SECRET,
                            "optional": true,
                            "items": [{ "key": ".dockerconfigjson", "path": "config.json" }],
                        } },
                    ],
                },
            },
        },
    })
}

/// The Secret holding a build's source token.
pub fn build_secret(spec: &BuildSpec<'_>, token: &str) -> Value {
    let mut labels = app_labels(spec.rack, spec.app);
    labels.insert("type".into(), "build".into());
    labels.insert("build".into(), spec.build_id.into());
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": spec.secret, "namespace": namespace_name(spec.rack, spec.app), "labels": labels },
        "type": "Opaque",
        "stringData": { "token": token },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(manifest: &str) -> ReleaseSpec {
        ReleaseSpec {
            app: "myapp".into(),
            id: "RABCDEFGHI".into(),
            build_id: "BABCDEFGHI".into(),
            images: Default::default(),
            env: [("FOO".to_owned(), "bar".to_owned())].into(),
            manifest: crate::manifest::parse(manifest).unwrap(),
            resources: Default::default(),
            rack_linked: Default::default(),
        }
    }

    fn web_deployment(manifest: &str) -> Value {
        let release = release(manifest);
        let service = &release.manifest.services["web"];
        let target = ServiceTarget {
            rack: "rack",
            registry: "registry.host/convox",
            name: "web",
            service,
        };
        deployment(&target, &release, 2).unwrap()
    }

    #[test]
    fn a_deployment_follows_the_manifest() {
        let d = web_deployment(
            "services:\n  web:\n    port: 3000\n    command: bin/web\n    health:\n      path: /check\n      grace: 7\n      interval: 3\n    deployment:\n      minimum: 25\n      maximum: 150\n    scale:\n      cpu: 250\n      memory: 512\n",
        );
        assert_eq!(d["metadata"]["namespace"], "rack-myapp");
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(
            d["spec"]["selector"]["matchLabels"],
            json!({"app": "myapp", "service": "web"})
        );
        assert_eq!(
            d["spec"]["strategy"]["rollingUpdate"],
            json!({"maxSurge": "50%", "maxUnavailable": "75%"})
        );
        let pod = &d["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["release"], "RABCDEFGHI");
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["name"], "main");
        assert_eq!(c["image"], "registry.host/convox/myapp:web.BABCDEFGHI");
        assert_eq!(c["command"], json!(["/bin/sh", "-c", "bin/web"]));
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            json!({"path": "/check", "port": 3000, "scheme": "HTTP"})
        );
        assert_eq!(c["readinessProbe"]["initialDelaySeconds"], 7);
        assert_eq!(c["readinessProbe"]["periodSeconds"], 3);
        assert_eq!(c["resources"]["requests"], json!({"cpu": "250m", "memory": "512Mi"}));
        let env = c["env"].as_array().unwrap();
        assert!(env.contains(&json!({"name": "FOO", "value": "bar"})));
        assert!(env.contains(&json!({"name": "PORT", "value": "3000"})));
        assert!(env.contains(&json!({"name": "RELEASE", "value": "RABCDEFGHI"})));
        // The selector must not hold the release: it is immutable, and each release rolls.
        assert!(d["spec"]["selector"]["matchLabels"].get("release").is_none());
    }

    #[test]
    fn full_capacity_rolls_by_surging_only() {
        let d = web_deployment("services:\n  web:\n    deployment:\n      minimum: 100\n      maximum: 150\n");
        assert_eq!(
            d["spec"]["strategy"]["rollingUpdate"],
            json!({"maxSurge": "50%", "maxUnavailable": "0%"})
        );
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert!(c.get("readinessProbe").is_none(), "no port, no probe");
        assert!(c.get("command").is_none());
    }

    #[test]
    fn linked_processes_get_the_resource_secret_and_the_env_wins() {
        use crate::resource::{Credentials, Definition, Kind, ResourceSpec};
        let mut release = release(
            "environment:\n  - DATABASE_HOST=from-manifest\nservices:\n  web:\n    port: 3000\ntimers:\n  nightly:\n    schedule: \"0 3 * * *\"\n    command: bin/nightly\n    service: web\n",
        );
        release.manifest.services.get_mut("web").unwrap().resources = vec!["database".to_owned()];
        release
            .env
            .insert("DATABASE_URL".to_owned(), "postgres://elsewhere/db".to_owned());
        release.resources.insert(
            "database".to_owned(),
            ResourceSpec {
                name: "database".to_owned(),
                definition: Definition {
                    kind: Kind::Postgres,
                    options: Default::default(),
                    image: None,
                },
                credentials: Credentials {
                    user: "app".to_owned(),
                    password: "pw".to_owned(),
                    database: "app".to_owned(),
                },
            },
        );
        let target = ServiceTarget {
            rack: "rack",
            registry: "r",
            name: "web",
            service: &release.manifest.services["web"],
        };
        let timer = &release.manifest.timers["nightly"];
        let extra: crate::env::Env = [("DATABASE_NAME".to_owned(), "other".to_owned())].into();
        let containers =
            [
                deployment(&target, &release, 1).unwrap()["spec"]["template"]["spec"]["containers"][0].clone(),
                timer_cronjob(&target, &release, "nightly", timer, "batch/v1").unwrap()["spec"]["jobTemplate"]["spec"]
                    ["template"]["spec"]["containers"][0]
                    .clone(),
                one_off_pod(
                    &target,
                    &release,
                    "web-run-x",
                    &["sh".to_owned()],
                    &Default::default(),
                    60,
                )
                .unwrap()["spec"]["containers"][0]
                    .clone(),
            ];
        for container in &containers {
            let env = container["env"].as_array().unwrap();
            let named = |name: &str| env.iter().filter(|e| e["name"] == name).cloned().collect::<Vec<_>>();
            // `env set` wins: a plain value, no secretKeyRef.
            assert_eq!(
                named("DATABASE_URL"),
                [json!({ "name": "DATABASE_URL", "value": "postgres://elsewhere/db" })]
            );
            // A manifest default loses to the link.
            assert_eq!(
                named("DATABASE_HOST"),
                [json!({ "name": "DATABASE_HOST",
                    "valueFrom": { "secretKeyRef": { "name": "resource-database", "key": "HOST" } } })]
            );
            for key in ["USER", "PASS", "PORT", "NAME"] {
                assert_eq!(named(&format!("DATABASE_{key}")).len(), 1, "{key}: {env:?}");
            }
            assert!(
                !container.to_string().contains("\"pw\""),
                "the password is only in the Secret"
            );
        }
        // A one-off's own variable wins too.
        let one_off = one_off_pod(&target, &release, "web-run-y", &["sh".to_owned()], &extra, 60).unwrap();
        let env = one_off["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        assert!(env.contains(&json!({ "name": "DATABASE_NAME", "value": "other" })));
        assert_eq!(env.iter().filter(|e| e["name"] == "DATABASE_NAME").count(), 1);
    }

    #[test]
    fn a_missing_required_variable_is_refused() {
        let release = release("environment:\n  - SECRET\nservices:\n  web: {}\n");
        let target = ServiceTarget {
            rack: "rack",
            registry: "r",
            name: "web",
            service: &release.manifest.services["web"],
        };
        let err = deployment(&target, &release, 1).unwrap_err();
        assert!(err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn a_build_job_fetches_then_builds_each_service() {
        let spec = BuildSpec {
            rack: "rack",
            app: "myapp",
            build_id: "BABC",
            services: vec![
                ServiceBuild {
                    service: "api".into(),
                    context: "./api".into(),
                    dockerfile: "Dockerfile".into(),
                    image: "r/myapp:api.BABC".into(),
                },
                ServiceBuild {
                    service: "web".into(),
                    context: ".".into(),
                    dockerfile: "web.Dockerfile".into(),
                    image: "r/myapp:web.BABC".into(),
                },
            ],
            source_url: "http://rack:5443/apps/myapp/objects/tmp/x.tgz".into(),
            secret: "build-babc".into(),
            fetch_image: "busybox",
            builder_image: "kaniko",
            deadline_secs: 600,
        };
        let job = build_job(&spec);
        assert_eq!(job["metadata"]["name"], "build-babc");
        assert_eq!(job["spec"]["backoffLimit"], 0);
        assert_eq!(job["spec"]["activeDeadlineSeconds"], 600);
        let init = job["spec"]["template"]["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<_> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["fetch", "build-api", "build-web"]);
        assert_eq!(
            init[1]["args"].as_array().unwrap()[0..3],
            [
                json!("--context=dir:///workspace/api"),
                json!("--dockerfile=/workspace/api/Dockerfile"),
                json!("--destination=r/myapp:api.BABC")
            ]
        );
        assert_eq!(init[2]["args"][0], "--context=dir:///workspace");
        // The token is only ever in the Secret.
        let text = job.to_string();
        assert!(!text.contains("rack_"), "{text}");
        assert_eq!(
            init[0]["env"][1]["valueFrom"]["secretKeyRef"],
            json!({"name": "build-babc", "key": "token"})
        );
    }
    #[test]
    fn ingress_hosts_follow_the_domain_setting_domain_names_and_internal() {
        use crate::config::IngressConfig;
        let settings = IngressConfig {
            domain: Some("rack.example.org".into()),
            class: Some("nginx".into()),
            cert_issuer: Some("letsencrypt".into()),
        };
        let manifest = crate::manifest::parse(
            "services:\n  web:\n    port: 3000\n    domain: ${HOST}, www.Example.com\n  api:\n    port: 4000\n    internal: true\n  worker:\n    command: work\n",
        )
        .unwrap();
        let env: crate::env::Env = [("HOST".to_owned(), "shop.example.com".to_owned())].into();
        let hosts = |name: &str| super::ingress_hosts(&settings, "shop", name, &manifest.services[name], &env);
        assert_eq!(
            hosts("web").unwrap(),
            ["web.shop.rack.example.org", "shop.example.com", "www.example.com"]
        );
        assert!(hosts("api").unwrap().is_empty(), "internal");
        assert!(hosts("worker").unwrap().is_empty(), "no port");
        let missing = super::ingress_hosts(&settings, "shop", "web", &manifest.services["web"], &Default::default());
        assert!(missing.unwrap_err().to_string().contains("${HOST}"));

        let body = super::ingress("rack", "shop", "web", 3000, &hosts("web").unwrap(), &settings);
        assert_eq!(body["spec"]["ingressClassName"], "nginx");
        assert_eq!(
            body["metadata"]["annotations"]["cert-manager.io/cluster-issuer"],
            "letsencrypt"
        );
        assert_eq!(body["spec"]["tls"][0]["secretName"], "web-tls");
        assert_eq!(body["spec"]["rules"][1]["host"], "shop.example.com");
        assert_eq!(
            body["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"],
            serde_json::json!({ "name": "web", "port": { "number": 3000 } })
        );
    }

    #[test]
    fn a_timer_is_a_cronjob_of_its_service() {
        let release = release(
            "services:\n  worker:\n    build: .\ntimers:\n  nightly:\n    schedule: \"0 3 * * *\"\n    command: bin/nightly --all\n    service: worker\n    concurrency: replace\n",
        );
        let target = ServiceTarget {
            rack: "rack",
            registry: "registry.host/convox",
            name: "worker",
            service: &release.manifest.services["worker"],
        };
        let timer = &release.manifest.timers["nightly"];
        let cronjob = timer_cronjob(&target, &release, "nightly", timer, "batch/v1beta1").unwrap();
        assert_eq!(cronjob["apiVersion"], "batch/v1beta1");
        assert_eq!(cronjob["metadata"]["name"], "timer-nightly");
        assert_eq!(cronjob["metadata"]["namespace"], "rack-myapp");
        assert_eq!(cronjob["metadata"]["labels"]["type"], "timer");
        assert_eq!(cronjob["spec"]["schedule"], "0 3 * * *");
        assert_eq!(cronjob["spec"]["concurrencyPolicy"], "Replace");
        let template = &cronjob["spec"]["jobTemplate"]["spec"]["template"];
        let labels = &template["metadata"]["labels"];
        assert_eq!(
            (&labels["app"], &labels["service"], &labels["timer"], &labels["release"]),
            (
                &json!("myapp"),
                &json!("worker"),
                &json!("nightly"),
                &json!("RABCDEFGHI")
            )
        );
        assert_eq!(cronjob["spec"]["jobTemplate"]["spec"]["backoffLimit"], 0);
        assert_eq!(template["spec"]["restartPolicy"], "Never");
        let container = &template["spec"]["containers"][0];
        assert_eq!(container["image"], "registry.host/convox/myapp:worker.BABCDEFGHI");
        assert_eq!(container["command"], json!(["/bin/sh", "-c", "bin/nightly --all"]));
        let env = container["env"].as_array().unwrap();
        assert!(env.contains(&json!({ "name": "FOO", "value": "bar" })));
        assert!(env.contains(&json!({ "name": "TIMER", "value": "nightly" })));
    }

    #[test]
    fn a_balancer_is_a_load_balancer_service_to_its_service_pods_only() {
        let whitelisted = release(
            "services:\n  web:\n    port: 3000\nbalancers:\n  edge:\n    service: web\n    ports:\n      443: 3000\n      8443:\n        port: 3001\n    whitelist: [10.1.0.0/16, 192.0.2.7, \"2001:db8::1\"]\n",
        );
        let service = balancer_service("rack", "myapp", "edge", &whitelisted.manifest.balancers["edge"]);
        assert_eq!(service["metadata"]["name"], "balancer-edge");
        assert_eq!(service["metadata"]["labels"]["type"], "balancer");
        assert_eq!(service["spec"]["type"], "LoadBalancer");
        assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(
            service["spec"]["selector"],
            json!({ "app": "myapp", "service": "web", "type": "service" })
        );
        assert_eq!(
            service["spec"]["ports"],
            json!([
                { "name": "tcp-443", "port": 443, "targetPort": 3000, "protocol": "TCP" },
                { "name": "tcp-8443", "port": 8443, "targetPort": 3001, "protocol": "TCP" },
            ])
        );
        assert_eq!(
            service["spec"]["loadBalancerSourceRanges"],
            json!(["10.1.0.0/16", "192.0.2.7/32", "2001:db8::1/128"])
        );
        let open = release(
            "services:\n  web:\n    port: 3000\nbalancers:\n  edge:\n    service: web\n    ports:\n      443: 3000\n",
        );
        let service = balancer_service("rack", "myapp", "edge", &open.manifest.balancers["edge"]);
        assert!(service["spec"].get("loadBalancerSourceRanges").is_none(), "open to all");
        // The Service of a service with a port selects its own pods only, not its one-offs'.
        assert_eq!(
            super::service("rack", "myapp", "web", 3000)["spec"]["selector"],
            json!({ "app": "myapp", "service": "web", "type": "service" })
        );
    }
}
