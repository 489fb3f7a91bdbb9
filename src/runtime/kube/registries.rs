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
        .patch(REGISTRIES_SECRET, &PatchParams::apply(MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(RuntimeError::kube(format!("applying secret {REGISTRIES_SECRET}")))?;
    Ok(())
}
