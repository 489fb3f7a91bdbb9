//! The Kubernetes objects of a convox resource (a database or cache of `resources:`), as plain
//! functions of its spec: a Secret `resource-<name>` with what linked processes get (`URL`,
//! `USER`, `PASS`, `HOST`, `PORT`, `NAME`), a Service `resource-<name>` in front of it, and a
//! StatefulSet `resource-<name>` of one replica whose data lives on a PersistentVolumeClaim
//! from its `volumeClaimTemplates` (`storage` GB, 10 by default). Kept free of I/O so their
//! shape is unit-tested; `database_rollout` applies them.
//!
//! Every object carries the labels `type=resource` and `resource=<name>`: rack finds them by
//! those, never prunes them with a release (a release that stops declaring a resource leaves
//! it and its data in place), and they go with the app's namespace.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use super::resources::{REGISTRY_SECRET, namespace_name};
use crate::resource::{Kind, ResourceSpec, link_vars, var_prefix};
use crate::runtime::RuntimeError;

/// The keys of a resource's Secret, each the suffix of a linked process's variable
/// (`URL` → `<NAME>_URL`).
pub const SECRET_KEYS: [&str; 6] = ["URL", "USER", "PASS", "HOST", "PORT", "NAME"];

/// The container name of a resource's server.
pub const CONTAINER: &str = "server";

/// Storage of a resource whose `options` do not say, in GB.
pub const DEFAULT_STORAGE_GB: u32 = 10;

/// The name of every object of resource `name` (Secret, Service, StatefulSet).
pub fn object_name(name: &str) -> String {
    format!("resource-{name}")
}

/// The name of the PersistentVolumeClaim the StatefulSet makes for its one pod.
pub fn claim_name(name: &str) -> String {
    format!("{VOLUME}-{}-0", object_name(name))
}

/// The name of the one pod of resource `name`.
pub fn pod_name(name: &str) -> String {
    format!("{}-0", object_name(name))
}

/// The volume (and claim template) holding a resource's data.
const VOLUME: &str = "data";

/// The label selector of every object of resource `name` of `app`.
pub fn selector(app: &str, name: &str) -> String {
    format!("app={app},type=resource,resource={name}")
}

/// Labels of every object of resource `name` (convox's app labels, plus the resource's).
fn labels(rack: &str, app: &str, name: &str) -> serde_json::Map<String, Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("system".into(), "convox".into());
    labels.insert("rack".into(), rack.into());
    labels.insert("app".into(), app.into());
    labels.insert("type".into(), "resource".into());
    labels.insert("resource".into(), name.into());
    labels
}

/// The labels the StatefulSet selects its pod by (immutable once created).
fn pod_selector(app: &str, name: &str) -> Value {
    json!({ "app": app, "type": "resource", "resource": name })
}

/// The host linked processes reach resource `name` at: its Service's in-cluster DNS name.
pub fn host(rack: &str, app: &str, name: &str) -> String {
    format!("{}.{}.svc.cluster.local", object_name(name), namespace_name(rack, app))
}

/// The image a resource runs: its `image:`, else the kind's official image at the `version`
/// option (or the kind's default version). PostGIS images are tagged
/// `<postgres version>-<postgis version>`: a bare version gets PostGIS 3.4.
pub fn image(spec: &ResourceSpec) -> String {
    if let Some(image) = &spec.definition.image {
        return image.clone();
    }
    let version = spec.definition.options.get("version").map(String::as_str);
    let (repository, default) = match spec.definition.kind {
        Kind::Postgres => ("postgres", "16"),
        Kind::Postgis => ("postgis/postgis", "16-3.4"),
        Kind::Mysql => ("mysql", "8.0"),
        Kind::Mariadb => ("mariadb", "11.4"),
        Kind::Redis => ("redis", "7"),
        Kind::Memcached => ("memcached", "1.6"),
    };
    let tag = match (spec.definition.kind, version) {
        (_, None) => default.to_owned(),
        (Kind::Postgis, Some(v)) if !v.contains('-') => format!("{v}-3.4"),
        (_, Some(v)) => v.to_owned(),
    };
    format!("{repository}:{tag}")
}

/// The storage of a resource, in GB (`storage` option, else the default).
///
/// # Errors
/// When `storage` is not a positive whole number of GB.
pub fn storage_gb(spec: &ResourceSpec) -> Result<u32, RuntimeError> {
    match spec.definition.options.get("storage") {
        None => Ok(DEFAULT_STORAGE_GB),
        Some(text) => text.trim().parse::<u32>().ok().filter(|gb| *gb > 0).ok_or_else(|| {
            RuntimeError::Failed(format!(
                "resources.{}.options.storage must be a whole number of GB, got {text:?}",
                spec.name
            ))
        }),
    }
}

