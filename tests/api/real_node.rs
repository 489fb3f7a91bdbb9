//! The Kubernetes runtime on a real node (`kubeenv::real_node_env`: a control plane with one
//! node that runs containerd, runc and a real kubelet): rack deploys an app whose pod really
//! runs there, a real process answers the real readiness probe, and its logs, exec and restarts
//! go through the real kubelet. The hollow-node tests (tests/api/kubernetes.rs) cover the rest.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::Value;

use crate::deploys::promote_follow;
use crate::helpers::{TestApp, wait_for};
use crate::kubeenv::{REAL_NODE, REAL_NODE_IMAGE, REAL_NODE_POD_PREFIX, client_for, real_node_env};

mod backup;
mod in_cluster;

/// A rack on the real node's cluster (its own control plane), as rack's service account.
async fn spawn_on_real_node() -> TestApp {
    TestApp::spawn_with(on_real_node).await
}

/// Points `config` at the real node's cluster, as rack's service account.
fn on_real_node(config: &mut rack::config::Config) {
    config.runtime = rack::config::RuntimeKind::Kube;
    config.kube = Some(rack::config::KubeConfig {
        // Services name their image (imported into the node's containerd): no builds here.
        registry: "registry.invalid/rack".to_owned(),
        url: "http://rack.rack.svc.cluster.local:5443".to_owned(),
        builder: rack::config::KubeBuilder::Kaniko,
        builder_image: "registry.invalid/kaniko:unused".to_owned(),
        fetch_image: REAL_NODE_IMAGE.to_owned(),
        service_account: Some(("rack".to_owned(), "rack".to_owned())),
        kubeconfig: Some(real_node_env().rack.clone()),
        ingress: Default::default(),
        prometheus_url: None,
    });
}

/// A web service of busybox's httpd that says it starts (with a word of its own each time), is
/// unready (404 on /health) for its first 3 seconds, then answers `ok`.
fn web_manifest() -> String {
    let command = "echo \"web starting $(cat /proc/sys/kernel/random/uuid)\"; mkdir -p /tmp/www; \
                   (sleep 3; echo ok >/tmp/www/health; echo web ready) & exec httpd -f -p 8080 -h /tmp/www";
    format!(
        "services:\n  web:\n    image: {REAL_NODE_IMAGE}\n    command: {command:?}\n    port: 8080\n    \
         health:\n      path: /health\n      grace: 1\n      interval: 1\n"
    )
}

/// GET `url`'s body, or `None` if it does not answer 200 within a few seconds.
async fn get_ok(url: &str) -> Option<String> {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.text().await.ok()
}

