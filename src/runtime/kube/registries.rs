//! The private registries (`convox registries add`) on Kubernetes: their credentials as the
//! Secret `rack-registries` (type `kubernetes.io/dockerconfigjson`) in the app's namespace,
//! server-side applied with each release before its pods, which list it in
//! `imagePullSecrets` (`resources::pull_secrets`).

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::KubeRuntime;
use super::resources::{self, MANAGER, REGISTRIES_SECRET};
use crate::runtime::RuntimeError;

/// Applies the registries' Secret in `app`'s namespace (which must exist).
///
/// # Errors
/// When the credentials cannot be read, or the cluster refuses the Secret.
pub async fn apply(runtime: &KubeRuntime, app: &str) -> Result<(), RuntimeError> {
    let settings = &runtime.0.settings;
    let credentials = settings
        .registries
        .credentials()
        .await
        .map_err(|e| RuntimeError::Failed(format!("reading the private registries: {e}")))?;
    let secrets: Api<Secret> = runtime.api(app);
    let body = resources::registries_secret(&settings.rack, app, &credentials);
    secrets
        .patch(
            REGISTRIES_SECRET,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(RuntimeError::kube(format!("applying secret {REGISTRIES_SECRET}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use serde_json::json;

    use super::resources::{ServiceTarget, deployment, one_off_pod, registries_secret};
    use crate::runtime::{RegistryCredential, ReleaseSpec};

    #[test]
    fn the_registries_secret_is_a_dockerconfigjson_that_every_pod_pulls_with() {
        let credentials = [RegistryCredential {
            server: "registry.example.com".into(),
            username: "deployer".into(),
            password: "pw".into(),
        }];
        let secret = registries_secret("rack", "myapp", &credentials);
        assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
        assert_eq!(secret["metadata"]["name"], "rack-registries");
        assert_eq!(secret["metadata"]["namespace"], "rack-myapp");
        assert_eq!(secret["metadata"]["labels"]["type"], "registries");
        let config = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        // base64("deployer:pw")
        assert_eq!(
            config,
            json!({ "auths": { "registry.example.com": { "auth": "ZGVwbG95ZXI6cHc=" } } })
        );
        // None: an empty `auths`, so a removed registry's credentials go with the next release.
        let empty = registries_secret("rack", "myapp", &[]);
        let config = base64::engine::general_purpose::STANDARD
            .decode(empty["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&config).unwrap(),
            json!({ "auths": {} })
        );

        let release = ReleaseSpec {
            app: "myapp".into(),
            id: "RABCDEFGHI".into(),
            build_id: "BABCDEFGHI".into(),
            images: Default::default(),
            env: Default::default(),
            manifest: crate::manifest::parse("services:\n  web:\n    image: registry.example.com/web:1\n").unwrap(),
            resources: Default::default(),
            rack_linked: Default::default(),
            analyse: false,
        };
        let target = ServiceTarget {
            rack: "rack",
            registry: "registry.host/convox",
            name: "web",
            service: &release.manifest.services["web"],
        };
        let wanted = json!([{ "name": "rack-registry" }, { "name": "rack-registries" }]);
        let d = deployment(&target, &release, 1).unwrap();
        assert_eq!(d["spec"]["template"]["spec"]["imagePullSecrets"], wanted);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example.com/web:1"
        );
        let pod = one_off_pod(
            &target,
            &release,
            "web-run",
            &["true".to_owned()],
            &Default::default(),
            60,
        )
        .unwrap();
        assert_eq!(pod["spec"]["imagePullSecrets"], wanted);
    }
}
