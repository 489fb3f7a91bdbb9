//! rack inside the cluster, installed the way docker/README.md tells users to: its image built
//! from docker/Dockerfile (`scripts/kube-testenv rack-image`, imported into the real node),
//! docker/k8s/namespace.yaml and rbac.yaml as they are (the environment applies them), the
//! Secret `rack`, and docker/k8s/rack.yaml with what the README says to change for two
//! replicas: the image, `replicas: 2`, and sources on a volume both replicas mount. The rack CLI
//! then deploys an app through that rack, and one rack pod is killed while the CLI follows the
//! rollout: the log resumes from the other replica and ends `OK`.
//!
//! The test environment has no kube-proxy and no DNS, so this test stands in for kube-proxy:
//! it listens on the Service addresses (on loopback of the test's own network namespace, which
//! pods route the service range to) and forwards each connection to one ready endpoint, as
//! kube-proxy's rules would. The `kubernetes` Service forwards to the API server on 127.0.0.1,
//! and rack's `DATABASE_URL` names the node's address, forwarded to the test's Postgres.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

use super::{get_ok, ready_ip, web_pods};
use crate::forward::{Forward, Upstream};
use crate::helpers::{fresh_database, wait_for};
use crate::kubeenv::{REAL_NODE_IMAGE, REAL_NODE_IP, client_for, rack_image_archive, real_node_env};
use crate::resume::{BackgroundDeploy, deployment_log};

/// The tag `scripts/kube-testenv rack-image` gives rack's image.
const RACK_IMAGE: &str = "localhost/rack-testenv/rack:test";
const PASSWORD: &str = "in-cluster-rack-password";
const APP: &str = "incluster";

/// Puts `ip` on this namespace's loopback (a Service address: pods route the service range to
/// the node, which is this namespace). Only ever in the tests' own namespace.
fn add_loopback_address(ip: &str) {
    assert!(
        std::env::var_os("RACK_TEST_NETNS").is_some(),
        "Service addresses go only on the tests' own network namespace"
    );
    let status = std::process::Command::new("ip")
        .args(["addr", "replace", &format!("{ip}/32"), "dev", "lo"])
        .status()
        .expect("running ip");
    assert!(status.success(), "adding {ip} to lo");
}

fn remove_loopback_address(ip: &str) {
    let _ = std::process::Command::new("ip")
        .args(["addr", "del", &format!("{ip}/32"), "dev", "lo"])
        .status();
}

/// The ready addresses of Service `rack`'s endpoints, as kube-proxy reads them.
async fn ready_endpoints(endpoints: &Api<Endpoints>) -> Vec<SocketAddr> {
    let Ok(Some(found)) = endpoints.get_opt("rack").await else {
        return Vec::new();
    };
    let mut ready = Vec::new();
    for subset in found.subsets.iter().flatten() {
        let port = subset
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("http"))
            .map_or(5443, |p| p.port);
        for address in subset.addresses.iter().flatten() {
            if let Ok(ip) = address.ip.parse::<std::net::IpAddr>() {
                ready.push(SocketAddr::new(ip, u16::try_from(port).unwrap()));
            }
        }
    }
    ready
}

/// Waits until Service `rack` has two ready endpoints; else fails with what each rack pod
/// says (its state and its log's end).
async fn two_ready(endpoints: &Api<Endpoints>, pods: &Api<Pod>, rack_pods: &ListParams) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if ready_endpoints(endpoints).await.len() == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut report = String::new();
    for pod in pods.list(rack_pods).await.map(|l| l.items).unwrap_or_default() {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = serde_json::to_string_pretty(&pod.status).unwrap_or_default();
        let params = kube::api::LogParams {
            tail_lines: Some(30),
            ..Default::default()
        };
        let log = pods.logs(&name, &params).await.unwrap_or_else(|e| e.to_string());
        report.push_str(&format!("--- pod {name}\n{status}\n--- its log\n{log}\n"));
    }
    panic!("no two ready rack pods behind Service rack within 180 s:\n{report}");
}

/// docker/k8s/rack.yaml's Deployment and Service.
fn manifests() -> (Deployment, Service) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/k8s/rack.yaml");
    let text = std::fs::read_to_string(&path).expect("docker/k8s/rack.yaml");
    let (mut deployment, mut service) = (None, None);
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(document).expect("YAML");
        match value["kind"].as_str() {
            Some("Deployment") => deployment = Some(serde_json::from_value(value).expect("a Deployment")),
            Some("Service") => service = Some(serde_json::from_value(value).expect("a Service")),
            other => panic!("rack.yaml holds an unexpected {other:?}"),
        }
    }
    (deployment.expect("a Deployment"), service.expect("a Service"))
}

