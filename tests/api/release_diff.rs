//! Release diffs: env keys (never values), the build and the manifest, through the API and the
//! CLI, and printed before a promote.

use reqwest::Method;

use crate::cli::{app_dir, id_after, rack_in, rollout};
use crate::helpers::{PASSWORD, TestApp};

#[tokio::test]
async fn a_release_diff_names_env_keys_and_never_their_values() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = app_dir("myapp");
    let dir = dir.path();
    let run = rollout(&app, &["deploy"], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let active = id_after(&run.stdout, "Release: ");

    let run = rack_in(
        &app,
        PASSWORD,
        &["env", "set", "ALPHA=alpha-hush-1", "KEEP=keep-hush"],
        dir,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let before = id_after(&run.stdout, "Release: ");
    // A new build with a changed manifest, then env changes on top of it.
    let manifest = std::fs::read_to_string(dir.join("convox.yml")).unwrap();
    std::fs::write(dir.join("convox.yml"), manifest.replace("grace: 1", "grace: 2")).unwrap();
    let run = rack_in(&app, PASSWORD, &["build", "--id", "--description", "faster"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = rack_in(
        &app,
        PASSWORD,
        &["env", "set", "ALPHA=alpha-hush-2", "BRAVO=bravo-hush"],
        dir,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = rack_in(&app, PASSWORD, &["env", "unset", "KEEP"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let after = id_after(&run.stdout, "Release: ");

    let diff: serde_json::Value = app
        .get_json(&format!("/apps/myapp/releases/{before}/diff/{after}"))
        .await;
    assert_eq!(diff["env"]["added"], serde_json::json!(["BRAVO"]), "{diff}");
    assert_eq!(diff["env"]["removed"], serde_json::json!(["KEEP"]), "{diff}");
    assert_eq!(diff["env"]["changed"], serde_json::json!(["ALPHA"]), "{diff}");
    assert_eq!(diff["build"]["changed"], true, "{diff}");
    assert_eq!(diff["build"]["to"]["description"], "faster", "{diff}");
    let manifest_diff = diff["manifest"]["diff"].as_str().unwrap();
    assert!(manifest_diff.contains("-      grace: 1\n+      grace: 2\n"), "{diff}");
    assert!(!diff.to_string().contains("hush"), "a value leaked: {diff}");
    let missing = app
        .json(Method::GET, &format!("/apps/myapp/releases/{before}/diff/RNOPE"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let run = rack_in(&app, PASSWORD, &["releases", "diff", &before, &after], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("env:      +BRAVO -KEEP ~ALPHA"), "{}", run.stdout);
    assert!(run.stdout.contains("+      grace: 2"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("hush") && !run.stderr.contains("hush"),
        "{}",
        run.stdout
    );
    // One release: compared with the active one.
    let run = rack_in(&app, PASSWORD, &["releases", "diff", &after], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.starts_with(&format!("Changes from {active} to {after}:\n")),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("hush"), "{}", run.stdout);

    // A promote says what it changes first; `--quiet` does not.
    let run = rollout(&app, &["releases", "promote", &after], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with(&format!("Changes from {active} to {after}:\n")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("+ALPHA +BRAVO"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("hush") && !run.stderr.contains("hush"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let run = rack_in(&app, PASSWORD, &["env", "set", "CHARLIE=charlie-hush"], dir).await;
    let last = id_after(&run.stdout, "Release: ");
    let run = rack_in(
        &app,
        PASSWORD,
        &["releases", "promote", &last, "--detach", "--quiet"],
        dir,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stdout.contains("Changes from"), "{}", run.stdout);
}
