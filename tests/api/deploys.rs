//! Releases, promotes and rolling deployments on the local runtime: a real Python web app as
//! child processes, reached through the app's router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, status_text, wait_for};

/// The fixture web app and a manifest that runs it.
pub const SERVER: &str = include_str!("../fixtures/server.py");
pub const MANIFEST: &str = "services:\n  web:\n    command: python3 -u server.py\n    port: 3000\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n";

/// An app with one complete build of the fixture server; returns its release id.
async fn built_app(app: &TestApp, name: &str) -> String {
    assert_eq!(app.create_app(name).await.status(), 201);
    app.build_release(name, &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await
}

/// Promotes with `follow=true` and returns the whole rollout log.
pub async fn promote_follow(app: &TestApp, name: &str, release: &str) -> String {
    promote_follow_within(app, name, release, None).await
}

/// Promotes with `follow=true` and the deployment deadline `timeout` (seconds; the default
/// without), and returns the whole rollout log.
pub async fn promote_follow_within(app: &TestApp, name: &str, release: &str, timeout: Option<u32>) -> String {
    let mut form = vec![("follow", "true".to_owned())];
    form.extend(timeout.map(|t| ("timeout", t.to_string())));
    // A rollout outlasts the harness client's 30 s budget for whole requests under load.
    let response = app
        .untimed_client()
        .post(app.url(&format!("/apps/{name}/releases/{release}/promote")))
        .basic_auth("convox", Some(crate::helpers::PASSWORD))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    tokio::time::timeout(Duration::from_secs(120), response.text())
        .await
        .expect("the rollout ends")
        .unwrap()
}

pub async fn create_release(app: &TestApp, name: &str, form: &[(&str, &str)]) -> Value {
    let response = app
        .json(Method::POST, &format!("/apps/{name}/releases"))
        .form(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    response.json().await.unwrap()
}

/// A rollback to `release` as convox (and `rack releases rollback`) makes it: a new release with
/// its build and env; returns the new release's id (not promoted yet).
pub async fn rollback_release(app: &TestApp, name: &str, release: &str) -> String {
    let old: Value = app.get_json(&format!("/apps/{name}/releases/{release}")).await;
    let form = [
        ("build", old["build"].as_str().unwrap()),
        ("env", old["env"].as_str().unwrap()),
    ];
    create_release(app, name, &form).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn get_app(app: &TestApp, name: &str) -> Value {
    app.get_app(name).await.json().await.unwrap()
}

/// What the app's router answers on `/`.
pub async fn through_router(app: &TestApp, name: &str) -> String {
    let router = get_app(app, name).await["router"].as_str().unwrap().to_owned();
    assert!(!router.is_empty());
    reqwest::get(format!("http://{router}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn lines_in_order(log: &str, wanted: &[&str]) {
    let mut rest = log;
    for line in wanted {
        let at = rest
            .find(line)
            .unwrap_or_else(|| panic!("{line:?} missing (or out of order) in:\n{log}"));
        rest = &rest[at + line.len()..];
    }
}

#[tokio::test]
async fn deploy_then_the_app_answers_through_its_router() {
    let app = TestApp::spawn().await;
    let release = built_app(&app, "myapp").await;
    let log = promote_follow(&app, "myapp", &release).await;
    lines_in_order(
        &log,
        &[
            " system/local/atom/app Status: None => Pending\n",
            " system/local/atom/app Status: Pending => Updating\n",
            " system/local/web Scaled up web release ",
            "Started process web-",
            "Health check passed: GET /health\n",
            " system/local/atom/app Status: Updating => Running\n",
        ],
    );
    assert!(log.ends_with("\nOK\n"), "{log}");
    // Lines are `<RFC3339> <stream> <message>`.
    let first = log.lines().next().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(first.split(' ').next().unwrap()).is_ok(),
        "{first}"
    );

    let info = get_app(&app, "myapp").await;
    assert_eq!(
        (info["status"].as_str(), info["release"].as_str()),
        (Some("running"), Some(release.as_str()))
    );
    assert_eq!(through_router(&app, "myapp").await, format!("{release} \n"));

    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert_eq!(
        (processes[0]["name"].as_str(), processes[0]["status"].as_str()),
        (Some("web"), Some("running"))
    );
    assert_eq!(processes[0]["release"], release.as_str());
}

#[tokio::test]
async fn env_changes_make_releases_and_a_failing_health_check_rolls_back() {
    let app = TestApp::spawn().await;
    let first = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &first).await;

    let good = create_release(&app, "myapp", &[("env", "GREETING=hello")]).await;
    assert_eq!(good["description"], "env add:GREETING");
    assert_eq!(good["env"], "GREETING=hello");
    assert_eq!(good["manifest"], MANIFEST);
    let good = good["id"].as_str().unwrap().to_owned();
    assert!(promote_follow(&app, "myapp", &good).await.ends_with("\nOK\n"));
    assert_eq!(through_router(&app, "myapp").await, format!("{good} hello\n"));

    let bad = create_release(&app, "myapp", &[("env", "GREETING=hello\nFAIL_HEALTH=1")]).await;
    assert_eq!(bad["description"], "env add:FAIL_HEALTH");
    let bad = bad["id"].as_str().unwrap().to_owned();
    let log = promote_follow(&app, "myapp", &bad).await;
    lines_in_order(
        &log,
        &[
            "Status: Running => Pending",
            "Status: Updating => Error",
            "Status: Error => Rollback",
            "Status: Rollback => Reverted",
        ],
    );
    assert!(log.trim_end().lines().last().unwrap().starts_with("ERROR: "), "{log}");
    // The previous release keeps serving.
    let info = get_app(&app, "myapp").await;
    assert_eq!(info["release"], good.as_str());
    assert_eq!(info["status"], "running");
    assert_eq!(through_router(&app, "myapp").await, format!("{good} hello\n"));
}

#[tokio::test]
async fn continuous_requests_through_the_router_never_fail_during_a_rollout() {
    let app = TestApp::spawn().await;
    let first = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &first).await;
    let router = get_app(&app, "myapp").await["router"].as_str().unwrap().to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, failures, answers, router) = (stop.clone(), failures.clone(), answers.clone(), router.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                match client.get(format!("http://{router}/")).send().await {
                    Ok(r) if r.status().is_success() => {
                        let text = r.text().await.unwrap_or_default();
                        *answers.lock().unwrap().entry(text.trim().to_owned()).or_default() += 1;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let second = create_release(&app, "myapp", &[("env", "GREETING=two")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(promote_follow(&app, "myapp", &second).await.ends_with("\nOK\n"));
    // Keep going until the new release has answered a few times.
    wait_for(30, "the new release to answer", || async {
        let seen = answers
            .lock()
            .unwrap()
            .get(&format!("{second} two"))
            .copied()
            .unwrap_or(0);
        (seen >= 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "failed requests; answers: {answers:?}"
    );
    assert!(answers.get(&first).copied().unwrap_or(0) > 0, "{answers:?}");
    assert_eq!(answers.len(), 2, "{answers:?}");
}

#[tokio::test]
async fn a_second_promote_is_409_and_force_supersedes() {
    let app = TestApp::spawn().await;
    built_app(&app, "myapp").await;
    // A release whose process never becomes healthy keeps its deployment busy.
    let slow = create_release(&app, "myapp", &[("env", "FAIL_HEALTH=1")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = app
        .convox(Method::POST, &format!("/apps/myapp/releases/{slow}/promote"))
        .form(&[("force", "false"), ("timeout", "600")])
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(response).await, (200, "ok\n".to_owned()));
    let again = app
        .convox(Method::POST, &format!("/apps/myapp/releases/{slow}/promote"))
        .form(&[("force", "false")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(again).await,
        (409, "app is currently updating\n".to_owned())
    );
    assert_eq!(get_app(&app, "myapp").await["status"], "updating");

    // Newer than `slow`: promote it with force.
    let newest = create_release(&app, "myapp", &[("env", "GREETING=forced")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let forced = app
        .json(Method::POST, &format!("/apps/myapp/releases/{newest}/promote"))
        .form(&[("force", "true")])
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), 201);
    let location = forced.headers()["location"].to_str().unwrap().to_owned();
    let deployment: Value = forced.json().await.unwrap();
    assert_eq!(
        location,
        format!("/apps/myapp/deployments/{}", deployment["id"].as_str().unwrap())
    );
    let events = app
        .request(Method::GET, &format!("{location}/events"))
        .send()
        .await
        .unwrap();
    let log = tokio::time::timeout(Duration::from_secs(90), events.text())
        .await
        .unwrap()
        .unwrap();
    assert!(log.ends_with("\nOK\n"), "{log}");
    let info = get_app(&app, "myapp").await;
    assert_eq!(info["release"], newest.as_str());
    assert_eq!(through_router(&app, "myapp").await, format!("{newest} forced\n"));
    let list: Vec<Value> = app.get_json("/apps/myapp/deployments").await;
    let states: Vec<&str> = list.iter().map(|d| d["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["running", "superseded"]);
}

#[tokio::test]
async fn promoting_an_older_release_is_400_and_rollback_works() {
    let app = TestApp::spawn().await;
    let first = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &first).await;
    let second = create_release(&app, "myapp", &[("env", "GREETING=two")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    promote_follow(&app, "myapp", &second).await;
    let older = app
        .convox(Method::POST, &format!("/apps/myapp/releases/{first}/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(older).await,
        (409, "can not promote an older release, try rollback\n".to_owned())
    );

    // Rollback as convox does it: a new release with the old build and env, promoted.
    let rollback = rollback_release(&app, "myapp", &first).await;
    assert!(promote_follow(&app, "myapp", &rollback).await.ends_with("\nOK\n"));
    assert_eq!(through_router(&app, "myapp").await, format!("{rollback} \n"));
    let releases: Vec<Value> = app.get_json("/apps/myapp/releases?limit=2").await;
    assert_eq!(releases[0]["id"], rollback.as_str());
    assert_eq!(releases[1]["id"], second.as_str());
}

#[tokio::test]
async fn a_crashed_process_is_restarted() {
    let app = TestApp::spawn().await;
    let release = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &release).await;
    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    let (id, pid) = (
        processes[0]["id"].as_str().unwrap().to_owned(),
        processes[0]["pid"].as_u64().unwrap(),
    );
    // Kill it behind rack's back.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(30, "the process to run again with a new pid", || async {
        let list: Vec<Value> = app
            .json(Method::GET, "/apps/myapp/processes")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let p = list.into_iter().find(|p| p["id"] == id.as_str())?;
        (p["status"] == "running" && p["pid"].as_u64() != Some(pid)).then_some(())
    })
    .await;
    assert_eq!(through_router(&app, "myapp").await, format!("{release} \n"));
    // The crash is in the app's log.
    let logs = app
        .request(Method::GET, "/apps/myapp/logs")
        .header("follow", "false")
        .header("prefix", "true")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains(&format!("Process {id} crashed")), "{logs}");
    // And DELETE restarts it on purpose; a process the app does not have is 404.
    let response = app
        .convox(Method::DELETE, &format!("/apps/myapp/processes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(response).await, (200, "ok\n".to_owned()));
    let response = app
        .convox(Method::DELETE, "/apps/myapp/processes/web-nosuchproc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn after_a_server_restart_the_app_runs_again_at_the_same_address() {
    let app = TestApp::spawn().await;
    let release = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &release).await;
    let router = get_app(&app, "myapp").await["router"].as_str().unwrap().to_owned();
    let app = app.restart().await;
    wait_for(30, "the app to answer again", || async {
        let text = crate::helpers::try_fetch_text(format!("http://{router}/")).await?;
        (text == format!("{release} \n")).then_some(())
    })
    .await;
    assert_eq!(get_app(&app, "myapp").await["router"], router.as_str());
}

#[tokio::test]
async fn deployment_events_resume_without_loss_and_late_joiners_see_everything() {
    let app = TestApp::spawn().await;
    let release = built_app(&app, "myapp").await;
    let response = app
        .json(Method::POST, &format!("/apps/myapp/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    // SSE while it runs, cut after three events, then resumed with Last-Event-ID.
    let response = app
        .request(Method::GET, &format!("{location}/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while text.matches("\nid: ").count() + usize::from(text.starts_with("id: ")) < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(body);
    let blocks: Vec<&str> = text.split("\n\n").filter(|b| b.contains("id: ")).collect();
    let last_id = blocks
        .last()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_owned();
    let rest = app
        .request(Method::GET, &format!("{location}/events"))
        .header("accept", "text/event-stream")
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut ids: Vec<i64> = blocks
        .iter()
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("id: "))?.parse().ok())
        .collect();
    ids.extend(
        rest.split("\n\n")
            .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("id: "))?.parse::<i64>().ok()),
    );
    let full = app
        .request(Method::GET, &format!("{location}/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let all: Vec<i64> = full
        .split("\n\n")
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("id: "))?.parse().ok())
        .collect();
    assert_eq!(ids, all, "resumed ids differ from a late joiner's");
    assert!(full.contains("event: end"), "{full}");
}

/// `convox deploy`'s promote half: promote answers `ok` at once; the app reads `updating`, then
/// `running` with the new release; app logs over the websocket carry the system lines.
#[tokio::test]
async fn convox_promote_flow_works_unchanged() {
    let app = TestApp::spawn().await;
    let release = built_app(&app, "myapp").await;
    let response = app
        .convox(Method::POST, &format!("/apps/myapp/releases/{release}/promote?"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("force=false")
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(response).await, (200, "ok\n".to_owned()));
    wait_for(60, "two `running` reads with the new release", || async {
        let info = get_app(&app, "myapp").await;
        (info["status"] == "running" && info["release"] == release.as_str()).then_some(())
    })
    .await;
    let budget = app.convox(Method::GET, "/apps/myapp/budget").send().await.unwrap();
    assert_eq!(budget.status(), 200);
    // The app's first output line reaches its log on its own schedule (the instance's output
    // is read and stored apart from the rollout): wait for it rather than expect it at once.
    wait_for(
        60,
        "the rollout's Running line and the app's own output in its log",
        || async {
            let logs = app.read_app_log("myapp", true).await;
            let stream_of = |l: &str| l.split(' ').nth(1).map(str::to_owned).unwrap_or_default();
            let running = logs
                .lines()
                .any(|l| stream_of(l).starts_with("system/") && l.ends_with("Status: Updating => Running"));
            let output = logs.lines().any(|l| stream_of(l).starts_with("service/web/"));
            (running && output).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_client_that_leaves_a_followed_promote_cancels_nothing() {
    let app = TestApp::spawn().await;
    let release = built_app(&app, "myapp").await;
    let promote = || {
        app.request(Method::POST, &format!("/apps/myapp/releases/{release}/promote"))
            .header("idempotency-key", "promote-1")
            .form(&[("follow", "true")])
            .send()
    };
    let response = promote().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let mut body = response.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(30), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("Status: None => Pending"));
    drop(body);
    let deployment = wait_for(60, "the deployment to end", || async {
        let d: Value = app.json(Method::GET, &location).send().await.ok()?.json().await.ok()?;
        d["ended"].is_string().then_some(d)
    })
    .await;
    assert_eq!(
        (deployment["state"].as_str(), deployment["outcome"].as_str()),
        (Some("running"), Some("ok"))
    );
    assert_eq!(get_app(&app, "myapp").await["release"], release.as_str());
    // The client retries its request: it gets the same deployment's log, and nothing new starts.
    let retry = promote().await.unwrap();
    assert_eq!(retry.headers()["location"], location.as_str());
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let log = retry.text().await.unwrap();
    assert!(
        log.contains("Status: None => Pending") && log.ends_with("\nOK\n"),
        "{log}"
    );
    let list: Vec<Value> = app.get_json("/apps/myapp/deployments").await;
    assert_eq!(list.len(), 1);
}

#[tokio::test]
async fn a_scaled_service_rolls_every_instance_within_its_budget() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("myapp").await.status(), 201);
    let manifest =
        format!("{MANIFEST}    scale:\n      count: 3\n    deployment:\n      minimum: 50\n      maximum: 150\n");
    let first = app
        .build_release("myapp", &[("convox.yml", &manifest), ("server.py", SERVER)])
        .await;
    assert!(promote_follow(&app, "myapp", &first).await.ends_with("\nOK\n"));
    let second = create_release(&app, "myapp", &[("env", "GREETING=two")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, "myapp", &second).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert_eq!(log.matches("Scaled up web release").count(), 3, "{log}");
    assert_eq!(log.matches("Stopping process").count(), 3, "{log}");
    let processes: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    assert_eq!(processes.len(), 3, "{processes:?}");
    assert!(
        processes
            .iter()
            .all(|p| p["release"] == second.as_str() && p["status"] == "running"),
        "{processes:?}"
    );
}

/// A release that would only become healthy after a minute.
async fn slow_release(app: &TestApp) -> String {
    // It answers only after a minute, and its grace period forgives that.
    let manifest = MANIFEST
        .replace("grace: 1", "grace: 60")
        .replace("command: python3", "command: sleep 60; exec python3");
    let id = app
        .build_source("myapp", &[("convox.yml", &manifest), ("server.py", SERVER)])
        .await;
    app.wait_build("myapp", &id).await["release"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_rollout_past_its_deadline_rolls_back() {
    let app = TestApp::spawn().await;
    let first = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &first).await;
    let slow = slow_release(&app).await;
    let log = promote_follow_within(&app, "myapp", &slow, Some(2)).await;
    lines_in_order(
        &log,
        &[
            "Status: Updating => Deadline",
            "Status: Deadline => Rollback",
            "Status: Rollback => Reverted",
        ],
    );
    assert!(
        log.ends_with("ERROR: the deployment did not become healthy within 2s\n"),
        "{log}"
    );
    assert_eq!(get_app(&app, "myapp").await["release"], first.as_str());
    assert_eq!(through_router(&app, "myapp").await, format!("{first} \n"));
    let bad = app
        .convox(Method::POST, &format!("/apps/myapp/releases/{slow}/promote"))
        .form(&[("timeout", "0")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn cancel_rolls_a_running_deployment_back() {
    let app = TestApp::spawn().await;
    let first = built_app(&app, "myapp").await;
    promote_follow(&app, "myapp", &first).await;
    let not_updating = app.convox(Method::POST, "/apps/myapp/cancel").send().await.unwrap();
    assert_eq!(
        status_text(not_updating).await,
        (403, "app is not updating\n".to_owned())
    );

    let slow = slow_release(&app).await;
    let promote = app
        .json(Method::POST, &format!("/apps/myapp/releases/{slow}/promote"))
        .send()
        .await
        .unwrap();
    let location = promote.headers()["location"].to_str().unwrap().to_owned();
    wait_for(30, "the deployment to be updating", || async {
        let d: Value = app.get_json(&location).await;
        (d["state"] == "updating").then_some(())
    })
    .await;
    let cancel = app.convox(Method::POST, "/apps/myapp/cancel").send().await.unwrap();
    assert_eq!(status_text(cancel).await, (200, "ok\n".to_owned()));
    let log = app.get_text(&format!("{location}/events")).await;
    lines_in_order(
        &log,
        &[
            "Status: Updating => Cancelled",
            "Status: Cancelled => Rollback",
            "Status: Rollback => Reverted",
        ],
    );
    assert!(log.ends_with("ERROR: cancelled\n"), "{log}");
    let deployment: Value = app.get_json(&location).await;
    assert_eq!(
        (deployment["state"].as_str(), deployment["reason"].as_str()),
        (Some("reverted"), Some("cancelled"))
    );
    assert_eq!(get_app(&app, "myapp").await["release"], first.as_str());
}

#[tokio::test]
async fn deleting_an_app_mid_rollout_leaves_no_process_behind() {
    let app = TestApp::spawn().await;
    built_app(&app, "myapp").await;
    let slow = slow_release(&app).await;
    let promote = app
        .json(Method::POST, &format!("/apps/myapp/releases/{slow}/promote"))
        .send()
        .await
        .unwrap();
    let location = promote.headers()["location"].to_str().unwrap().to_owned();
    let pid = wait_for(30, "a process of the rollout", || async {
        let d: Value = app.get_json(&location).await;
        if d["state"] != "updating" {
            return None;
        }
        let list: Vec<Value> = app.get_json("/apps/myapp/processes").await;
        list.first()?["pid"].as_u64().filter(|pid| *pid > 0)
    })
    .await;
    assert_eq!(
        status_text(app.delete_app("myapp").await).await,
        (200, "ok\n".to_owned())
    );
    wait_for(30, "the rollout's process to be gone", || async {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        (!alive).then_some(())
    })
    .await;
    assert_eq!(app.get_app("myapp").await.status(), 404);
}

#[tokio::test]
async fn scale_changes_the_count_now_and_for_later_deployments() {
    let app = TestApp::spawn().await;
    let first = built_app(&app, "myapp").await;
    let early = app
        .convox(Method::PUT, "/apps/myapp/services/web")
        .form(&[("count", "2")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(early).await,
        (409, "app myapp has no release yet: deploy one first\n".to_owned())
    );
    promote_follow(&app, "myapp", &first).await;

    let log = app.scale_follow("myapp", "web", 2).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    let running = |n: usize| {
        let app = &app;
        async move {
            let list: Vec<Value> = app.get_json("/apps/myapp/processes").await;
            list.iter().filter(|p| p["status"] == "running").count() == n && list.len() == n
        }
    };
    assert!(running(2).await);
    let services: Vec<Value> = app.get_json("/apps/myapp/services").await;
    assert_eq!(
        (services[0]["name"].as_str(), services[0]["count"].as_u64()),
        (Some("web"), Some(2))
    );

    // The count holds for the next release.
    let second = create_release(&app, "myapp", &[("env", "GREETING=two")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(promote_follow(&app, "myapp", &second).await.ends_with("\nOK\n"));
    assert!(running(2).await);

    // Restart replaces every process of the service.
    let before: Vec<Value> = app.get_json("/apps/myapp/processes").await;
    let restart = app
        .convox(Method::POST, "/apps/myapp/services/web/restart")
        .send()
        .await
        .unwrap();
    assert_eq!(restart.status(), 200);
    wait_for(30, "both processes to run again with new pids", || async {
        let now: Vec<Value> = app.get_json("/apps/myapp/processes").await;
        let renewed = now
            .iter()
            .all(|p| p["status"] == "running" && before.iter().all(|b| b["pid"] != p["pid"]));
        (now.len() == 2 && renewed).then_some(())
    })
    .await;

    let unknown = app
        .convox(Method::PUT, "/apps/myapp/services/nope")
        .form(&[("count", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(unknown).await,
        (404, "service not found: nope\n".to_owned())
    );
    app.scale_follow("myapp", "web", 0).await;
    assert!(running(0).await);
}

/// A scale records its count only with the deployment that applies it: of ten concurrent scales
/// one deploys, the others get 409 and leave nothing behind.
#[tokio::test]
async fn concurrent_scales_record_only_the_count_that_deploys() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("myapp").await.status(), 201);
    // Ready only after 5 s: the first scale's deployment is still going when the others come.
    let manifest = "services:\n  worker:\n    command: sleep 600\n    health:\n      grace: 5\n";
    let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("myapp", &id).await;
    let first = build["release"].as_str().unwrap().to_owned();
    promote_follow(&app, "myapp", &first).await;
    // Every count needs new instances (the release runs one already).
    let scales = (2..=11).map(|count| {
        let request = app
            .json(Method::PUT, "/apps/myapp/services/worker")
            .form(&[("count", count.to_string())])
            .send();
        async move { (count, request.await.unwrap().status().as_u16()) }
    });
    let answers = futures_util::future::join_all(scales).await;
    let accepted: Vec<u32> = answers.iter().filter(|(_, s)| *s == 202).map(|(c, _)| *c).collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    assert!(answers.iter().all(|(_, s)| *s == 202 || *s == 409), "{answers:?}");
    let services: Vec<Value> = app.get_json("/apps/myapp/services").await;
    assert_eq!(services[0]["count"], accepted[0], "{answers:?}");
}

/// A release is made from one snapshot: a refused one (its build is not complete) leaves no
/// release behind.
#[tokio::test]
async fn a_refused_release_leaves_nothing_behind() {
    let app = TestApp::spawn().await;
    built_app(&app, "myapp").await;
    let before: Vec<Value> = app.get_json("/apps/myapp/releases").await;
    let manifest = "services:\n  web:\n    build:\n      command: sleep 30\n";
    let running = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    let refused = app
        .json(Method::POST, "/apps/myapp/releases")
        .form(&[("build", running.as_str())])
        .send()
        .await
        .unwrap();
    let (status, text) = status_text(refused).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("is not complete"), "{text}");
    let after: Vec<Value> = app.get_json("/apps/myapp/releases").await;
    assert_eq!(after.len(), before.len());
}

/// The one-deployment-per-app index (a migration, which never changes) covers exactly the
/// states the code calls active.
#[tokio::test]
async fn the_one_per_app_index_covers_exactly_the_active_states() {
    let app = TestApp::spawn().await;
    let predicate = rack::store::deployments::active_index_predicate(&app.state.pool)
        .await
        .unwrap();
    for state in rack::deploy::DeployState::ALL {
        let listed = predicate.contains(&format!("'{}'", state.as_str()));
        assert_eq!(listed, !state.is_terminal(), "{state:?} in {predicate}");
    }
}