/// The changes docker/README.md ("Two replicas") tells users to make: their image, two
/// replicas, and the sources' directory (the Secret's `objects`) on a volume every replica
/// mounts (a ReadWriteMany claim in a real cluster; a hostPath on this one-node cluster).
fn for_two_replicas(deployment: &mut Deployment, objects: &std::path::Path) {
    let spec = deployment.spec.as_mut().unwrap();
    spec.replicas = Some(2);
    let pod = spec.template.spec.as_mut().unwrap();
    let container = &mut pod.containers[0];
    container.image = Some(RACK_IMAGE.to_owned());
    container.volume_mounts.get_or_insert_with(Vec::new).push(
        serde_json::from_value(serde_json::json!({ "name": "objects", "mountPath": "/srv/rack-objects" })).unwrap(),
    );
    pod.volumes.get_or_insert_with(Vec::new).push(
        serde_json::from_value(serde_json::json!({
            "name": "objects",
            "hostPath": { "path": objects, "type": "Directory" }
        }))
        .unwrap(),
    );
}

/// The URL's unix socket (`?host=DIR`, port) of the test cluster's database URL.
fn postgres_socket(url: &str) -> (PathBuf, String) {
    let parsed = reqwest::Url::parse(url).expect("a database URL");
    let dir = parsed
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned())
        .expect("a socket directory");
    let port = parsed.port().expect("a port");
    let database = parsed.path().trim_start_matches('/').to_owned();
    (PathBuf::from(dir).join(format!(".s.PGSQL.{port}")), database)
}

/// Runs the rack CLI against the in-cluster rack, to the end.
async fn rack_cli(url: &str, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(args)
        .current_dir(dir)
        .env("RACK_URL", url)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .unwrap_or_else(|_| panic!("rack {args:?} finishes within 120 s"))
        .expect("running the CLI")
}

