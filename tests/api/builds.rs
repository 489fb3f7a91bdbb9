//! Builds on the local runtime: real child processes, logs as events over every transport.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{PASSWORD, TestApp, processes_with_arg, source_tarball, status_text, wait_for};

const OK_MANIFEST: &str = "services:\n  web:\n    build:\n      path: .\n      command: echo compiling; echo made > artifact.txt; echo warning >&2\n    port: 3000\n";

#[tokio::test]
async fn a_build_that_succeeds_creates_a_release() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let id = app
        .build_source("myapp", &[("convox.yml", OK_MANIFEST), ("main.sh", "echo hi")])
        .await;
    assert!(id.starts_with('B') && id.len() == 11, "{id}");
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    assert_eq!(build["manifest"], OK_MANIFEST);
    assert_eq!(build["description"], "test build");
    assert_ne!(build["started"], "0001-01-01T00:00:00Z");
    assert_ne!(build["ended"], "0001-01-01T00:00:00Z");
    let release_id = build["release"].as_str().unwrap();
    assert!(release_id.starts_with('R') && release_id.len() == 11, "{build}");
    let release = rack::store::releases::get(&app.state.pool, "myapp", release_id)
        .await
        .unwrap()
        .expect("a release");
    assert_eq!(release.build_id.as_deref(), Some(id.as_str()));
    assert_eq!(release.manifest, OK_MANIFEST);

    let log = app.build_log("myapp", &id).await;
    for line in ["Building: web", "compiling", "warning", "OK"] {
        assert!(log.lines().any(|l| l == line), "{line:?} missing from:\n{log}");
    }
    // The build ran in its own directory, and the artifact is there.
    let artifact = app
        .state
        .config
        .data_dir
        .join(format!("builds/myapp/{id}/src/artifact.txt"));
    assert_eq!(std::fs::read_to_string(artifact).unwrap(), "made\n");

    let list: Vec<serde_json::Value> = app.get_json("/apps/myapp/builds").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
}

#[tokio::test]
async fn a_failing_build_command_fails_with_its_output_in_the_log() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let manifest = "services:\n  web:\n    build:\n      command: echo about to fail; exit 3\n";
    let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(build["status"], "failed");
    assert_eq!(
        build["reason"],
        "service web: the build command failed (exit status: 3)"
    );
    assert_eq!(build["release"], "");
    let log = app.build_log("myapp", &id).await;
    assert!(log.contains("about to fail\n"), "{log}");
    assert!(
        log.ends_with("ERROR: service web: the build command failed (exit status: 3)\n"),
        "{log}"
    );
}

#[tokio::test]
async fn an_invalid_manifest_fails_the_build_with_the_key() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let id = app
        .build_source("myapp", &[("convox.yml", "services:\n  web:\n    port: nope\n")])
        .await;
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(build["status"], "failed");
    assert!(build["reason"].as_str().unwrap().contains("port"), "{build}");

    let id = app.build_source("myapp", &[("other.txt", "no manifest")]).await;
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(build["reason"], "no convox.yml found in the source");
}

#[tokio::test]
async fn a_build_that_runs_too_long_times_out() {
    let app = TestApp::spawn_with(|config| config.build_timeout = Duration::from_secs(2)).await;
    app.create_app("myapp").await;
    let manifest = "services:\n  web:\n    build:\n      command: sleep 60\n";
    let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(build["status"], "failed");
    assert_eq!(build["reason"], "timed out after 2s");
}