/// The app's running service pods (not being deleted), by name.
async fn web_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&ListParams::default().labels("service=web"))
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The pod's Ready condition, if true, and the pod's IP.
fn ready_ip(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then(|| status.pod_ip.clone()).flatten()
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

/// The host pids of the processes of container `id` (their cgroup path ends with it).
fn container_pids(id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup"))
            && cgroups.lines().any(|line| line.ends_with(id))
        {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_runs_on_the_real_node_with_probes_logs_exec_and_restarts_through_the_kubelet() {
    let app = spawn_on_real_node().await;
    let client = client_for(&real_node_env().admin).await;
    let name = "realweb";
    let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    assert_eq!(app.create_app(name).await.status(), 201);
    let id = app.build_source(name, &[("convox.yml", &web_manifest())]).await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();

    // The rollout ends OK only once the real process answers the real kubelet's probe.
    let log = promote_follow(&app, name, &release).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    let pod = web_pods(&pods).await.into_iter().next().expect("a web pod");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(REAL_NODE));
    let ip = ready_ip(&pod).expect("the pod is Ready after the rollout");
    assert!(ip.starts_with(REAL_NODE_POD_PREFIX), "pod IP {ip}");
    // Ready no sooner than the process made /health answer (3 s after it started; the
    // timestamps have whole seconds).
    let status = pod.status.as_ref().unwrap();
    let started = status.container_statuses.as_ref().unwrap()[0]
        .state
        .as_ref()
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.clone())
        .expect("a running container")
        .0;
    let ready_at = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.last_transition_time.clone())
        .expect("a Ready time")
        .0;
    assert!(
        ready_at.as_second() >= started.as_second() + 2,
        "Ready at {ready_at}, the process started at {started}"
    );
    // The pod's address is on this namespace's bridge: the test reaches the real process.
    let health = format!("http://{ip}:8080/health");
    assert_eq!(get_ok(&health).await.as_deref(), Some("ok\n"));

    // Logs come from the container through the kubelet.
    app.wait_for_log_line(name, "web ready", 60).await;
    let logged = app.app_log(name).await;
    assert!(logged.contains("web starting "), "{logged}");

    // Exec through the kubelet's streaming server: output and exit code. Without stdin: on
    // this API server (1.20, exec protocol v4) an exec's stdin cannot be closed on its own, so
    // the client closes the whole connection when stdin ends, output and exit code included.
    let process = pod.metadata.name.clone().unwrap();
    let (output, code) = crate::run::exec_output(
        &app,
        &format!("/apps/{name}/processes/{process}/exec"),
        &[
            ("command", "sh -c 'cat /tmp/www/health; hostname; exit 3'"),
            ("tty", "false"),
            ("disable-stdin", "true"),
        ],
    )
    .await;
    assert!(output.contains("ok\n"), "{output:?} (exit code {code:?})");
    assert!(output.contains(&process), "the pod's hostname in {output:?}");
    assert_eq!(code, Some(3), "{output:?}");

    // cp through the kubelet (a length-delimited tar, stdin never closed): the pod's httpd
    // serves what was copied, and it comes back out as a tar.
    crate::cp::kube_round_trip(&app, name, &process, &format!("http://{ip}:8080/copied.txt")).await;

    // Killing the real process (from the host, as the OOM killer would): the kubelet restarts
    // the container, and the followed log shows its successor starting.
    let mut follow = app
        .untimed_client()
        .get(app.url(&format!("/apps/{name}/logs")))
        .basic_auth("convox", Some(crate::helpers::PASSWORD))
        .header("follow", "true")
        .header("since", "0")
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let container = status.container_statuses.as_ref().unwrap()[0]
        .container_id
        .clone()
        .expect("a container id");
    let container = container.trim_start_matches("containerd://").to_owned();
    let pids = container_pids(&container);
    assert!(!pids.is_empty(), "no process in the cgroup of container {container}");
    for pid in &pids {
        // SIGKILL from outside the container's pid namespace: not ignorable by its init.
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
    let restarted = wait_for(120, "the container to be restarted and Ready", || async {
        let pod = pods.get(&process).await.ok()?;
        (restarts(&pod) >= 1 && ready_ip(&pod).is_some()).then_some(pod)
    })
    .await;
    assert_eq!(
        ready_ip(&restarted).as_deref(),
        Some(ip.as_str()),
        "same sandbox, same IP"
    );
    assert_eq!(get_ok(&health).await.as_deref(), Some("ok\n"));
    let mut seen = String::new();
    let starts = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let starts: std::collections::HashSet<String> = seen
                .lines()
                .filter_map(|l| l.split_once("web starting ").map(|(_, word)| word.trim().to_owned()))
                .collect();
            if starts.len() >= 2 {
                return starts;
            }
            let chunk = follow.next().await.expect("the followed log goes on").unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no second start in the followed log:\n{seen}"));
    assert_eq!(starts.len(), 2, "{seen}");
    drop(follow);

    // A deleted pod is replaced, on the real node, by one that answers on its own address.
    pods.delete(&process, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let replacement = wait_for(120, "a Ready replacement pod", || async {
        web_pods(&pods)
            .await
            .into_iter()
            .find(|p| p.metadata.name.as_deref() != Some(process.as_str()) && ready_ip(p).is_some())
    })
    .await;
    assert_eq!(replacement.spec.as_ref().unwrap().node_name.as_deref(), Some(REAL_NODE));
    let new_ip = ready_ip(&replacement).unwrap();
    assert_eq!(
        get_ok(&format!("http://{new_ip}:8080/health")).await.as_deref(),
        Some("ok\n")
    );
    let processes: Vec<Value> = app.get_json(&format!("/apps/{name}/processes")).await;
    let replacement_name = replacement.metadata.name.clone().unwrap();
    assert!(
        processes.iter().any(|p| p["id"] == replacement_name.as_str()),
        "{processes:?}"
    );

    // Deleting the app removes its namespace and, with it, its containers on the node.
    let last = replacement
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .expect("a container id");
    let last = last.trim_start_matches("containerd://").to_owned();
    assert!(!container_pids(&last).is_empty(), "no process of container {last}");
    assert_eq!(app.delete_app(name).await.status(), 200);
    wait_for(180, "the app's containers to go", || async {
        container_pids(&last).is_empty().then_some(())
    })
    .await;
}

/// A release whose process exits at once: the real kubelet restarts it into CrashLoopBackOff,
/// rack fails the rollout on that and applies the previous release again, whose pod never
/// stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_release_on_the_real_node_is_rolled_back() {
    let app = spawn_on_real_node().await;
    let client = client_for(&real_node_env().admin).await;
    let name = "realcrash";
    let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    assert_eq!(app.create_app(name).await.status(), 201);
    let good = app.build_release(name, &[("convox.yml", &web_manifest())]).await;
    let log = promote_follow(&app, name, &good).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    let pod = web_pods(&pods).await.into_iter().next().expect("a web pod");
    let ip = ready_ip(&pod).expect("a Ready pod");

    let crashing = format!(
        "services:\n  web:\n    image: {REAL_NODE_IMAGE}\n    command: \"echo crashing; exit 1\"\n    port: 8080\n    \
         health:\n      path: /health\n      grace: 1\n      interval: 1\n"
    );
    let bad = app.build_release(name, &[("convox.yml", &crashing)]).await;
    let log = promote_follow(&app, name, &bad).await;
    assert!(log.contains("CrashLoopBackOff"), "{log}");
    assert!(log.contains("Rollback"), "{log}");
    assert!(!log.ends_with("\nOK\n"), "{log}");
    let app_json: Value = app.get_app(name).await.json().await.unwrap();
    assert_eq!(app_json["release"], good.as_str());
    // The good release's pod answered throughout and still does; the crashing pods are gone.
    assert_eq!(
        get_ok(&format!("http://{ip}:8080/health")).await.as_deref(),
        Some("ok\n")
    );
    wait_for(120, "only the good release's pods", || async {
        let pods = web_pods(&pods).await;
        pods.iter()
            .all(|p| p.metadata.labels.as_ref().and_then(|l| l.get("release")) == Some(&good))
            .then_some(())
    })
    .await;
}

/// The release phase is a one-off pod on the real node: its real output is in the rollout log
/// before the rollout, and its real exit code decides whether the rollout happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_phase_runs_as_a_real_one_off_pod_and_its_exit_code_counts() {
    let app = spawn_on_real_node().await;
    let name = "realphase";
    assert_eq!(app.create_app(name).await.status(), 201);
    let manifest = |release: &str| {
        format!(
            "services:\n  web:\n    image: {REAL_NODE_IMAGE}\n    command: \"mkdir -p /tmp/w && echo ok >/tmp/w/health && exec httpd -f -p 8080 -h /tmp/w\"\n    \
             port: 8080\n    release: {release:?}\n    health:\n      path: /health\n      grace: 1\n      interval: 1\n"
        )
    };
    let first = app
        .build_release(
            name,
            &[("convox.yml", &manifest("echo migrating in $(hostname); exit 0"))],
        )
        .await;
    let log = promote_follow(&app, name, &first).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    let position = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing in:\n{log}"))
    };
    assert!(position("Status: Pending => Releasing") < position("migrating in "));
    assert!(position("migrating in ") < position("Status: Releasing => Updating"));

    let second = app
        .build_release(name, &[("convox.yml", &manifest("echo the migration broke; exit 3"))])
        .await;
    let log = promote_follow(&app, name, &second).await;
    assert!(log.contains("the migration broke"), "{log}");
    assert!(log.contains("Status: Releasing => Error"), "{log}");
    let last = log.lines().last().unwrap();
    assert!(last.contains("exited with code 3"), "{log}");
    let info: Value = app.get_json(&format!("/apps/{name}")).await;
    assert_eq!(info["release"], first.as_str());
}

