//! One-off processes and exec: the convox CLI's exact `run`, `run --detach` and `exec`
//! sequences (stdin, its end, exit codes), terminals, timeouts, the same through `rack run` and
//! `rack exec`, and the release phase.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::deploys::{SERVER, promote_follow, through_router};
use crate::helpers::{PASSWORD, TestApp, status_text, wait_for};

const MARKER: &str = "F1E49A85-0AD7-4AEF-A618-C249C6E6568D";

/// An app running the fixture web server; returns its release.
pub async fn running_app(app: &TestApp, name: &str) -> String {
    assert_eq!(app.create_app(name).await.status(), 201);
    app.deploy_files(name, &[("convox.yml", crate::deploys::MANIFEST), ("server.py", SERVER)])
        .await
        .0
}

/// What an exec websocket gave: the output frames joined, and the exit code of the marker
/// (which must come in a frame of its own).
#[derive(Debug)]
struct Exec {
    output: String,
    code: Option<i32>,
}

/// The websocket request of an exec at `path` with `headers`, as the convox CLI makes it.
pub fn exec_request(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{}{path}", app.addr).into_client_request().unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("convox:{PASSWORD}"));
    request
        .headers_mut()
        .insert("authorization", format!("Basic {auth}").parse().unwrap());
    request
        .headers_mut()
        .insert("origin", format!("http://{}", app.addr).parse().unwrap());
    for (name, value) in headers {
        request.headers_mut().insert(
            name.parse::<tokio_tungstenite::tungstenite::http::HeaderName>()
                .unwrap(),
            value.parse().unwrap(),
        );
    }
    request
}

