//! The build Job: a fetch container that downloads and unpacks the source, then one builder
//! container per service image, and the Secret holding the source token and the builders'
//! docker config (the operator's push credentials merged with the private registries').

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{app_labels, build_job_name, namespace_name};
use crate::runtime::RegistryCredential;

/// The key of the build Secret that the builders read as `/kaniko/.docker/config.json`.
pub const DOCKER_CONFIG_KEY: &str = "config.json";

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
                        // Push and pull credentials (see `builder_docker_config`); only that key
                        // of the build's Secret, never its source token.
                        { "name": "registry", "secret": {
                            "secretName": spec.secret,
                            "items": [{ "key": DOCKER_CONFIG_KEY, "path": "config.json" }],
                        } },
                    ],
                },
            },
        },
    })
}

/// The builders' docker config: the `auths` of the private registries (`convox registries
/// add`: a `FROM` of theirs pulls with them), then those of the operator's `rack-registry`
/// Secret (`operator`, its `.dockerconfigjson` when the namespace has it), which win for a
/// server in both: they are what pushes the build's images to `RACK_REGISTRY`.
///
/// # Errors
/// When `operator` is not a docker config (named, so the operator can fix the Secret).
pub fn builder_docker_config(operator: Option<&[u8]>, registries: &[RegistryCredential]) -> Result<String, String> {
    let mut auths = Map::new();
    for c in registries {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
        auths.insert(c.server.clone(), json!({ "auth": auth }));
    }
    let mut config = Map::new();
    if let Some(bytes) = operator {
        let parsed: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("the secret {} is not a docker config: {e}", super::REGISTRY_SECRET))?;
        let Value::Object(mut parsed) = parsed else {
            return Err(format!(
                "the secret {} is not a docker config object",
                super::REGISTRY_SECRET
            ));
        };
        if let Some(Value::Object(theirs)) = parsed.remove("auths") {
            auths.extend(theirs);
        }
        // Anything else it holds (credHelpers, proxies) goes on as the operator wrote it.
        config = parsed;
    }
    config.insert("auths".into(), Value::Object(auths));
    Ok(Value::Object(config).to_string())
}

/// The Secret holding a build's source token and its builders' docker config.
pub fn build_secret(spec: &BuildSpec<'_>, token: &str, docker_config: &str) -> Value {
    let mut labels = app_labels(spec.rack, spec.app);
    labels.insert("type".into(), "build".into());
    labels.insert("build".into(), spec.build_id.into());
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": spec.secret, "namespace": namespace_name(spec.rack, spec.app), "labels": labels },
        "type": "Opaque",
        "stringData": { "token": token, DOCKER_CONFIG_KEY: docker_config },
    })
}
