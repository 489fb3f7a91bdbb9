//! Backups of a Kubernetes rack hold its resources' data, and a restore loads it back: a
//! postgres and a redis resource really running on the real node (real servers on real
//! volumes; hollow nodes fake their containers, so they hold no data) are exported into the
//! backup through port-forwards, and a second rack restoring that backup, on a cluster where
//! the app is gone, creates the resources again and loads the exports into them (SQL through a
//! port-forward, the RDB by restarting redis on it) before the app's services start.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

use super::{REDIS_IMAGE, in_resource_pod, on_real_node, spawn_on_real_node, web_pods};
use crate::deploys::promote_follow;
use crate::helpers::{TestApp, wait_for};
use crate::kubeenv::{REAL_NODE_IMAGE, client_for, real_node_env};

/// The postgres image of the real node (`scripts/kube-testenv build`: Debian's Postgres server
/// with an entrypoint that sets it up from `POSTGRES_*` as the official image does).
const POSTGRES_IMAGE: &str = "localhost/rack-testenv/postgres:1";

/// A hostPath volume in `dir` offered to exactly the claim of resource `resource` in `ns`.
async fn offer_volume(volumes: &Api<PersistentVolume>, name: &str, ns: &str, resource: &str, dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    // As a hostPath provisioner makes it: open to the server's own user (postgres runs as one).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "capacity": { "storage": "10Gi" },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": { "path": dir.to_str().unwrap(), "type": "Directory" },
            "claimRef": { "namespace": ns, "name": format!("data-resource-{resource}-0") },
        },
    }))
    .unwrap();
    volumes.create(&PostParams::default(), &pv).await.unwrap();
}

