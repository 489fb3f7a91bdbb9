//! The `rack` binary as a client: real child processes against the real server.

use std::time::Duration;

use crate::helpers::{PASSWORD, TestApp};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn rack(app: &TestApp, password: &str, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(args)
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
