//! Private registries on the Kubernetes runtime (a real control plane, see `kubeenv`): the
//! registries added with `convox registries add` become the Secret `rack-registries` (type
//! `kubernetes.io/dockerconfigjson`) of the app's namespace, applied with each release, which
//! the release's pods pull with; a removed registry leaves it with the next release.

use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use reqwest::Method;
use serde_json::{Value, json};

use crate::deploys::{create_release, promote_follow};
use crate::helpers::TestApp;
use crate::kubeenv::admin_client;
use crate::kubernetes::spawn_kube;

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
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &format!("rack-{name}"));
    let pod = deployments
        .get("web")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
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
