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
async fn errors_exit_with_their_code_and_the_message() {
    let app = TestApp::spawn().await;
    let run = rack(&app, PASSWORD, &["apps", "info", "nope"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (1, "ERROR: app not found: nope\n"));
    // A refused credential: 4.
    let run = rack(&app, "wrong", &["apps"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (4, "ERROR: invalid authentication\n"));
    // Usage: clap's 2.
    let run = rack(&app, PASSWORD, &["apps", "--no-such-flag"]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    // Nothing listening: 5. The port was just free; nothing binds it again in between.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let run = Cli::new()
        .url(&format!("http://:{PASSWORD}@{closed}"))
        .run(&["apps"])
        .await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.starts_with("ERROR: could not reach the rack"),
        "{}",
        run.stderr
    );
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

    // A release whose health check fails is rolled back (exit 3); the previous one keeps
    // serving.
    let run = rollout(&app, &["env", "set", "FAIL_HEALTH=1", "--promote"], dir).await;
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
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
    // A deploy now takes that env, fails its health check and is rolled back: exit 3, and
    // with --json stdout holds nothing but the error on stderr.
    let run = rollout(&app, &["deploy", "--json"], dir).await;
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains("Status: Rollback => Reverted"), "{}", run.stderr);
    assert!(
        run.stderr.lines().last().unwrap().starts_with("ERROR: "),
        "{}",
        run.stderr
    );
    assert_eq!(through_router(&app, "myapp").await, format!("{second} hi\n"));
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

/// The CLI with full control of its environment: no `RACK_URL` unless given, `HOME` and
/// `XDG_CONFIG_HOME` in a directory of its own unless given, optional standard input.
pub struct Cli {
    url: Option<String>,
    config: Option<std::path::PathBuf>,
    stdin: Option<String>,
    env: Vec<(String, String)>,
}

impl Cli {
    pub fn new() -> Self {
        Self {
            url: None,
            config: None,
            stdin: None,
            env: Vec::new(),
        }
    }

    pub fn url(mut self, url: &str) -> Self {
        self.url = Some(url.to_owned());
        self
    }

    /// `home` as HOME, `home/config` as XDG_CONFIG_HOME.
    pub fn home(mut self, home: &std::path::Path) -> Self {
        self.config = Some(home.to_owned());
        self
    }

    pub fn stdin(mut self, text: &str) -> Self {
        self.stdin = Some(text.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub async fn run(&self, args: &[&str]) -> Run {
        use tokio::io::AsyncWriteExt;
        let scratch = tempfile::tempdir().unwrap();
        let home = self.config.clone().unwrap_or_else(|| scratch.path().to_owned());
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"));
        command
            .args(args)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env_remove("RACK_URL")
            .env_remove("RACK_DATA")
            .env_remove("RACK_FINGERPRINT")
            .env_remove("RACK_APP")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(url) = &self.url {
            command.env("RACK_URL", url);
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("running the CLI");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(text) = &self.stdin {
            stdin.write_all(text.as_bytes()).await.unwrap();
        }
        drop(stdin);
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("rack {args:?} finishes within 60 s"))
            .unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// `run`'s stdout as one JSON document, after a success.
fn json_of(args: &[&str], run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "rack {args:?}: {}{}", run.stdout, run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("rack {args:?} prints JSON ({e}):\n{}", run.stdout))
}

#[tokio::test]
async fn every_listing_and_show_prints_json_with_the_api_fields() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let dir = app_dir("myapp");
    let dir = dir.path();

    // A deploy with --json: the build as the API shows it on stdout, every log on stderr.
    let run = rollout(&app, &["deploy", "--json"], dir).await;
    let build = json_of(&["deploy", "--json"], &run);
    assert_eq!(build["status"], "complete", "{build}");
    let build_id = build["id"].as_str().unwrap().to_owned();
    let release = build["release"].as_str().unwrap().to_owned();
    assert!(run.stderr.contains("Status: Updating => Running"), "{}", run.stderr);
    let run = rack_in(&app, PASSWORD, &["env", "set", "GREETING=hi", "--json"], dir).await;
    let second = json_of(&["env", "set"], &run);
    let second = second["id"].as_str().unwrap().to_owned();
    let run = rack(&app, PASSWORD, &["tokens", "create", "ci", "--role", "read", "--json"]).await;
    let token = json_of(&["tokens", "create"], &run);
    assert!(token["token"].as_str().unwrap().starts_with("rack_"), "{token}");

    let arrays: &[&[&str]] = &[
        &["apps"],
        &["builds"],
        &["releases"],
        &["services"],
        &["ps"],
        &["resources"],
        &["tokens"],
        &["registries"],
        &["audit"],
    ];
    for args in arrays {
        let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let value = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
        assert!(value.is_array(), "rack {args:?}: {value}");
    }
    let objects: &[&[&str]] = &[
        &["rack"],
        &["apps", "info", "myapp"],
        &["builds", "info", &build_id],
        &["releases", "info", &release],
        &["releases", "diff", &release, &second],
        &["env"],
        &["system", "usage"],
    ];
    for args in objects {
        let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let value = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
        assert!(value.is_object(), "rack {args:?}: {value}");
    }
    // The fields are the API's.
    let args = ["--json", "apps"];
    let apps = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
    assert_eq!(apps[0]["name"], "myapp", "{apps}");
    assert_eq!(apps[0]["release"], release.as_str(), "{apps}");
    let args = ["releases", "--json"];
    let releases = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
    assert_eq!(releases[0]["id"], second.as_str(), "{releases}");
    let args = ["ps", "--json"];
    let ps = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
    assert_eq!(ps[0]["name"], "web", "{ps}");
    // env: the values as the API has them.
    let args = ["env", "--json"];
    let env = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
    assert_eq!(env, serde_json::json!({"GREETING": "hi"}));
    let args = ["env", "get", "GREETING", "--json"];
    let value = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
    assert_eq!(value, "hi");
    let args = ["releases", "diff", &release, &second, "--json"];
    let diff = json_of(&args, &rack_in(&app, PASSWORD, &args, dir).await);
    assert_eq!(diff["env"]["added"], serde_json::json!(["GREETING"]), "{diff}");
    // A promote with --json: the rollout on stderr, the app afterwards on stdout.
    let run = rollout(&app, &["releases", "promote", &second, "--json"], dir).await;
    let promoted = json_of(&["releases", "promote"], &run);
    assert_eq!(promoted["release"], second.as_str(), "{promoted}");
    assert_eq!(promoted["status"], "running", "{promoted}");
}

#[tokio::test]
async fn completions_generate_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let run = Cli::new().run(&["completion", shell]).await;
        assert_eq!(run.code, 0, "{shell}: {}", run.stderr);
        assert!(run.stdout.contains("rack"), "{shell}: {}", run.stdout);
        // Subcommands and global flags are in the script.
        assert!(
            run.stdout.contains("login") && run.stdout.contains("json"),
            "{shell}: {}",
            run.stdout
        );
    }
    let run = Cli::new().run(&["completion", "tcsh"]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[tokio::test]
async fn help_has_no_colour_off_a_terminal_or_with_no_color() {
    for env in [("NO_COLOR", "1"), ("TERM", "xterm-256color")] {
        let run = Cli::new().env(env.0, env.1).run(&["--help"]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(!run.stdout.contains('\u{1b}'), "{env:?}: {:?}", run.stdout);
    }
}

#[tokio::test]
async fn login_saves_racks_privately_and_switch_chooses_one() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let home = tempfile::tempdir().unwrap();
    let cli = || Cli::new().home(home.path());
    let url = format!("http://{}", app.addr);
    let file = home.path().join("config/rack/racks.json");

    // A wrong password is refused at login (exit 4), and nothing is saved.
    let run = cli().run(&["login", &url, "--password", "wrong"]).await;
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("refused this credential"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("wrong"),
        "the secret is not echoed: {}",
        run.stderr
    );
    assert!(!file.exists());

    let run = cli()
        .run(&["login", &url, "--password", PASSWORD, "--name", "local"])
        .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("Logged in to local"), "{}", run.stderr);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(file.parent().unwrap()).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    // Without RACK_URL, commands talk to the saved rack.
    let run = cli().run(&["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("myapp"), "{}", run.stdout);

    // A second rack, with a read token read from standard input (as CI pipes a secret).
    let token = rack(&app, PASSWORD, &["tokens", "create", "ci", "--role", "read"]).await;
    let token = token.stdout.trim().to_owned();
    let run = cli()
        .stdin(&format!("{token}\n"))
        .run(&["login", &url, "--name", "ci"])
        .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let run = cli().run(&["racks", "--json"]).await;
    let racks = json_of(&["racks"], &run);
    assert_eq!(
        racks,
        serde_json::json!([
            {"name": "ci", "url": url, "current": true},
            {"name": "local", "url": url, "current": false},
        ])
    );
    assert!(!run.stdout.contains(&token));
    let run = cli().run(&["apps", "create", "other"]).await;
    assert_eq!(run.code, 1, "the read token is the one used: {}", run.stderr);
    let run = cli().run(&["racks"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.lines().any(|l| l.starts_with("ci ") && l.ends_with('*')),
        "{}",
        run.stdout
    );

    let run = cli().run(&["switch", "local"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, "Switched to local\n"));
    let run = cli().run(&["apps", "create", "other"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = cli().run(&["switch", "nope"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("saved: ci, local"), "{}", run.stderr);

    // RACK_URL wins over the saved rack.
    let run = cli()
        .env("RACK_URL", &format!("http://:wrong@{}", app.addr))
        .run(&["apps"])
        .await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "still private after rewrites"
    );
}

#[tokio::test]
async fn login_with_a_token_flag_saves_it_and_commands_carry_its_role() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let home = tempfile::tempdir().unwrap();
    let cli = || Cli::new().home(home.path());
    let url = format!("http://{}", app.addr);
    let token = rack(&app, PASSWORD, &["tokens", "create", "deployer", "--role", "deploy"]).await;
    let token = token.stdout.trim().to_owned();
    assert!(token.starts_with("rack_"), "{token}");

    // A token that is not one is refused, nothing saved.
    let run = cli().run(&["login", &url, "--token", "rack_notatoken"]).await;
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    assert!(!run.stderr.contains("rack_notatoken"), "not echoed: {}", run.stderr);
    // --token and --password are one or the other.
    let run = cli()
        .run(&["login", &url, "--token", &token, "--password", PASSWORD])
        .await;
    assert_eq!(run.code, 2, "{}", run.stderr);

    let run = cli()
        .run(&["login", &url, "--token", &token, "--name", "deployer"])
        .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("with the deploy role"), "{}", run.stderr);
    assert!(!run.stdout.contains(&token) && !run.stderr.contains(&token));
    let saved = std::fs::read_to_string(home.path().join("config/rack/racks.json")).unwrap();
    assert!(saved.contains(&token), "the token is what is saved: {saved}");
    assert!(!saved.contains(PASSWORD));

    // Without RACK_URL, commands use it: reading works, creating an app (admin) does not.
    let run = cli().run(&["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("myapp"), "{}", run.stdout);
    let run = cli().run(&["apps", "create", "other"]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("admin"), "names the role it needs: {}", run.stderr);

    // Revoked, the saved token stops working (exit 4: the credential was refused).
    let tokens: Vec<serde_json::Value> = app.get_json("/tokens").await;
    let id = tokens.iter().find(|t| t["name"] == "deployer").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = rack(&app, PASSWORD, &["tokens", "delete", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = cli().run(&["apps"]).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
}