/// The Secret of a resource: the variables of [`link_vars`] under their suffix (`URL`, ...).
/// Memcached has no credentials: its `USER`, `PASS` and `NAME` are empty.
pub fn secret(rack: &str, app: &str, spec: &ResourceSpec) -> Value {
    let kind = spec.definition.kind;
    let prefix = format!("{}_", var_prefix(&spec.name));
    let data: BTreeMap<String, ByteString> = link_vars(
        &spec.name,
        kind,
        &spec.credentials,
        &host(rack, app, &spec.name),
        kind.default_port(),
    )
    .into_iter()
    .map(|(key, value)| {
        let key = key.strip_prefix(&prefix).unwrap_or(&key).to_owned();
        let value = if kind.has_credentials() || !matches!(key.as_str(), "USER" | "PASS" | "NAME") {
            value
        } else {
            String::new()
        };
        (key, ByteString(value.into_bytes()))
    })
    .collect();
    // Typed, so that the values are base64 as `data` wants (`stringData` is write-only and
    // does not round-trip through server-side apply).
    let secret = Secret {
        data: Some(data),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    let mut body = serde_json::to_value(secret).expect("a Secret serialises");
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    body["metadata"] = json!({
        "name": object_name(&spec.name),
        "namespace": namespace_name(rack, app),
        "labels": labels(rack, app, &spec.name),
    });
    body
}

/// The label `type` of the copy of a rack-wide resource's Secret in a linked app's namespace.
pub const LINK_TYPE: &str = "resource-link";

/// The copy, in the namespace of `app`, of the Secret of rack-wide resource `spec` (which runs
/// in the namespace of [`RACK_APP`]): a `secretKeyRef` only reads Secrets of its own namespace.
/// Its host is the resource's Service in the rack's namespace, reached by cluster DNS. Labelled
/// `type=resource-link` (not `resource`): the app's own resources are never confused with it.
pub fn linked_secret(rack: &str, app: &str, spec: &ResourceSpec) -> Value {
    let mut body = secret(rack, RACK_APP, spec);
    let mut labels = labels(rack, app, &spec.name);
    labels.insert("type".into(), LINK_TYPE.into());
    body["metadata"] = json!({
        "name": object_name(&spec.name),
        "namespace": namespace_name(rack, app),
        "labels": labels,
    });
    body
}

/// The pseudo-app whose namespace (`<rack>-system`; no app may be named `system`) holds the
/// rack-wide resources: [`crate::runtime::RACK_OWNER`] in the runtime's resource operations.
pub const RACK_APP: &str = "system";

/// The app a resource owner stands for here: [`RACK_APP`] for the rack's own resources.
pub fn owner_app(owner: &str) -> &str {
    if owner == crate::runtime::RACK_OWNER {
        RACK_APP
    } else {
        owner
    }
}

/// The Service in front of a resource: its kind's port, to its one pod.
pub fn service(rack: &str, app: &str, spec: &ResourceSpec) -> Value {
    let port = spec.definition.kind.default_port();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": object_name(&spec.name),
            "namespace": namespace_name(rack, app),
            "labels": labels(rack, app, &spec.name),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": pod_selector(app, &spec.name),
            "ports": [{ "name": "main", "port": port, "targetPort": port, "protocol": "TCP" }],
        },
    })
}

/// An environment variable of the server taken from the resource's Secret.
fn from_secret(variable: &str, resource: &str, key: &str) -> Value {
    json!({
        "name": variable,
        "valueFrom": { "secretKeyRef": { "name": object_name(resource), "key": key } },
    })
}

/// What a kind's server needs besides its image: the environment its image reads (credentials
/// from the Secret, never in the StatefulSet itself), its arguments, where its data lives, and
/// its readiness probe.
struct Server {
    env: Vec<Value>,
    args: Option<Value>,
    data_dir: Option<&'static str>,
    probe: Value,
}

/// The data of postgres and mysql live in a subdirectory of their volume (`PGDATA`,
/// `--datadir`, which the official images' entrypoints create): the volume's root may hold
/// `lost+found`, in which initdb and mysqld refuse to start. (Not a `subPath` mount, which
/// needs the node to make the directory first.)
const DATADIR: &str = "--datadir=/var/lib/mysql/data";