/// A web service of busybox's httpd, unready (404 on /health) for its first 8 seconds: time
/// for the test to kill a rack pod while the rollout waits for it. Its shell stays pid 1 and
/// ends on SIGTERM (httpd as pid 1 would ignore it, and its pod would take the whole grace
/// period to go).
fn app_manifest() -> String {
    let command = "trap 'exit 0' TERM; mkdir -p /tmp/www; (sleep 8; echo ok >/tmp/www/health; echo web ready) & \
                   httpd -f -p 8080 -h /tmp/www & wait";
    format!(
        "services:\n  web:\n    image: {REAL_NODE_IMAGE}\n    command: {command:?}\n    port: 8080\n    \
         health:\n      path: /health\n      grace: 1\n      interval: 1\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rack_installed_from_docker_k8s_deploys_an_app_and_its_rollout_log_survives_a_rack_pod_killed() {
    let image = rack_image_archive().unwrap_or_else(|why| panic!("{why}"));
    let env = real_node_env();
    let started = Instant::now();
    let client = client_for(&env.admin).await;
    assert!(
        std::path::Path::new(&image).exists(),
        "the rack image archive {image} exists"
    );

    // kube-proxy's part for the `kubernetes` Service: the API server, on 127.0.0.1.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let kubernetes = services.get("kubernetes").await.expect("the kubernetes Service");
    let api_ip = kubernetes.spec.unwrap().cluster_ip.expect("its cluster IP");
    let admin_text = std::fs::read_to_string(&env.admin).unwrap();
    let api_server: SocketAddr = admin_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("the API server's address")
        .parse()
        .unwrap();
    add_loopback_address(&api_ip);
    let _api = Forward::start(
        SocketAddr::new(api_ip.parse().unwrap(), 443),
        Arc::new(move || Box::pin(async move { Some(Upstream::Tcp(api_server)) })),
    )
    .await;

    // rack's database: a fresh one on the test cluster, reached at the node's address.
    let database = fresh_database().await;
    let (socket, name) = postgres_socket(&database);
    let postgres = Forward::start(
        SocketAddr::new(REAL_NODE_IP.into(), 0),
        Arc::new(move || {
            let socket = socket.clone();
            Box::pin(async move { Some(Upstream::Unix(socket)) })
        }),
    )
    .await;
    let database_url = format!("postgres://postgres@{}/{name}", postgres.addr);

    // The Secret the README has users create, and the objects' shared directory.
    let objects = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(objects.path(), Some(10001), Some(10001)).unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "rack");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "rack" },
        "stringData": {
            "database-url": database_url,
            "password": PASSWORD,
            "secrets-key": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            "objects": "/srv/rack-objects",
        }
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating Secret rack");

    let (mut deployment, service) = manifests();
    for_two_replicas(&mut deployment, objects.path());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "rack");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("creating Deployment rack");
    let rack_services: Api<Service> = Api::namespaced(client.clone(), "rack");
    let service = rack_services
        .create(&PostParams::default(), &service)
        .await
        .expect("creating Service rack");
    let rack_ip = service.spec.unwrap().cluster_ip.expect("rack's cluster IP");

    // kube-proxy's part for Service `rack`: each connection to one ready endpoint, in turn.
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "rack");
    add_loopback_address(&rack_ip);
    let turn = Arc::new(AtomicUsize::new(0));
    let pick_endpoints = endpoints.clone();
    let front = Forward::start(
        SocketAddr::new(rack_ip.parse().unwrap(), 5443),
        Arc::new(move || {
            let (endpoints, turn) = (pick_endpoints.clone(), turn.clone());
            Box::pin(async move {
                let ready = ready_endpoints(&endpoints).await;
                (!ready.is_empty()).then(|| Upstream::Tcp(ready[turn.fetch_add(1, Ordering::Relaxed) % ready.len()]))
            })
        }),
    )
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "rack");
    let rack_pods = ListParams::default().labels("app.kubernetes.io/name=rack");
    two_ready(&endpoints, &pods, &rack_pods).await;
    eprintln!(
        "in-cluster rack: two replicas ready {:?} after the start",
        started.elapsed()
    );

    // The rack CLI, through the Service, as a user outside the cluster would reach it.
    let url = format!("http://:{PASSWORD}@{rack_ip}:5443");
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("convox.yml"), app_manifest()).unwrap();
    let created = rack_cli(&url, home.path(), &["apps", "create", APP]).await;
    assert!(
        created.status.success(),
        "rack apps create: {}",
        String::from_utf8_lossy(&created.stderr)
    );

    let deploy = BackgroundDeploy::start(&url, home.path(), APP);
    // Once the rollout log is flowing, kill the rack pod that serves it.
    let before = deploy.rollout_begun(120).await;
    let serving = front.busiest().expect("a connection carries the rollout log");
    let Upstream::Tcp(serving_addr) = serving else {
        unreachable!("rack's endpoints are TCP")
    };
    let serving_ip = serving_addr.ip().to_string();
    let victim = pods
        .list(&rack_pods)
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(serving_ip.as_str()))
        .expect("the rack pod serving the rollout log");
    let victim_name = victim.metadata.name.clone().unwrap();
    let killed_at = Instant::now();
    pods.delete(&victim_name, &DeleteParams::default())
        .await
        .expect("deleting the rack pod");
    eprintln!("in-cluster rack: killed {victim_name} ({serving_ip}) after {before} lines of the rollout log");

    let deployed = deploy.finish(240).await;
    eprintln!(
        "in-cluster rack: rack deploy took {:?}, {} lines of output",
        deployed.took,
        deployed.lines.len()
    );
    let log = deployment_log(&format!("http://{rack_ip}:5443"), PASSWORD, APP).await;
    deployed.assert_resumed(before, &log);
    let other = ready_endpoints(&endpoints)
        .await
        .into_iter()
        .any(|a| a.ip() != serving_addr.ip() && front.served_after(&Upstream::Tcp(a), killed_at));
    assert!(other, "another replica served the CLI after the kill");

    // The app runs on the node, ready, and answers on its pod's address.
    let app_pods: Api<Pod> = Api::namespaced(client.clone(), &format!("rack-{APP}"));
    let ip = wait_for(60, "the app's ready pod", || async {
        web_pods(&app_pods).await.iter().find_map(ready_ip)
    })
    .await;
    assert_eq!(
        get_ok(&format!("http://{ip}:8080/health")).await.as_deref(),
        Some("ok\n")
    );
    // The killed replica is replaced, and the app's state reads the same through either.
    two_ready(&endpoints, &pods, &rack_pods).await;
    let info = rack_cli(&url, home.path(), &["apps", "info", APP]).await;
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("running"), "{info}");

    // Deleting the app through the in-cluster rack removes its namespace (RBAC allows it).
    let deleted = rack_cli(&url, home.path(), &["apps", "delete", APP]).await;
    assert!(
        deleted.status.success(),
        "rack apps delete: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    wait_for(240, "the app's namespace gone", || async {
        namespaces
            .get_opt(&format!("rack-{APP}"))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    uninstall(&client).await;
    remove_loopback_address(&rack_ip);
    remove_loopback_address(&api_ip);
    eprintln!("in-cluster rack: the whole test took {:?}", started.elapsed());
}

/// Removes what the test installed in namespace `rack` (the namespace and RBAC stay: the other
/// real-node tests run rack as its service account).
async fn uninstall(client: &Client) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "rack");
    let services: Api<Service> = Api::namespaced(client.clone(), "rack");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "rack");
    let _ = deployments.delete("rack", &DeleteParams::foreground()).await;
    let _ = services.delete("rack", &DeleteParams::default()).await;
    let _ = secrets.delete("rack", &DeleteParams::default()).await;
}