/// The redis image of the real node (`scripts/kube-testenv build`: Debian's redis binaries and
/// busybox), which a resource names as its `image:`.
const REDIS_IMAGE: &str = "localhost/rack-testenv/redis:1";

/// What `command` (a shell line) prints in the server container of resource pod `pod`, run
/// through the kubelet as an administrator would (`redis-cli` reads the password from the
/// container's environment).
async fn in_resource_pod(pods: &Api<Pod>, pod: &str, command: &str) -> String {
    use tokio::io::AsyncReadExt;
    let params = kube::api::AttachParams::default()
        .container("server")
        .stdin(false)
        .stdout(true)
        .stderr(true);
    let mut attached = pods
        .exec(pod, ["sh", "-c", command], &params)
        .await
        .unwrap_or_else(|e| panic!("exec {command:?} in {pod}: {e}"));
    let mut out = String::new();
    attached.stdout().unwrap().read_to_string(&mut out).await.unwrap();
    let _ = attached.join().await;
    out.trim().to_owned()
}

/// The resource pod's state: its uid, the server's restarts, and whether it is Ready.
fn server_state(pod: &Pod) -> (String, i32, bool) {
    (
        pod.metadata.uid.clone().unwrap_or_default(),
        restarts(pod),
        ready_ip(pod).is_some(),
    )
}

