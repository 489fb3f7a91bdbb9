//! Image builds cannot reach the host (security round 2, findings 1 and 2): a `RUN --mount` that
//! climbs out of the build context, a link a build command made to `/` and used as a bind
//! source, a Dockerfile that is a link out: each fails the build saying why, nothing of rack's
//! data directory reaches the build log, nothing is written outside the context; each image
//! builds from a copy of its context that rack made (and removes).

use serde_json::Value;

use crate::containers::{BASE, Leftovers, base_image};
use crate::helpers::TestApp;

/// A secret in the server's data directory, as the password file is (mode 0600, root's).
fn plant_secret(app: &TestApp) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let secret = format!("secret-{}", uuid::Uuid::new_v4().simple());
    let path = app.state.config.data_dir.join("planted-secret");
    std::fs::write(&path, &secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, secret)
}

/// Builds `files` as app `name`; the build and its log.
async fn build(app: &TestApp, name: &str, files: &[(&str, &str)]) -> (Value, String) {
    app.create_app(name).await;
    let id = app.build_source(name, files).await;
    let build = app.wait_build(name, &id).await;
    let log = app.build_log(name, &id).await;
    (build, log)
}

/// The path that climbs from anywhere to the host's root, then down to `dir`.
fn climbing_to(dir: &std::path::Path) -> String {
    format!(
        "{}{}",
        "../".repeat(16),
        dir.display().to_string().trim_start_matches('/')
    )
}

#[tokio::test]
async fn a_cache_mount_that_climbs_out_fails_the_build() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    let (planted, secret) = plant_secret(&app);
    let data = &app.state.config.data_dir;
    let dockerfile = format!(
        "FROM {BASE}\nRUN --mount=type=cache,id={},target=/h cat /h/planted-secret; touch /h/written-by-build\n",
        climbing_to(data)
    );
    let (build, log) = build(
        &app,
        "climber",
        &[
            ("convox.yml", "services:\n  web:\n    build: .\n"),
            ("Dockerfile", &dockerfile),
        ],
    )
    .await;
    assert_eq!(build["status"], "failed", "{log}");
    let reason = build["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("line 2: --mount id=") && reason.contains("out of the build context"),
        "{reason}"
    );
    assert!(!log.contains(&secret), "the secret reached the build log:\n{log}");
    assert!(!data.join("written-by-build").exists());
    assert_eq!(std::fs::read_to_string(planted).unwrap(), secret);
}

#[tokio::test]
async fn a_link_to_the_root_made_by_a_build_command_is_refused() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    let (_, secret) = plant_secret(&app);
    let data = app.state.config.data_dir.display().to_string();
    // `prep` (built first: services build in name order) makes the link in the directory `web`
    // builds its image from; `web` mounts it.
    let manifest = "services:\n  prep:\n    build:\n      command: ln -sfn / rootlink\n    command: sleep 600\n  web:\n    build: .\n";
    let dockerfile =
        format!("FROM {BASE}\nRUN --mount=type=bind,source=rootlink,target=/h,ro cat /h{data}/planted-secret\n");
    let (build, log) = build(&app, "linker", &[("convox.yml", manifest), ("Dockerfile", &dockerfile)]).await;
    assert_eq!(build["status"], "failed", "{log}");
    let reason = build["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("service web") && reason.contains("link rootlink points to /, outside the build context"),
        "{reason}"
    );
    assert!(!log.contains(&secret), "the secret reached the build log:\n{log}");
}

#[tokio::test]
async fn a_dockerfile_that_links_out_is_not_read() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    let (planted, secret) = plant_secret(&app);
    let command = format!("ln -sfn {} Evil.dockerfile", planted.display());
    let manifest = format!(
        "services:\n  prep:\n    build:\n      command: {command}\n    command: sleep 600\n  web:\n    build:\n      path: .\n      manifest: Evil.dockerfile\n"
    );
    let (build, log) = build(&app, "reader", &[("convox.yml", &manifest)]).await;
    assert_eq!(build["status"], "failed", "{log}");
    let reason = build["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("services.web.build.manifest: Evil.dockerfile is not a file inside the build context"),
        "{reason}"
    );
    assert!(!log.contains(&secret) && !reason.contains(&secret));
}

#[tokio::test]
async fn services_build_from_their_own_copy_of_the_context_on_a_user_mode_network() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    // `prep` writes into the directory `web` builds from, before `web` builds: the copy is made
    // after, so the file is in the image; the copy is gone once the image is built.
    let manifest = "services:\n  prep:\n    build:\n      command: echo from-prep > made-by-prep\n    command: sleep 600\n  web:\n    build: .\n";
    // (Unique, so that no cached layer stands in for the step.)
    let run = uuid::Uuid::new_v4().simple();
    // It also shows the step's network: user-mode (slirp4netns's tap0), not podman's bridge.
    let dockerfile = format!(
        "FROM {BASE}\nCOPY . /src\nRUN echo \"copied: $(cat /src/made-by-prep)\" && cut -f1,2 /proc/net/route && echo {run}\n"
    );
    let (build, log) = build(&app, "copies", &[("convox.yml", manifest), ("Dockerfile", &dockerfile)]).await;
    assert_eq!(build["status"], "complete", "{log}");
    assert!(log.lines().any(|line| line == "copied: from-prep"), "{log}");
    assert!(
        log.lines().any(|line| line == "tap0\t00000000"),
        "no default route through tap0:\n{log}"
    );
    let contexts = app.state.config.data_dir.join("podman/contexts");
    let left: Vec<_> = std::fs::read_dir(&contexts)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
