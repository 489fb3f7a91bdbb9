//! The rack itself through the convox CLI's requests: `convox rack` and `rack params` (`GET
//! /system`), `rack params set` (`PUT /system`), `rack ps` (`/system/processes`), `rack
//! releases` (`/system/releases`), `instances` (`/instances`) and `rack logs` (the websocket
//! `/system/logs`).

use reqwest::Method;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::deploys::{MANIFEST, SERVER, promote_follow};
use crate::helpers::{PASSWORD, TestApp, send_json, status_text};

/// `convox rack params set ...`: the SDK packs the map into one form field.
async fn params_set(app: &TestApp, packed: &str) -> (u16, String) {
    let body = serde_urlencoded::to_string([("parameters", packed)]).unwrap();
    let response = app
        .convox(Method::PUT, "/system?")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    status_text(response).await
}

async fn system(app: &TestApp) -> Value {
    send_json(app.convox(Method::GET, "/system?")).await
}

#[tokio::test]
async fn rack_params_are_shown_set_checked_and_acted_on() {
    let app = TestApp::spawn().await;
    // `convox rack params`: GET /system's parameters, the environment's values to start with.
    let params = system(&app).await["parameters"].clone();
    assert_eq!(params["build_timeout"], "60", "{params}");
    assert_eq!(params["run_timeout"].as_str().map(str::is_empty), Some(false));

    assert_eq!(
        params_set(&app, "build_timeout=120&feed_retention_days=3").await,
        (200, "ok\n".to_owned())
    );
    let params = system(&app).await["parameters"].clone();
    assert_eq!(
        (params["build_timeout"].as_str(), params["feed_retention_days"].as_str()),
        (Some("120"), Some("3"))
    );

    // Only what rack can change while it runs; nothing changes when any is refused.
    for (packed, needle) in [
        (
            "region=eu-west-1&build_timeout=30",
            "region is not a parameter rack can change",
        ),
        (
            "build_timeout=0",
            "build_timeout: \"0\" is not a whole number from 1 to 86400",
        ),
        ("build_timeout=soon", "is not a whole number"),
    ] {
        let (status, text) = params_set(&app, packed).await;
        assert_eq!(status, 422, "{packed}: {text}");
        assert!(text.contains(needle), "{packed}: {text}");
        assert!(text.contains("build_timeout") || text.contains("settable"), "{text}");
    }
    let (status, text) = status_text(
        app.convox(Method::PUT, "/system?")
            .form(&[("version", "3.24.9")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{text}");
    assert_eq!(system(&app).await["parameters"]["build_timeout"], "120");
    // A read token may look, not change.
    let (_, read) = crate::security::token(&app, &[("name", "ro"), ("role", "read")]).await;
    let refused = app
        .client
        .put(app.url("/system"))
        .bearer_auth(&read)
        .form(&[("parameters", "build_timeout=5")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    // It applies to the next build: one second, and a build that takes longer times out.
    assert_eq!(params_set(&app, "build_timeout=1").await.0, 200);
    assert_eq!(app.create_app("slow").await.status(), 201);
    let manifest = "services:\n  web:\n    build:\n      command: sleep 30\n";
    let id = app.build_source("slow", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("slow", &id).await;
    assert_eq!(build["status"], "failed", "{build}");
    assert_eq!(build["reason"], "timed out after 1s", "{build}");
    // An empty value goes back to the environment's.
    assert_eq!(params_set(&app, "build_timeout=").await.0, 200);
    assert_eq!(system(&app).await["parameters"]["build_timeout"], "60");
}

#[tokio::test]
async fn rack_ps_releases_and_instances_show_the_rack_and_its_apps() {
    let app = TestApp::spawn().await;
    // `convox rack ps`: rack's own process.
    let processes: Vec<Value> = app
        .convox(Method::GET, "/system/processes?")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert_eq!(processes[0]["name"], "rack");
    assert_eq!(processes[0]["status"], "running");
    // The server runs in this test process.
    assert_eq!(processes[0]["pid"], std::process::id());
    assert_eq!(processes[0]["release"], env!("CARGO_PKG_VERSION"));

    // `convox rack releases`: the versions that ran on this database.
    let releases: Vec<Value> = app
        .convox(Method::GET, "/system/releases?")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0]["id"], env!("CARGO_PKG_VERSION"));
    assert!(releases[0]["created"].as_str().unwrap() > "2020");

    // With an app running, `rack ps --all` and `instances` count its process.
    assert_eq!(app.create_app("myapp").await.status(), 201);
    let release = app
        .build_release("myapp", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let rollout = promote_follow(&app, "myapp", &release).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    let all: Vec<Value> = app
        .convox(Method::GET, "/system/processes?all=true")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let apps: Vec<(&str, &str)> = all
        .iter()
        .map(|p| (p["app"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    assert_eq!(apps, [("", "rack"), ("myapp", "web")], "{all:?}");
    let instances: Vec<Value> = app
        .convox(Method::GET, "/instances?")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(instances.len(), 1, "{instances:?}");
    let host = &instances[0];
    assert_eq!(host["status"], "running");
    assert_eq!(host["processes"], 1, "{host}");
    assert!(host["cpu-allocatable"].as_f64().unwrap() >= 1.0, "{host}");
    let memory = host["memory"].as_f64().unwrap();
    assert!(
        memory > 0.0 && memory <= host["memory-allocatable"].as_f64().unwrap(),
        "{host}"
    );
    assert!(!host["id"].as_str().unwrap().is_empty());
    assert_eq!(
        app.convox(Method::GET, "/system/processes?bogus=1")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
}

/// The websocket as the convox SDK opens it, with `credential` (`user:password`) and `headers`.
async fn system_logs_socket(
    app: &TestApp,
    credential: &str,
    headers: &[(&'static str, &str)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = format!("ws://{}/system/logs", app.addr).into_client_request().unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credential);
    let origin = format!("http://{}", app.addr);
    let request_headers = request.headers_mut();
    request_headers.insert("authorization", format!("Basic {auth}").parse().unwrap());
    request_headers.insert("origin", origin.parse().unwrap());
    request_headers.insert("version", "dev".parse().unwrap());
    for (name, value) in headers {
        request_headers.insert(*name, value.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

#[tokio::test]
async fn rack_logs_stream_racks_own_log_to_an_admin_with_credentials_masked() {
    let app = TestApp::spawn().await;
    // Not without the password, nor with a token below admin.
    let refused = system_logs_socket(&app, "convox:wrong", &[]).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let (_, deploy) = crate::security::token(&app, &[("name", "ci"), ("role", "deploy")]).await;
    let refused = system_logs_socket(&app, &format!("convox:{deploy}"), &[])
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");

    // `convox rack logs`: GET /machines (404, ignored), then the websocket with `Prefix: true`,
    // following.
    assert_eq!(
        app.convox(Method::GET, "/machines?").send().await.unwrap().status(),
        404
    );
    let mut socket = system_logs_socket(&app, &format!("convox:{PASSWORD}"), &[("prefix", "true")])
        .await
        .unwrap();
    // Something rack logs while the client follows, and a line carrying credentials (written
    // here: the log is the process's, and this test runs in the server's process).
    let marker = uuid::Uuid::new_v4().simple().to_string();
    assert_eq!(params_set(&app, "run_timeout=600").await.0, 200);
    tracing::warn!("{marker} dialing postgres://rack:{PASSWORD}@127.0.0.1:1/db with {deploy}");
    let text = crate::helpers::text_until(&mut socket, "the lines", |text| {
        text.contains(&marker) && text.contains("rack parameters changed")
    })
    .await;
    let line = text.lines().find(|l| l.contains(&marker)).unwrap();
    // `<time> <stream> <message>`, as convox prints it.
    let mut fields = line.splitn(3, ' ');
    assert!(fields.next().unwrap().ends_with('Z'), "{line}");
    assert_eq!(fields.next(), Some("system/rack"), "{line}");
    assert!(fields.next().unwrap().starts_with("WARN "), "{line}");
    assert!(
        line.contains("postgres://rack:****@127.0.0.1:1/db with rack_****"),
        "{line}"
    );
    assert!(!text.contains(PASSWORD) && !text.contains(&deploy), "{text}");

    // Not following: what was kept, then the end of the stream.
    let past = crate::builds::read_websocket(
        &app,
        "/system/logs",
        &[
            ("origin", &format!("http://{}", app.addr)),
            ("follow", "false"),
            ("filter", &marker),
        ],
    )
    .await;
    assert_eq!(past.lines().count(), 1, "{past}");
    assert!(past.contains("rack_****"), "{past}");
}

#[tokio::test]
async fn the_rack_cli_shows_and_sets_rack_and_app_params_and_lists_the_rack() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let rack = |args: &'static [&'static str]| crate::cli::rack_in(&app, PASSWORD, args, dir.path());
    let run = rack(&["rack", "params", "set", "run_timeout=90"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, "Updating parameters... OK\n"));
    let run = rack(&["rack", "params"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Columns as wide as the longest name (`metrics_retention_days`).
    assert!(run.stdout.contains("run_timeout             90\n"), "{}", run.stdout);
    let run = rack(&["rack", "params", "set", "nope=1"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("nope is not a parameter"), "{}", run.stderr);
    let run = rack(&["--json", "rack", "ps"]).await;
    let processes: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(processes[0]["name"], "rack");
    let run = rack(&["rack", "releases"]).await;
    assert!(run.stdout.starts_with("VERSION"), "{}", run.stdout);
    assert!(run.stdout.contains(env!("CARGO_PKG_VERSION")), "{}", run.stdout);
    let run = rack(&["--json", "instances"]).await;
    let instances: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(instances.as_array().unwrap().len(), 1, "{instances}");
    let run = rack(&["rack", "logs", "--no-follow", "--filter", "rack parameters changed"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("system/rack INFO "), "{}", run.stdout);

    assert_eq!(app.create_app("myapp").await.status(), 201);
    let run = rack(&["apps", "params", "set", "Timeout=30", "Region=eu west", "-a", "myapp"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = rack(&["apps", "params", "-a", "myapp"]).await;
    assert_eq!(run.stdout, "Region   eu west\nTimeout  30\n");
}