/// Readiness is asked of the server itself, over TCP on 127.0.0.1 where the images' clients
/// allow it: the official images' entrypoints first run a server without networking to set the
/// database up, and that one must not count as ready.
fn server(spec: &ResourceSpec) -> Server {
    let name = spec.name.as_str();
    let exec = |script: &str| {
        json!({
            "exec": { "command": ["/bin/sh", "-c", script] },
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
            "successThreshold": 1,
        })
    };
    match spec.definition.kind {
        Kind::Postgres | Kind::Postgis => Server {
            env: vec![
                from_secret("POSTGRES_USER", name, "USER"),
                from_secret("POSTGRES_PASSWORD", name, "PASS"),
                from_secret("POSTGRES_DB", name, "NAME"),
                json!({ "name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata" }),
            ],
            args: None,
            data_dir: Some("/var/lib/postgresql/data"),
            probe: exec(r#"pg_isready -h 127.0.0.1 -U "$POSTGRES_USER" -d "$POSTGRES_DB""#),
        },
        Kind::Mysql => Server {
            env: vec![
                from_secret("MYSQL_USER", name, "USER"),
                from_secret("MYSQL_PASSWORD", name, "PASS"),
                from_secret("MYSQL_DATABASE", name, "NAME"),
                json!({ "name": "MYSQL_RANDOM_ROOT_PASSWORD", "value": "yes" }),
                // Read by mysqladmin: the password never appears in a command line.
                from_secret("MYSQL_PWD", name, "PASS"),
            ],
            args: Some(json!([DATADIR])),
            data_dir: Some("/var/lib/mysql"),
            probe: exec(r#"mysqladmin ping -h 127.0.0.1 -u "$MYSQL_USER" --silent"#),
        },
        Kind::Mariadb => Server {
            env: vec![
                from_secret("MARIADB_USER", name, "USER"),
                from_secret("MARIADB_PASSWORD", name, "PASS"),
                from_secret("MARIADB_DATABASE", name, "NAME"),
                json!({ "name": "MARIADB_RANDOM_ROOT_PASSWORD", "value": "yes" }),
                from_secret("MYSQL_PWD", name, "PASS"),
            ],
            args: Some(json!([DATADIR])),
            data_dir: Some("/var/lib/mysql"),
            probe: exec(r#"mariadb-admin ping -h 127.0.0.1 -u "$MARIADB_USER" --silent"#),
        },
        Kind::Redis => Server {
            env: vec![
                from_secret("REDIS_PASSWORD", name, "PASS"),
                // Read by redis-cli: the password never appears in a command line.
                from_secret("REDISCLI_AUTH", name, "PASS"),
            ],
            // `$(VAR)` is expanded by the kubelet, so the StatefulSet holds no password.
            args: Some(json!([
                "redis-server",
                "--requirepass",
                "$(REDIS_PASSWORD)",
                "--appendonly",
                "yes",
                "--dir",
                "/data"
            ])),
            data_dir: Some("/data"),
            probe: exec("redis-cli -h 127.0.0.1 ping | grep -q PONG"),
        },
        // A cache: nothing to keep, no client in the image to ask with.
        Kind::Memcached => Server {
            env: Vec::new(),
            args: None,
            data_dir: None,
            probe: json!({
                "tcpSocket": { "port": Kind::Memcached.default_port() },
                "periodSeconds": 5,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
                "successThreshold": 1,
            }),
        },
    }
}

/// The resource requests of a resource's server from its options: `cpu` (millicores) and
/// `memory` (MB), when given.
///
/// # Errors
/// When one of them is not a positive whole number.
fn requests(spec: &ResourceSpec) -> Result<serde_json::Map<String, Value>, RuntimeError> {
    let mut requests = serde_json::Map::new();
    for (option, key, unit) in [("cpu", "cpu", "m"), ("memory", "memory", "Mi")] {
        if let Some(text) = spec.definition.options.get(option) {
            let amount = text.trim().parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                RuntimeError::Failed(format!(
                    "resources.{}.options.{option} must be a positive whole number, got {text:?}",
                    spec.name
                ))
            })?;
            requests.insert(key.into(), format!("{amount}{unit}").into());
        }
    }
    Ok(requests)
}

/// The StatefulSet of a resource: one replica of its server, its data on the claim of its
/// `volumeClaimTemplates` (`storage_gb`), restarted in place when its spec changes.
///
/// # Errors
/// When an option (`storage`, `cpu`, `memory`) has a bad value.
pub fn stateful_set(rack: &str, app: &str, spec: &ResourceSpec, storage_gb: u32) -> Result<Value, RuntimeError> {
    let name = spec.name.as_str();
    let kind = spec.definition.kind;
    let port = kind.default_port();
    let server = server(spec);
    let mut container = json!({
        "name": CONTAINER,
        "image": image(spec),
        "env": server.env,
        "ports": [{ "name": "main", "containerPort": port, "protocol": "TCP" }],
        "readinessProbe": server.probe,
    });
    if let Some(args) = server.args {
        container["args"] = args;
    }
    let requests = requests(spec)?;
    if !requests.is_empty() {
        container["resources"] = json!({ "requests": requests });
    }
    let mut claims = Vec::new();
    if let Some(dir) = server.data_dir {
        container["volumeMounts"] = json!([{ "name": VOLUME, "mountPath": dir }]);
        claims.push(json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": { "name": VOLUME, "labels": labels(rack, app, name) },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": format!("{storage_gb}Gi") } },
            },
        }));
    }
    let mut stateful_set = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": object_name(name),
            "namespace": namespace_name(rack, app),
            "labels": labels(rack, app, name),
        },
        "spec": {
            "replicas": 1,
            "serviceName": object_name(name),
            "selector": { "matchLabels": pod_selector(app, name) },
            "updateStrategy": { "type": "RollingUpdate" },
            "template": {
                "metadata": { "labels": labels(rack, app, name) },
                "spec": {
                    "containers": [container],
                    // A custom `image:` may be in the rack's registry.
                    "imagePullSecrets": [{ "name": REGISTRY_SECRET }],
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    // Databases flush on SIGTERM: give them the time to.
                    "terminationGracePeriodSeconds": 60,
                },
            },
        },
    });
    if !claims.is_empty() {
        stateful_set["spec"]["volumeClaimTemplates"] = json!(claims);
    }
    Ok(stateful_set)
}

