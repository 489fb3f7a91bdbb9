//! `convox builds export` and `convox builds import`: a build made on one rack (staging) carried
//! to another (production, its own database and data directory), where it deploys without a
//! build step; and the archives an import refuses.

use std::io::{Read, Write};

use reqwest::Method;
use serde_json::Value;

use crate::deploys::{SERVER, create_release, promote_follow, through_router};
use crate::helpers::{TestApp, files_under, status_text};

/// The fixture server, with a build step whose output only that build can have made.
const MANIFEST: &str = "services:\n  web:\n    build:\n      command: head -c 16 /dev/urandom | od -An -tx1 > stamp\n    command: python3 -u server.py\n    port: 3000\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n";

/// `convox builds export ID -a APP`: the archive's bytes.
async fn export(app: &TestApp, name: &str, id: &str) -> Vec<u8> {
    let response = app
        .convox(Method::GET, &format!("/apps/{name}/builds/{id}.tgz?"))
        .header("content-type", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/gzip");
    response.bytes().await.unwrap().to_vec()
}

/// `convox builds import -a APP`: `GET /system` (the CLI picks the import route by the rack's
/// version), then the archive as the body.
async fn import(app: &TestApp, name: &str, archive: Vec<u8>) -> reqwest::Response {
    let system: Value = app
        .convox(Method::GET, "/system?")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(system["version"].as_str().unwrap() > "20180708231844");
    app.convox(Method::POST, &format!("/apps/{name}/builds/import?"))
        .header("content-type", "application/octet-stream")
        .body(archive)
        .send()
        .await
        .unwrap()
}

/// The entries of an archive, in order: (path, bytes).
fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    tar.entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            (path, bytes)
        })
        .collect()
}

/// An archive of `entries`, in order.
fn pack(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, bytes.as_slice()).unwrap();
    }
    let mut gz = tar.into_inner().unwrap();
    gz.flush().unwrap();
    gz.finish().unwrap()
}

