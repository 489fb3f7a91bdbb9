//! Resources (the databases and caches of convox.yml) on the Kubernetes runtime, against the
//! real control plane of `kubeenv`. The runtime is driven directly with releases built here
//! (their resources and credentials are what rack's store hands the runtime), so these tests
//! are about what lands in the cluster: each resource's StatefulSet, volume claim, Service and
//! Secret, the Deployments that link them, and how long all of that lives.
//!
//! The control plane runs no storage provisioner and no volume binder, so the test binds each
//! claim to a volume of its own as they would (`Provisioner`). Hollow nodes answer a pod's exec
//! readiness probes (`pg_isready`, `redis-cli ping`) with success, as a server that is up would.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Secret, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rack::resource::{Credentials, Definition, Kind, ResourceSpec};
use rack::runtime::kube::{KubeRuntime, KubeSettings};
use rack::runtime::{LogItem, LogSink, ReleaseSpec, Runtime};

use crate::helpers::wait_for;
use crate::kubeenv::{ProbeServer, admin_client, kube_env};

/// A source of build tokens for a runtime that builds nothing here.
#[derive(Debug)]
struct NoTokens;

#[async_trait::async_trait]
impl rack::runtime::SourceTokens for NoTokens {
    async fn issue(&self, _: &str, _: &str, _: Duration) -> Result<String, rack::runtime::BoxError> {
        Err("no builds in these tests".into())
    }
    async fn revoke(&self, _: &str) -> Result<(), rack::runtime::BoxError> {
        Ok(())
    }
}

/// The Kubernetes runtime as rack starts it, as rack's service account.
async fn runtime(scratch: &std::path::Path) -> KubeRuntime {
    let objects = rack::objects::Objects::open(&rack::objects::ObjectsLocation::Dir(scratch.join("objects")))
        .expect("an object store");
    KubeRuntime::connect(KubeSettings {
        rack: "rack".to_owned(),
        config: rack::config::KubeConfig {
            registry: "registry.host/convox".to_owned(),
            url: "http://rack.rack.svc.cluster.local:5443".to_owned(),
            builder: rack::config::KubeBuilder::Kaniko,
            builder_image: "kaniko".to_owned(),
            fetch_image: "busybox:1.36".to_owned(),
            service_account: Some(("rack".to_owned(), "rack".to_owned())),
            kubeconfig: Some(kube_env().rack.clone()),
            ingress: rack::config::IngressConfig::default(),
            prometheus_url: None,
        },
        objects,
        tokens: Arc::new(NoTokens),
        scratch: scratch.join("builds"),
        data_dir: scratch.to_path_buf(),
        limits: rack::archive::Limits::default(),
        build_timeout: Duration::from_secs(60),
        registries: Arc::new(rack::runtime::NoRegistries),
    })
    .await
    .expect("the Kubernetes runtime")
}

/// Binds every claim of `namespace` to a hostPath volume of its own, as a storage
/// provisioner and the volume binder would (the test control plane runs neither), until
/// dropped.
struct Provisioner(tokio::task::JoinHandle<()>);