/// The environment entries that give a process of `service` (named `service_name`) the
/// variables of each resource it links, through `secretKeyRef` on the resource's Secret; a
/// variable in `explicit` (set with `env set`, or given to a one-off) is left out, so the
/// value the user set wins. Also the names of the variables it gives.
///
/// # Errors
/// When the service links a resource the release does not have.
pub fn link_env(
    service_name: &str,
    service: &crate::manifest::Service,
    resources: &BTreeMap<String, ResourceSpec>,
    rack_linked: &BTreeMap<String, ResourceSpec>,
    explicit: impl Fn(&str) -> bool,
) -> Result<Vec<Value>, RuntimeError> {
    let mut env = Vec::new();
    for name in &service.resources {
        // A rack-wide resource linked to the app has a Secret of the same name in the app's
        // namespace (`linked_secret`), so the references are the same.
        if !resources.contains_key(name) && !rack_linked.contains_key(name) {
            return Err(RuntimeError::Failed(format!(
                "service {service_name} links resource {name}, which this release does not declare \
                 (and no rack resource of that name is linked to the app)"
            )));
        }
        let prefix = var_prefix(name);
        for key in SECRET_KEYS {
            let variable = format!("{prefix}_{key}");
            if !explicit(&variable) {
                env.push(from_secret(&variable, name, key));
            }
        }
    }
    Ok(env)
}

