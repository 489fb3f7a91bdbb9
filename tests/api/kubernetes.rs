//! The Kubernetes runtime against a real control plane (see `kubeenv`): rack runs with
//! `RACK_RUNTIME=kube` as the service account of docker/k8s and is driven through its HTTP API.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::ListParams;
use kube::{Api, Client};
use reqwest::Method;
use serde_json::Value;

use crate::deploys::{create_release, promote_follow, promote_follow_within, rollback_release};
use crate::helpers::{TestApp, wait_for};
use crate::kubeenv::{
    ApiProxy, ProbeServer, act_as_kubelet, admin_client, apply_file, closed_port, finish_pod, kube_env, rack_requests,
};
use crate::replicas::Replica;

const REGISTRY: &str = "registry.host/convox";
const API_URL: &str = "http://rack.rack.svc.cluster.local:5443";

pub async fn spawn_kube() -> TestApp {
    spawn_kube_with(kube_env().rack.clone()).await
}

/// A rack on the test cluster that reaches the API server through `kubeconfig`.
async fn spawn_kube_with(kubeconfig: std::path::PathBuf) -> TestApp {
    spawn_kube_changed(kubeconfig, |_| {}).await
}

/// A rack on the test cluster whose Kubernetes settings `change` adjusts.
pub async fn spawn_kube_then(change: impl FnOnce(&mut rack::config::KubeConfig)) -> TestApp {
    spawn_kube_changed(kube_env().rack.clone(), change).await
}

async fn spawn_kube_changed(
    kubeconfig: std::path::PathBuf,
    change: impl FnOnce(&mut rack::config::KubeConfig),
) -> TestApp {
    TestApp::spawn_with(|config| {
        config.runtime = rack::config::RuntimeKind::Kube;
        config.kube = Some(rack::config::KubeConfig {
            registry: REGISTRY.to_owned(),
            url: API_URL.to_owned(),
            builder: rack::config::KubeBuilder::Kaniko,
            builder_image: "gcr.io/kaniko-project/executor:v1.23.2-debug".to_owned(),
            fetch_image: "busybox:1.36".to_owned(),
            service_account: Some(("rack".to_owned(), "rack".to_owned())),
            kubeconfig: Some(kubeconfig),
            ingress: rack::config::IngressConfig {
                domain: Some("rack.example.org".to_owned()),
                class: Some("nginx".to_owned()),
                cert_issuer: Some("letsencrypt".to_owned()),
            },
            prometheus_url: None,
        });
        change(config.kube.as_mut().expect("just set"));
    })
    .await
}

/// A web service whose pods answer probes on `port`; its rollouts are analysed for 3 s only (a
/// redeploy waits out the window: `kube_analysis` tests the analysis itself).
fn manifest(port: u16) -> String {
    format!(
        "services:\n  web:\n    build: .\n    port: {port}\n    health:\n      grace: 1\n      interval: 1\n    deployment:\n      analysis:\n        window: 3\n"
    )
}

/// The pod template of the app's `web` Deployment in `namespace`.
pub async fn web_pod_spec(client: &Client, namespace: &str) -> k8s_openapi::api::core::v1::PodSpec {
    let web = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get("web")
        .await
        .unwrap();
    web.spec.unwrap().template.spec.unwrap()
}

/// The environment of the first container of the app's `web` Deployment in `namespace`.
pub async fn web_env(client: &Client, namespace: &str) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    web_pod_spec(client, namespace).await.containers[0].env.clone().unwrap()
}

