//! Least privilege: app-scoped and expiring tokens, streams that end with their credential, the
//! audit log, throttled authentication failures and per-credential stream limits.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::{PASSWORD, TestApp, status_text, wait_for};

/// What a throttled password check waits (`rack::throttle::TURN_DELAY`).
const TURN_DELAY: Duration = Duration::from_secs(1);

/// Creates a token with `form` fields; returns (id, secret).
pub async fn token(app: &TestApp, form: &[(&str, &str)]) -> (String, String) {
    let response = app.json(Method::POST, "/tokens").form(form).send().await.unwrap();
    let (status, text) = status_text(response).await;
    assert_eq!(status, 201, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    (
        body["id"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

fn with(app: &TestApp, secret: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
    app.client
        .request(method, app.url(path))
        .bearer_auth(secret)
        .header("accept", "application/json")
}

#[tokio::test]
async fn an_app_scoped_token_acts_on_its_apps_only() {
    let app = TestApp::spawn().await;
    for name in ["mine", "theirs"] {
        assert_eq!(app.create_app(name).await.status(), 201);
    }
    let (id, secret) = token(&app, &[("name", "ci"), ("role", "deploy"), ("apps", "mine")]).await;
    let listed: Vec<Value> = with(&app, &secret, Method::GET, "/apps")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "mine");
    assert_eq!(
        with(&app, &secret, Method::GET, "/apps/mine")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, text) = status_text(
        with(&app, &secret, Method::GET, "/apps/theirs/builds")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(text.contains("limited to the apps mine, not theirs"), "{text}");
    let upload = with(&app, &secret, Method::POST, "/apps/theirs/objects/a.tgz")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 403);
    assert_eq!(
        with(&app, &secret, Method::GET, "/system")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Its use is recorded: when, and from where.
    let tokens: Vec<Value> = app.get_json("/tokens").await;
    let listed = tokens.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert_eq!(listed["apps"], serde_json::json!(["mine"]));
    assert_eq!(listed["last_used_from"], "127.0.0.1");
    assert!(listed["last_used"].is_string());

    let bad = app
        .json(Method::POST, "/tokens")
        .form(&[("name", "x"), ("role", "read"), ("apps", "Not An App")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// Generated from the route table: a token limited to one app gets 403 on every route of
/// another app, and is allowed past the check on its own.
#[tokio::test]
async fn every_app_route_refuses_an_app_scoped_token_for_another_app() {
    let app = TestApp::spawn().await;
    let (_, secret) = token(&app, &[("name", "scoped"), ("role", "admin"), ("apps", "mine")]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for route in rack::api::route_table() {
        if !route.path.starts_with("/apps/{app}") {
            continue;
        }
        let path = |app: &str| {
            route
                .path
                .replace("{app}", app)
                .replace("{id}", "RNOSUCHRELE")
                .replace("{service}", "web")
                .replace("{*key}", "some/key")
        };
        let other = client
            .request(route.method.clone(), app.url(&path("theirs")))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 403, "{} {} on another app", route.method, route.path);
        let own = client
            .request(route.method.clone(), app.url(&path("mine")))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert_ne!(own.status(), 403, "{} {} on its own app", route.method, route.path);
    }
}

/// Reads a stream until it ends (at most `secs`); returns its text.
async fn read_to_end(response: reqwest::Response, secs: u64) -> String {
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(_) => return text,
            Err(_) => panic!("the stream did not end within {secs} s: {text:?}"),
        }
    }
}

#[tokio::test]
async fn revoking_or_expiring_a_token_ends_its_streams() {
    let app = TestApp::spawn().await;
    app.create_app("watched").await;
    let (id, secret) = token(&app, &[("name", "dashboard"), ("role", "read")]).await;
    let stream = with(&app, &secret, Method::GET, "/apps/watched/logs")
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let revoked = std::time::Instant::now();
    assert_eq!(
        app.convox(Method::DELETE, &format!("/tokens/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let text = read_to_end(stream, 5).await;
    assert!(
        text.ends_with("rack: the token of this stream was revoked\n"),
        "{text:?}"
    );
    assert!(revoked.elapsed() < Duration::from_secs(5));
    assert_eq!(
        with(&app, &secret, Method::GET, "/apps").send().await.unwrap().status(),
        401
    );

    let (_, short) = token(&app, &[("name", "short"), ("role", "read"), ("expires_in", "2")]).await;
    let stream = with(&app, &short, Method::GET, "/apps/watched/logs")
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    let text = read_to_end(stream, 10).await;
    assert!(text.ends_with("rack: the token of this stream expired\n"), "{text:?}");
    assert_eq!(
        with(&app, &short, Method::GET, "/apps").send().await.unwrap().status(),
        401
    );
}

#[tokio::test]
async fn a_credential_may_hold_only_so_many_streams() {
    let app = TestApp::spawn_with(|config| config.max_streams_per_credential = 2).await;
    app.create_app("busy").await;
    let open = || {
        app.request(Method::GET, "/apps/busy/logs")
            .header("accept", "text/plain")
            .send()
    };
    let first = open().await.unwrap();
    let second = open().await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let third = open().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    drop(first);
    wait_for(10, "a slot to come back", || async {
        (open().await.ok()?.status() == 200).then_some(())
    })
    .await;
}

/// `n` requests with a wrong password at once; their statuses.
async fn wrong_guesses(app: &TestApp, n: usize) -> Vec<u16> {
    let guesses = (0..n).map(|_| async {
        let response = app
            .client
            .get(app.url("/apps"))
            .basic_auth("", Some("wrong"))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            let wait: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&wait), "{wait}");
        }
        response.status().as_u16()
    });
    futures_util::future::join_all(guesses).await
}

#[tokio::test]
async fn failed_authentications_are_throttled_but_never_shut_out_a_valid_credential() {
    let app = TestApp::spawn().await;
    let (_, secret) = token(&app, &[("name", "ci"), ("role", "read")]).await;
    // 20 failures a minute at full speed, then 429: 30 wrong passwords from 127.0.0.1 (an app
    // process guessing, say).
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.extend(wrong_guesses(&app, 1).await);
    }
    statuses.extend(wrong_guesses(&app, 10).await);
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 20, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10, "{statuses:?}");
    // The admin's curl with the right password, and a token, from that same address still
    // get in...
    let admin = app.request(Method::GET, "/apps").send().await.unwrap();
    assert_eq!(admin.status(), 200);
    let ci = with(&app, &secret, Method::GET, "/apps").send().await.unwrap();
    assert_eq!(ci.status(), 200);
    // ...while a further wrong guess (password or token) is still refused.
    assert_eq!(wrong_guesses(&app, 1).await, [429]);
    let token_guess = with(
        &app,
        "rack_0000000000000000000000000000000000000000",
        Method::GET,
        "/apps",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(token_guess.status(), 429);
    // A throttled password guess waited for its turn (a guesser gets few of them).
    let started = std::time::Instant::now();
    assert_eq!(wrong_guesses(&app, 1).await, [429]);
    assert!(started.elapsed() >= TURN_DELAY, "{:?}", started.elapsed());
    // Another address is unaffected.
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = elsewhere
        .get(app.url("/apps"))
        .basic_auth("convox", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn the_audit_log_says_who_did_what_and_holds_no_secret() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("audited").await.status(), 201);
    let (_, secret) = token(&app, &[("name", "deployer"), ("role", "deploy"), ("apps", "audited")]).await;
    let manifest = "services:\n  worker:\n    command: sleep 600\n    health:\n      grace: 0\n";
    let id = app.build_source("audited", &[("convox.yml", manifest)]).await;
    let release = app.wait_build("audited", &id).await["release"]
        .as_str()
        .unwrap()
        .to_owned();
    let env = with(&app, &secret, Method::POST, "/apps/audited/releases")
        .form(&[("env", "SECRET_VALUE=hunter2")])
        .send()
        .await
        .unwrap();
    assert_eq!(env.status(), 201);
    let promote = with(
        &app,
        &secret,
        Method::POST,
        &format!("/apps/audited/releases/{release}/promote"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(promote.status(), 201);
    wait_for(30, "the app to run", || async {
        let info: Value = app.get_json("/apps/audited").await;
        (info["status"] == "running" && info["release"] == release.as_str()).then_some(())
    })
    .await;
    let run = with(&app, &secret, Method::POST, "/apps/audited/services/worker/processes")
        .header("command", "echo hi")
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 200);
    let refused = with(&app, &secret, Method::DELETE, "/apps/audited")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    let entries: Vec<Value> = wait_for(10, "the audit entries", || async {
        let entries: Vec<Value> = app.get_json("/audit?app=audited").await;
        // Entries are written after each answer, in the background: wait for all of them.
        let has = |method: &str, route: &str| entries.iter().any(|e| e["method"] == method && e["route"] == route);
        (has("POST", "/apps")
            && has("POST", "/apps/{app}/releases/{id}/promote")
            && has("POST", "/apps/{app}/services/{service}/processes")
            && has("DELETE", "/apps/{app}"))
        .then_some(entries)
    })
    .await;
    let find = |actor: &str, method: &str, route: &str| {
        entries
            .iter()
            .find(|e| e["actor"] == actor && e["method"] == method && e["route"] == route)
            .unwrap_or_else(|| panic!("no {actor} {method} {route} in {entries:#?}"))
    };
    let promoted = find("token deployer", "POST", "/apps/{app}/releases/{id}/promote");
    assert_eq!(promoted["status"], 201);
    assert!(
        promoted["ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == release.as_str())
    );
    assert_eq!(promoted["client"], "127.0.0.1");
    assert!(!promoted["request_id"].as_str().unwrap().is_empty());
    find("token deployer", "POST", "/apps/{app}/services/{service}/processes");
    assert_eq!(find("token deployer", "DELETE", "/apps/{app}")["status"], 403);
    // Who created the app, under the app's name.
    assert_eq!(find("password", "POST", "/apps")["status"], 201);
    let all: Vec<Value> = app.get_json("/audit?limit=1000").await;
    // Filters and paging.
    let by_token: Vec<Value> = app.get_json("/audit?actor=token%20deployer&limit=2").await;
    assert_eq!(by_token.len(), 2);
    let next: Vec<Value> = app
        .get_json(&format!(
            "/audit?actor=token%20deployer&limit=2&before={}",
            by_token[1]["id"].as_str().unwrap()
        ))
        .await;
    assert!(next.iter().all(|e| e["id"].as_str() < by_token[1]["id"].as_str()));
    let text = serde_json::to_string(&all).unwrap();
    for secret in [PASSWORD, secret.as_str(), "hunter2"] {
        assert!(!text.contains(secret), "the audit log holds a secret");
    }
    // Only admins read it.
    assert_eq!(
        with(&app, &secret, Method::GET, "/audit")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
}

#[tokio::test]
async fn an_empty_app_list_never_makes_an_all_apps_token() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("myapp").await.status(), 201);
    for apps in ["", " ", ",", "myapp,", "myapp,,other", " ,myapp"] {
        let response = app
            .json(Method::POST, "/tokens")
            .form(&[("name", "ci"), ("role", "deploy"), ("apps", apps)])
            .send()
            .await
            .unwrap();
        let (status, text) = status_text(response).await;
        assert_eq!(status, 400, "apps={apps:?}: {text}");
        assert!(text.contains("apps") && text.contains("empty app name"), "{text}");
        let response = app
            .json(Method::POST, "/tokens")
            .json(&serde_json::json!({ "name": "ci", "role": "deploy", "apps": apps }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "apps={apps:?} as JSON");
    }
    let tokens: Vec<Value> = app.get_json("/tokens").await;
    assert!(tokens.is_empty(), "{tokens:?}");
}

#[tokio::test]
async fn idempotency_keys_belong_to_one_credential_and_one_app() {
    let app = TestApp::spawn().await;
    for name in ["one", "two"] {
        assert_eq!(app.create_app(name).await.status(), 201);
    }
    let (_, squatter) = token(&app, &[("name", "squatter"), ("role", "deploy")]).await;
    let (_, ci) = token(&app, &[("name", "ci"), ("role", "deploy")]).await;
    let release = |secret: String, name: &'static str| {
        let request = app
            .client
            .post(app.url(&format!("/apps/{name}/releases")))
            .header("accept", "application/json")
            .header("idempotency-key", "deploy-42")
            .form(&[("env", "A=1")]);
        async move {
            let response = if secret.is_empty() {
                request.basic_auth("convox", Some(PASSWORD))
            } else {
                request.bearer_auth(secret)
            }
            .send()
            .await
            .unwrap();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let (status, text) = status_text(response).await;
            assert_eq!(status, 201, "{name}: {text}");
            let body: Value = serde_json::from_str(&text).unwrap();
            (body["id"].as_str().unwrap().to_owned(), replayed)
        }
    };
    // One token uses the key first...
    let (squatted, _) = release(squatter.clone(), "one").await;
    // ...which changes nothing for another token or the password, each its own first request.
    let (mine, replayed) = release(ci.clone(), "one").await;
    assert!(!replayed && mine != squatted, "another token's key was replayed to CI");
    let (admin, replayed) = release(String::new(), "one").await;
    assert!(!replayed && admin != squatted && admin != mine);
    // The same credential and key on another app is another request too...
    let (other_app, replayed) = release(ci.clone(), "two").await;
    assert!(!replayed && other_app != mine);
    // ...while its own retry is still replayed.
    let (again, replayed) = release(ci, "one").await;
    assert!(replayed && again == mine, "{again} {mine}");
    let releases: Vec<Value> = app.get_json("/apps/one/releases").await;
    assert_eq!(releases.len(), 3);
}

#[tokio::test]
async fn a_release_env_and_its_description_are_bounded() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("myapp").await.status(), 201);
    let env = |keys: usize| (0..keys).map(|i| format!("K{i}=v")).collect::<Vec<_>>().join("\n");
    let app = &app;
    let create = |form: Vec<(&'static str, String)>| async move {
        let response = app
            .json(Method::POST, "/apps/myapp/releases")
            .form(&form)
            .send()
            .await
            .unwrap();
        status_text(response).await
    };
    // 300 000 keys (under the 4 MiB body limit) are refused, naming the limit.
    let (status, text) = create(vec![("env", env(300_000))]).await;
    assert_eq!(status, 422, "{}", &text[..text.len().min(300)]);
    assert!(text.contains("at most 1000"), "{text}");
    // So is one value of 300 KiB.
    let (status, text) = create(vec![("env", format!("BIG={}", "x".repeat(300 * 1024)))]).await;
    assert_eq!(status, 422);
    assert!(text.contains("256 KiB"), "{text}");
    let (status, text) = create(vec![("description", "d".repeat(1001))]).await;
    assert_eq!(status, 422);
    assert!(text.contains("at most 1000"), "{text}");
    // 1000 keys are fine, and the description names 20 of them, then how many more.
    let (status, text) = create(vec![("env", env(1000))]).await;
    assert_eq!(status, 201, "{}", &text[..text.len().min(300)]);
    let release: Value = serde_json::from_str(&text).unwrap();
    let description = release["description"].as_str().unwrap();
    assert!(description.starts_with("env add:K0 "), "{description}");
    assert!(description.ends_with(" and 980 more"), "{description}");
    assert!(description.len() < 400, "{description}");
    let releases: Vec<Value> = app.get_json("/apps/myapp/releases").await;
    assert_eq!(releases.len(), 1, "nothing of the refused ones was kept");
}