/// The storage of the claim template of a live StatefulSet (`10Gi` → 10), to keep it when a
/// later release asks for another: a StatefulSet's claim templates cannot change.
pub fn live_storage_gb(stateful_set: &k8s_openapi::api::apps::v1::StatefulSet) -> Option<u32> {
    let template = stateful_set.spec.as_ref()?.volume_claim_templates.as_ref()?.first()?;
    let quantity = template
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    quantity.0.strip_suffix("Gi")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Credentials, Definition};

    fn spec(name: &str, kind: Kind, options: &[(&str, &str)]) -> ResourceSpec {
        ResourceSpec {
            name: name.to_owned(),
            definition: Definition {
                kind,
                options: options
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                image: None,
            },
            credentials: Credentials {
                user: "app".to_owned(),
                password: "s3cr/t".to_owned(),
                database: if kind == Kind::Redis { "0" } else { "app" }.to_owned(),
            },
        }
    }

    fn decoded(secret: &Value, key: &str) -> String {
        let secret: Secret = serde_json::from_value(secret.clone()).unwrap();
        String::from_utf8(secret.data.unwrap()[key].0.clone()).unwrap()
    }

    #[test]
    fn images_follow_the_kind_and_version() {
        let image_of = |kind, options: &[(&str, &str)]| image(&spec("db", kind, options));
        assert_eq!(image_of(Kind::Postgres, &[]), "postgres:16");
        assert_eq!(image_of(Kind::Postgres, &[("version", "13")]), "postgres:13");
        assert_eq!(image_of(Kind::Postgis, &[("version", "15")]), "postgis/postgis:15-3.4");
        assert_eq!(
            image_of(Kind::Postgis, &[("version", "14-3.3")]),
            "postgis/postgis:14-3.3"
        );
        assert_eq!(image_of(Kind::Mysql, &[]), "mysql:8.0");
        assert_eq!(image_of(Kind::Mariadb, &[]), "mariadb:11.4");
        assert_eq!(image_of(Kind::Redis, &[("version", "6.2")]), "redis:6.2");
        assert_eq!(image_of(Kind::Memcached, &[]), "memcached:1.6");
        let mut custom = spec("db", Kind::Postgres, &[("version", "13")]);
        custom.definition.image = Some("registry.example/pg:13-custom".to_owned());
        assert_eq!(image(&custom), "registry.example/pg:13-custom");
    }

    #[test]
    fn the_secret_holds_the_variables_with_the_service_host() {
        let body = secret("rack", "shop", &spec("main-db", Kind::Postgres, &[]));
        assert_eq!(body["metadata"]["name"], "resource-main-db");
        assert_eq!(body["metadata"]["namespace"], "rack-shop");
        assert_eq!(body["metadata"]["labels"]["type"], "resource");
        assert_eq!(body["metadata"]["labels"]["resource"], "main-db");
        assert!(body.get("stringData").is_none());
        let host = "resource-main-db.rack-shop.svc.cluster.local";
        assert_eq!(decoded(&body, "HOST"), host);
        assert_eq!(decoded(&body, "PORT"), "5432");
        assert_eq!(decoded(&body, "USER"), "app");
        assert_eq!(decoded(&body, "PASS"), "s3cr/t");
        assert_eq!(decoded(&body, "NAME"), "app");
        assert_eq!(
            decoded(&body, "URL"),
            format!("postgres://app:s3cr%2Ft@{host}:5432/app")
        );
        let keys: Vec<String> = body["data"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["HOST", "NAME", "PASS", "PORT", "URL", "USER"]);

        let mut cache = spec("cache", Kind::Memcached, &[]);
        cache.credentials = Credentials {
            user: String::new(),
            password: String::new(),
            database: String::new(),
        };
        let body = secret("rack", "shop", &cache);
        assert_eq!(
            decoded(&body, "URL"),
            "memcached://resource-cache.rack-shop.svc.cluster.local:11211"
        );
        assert_eq!(decoded(&body, "PORT"), "11211");
        assert_eq!(decoded(&body, "PASS"), "");
    }

    #[test]
    fn a_stateful_set_runs_one_server_on_its_claim() {
        let s = spec(
            "db",
            Kind::Postgres,
            &[("storage", "25"), ("memory", "256"), ("cpu", "100")],
        );
        let body = stateful_set("rack", "shop", &s, storage_gb(&s).unwrap()).unwrap();
        assert_eq!(body["metadata"]["name"], "resource-db");
        assert_eq!(body["spec"]["replicas"], 1);
        assert_eq!(body["spec"]["serviceName"], "resource-db");
        assert_eq!(
            body["spec"]["selector"]["matchLabels"],
            json!({ "app": "shop", "type": "resource", "resource": "db" })
        );
        let claim = &body["spec"]["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"]["name"], "data");
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "25Gi");
        assert_eq!(claim["metadata"]["labels"]["resource"], "db");
        let c = &body["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "postgres:16");
        let env = c["env"].as_array().unwrap();
        assert_eq!(c["ports"][0]["containerPort"], 5432);
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/var/lib/postgresql/data");
        assert!(env.contains(&json!({ "name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata" })));
        assert_eq!(c["resources"]["requests"], json!({ "cpu": "100m", "memory": "256Mi" }));
        assert!(
            c["readinessProbe"]["exec"]["command"][2]
                .as_str()
                .unwrap()
                .starts_with("pg_isready -h 127.0.0.1")
        );
        assert!(env.contains(&json!({ "name": "POSTGRES_PASSWORD",
            "valueFrom": { "secretKeyRef": { "name": "resource-db", "key": "PASS" } } })));
        // The password is only ever in the Secret.
        assert!(!body.to_string().contains("s3cr"), "{body}");

        let live: k8s_openapi::api::apps::v1::StatefulSet = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(live_storage_gb(&live), Some(25));

        let default = spec("db", Kind::Postgres, &[]);
        assert_eq!(storage_gb(&default).unwrap(), 10);
        let bad = spec("db", Kind::Postgres, &[("storage", "lots")]);
        assert!(
            storage_gb(&bad)
                .unwrap_err()
                .to_string()
                .contains("resources.db.options.storage")
        );
        let bad = spec("db", Kind::Redis, &[("memory", "-1")]);
        assert!(
            stateful_set("rack", "shop", &bad, 10)
                .unwrap_err()
                .to_string()
                .contains("memory")
        );
    }

    #[test]
    fn each_kind_has_its_server_and_probe() {
        let container = |kind| {
            let body = stateful_set("rack", "shop", &spec("r", kind, &[]), 10).unwrap();
            body["spec"]["template"]["spec"]["containers"][0].clone()
        };
        let redis = container(Kind::Redis);
        assert_eq!(redis["args"][2], "$(REDIS_PASSWORD)");
        assert_eq!(redis["volumeMounts"][0]["mountPath"], "/data");
        assert!(
            redis["readinessProbe"]["exec"]["command"][2]
                .as_str()
                .unwrap()
                .contains("redis-cli")
        );
        let mysql = container(Kind::Mysql);
        assert_eq!(mysql["volumeMounts"][0]["mountPath"], "/var/lib/mysql");
        assert_eq!(mysql["args"], json!(["--datadir=/var/lib/mysql/data"]));
        assert!(
            mysql["readinessProbe"]["exec"]["command"][2]
                .as_str()
                .unwrap()
                .starts_with("mysqladmin ping")
        );
        let mariadb = container(Kind::Mariadb);
        assert!(
            mariadb["readinessProbe"]["exec"]["command"][2]
                .as_str()
                .unwrap()
                .starts_with("mariadb-admin")
        );
        let memcached = stateful_set("rack", "shop", &spec("r", Kind::Memcached, &[]), 10).unwrap();
        assert!(
            memcached["spec"].get("volumeClaimTemplates").is_none(),
            "a cache keeps nothing"
        );
        let c = &memcached["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], 11211);
    }

    #[test]
    fn linked_processes_read_the_secret_unless_the_env_sets_the_variable() {
        let manifest = crate::manifest::parse("services:\n  web:\n    port: 3000\n").unwrap();
        let mut web = manifest.services["web"].clone();
        web.resources = vec!["main-db".to_owned()];
        let resources: BTreeMap<String, ResourceSpec> =
            [("main-db".to_owned(), spec("main-db", Kind::Postgres, &[]))].into();
        let env = link_env("web", &web, &resources, &BTreeMap::new(), |key| key == "MAIN_DB_URL").unwrap();
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "MAIN_DB_USER",
                "MAIN_DB_PASS",
                "MAIN_DB_HOST",
                "MAIN_DB_PORT",
                "MAIN_DB_NAME"
            ]
        );
        assert_eq!(
            env[1]["valueFrom"]["secretKeyRef"],
            json!({ "name": "resource-main-db", "key": "PASS" })
        );
        web.resources = vec!["other".to_owned()];
        let err = link_env("web", &web, &resources, &BTreeMap::new(), |_| false).unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
        // A rack-wide resource linked to the app: the same references, to its copied Secret.
        let shared: BTreeMap<String, ResourceSpec> = [("other".to_owned(), spec("other", Kind::Redis, &[]))].into();
        let env = link_env("web", &web, &resources, &shared, |_| false).unwrap();
        assert_eq!(
            env[0]["valueFrom"]["secretKeyRef"],
            json!({ "name": "resource-other", "key": "URL" })
        );
        let copy = linked_secret("rack", "shop", &shared["other"]);
        assert_eq!(copy["metadata"]["namespace"], "rack-shop");
        assert_eq!(copy["metadata"]["labels"]["type"], LINK_TYPE);
        assert_eq!(copy["metadata"]["labels"]["app"], "shop");
        assert_eq!(decoded(&copy, "HOST"), "resource-other.rack-system.svc.cluster.local");
        assert_eq!(owner_app(crate::runtime::RACK_OWNER), "system");
    }
}
