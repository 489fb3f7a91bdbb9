//! The `rack` binary as a client: real child processes against the real server.

use std::time::Duration;

use crate::deploys::{MANIFEST, SERVER, through_router};
use crate::helpers::{PASSWORD, TestApp};

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

async fn rack(app: &TestApp, password: &str, args: &[&str]) -> Run {
    rack_in(app, password, args, std::path::Path::new(".")).await
}

pub async fn rack_in(app: &TestApp, password: &str, args: &[&str], dir: &std::path::Path) -> Run {
    rack_within(app, password, args, dir, 30).await
}

/// Runs the CLI, which must finish within `secs` (rollouts take longer than plain requests).
async fn rack_within(app: &TestApp, password: &str, args: &[&str], dir: &std::path::Path, secs: u64) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(args)
        .current_dir(dir)
        .env("RACK_URL", format!("http://convox:{password}@{}", app.addr))
        .env_remove("RACK_DATA")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(secs), output)
        .await
        .unwrap_or_else(|_| panic!("rack {args:?} finishes within {secs} s"))
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
        !run.stdout.lines().any(|line| line == "OK"),
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

    // The same source again: the rack already holds that package, so it is not sent twice.
    let objects = |app: &TestApp| {
        let pool = app.state.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("select count(*) from objects where app = 'myapp'")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = objects(&app).await;
    let run = rack_in(&app, PASSWORD, &["build", "."], dir.path()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("Uploading source... (unchanged, not sent) OK\n"),
        "{}",
        run.stderr
    );
    assert_eq!(objects(&app).await, before, "no new object");
    // A changed source is sent.
    std::fs::write(dir.path().join("main.sh"), "echo changed").unwrap();
    let run = rack_in(&app, PASSWORD, &["build", "."], dir.path()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("Uploading source... OK\n"), "{}", run.stderr);
    assert_eq!(objects(&app).await, before + 1);
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

/// A directory holding the fixture web app, whose `.convox/app` names `name`.
pub fn app_dir(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("convox.yml"), MANIFEST).unwrap();
    std::fs::write(dir.path().join("server.py"), SERVER).unwrap();
    std::fs::create_dir(dir.path().join(".convox")).unwrap();
    std::fs::write(dir.path().join(".convox/app"), name).unwrap();
    dir
}

/// A rollout command (deploy, promote...), run in `dir`.
pub async fn rollout(app: &TestApp, args: &[&str], dir: &std::path::Path) -> Run {
    rack_within(app, PASSWORD, args, dir, 120).await
}