/// A redis resource on the real node, replaying `convox resources export` and `import`: its
/// StatefulSet's pod runs real redis on a real volume (a hostPath PersistentVolume the test
/// makes, bound to the claim by the controller); the export is an RDB; an import of it brings
/// back the data as it was exported (redis restarted on it, in place); a file redis cannot load
/// is refused with the data untouched; the data survives the pod being deleted and re-made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_resource_on_the_real_node_exports_imports_and_keeps_its_data() {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    use kube::api::PostParams;

    let app = spawn_on_real_node().await;
    let client = client_for(&real_node_env().admin).await;
    let name = "realredis";
    let ns = format!("rack-{name}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // The volume: a directory of this test, offered to exactly the claim the StatefulSet makes.
    let volume_dir = tempfile::tempdir().unwrap();
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let pv_name = format!("{name}-cache");
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": { "name": pv_name },
        "spec": {
            // What the claim asks for (a redis resource's default storage, 10 GB).
            "capacity": { "storage": "10Gi" },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": { "path": volume_dir.path().to_str().unwrap(), "type": "Directory" },
            "claimRef": { "namespace": ns, "name": "data-resource-cache-0" },
        },
    }))
    .unwrap();
    volumes.create(&PostParams::default(), &pv).await.unwrap();

    assert_eq!(app.create_app(name).await.status(), 201);
    let manifest = format!(
        "resources:\n  cache:\n    type: redis\n    image: {REDIS_IMAGE}\n\
         services:\n  web:\n    image: {REAL_NODE_IMAGE}\n    \
         command: \"mkdir -p /tmp/w && echo ok >/tmp/w/health && exec httpd -f -p 8080 -h /tmp/w\"\n    \
         port: 8080\n    resources:\n      - cache\n    health:\n      path: /health\n      grace: 1\n      interval: 1\n"
    );
    let release = app.build_release(name, &[("convox.yml", &manifest)]).await;
    let started = std::time::Instant::now();
    let log = promote_follow(&app, name, &release).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert!(log.contains("resource/cache ready"), "{log}");
    eprintln!("deployed with a redis resource in {:?}", started.elapsed());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim = claims.get("data-resource-cache-0").await.unwrap();
    assert_eq!(claim.spec.unwrap().volume_name.as_deref(), Some(pv_name.as_str()));
    let pod = "resource-cache-0";
    let first = pods.get(pod).await.unwrap();
    assert_eq!(first.spec.as_ref().unwrap().node_name.as_deref(), Some(REAL_NODE));

    // The linked service gets the resource's variables from its Secret.
    let web = web_pods(&pods).await.into_iter().next().expect("a web pod");
    let (output, code) = crate::run::exec_output(
        &app,
        &format!("/apps/{name}/processes/{}/exec", web.metadata.name.unwrap()),
        &[
            ("command", "sh -c 'echo $CACHE_URL'"),
            ("tty", "false"),
            ("disable-stdin", "true"),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains(&format!("@resource-cache.{ns}.svc.cluster.local:6379")),
        "{output}"
    );

    // Data, then its export (an RDB, through a port-forward to the pod).
    let cli = |command: &str| format!("redis-cli -h 127.0.0.1 {command}");
    assert_eq!(in_resource_pod(&pods, pod, &cli("SET note original")).await, "OK");
    assert_eq!(in_resource_pod(&pods, pod, &cli("RPUSH list a b c")).await, "3");
    let rdb = crate::resources::export(&app, name, "cache").await;
    assert!(rdb.starts_with(b"REDIS"), "an RDB file");

    // Changed after the export: the import brings back the exported data, and only it.
    in_resource_pod(&pods, pod, &cli("SET note changed")).await;
    in_resource_pod(&pods, pod, &cli("DEL list")).await;
    in_resource_pod(&pods, pod, &cli("SET extra 1")).await;
    let before = server_state(&pods.get(pod).await.unwrap());

    // Not an RDB file: refused before anything is touched. One redis cannot load (a version
    // from the future): refused in the pod, the server never stopped.
    let (status, text) = crate::resources::import(&app, name, "cache", b"FLUSHALL\n".to_vec()).await;
    assert_eq!(status, 422, "{text}");
    let mut future = rdb.to_vec();
    future[5..9].copy_from_slice(b"0099");
    let (status, text) = crate::resources::import(&app, name, "cache", future).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("the data is as it was"), "{text}");
    assert!(text.contains("RDB format version 99"), "{text}");
    assert_eq!(in_resource_pod(&pods, pod, &cli("GET note")).await, "changed");
    assert_eq!(server_state(&pods.get(pod).await.unwrap()), before, "not restarted");

    let started = std::time::Instant::now();
    let (status, text) = crate::resources::import(&app, name, "cache", rdb.to_vec()).await;
    assert_eq!((status, text.as_str()), (200, "ok\n"));
    eprintln!("imported in {:?}", started.elapsed());
    assert_eq!(in_resource_pod(&pods, pod, &cli("GET note")).await, "original");
    assert_eq!(in_resource_pod(&pods, pod, &cli("LRANGE list 0 -1")).await, "a\nb\nc");
    assert_eq!(in_resource_pod(&pods, pod, &cli("EXISTS extra")).await, "0");
    // rack's execs into the pod are in the API server's audit log with their command lines
    // (the URI's `command=` parameters): the password is on none of them, nor anywhere else.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let secret = secrets.get("resource-cache").await.unwrap();
    let password = String::from_utf8(secret.data.unwrap()["PASS"].0.clone()).unwrap();
    assert!(password.len() >= 16, "a generated password");
    let audit_log = real_node_env().admin.parent().unwrap().join("audit.log");
    let audit = std::fs::read_to_string(&audit_log).unwrap();
    assert!(
        audit.contains("command=rack-import"),
        "rack's exec is audited with its command"
    );
    assert!(!audit.contains(&password), "the password in {}", audit_log.display());
    let after = server_state(&pods.get(pod).await.unwrap());
    assert_eq!(after.0, before.0, "the same pod");
    assert_eq!(after.1, before.1 + 1, "redis restarted once, in place");
    // What the import set aside is gone; the data is in the AOF, on the volume.
    let listing = in_resource_pod(&pods, pod, "ls /data").await;
    assert!(listing.lines().any(|file| file == "appendonlydir"), "{listing}");
    assert!(!listing.contains("import"), "{listing}");
    assert!(volume_dir.path().join("appendonlydir").is_dir());

    // Written after the import, then the pod deleted: the StatefulSet makes a new one on the
    // same volume, which holds everything.
    in_resource_pod(&pods, pod, &cli("SET later yes")).await;
    pods.delete(pod, &DeleteParams::default()).await.unwrap();
    let old_uid = after.0;
    wait_for(180, "a new, Ready resource pod", || async {
        let now = pods.get(pod).await.ok()?;
        let (uid, _, ready) = server_state(&now);
        (uid != old_uid && ready).then_some(())
    })
    .await;
    assert_eq!(in_resource_pod(&pods, pod, &cli("GET note")).await, "original");
    assert_eq!(in_resource_pod(&pods, pod, &cli("GET later")).await, "yes");
    // And the export of the new pod is the same data.
    let again = crate::resources::export(&app, name, "cache").await;
    assert!(again.starts_with(b"REDIS"));

    assert_eq!(app.delete_app(name).await.status(), 200);
    wait_for(180, "the claim to go with the namespace", || async {
        claims
            .get_opt("data-resource-cache-0")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    volumes.delete(&pv_name, &DeleteParams::default()).await.unwrap();
    wait_for(120, "the volume to go", || async {
        volumes.get_opt(&pv_name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// The node's registry (plain HTTP on the node's bridge address; `scripts/kube-testenv`), the
/// base image it holds, and the buildah image imported into the node's containerd.
const NODE_REGISTRY: &str = "10.200.0.1:5000";
const BUILDAH_IMAGE: &str = "localhost/rack-testenv/buildah:1";

/// A rack whose builds run buildah on the real node and push to the node's registry. Build
/// pods fetch their source from the rack API, which listens on loopback: a forwarder on the
/// node's bridge address (in this test's network namespace) passes their requests on.
async fn spawn_building_on_real_node() -> (TestApp, tokio::task::JoinHandle<()>) {
    let kubeconfig = real_node_env().rack.clone();
    let listener = tokio::net::TcpListener::bind((crate::kubeenv::REAL_NODE_IP, 0))
        .await
        .expect("a port on the node's bridge address");
    let port = listener.local_addr().unwrap().port();
    let app = TestApp::spawn_with(|config| {
        config.runtime = rack::config::RuntimeKind::Kube;
        config.kube = Some(rack::config::KubeConfig {
            registry: format!("{NODE_REGISTRY}/rack"),
            url: format!("http://{}:{port}", crate::kubeenv::REAL_NODE_IP),
            builder: rack::config::KubeBuilder::Buildah,
            builder_image: BUILDAH_IMAGE.to_owned(),
            fetch_image: REAL_NODE_IMAGE.to_owned(),
            service_account: Some(("rack".to_owned(), "rack".to_owned())),
            kubeconfig: Some(kubeconfig),
            ingress: Default::default(),
            prometheus_url: None,
        });
    })
    .await;
    let upstream = app.addr;
    let forwarder = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (app, forwarder)
}

/// Waits (up to 10 minutes: buildah copies every layer on vfs, on a loaded machine) for the
/// build to end.
async fn wait_long_build(app: &TestApp, name: &str, id: &str) -> Value {
    wait_for(600, "the buildah build to end", || async {
        let build = app.get_build(name, id).await;
        matches!(build["status"].as_str(), Some("complete" | "failed")).then_some(build)
    })
    .await
}

/// RACK_KUBE_BUILDER=buildah on the real node: a Dockerfile app is built by buildah in the
/// build Job (a RUN step really runs), pushed to the node's registry, pulled by the node's
/// containerd, rolled out, and answers on its pod's address; a Dockerfile whose RUN fails
/// fails the build, with buildah's output and the step's own in the build log; a build
/// cancelled mid-step ends, its process on the node with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_app_is_built_by_buildah_pushed_pulled_and_answers_on_the_real_node() {
    let (app, forwarder) = spawn_building_on_real_node().await;
    let client = client_for(&real_node_env().admin).await;
    let name = "realbuildah";
    let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    assert_eq!(app.create_app(name).await.status(), 201);
    let manifest = "services:\n  web:\n    build: .\n    port: 8080\n    \
                    health:\n      path: /health\n      grace: 1\n      interval: 1\n";
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let dockerfile = format!(
        "FROM {NODE_REGISTRY}/rack-testenv/busybox:1\nENV PATH=/bin\n\
         RUN mkdir -p /www && echo \"built {marker}\" >/www/index.html && echo ok >/www/health\n\
         CMD [\"/bin/httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
    );
    let started = std::time::Instant::now();
    let id = app
        .build_source(name, &[("convox.yml", manifest), ("Dockerfile", &dockerfile)])
        .await;
    let build = wait_long_build(&app, name, &id).await;
    let log = app.build_log(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}\n{log}");
    eprintln!("built with buildah in {:?}", started.elapsed());
    let image = format!("{NODE_REGISTRY}/rack/{name}:web.{id}");
    assert!(log.contains("Fetched source"), "{log}");
    assert!(log.contains(&format!("Pushed {image}")), "{log}");
    assert!(log.contains("Built 1 image(s)"), "{log}");
    // The image is in the node's registry, under the tag rack pushed.
    let tags: Value = reqwest::get(format!("http://{NODE_REGISTRY}/v2/rack/{name}/tags/list"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        tags["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &format!("web.{id}")),
        "{tags}"
    );

    let release = build["release"].as_str().unwrap().to_owned();
    let rollout = promote_follow(&app, name, &release).await;
    assert!(rollout.ends_with("\nOK\n"), "{rollout}");
    let pod = web_pods(&pods).await.into_iter().next().expect("a web pod");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(REAL_NODE));
    assert_eq!(spec.containers[0].image.as_deref(), Some(image.as_str()));
    let ip = ready_ip(&pod).expect("the pod is Ready after the rollout");
    assert!(ip.starts_with(REAL_NODE_POD_PREFIX), "pod IP {ip}");
    // What the Dockerfile's RUN wrote, served by the image's CMD.
    assert_eq!(
        get_ok(&format!("http://{ip}:8080/index.html")).await,
        Some(format!("built {marker}\n"))
    );
    eprintln!("built, pushed, pulled and rolled out in {:?}", started.elapsed());

    // A RUN step that fails: the build fails, naming the step, and its log holds buildah's
    // account and the step's own output.
    let broken = format!("FROM {NODE_REGISTRY}/rack-testenv/busybox:1\nRUN echo \"breaking {marker}\" && exit 3\n");
    let id = app
        .build_source(name, &[("convox.yml", manifest), ("Dockerfile", &broken)])
        .await;
    let build = wait_long_build(&app, name, &id).await;
    let log = app.build_log(name, &id).await;
    assert_eq!(build["status"], "failed", "{build}\n{log}");
    let reason = build["reason"].as_str().unwrap();
    assert!(reason.starts_with("building service web failed (exit code "), "{build}");
    assert!(log.contains(&format!("breaking {marker}")), "{log}");
    assert!(log.contains("exit status 3"), "{log}");
    assert!(!log.contains("Pushed "), "{log}");
    // Its Job and Secret are gone with it; the app still runs the first build.
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    let job_name = format!("build-{}", id.to_ascii_lowercase());
    wait_for(60, "the failed build's Job to go", || async {
        jobs.get_opt(&job_name).await.ok()?.is_none().then_some(())
    })
    .await;
    let info: Value = app.get_json(&format!("/apps/{name}")).await;
    assert_eq!(info["release"], release.as_str());

    // A build cancelled while its RUN step runs: the build ends `cancelled`, and the step's
    // process on the node goes with the Job's pod.
    let sleep = crate::helpers::unique_sleep_marker();
    let slow = format!("FROM {NODE_REGISTRY}/rack-testenv/busybox:1\nRUN sleep {sleep}\n");
    let id = app
        .build_source(name, &[("convox.yml", manifest), ("Dockerfile", &slow)])
        .await;
    wait_for(600, "the RUN step's sleep on the node", || async {
        (!crate::helpers::processes_with_arg(&sleep).is_empty()).then_some(())
    })
    .await;
    let response = app
        .request(reqwest::Method::POST, &format!("/apps/{name}/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{:?}", response.text().await);
    let build = wait_for(60, "the cancelled build to end", || async {
        let build = app.get_build(name, &id).await;
        (build["status"] == "failed").then_some(build)
    })
    .await;
    assert_eq!(build["reason"], "cancelled", "{build}");
    wait_for(180, "the cancelled step's process to go", || async {
        crate::helpers::processes_with_arg(&sleep).is_empty().then_some(())
    })
    .await;
    let job_name = format!("build-{}", id.to_ascii_lowercase());
    wait_for(60, "the cancelled build's Job to go", || async {
        jobs.get_opt(&job_name).await.ok()?.is_none().then_some(())
    })
    .await;

    assert_eq!(app.delete_app(name).await.status(), 200);
    forwarder.abort();
}
