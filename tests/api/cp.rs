//! `convox cp` into and out of a process, replayed as the convox CLI sends it (a plain tar
//! whose entries are absolute paths in the process, `POST .../files`; `GET .../files?file=`
//! answering a tar; `DELETE .../files?files=`), in the process driver's sandbox: a round trip,
//! the escapes refused with nothing written outside, and an oversize copy refused.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::TestApp;

/// A plain tar of `entries` (name, content; `None` content with `Some` target: a symlink),
/// names written raw as an attacker or the convox CLI writes them.
fn tar_of(entries: &[(&str, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut out);
        for (name, data, target) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(if target.is_some() {
                tar::EntryType::Symlink
            } else {
                tar::EntryType::Regular
            });
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            if name.len() >= 100 {
                // A GNU long name first, as tar writes one for a long path.
                let mut long = tar::Header::new_gnu();
                long.set_entry_type(tar::EntryType::GNULongName);
                long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
                let mut bytes = name.as_bytes().to_vec();
                bytes.push(0);
                long.set_size(bytes.len() as u64);
                long.set_cksum();
                builder.append(&long, &bytes[..]).unwrap();
            } else {
                header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            }
            if let Some(t) = target {
                header.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.finish().unwrap();
    }
    out
}

/// The running web process of `name`, and its directory (the build's, which it sees at the
/// same path).
async fn process_and_dir(app: &TestApp, name: &str, release: &str) -> (String, std::path::PathBuf) {
    let release: Value = app.get_json(&format!("/apps/{name}/releases/{release}")).await;
    let build = release["build"].as_str().unwrap().to_owned();
    let processes: Vec<Value> = app.get_json(&format!("/apps/{name}/processes")).await;
    let web = processes.iter().find(|p| p["name"] == "web").expect("a web process");
    (web["id"].as_str().unwrap().to_owned(), app.build_dir(name, &build))
}

async fn upload(app: &TestApp, path: &str, body: Vec<u8>) -> (u16, String) {
    let response = app.convox(Method::POST, path).body(body).send().await.unwrap();
    crate::helpers::status_text(response).await
}

#[tokio::test]
async fn cp_round_trips_through_a_process_and_refuses_escapes() {
    let app = TestApp::spawn().await;
    let release = crate::run::running_app(&app, "copies").await;
    let (pid, dir) = process_and_dir(&app, "copies", &release).await;
    let files = format!("/apps/copies/processes/{pid}/files");
    let target = dir.join("uploaded");
    let name = format!("{}/hello.txt", target.display());

    // Upload (as `convox cp ./hello.txt <pid>:<dir>/uploaded/hello.txt` sends it).
    let (status, body) = upload(&app, &files, tar_of(&[(&name, b"hello from cp\n", None)])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        std::fs::read_to_string(target.join("hello.txt")).unwrap(),
        "hello from cp\n"
    );

    // Download: a tar of the file, named by its path without the leading `/`.
    let response = app
        .convox(Method::GET, &files)
        .query(&[("file", name.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let tarball = response.bytes().await.unwrap();
    let mut archive = tar::Archive::new(&tarball[..]);
    let mut found = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut content = String::new();
        std::io::Read::read_to_string(&mut entry, &mut content).unwrap();
        found.push((entry.path().unwrap().display().to_string(), content));
    }
    assert_eq!(
        found,
        vec![(name.trim_start_matches('/').to_owned(), "hello from cp\n".to_owned())]
    );

    // A path that is not there is a 404.
    let missing = app
        .convox(Method::GET, &files)
        .query(&[("file", format!("{}/nothing-here", dir.display()))])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Escapes: `..` out, an absolute symlink, a write through a symlink of the same archive.
    let outside = std::env::temp_dir().join(format!("rack-cp-escape-{pid}"));
    let climbing = format!(
        "{}/{}",
        dir.display(),
        "../".repeat(12) + outside.to_str().unwrap().trim_start_matches('/')
    );
    for (what, tar) in [
        ("dot-dot", tar_of(&[(&climbing, b"x", None)])),
        (
            "absolute symlink",
            tar_of(&[(&format!("{name}.link"), b"", Some("/etc"))]),
        ),
        (
            "through a symlink",
            tar_of(&[
                (
                    &format!("{}/l", target.display()),
                    b"",
                    Some("../../../../../../../../tmp"),
                ),
                (&format!("{}/l/x", target.display()), b"x", None),
            ]),
        ),
    ] {
        let (status, body) = upload(&app, &files, tar).await;
        assert_eq!(status, 400, "{what}: {body}");
    }
    assert!(!outside.exists(), "{} was written", outside.display());
    assert!(!target.join("l").exists());
    // The file path itself must stay in the process too.
    let (status, _) = crate::helpers::status_text(
        app.convox(Method::GET, &files)
            .query(&[("file", "/app/../../etc/passwd")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);

    // Delete, then it is gone.
    let deleted = app
        .convox(Method::DELETE, &files)
        .query(&[("files", name.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert!(!target.join("hello.txt").exists());

    // `--tar-extra` passes on the flags convox allows, and refuses the rest.
    let with_flags = |flags: &str| {
        app.convox(Method::POST, &files)
            .query(&[("tar-extra", flags)])
            .body(tar_of(&[(&name, b"again\n", None)]))
            .send()
    };
    assert_eq!(
        with_flags("--no-same-owner,--no-same-permissions")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(std::fs::read_to_string(target.join("hello.txt")).unwrap(), "again\n");
    assert_eq!(with_flags("--to-command=sh").await.unwrap().status(), 400);

    // Another process id is a 404.
    let (status, _) = upload(
        &app,
        "/apps/copies/processes/nope/files",
        tar_of(&[(&name, b"x", None)]),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn cp_over_the_limit_is_refused_with_413() {
    let app = TestApp::spawn_with(|config| config.max_cp_bytes = 1000).await;
    let release = crate::run::running_app(&app, "bigcopy").await;
    let (pid, dir) = process_and_dir(&app, "bigcopy", &release).await;
    let name = format!("{}/big.bin", dir.display());
    let (status, body) = upload(
        &app,
        &format!("/apps/bigcopy/processes/{pid}/files"),
        tar_of(&[(&name, &[7u8; 5000], None)]),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(!dir.join("big.bin").exists());
}

#[tokio::test]
async fn rack_cp_copies_both_ways_and_rack_metrics_prints_json() {
    let app = TestApp::spawn().await;
    let release = crate::run::running_app(&app, "clicopy").await;
    let (pid, dir) = process_and_dir(&app, "clicopy", &release).await;
    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(local.path().join("tree/sub")).unwrap();
    std::fs::write(local.path().join("tree/sub/a.txt"), "a\n").unwrap();
    std::fs::write(local.path().join("tree/b.txt"), "b\n").unwrap();
    let remote = format!("{pid}:{}/copied", dir.display());
    let run = crate::cli::rack_in(
        &app,
        crate::helpers::PASSWORD,
        &["cp", "tree", &remote, "--app", "clicopy"],
        local.path(),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(dir.join("copied/sub/a.txt")).unwrap(), "a\n");
    let run = crate::cli::rack_in(
        &app,
        crate::helpers::PASSWORD,
        &["cp", &remote, "back", "--app", "clicopy"],
        local.path(),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(local.path().join("back/sub/a.txt")).unwrap(),
        "a\n"
    );
    assert_eq!(std::fs::read_to_string(local.path().join("back/b.txt")).unwrap(), "b\n");

    let run = crate::cli::rack_in(
        &app,
        crate::helpers::PASSWORD,
        &["metrics", "--app", "clicopy", "--service", "web", "--json"],
        local.path(),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let metrics: Vec<Value> = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(metrics[0]["name"], "requests", "{metrics:?}");
}

/// The tar entries (name, content) of a download.
async fn download(app: &TestApp, files: &str, file: &str) -> (u16, Vec<(String, String)>) {
    let response = app
        .convox(Method::GET, files)
        .query(&[("file", file)])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let tarball = response.bytes().await.unwrap();
    if status != 200 {
        return (status, Vec::new());
    }
    let mut archive = tar::Archive::new(&tarball[..]);
    let mut found = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut content = String::new();
        std::io::Read::read_to_string(&mut entry, &mut content).unwrap();
        found.push((entry.path().unwrap().display().to_string(), content));
    }
    (status, found)
}

#[tokio::test]
async fn cp_round_trips_through_a_container_and_refuses_escapes() {
    crate::containers::base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = crate::containers::Leftovers::of(&app);
    app.create_app("boxcopy").await;
    let files = crate::containers::convox_app("v1");
    let id = app.build_source("boxcopy", &crate::containers::as_files(&files)).await;
    let build = app.wait_build("boxcopy", &id).await;
    assert_eq!(build["status"], "complete", "{}", app.build_log("boxcopy", &id).await);
    crate::deploys::promote_follow(&app, "boxcopy", build["release"].as_str().unwrap()).await;
    let processes: Vec<Value> = app.get_json("/apps/boxcopy/processes").await;
    let pid = processes.iter().find(|p| p["type"] == "service").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let files = format!("/apps/boxcopy/processes/{pid}/files");

    let (status, body) = upload(
        &app,
        &files,
        tar_of(&[
            ("/app/uploaded/hello.txt", b"hello container\n", None),
            ("/app/uploaded/link", b"", Some("hello.txt")),
            ("/app/www/copied.txt", b"served\n", None),
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, found) = download(&app, &files, "/app/uploaded/hello.txt").await;
    assert_eq!(status, 200);
    assert_eq!(
        found,
        vec![("app/uploaded/hello.txt".to_owned(), "hello container\n".to_owned())]
    );
    // The app serves it too: it is in the container's own filesystem.
    let router = app.get_json::<Value>("/apps/boxcopy").await["router"]
        .as_str()
        .unwrap()
        .to_owned();
    let served = reqwest::get(format!("http://{router}/copied.txt"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, "served\n");
    assert_eq!(download(&app, &files, "/app/nothing-here").await.0, 404);

    let outside = std::env::temp_dir().join(format!("rack-cp-escape-{pid}"));
    let climbing = format!(
        "/app/{}",
        "../".repeat(4) + outside.to_str().unwrap().trim_start_matches('/')
    );
    let (status, body) = upload(&app, &files, tar_of(&[(&climbing, b"x", None)])).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = upload(&app, &files, tar_of(&[("/app/abs", b"", Some("/etc/passwd"))])).await;
    assert_eq!(status, 400, "{body}");
    assert!(!outside.exists());

    let deleted = app
        .convox(Method::DELETE, &files)
        .query(&[("files", "/app/uploaded/hello.txt")])
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(download(&app, &files, "/app/uploaded/hello.txt").await.0, 404);
}

/// cp into and out of a pod of the real node (tests/api/real_node.rs): a file the pod's httpd
/// serves from /tmp/www (at `url`), downloaded back, and an escape refused.
pub async fn kube_round_trip(app: &TestApp, name: &str, pod: &str, url: &str) {
    let files = format!("/apps/{name}/processes/{pod}/files");
    let (status, body) = upload(
        app,
        &files,
        tar_of(&[("/tmp/www/copied.txt", b"copied into the pod\n", None)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let served = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert_eq!(served, "copied into the pod\n");
    let (status, found) = download(app, &files, "/tmp/www/copied.txt").await;
    assert_eq!(status, 200);
    assert_eq!(
        found,
        vec![("tmp/www/copied.txt".to_owned(), "copied into the pod\n".to_owned())]
    );
    assert_eq!(download(app, &files, "/tmp/www/nothing-here").await.0, 404);
    let (status, body) = upload(app, &files, tar_of(&[("/tmp/../../x", b"x", None)])).await;
    assert_eq!(status, 400, "{body}");
}
