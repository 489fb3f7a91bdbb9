//! The build Job: a fetch container that downloads and unpacks the source, then one builder
//! container per service image, and the Secret holding the source token.

use serde_json::{Value, json};

use super::{REGISTRY_SECRET, app_labels, build_job_name, namespace_name};

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