/// Deletes the volume `name` and waits until it is gone.
async fn remove_volume(volumes: &Api<PersistentVolume>, name: &str) {
    let _ = volumes.delete(name, &DeleteParams::default()).await;
    wait_for(120, "the volume to go", || async {
        volumes.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// Deletes `app` through `rack` and waits until its namespace (with its claims) is gone.
async fn delete_app_and_namespace(rack: &TestApp, client: &kube::Client, app: &str) {
    assert_eq!(rack.delete_app(app).await.status(), 200);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = format!("rack-{app}");
    wait_for(240, "the app's namespace to go", || async {
        namespaces.get_opt(&ns).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_backup_holds_a_resources_data_and_a_restore_loads_it_into_the_new_resource() {
    let first = spawn_on_real_node().await;
    let client = client_for(&real_node_env().admin).await;
    let name = "bkredis";
    let ns = format!("rack-{name}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    // One volume for each life of each resource: the restored ones start empty.
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let volume = |resource: &str, life: &str| format!("{name}-{resource}-{life}");
    offer_volume(&volumes, &volume("cache", "first"), &ns, "cache", dirs[0].path()).await;
    offer_volume(&volumes, &volume("database", "first"), &ns, "database", dirs[1].path()).await;

    assert_eq!(first.create_app(name).await.status(), 201);
    let manifest = format!(
        "resources:\n  cache:\n    type: redis\n    image: {REDIS_IMAGE}\n  \
         database:\n    type: postgres\n    image: {POSTGRES_IMAGE}\n\
         services:\n  web:\n    image: {REAL_NODE_IMAGE}\n    \
         command: \"mkdir -p /tmp/w && echo ok >/tmp/w/health && exec httpd -f -p 8080 -h /tmp/w\"\n    \
         port: 8080\n    resources:\n      - cache\n      - database\n    health:\n      path: /health\n      grace: 1\n      interval: 1\n"
    );
    let release = first.build_release(name, &[("convox.yml", &manifest)]).await;
    let log = promote_follow(&first, name, &release).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    let pod = "resource-cache-0";
    let cli = |command: &str| format!("redis-cli -h 127.0.0.1 {command}");
    assert_eq!(in_resource_pod(&pods, pod, &cli("SET note kept")).await, "OK");
    assert_eq!(in_resource_pod(&pods, pod, &cli("RPUSH list a b c")).await, "3");
    // psql on the server's socket, as its superuser (trusted there), in the database rack made.
    let database = "resource-database-0";
    let sql = |query: &str| format!("psql -U \"$POSTGRES_USER\" -d \"$POSTGRES_DB\" -Atc \"{query}\"");
    let created = in_resource_pod(
        &pods,
        database,
        &sql("create table orders (id int primary key, note text); insert into orders values (1, 'kept'), (2, 'also kept')"),
    )
    .await;
    assert_eq!(created, "CREATE TABLE\nINSERT 0 2");

    // The backup holds the resource's export (an RDB, through a port-forward to its pod),
    // listed in the manifest with its digest.
    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("rack.tar");
    let started = std::time::Instant::now();
    crate::backup::download(&first, "?images=false", &file).await;
    eprintln!(
        "backup of a rack with a postgres and a redis resource on the real node in {:?}",
        started.elapsed()
    );
    let manifest = rack::backup::restore::verify(&file).unwrap().manifest;
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let mut exports = Vec::new();
    for (resource, ext) in [("cache", "rdb"), ("database", "sql")] {
        let record = manifest
            .resources
            .iter()
            .find(|r| r.app == name && r.name == resource)
            .unwrap_or_else(|| panic!("{resource} in {:?}", manifest.resources));
        let path = format!("resources/{name}/{resource}.{ext}");
        assert_eq!(record.path.as_deref(), Some(path.as_str()), "{record:?}");
        let entry = manifest.entries.iter().find(|e| e.path == path).expect("its entry");
        assert!(
            entry.size > 18 && entry.sha256.as_ref().is_some_and(|s| s.len() == 64),
            "{entry:?}"
        );
        let status = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(&unpacked)
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        exports.push(std::fs::read(unpacked.join(&path)).unwrap());
    }
    assert!(
        exports[0].starts_with(b"REDIS") && exports[0].windows(4).any(|w| w == b"kept"),
        "an RDB with the data"
    );
    let dump = String::from_utf8_lossy(&exports[1]);
    assert!(
        dump.contains("CREATE TABLE public.orders") && dump.contains("also kept"),
        "a plain-SQL dump with the data: {dump}"
    );

    // A resource that cannot be exported (its pod is gone) fails the backup, naming it.
    let none = serde_json::json!({ "spec": { "replicas": 0 } });
    sets.patch("resource-cache", &PatchParams::default(), &Patch::Merge(&none))
        .await
        .unwrap();
    wait_for(180, "the resource's pod to go", || async {
        pods.get_opt(pod).await.ok()?.is_none().then_some(())
    })
    .await;
    let failed = first
        .request(reqwest::Method::GET, "/system/backup?images=false")
        .send()
        .await
        .unwrap();
    let (status, text) = crate::helpers::status_text(failed).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains(&format!("resource cache of app {name}")), "{text}");
    assert!(
        text.contains("resources=false"),
        "says how to leave resources out: {text}"
    );

    // The app goes from the cluster with its namespace, claims and data, and the first rack
    // stops: the second one finds nothing of it in the cluster.
    delete_app_and_namespace(&first, &client, name).await;
    first.stop().await;
    for resource in ["cache", "database"] {
        remove_volume(&volumes, &volume(resource, "first")).await;
    }
    offer_volume(&volumes, &volume("cache", "second"), &ns, "cache", dirs[2].path()).await;
    offer_volume(&volumes, &volume("database", "second"), &ns, "database", dirs[3].path()).await;

    let mut config = crate::backup::restoring(dir.path(), &file).await;
    on_real_node(&mut config);
    let second = TestApp::start(config).await;
    let mut log = String::new();
    for resource in ["cache", "database"] {
        let line = format!("system/k8s/resource/{resource} restored from the backup");
        log = second.wait_for_log_line(name, &line, 420).await;
        assert_eq!(log.matches(&line).count(), 1, "loaded once: {log}");
        let claim = claims.get(&format!("data-resource-{resource}-0")).await.unwrap();
        assert_eq!(
            claim.spec.unwrap().volume_name,
            Some(volume(resource, "second")),
            "the new, empty volume"
        );
        // Loaded, so its mark is off the StatefulSet.
        let set = sets.get(&format!("resource-{resource}")).await.unwrap();
        let annotations = set.metadata.annotations.unwrap_or_default();
        assert!(
            !annotations.contains_key("convox.com/restore-pending"),
            "{annotations:?}"
        );
    }
    assert!(log.contains("after a restore"), "{log}");
    let loading = log.find("resource/cache loading its data").expect("the load is logged");
    assert!(
        log[..loading].contains("Restoring release"),
        "the bring-back started with its line: {log}"
    );
    assert_eq!(in_resource_pod(&pods, pod, &cli("GET note")).await, "kept");
    assert_eq!(in_resource_pod(&pods, pod, &cli("LRANGE list 0 -1")).await, "a\nb\nc");
    assert_eq!(
        in_resource_pod(&pods, database, &sql("select id, note from orders order by id")).await,
        "1|kept\n2|also kept"
    );
    assert!(
        dirs[2].path().join("appendonlydir").is_dir(),
        "redis's data is on its new volume"
    );
    assert!(dirs[3].path().join("pgdata/PG_VERSION").is_file(), "postgres's too");
    // The exports are gone once loaded, and the app's service came back (started after its
    // resources were loaded).
    let data = second.state.config.data_dir.clone();
    let pending = crate::helpers::files_under(&data.join("resource-imports"));
    assert!(pending.is_empty(), "{pending:?}");
    wait_for(240, "the web service to come back", || async {
        (!web_pods(&pods).await.is_empty()).then_some(())
    })
    .await;
    wait_for(240, "the restore's marker to go once every app is back", || async {
        (!data.join("restore-reapply").exists()).then_some(())
    })
    .await;

    // A start that finds exports again (a server stopped after loading one and before removing
    // it, or after creating a resource and before loading it): an unmarked resource keeps its
    // data, with what was written since; a marked one has its export loaded again.
    assert_eq!(in_resource_pod(&pods, pod, &cli("SET note later")).await, "OK");
    assert_eq!(
        in_resource_pod(&pods, database, &sql("delete from orders where id = 2")).await,
        "DELETE 1"
    );
    let mark = serde_json::json!({ "metadata": { "annotations": { "convox.com/restore-pending": "true" } } });
    sets.patch("resource-database", &PatchParams::default(), &Patch::Merge(&mark))
        .await
        .unwrap();
    let pending_dir = data.join("resource-imports").join(name);
    std::fs::create_dir_all(&pending_dir).unwrap();
    for export in ["cache.rdb", "database.sql"] {
        std::fs::copy(
            unpacked.join(format!("resources/{name}/{export}")),
            pending_dir.join(export),
        )
        .unwrap();
    }
    std::fs::write(data.join("restore-reapply"), b"").unwrap();
    let mut config = second.state.config.clone();
    config.backup.restore = None;
    second.stop().await;
    let third = TestApp::start(config).await;
    let line = "system/k8s/resource/database restored from the backup";
    let log = wait_for(420, "the marked resource to be loaded again", || async {
        let log = third.read_app_log(name, true).await;
        (log.matches(line).count() == 2).then_some(log)
    })
    .await;
    assert!(log.contains("resource/cache kept its data"), "{log}");
    assert_eq!(
        log.matches("resource/cache restored from the backup").count(),
        1,
        "{log}"
    );
    assert_eq!(in_resource_pod(&pods, pod, &cli("GET note")).await, "later");
    assert_eq!(
        in_resource_pod(&pods, database, &sql("select id, note from orders order by id")).await,
        "1|kept\n2|also kept"
    );
    let set = sets.get("resource-database").await.unwrap();
    let annotations = set.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key("convox.com/restore-pending"),
        "{annotations:?}"
    );
    assert!(crate::helpers::files_under(&pending_dir).is_empty());
    wait_for(240, "the marker to go again", || async {
        (!data.join("restore-reapply").exists()).then_some(())
    })
    .await;

    delete_app_and_namespace(&third, &client, name).await;
    for resource in ["cache", "database"] {
        remove_volume(&volumes, &volume(resource, "second")).await;
    }
    third.stop().await;
}