impl Provisioner {
    fn start(client: Client, namespace: &str, dir: std::path::PathBuf) -> Self {
        let namespace = namespace.to_owned();
        Self(tokio::spawn(async move {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
            let volumes: Api<PersistentVolume> = Api::all(client);
            loop {
                for claim in claims
                    .list(&Default::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                {
                    let spec = claim.spec.clone().unwrap_or_default();
                    if spec.volume_name.is_some() || claim.metadata.deletion_timestamp.is_some() {
                        continue;
                    }
                    let (Some(name), Some(uid)) = (claim.metadata.name.clone(), claim.metadata.uid.clone()) else {
                        continue;
                    };
                    let storage = spec
                        .resources
                        .and_then(|r| r.requests)
                        .and_then(|r| r.get("storage").cloned())
                        .map_or_else(|| "1Gi".to_owned(), |q| q.0);
                    let volume = format!("rack-test-{uid}");
                    let path = dir.join(&volume);
                    // The subdirectory the resource mounts, as a real provisioner's volume
                    // would get it on first use.
                    std::fs::create_dir_all(path.join("data")).expect("a volume directory");
                    let body: PersistentVolume = serde_json::from_value(serde_json::json!({
                        "metadata": { "name": volume, "labels": { "rack-test": "kube-resources" } },
                        "spec": {
                            "capacity": { "storage": storage },
                            "accessModes": ["ReadWriteOnce"],
                            "persistentVolumeReclaimPolicy": "Delete",
                            "hostPath": { "path": path },
                            "claimRef": {
                                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                "namespace": namespace, "name": name, "uid": uid,
                            },
                        },
                    }))
                    .expect("a volume");
                    let _ = volumes.create(&PostParams::default(), &body).await;
                    let bound = serde_json::json!({ "status": { "phase": "Bound" } });
                    let _ = volumes
                        .patch_status(&volume, &PatchParams::default(), &Patch::Merge(&bound))
                        .await;
                    let binding = serde_json::json!({
                        "metadata": { "annotations": { "pv.kubernetes.io/bind-completed": "yes" } },
                        "spec": { "volumeName": volume },
                    });
                    let _ = claims
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&binding))
                        .await;
                    let status = serde_json::json!({ "status": {
                        "phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": { "storage": storage },
                    }});
                    let _ = claims
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A log sink whose lines (`stream message`) the test reads.
fn log() -> (LogSink, Arc<Mutex<Vec<String>>>) {
    let (sink, mut receiver) = LogSink::new();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let kept = lines.clone();
    tokio::spawn(async move {
        while let Some(item) = receiver.rx.recv().await {
            match item {
                LogItem::Line(stream, message) => kept.lock().unwrap().push(format!("{stream} {message}")),
                LogItem::Process(stream, message, _) => kept.lock().unwrap().push(format!("{stream} {message}")),
                LogItem::Copied(copied) => {
                    for message in copied.lines {
                        kept.lock().unwrap().push(format!("{} {message}", copied.stream));
                    }
                }
                LogItem::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    (sink, lines)
}

fn resource(name: &str, kind: Kind, options: &[(&str, &str)]) -> ResourceSpec {
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
            password: format!("{name}-secret-password"),
            database: if kind == Kind::Redis { "0" } else { "app" }.to_owned(),
        },
    }
}

/// A release of `app` whose service `web` (on `port`) links `resources`.
fn release(app: &str, id: &str, port: u16, resources: &[ResourceSpec]) -> ReleaseSpec {
    let mut manifest = rack::manifest::parse(&format!(
        "services:\n  web:\n    image: busybox:1.36\n    port: {port}\n    health:\n      grace: 1\n      interval: 1\n"
    ))
    .expect("a manifest");
    let web = manifest.services.get_mut("web").expect("web");
    web.resources = resources.iter().map(|r| r.name.clone()).collect();
    for spec in resources {
        manifest.resources.insert(spec.name.clone(), spec.definition.clone());
    }
    ReleaseSpec {
        app: app.to_owned(),
        id: id.into(),
        build_id: "BNONE".into(),
        images: Default::default(),
        // Set with `env set`: wins over the cache's own.
        env: [("CACHE_URL".to_owned(), "redis://cache.example:6379/0".to_owned())].into(),
        manifest,
        resources: resources.iter().map(|r| (r.name.clone(), r.clone())).collect(),
        rack_linked: Default::default(),
        analyse: false,
    }
}

async fn apply(runtime: &KubeRuntime, release: &ReleaseSpec, log: &LogSink) {
    tokio::time::timeout(
        Duration::from_secs(180),
        runtime.apply(&release.app, Some(release), log),
    )
    .await
    .unwrap_or_else(|_| panic!("release {} did not roll out in 180 s", release.id))
    .unwrap_or_else(|e| panic!("release {}: {e}", release.id));
}

/// The uids of every object of the resources `names`, which must exist.
async fn uids(client: &Client, ns: &str, names: &[&str]) -> Vec<String> {
    let mut uids = Vec::new();
    for name in names {
        let object = format!("resource-{name}");
        let uid = |meta: &kube::api::ObjectMeta| meta.uid.clone().expect("a uid");
        let set = Api::<StatefulSet>::namespaced(client.clone(), ns)
            .get(&object)
            .await
            .unwrap();
        uids.push(uid(&set.metadata));
        let service = Api::<Service>::namespaced(client.clone(), ns)
            .get(&object)
            .await
            .unwrap();
        uids.push(uid(&service.metadata));
        let secret = Api::<Secret>::namespaced(client.clone(), ns)
            .get(&object)
            .await
            .unwrap();
        uids.push(uid(&secret.metadata));
        let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
            .get(&format!("data-{object}-0"))
            .await
            .unwrap();
        uids.push(uid(&claim.metadata));
    }
    uids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_stateful_sets_kept_across_releases_and_gone_with_the_app() {
    let client = admin_client().await;
    let scratch = tempfile::Builder::new()
        .prefix("rack-kube-resources-")
        .tempdir_in("/var/tmp")
        .expect("a scratch dir");
    let runtime = runtime(scratch.path()).await;
    let app = "kuberes";
    let ns = format!("rack-{app}");
    runtime.create_app(app).await.expect("the app's namespace");
    let _provisioner = Provisioner::start(client.clone(), &ns, scratch.path().join("volumes"));
    let probe = ProbeServer::start().await;

    let database = resource("database", Kind::Postgres, &[("storage", "5"), ("memory", "128")]);
    let cache = resource("cache", Kind::Redis, &[]);
    let first = release(app, "RFIRST", probe.port, &[database.clone(), cache.clone()]);

    // The release phase runs before its release is applied: a one-off of a service that links
    // the database creates it (only it) and waits until it is ready, then reads its Secret.
    let mut phase = first.clone();
    phase.manifest.services.get_mut("web").unwrap().resources = vec!["database".to_owned()];
    let (sink, lines) = log();
    let one_off = rack::runtime::OneOff {
        service: "web".to_owned(),
        command: vec!["bin/migrate".to_owned()],
        env: Default::default(),
        log: Some(sink),
        timeout: Duration::from_secs(180),
    };
    let process = runtime.run(&phase, one_off).await.expect("the release phase");
    let text = lines.lock().unwrap().join("\n");
    let creating = text.find("system/k8s/resource/database creating");
    let ready = text.find("system/k8s/resource/database ready");
    assert!(creating.is_some() && creating < ready, "{text}");
    assert!(!text.contains("resource/cache"), "only what the service links:\n{text}");
    let pod = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
        .get(&process.id)
        .await
        .unwrap();
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    let url = env.iter().find(|e| e.name == "DATABASE_URL").expect("DATABASE_URL");
    assert_eq!(
        url.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name,
        "resource-database"
    );

    // The first deployment creates the other one, and both are ready before the services
    // roll out.
    let (sink, lines) = log();
    apply(&runtime, &first, &sink).await;
    let text = lines.lock().unwrap().join("\n");
    let creating = text.find("system/k8s/resource/cache creating");
    let ready = text.find("system/k8s/resource/cache ready");
    assert!(creating.is_some() && creating < ready, "{text}");
    assert!(!text.contains("database creating"), "{text}");
    assert!(text.contains("system/k8s/resource/database ready"), "{text}");
    assert!(!text.contains("secret-password"), "a password in the log:\n{text}");

    // The StatefulSet: one replica of postgres, its data on a claim of the size asked for.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let set = sets.get("resource-database").await.unwrap();
    let spec = set.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("resource-database"));
    let template = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        template
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "5Gi"
    );
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("postgres:16"));
    assert_eq!(
        container.resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"].0,
        "128Mi"
    );
    let probe_command = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .unwrap();
    assert!(probe_command[2].starts_with("pg_isready"), "{probe_command:?}");
    let managers: Vec<_> = set
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect();
    assert!(managers.iter().any(|m| m == "rack"), "{managers:?}");
    assert_eq!(
        sets.get("resource-cache")
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .image
            .as_deref(),
        Some("redis:7")
    );

    // Its claim, made from the template, labelled as the resource's.
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .get("data-resource-database-0")
        .await
        .unwrap();
    assert_eq!(claim.metadata.labels.as_ref().unwrap()["resource"], "database");
    assert_eq!(
        claim.spec.unwrap().resources.unwrap().requests.unwrap()["storage"].0,
        "5Gi"
    );

    // The Service, to the resource's pod on its kind's port.
    let service = Api::<Service>::namespaced(client.clone(), &ns)
        .get("resource-database")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(service.ports.unwrap()[0].port, 5432);
    assert_eq!(service.selector.unwrap()["resource"], "database");

    // The Secret: what linked processes get, the host being the Service's name.
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("resource-database")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let value = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
    let host = "resource-database.rack-kuberes.svc.cluster.local";
    assert_eq!(value("HOST"), host);
    assert_eq!(value("PORT"), "5432");
    assert_eq!(value("USER"), "app");
    assert_eq!(value("PASS"), "database-secret-password");
    assert_eq!(value("NAME"), "app");
    assert_eq!(
        value("URL"),
        format!("postgres://app:database-secret-password@{host}:5432/app")
    );

    // The linked Deployment reads it through secretKeyRef; a variable set with env set wins.
    let env = crate::kubernetes::web_env(&client, &ns).await;
    let named = |name: &str| {
        let found: Vec<_> = env.iter().filter(|e| e.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {env:?}");
        found[0].clone()
    };
    for key in ["URL", "USER", "PASS", "HOST", "PORT", "NAME"] {
        let reference = named(&format!("DATABASE_{key}"))
            .value_from
            .unwrap()
            .secret_key_ref
            .unwrap();
        assert_eq!(
            (reference.name.as_str(), reference.key.as_str()),
            ("resource-database", key)
        );
    }
    assert_eq!(
        named("CACHE_URL").value.as_deref(),
        Some("redis://cache.example:6379/0")
    );
    assert!(named("CACHE_PASS").value_from.unwrap().secret_key_ref.is_some());

    // A promote to a release that no longer declares them keeps them, and their data.
    let before = uids(&client, &ns, &["database", "cache"]).await;
    let second = release(app, "RSECOND", probe.port, &[]);
    let (sink, lines) = log();
    apply(&runtime, &second, &sink).await;
    assert_eq!(uids(&client, &ns, &["database", "cache"]).await, before);
    let text = lines.lock().unwrap().join("\n");
    assert!(!text.contains("Removing resource"), "{text}");
    let env = crate::kubernetes::web_env(&client, &ns).await;
    assert!(!env.iter().any(|e| e.name == "DATABASE_URL"), "no longer linked");

    // A rollback to the first release finds them as they were: nothing is created again.
    let (sink, lines) = log();
    apply(&runtime, &first, &sink).await;
    assert_eq!(uids(&client, &ns, &["database", "cache"]).await, before);
    let text = lines.lock().unwrap().join("\n");
    assert!(!text.contains("creating"), "{text}");
    assert!(text.contains("system/k8s/resource/database ready"), "{text}");

    // A release that asks for more storage keeps the claim's (Kubernetes cannot change a
    // StatefulSet's claim templates) and says so, and still rolls out.
    let bigger = resource("database", Kind::Postgres, &[("storage", "20"), ("memory", "128")]);
    let third = release(app, "RTHIRD", probe.port, &[bigger, cache.clone()]);
    let (sink, lines) = log();
    apply(&runtime, &third, &sink).await;
    let text = lines.lock().unwrap().join("\n");
    assert!(
        text.contains("system/k8s/resource/database storage stays at 5 GB"),
        "{text}"
    );
    assert_eq!(uids(&client, &ns, &["database", "cache"]).await, before);

    // Deleting a resource removes it and its data.
    rack::runtime::Runtime::delete_resource(&runtime, app, "cache")
        .await
        .unwrap();
    wait_for(60, "the cache's objects to go", || async {
        let set = sets.get_opt("resource-cache").await.unwrap();
        let service = Api::<Service>::namespaced(client.clone(), &ns)
            .get_opt("resource-cache")
            .await
            .unwrap();
        let secret = Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt("resource-cache")
            .await
            .unwrap();
        let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
            .get_opt("data-resource-cache-0")
            .await
            .unwrap();
        let gone = |deleting: Option<&kube::api::ObjectMeta>| deleting.is_none_or(|m| m.deletion_timestamp.is_some());
        (gone(set.as_ref().map(|o| &o.metadata))
            && gone(service.as_ref().map(|o| &o.metadata))
            && gone(secret.as_ref().map(|o| &o.metadata))
            && gone(claim.as_ref().map(|o| &o.metadata)))
        .then_some(())
    })
    .await;
    assert!(
        sets.get_opt("resource-database").await.unwrap().is_some(),
        "the other stays"
    );

    // Deleting the app removes its namespace, and the resources with it.
    runtime.delete_app(app).await.unwrap();
    wait_for(120, "the app's resources to go", || async {
        let namespace = Api::<Namespace>::all(client.clone()).get_opt(&ns).await.unwrap();
        match namespace {
            None => Some(()),
            Some(n) if n.metadata.deletion_timestamp.is_some() => {
                sets.get_opt("resource-database").await.ok().and_then(|set| {
                    set.is_none_or(|s| s.metadata.deletion_timestamp.is_some())
                        .then_some(())
                })
            }
            Some(_) => None,
        }
    })
    .await;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for volume in test_volumes(&volumes).await {
        let _ = volumes
            .delete(&volume.metadata.name.unwrap(), &Default::default())
            .await;
    }
}

/// An API server that knows one resource (`db` of app `shop`, postgres on 5432) and forwards
/// its port as the Kubernetes port-forward protocol does (`v4.channel.k8s.io`: per port a data
/// channel 0 and an error channel 1, each opened by the port number, little-endian), with a
/// pod that answers each chunk with `echo: <chunk>`. The hollow nodes of the test control
/// plane cannot forward ports, so this part of the protocol is tested here. Counts forwards.
async fn fake_api_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::routing::get;
    let forwards = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = forwards.clone();
    let router = axum::Router::new()
        .route(
            "/api/v1/namespaces/rack-shop/services/resource-db",
            get(|| async {
                axum::Json(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": { "name": "resource-db", "namespace": "rack-shop" },
                    "spec": { "ports": [{ "port": 5432, "targetPort": 5432 }] },
                }))
            }),
        )
        .route(
            "/api/v1/namespaces/rack-shop/pods/resource-db-0",
            get(|| async {
                axum::Json(serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": "resource-db-0", "namespace": "rack-shop" },
                    "status": { "phase": "Running" },
                }))
            }),
        )
        .route(
            "/api/v1/namespaces/rack-shop/pods/resource-db-0/portforward",
            get(move |query: axum::extract::RawQuery, upgrade: WebSocketUpgrade| {
                let forwards = counted.clone();
                async move {
                    let query = query.0.unwrap_or_default();
                    assert!(query.split('&').any(|p| p == "ports=5432"), "{query}");
                    forwards.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    upgrade
                        .protocols(["v4.channel.k8s.io"])
                        .on_upgrade(|mut socket| async move {
                            let port = 5432u16.to_le_bytes();
                            for channel in [0u8, 1] {
                                let opening = vec![channel, port[0], port[1]];
                                if socket.send(Message::Binary(opening.into())).await.is_err() {
                                    return;
                                }
                            }
                            while let Some(Ok(message)) = socket.recv().await {
                                match message {
                                    Message::Binary(data) if data.first() == Some(&0) => {
                                        let mut answer = b"\0echo: ".to_vec();
                                        answer.extend_from_slice(&data[1..]);
                                        if socket.send(Message::Binary(answer.into())).await.is_err() {
                                            return;
                                        }
                                    }
                                    Message::Close(_) => break,
                                    _ => {}
                                }
                            }
                            let _ = socket.send(Message::Close(None)).await;
                        })
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, forwards)
}

#[tokio::test]
async fn a_resource_endpoint_forwards_each_connection_to_the_resource_pod() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (url, forwards) = fake_api_server().await;
    let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "rack-shop");
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, "rack-shop");
    let (addr, guard) = rack::runtime::kube::database_rollout::forward(&services, pods.clone(), "shop", "db")
        .await
        .expect("an endpoint");
    assert!(addr.ip().is_loopback(), "{addr}");

    // Two connections, each a forward of its own, both carried both ways.
    for n in 1..=2 {
        let mut connection = tokio::net::TcpStream::connect(addr).await.unwrap();
        connection.write_all(b"SELECT 1").await.unwrap();
        let mut answer = vec![0u8; b"echo: SELECT 1".len()];
        tokio::time::timeout(Duration::from_secs(20), connection.read_exact(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(answer, b"echo: SELECT 1");
        assert_eq!(forwards.load(std::sync::atomic::Ordering::SeqCst), n);
    }

    // No such resource: an error that says so, and no listener.
    let missing = rack::runtime::kube::database_rollout::forward(&services, pods, "shop", "other")
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("other"), "{missing}");

    // With the guard gone, the address reaches nothing.
    drop(guard);
    wait_for(20, "the endpoint to close", || async {
        tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
}

/// `rack resources create/info/update/link/unlink/delete` for a rack-wide resource, as the
/// convox CLI sends them, against a rack on the Kubernetes runtime: the resource is a
/// StatefulSet in the rack's namespace `rack-system`, a linked app's Deployment reads its
/// variables from a copy of its Secret in the app's namespace (the host being the Service's
/// cluster DNS name), and it cannot be deleted while linked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rack_wide_resources_replay_the_convox_cli_on_kubernetes() {
    use reqwest::Method;

    let app = crate::kubernetes::spawn_kube().await;
    let client = admin_client().await;
    let scratch = tempfile::Builder::new()
        .prefix("rack-kube-rack-resources-")
        .tempdir_in("/var/tmp")
        .expect("a scratch dir");
    let ns = "rack-system";
    let _provisioner = Provisioner::start(client.clone(), ns, scratch.path().join("volumes"));
    let send = async |method: Method, path: &str, form: &[(&str, &str)]| {
        crate::resources::send_form(&app, method, path, form).await
    };
    let json = crate::resources::parse_json;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let memory_of = async |sets: &Api<StatefulSet>| {
        let set = sets.get("resource-shared").await.unwrap();
        let container = set.spec.unwrap().template.spec.unwrap().containers[0].clone();
        container.resources.unwrap().requests.unwrap()["memory"].0.clone()
    };

    // `rack resources create redis --name shared memory=32`: a StatefulSet in the rack's
    // namespace, ready before the answer.
    let created = crate::resources::create_shared_redis(&app).await;
    let url = created["url"].as_str().unwrap().to_owned();
    let host = "resource-shared.rack-system.svc.cluster.local";
    assert!(
        url.starts_with("redis://default:") && url.ends_with(&format!("@{host}:6379/0")) && !url.contains("****"),
        "{url}"
    );
    let set = sets.get("resource-shared").await.unwrap();
    let labels = set.metadata.labels.clone().unwrap();
    assert_eq!(
        (labels["app"].as_str(), labels["type"].as_str()),
        ("system", "resource")
    );
    assert!(rack::runtime::kube::database_rollout::is_ready(&set), "{set:?}");
    assert_eq!(memory_of(&sets).await, "32Mi");
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get("resource-shared")
        .await
        .unwrap();
    assert_eq!(String::from_utf8(secret.data.unwrap()["URL"].0.clone()).unwrap(), url);
    let (status, text) = send(Method::POST, "/resources", &[("kind", "redis"), ("name", "shared")]).await;
    assert_eq!(status, 409, "{text}");

    // `rack resources update shared memory=48`: the StatefulSet follows, the claim stays.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let claim = claims.get("data-resource-shared-0").await.unwrap().metadata.uid;
    let (status, text) = send(Method::PUT, "/resources/shared", &[("parameters", "memory=48")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["parameters"]["memory"], "48", "{text}");
    assert_eq!(json(&text)["status"], "running", "{text}");
    assert_eq!(memory_of(&sets).await, "48Mi");
    assert_eq!(claims.get("data-resource-shared-0").await.unwrap().metadata.uid, claim);

    // `rack resources link shared -a hub`, then a release of hub whose service names it.
    let (status, text) = send(Method::POST, "/resources/shared/links", &[("app", "nowhere")]).await;
    assert_eq!(status, 404, "{text}");
    assert_eq!(app.create_app("hub").await.status(), 201);
    let (status, text) = send(Method::POST, "/resources/shared/links", &[("app", "hub")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["apps"][0]["name"], "hub", "{text}");
    let probe = ProbeServer::start().await;
    let web = format!(
        "services:\n  web:\n    build: .\n    port: {}\n    health:\n      grace: 1\n      interval: 1\n",
        probe.port
    );
    let linking = format!("{web}    resources:\n      - shared\n");
    let build = crate::kubernetes::complete_build(&app, &client, "hub", &linking).await;
    let log = crate::deploys::promote_follow(&app, "hub", build["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let hub_secrets: Api<Secret> = Api::namespaced(client.clone(), "rack-hub");
    let copy = hub_secrets.get("resource-shared").await.unwrap();
    assert_eq!(copy.metadata.labels.as_ref().unwrap()["type"], "resource-link");
    assert_eq!(String::from_utf8(copy.data.unwrap()["URL"].0.clone()).unwrap(), url);
    let env = crate::kubernetes::web_env(&client, "rack-hub").await;
    for key in ["URL", "USER", "PASS", "HOST", "PORT", "NAME"] {
        let entry = env
            .iter()
            .find(|e| e.name == format!("SHARED_{key}"))
            .unwrap_or_else(|| panic!("SHARED_{key}: {env:?}"));
        let reference = entry.value_from.clone().unwrap().secret_key_ref.unwrap();
        assert_eq!(
            (reference.name.as_str(), reference.key.as_str()),
            ("resource-shared", key)
        );
    }

    // `rack resources info shared` names the app; deleting it while linked is refused.
    let (status, text) = send(Method::GET, "/resources/shared", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["apps"][0]["name"], "hub", "{text}");
    let (status, text) = send(Method::DELETE, "/resources/shared", &[]).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("linked to hub"), "{text}");
    assert!(sets.get_opt("resource-shared").await.unwrap().is_some());

    // `rack resources unlink shared -a hub`: the next release that no longer names it takes
    // the copy of its Secret away.
    let (status, text) = send(Method::DELETE, "/resources/shared/links/hub", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(send(Method::DELETE, "/resources/shared/links/hub", &[]).await.0, 404);
    let build = crate::kubernetes::complete_build(&app, &client, "hub", &web).await;
    let log = crate::deploys::promote_follow(&app, "hub", build["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    wait_for(60, "the copied secret to go", || async {
        hub_secrets
            .get_opt("resource-shared")
            .await
            .unwrap()
            .is_none_or(|s| s.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;

    // `rack resources delete shared`: its objects and its claim go.
    let (status, text) = send(Method::DELETE, "/resources/shared", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(send(Method::GET, "/resources/shared", &[]).await.0, 404);
    wait_for(60, "the resource's objects to go", || async {
        let gone = |meta: Option<kube::api::ObjectMeta>| meta.is_none_or(|m| m.deletion_timestamp.is_some());
        let set = sets.get_opt("resource-shared").await.unwrap().map(|o| o.metadata);
        let claim = claims
            .get_opt("data-resource-shared-0")
            .await
            .unwrap()
            .map(|o| o.metadata);
        let secret = Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt("resource-shared")
            .await
            .unwrap()
            .map(|o| o.metadata);
        (gone(set) && gone(claim) && gone(secret)).then_some(())
    })
    .await;

    // The same through `rack rack resources ...`.
    let created = crate::resources::rack_cli(
        &app,
        &["rack", "resources", "create", "redis", "--name", "kv", "memory=32"],
    )
    .await;
    assert_eq!(created.trim(), "kv");
    let listed = crate::resources::rack_cli(&app, &["rack", "resources"]).await;
    assert!(listed.contains("kv") && listed.contains("running"), "{listed}");
    let url = crate::resources::rack_cli(&app, &["rack", "resources", "url", "kv"]).await;
    assert!(
        url.trim()
            .ends_with("@resource-kv.rack-system.svc.cluster.local:6379/0"),
        "{url}"
    );
    crate::resources::rack_cli(&app, &["rack", "resources", "link", "kv", "-a", "hub"]).await;
    let info = crate::resources::rack_cli(&app, &["rack", "resources", "info", "kv"]).await;
    assert!(info.contains("hub"), "{info}");
    crate::resources::rack_cli(&app, &["rack", "resources", "unlink", "kv", "-a", "hub"]).await;
    crate::resources::rack_cli(&app, &["rack", "resources", "delete", "kv"]).await;
    assert_eq!(send(Method::GET, "/resources/kv", &[]).await.0, 404);

    assert_eq!(app.delete_app("hub").await.status(), 200);
    // Only this test's volumes (another test's may be in use).
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for volume in test_volumes(&volumes).await {
        let ours = volume
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some_and(|c| c.namespace.as_deref() == Some(ns));
        if ours {
            let _ = volumes
                .delete(&volume.metadata.name.unwrap(), &Default::default())
                .await;
        }
    }
}

/// The persistent volumes the tests of this file provisioned (labelled `rack-test=kube-resources`).
async fn test_volumes(volumes: &Api<PersistentVolume>) -> Vec<PersistentVolume> {
    let ours = kube::api::ListParams::default().labels("rack-test=kube-resources");
    volumes.list(&ours).await.unwrap().items
}
