//! The Ingress of a service that takes traffic from outside the cluster, and the hosts it
//! answers: `<service>.<app>.<domain>` and the manifest's `domain:` names.

use serde_json::{Value, json};

use super::{app_labels, namespace_name};
use crate::manifest::Service;
use crate::runtime::RuntimeError;

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
/// the configured ingress class, with TLS from `certificate` (the Secret of the certificate
/// `convox ssl update` gave it) or else from cert-manager when an issuer is set. cert-manager
/// is not asked when the service has its own certificate: it would write over that Secret.
pub fn ingress(
    rack: &str,
    app: &str,
    name: &str,
    port: u16,
    hosts: &[String],
    settings: &crate::config::IngressConfig,
    certificate: Option<&str>,
) -> Value {
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "service".into());
    labels.insert("service".into(), name.into());
    let mut annotations = serde_json::Map::new();
    if let (Some(issuer), None) = (&settings.cert_issuer, certificate) {
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
    if let Some(secret) = certificate {
        spec["tls"] = json!([{ "hosts": hosts, "secretName": secret }]);
    } else if settings.cert_issuer.is_some() {
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

/// The Secret (`kubernetes.io/tls`) of the certificate `convox ssl update` gave service
/// `service`, which its Ingress serves: named `secret`, the PEM certificate (with its chain)
/// and key as Kubernetes reads them.
pub fn certificate_secret(
    rack: &str,
    app: &str,
    service: &str,
    secret: &str,
    certificate_pem: &str,
    key_pem: &str,
) -> Value {
    use base64::Engine;
    let mut labels = app_labels(rack, app);
    labels.insert("type".into(), "certificate".into());
    labels.insert("service".into(), service.into());
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": { "name": secret, "namespace": namespace_name(rack, app), "labels": labels },
        "data": { "tls.crt": b64(certificate_pem), "tls.key": b64(key_pem) },
    })
}