#[tokio::test]
async fn cancel_stops_a_running_build_and_its_processes() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    // A background child with a unique argument, to find it among the host's processes.
    let marker = format!("120.{}", std::process::id());
    let manifest = format!("services:\n  web:\n    build:\n      command: sleep {marker} & echo started; wait\n");
    let id = app.build_source("myapp", &[("convox.yml", &manifest)]).await;
    wait_for(30, "the build command to start", || async {
        (!processes_with_arg(&marker).is_empty()).then_some(())
    })
    .await;
    let response = app
        .convox(Method::POST, &format!("/apps/myapp/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(response).await, (200, "ok\n".to_owned()));
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(
        (build["status"].as_str(), build["reason"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    // The background child of the build command is gone too (its whole process group).
    wait_for(10, "the build's processes to exit", || async {
        processes_with_arg(&marker).is_empty().then_some(())
    })
    .await;
    let again = app
        .convox(Method::POST, &format!("/apps/myapp/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
}

#[tokio::test]
async fn finished_build_logs_replay_over_websocket_chunked_and_sse() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let id = app.build_source("myapp", &[("convox.yml", OK_MANIFEST)]).await;
    app.wait_build("myapp", &id).await;
    let path = format!("/apps/myapp/builds/{id}/logs");

    let chunked = app.build_log("myapp", &id).await;
    assert!(chunked.starts_with("Fetching source "), "{chunked}");
    assert!(chunked.ends_with("\nOK\n"), "{chunked}");

    // Websocket, as the convox CLI reads it: text frames until an empty binary frame.
    let websocket = read_websocket(&app, &path, &[]).await;
    let expected: String = chunked.strip_suffix("OK\n").unwrap().to_owned();
    assert_eq!(websocket, expected);

    let sse = read_sse(&app, &path, None).await;
    let lines: Vec<&str> = sse
        .iter()
        .filter(|e| e.kind == "message")
        .map(|e| e.data.as_str())
        .collect();
    assert_eq!(lines.join("\n") + "\n", expected);
    let end = sse.last().unwrap();
    assert_eq!(end.kind, "end");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&end.data).unwrap()["outcome"],
        "ok"
    );
}

#[tokio::test]
async fn a_live_build_log_streams_to_late_and_early_joiners_alike() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    // The build waits for a file in its build directory, the only host directory it sees.
    let manifest = "services:\n  web:\n    build:\n      command: echo first; while [ ! -e $HOME/go ]; do sleep 0.05; done; echo second\n";
    let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    let gate_file = app.build_dir("myapp", &id).join("go");
    let path = format!("/apps/myapp/builds/{id}/logs");
    // An early joiner sees `first` while the build is still running.
    let response = app.request(Method::GET, &path).send().await.unwrap();
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("first\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("a line")
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(!seen.lines().any(|line| line == "second"), "{seen}");
    std::fs::write(&gate_file, "").unwrap();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), body.next())
        .await
        .expect("the rest")
    {
        seen.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(seen.ends_with("second\nOK\n"), "{seen}");
    // A late joiner gets the same text.
    assert_eq!(app.build_log("myapp", &id).await, seen);
}

#[tokio::test]
async fn sse_resume_with_last_event_id_loses_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let manifest = "services:\n  web:\n    build:\n      command: for i in $(seq 1 50); do echo line $i; done\n";
    let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    app.wait_build("myapp", &id).await;
    let path = format!("/apps/myapp/builds/{id}/logs");
    let all = read_sse(&app, &path, None).await;
    assert!(all.len() > 50);
    for cut in [1, 10, 37, all.len() - 1] {
        let resumed = read_sse(&app, &path, Some(&all[cut - 1].id)).await;
        let expected: Vec<(String, String)> = all[cut..].iter().map(|e| (e.id.clone(), e.data.clone())).collect();
        let got: Vec<(String, String)> = resumed.iter().map(|e| (e.id.clone(), e.data.clone())).collect();
        assert_eq!(got, expected, "resuming after event {cut}");
    }
    let bad = app
        .request(Method::GET, &path)
        .header("last-event-id", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn two_replicas_never_run_the_same_build() {
    let first = TestApp::spawn_with(|config| config.build_workers = 3).await;
    // Replicas share the database and the object store (S3 in production).
    let objects = first.state.config.objects.clone();
    let second = TestApp::spawn_on(&first.database_url(), |config| {
        config.build_workers = 3;
        config.objects = objects;
    })
    .await;
    first.create_app("myapp").await;
    let manifest = "services:\n  web:\n    build:\n      command: echo ran $BUILD_ID\n";
    let tarball = source_tarball(&[("convox.yml", manifest)]);
    assert_eq!(first.upload("myapp", "src.tgz", tarball).await.status(), 200);
    let mut ids = Vec::new();
    for n in 0..12 {
        let app = if n % 2 == 0 { &first } else { &second };
        ids.push(
            app.create_build("myapp", "src.tgz").await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for id in &ids {
        let build = second.wait_build("myapp", id).await;
        assert_eq!(build["status"], "complete", "{build}");
    }
    // A build run twice would say so twice in its log.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let log = first.build_log("myapp", id).await;
        counts.insert(id.clone(), log.lines().filter(|l| *l == format!("ran {id}")).count());
    }
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}

#[tokio::test]
async fn build_bad_input_is_400() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let cases = [
        (vec![], "url is required: upload the source first"),
        (
            vec![("url", "object://myapp/../x")],
            "invalid object key \"../x\": empty, '.' and '..' segments are not allowed",
        ),
    ];
    for (form, message) in cases {
        let response = app
            .convox(Method::POST, "/apps/myapp/builds")
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(status_text(response).await, (400, format!("{message}\n")), "{form:?}");
    }
    let other = app
        .convox(Method::POST, "/apps/myapp/builds")
        .form(&[("url", "object://other/x.tgz")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(other).await,
        (
            422,
            "url must be an object of this app: object://myapp/<key>\n".to_owned()
        )
    );
    let missing = app
        .convox(Method::POST, "/apps/myapp/builds")
        .form(&[("url", "object://myapp/missing.tgz")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(missing).await,
        (
            404,
            "source object not found: missing.tgz
"
            .to_owned()
        )
    );
    let response = app
        .convox(Method::GET, "/apps/myapp/builds?limit=0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = app
        .convox(Method::GET, "/apps/myapp/builds/BNOPE")
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(response).await,
        (404, "build not found: BNOPE\n".to_owned())
    );
}

pub async fn read_websocket(app: &TestApp, path: &str, headers: &[(&'static str, &str)]) -> String {
    let mut request = format!("ws://{}{path}", app.addr).into_client_request().unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("convox:{PASSWORD}"));
    request
        .headers_mut()
        .insert("authorization", format!("Basic {auth}").parse().unwrap());
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the websocket handshake");
    let mut text = String::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame")
            .expect("the socket stays open until the end")
            .unwrap();
        match message {
            Message::Text(t) => text.push_str(&t),
            Message::Binary(b) if b.is_empty() => return text,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[derive(Debug)]
struct SseEvent {
    id: String,
    kind: String,
    data: String,
}

async fn read_sse(app: &TestApp, path: &str, last_event_id: Option<&str>) -> Vec<SseEvent> {
    let mut request = app.request(Method::GET, path).header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .unwrap()
        .unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
        .map(|block| {
            let mut event = SseEvent {
                id: String::new(),
                kind: "message".into(),
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                    event.id = v.to_owned();
                } else if let Some(v) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
                    event.kind = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                    event.data = v.to_owned();
                }
            }
            event
        })
        .collect()
}

/// The exact sequence `convox build` runs (docs/convox.md), with its headers.
#[tokio::test]
async fn convox_build_flow_works_unchanged() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let system: serde_json::Value = app
        .convox(Method::GET, "/system?")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(system["version"].as_str().unwrap() > "20190111211123");

    let tarball = source_tarball(&[("convox.yml", OK_MANIFEST)]);
    let upload = app
        .convox(Method::POST, "/apps/myapp/objects/tmp/64e5a1b2c3.tgz?")
        .header("content-type", "application/octet-stream")
        .body(tarball)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let build: serde_json::Value = app
        .convox(Method::POST, "/apps/myapp/builds?")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("description=build+78f44e93d7+initial+commit&git-sha=78f44e93d7&url=object%3A%2F%2Fmyapp%2Ftmp%2F64e5a1b2c3.tgz")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = build["id"].as_str().unwrap().to_owned();
    assert!(
        matches!(build["status"].as_str(), Some("created" | "running")),
        "{build}"
    );
    assert_eq!(build["git-sha"], "78f44e93d7");

    // The SDK's throw-away request before every websocket.
    assert_eq!(
        app.convox(Method::GET, "/machines?").send().await.unwrap().status(),
        404
    );
    let path = format!("/apps/myapp/builds/{id}/logs");
    let origin = format!("http://{}", app.addr);
    let first = read_websocket(&app, &path, &[("origin", &origin), ("version", "dev")]).await;
    let build = app.wait_build("myapp", &id).await;
    assert_eq!(build["status"], "complete");
    // The deferred step: reopen the logs of the finished build and read them fully.
    let again = read_websocket(&app, &path, &[("origin", &origin)]).await;
    assert!(again.starts_with(&first), "{first:?} vs {again:?}");
    assert!(again.contains("compiling\n"));
}

#[tokio::test]
async fn every_transport_resumes_after_an_event_id() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let manifest = "services:\n  web:\n    build:\n      command: for i in $(seq 1 20); do echo line $i; done\n";
    let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
    app.wait_build("myapp", &id).await;
    let path = format!("/apps/myapp/builds/{id}/logs");
    // Chunked text with ids: `<id> <line>`.
    let full = app.get_text(&format!("{path}?ids=true")).await;
    let lines: Vec<(&str, &str)> = full.lines().map(|l| l.split_once(' ').unwrap()).collect();
    assert_eq!(lines.last().unwrap().1, "OK");
    let cut = 7;
    let after = lines[cut - 1].0;
    let expected_text: String = lines[cut..].iter().map(|(_, l)| format!("{l}\n")).collect();
    let chunked = app.get_text(&format!("{path}?after={after}")).await;
    assert_eq!(chunked, expected_text);
    // The websocket takes the cursor as a header (the convox client sends no query string).
    let websocket = read_websocket(&app, &path, &[("last-event-id", after)]).await;
    assert_eq!(websocket, expected_text.strip_suffix("OK\n").unwrap());
}

#[tokio::test]
async fn a_stopping_server_ends_open_streams_with_a_line_saying_so() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let response = app.request(Method::GET, "/apps/myapp/logs").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let reading = tokio::spawn(async move { response.text().await.unwrap() });
    app.stop().await;
    let text = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text, "rack: this server is shutting down; reconnect to resume\n");
}

#[tokio::test]
async fn old_build_sources_are_pruned_but_the_running_release_keeps_its_own() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let manifest = "services:\n  worker:\n    command: sleep 600\n    health:\n      grace: 0\n";
    let tarball = source_tarball(&[("convox.yml", manifest)]);
    assert_eq!(app.upload("myapp", "src.tgz", tarball).await.status(), 200);
    let mut ids = Vec::new();
    for n in 0..12 {
        let id = app.create_build("myapp", "src.tgz").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let build = app.wait_build("myapp", &id).await;
        if n == 0 {
            // The first build's release runs: its sources must stay whatever comes after.
            let release = build["release"].as_str().unwrap();
            let promote = app
                .json(Method::POST, &format!("/apps/myapp/releases/{release}/promote"))
                .send()
                .await
                .unwrap();
            let location = promote.headers()["location"].to_str().unwrap().to_owned();
            wait_for(60, "the first release to run", || async {
                let d: serde_json::Value = app.get_json(&location).await;
                (d["state"] == "running").then_some(())
            })
            .await;
        }
        ids.push(id);
    }
    let dir = app.state.config.data_dir.join("builds/myapp");
    let kept = |ids: &[String]| ids.iter().filter(|id| dir.join(id.as_str()).exists()).count();
    // Pruning follows the end of the build that pushed the second one out of the newest ten.
    wait_for(30, "the second build's sources to be pruned", || async {
        (kept(&ids[1..2]) == 0).then_some(())
    })
    .await;
    assert_eq!(kept(&ids[..1]), 1, "the running release's build stays");
    assert_eq!(kept(&ids[2..]), 10, "the ten newest stay");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 11);
}