/// The pod of a build's Job, once it exists. `build` reads the build through the API: a build
/// that ends before it has a pod, or no pod within a minute, fails the test with what the build
/// and the cluster say.
pub async fn build_pod(client: &Client, namespace: &str, id: &str, build: impl AsyncFn() -> Value) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let job = format!("build-{}", id.to_ascii_lowercase());
    let selector = ListParams::default().labels(&format!("job-name={job}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(list) = pods.list(&selector).await
            && let Some(pod) = list.items.into_iter().next()
        {
            return pod;
        }
        let state = build().await;
        assert_ne!(
            state["status"], "failed",
            "the build failed before its pod existed: {state}"
        );
        if tokio::time::Instant::now() > deadline {
            let job = Api::<Job>::namespaced(client.clone(), namespace).get_opt(&job).await;
            panic!("no pod for build {id} after 60 s; build: {state}; job: {job:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a build log that is still streaming holds so far (read until it pauses).
async fn log_so_far(response: reqwest::Response) -> String {
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_millis(500), body.next()).await {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

/// Builds app `name` from `manifest` and promotes the release without following it (deadline
/// 600 s, so only the test decides how it ends): the release and the deployment's location.
pub async fn build_and_promote(app: &TestApp, client: &Client, name: &str, manifest: &str) -> (String, String) {
    let build = complete_build(app, client, name, manifest).await;
    let release = build["release"].as_str().unwrap().to_owned();
    let response = app
        .convox(Method::POST, &format!("/apps/{name}/releases/{release}/promote"))
        .form(&[("timeout", "600")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    (release, location)
}

/// Uploads a source with `manifest` and a Dockerfile, builds it and ends its pod as a
/// successful kubelet would; returns the build.
pub async fn complete_build(app: &TestApp, client: &Client, name: &str, manifest: &str) -> Value {
    let id = app
        .build_source(name, &[("convox.yml", manifest), ("Dockerfile", "FROM scratch\n")])
        .await;
    let pod = build_pod(client, &format!("rack-{name}"), &id, async || {
        app.get_build(name, &id).await
    })
    .await;
    finish_pod(client, &format!("rack-{name}"), &pod, None).await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    build
}

/// Waits until namespace `ns` is gone or going (deleted; its contents go with it).
async fn namespace_gone(client: &Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_for(90, "the namespace to go", || async {
        match namespaces.get_opt(ns).await.unwrap() {
            None => Some(()),
            Some(n) if n.metadata.deletion_timestamp.is_some() => Some(()),
            Some(_) => None,
        }
    })
    .await;
}

/// The index of the first line at or after `from` that contains every part of `parts`.
fn find_line(lines: &[&str], from: usize, parts: &[&str]) -> usize {
    lines[from..]
        .iter()
        .position(|line| parts.iter().all(|p| line.contains(p)))
        .map(|i| i + from)
        .unwrap_or_else(|| panic!("no line with {parts:?} after line {from} in:\n{}", lines.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_is_a_namespace_its_build_a_job_and_its_release_a_rolling_deployment() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "kubeflow";
    let ns = format!("rack-{name}");

    // App → namespace, labelled, with rack's rights bound in it.
    assert_eq!(app.create_app(name).await.status(), 201);
    let namespace = Api::<Namespace>::all(client.clone()).get(&ns).await.unwrap();
    let labels = namespace.metadata.labels.unwrap();
    assert_eq!(labels["app"], name);
    assert_eq!(labels["rack"], "rack");
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get("rack")
        .await
        .unwrap();
    assert_eq!(binding.role_ref.name, "rack-app");

    // Build → a Job with the right spec, fetching with a token scoped to its one object.
    let probe = ProbeServer::start().await;
    let source =
        crate::helpers::source_tarball(&[("convox.yml", &manifest(probe.port)), ("Dockerfile", "FROM scratch\n")]);
    let key = "src/first.tgz";
    assert_eq!(app.upload(name, key, source.clone()).await.status(), 200);
    let build_id = app.create_build(name, key).await["id"].as_str().unwrap().to_owned();
    let pod = build_pod(&client, &ns, &build_id, async || app.get_build(name, &build_id).await).await;
    let job = Api::<Job>::namespaced(client.clone(), &ns)
        .get(&format!("build-{}", build_id.to_ascii_lowercase()))
        .await
        .unwrap();
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    let template = spec.template.spec.unwrap();
    let init = template.init_containers.unwrap();
    assert_eq!(init[0].name, "fetch");
    assert_eq!(init[1].name, "build-web");
    let image = format!("{REGISTRY}/{name}:web.{build_id}");
    assert!(
        init[1]
            .args
            .as_ref()
            .unwrap()
            .contains(&format!("--destination={image}"))
    );
    let fetch_env = init[0].env.as_ref().unwrap();
    let url = fetch_env[0].value.clone().unwrap();
    assert_eq!(url, format!("{API_URL}/apps/{name}/objects/{key}"));
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&format!("build-{}", build_id.to_ascii_lowercase()))
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let path = url.strip_prefix(API_URL).unwrap();
    let fetched = app.client.get(app.url(path)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap(), source, "the token fetches the source");
    for other in [
        format!("/apps/{name}"),
        format!("/apps/{name}/objects/src/other.tgz"),
        "/apps".to_owned(),
    ] {
        let response = app
            .client
            .get(app.url(&other))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{other}");
    }
    let response = app
        .client
        .delete(app.url(path))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "the token only reads");

    // The pod ends (as a kubelet would) → the build completes with its image recorded.
    finish_pod(&client, &ns, &pod, None).await;
    let build = app.wait_build(name, &build_id).await;
    assert_eq!(build["status"], "complete", "{build}");
    assert_eq!(build["images"]["web"], image);
    assert_eq!(build["repository"], format!("{REGISTRY}/{name}"));
    let response = app.client.get(app.url(path)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 401, "the token is revoked once the build ended");
    let first = build["release"].as_str().unwrap().to_owned();

    // Promote → the Deployment rolls out on hollow nodes; the log reads like convox's.
    let kubelet = tokio::spawn(act_as_kubelet(client.clone(), ns.clone()));
    let log = promote_follow(&app, name, &first).await;
    let lines: Vec<&str> = log.lines().collect();
    let mut at = find_line(&lines, 0, &["system/k8s/atom/app Status: None => Pending"]);
    at = find_line(&lines, at, &["system/k8s/atom/app Status: Pending => Updating"]);
    at = find_line(&lines, at, &["system/k8s/web Scaled up replica set web-", " to 1"]);
    // The replica set's and the scheduler's events race: either may come first.
    let created = find_line(&lines, at, &["system/k8s/web-", " Created pod: web-"]);
    let assigned = find_line(
        &lines,
        at,
        &["system/k8s/web-", &format!(" Successfully assigned {ns}/web-")],
    );
    at = find_line(&lines, created.max(assigned), &[&format!(" Pulling image \"{image}\"")]);
    at = find_line(&lines, at, &[" Started container main"]);
    find_line(&lines, at, &["system/k8s/atom/app Status: Updating => Running"]);
    assert!(log.ends_with("\nOK\n"), "{log}");
    for line in &lines[..lines.len() - 1] {
        let (time, _) = line.split_once(' ').unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{line}");
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let web = deployments.get("web").await.unwrap();
    let web_spec = web.spec.unwrap();
    let strategy = web_spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        serde_json::to_value(strategy).unwrap(),
        serde_json::json!({"maxSurge": "100%", "maxUnavailable": "50%"})
    );
    let container = &web_spec.template.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some(image.as_str()));
    assert!(container.readiness_probe.is_some());

    // Processes are the pods.
    let processes: Vec<Value> = app.get_json(&format!("/apps/{name}/processes")).await;
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert_eq!(processes[0]["name"], "web");
    assert_eq!(processes[0]["release"], first.as_str());
    assert_eq!(processes[0]["status"], "running");
    let pod_name = processes[0]["id"].as_str().unwrap().to_owned();

    // Restarting a process replaces its pod.
    let response = app
        .request(Method::DELETE, &format!("/apps/{name}/processes/{pod_name}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    wait_for(60, "a new pod in place of the restarted one", || async {
        let processes: Vec<Value> = app.get_json(&format!("/apps/{name}/processes")).await;
        processes
            .iter()
            .any(|p| p["id"] != pod_name.as_str() && p["status"] == "running")
            .then_some(())
    })
    .await;

    // A second release rolls from the first.
    let second = create_release(&app, name, &[("env", "GREETING=hello")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, name, &second).await;
    let lines: Vec<&str> = log.lines().collect();
    let at = find_line(&lines, 0, &["system/k8s/web Scaled up replica set web-"]);
    find_line(&lines, at, &["system/k8s/web Scaled down replica set web-", " to 0"]);
    assert!(log.ends_with("\nOK\n"), "{log}");
    let web = deployments.get("web").await.unwrap();
    let pod_labels = web.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(pod_labels["release"], second);
    let app_json: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(app_json["release"], second.as_str());
    kubelet.abort();
    drop(probe);

    // Deleting the app deletes its namespace.
    assert_eq!(app.delete_app(name).await.status(), 200);
    namespace_gone(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_pod_fails_the_build_with_the_step_that_failed() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "kubefail";
    assert_eq!(app.create_app(name).await.status(), 201);
    let id = app
        .build_source(
            name,
            &[("convox.yml", &manifest(3000)), ("Dockerfile", "FROM scratch\n")],
        )
        .await;
    let ns = format!("rack-{name}");
    let pod = build_pod(&client, &ns, &id, async || app.get_build(name, &id).await).await;
    finish_pod(&client, &ns, &pod, Some(("build-web", 1))).await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "failed");
    assert_eq!(build["reason"], "building service web failed (exit code 1)", "{build}");

    // A cancelled build takes its Job and its token's Secret with it.
    let id = app
        .build_source(
            name,
            &[("convox.yml", &manifest(3000)), ("Dockerfile", "FROM scratch\n")],
        )
        .await;
    let pod = build_pod(&client, &ns, &id, async || app.get_build(name, &id).await).await;
    // The pod outlives its Job (a finalizer holds it, as a slow node would), and rack is
    // following its containers' logs: neither may hold the cancel up.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_name = pod.metadata.name.clone().unwrap();
    let hold = |finalizers: Value| serde_json::json!({ "metadata": { "finalizers": finalizers } });
    pods.patch(
        &pod_name,
        &Default::default(),
        &kube::api::Patch::Merge(hold(serde_json::json!(["rack-tests/hold"]))),
    )
    .await
    .unwrap();
    wait_for(60, "rack to follow the build pod's logs", || async {
        let log = app
            .request(Method::GET, &format!("/apps/{name}/builds/{id}/logs"))
            .send()
            .await
            .ok()?;
        // Hollow nodes serve no logs: rack says so for the first container, then waits for the next.
        log_so_far(log).await.contains("the log of fetch").then_some(())
    })
    .await;
    let response = app
        .request(Method::POST, &format!("/apps/{name}/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{:?}", response.text().await);
    // A cancel acts at once (not when a lease runs out and another worker looks).
    let build = wait_for(15, "the cancelled build to end", || async {
        let build = app.get_build(name, &id).await;
        (build["status"] == "failed").then_some(build)
    })
    .await;
    assert_eq!(build["reason"], "cancelled", "{build}");
    pods.patch(
        &pod_name,
        &Default::default(),
        &kube::api::Patch::Merge(hold(Value::Null)),
    )
    .await
    .unwrap();
    let job_name = format!("build-{}", id.to_ascii_lowercase());
    let (jobs, secrets): (Api<Job>, Api<Secret>) = (
        Api::namespaced(client.clone(), &ns),
        Api::namespaced(client.clone(), &ns),
    );
    wait_for(30, "the Job and Secret to go", || async {
        let job = jobs.get_opt(&job_name).await.unwrap();
        let gone = job.is_none_or(|j| j.metadata.deletion_timestamp.is_some());
        (gone && secrets.get_opt(&job_name).await.unwrap().is_none()).then_some(())
    })
    .await;

    // A source without the Dockerfile never reaches the cluster.
    let id = app.build_source(name, &[("convox.yml", &manifest(3000))]).await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "failed");
    assert_eq!(
        build["reason"], "services.web.build: no Dockerfile in . of the source",
        "{build}"
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    assert!(
        jobs.get_opt(&format!("build-{}", id.to_ascii_lowercase()))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_never_becomes_ready_rolls_back() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "kubedeadline";
    let ns = format!("rack-{name}");
    assert_eq!(app.create_app(name).await.status(), 201);
    let probe = ProbeServer::start().await;
    let good = complete_build(&app, &client, name, &manifest(probe.port)).await;
    let good = good["release"].as_str().unwrap().to_owned();
    assert!(promote_follow(&app, name, &good).await.ends_with("\nOK\n"));

    // Nothing answers the new release's health checks.
    let bad = complete_build(&app, &client, name, &manifest(closed_port())).await;
    let bad = bad["release"].as_str().unwrap().to_owned();
    let log = promote_follow_within(&app, name, &bad, Some(10)).await;
    let lines: Vec<&str> = log.lines().collect();
    let mut at = find_line(&lines, 0, &["system/k8s/web Scaled up replica set web-"]);
    for state in [
        "Status: Updating => Deadline",
        "Status: Deadline => Rollback",
        "Status: Rollback => Reverted",
    ] {
        at = find_line(&lines, at, &[state]);
    }
    assert!(
        log.ends_with("ERROR: the deployment did not become healthy within 10s\n"),
        "{log}"
    );
    let web = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("web")
        .await
        .unwrap();
    let labels = web.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["release"], good, "the previous release is applied again");
    let app_json: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(app_json["release"], good.as_str());
    drop(probe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_goes_on_across_a_rack_restart() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "kuberestart";
    let ns = format!("rack-{name}");
    assert_eq!(app.create_app(name).await.status(), 201);
    // Nothing answers the health checks yet: the rollout is held mid-way.
    let port = closed_port();
    let (release, _) = build_and_promote(&app, &client, name, &manifest(port)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for(60, "the Deployment to be applied", || async {
        deployments.get_opt("web").await.unwrap().map(|_| ())
    })
    .await;

    // rack stops mid-rollout (handing the deployment back) and starts again.
    let app = app.restart().await;
    let _probe = ProbeServer::start_on(port).await;
    let deployment: Value = wait_for(120, "the rollout to end", || async {
        let list: Vec<Value> = app.get_json(&format!("/apps/{name}/deployments")).await;
        list.into_iter().next().filter(|d| d["ended"].is_string())
    })
    .await;
    assert_eq!(deployment["state"], "running", "{deployment}");
    let app_json: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(app_json["release"], release.as_str());
    // The app's log (no follow) reads the pods' logs and ends. Hollow nodes serve no
    // container logs, so only the stored lines show.
    let response = app
        .request(Method::GET, &format!("/apps/{name}/logs"))
        .header("Follow", "false")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let log = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("a log without follow ends")
        .unwrap();
    assert!(log.contains("Status: Updating => Running"), "{log}");
    // Applying again after the takeover made no second ReplicaSet.
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> = Api::namespaced(client.clone(), &ns);
    assert_eq!(sets.list(&ListParams::default()).await.unwrap().items.len(), 1);
}

/// Real `rack server` processes sharing one database and data directory, on the test cluster.
pub struct Replicas {
    database: String,
    data: tempfile::TempDir,
    kubeconfig: String,
}

impl Replicas {
    pub async fn new() -> Self {
        Self {
            database: crate::helpers::fresh_database().await,
            data: tempfile::tempdir().unwrap(),
            kubeconfig: kube_env().rack.display().to_string(),
        }
    }

    pub async fn start(&self) -> Replica {
        let settings = [
            ("RACK_RUNTIME", "kube"),
            ("RACK_REGISTRY", REGISTRY),
            ("RACK_API_URL", API_URL),
            ("RACK_KUBE_SERVICE_ACCOUNT", "rack/rack"),
            ("KUBECONFIG", self.kubeconfig.as_str()),
        ];
        Replica::start(&self.database, self.data.path(), &settings).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_on_a_killed_replica_is_resumed_by_another() {
    let client = admin_client().await;
    let replicas = Replicas::new().await;
    let (name, ns) = ("kubebuildkill", "rack-kubebuildkill");
    let mut doomed = replicas.start().await;
    crate::replicas::create_app(&doomed, name).await;
    let id = doomed
        .build(
            name,
            &[("convox.yml", &manifest(3000)), ("Dockerfile", "FROM scratch\n")],
        )
        .await;
    let build = format!("/apps/{name}/builds/{id}");
    let pod = build_pod(&client, ns, &id, async || doomed.json(&build).await).await;
    doomed.kill_9().await;

    // The Job goes on in the cluster; another replica picks the build up and follows it.
    let survivor = replicas.start().await;
    wait_for(60, "the survivor to resume the build", || async {
        let log = survivor
            .request(Method::GET, &format!("/apps/{name}/builds/{id}/logs"))
            .send()
            .await
            .ok()?;
        log_so_far(log).await.contains("Resuming: job build-").then_some(())
    })
    .await;
    finish_pod(&client, ns, &pod, None).await;
    let build = survivor.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    assert_eq!(build["images"]["web"], format!("{REGISTRY}/{name}:web.{id}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_on_a_killed_replica_is_finished_by_another() {
    let client = admin_client().await;
    let replicas = Replicas::new().await;
    let (name, ns) = ("kubekill", "rack-kubekill");
    let mut doomed = replicas.start().await;
    crate::replicas::create_app(&doomed, name).await;
    // Nothing answers the health checks yet: the rollout is held mid-way.
    let port = closed_port();
    let id = doomed
        .build(
            name,
            &[("convox.yml", &manifest(port)), ("Dockerfile", "FROM scratch\n")],
        )
        .await;
    let build = format!("/apps/{name}/builds/{id}");
    let pod = build_pod(&client, ns, &id, async || doomed.json(&build).await).await;
    finish_pod(&client, ns, &pod, None).await;
    let release = doomed.wait_build(name, &id).await["release"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = doomed
        .request(Method::POST, &format!("/apps/{name}/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for(60, "the Deployment to be applied", || async {
        deployments.get_opt("web").await.unwrap().map(|_| ())
    })
    .await;

    doomed.kill_9().await;
    let survivor = replicas.start().await;
    let _probe = ProbeServer::start_on(port).await;
    let deployment = wait_for(90, "the deployment to end", || async {
        let d = survivor.json(&location).await;
        d["ended"].is_string().then_some(d)
    })
    .await;
    assert_eq!(deployment["state"], "running", "{deployment}");
    let app = survivor.json(&format!("/apps/{name}")).await;
    assert_eq!(app["release"], release.as_str());
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> = Api::namespaced(client.clone(), ns);
    assert_eq!(sets.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let processes = survivor.json(&format!("/apps/{name}/processes")).await;
    assert_eq!(processes[0]["status"], "running", "{processes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_is_not_rack_s_is_never_adopted() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let foreign: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "rack-taken", "labels": { "team": "billing" } }
    }))
    .unwrap();
    namespaces.create(&Default::default(), &foreign).await.unwrap();

    let (status, text) = crate::helpers::status_text(app.create_app("taken").await).await;
    assert_eq!(status, 502);
    assert_eq!(
        text,
        "could not create app taken: namespace rack-taken already exists and is not rack's namespace of app taken; rename the app\n"
    );
    assert_eq!(app.get_app("taken").await.status(), 404, "no app is left behind");
    let namespace = namespaces.get("rack-taken").await.unwrap();
    assert_eq!(namespace.metadata.labels.unwrap()["team"], "billing", "left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_install_manifests_apply_to_a_cluster() {
    let client = admin_client().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/k8s");
    let mut applied = Vec::new();
    for file in ["namespace.yaml", "rbac.yaml", "rack.yaml"] {
        applied.extend(apply_file(&client, &root.join(file), true).await.unwrap());
    }
    for object in [
        "Namespace/rack",
        "ServiceAccount/rack",
        "ClusterRole/rack",
        "ClusterRole/rack-app",
        "ClusterRoleBinding/rack",
        "Deployment/rack",
        "Service/rack",
    ] {
        assert!(applied.iter().any(|a| a == object), "{object} missing from {applied:?}");
    }
}

/// A one-off process is a Pod of the service's image (labels like the service's, `type:
/// process`, never restarted) that the control plane schedules; `DELETE` removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_process_is_a_pod_and_delete_removes_it() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    assert_eq!(app.create_app("oneoff").await.status(), 201);
    // A service that names its image needs no build Job.
    let id = app
        .build_source(
            "oneoff",
            &[("convox.yml", "services:\n  web:\n    image: busybox:1.36\n")],
        )
        .await;
    let build = app.wait_build("oneoff", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();
    let created: Value = app
        .json(Method::POST, "/apps/oneoff/services/web/processes")
        .header("command", "sh -c 'echo migrating'")
        .header("release", release.as_str())
        .header("environment", "EXTRA=1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let name = created["id"].as_str().expect("an id").to_owned();
    assert_eq!(created["type"], "run", "{created}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "rack-oneoff");
    let pod = wait_for(60, "the pod to be scheduled", || async {
        let pod = pods.get(&name).await.ok()?;
        pod.spec.as_ref()?.node_name.as_ref()?;
        Some(pod)
    })
    .await;
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["type"], "process");
    assert_eq!(labels["service"], "web");
    assert_eq!(labels["release"], release.as_str());
    let spec = pod.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some("busybox:1.36"));
    assert_eq!(container.command.clone().unwrap(), ["sh", "-c", "echo migrating"]);
    assert!(
        container
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "EXTRA" && e.value.as_deref() == Some("1"))
    );
    let listed: Vec<Value> = app.get_json("/apps/oneoff/processes").await;
    assert!(
        listed.iter().any(|p| p["id"] == name.as_str() && p["type"] == "run"),
        "{listed:?}"
    );

    let deleted = app
        .convox(Method::DELETE, &format!("/apps/oneoff/processes/{name}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    wait_for(60, "the pod to go", || async {
        matches!(pods.get_opt(&name).await, Ok(None)).then_some(())
    })
    .await;
}

/// The hosts of an Ingress's rules.
fn ingress_hosts(ingress: &k8s_openapi::api::networking::v1::Ingress) -> Vec<String> {
    ingress
        .spec
        .as_ref()
        .and_then(|s| s.rules.as_ref())
        .map(|rules| rules.iter().filter_map(|r| r.host.clone()).collect())
        .unwrap_or_default()
}

/// Traffic from outside: a service with a port gets an Ingress for `<service>.<app>.<RACK_DOMAIN>`
/// and its `domain:` names (from the release's env), in the configured class with cert-manager's
/// annotation; an `internal` one gets none. The Ingress follows promotes and rollbacks, and goes
/// with its service's port and with the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_with_a_port_get_ingresses_that_follow_the_release() {
    use k8s_openapi::api::networking::v1::Ingress;
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "routed";
    let ns = format!("rack-{name}");
    let probe = ProbeServer::start().await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let health = "    health:\n      grace: 1\n      interval: 1\n";
    let manifest = format!(
        "services:\n  web:\n    build: .\n    port: {p}\n    domain: ${{HOST}}\n{health}  api:\n    build: .\n    port: {p}\n    internal: true\n{health}",
        p = probe.port
    );
    complete_build(&app, &client, name, &manifest).await;
    let kubelet = tokio::spawn(act_as_kubelet(client.clone(), ns.clone()));
    let release = |env: &'static str| {
        let app = &app;
        async move {
            create_release(app, name, &[("env", env)]).await["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let first = release("HOST=shop.example.com").await;
    let log = promote_follow(&app, name, &first).await;
    assert!(log.ends_with("\nOK\n"), "{log}");

    // The app's router is the ingress controller's name under the rack's domain; each service
    // shows its hosts (the port clients use is the Ingress's 443, with TLS), or its in-cluster
    // name when it is internal.
    let app_json: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(app_json["router"], "router.rack.example.org");
    let services: Vec<Value> = app.get_json(&format!("/apps/{name}/services")).await;
    let (api, web) = (&services[0], &services[1]);
    assert_eq!(web["domain"], "web.routed.rack.example.org", "{web}");
    assert_eq!(
        web["domains"],
        serde_json::json!(["web.routed.rack.example.org", "shop.example.com"])
    );
    assert_eq!(web["ports"][0]["balancer"], 443);
    assert_eq!(web["ports"][0]["container"], probe.port);
    assert_eq!(api["domain"], "api.rack-routed.svc.cluster.local", "{api}");
    assert_eq!(api["ports"][0]["balancer"], probe.port);

    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    let web = ingresses.get("web").await.unwrap();
    assert_eq!(ingress_hosts(&web), ["web.routed.rack.example.org", "shop.example.com"]);
    let spec = web.spec.clone().unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
    let annotations = web.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["cert-manager.io/cluster-issuer"], "letsencrypt");
    let tls = &spec.tls.unwrap()[0];
    assert_eq!(tls.secret_name.as_deref(), Some("web-tls"));
    let backend = spec.rules.unwrap()[0].http.clone().unwrap().paths[0]
        .backend
        .service
        .clone()
        .unwrap();
    assert_eq!(backend.name, "web");
    assert_eq!(backend.port.unwrap().number, Some(i32::from(probe.port)));
    assert!(
        ingresses.get_opt("api").await.unwrap().is_none(),
        "an internal service has no Ingress"
    );

    // A promote moves it; a rollback (a new release with the first one's build and env, as
    // `rack releases rollback` makes it) moves it back.
    let second = release("HOST=www.example.com").await;
    assert!(promote_follow(&app, name, &second).await.ends_with("\nOK\n"));
    assert_eq!(
        ingress_hosts(&ingresses.get("web").await.unwrap()),
        ["web.routed.rack.example.org", "www.example.com"]
    );
    let services: Vec<Value> = app.get_json(&format!("/apps/{name}/services")).await;
    assert_eq!(
        services[1]["domains"],
        serde_json::json!(["web.routed.rack.example.org", "www.example.com"])
    );
    let rollback = rollback_release(&app, name, &first).await;
    assert!(promote_follow(&app, name, &rollback).await.ends_with("\nOK\n"));
    assert_eq!(
        ingress_hosts(&ingresses.get("web").await.unwrap()),
        ["web.routed.rack.example.org", "shop.example.com"]
    );

    // A release whose web has no port takes the Ingress away.
    let portless = format!(
        "services:\n  web:\n    build: .\n{health}  api:\n    build: .\n    port: {p}\n    internal: true\n{health}",
        p = probe.port
    );
    let build = complete_build(&app, &client, name, &portless).await;
    let third = build["release"].as_str().unwrap().to_owned();
    let log = promote_follow(&app, name, &third).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert!(ingresses.get_opt("web").await.unwrap().is_none(), "no port, no Ingress");
    kubelet.abort();
    drop(probe);

    // And the app's deletion takes everything (its namespace) with it.
    assert_eq!(app.delete_app(name).await.status(), 200);
    namespace_gone(&client, &ns).await;
}

/// The app's last deployment once it has ended.
pub async fn deployment_end(app: &TestApp, name: &str) -> Value {
    wait_for(120, "the rollout to end", || async {
        let list: Vec<Value> = app.get_json(&format!("/apps/{name}/deployments")).await;
        list.into_iter().next().filter(|d| d["ended"].is_string())
    })
    .await
}

/// Creates app `name`, builds it and promotes its release without following it, the new pod's
/// readiness probe answered 503 (until the returned server's `ready` is set): the rollout is
/// waiting when this returns. Also how many requests rack had made about the app's namespace
/// before the promote.
async fn held_rollout(app: &TestApp, name: &str) -> (ProbeServer, usize) {
    let client = admin_client().await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let probe = ProbeServer::unready().await;
    let build = complete_build(app, &client, name, &manifest(probe.port)).await;
    let release = build["release"].as_str().unwrap().to_owned();
    // Counted after the build: what follows is the rollout's alone.
    let before = rack_requests(&format!("rack-{name}")).len();
    let response = app
        .convox(Method::POST, &format!("/apps/{name}/releases/{release}/promote"))
        .form(&[("timeout", "600")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Once the kubelet probes the new pod and rack has listed the Deployments and the new pods
    // to start its watches, the rollout is waiting for the pod to become ready. (On a loaded
    // machine the kubelet can probe the pod first. A watch shows in the audit log only once
    // something is sent on it; its list, paged by kube's watcher, shows at once.)
    wait_for(60, "the new pod to be probed", || async {
        (probe.probes.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    let new_pods = format!("release%3D{release}");
    wait_for(
        60,
        "rack to list the Deployments and the new pods for its watches",
        || async {
            let requests = rack_requests(&format!("rack-{name}"));
            let listed = |resource: &str, uri: &str| {
                requests[before..].iter().any(|r| {
                    r.verb == "list"
                        && r.uri.contains("limit=")
                        && r.uri.contains(uri)
                        && r.object.as_ref().is_some_and(|o| o.resource == resource)
                })
            };
            (listed("deployments", "type%3Dservice") && listed("pods", &new_pods)).then_some(())
        },
    )
    .await;
    (probe, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_waits_on_watches_not_on_requests_per_second() {
    let app = spawn_kube().await;
    let name = "kubewatch";
    let ns = format!("rack-{name}");
    let (probe, before) = held_rollout(&app, name).await;
    let waiting = rack_requests(&ns).len();
    let probed = probe.probes.load(Ordering::SeqCst);
    // The probe period is 1 s: ten more probes are ten seconds of waiting, in which polling
    // once a second would have listed the Deployments and pods twenty times.
    wait_for(60, "ten more probes", || async {
        (probe.probes.load(Ordering::SeqCst) >= probed + 10).then_some(())
    })
    .await;
    let during = rack_requests(&ns).split_off(waiting);
    assert!(during.is_empty(), "rack made requests while it waited: {during:#?}");

    probe.ready.store(true, Ordering::SeqCst);
    let deployment = deployment_end(&app, name).await;
    assert_eq!(deployment["state"], "running", "{deployment}");
    let rollout = rack_requests(&ns).split_off(before);
    let watches = rollout.iter().filter(|r| r.verb == "watch").count();
    eprintln!(
        "the rollout cost {} requests to the API server, {watches} of them watches",
        rollout.len()
    );
    assert!(rollout.len() < 40, "{rollout:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_the_api_server_drops_resumes_and_sees_the_rollout_end() {
    let proxy = ApiProxy::start().await;
    let app = spawn_kube_with(proxy.kubeconfig.clone()).await;
    let client = admin_client().await;
    let name = "kubedrop";
    let ns = format!("rack-{name}");
    let (probe, _) = held_rollout(&app, name).await;

    // The API server goes away, breaking rack's watches, and the rollout finishes meanwhile.
    proxy.cut();
    let cut_at = rack_requests(&ns).len();
    probe.ready.store(true, Ordering::SeqCst);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for(60, "the Deployment to roll out unseen", || async {
        let web = deployments.get("web").await.unwrap();
        web.status
            .filter(|s| s.available_replicas == Some(1) && s.updated_replicas == Some(1) && s.replicas == Some(1))
            .map(|_| ())
    })
    .await;
    let list: Vec<Value> = app.get_json(&format!("/apps/{name}/deployments")).await;
    assert!(list[0]["ended"].is_null(), "rack cannot have seen the end: {}", list[0]);

    proxy.restore();
    let deployment = deployment_end(&app, name).await;
    assert_eq!(deployment["state"], "running", "{deployment}");
    // It resumed the watch from the resource version it had seen, without listing again.
    let after = rack_requests(&ns).split_off(cut_at);
    let on_deployments: Vec<&crate::kubeenv::AuditedRequest> = after
        .iter()
        .filter(|r| r.object.as_ref().is_some_and(|o| o.resource == "deployments"))
        .collect();
    assert!(
        on_deployments
            .iter()
            .any(|r| r.verb == "watch" && r.uri.contains("resourceVersion=")),
        "{on_deployments:#?}"
    );
    assert!(!on_deployments.iter().any(|r| r.verb == "list"), "{on_deployments:#?}");
}

/// The app's CronJobs as the test cluster (1.20) serves them: batch/v1beta1.
fn cronjobs(client: &Client, ns: &str) -> Api<kube::api::DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("batch", "v1beta1", "CronJob");
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, "cronjobs");
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Timers become CronJobs (in the batch version the server has) with their service's image and
/// env, and their runs are processes; they move to a release once it runs, and go with it.
/// Balancers become Services of type LoadBalancer, listed with the address the cloud gives
/// (one protocol each: 1.20 refuses TCP and UDP on one load balancer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_become_cronjobs_and_balancers_load_balancer_services() {
    use k8s_openapi::api::core::v1::Service;
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "timed";
    let ns = format!("rack-{name}");
    let probe = ProbeServer::start().await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let services = format!(
        "services:\n  web:\n    build: .\n    port: {p}\n    health:\n      grace: 1\n      interval: 1\n  worker:\n    build: .\n    command: bin/worker\n",
        p = probe.port
    );
    let manifest = format!(
        "{services}timers:\n  cleanup:\n    schedule: \"* * * * *\"\n    command: bin/cleanup --all\n    service: worker\n    concurrency: forbid\n  report:\n    schedule: \"@daily\"\n    command: bin/report\n    service: web\nbalancers:\n  custom:\n    service: web\n    ports:\n      5000: {p}\n      6000:\n        port: {p}\n    whitelist:\n      - 10.0.0.0/16\n      - 192.0.2.7\n  dns:\n    service: worker\n    ports:\n      53:\n        port: 5353\n        protocol: udp\n",
        p = probe.port
    );
    let build = complete_build(&app, &client, name, &manifest).await;
    let build_id = build["id"].as_str().unwrap().to_owned();
    let first = create_release(&app, name, &[("env", "REGION=eu")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, name, &first).await;
    assert!(log.ends_with("\nOK\n"), "{log}");

    let timers = cronjobs(&client, &ns);
    let cleanup = timers.get("timer-cleanup").await.unwrap();
    let spec = &cleanup.data["spec"];
    assert_eq!(spec["schedule"], "* * * * *");
    assert_eq!(spec["concurrencyPolicy"], "Forbid");
    let pod = &spec["jobTemplate"]["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["release"], first.as_str());
    assert_eq!(pod["metadata"]["labels"]["type"], "timer");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["command"],
        serde_json::json!(["/bin/sh", "-c", "bin/cleanup --all"])
    );
    assert_eq!(
        container["image"],
        format!("{REGISTRY}/{name}:worker.{build_id}").as_str()
    );
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v["value"].as_str()?.to_owned())))
        .collect();
    assert!(env.contains(&("REGION".to_owned(), "eu".to_owned())), "{env:?}");
    assert!(env.contains(&("TIMER".to_owned(), "cleanup".to_owned())), "{env:?}");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    let report = timers.get("timer-report").await.unwrap();
    assert_eq!(report.data["spec"]["schedule"], "@daily");
    assert_eq!(report.data["spec"]["concurrencyPolicy"], "Allow");

    // The CronJob controller starts a run within the minute; it is a process of the app (the
    // worker's), until it ends.
    let run: Value = wait_for(90, "the timer's first run in ps", || async {
        let processes: Vec<Value> = app.get_json(&format!("/apps/{name}/processes")).await;
        processes.into_iter().find(|p| p["command"] == "bin/cleanup --all")
    })
    .await;
    assert_eq!(run["name"], "worker", "{run}");
    assert_eq!(run["release"], first.as_str());
    assert_eq!(run["type"], "run");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let run_pod = wait_for(60, "the run's pod to be scheduled", || async {
        let pod = pods.get(run["id"].as_str().unwrap()).await.unwrap();
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .map(|_| pod.clone())
    })
    .await;
    finish_pod(&client, &ns, &run_pod, None).await;
    wait_for(60, "the run to show as complete", || async {
        let processes: Vec<Value> = app.get_json(&format!("/apps/{name}/processes")).await;
        processes
            .into_iter()
            .find(|p| p["id"] == run["id"] && p["status"] == "complete")
    })
    .await;

    // The balancer: a LoadBalancer Service to web's ready pods, with its whitelist.
    let services_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let balancer = services_api.get("balancer-custom").await.unwrap();
    let spec = balancer.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.load_balancer_source_ranges.clone().unwrap(),
        ["10.0.0.0/16", "192.0.2.7/32"]
    );
    let selector = spec.selector.clone().unwrap();
    assert_eq!(
        (
            selector["app"].as_str(),
            selector["service"].as_str(),
            selector["type"].as_str()
        ),
        (name, "web", "service")
    );
    let listed: Vec<Value> = app.get_json(&format!("/apps/{name}/balancers")).await;
    let expected_ports = serde_json::json!([
        { "protocol": "TCP", "source": 5000, "target": probe.port },
        { "protocol": "TCP", "source": 6000, "target": probe.port },
    ]);
    assert_eq!(
        listed,
        [
            serde_json::json!({ "name": "custom", "service": "web", "endpoint": "", "ports": expected_ports }),
            serde_json::json!({ "name": "dns", "service": "worker", "endpoint": "",
                "ports": [{ "protocol": "UDP", "source": 53, "target": 5353 }] }),
        ]
    );
    // A cloud's controller gives it an address, which the list shows.
    services_api
        .patch_status(
            "balancer-custom",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({
                "status": { "loadBalancer": { "ingress": [{ "ip": "203.0.113.10" }] } }
            })),
        )
        .await
        .unwrap();
    let listed: Vec<Value> = app.get_json(&format!("/apps/{name}/balancers")).await;
    assert_eq!(listed[0]["endpoint"], "203.0.113.10");

    // The next release changes one timer and drops the other and the balancer.
    let next_manifest = format!(
        "{services}timers:\n  cleanup:\n    schedule: \"*/5 * * * *\"\n    command: bin/cleanup\n    service: worker\n"
    );
    let build = complete_build(&app, &client, name, &next_manifest).await;
    let second = build["release"].as_str().unwrap().to_owned();
    let log = promote_follow(&app, name, &second).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert!(log.contains("Removing timer-report"), "{log}");
    assert!(log.contains("Removing balancer-custom"), "{log}");
    assert!(log.contains("Removing balancer-dns"), "{log}");
    let cleanup = timers.get("timer-cleanup").await.unwrap();
    assert_eq!(cleanup.data["spec"]["schedule"], "*/5 * * * *");
    let labels = &cleanup.data["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["release"], second.as_str());
    assert!(timers.get_opt("timer-report").await.unwrap().is_none());
    assert!(services_api.get_opt("balancer-custom").await.unwrap().is_none());
    let listed: Vec<Value> = app.get_json(&format!("/apps/{name}/balancers")).await;
    assert!(listed.is_empty());

    // A release that never becomes healthy is rolled back without ever moving the timers.
    let broken = format!(
        "services:\n  web:\n    build: .\n    port: {p}\n    health:\n      grace: 1\n      interval: 1\n  worker:\n    build: .\ntimers:\n  cleanup:\n    schedule: \"@hourly\"\n    command: bin/cleanup\n    service: worker\n",
        p = closed_port()
    );
    let build = complete_build(&app, &client, name, &broken).await;
    let third = build["release"].as_str().unwrap().to_owned();
    let log = promote_follow_within(&app, name, &third, Some(10)).await;
    assert!(log.contains("Status: Rollback => Reverted"), "{log}");
    let cleanup = timers.get("timer-cleanup").await.unwrap();
    assert_eq!(cleanup.data["spec"]["schedule"], "*/5 * * * *");
    drop(probe);

    assert_eq!(app.delete_app(name).await.status(), 200);
    namespace_gone(&client, &ns).await;
}

/// A redis import on Kubernetes checks the upload before it touches anything (not an RDB file:
/// 422), and needs the resource's pod running (the file goes into it: tests/api/real_node.rs
/// imports into a real one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_import_checks_the_upload_and_needs_the_resource_running() {
    let app = spawn_kube().await;
    assert_eq!(app.create_app("kv").await.status(), 201);
    let new = rack::store::resources::NewResource {
        name: "cache",
        kind: "redis",
        definition: serde_json::json!({ "options": {}, "image": null }),
        username: "default",
        password: "secret",
        database: "0",
    };
    rack::store::resources::ensure(&app.state.pool, "kv", &[new])
        .await
        .unwrap();
    let import = |body: Vec<u8>| {
        app.convox(Method::PUT, "/apps/kv/resources/cache/data")
            .body(body)
            .send()
    };
    let (status, text) = crate::helpers::status_text(import(b"SET a b\n".to_vec()).await.unwrap()).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("not an RDB file"), "{text}");
    // A well-formed RDB file (header, end-of-file opcode, checksum), but no pod to load it.
    let mut rdb = b"REDIS0011".to_vec();
    rdb.push(0xFF);
    rdb.extend_from_slice(&[0; 8]);
    let (status, text) = crate::helpers::status_text(import(rdb).await.unwrap()).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("is not running"), "{text}");
}

/// `convox instances` on Kubernetes: the cluster's nodes, as rack's own service account (with
/// the rights of docker/k8s/rbac.yaml) sees them.
#[tokio::test]
async fn instances_are_the_cluster_s_nodes() {
    let app = spawn_kube().await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin_client().await);
    let mut names: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    names.sort();
    assert!(!names.is_empty());
    let response = app.convox(Method::GET, "/instances?").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let instances: Vec<Value> = response.json().await.unwrap();
    let mut ids: Vec<String> = instances.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, names);
    for instance in &instances {
        assert!(instance["cpu-allocatable"].as_f64().unwrap() > 0.0, "{instance}");
        assert!(instance["memory-capacity"].as_f64().unwrap() > 0.0, "{instance}");
        assert!(
            matches!(instance["status"].as_str(), Some("running" | "pending")),
            "{instance}"
        );
    }
}