/// Runs an exec as the convox CLI does: headers, `stdin` as text frames, then its end (an
/// empty binary frame).
async fn exec(app: &TestApp, path: &str, headers: &[(&str, &str)], stdin: &[&str]) -> Exec {
    let request = exec_request(app, path, headers);
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("the handshake");
    let (mut sink, mut source) = socket.split();
    for chunk in stdin {
        sink.send(Message::Text((*chunk).into())).await.unwrap();
    }
    sink.send(Message::Binary(Vec::new().into())).await.unwrap();
    let mut result = Exec {
        output: String::new(),
        code: None,
    };
    loop {
        // Generous: a one-off process on a saturated machine may say nothing for a while.
        let message = tokio::time::timeout(Duration::from_secs(120), source.next())
            .await
            .expect("a frame")
            .expect("open until the end")
            .unwrap();
        match message {
            Message::Text(text) => match text.strip_prefix(&format!("{MARKER}:")) {
                Some(code) => result.code = Some(code.trim().parse().expect("only the code follows the marker")),
                None => result.output.push_str(&text),
            },
            Message::Binary(b) if b.is_empty() => return result,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// An exec with no input: its output and exit code.
pub async fn exec_output(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> (String, Option<i32>) {
    let result = exec(app, path, headers, &[]).await;
    (result.output, result.code)
}

async fn process(app: &TestApp, name: &str, id: &str) -> Value {
    app.get_json(&format!("/apps/{name}/processes/{id}")).await
}

/// `convox run web <command>`, step by step as the CLI sends it.
#[tokio::test]
async fn convox_run_attached_sequence_works_unchanged() {
    let app = TestApp::spawn().await;
    let release = running_app(&app, "myapp").await;
    let system: Value = app
        .convox(Method::GET, "/system")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(system["version"].as_str().unwrap() > "20180708231844");
    let created = app
        .convox(Method::POST, "/apps/myapp/services/web/processes")
        .header("command", "sleep 3600")
        .header("content-type", "application/octet-stream")
        .send()
        .await
        .unwrap();
    let (status, text) = status_text(created).await;
    assert_eq!(status, 200, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["type"], "run");
    assert_eq!(created["release"], release.as_str());
    // Two `running` reads in a row, as the CLI waits for them.
    let running = std::sync::atomic::AtomicUsize::new(0);
    wait_for(30, "two running reads", || async {
        if process(&app, "myapp", &id).await["status"] == "running" {
            running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        } else {
            running.store(0, std::sync::atomic::Ordering::SeqCst);
        }
        (running.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    assert_eq!(app.convox(Method::GET, "/machines").send().await.unwrap().status(), 404);
    let path = format!("/apps/myapp/processes/{id}/exec");
    let command = "sh -c 'echo out; cat; echo err >&2; echo $SERVICE $RELEASE; exit 3'";
    let result = exec(
        &app,
        &path,
        &[("command", command), ("entrypoint", "true"), ("tty", "false")],
        &["hello\n", "world\n"],
    )
    .await;
    assert_eq!(result.code, Some(3), "{result:?}");
    for line in ["out", "hello", "world", "err", &format!("web {release}")] {
        assert!(result.output.lines().any(|l| l == line), "{line} missing: {result:?}");
    }
    // A one-off is not counted in the service nor routed to.
    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    assert_eq!(processes.len(), 2);
    assert_eq!(through_router(&app, "myapp").await, format!("{release} \n"));

    let deleted = app
        .convox(Method::DELETE, &format!("/apps/myapp/processes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(deleted).await.0, 200);
    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert_eq!(processes[0]["type"], "service");
    // Who started it is in the app's log, and never a secret.
    let log = app
        .wait_for_log_line(
            "myapp",
            &format!("system/rack/run password started process {id} of web"),
            30,
        )
        .await;
    assert!(
        log.contains("system/rack/run password ran a command in process"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "{log}");
}

/// `convox run --detach`, exit codes 0, 3 and a killed process, and a terminal.
#[tokio::test]
async fn detached_runs_exit_codes_and_terminals() {
    let app = TestApp::spawn().await;
    running_app(&app, "myapp").await;
    let detached: Value = app
        .json(Method::POST, "/apps/myapp/services/web/processes")
        .header("command", "sh -c 'echo detached-output; exit 0'")
        .header("environment", "EXTRA=yes&OTHER=1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = detached["id"].as_str().unwrap().to_owned();
    wait_for(30, "the detached process to complete", || async {
        (process(&app, "myapp", &id).await["status"] == "complete").then_some(())
    })
    .await;

    let sleeper: Value = app
        .json(Method::POST, "/apps/myapp/services/web/processes")
        .header("command", "sleep 3600")
        .header("environment", "EXTRA=yes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sleeper["id"].as_str().unwrap().to_owned();
    wait_for(30, "running", || async {
        (process(&app, "myapp", &id).await["status"] == "running").then_some(())
    })
    .await;
    let path = format!("/apps/myapp/processes/{id}/exec");
    let plain = [("tty", "false")];
    for (command, code) in [("true", 0), ("sh -c 'exit 3'", 3), ("sh -c 'kill -9 $$'", 137)] {
        let headers = [plain[0], ("command", command)];
        let result = exec(&app, &path, &headers, &[]).await;
        assert_eq!(result.code, Some(code), "{command}: {result:?}");
    }
    let env = exec(&app, &path, &[plain[0], ("command", "sh -c 'echo $EXTRA'")], &[]).await;
    assert_eq!(env.output, "yes\n");
    let tty = exec(
        &app,
        &path,
        &[
            ("command", "sh -c 'stty size; test -t 0 && echo is-a-tty'"),
            ("height", "30"),
            ("width", "100"),
        ],
        &[],
    )
    .await;
    assert_eq!(tty.code, Some(0), "{tty:?}");
    assert!(tty.output.contains("30 100"), "{tty:?}");
    assert!(tty.output.contains("is-a-tty"), "{tty:?}");

    // exec into an instance of the service itself.
    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    let web = processes.iter().find(|p| p["type"] == "service").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let inside = exec(
        &app,
        &format!("/apps/myapp/processes/{web}/exec"),
        &[plain[0], ("command", "sh -c 'echo $SERVICE $PROCESS; ls server.py'")],
        &[],
    )
    .await;
    assert_eq!(inside.output, format!("web {web}\nserver.py\n"), "{inside:?}");

    let missing = app
        .convox(Method::POST, "/apps/myapp/services/nope/processes")
        .header("command", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(missing).await,
        (404, "service not found: nope\n".to_owned())
    );
    let no_command = app
        .convox(Method::POST, "/apps/myapp/services/web/processes")
        .send()
        .await
        .unwrap();
    assert_eq!(no_command.status(), 400);
}

#[tokio::test]
async fn a_one_off_never_outlives_its_timeout() {
    let app = TestApp::spawn_with(|config| config.run_timeout = Duration::from_secs(2)).await;
    running_app(&app, "myapp").await;
    let created: Value = app
        .json(Method::POST, "/apps/myapp/services/web/processes")
        .header("command", "sleep 600")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let ended = wait_for(30, "the timeout to stop it", || async {
        let status = process(&app, "myapp", &id).await["status"].as_str()?.to_owned();
        (status == "failed").then_some(status)
    })
    .await;
    assert_eq!(ended, "failed");
}

/// `rack run` and `rack exec`: plain pipes when stdin is not a terminal, exit codes through.
#[tokio::test]
async fn rack_run_and_exec_pass_pipes_and_exit_codes_through() {
    let app = TestApp::spawn().await;
    running_app(&app, "myapp").await;
    let rack = |args: &[&str], stdin: &'static str| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"));
        command
            .args(args)
            .env("RACK_URL", format!("http://convox:{PASSWORD}@{}", app.addr))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        async move {
            let mut child = command.spawn().unwrap();
            let mut input = child.stdin.take().unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes())
                .await
                .unwrap();
            drop(input);
            let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
                .await
                .expect("the CLI finishes")
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, out, err) = rack(&["run", "-a", "myapp", "web", "cat"], "select 1\n").await;
    assert_eq!((code, out.as_str()), (0, "select 1\n"), "{err}");
    let (code, _, err) = rack(&["run", "-a", "myapp", "web", "sh", "-c", "exit 3"], "").await;
    assert_eq!(code, 3, "{err}");
    let (code, out, _) = rack(&["run", "-a", "myapp", "--detach", "web", "true"], "").await;
    assert_eq!(code, 0);
    let detached = out.trim().to_owned();
    assert!(detached.starts_with("web-run-"), "{out}");
    // None of these one-offs is left running.
    wait_for(30, "the one-offs to end", || async {
        let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
        processes
            .iter()
            .all(|p| p["type"] == "service" || p["status"] == "complete")
            .then_some(())
    })
    .await;
    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    let web = processes.iter().find(|p| p["type"] == "service").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out, err) = rack(&["exec", "-a", "myapp", &web, "sh", "-c", "echo $SERVICE; exit 4"], "").await;
    assert_eq!((code, out.as_str()), (4, "web\n"), "{err}");
}

/// A release phase runs before anything that runs changes: its output comes before the
/// rollout's lines; a failing one leaves the previous release running and ends the deployment
/// in error with the command's output in the log.
#[tokio::test]
async fn a_release_phase_runs_first_and_a_failing_one_changes_nothing() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("phased").await.status(), 201);
    let manifest = |release: &str| {
        format!(
            "services:\n  web:\n    command: python3 -u server.py\n    port: 3000\n    release: {release}\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n"
        )
    };
    let first = app
        .build_release(
            "phased",
            &[
                ("convox.yml", &manifest("sh -c 'echo migrating $RELEASE; exit 0'")),
                ("server.py", SERVER),
            ],
        )
        .await;
    let log = promote_follow(&app, "phased", &first).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let position = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing in:\n{log}"))
    };
    assert!(position("Status: Pending => Releasing") < position(&format!("migrating {first}")));
    assert!(position(&format!("migrating {first}")) < position("Status: Releasing => Updating"));
    assert!(position("Status: Releasing => Updating") < position("Scaled up web release"));

    let second = app
        .build_release(
            "phased",
            &[
                ("convox.yml", &manifest("sh -c 'echo the migration broke; exit 3'")),
                ("server.py", SERVER),
            ],
        )
        .await;
    let log = promote_follow(&app, "phased", &second).await;
    assert!(log.contains("the migration broke"), "{log}");
    assert!(log.contains("Status: Releasing => Error"), "{log}");
    assert!(!log.contains(&format!("Scaled up web release {second}")), "{log}");
    let last = log.lines().last().unwrap();
    assert!(last.starts_with("ERROR: the release command of web"), "{log}");
    assert!(last.contains("exited with code 3"), "{log}");
    assert_eq!(through_router(&app, "phased").await, format!("{first} \n"));
    let info: Value = app.get_json("/apps/phased").await;
    assert_eq!(info["release"], first.as_str());
}

/// An exec ends whole with its websocket: the command and everything it started, a process that
/// made a session of its own and one that closed its output among them, whether the client
/// closes the socket or just drops the connection, and also when the socket goes while the
/// command's sandbox is still being set up (where a sandbox once outlived its exec, and rack).
#[tokio::test]
async fn an_exec_ends_whole_with_its_websocket() {
    let app = TestApp::spawn().await;
    app.create_app("shell").await;
    let manifest = "services:\n  web:\n    build:\n      command: \"true\"\n    command: sleep 86400\n";
    let id = app.build_source("shell", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("shell", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    promote_follow(&app, "shell", build["release"].as_str().unwrap()).await;
    let instance = wait_for(60, "the web process", || async {
        let processes: Value = app.get_json("/apps/shell/processes").await;
        processes.as_array()?.iter().find_map(|p| {
            (p["name"] == "web" && p["status"] == "running").then(|| p["id"].as_str().unwrap().to_owned())
        })
    })
    .await;
    let path = format!("/apps/shell/processes/{instance}/exec");
    // The `sleep` processes (not the sandbox's own) running with `marker` as their argument.
    let sleeping = |marker: &str| {
        crate::helpers::processes_with_arg(marker)
            .into_iter()
            .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep"))
            .count()
    };
    let gone = |marker: String, what: &'static str| async move {
        wait_for(60, what, || async {
            crate::helpers::processes_with_arg(&marker).is_empty().then_some(())
        })
        .await;
    };

    for polite in [true, false] {
        // One sleep in a session of its own with its output closed, the other the command.
        let (detached, command) = (
            crate::helpers::unique_sleep_marker(),
            crate::helpers::unique_sleep_marker(),
        );
        let script = format!("sh -c 'setsid sleep {detached} </dev/null >/dev/null 2>&1 & exec sleep {command}'");
        let headers = [("command", script.as_str()), ("tty", "false")];
        let (mut socket, _) = tokio_tungstenite::connect_async(exec_request(&app, &path, &headers))
            .await
            .expect("the handshake");
        wait_for(60, "both sleeps", || async {
            (sleeping(&detached) == 1 && sleeping(&command) == 1).then_some(())
        })
        .await;
        if polite {
            socket.close(None).await.unwrap();
        }
        drop(socket);
        gone(detached, "the detached sleep to end").await;
        gone(command, "the exec'd command to end").await;
    }

    // A command that closed its output: only the socket's end says it is over.
    let marker = crate::helpers::unique_sleep_marker();
    let script = format!("sh -c 'exec sleep {marker} >/dev/null 2>&1'");
    let headers = [("command", script.as_str()), ("tty", "false")];
    let (socket, _) = tokio_tungstenite::connect_async(exec_request(&app, &path, &headers))
        .await
        .expect("the handshake");
    wait_for(60, "the silent sleep", || async {
        (sleeping(&marker) == 1).then_some(())
    })
    .await;
    drop(socket);
    gone(marker, "the silent sleep to end").await;

    // The socket dropped as soon as the exec shows, its sandbox mostly still being set up.
    let mut markers = Vec::new();
    for _ in 0..5 {
        let marker = crate::helpers::unique_sleep_marker();
        let script = format!("sleep {marker}");
        let headers = [("command", script.as_str()), ("tty", "false")];
        let (socket, _) = tokio_tungstenite::connect_async(exec_request(&app, &path, &headers))
            .await
            .expect("the handshake");
        wait_for(60, "the exec to show", || async {
            (!crate::helpers::processes_with_arg(&marker).is_empty()).then_some(())
        })
        .await;
        drop(socket);
        markers.push(marker);
    }
    for marker in markers {
        gone(marker, "an exec ended while it started").await;
    }
    app.delete_app("shell").await;
}