#[tokio::test]
async fn a_build_exported_from_one_rack_imports_into_another_and_deploys_without_a_build() {
    let staging = TestApp::spawn().await;
    let production = TestApp::spawn().await;
    assert_eq!(staging.create_app("shop").await.status(), 201);
    assert_eq!(production.create_app("shop").await.status(), 201);
    // Production's own configuration, which the imported release must take.
    create_release(&production, "shop", &[("env", "GREETING=production")]).await;

    let id = staging
        .build_source("shop", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let built = staging.wait_build("shop", &id).await;
    assert_eq!(built["status"], "complete", "{built}");
    let archive = export(&staging, "shop", &id).await;
    let names: Vec<String> = entries(&archive).into_iter().map(|(path, _)| path).collect();
    assert_eq!(names, ["convox.yml", "source.tgz", "files.tgz", "build.json"]);

    let response = import(&production, "shop", archive).await;
    let (status, text) = status_text(response).await;
    assert_eq!(status, 201, "{text}");
    let imported: Value = serde_json::from_str(&text).unwrap();
    let new_id = imported["id"].as_str().unwrap();
    let release = imported["release"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id);
    assert_eq!(imported["status"], "complete");
    assert_eq!(imported["manifest"], MANIFEST);
    assert!(release.starts_with('R'), "{imported}");

    // Nothing was built on production: its log is the import's one line, and the build's
    // output is byte for byte staging's.
    let log = production.build_log("shop", new_id).await;
    assert!(log.starts_with(&format!("Imported build {id} of app shop")), "{log}");
    assert!(!log.contains("Running:"), "{log}");
    let stamp = |app: &TestApp, build: &str| std::fs::read(app.build_dir("shop", build).join("src/stamp")).unwrap();
    assert_eq!(stamp(&production, new_id), stamp(&staging, &id));
    let release_json: Value = production.get_json(&format!("/apps/shop/releases/{release}")).await;
    assert_eq!(release_json["build"], new_id);
    assert_eq!(release_json["env"], "GREETING=production");

    let rollout = promote_follow(&production, "shop", &release).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    assert_eq!(
        through_router(&production, "shop").await,
        format!("{release} production\n")
    );
}

#[tokio::test]
async fn damaged_build_archives_are_refused_naming_what_is_wrong_and_nothing_is_kept() {
    let staging = TestApp::spawn().await;
    assert_eq!(staging.create_app("shop").await.status(), 201);
    let id = staging
        .build_source("shop", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    assert_eq!(staging.wait_build("shop", &id).await["status"], "complete");
    let archive = export(&staging, "shop", &id).await;
    let good = entries(&archive);
    assert_eq!(
        staging
            .convox(Method::GET, "/apps/shop/builds/BNOSUCHBUILD.tgz?")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let production = TestApp::spawn().await;
    assert_eq!(production.create_app("shop").await.status(), 201);
    let altered = {
        let mut entries = good.clone();
        let manifest = &mut entries[0].1;
        let at = manifest.iter().position(|b| *b == b'3').unwrap();
        manifest[at] = b'4';
        pack(&entries)
    };
    let unknown = {
        let mut entries = good.clone();
        entries.insert(0, ("evil.sh".to_owned(), b"x".to_vec()));
        pack(&entries)
    };
    let without_metadata = pack(&good[..good.len() - 1]);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("cut short", archive[..archive.len() / 2].to_vec(), "cut short"),
        ("altered", altered, "convox.yml: SHA-256"),
        ("not gzip", b"just some text".to_vec(), "damaged"),
        ("unknown entry", unknown, "unexpected entry \"evil.sh\""),
        ("no build.json", without_metadata, "has no build.json"),
    ];
    for (what, body, needle) in cases {
        let (status, text) = status_text(import(&production, "shop", body).await).await;
        assert_eq!(status, 422, "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text}");
    }
    // Nothing of them was kept: no build, no source object, no build directory, no scratch.
    let builds: Vec<Value> = production.get_json("/apps/shop/builds").await;
    assert!(builds.is_empty(), "{builds:?}");
    let objects: Vec<Value> = production.get_json("/apps/shop/objects").await;
    assert!(objects.is_empty(), "{objects:?}");
    let data = &production.state.config.data_dir;
    assert!(files_under(&data.join("builds")).is_empty());
    let scratch: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");

    // The whole archive is bounded as sent.
    let small = TestApp::spawn_with(|config| config.max_upload_bytes = 1024).await;
    assert_eq!(small.create_app("shop").await.status(), 201);
    let (status, text) = status_text(import(&small, "shop", archive.clone()).await).await;
    assert_eq!(status, 413, "{text}");
    // And the untouched archive still imports.
    let (status, text) = status_text(import(&production, "shop", archive).await).await;
    assert_eq!(status, 201, "{text}");
}

#[tokio::test]
async fn the_rack_cli_exports_a_build_to_a_file_and_imports_it_on_another_rack() {
    let staging = TestApp::spawn().await;
    let production = TestApp::spawn().await;
    assert_eq!(staging.create_app("shop").await.status(), 201);
    assert_eq!(production.create_app("shop").await.status(), 201);
    let id = staging
        .build_source("shop", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    assert_eq!(staging.wait_build("shop", &id).await["status"], "complete");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("build.tgz");
    let file = file.to_str().unwrap();
    let password = crate::helpers::PASSWORD;
    let run = crate::cli::rack_in(
        &staging,
        password,
        &["builds", "export", &id, "-a", "shop", "-f", file],
        dir.path(),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::metadata(file).unwrap().len() > 0);
    let run = crate::cli::rack_in(
        &production,
        password,
        &["builds", "import", "-a", "shop", "-f", file, "--id"],
        dir.path(),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let release = run.stdout.trim();
    let shown: Value = production.get_json(&format!("/apps/shop/releases/{release}")).await;
    assert_eq!(shown["manifest"], MANIFEST, "{shown}");
    // A damaged file: the CLI fails with the rack's reason.
    std::fs::write(file, b"not an archive").unwrap();
    let run = crate::cli::rack_in(
        &production,
        password,
        &["builds", "import", "-a", "shop", "-f", file],
        dir.path(),
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("damaged"), "{}", run.stderr);
}

#[tokio::test]
async fn a_dockerfile_build_carries_its_image_and_runs_it_on_the_other_rack() {
    use crate::containers::{Leftovers, as_files, base_image, convox_app, podman};
    base_image().await;
    let staging = TestApp::spawn().await;
    let _staging_leftovers = Leftovers::of(&staging);
    let production = TestApp::spawn().await;
    let _production_leftovers = Leftovers::of(&production);
    assert_eq!(staging.create_app("boxed").await.status(), 201);
    assert_eq!(production.create_app("boxed").await.status(), 201);
    let files = convox_app("carried");
    let id = staging.build_source("boxed", &as_files(&files)).await;
    let built = staging.wait_build("boxed", &id).await;
    assert_eq!(built["status"], "complete", "{built}");
    let archive = export(&staging, "boxed", &id).await;
    let names: Vec<String> = entries(&archive).into_iter().map(|(path, _)| path).collect();
    assert_eq!(
        names,
        ["convox.yml", "source.tgz", "files.tgz", "images.tar", "build.json"]
    );
    // Both racks share this machine's image store: the image must come back from the archive.
    let image = built["images"]["web"].as_str().unwrap().to_owned();
    let store = podman(&staging.state.config.data_dir);
    store.output(&["rmi", "--force", &image]).await.unwrap();
    assert!(!store.image_exists(&image).await);

    let (status, text) = status_text(import(&production, "boxed", archive).await).await;
    assert_eq!(status, 201, "{text}");
    let imported: Value = serde_json::from_str(&text).unwrap();
    let new_id = imported["id"].as_str().unwrap();
    assert_eq!(imported["images"]["web"], format!("rack/boxed:web.{new_id}"));
    assert!(
        !store.image_exists(&image).await,
        "the exporting rack's name is not kept"
    );
    let release = imported["release"].as_str().unwrap();
    let rollout = promote_follow(&production, "boxed", release).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    assert_eq!(through_router(&production, "boxed").await, "carried\n");
}

/// `convox apps export` then `convox apps import` into another rack: the requests each makes
/// (the CLI packs and unpacks its own archive of `app.json`, `env` and `build.tgz` around them).
#[tokio::test]
async fn convox_apps_export_and_import_move_an_app_between_racks() {
    let staging = TestApp::spawn().await;
    let production = TestApp::spawn().await;
    assert_eq!(staging.create_app("shop").await.status(), 201);
    create_release(&staging, "shop", &[("env", "GREETING=carried")]).await;
    let release = staging
        .build_release("shop", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    assert!(promote_follow(&staging, "shop", &release).await.ends_with("OK\n"));
    let updated = staging.update_app("shop", &[("parameters", "Owner=team-a")]).await;
    assert_eq!(updated.status(), 200);

    // Export: the app, its active release (the CLI's `AppManifest`), that release's build, the
    // resources.
    let get = |app: &TestApp, path: String| {
        let request = app.convox(Method::GET, &path);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let exported_app = get(&staging, "/apps/shop?".to_owned()).await;
    let active = exported_app["release"].as_str().unwrap().to_owned();
    let exported_release = get(&staging, format!("/apps/shop/releases/{active}?")).await;
    let env = exported_release["env"].as_str().unwrap().to_owned();
    let build = exported_release["build"].as_str().unwrap().to_owned();
    let archive = export(&staging, "shop", &build).await;
    let resources = get(&staging, "/apps/shop/resources?".to_owned()).await;
    assert_eq!(resources, serde_json::json!([]));

    // Import: create the app and wait for it, import the build, a release with the env, promote
    // it and wait, then the parameters.
    let created = production
        .convox(Method::POST, "/apps?")
        .form(&[
            ("generation", exported_app["generation"].as_str().unwrap()),
            ("name", "shop"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(get(&production, "/apps/shop?".to_owned()).await["status"], "running");
    let (status, text) = status_text(import(&production, "shop", archive).await).await;
    assert_eq!(status, 201, "{text}");
    let with_env: Value = production
        .convox(Method::POST, "/apps/shop/releases?")
        .form(&[("env", env.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_release = with_env["id"].as_str().unwrap().to_owned();
    let promote = production
        .convox(Method::POST, &format!("/apps/shop/releases/{new_release}/promote?"))
        .send()
        .await
        .unwrap();
    assert_eq!(promote.status(), 200);
    crate::helpers::wait_for(120, "the imported app to run its release", || async {
        let app = get(&production, "/apps/shop?".to_owned()).await;
        (app["status"] == "running" && app["release"] == new_release.as_str()).then_some(())
    })
    .await;
    let parameters = serde_urlencoded::to_string(
        exported_app["parameters"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(
        production
            .update_app("shop", &[("parameters", &parameters)])
            .await
            .status(),
        200
    );

    assert_eq!(
        through_router(&production, "shop").await,
        format!("{new_release} carried\n")
    );
    assert_eq!(
        get(&production, "/apps/shop?".to_owned()).await["parameters"]["Owner"],
        "team-a"
    );
}
