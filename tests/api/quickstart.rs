//! The README's quick start, run as it is written (the shell block between its `quick-start`
//! markers) against a fresh server, with the `rack` CLI this build made; and every example in
//! `examples/` deployed with the CLI. A command of the quick start or an example that stops
//! working fails CI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::helpers::{PASSWORD, TestApp};

/// The repository's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The quick start's commands, from the README.
fn quick_start() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("<!-- quick-start")
        .expect("the README's quick-start marker");
    let end = readme
        .find("<!-- /quick-start -->")
        .expect("the README's quick-start end marker");
    let block = &readme[start..end];
    let code = block.split_once("```sh\n").expect("a sh block after the marker").1;
    code.split_once("```").expect("the end of the sh block").0.to_owned()
}

/// Runs `script` with bash (stopping at the first failing command), as a user of `app` would:
/// the CLI on PATH, `RACK_URL` set, in the repository's root, with a home of its own.
async fn run(app: &TestApp, script: &str, home: &Path) -> String {
    let cli = Path::new(env!("CARGO_BIN_EXE_rack")).parent().unwrap().to_owned();
    let path = format!("{}:{}", cli.display(), std::env::var("PATH").unwrap_or_default());
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(root())
            .env("PATH", path)
            .env("HOME", home)
            .env("RACK_URL", format!("http://convox:{PASSWORD}@{}", app.addr))
            .env_remove("RACK_APP")
            .env_remove("RACK_FINGERPRINT")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the commands finish within 5 minutes")
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{script}\nfailed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

#[tokio::test]
async fn the_readmes_quick_start_works_as_written() {
    let app = TestApp::spawn().await;
    let home = tempfile::tempdir().unwrap();
    let out = run(&app, &quick_start(), home.path()).await;
    let answers: Vec<&str> = out.lines().filter(|l| l.contains("from rack!")).collect();
    assert_eq!(
        answers,
        [
            "Hello from rack! version 1",
            "Hello from rack! version 2",
            "Hello from rack! version 1"
        ],
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("service/web/") && l.contains("GET /")),
        "{out}"
    );
    // The example in the repository is untouched (the quick start changes a copy).
    let example = std::fs::read_to_string(root().join("examples/hello/app.py")).unwrap();
    assert!(example.contains("VERSION = \"1\""));
}

#[tokio::test]
async fn every_example_deploys() {
    let app = TestApp::spawn().await;
    let home = tempfile::tempdir().unwrap();
    let out = run(
        &app,
        "rack apps create release-and-timer\n\
         rack deploy -a release-and-timer examples/release-and-timer 2>&1\n\
         router=$(rack apps info release-and-timer | awk '$1 == \"Router\" {print $2}')\n\
         curl -s \"http://$router/\"\n",
        home.path(),
    )
    .await;
    assert!(out.contains("migrating for release R"), "{out}");
    assert!(out.contains("migrated and ticking"), "{out}");

    // Its README's commands, as written (and the count survives a redeploy).
    let _servers = crate::resources::ResourceServers::at(&app.state.config.data_dir);
    let readme = std::fs::read_to_string(root().join("examples/hello-postgres/README.md")).unwrap();
    let block = readme.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    let out = run(
        &app,
        &format!("{block}rack deploy -a hello-postgres examples/hello-postgres >/dev/null 2>&1\ncurl -s \"http://$router/\"\n"),
        home.path(),
    )
    .await;
    assert!(out.contains("Hello from rack! visit 1\n"), "{out}");
    assert!(out.contains("Hello from rack! visit 2\n"), "{out}");
    assert!(out.contains("Hello from rack! visit 3\n"), "the count after a redeploy: {out}");

    if nix::unistd::geteuid().is_root() {
        let _leftovers = crate::containers::Leftovers::of(&app);
        let out = run(
            &app,
            "examples/base-image/make\n\
             rack apps create hello-docker\n\
             rack deploy -a hello-docker examples/hello-docker\n\
             router=$(rack apps info hello-docker | awk '$1 == \"Router\" {print $2}')\n\
             curl -s \"http://$router/\"\n",
            home.path(),
        )
        .await;
        assert!(out.contains("Hello from a container!"), "{out}");
    } else {
        eprintln!("skipped examples/hello-docker: containers need root here");
    }
}
