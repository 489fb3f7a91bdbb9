//! Private registries on the Kubernetes runtime (a real control plane, see `kubeenv`): the
//! registries added with `convox registries add` become the Secret `rack-registries` (type
//! `kubernetes.io/dockerconfigjson`) of the app's namespace, applied with each release, which
//! the release's pods pull with; a removed registry leaves it with the next release. Builds
//! (kaniko) get both the operator's `rack-registry` and those registries in their docker config.

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use reqwest::Method;
use serde_json::{Value, json};

use crate::deploys::{create_release, promote_follow};
use crate::helpers::TestApp;
use crate::kubeenv::admin_client;
use crate::kubeenv::finish_pod;
use crate::kubernetes::{build_pod, spawn_kube, web_pod_spec};

/// The `auths` of the app namespace's `rack-registries`.
async fn auths(secrets: &Api<Secret>) -> Value {
    let secret = secrets.get("rack-registries").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let managers: Vec<String> = secret
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| f.manager)
        .collect();
    assert_eq!(managers, ["rack"], "server-side applied by rack alone");
    let data = secret.data.unwrap();
    let config: Value = serde_json::from_slice(&data[".dockerconfigjson"].0).unwrap();
    config["auths"].clone()
}

async fn promote_new_release(app: &TestApp, name: &str, env: &str) {
    let release = create_release(app, name, &[("env", env)]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(app, name, &release).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registries_are_the_pull_secret_of_each_release() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "pulls";
    assert_eq!(app.create_app(name).await.status(), 201);
    let added = app
        .convox(Method::POST, "/registries")
        .form(&[
            ("server", "registry.example.com"),
            ("username", "deployer"),
            ("password", "pw"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let id = app
        .build_source(
            name,
            &[(
                "convox.yml",
                "services:\n  web:\n    image: registry.example.com/web:1\n",
            )],
        )
        .await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    promote_new_release(&app, name, "A=1").await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    let auth = base64::engine::general_purpose::STANDARD.encode("deployer:pw");
    assert_eq!(
        auths(&secrets).await,
        json!({ "registry.example.com": { "auth": auth } })
    );
    let pod = web_pod_spec(&client, &format!("rack-{name}")).await;
    let pull: Vec<String> = pod
        .image_pull_secrets
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(pull, ["rack-registry", "rack-registries"]);

    // Removed: the next release's pods pull without it.
    let removed = app
        .convox(Method::DELETE, "/registries/registry.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    promote_new_release(&app, name, "A=2").await;
    assert_eq!(auths(&secrets).await, json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kaniko_reads_the_operator_s_and_the_added_registries_credentials() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "kanikoauth";
    let namespace = format!("rack-{name}");
    assert_eq!(app.create_app(name).await.status(), 201);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // The operator's push credentials, as `kubectl create secret docker-registry` makes them.
    let operator = json!({ "auths": { "registry.host": { "auth": b64("pusher:push") } } });
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": "rack-registry" },
        "type": "kubernetes.io/dockerconfigjson",
        "data": { ".dockerconfigjson": b64(&operator.to_string()) },
    }))
    .unwrap();
    secrets.create(&Default::default(), &secret).await.unwrap();
    for (server, user) in [
        ("private.example.com:5000", "puller"),
        ("registry.host", "someone-else"),
    ] {
        let added = app
            .convox(Method::POST, "/registries")
            .form(&[("server", server), ("username", user), ("password", "pw")])
            .send()
            .await
            .unwrap();
        assert_eq!(added.status(), 201);
    }
    let id = app
        .build_source(
            name,
            &[
                ("convox.yml", "services:\n  web:\n    build: .\n"),
                ("Dockerfile", "FROM private.example.com:5000/base:1\n"),
            ],
        )
        .await;
    let pod = build_pod(&client, &namespace, &id, async || app.get_build(name, &id).await).await;
    let job = format!("build-{}", id.to_ascii_lowercase());
    let spec = pod.spec.clone().unwrap();
    let volume = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "registry")
        .unwrap();
    let source = volume.secret.unwrap();
    assert_eq!(source.secret_name.as_deref(), Some(job.as_str()));
    let items: Vec<(String, String)> = source.items.unwrap().into_iter().map(|i| (i.key, i.path)).collect();
    assert_eq!(items, [("config.json".to_owned(), "config.json".to_owned())]);
    let builder = &spec.init_containers.unwrap()[1];
    let mount = builder
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "registry")
        .unwrap();
    assert_eq!(mount.mount_path, "/kaniko/.docker");
    let data = secrets.get(&job).await.unwrap().data.unwrap();
    let config: Value = serde_json::from_slice(&data["config.json"].0).unwrap();
    assert_eq!(
        config,
        json!({ "auths": {
            "private.example.com:5000": { "auth": b64("puller:pw") },
            // The operator's push credentials win over an added registry of the same server.
            "registry.host": { "auth": b64("pusher:push") },
        } })
    );
    finish_pod(&client, &namespace, &pod, None).await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    // The credentials go with the build.
    crate::helpers::wait_for(60, "the build's secret to be deleted", || async {
        secrets.get_opt(&job).await.unwrap().is_none().then_some(())
    })
    .await;
}
