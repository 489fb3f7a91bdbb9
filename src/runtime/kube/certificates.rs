//! Certificates on Kubernetes (`convox ssl update`): the certificate a service was given is the
//! Secret `rack-tls-<service>` (type `kubernetes.io/tls`) in the app's namespace, and the
//! service's Ingress names it in its `tls` section. `ssl update` applies the Secret and points
//! the Ingress at it at once; each rollout then builds the Ingress with it (the Secret's
//! presence is what says the service has a certificate), so a release keeps it. `ssl unset`
//! deletes the Secret and gives the Ingress back the TLS a rollout would give it without one.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::KubeRuntime;
use super::resources::{self, MANAGER};
use crate::runtime::RuntimeError;

/// The name of the Secret holding `service`'s certificate.
pub fn secret_name(service: &str) -> String {
    format!("rack-tls-{service}")
}

/// The Secret of `service`'s certificate, when it has one.
///
/// # Errors
/// When the cluster cannot be asked.
pub async fn secret_of(runtime: &KubeRuntime, app: &str, service: &str) -> Result<Option<String>, RuntimeError> {
    let secrets: Api<Secret> = runtime.api(app);
    let name = secret_name(service);
    let found = secrets
        .get_metadata_opt(&name)
        .await
        .map_err(RuntimeError::kube(format!("reading secret {name}")))?;
    Ok(found.map(|_| name))
}

/// Applies `service`'s certificate as its Secret and points the service's Ingress (when there
/// is one: a service first deployed later gets it from its rollout) at it.
///
/// # Errors
/// When the cluster refuses the Secret or the Ingress.
pub async fn serve(
    runtime: &KubeRuntime,
    app: &str,
    service: &str,
    certificate_pem: &str,
    key_pem: &str,
) -> Result<(), RuntimeError> {
    runtime.ensure_namespace(app).await?;
    let settings = &runtime.0.settings;
    let name = secret_name(service);
    let secrets: Api<Secret> = runtime.api(app);
    let body = resources::certificate_secret(&settings.rack, app, service, &name, certificate_pem, key_pem);
    secrets
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(RuntimeError::kube(format!("applying secret {name}")))?;
    let ingresses: Api<Ingress> = runtime.api(app);
    let Some(hosts) = ingress_hosts(&ingresses, service).await? else {
        return Ok(());
    };
    // A merge patch, not an apply: the rollout's apply owns the rest of the Ingress, and an
    // apply of only `tls` would take the rest away. cert-manager is told off this Ingress: it
    // would write its own certificate over the Secret.
    let patch = json!({
        "metadata": { "annotations": { "cert-manager.io/cluster-issuer": null } },
        "spec": { "tls": [{ "hosts": hosts, "secretName": name }] },
    });
    ingresses
        .patch(service, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(RuntimeError::kube(format!(
            "pointing ingress {service} at secret {name}"
        )))?;
    Ok(())
}

/// Takes `service`'s certificate away: deletes its Secret and gives its Ingress (when there is
/// one) the TLS section a rollout would build without a certificate: cert-manager's when an
/// issuer is set, else none.
///
/// # Errors
/// When the cluster refuses the deletion or the Ingress's change.
pub async fn unserve(runtime: &KubeRuntime, app: &str, service: &str) -> Result<(), RuntimeError> {
    let name = secret_name(service);
    let secrets: Api<Secret> = runtime.api(app);
    super::delete(&secrets, &name).await?;
    let ingresses: Api<Ingress> = runtime.api(app);
    let Some(hosts) = ingress_hosts(&ingresses, service).await? else {
        return Ok(());
    };
    let patch = match &runtime.0.settings.config.ingress.cert_issuer {
        Some(issuer) => json!({
            "metadata": { "annotations": { "cert-manager.io/cluster-issuer": issuer } },
            "spec": { "tls": [{ "hosts": hosts, "secretName": format!("{service}-tls") }] },
        }),
        None => json!({ "spec": { "tls": null } }),
    };
    ingresses
        .patch(service, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(RuntimeError::kube(format!(
            "taking ingress {service} off secret {name}"
        )))?;
    Ok(())
}

/// The hosts of `service`'s Ingress, if it has one (a service first deployed later gets its
/// TLS from its rollout).
async fn ingress_hosts(ingresses: &Api<Ingress>, service: &str) -> Result<Option<Vec<String>>, RuntimeError> {
    let ingress = ingresses
        .get_opt(service)
        .await
        .map_err(RuntimeError::kube(format!("reading ingress {service}")))?;
    Ok(ingress.map(|ingress| {
        ingress
            .spec
            .iter()
            .flat_map(|s| s.rules.iter().flatten())
            .filter_map(|r| r.host.clone())
            .collect()
    }))
}
