//! Kubernetes rollouts judged by what the cluster tells of the new pods (see `kubeenv`): a
//! release whose new pod restarts, or whose new pod was ready and then is not, during the
//! analysis window is rolled back, with the reason in the log and a `deployment.analysis` event;
//! so is one whose rollout another rack replica took over (the one that began it was killed).

use std::sync::atomic::Ordering;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use reqwest::Method;
use serde_json::Value;

use crate::deploys::promote_follow;
use crate::helpers::{TestApp, wait_for};
use crate::kubeenv::{ProbeServer, admin_client, finish_pod};
use crate::kubernetes::{Replicas, build_and_promote, build_pod, complete_build, deployment_end, spawn_kube};
use crate::replicas::Replica;

fn manifest(port: u16) -> String {
    format!(
        "services:\n  web:\n    build: .\n    port: {port}\n    health:\n      grace: 1\n      interval: 1\n    deployment:\n      analysis:\n        window: 90\n"
    )
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// An app whose first release runs, and the second promoted (not followed) until the analysis
/// watches its ready pod; returns the two releases, the new pod, the deployment's path and its
/// release's probe server.
async fn watched_release(app: &TestApp, name: &str) -> (String, String, Pod, String, ProbeServer, ProbeServer) {
    let client = admin_client().await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let first_probe = ProbeServer::start().await;
    let good = complete_build(app, &client, name, &manifest(first_probe.port)).await;
    let good = good["release"].as_str().unwrap().to_owned();
    let log = promote_follow(app, name, &good).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert!(!log.contains("analysis"), "a first release is not analysed: {log}");

    let probe = ProbeServer::start().await;
    let (next, location) = build_and_promote(app, &client, name, &manifest(probe.port)).await;
    wait_for(120, "the analysis to watch the new pods", || async {
        let log = app.app_log(name).await;
        log.contains(&format!("analysis: watching the new pods of {next}"))
            .then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    let pod = wait_for(60, "the new pod to be ready", || async {
        let selector = ListParams::default().labels(&format!("release={next}"));
        pods.list(&selector).await.unwrap().items.into_iter().find(is_ready)
    })
    .await;
    (good, next, pod, location, first_probe, probe)
}

async fn rolled_back(app: &TestApp, name: &str, good: &str, next: &str, location: &str, why: &str) {
    let end = deployment_end(app, name).await;
    assert_eq!(end["state"], "reverted", "{end}");
    let log = app.get_text(&format!("{location}/events")).await;
    let line = log
        .lines()
        .find(|l| l.contains(" system/k8s/web analysis: pod "))
        .unwrap_or_else(|| panic!("no analysis line in:\n{log}"));
    assert!(
        line.contains(why) && line.ends_with("within 90s of its rollout: rolling back"),
        "{line}"
    );
    assert!(log.contains("Status: Rollback => Reverted"), "{log}");
    let info: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(info["release"], good);
    let events = app
        .request(
            Method::GET,
            &format!("/events?follow=false&after=0&app={name}&kind=deployment.analysis"),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event: Value = serde_json::from_str(events.lines().last().expect("an analysis event")).unwrap();
    assert_eq!(event["data"]["verdict"], "failed", "{event}");
    assert_eq!(event["release_id"], next, "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_new_pod_restarts_is_rolled_back() {
    let app = spawn_kube().await;
    let name = "kuberestarts";
    let (good, next, pod, location, _first, _probe) = watched_release(&app, name).await;
    // The kubelet reports that the container restarted (hollow nodes never restart one).
    let client = admin_client().await;
    let pods: Api<Pod> = Api::namespaced(client, &format!("rack-{name}"));
    let container = pod.spec.as_ref().unwrap().containers[0].name.clone();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let patch = serde_json::json!({ "status": { "containerStatuses": [{
        "name": container, "image": "x", "imageID": "", "ready": true, "restartCount": 1,
        "state": { "running": { "startedAt": now } },
    }]}});
    pods.patch_status(
        pod.metadata.name.as_deref().unwrap(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
    rolled_back(&app, name, &good, &next, &location, "restarted 1 time(s)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_new_pod_stops_being_ready_is_rolled_back() {
    let app = spawn_kube().await;
    let name = "kubeflaps";
    let (good, next, _pod, location, _first, probe) = watched_release(&app, name).await;
    // Its readiness probe starts failing: the kubelet marks the pod unready.
    probe.ready.store(false, Ordering::SeqCst);
    rolled_back(&app, name, &good, &next, &location, "was ready and no longer is").await;
}

/// Builds `manifest` on `replica` and returns its release.
async fn replica_release(replica: &Replica, name: &str, manifest: &str) -> String {
    let client = admin_client().await;
    let ns = format!("rack-{name}");
    let id = replica
        .build(name, &[("convox.yml", manifest), ("Dockerfile", "FROM scratch\n")])
        .await;
    let build = format!("/apps/{name}/builds/{id}");
    let pod = build_pod(&client, &ns, &id, async || replica.json(&build).await).await;
    finish_pod(&client, &ns, &pod, None).await;
    replica.wait_build(name, &id).await["release"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The deployment at `location` once it has ended, as `replica` tells.
async fn ended(replica: &Replica, location: &str) -> Value {
    wait_for(120, "the deployment to end", || async {
        let d = replica.json(location).await;
        d["ended"].is_string().then_some(d)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_taken_over_by_another_replica_is_still_analysed() {
    let replicas = Replicas::new().await;
    let name = "kubetakeover";
    let mut doomed = replicas.start().await;
    crate::replicas::create_app(&doomed, name).await;
    let first_probe = ProbeServer::start().await;
    let first = replica_release(&doomed, name, &manifest(first_probe.port)).await;
    let response = doomed
        .request(Method::POST, &format!("/apps/{name}/releases/{first}/promote"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(ended(&doomed, &location).await["state"], "running");

    // The next release's pod is not ready yet when the replica rolling it out is killed: the
    // Deployment is already on the new release when the survivor applies it again.
    let probe = ProbeServer::unready().await;
    let next = replica_release(&doomed, name, &manifest(probe.port)).await;
    let response = doomed
        .request(Method::POST, &format!("/apps/{name}/releases/{next}/promote"))
        .form(&[("timeout", "600")])
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    wait_for(60, "the new pod to be probed", || async {
        (probe.probes.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    doomed.kill_9().await;
    let survivor = replicas.start().await;
    probe.ready.store(true, Ordering::SeqCst);
    // The app's log so far (the deployment's events would follow it to its end).
    wait_for(120, "the survivor to analyse the new pods", || async {
        let log = survivor
            .request(Method::GET, &format!("/apps/{name}/logs"))
            .header("follow", "false")
            .header("since", "0")
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        log.contains(&format!("analysis: watching the new pods of {next}"))
            .then_some(())
    })
    .await;
    // Its readiness probe starts failing: the kubelet marks the pod unready, which the
    // survivor's watch of the new pods sees.
    probe.ready.store(false, Ordering::SeqCst);
    let end = ended(&survivor, &location).await;
    let log = survivor
        .request(Method::GET, &format!("{location}/events"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(end["state"], "reverted", "{end}\n{log}");
    assert!(
        log.contains(" system/k8s/web analysis: pod ") && log.contains("was ready and no longer is"),
        "{log}"
    );
    let app = survivor.json(&format!("/apps/{name}")).await;
    assert_eq!(app["release"], first.as_str());
}
