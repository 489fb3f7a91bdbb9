//! `convox builds export` and `import` on the Kubernetes runtime (a real control plane, see
//! `kubeenv`): a build of one rack, whose image is in a password-protected registry on
//! 127.0.0.1 (Debian's `docker-registry`), exported and imported into a second rack (its own
//! database and data directory) whose app gets the very image under its own name and deploys it
//! without a build step; a cut archive is refused.

use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::ListParams;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::TestApp;
use crate::kubeenv::admin_client;
use crate::kubernetes::{complete_build, spawn_kube_then};
use crate::registries::PrivateRegistry;

const USER: &str = "pusher";
const PASSWORD: &str = "Push-pw-1";

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", rack::objects::hex(&Sha256::digest(bytes)))
}

/// The operator's `rack-registry` Secret in `namespace`: rack's credentials for `host`.
async fn operator_secret(client: &kube::Client, namespace: &str, host: &str) {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({ "auths": { host: { "auth": b64(&format!("{USER}:{PASSWORD}")) } } });
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": "rack-registry" },
        "type": "kubernetes.io/dockerconfigjson",
        "data": { ".dockerconfigjson": b64(&config.to_string()) },
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&Default::default(), &secret)
        .await
        .unwrap();
}

/// Pushes a one-layer image as `repository:tag` (what kaniko would have pushed); its manifest's
/// digest.
async fn push_image(host: &str, repository: &str, tag: &str) -> String {
    let http = reqwest::Client::new();
    let base = format!("http://{host}/v2/{repository}");
    let mut layer = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let stamp = format!("built as {tag}\n");
    let mut header = tar::Header::new_gnu();
    header.set_size(stamp.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    layer.append_data(&mut header, "stamp", stamp.as_bytes()).unwrap();
    let layer = layer.into_inner().unwrap().finish().unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/stamp"] },
        "rootfs": { "type": "layers", "diff_ids": [digest(b"unused")] },
    })
    .to_string()
    .into_bytes();
    for blob in [&config, &layer] {
        let started = http
            .post(format!("{base}/blobs/uploads/"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 202, "{:?}", started.text().await);
        let location = started.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("http://{host}{location}")
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = http
            .put(format!("{location}{separator}digest={}", digest(blob)))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/octet-stream")
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201, "{:?}", put.text().await);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest(&layer), "size": layer.len() }],
    })
    .to_string();
    let put = http
        .put(format!("{base}/manifests/{tag}"))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    digest(manifest.as_bytes())
}

/// The digest the registry has for `repository:tag` (none: not there).
async fn manifest_digest(host: &str, repository: &str, tag: &str) -> Option<String> {
    let response = reqwest::Client::new()
        .get(format!("http://{host}/v2/{repository}/manifests/{tag}"))
        .basic_auth(USER, Some(PASSWORD))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .unwrap();
    if response.status() != 200 {
        return None;
    }
    let bytes = response.bytes().await.unwrap();
    Some(digest(&bytes))
}

async fn import(app: &TestApp, name: &str, archive: Vec<u8>) -> reqwest::Response {
    app.convox(Method::POST, &format!("/apps/{name}/builds/import?"))
        .header("content-type", "application/octet-stream")
        .body(archive)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_exported_from_one_kube_rack_deploys_on_another_without_a_build() {
    let registry = PrivateRegistry::start(USER, PASSWORD).await;
    let host = registry.host.clone();
    let client = admin_client().await;
    let staging = spawn_kube_then(|k| k.registry = format!("{host}/staging")).await;
    let production = spawn_kube_then(|k| k.registry = format!("{host}/production")).await;
    let (from, to) = ("xfersrc", "xferdst");
    assert_eq!(staging.create_app(from).await.status(), 201);
    assert_eq!(production.create_app(to).await.status(), 201);
    operator_secret(&client, &format!("rack-{from}"), &host).await;
    operator_secret(&client, &format!("rack-{to}"), &host).await;

    let manifest = "services:\n  web:\n    build: .\n    port: 3000\n";
    let build = complete_build(&staging, &client, from, manifest).await;
    let id = build["id"].as_str().unwrap().to_owned();
    // The hollow node ran no kaniko: push what it would have.
    let pushed = push_image(&host, &format!("staging/{from}"), &format!("web.{id}")).await;

    let response = staging
        .convox(Method::GET, &format!("/apps/{from}/builds/{id}.tgz?"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let archive = response.bytes().await.unwrap().to_vec();

    // Cut short, it is refused and leaves nothing.
    let cut = import(&production, to, archive[..archive.len() / 2].to_vec()).await;
    assert!(cut.status().is_client_error(), "{}", cut.status());
    let builds: Value = production.get_json(&format!("/apps/{to}/builds")).await;
    assert_eq!(builds.as_array().unwrap().len(), 0, "{builds}");

    let response = import(&production, to, archive).await;
    assert_eq!(response.status(), 201);
    let imported: Value = response.json().await.unwrap();
    let new_id = imported["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id);
    assert_eq!(imported["status"], "complete", "{imported}");
    // The very image, under the production app's name.
    assert_eq!(
        manifest_digest(&host, &format!("production/{to}"), &format!("web.{new_id}")).await,
        Some(pushed)
    );

    let release = imported["release"].as_str().unwrap();
    let promoted = production
        .convox(Method::POST, &format!("/apps/{to}/releases/{release}/promote"))
        .form(&[("timeout", "600")])
        .send()
        .await
        .unwrap();
    assert_eq!(promoted.status(), 200);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &format!("rack-{to}"));
    let image = crate::helpers::wait_for(120, "the web deployment", || async {
        let d = deployments.get_opt("web").await.ok()??;
        d.spec?.template.spec?.containers.first()?.image.clone()
    })
    .await;
    assert_eq!(image, format!("{host}/production/{to}:web.{new_id}"));
    // No build ran on production.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &format!("rack-{to}"));
    let built = jobs.list(&ListParams::default().labels("type=build")).await.unwrap();
    assert!(built.items.is_empty(), "{:?}", built.items);
}
