//! The build Job: a fetch container that downloads and unpacks the source, then one builder
//! container per service image, and the Secret holding the source token and the builders'
//! docker config (the operator's push credentials merged with the private registries').

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{app_labels, build_job_name, namespace_name};
use crate::config::KubeBuilder;
use crate::runtime::RegistryCredential;

/// The key of the build Secret that the builders read as their `config.json` (kaniko's
/// `/kaniko/.docker/config.json`, buildah's REGISTRY_AUTH_FILE).
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
    pub builder: KubeBuilder,
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

/// What a buildah container runs: the image built from the context (vfs storage, chroot
/// isolation: see `builder_container`), then pushed. Its settings come from the environment.
/// `--format docker`: the manifest kaniko pushes too, which every registry and runtime takes.
const BUILDAH_SCRIPT: &str = r#"set -eu
buildah --storage-driver=vfs bud --isolation=chroot --format=docker \
  --label "convox.app=$RACK_APP" --label "convox.build=$RACK_BUILD" \
  --file "$RACK_DOCKERFILE" --tag "$RACK_IMAGE" "$RACK_CONTEXT"
buildah --storage-driver=vfs push "$RACK_IMAGE" "docker://$RACK_IMAGE"
echo "Pushed $RACK_IMAGE"
"#;

/// Where the builders find the build Secret's docker config: kaniko's fixed place, and a
/// directory of rack's for buildah (named by REGISTRY_AUTH_FILE, which its pulls of `FROM`
/// images and its push both read).
const KANIKO_REGISTRY_DIR: &str = "/kaniko/.docker";
const BUILDAH_REGISTRY_DIR: &str = "/rack/registry";

/// One service's builder container.
fn builder_container(spec: &BuildSpec<'_>, service: &str, context: &str, dockerfile: &str, image: &str) -> Value {
    let name = format!("build-{service}");
    match spec.builder {
        KubeBuilder::Kaniko => json!({
            "name": name,
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
                { "name": "registry", "mountPath": KANIKO_REGISTRY_DIR, "readOnly": true },
            ],
        }),
        // buildah mounts (/proc, /sys and the RUN steps' bind mounts in the chroot it runs
        // each step in), which needs CAP_SYS_ADMIN and no seccomp or AppArmor profile that
        // forbids mount: privileged. Its image store is an emptyDir of the pod (vfs: plain
        // copies, nothing mounted over the container's own overlay root).
        KubeBuilder::Buildah => json!({
            "name": name,
            "image": spec.builder_image,
            "command": ["/bin/sh", "-c", BUILDAH_SCRIPT],
            "env": [
                { "name": "RACK_CONTEXT", "value": context },
                { "name": "RACK_DOCKERFILE", "value": format!("{context}/{dockerfile}") },
                { "name": "RACK_IMAGE", "value": image },
                { "name": "RACK_APP", "value": spec.app },
                { "name": "RACK_BUILD", "value": spec.build_id },
                { "name": "REGISTRY_AUTH_FILE", "value": format!("{BUILDAH_REGISTRY_DIR}/config.json") },
                { "name": "BUILDAH_ISOLATION", "value": "chroot" },
            ],
            "securityContext": { "privileged": true },
            "volumeMounts": [
                { "name": "workspace", "mountPath": "/workspace" },
                { "name": "registry", "mountPath": BUILDAH_REGISTRY_DIR, "readOnly": true },
                { "name": "containers", "mountPath": "/var/lib/containers" },
            ],
        }),
    }
}

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
        init.push(builder_container(spec, service, &context, dockerfile, image));
    }
    let summary = format!("Built {} image(s)", spec.services.len());
    let mut volumes = vec![
        json!({ "name": "workspace", "emptyDir": {} }),
        // Push and pull credentials (see `builder_docker_config`); only that key of the
        // build's Secret, never its source token.
        json!({ "name": "registry", "secret": {
            "secretName": spec.secret,
            "items": [{ "key": DOCKER_CONFIG_KEY, "path": "config.json" }],
        } }),
    ];
    if spec.builder == KubeBuilder::Buildah {
        // buildah's image store: base images and layers, gone with the pod.
        volumes.push(json!({ "name": "containers", "emptyDir": {} }));
    }
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
                    "volumes": volumes,
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
