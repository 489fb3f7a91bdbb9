//! The `rack` binary as a client: real child processes against the real server.

use std::time::Duration;

use crate::helpers::{PASSWORD, TestApp};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn rack(app: &TestApp, password: &str, args: &[&str]) -> Run {
    rack_in(app, password, args, std::path::Path::new(".")).await
}

async fn rack_in(app: &TestApp, password: &str, args: &[&str], dir: &std::path::Path) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(args)
        .current_dir(dir)
        .env("RACK_URL", format!("http://convox:{password}@{}", app.addr))
        .env_remove("RACK_DATA")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the CLI finishes within 30 s")
        .expect("running the CLI");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn apps_commands_create_list_show_and_delete() {
    let app = TestApp::spawn().await;
    let run = rack(&app, PASSWORD, &["apps", "create", "myapp"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, "Creating myapp... OK\n"));

    let run = rack(&app, PASSWORD, &["apps"]).await;
    assert_eq!(run.code, 0);
    assert_eq!(run.stdout, "APP    STATUS   RELEASE\nmyapp  running\n");

    let run = rack(&app, PASSWORD, &["apps", "info", "myapp"]).await;
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("Name        myapp\n"), "{}", run.stdout);
    assert!(run.stdout.contains("Status      running\n"), "{}", run.stdout);

    let run = rack(&app, PASSWORD, &["apps", "lock", "myapp"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = rack(&app, PASSWORD, &["apps", "delete", "myapp"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.ends_with("ERROR: app is locked: myapp\n"), "{}", run.stderr);

    rack(&app, PASSWORD, &["apps", "unlock", "myapp"]).await;
    let run = rack(&app, PASSWORD, &["apps", "delete", "myapp"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, "Deleting myapp... OK\n"));
    assert!(app.list_apps().await.is_empty());
}

#[tokio::test]
async fn errors_exit_1_with_the_message() {
    let app = TestApp::spawn().await;
    let run = rack(&app, PASSWORD, &["apps", "info", "nope"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (1, "ERROR: app not found: nope\n"));
    let run = rack(&app, "wrong", &["apps"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (1, "ERROR: invalid authentication\n"));
}

#[tokio::test]
async fn rack_shows_the_system() {
    let app = TestApp::spawn().await;
    let run = rack(&app, PASSWORD, &["rack"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("Name      rack\n"), "{}", run.stdout);
    assert!(run.stdout.contains("Provider  local\n"), "{}", run.stdout);
    assert!(run.stdout.contains("Version   3."), "{}", run.stdout);
}

#[tokio::test]
async fn build_packages_uploads_builds_and_prints_the_ids() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = "services:\n  web:\n    build:\n      command: ls; test ! -e secret.txt\n";
    std::fs::write(dir.path().join("convox.yml"), manifest).unwrap();
    std::fs::write(dir.path().join("main.sh"), "echo hi").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "not for the build").unwrap();
    std::fs::write(dir.path().join(".dockerignore"), "secret.txt\n").unwrap();
    // The app comes from .convox/app, as with convox.
    std::fs::create_dir(dir.path().join(".convox")).unwrap();
    std::fs::write(dir.path().join(".convox/app"), "myapp\n").unwrap();

    let run = rack_in(&app, PASSWORD, &["build", "."], dir.path()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .starts_with("Packaging source... OK\nUploading source... OK\nStarting build... OK\n"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("main.sh\n"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("OK\n"),
        "the stream's OK is not printed: {}",
        run.stdout
    );
    let ids: Vec<&str> = run.stdout.lines().rev().take(2).collect();
    assert!(
        ids[0].starts_with("Release: R") && ids[1].starts_with("Build: B"),
        "{}",
        run.stdout
    );
    let build_id = ids[1].trim_start_matches("Build: ").to_owned();

    let run = rack(&app, PASSWORD, &["builds", "-a", "myapp"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("ID "), "{}", run.stdout);
    assert!(run.stdout.contains(&build_id), "{}", run.stdout);
    let run = rack(&app, PASSWORD, &["builds", "info", &build_id, "-a", "myapp"]).await;
    assert!(run.stdout.contains("Status       complete\n"), "{}", run.stdout);
    let run = rack(&app, PASSWORD, &["builds", "logs", &build_id, "-a", "myapp"]).await;
    assert!(run.stdout.contains("main.sh\n"), "{}", run.stdout);
}

#[tokio::test]
async fn a_failed_build_exits_1() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("convox.yml"),
        "services:\n  web:\n    build:\n      command: exit 1\n",
    )
    .unwrap();
    let run = rack_in(&app, PASSWORD, &["build", ".", "--app", "myapp"], dir.path()).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("ERROR: service web: the build command failed"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.ends_with("ERROR: build failed\n"), "{}", run.stderr);
}