/// The id after `prefix` on a line of `text` (`Release: R...`).
pub fn id_after(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn deploy_env_ps_and_logs() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = app_dir("myapp");
    let dir = dir.path();

    let run = rollout(&app, &["deploy"], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .starts_with("Packaging source... OK\nUploading source... OK\nStarting build... OK\n"),
        "{}",
        run.stderr
    );
    let build = id_after(&run.stdout, "Build: ");
    let first = id_after(&run.stdout, "Release: ");
    assert!(build.starts_with('B') && first.starts_with('R'), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!("Promoting {first}...\n")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.ends_with("\nOK\n"), "{}", run.stderr);
    assert!(run.stdout.contains(" Status: Updating => Running\n"), "{}", run.stdout);
    assert!(
        !run.stdout.lines().any(|l| l == "OK"),
        "the stream's OK is not printed: {}",
        run.stdout
    );
    assert_eq!(through_router(&app, "myapp").await, format!("{first} \n"));

    let run = rollout(&app, &["env", "set", "GREETING=hi", "--promote"], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.starts_with("Setting GREETING... OK\n"), "{}", run.stderr);
    let second = id_after(&run.stdout, "Release: ");
    assert_ne!(second, first);
    assert!(run.stderr.ends_with("\nOK\n"), "{}", run.stderr);
    assert_eq!(through_router(&app, "myapp").await, format!("{second} hi\n"));

    let run = rack_in(&app, PASSWORD, &["env"], dir).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, "GREETING=hi\n"), "{}", run.stderr);
    let run = rack_in(&app, PASSWORD, &["env", "get", "GREETING"], dir).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, "hi\n"), "{}", run.stderr);
    let run = rack_in(&app, PASSWORD, &["env", "get", "MISSING", "-a", "myapp"], dir).await;
    assert_eq!((run.code, run.stderr.as_str()), (1, "ERROR: env not found: MISSING\n"));
    let run = rack_in(&app, PASSWORD, &["env", "unset", "MISSING"], dir).await;
    assert_eq!((run.code, run.stderr.as_str()), (1, "ERROR: env not found: MISSING\n"));

    // A release whose health check fails is rolled back; the previous one keeps serving.
    let run = rollout(&app, &["env", "set", "FAIL_HEALTH=1", "--promote"], dir).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let third = id_after(&run.stdout, "Release: ");
    assert!(run.stdout.contains("Status: Rollback => Reverted"), "{}", run.stdout);
    let last = run.stderr.lines().last().unwrap();
    assert!(last.starts_with("ERROR: "), "{}", run.stderr);
    assert!(
        !run.stdout.contains("ERROR: "),
        "the reason is printed once: {}",
        run.stdout
    );
    let info: serde_json::Value = app.get_app("myapp").await.json().await.unwrap();
    assert_eq!(info["release"], second.as_str());
    assert_eq!(through_router(&app, "myapp").await, format!("{second} hi\n"));
    // The environment is the latest release's, promoted or not.
    let run = rack_in(&app, PASSWORD, &["env"], dir).await;
    assert_eq!(run.stdout, "FAIL_HEALTH=1\nGREETING=hi\n");
    let run = rack_in(&app, PASSWORD, &["env", "unset", "FAIL_HEALTH"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "Unsetting FAIL_HEALTH... OK\n");
    assert_ne!(id_after(&run.stdout, "Release: "), third);

    let run = rack_in(&app, PASSWORD, &["ps"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["ID", "SERVICE", "STATUS", "RELEASE", "STARTED", "COMMAND"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[1..4], ["web", "running", second.as_str()], "{}", run.stdout);
    assert!(lines[1].ends_with("python3 -u server.py"), "{}", run.stdout);

    let run = rack_in(&app, PASSWORD, &["logs", "--no-follow"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.split(' ').nth(1).is_some_and(|s| s.starts_with("system/"))),
        "{}",
        run.stdout
    );
    let run = rack_in(
        &app,
        PASSWORD,
        &[
            "logs",
            "--no-follow",
            "-s",
            "web",
            "--since",
            "10m",
            "--filter",
            "listening",
        ],
        dir,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stdout.is_empty());
    assert!(run.stdout.lines().all(|l| l.contains("listening on")), "{}", run.stdout);
}

#[tokio::test]
async fn releases_promote_rollback_and_cancel() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = app_dir("myapp");
    let dir = dir.path();

    let run = rack_in(&app, PASSWORD, &["build", "--id"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let first = run.stdout.trim().to_owned();
    assert!(first.starts_with('R') && !first.contains('\n'), "{}", run.stdout);
    // Without an id, the latest release is promoted.
    let run = rollout(&app, &["releases", "promote"], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.starts_with(&format!("Promoting {first}...\n")),
        "{}",
        run.stderr
    );

    let run = rack_in(&app, PASSWORD, &["env", "set", "GREETING=two", "A=1"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "Setting GREETING, A... OK\n");
    let second = id_after(&run.stdout, "Release: ");
    let run = rollout(&app, &["releases", "promote", &second], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(through_router(&app, "myapp").await, format!("{second} two\n"));

    let run = rack_in(&app, PASSWORD, &["releases", "-a", "myapp"], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "STATUS", "BUILD", "CREATED", "DESCRIPTION"]
    );
    assert!(lines[1].starts_with(&format!("{second}  active  B")), "{}", run.stdout);
    assert!(lines[1].ends_with("env add:A add:GREETING"), "{}", run.stdout);
    assert!(lines[2].starts_with(&format!("{first} ")), "{}", run.stdout);
    assert!(!lines[2].contains("active"), "{}", run.stdout);

    let run = rack_in(&app, PASSWORD, &["releases", "-a", "myapp", "info", &second], dir).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!("Id           {second}\n")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("Env          A=1\n             GREETING=two\n"),
        "{}",
        run.stdout
    );

    // Promoting an older release is refused; rollback makes a new one from it.
    let run = rollout(&app, &["releases", "promote", &first], dir).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .ends_with("ERROR: can not promote an older release, try rollback\n"),
        "{}",
        run.stderr
    );
    let run = rollout(&app, &["releases", "rollback", &first], dir).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let prefix = format!("Rolling back to {first}... OK, ");
    let rollback = id_after(&run.stderr, &prefix);
    assert!(rollback.starts_with('R') && rollback != first, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("Promoting {rollback}...\n")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.ends_with("\nOK\n"), "{}", run.stderr);
    assert_eq!(through_router(&app, "myapp").await, format!("{rollback} \n"));

    // Cancel: only while a rollout runs; a detached promote leaves one running.
    let run = rack_in(&app, PASSWORD, &["apps", "cancel", "myapp"], dir).await;
    assert_eq!(
        (run.code, run.stderr.as_str()),
        (1, "Cancelling deployment of myapp... ERROR: app is not updating\n")
    );
    let run = rack_in(&app, PASSWORD, &["env", "set", "FAIL_HEALTH=1"], dir).await;
    let stuck = id_after(&run.stdout, "Release: ");
    let run = rack_in(&app, PASSWORD, &["releases", "promote", &stuck, "--detach"], dir).await;
    assert_eq!(
        (run.code, run.stderr.clone()),
        (0, format!("Promoting {stuck}... OK\n"))
    );
    let run = rack_in(&app, PASSWORD, &["apps", "cancel"], dir).await;
    assert_eq!(
        (run.code, run.stderr.as_str()),
        (0, "Cancelling deployment of myapp... OK\n")
    );
}

#[tokio::test]
async fn tokens_can_be_created_used_and_revoked() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let run = rack(&app, PASSWORD, &["tokens", "create", "ci", "--role", "read"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let secret = run.stdout.trim().to_owned();
    assert!(secret.starts_with("rack_"), "{}", run.stdout);
    // The token works as the password in RACK_URL, with its role's limits.
    let run = rack(&app, &secret, &["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = rack(&app, &secret, &["apps", "create", "other"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("ERROR: this credential has the read role; POST /apps needs admin"),
        "{}",
        run.stderr
    );
    let run = rack(&app, PASSWORD, &["tokens"]).await;
    let id = run
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(run.stdout.contains(" ci "), "{}", run.stdout);
    assert!(!run.stdout.contains(&secret));
    let run = rack(&app, PASSWORD, &["tokens", "delete", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        rack(&app, &secret, &["apps"]).await.stderr,
        "ERROR: invalid authentication\n"
    );
}

#[tokio::test]
async fn scoped_tokens_and_the_audit_log_from_the_cli() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    app.create_app("other").await;
    let run = rack(
        &app,
        PASSWORD,
        &[
            "tokens",
            "create",
            "ci-myapp",
            "--role",
            "deploy",
            "--app",
            "myapp",
            "--expires",
            "30d",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let secret = run.stdout.trim().to_owned();
    let run = rack(&app, &secret, &["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("myapp") && !run.stdout.contains("other"),
        "{}",
        run.stdout
    );
    let run = rack(&app, &secret, &["apps", "info", "other"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("limited to the apps myapp, not other"),
        "{}",
        run.stderr
    );
    let run = rack(&app, PASSWORD, &["tokens"]).await;
    assert!(run.stdout.contains("myapp"), "{}", run.stdout);
    let run = rack(&app, PASSWORD, &["audit", "--app", "myapp", "--since", "1h"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("WHEN"), "{}", run.stdout);
    assert!(
        run.stdout.contains("password") && run.stdout.contains("POST"),
        "{}",
        run.stdout
    );
    let run = rack(&app, &secret, &["audit"]).await;
    assert_eq!(run.code, 1, "a deploy token reads no audit log");
    // `--app "$UNSET"` is a mistake, not every app.
    let run = rack(&app, PASSWORD, &["tokens", "create", "ci-all", "--app", ""]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("empty app name"), "{}", run.stderr);
    let run = rack(&app, PASSWORD, &["tokens"]).await;
    assert!(!run.stdout.contains("ci-all"), "{}", run.stdout);
}

#[tokio::test]
async fn scale_and_services() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = app_dir("myapp");
    assert_eq!(rollout(&app, &["deploy"], dir.path()).await.code, 0);
    let run = rollout(&app, &["scale", "web", "--count", "2"], dir.path()).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("Status: Updating => Running"), "{}", run.stdout);
    assert_eq!(run.stderr, "Scaling web to 2...\nOK\n");
    let run = rack_in(&app, PASSWORD, &["services"], dir.path()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let row = run
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(row, ["web", "2"], "{}", run.stdout);
    let run = rack_in(&app, PASSWORD, &["ps"], dir.path()).await;
    assert_eq!(
        run.stdout.lines().filter(|l| l.contains(" running ")).count(),
        2,
        "{}",
        run.stdout
    );
}
