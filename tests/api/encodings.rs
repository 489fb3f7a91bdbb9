//! Request and response encodings: forms and JSON in; JSON, `ok` and text or JSON errors out.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, status_text};

#[tokio::test]
async fn json_bodies_work_like_forms() {
    let app = TestApp::spawn().await;
    let response = app
        .json(Method::POST, "/apps")
        .json(&serde_json::json!({ "name": "myapp" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    // Indented as convox writes it, ending with a newline.
    assert!(text.starts_with("{\n  \""), "{text}");
    assert!(text.ends_with("}\n"), "{text}");
}

#[tokio::test]
async fn errors_are_json_for_json_clients_and_text_otherwise() {
    let app = TestApp::spawn().await;
    let response = app.json(Method::GET, "/apps/nope").send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "error": "app not found: nope" }));

    let response = app.convox(Method::GET, "/apps/nope").send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(response.text().await.unwrap(), "app not found: nope\n");
}

#[tokio::test]
async fn malformed_bodies_are_400_and_create_nothing() {
    let app = TestApp::spawn().await;
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("application/json", "{\"name\":", 400, "invalid JSON body"),
        (
            "application/json",
            "{\"name\":\"a\",\"colour\":\"red\"}",
            400,
            "invalid JSON body: unknown field `colour`",
        ),
        (
            "application/json",
            "{\"name\":7}",
            400,
            "invalid JSON body: invalid type",
        ),
        (
            "application/x-www-form-urlencoded",
            "nom=a",
            400,
            "invalid form body: unknown field `nom`",
        ),
        (
            "application/x-www-form-urlencoded",
            "",
            400,
            "invalid form body: missing field `name`",
        ),
        ("text/plain", "name=a", 415, "unsupported content type \"text/plain\""),
    ];
    for (content_type, body, status, message) in cases {
        let response = app
            .convox(Method::POST, "/apps")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let (got, text) = status_text(response).await;
        assert_eq!(got, status, "{content_type} {body}: {text}");
        assert!(text.starts_with(message), "{content_type} {body}: {text}");
    }
    let response = app
        .convox(Method::PUT, "/apps/x")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("lock=maybe")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(app.list_apps().await.is_empty());
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = TestApp::spawn().await;
    let body = format!("name=a&generation={}", "3".repeat(5 * 1024 * 1024));
    let response = app
        .convox(Method::POST, "/apps")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    // The unread rest of the body ends the connection; the client is told so and does not
    // send its next request into a reset.
    assert_eq!(response.headers()["connection"], "close");
    let (status, text) = status_text(response).await;
    assert_eq!((status, text.as_str()), (413, "the request body is too large\n"));
    assert!(app.list_apps().await.is_empty());
}

#[tokio::test]
async fn unknown_routes_and_methods_say_so() {
    let app = TestApp::spawn().await;
    let (status, text) = status_text(app.convox(Method::GET, "/nowhere").send().await.unwrap()).await;
    assert_eq!((status, text.as_str()), (404, "route not found: GET /nowhere\n"));
    let (status, text) = status_text(app.convox(Method::PATCH, "/apps").send().await.unwrap()).await;
    assert_eq!((status, text.as_str()), (405, "method not allowed on this path\n"));
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let ok = app.convox(Method::GET, "/apps").send().await.unwrap();
    let err = app.convox(Method::GET, "/apps/nope").send().await.unwrap();
    let a = ok.headers()["request-id"].to_str().unwrap().to_owned();
    let b = err.headers()["request-id"].to_str().unwrap().to_owned();
    assert!(!a.is_empty() && a != b);
    // A request id sent by the client is kept, so logs can be joined across systems.
    let mine = app
        .convox(Method::GET, "/apps")
        .header("request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.headers()["request-id"], "abc-123");
}

#[tokio::test]
async fn system_reports_a_version_3_rack() {
    let app = TestApp::spawn().await;
    let system: Value = app
        .convox(Method::GET, "/system")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(system["version"].as_str().unwrap().starts_with("3."), "{system}");
    // The convox CLI compares versions as strings with v2 date versions.
    assert!(system["version"].as_str().unwrap() > "20190111211123");
    assert_eq!(system["provider"], "local");
    assert_eq!(system["name"], "rack");
    assert_eq!(system["status"], "running");
}

#[tokio::test]
async fn idempotent_retries_replay_the_first_response_and_refuse_other_requests() {
    let app = TestApp::spawn().await;
    let create = |name: &'static str, key: &'static str| {
        app.json(Method::POST, "/apps")
            .header("idempotency-key", key)
            .form(&[("name", name)])
            .send()
    };
    let first = create("myapp", "key-1").await.unwrap();
    assert_eq!(first.status(), 201);
    let first_body = first.text().await.unwrap();
    let again = create("myapp", "key-1").await.unwrap();
    assert_eq!(again.status(), 201, "the retry gets the first answer, not 409");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], "/apps/myapp");
    assert_eq!(again.text().await.unwrap(), first_body);
    let (status, text) = status_text(create("other", "key-1").await.unwrap()).await;
    assert_eq!(status, 422);
    assert!(text.contains("was used for a different request"), "{text}");
    assert_eq!(app.list_apps().await.len(), 1);

    // A first answer that was an error is replayed as that error.
    let conflict = create("myapp", "key-2").await.unwrap();
    assert_eq!(conflict.status(), 409);
    let (status, text) = status_text(create("myapp", "key-2").await.unwrap()).await;
    assert_eq!(
        (status, text.as_str()),
        (409, "{\"error\":\"app already exists: myapp\"}\n")
    );

    let build_source = crate::helpers::source_tarball(&[("convox.yml", "services: {}\n")]);
    for _ in 0..2 {
        let upload = app
            .convox(Method::POST, "/apps/myapp/objects/src.tgz")
            .header("idempotency-key", "upload-1")
            .body(build_source.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(upload.status(), 200);
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let build: Value = app
            .json(Method::POST, "/apps/myapp/builds")
            .header("idempotency-key", "build-1")
            .form(&[("url", "object://myapp/src.tgz")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(build["id"].as_str().unwrap().to_owned());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let builds: Vec<Value> = app.get_json("/apps/myapp/builds").await;
    assert_eq!(builds.len(), 1, "a retried build starts nothing new");
}

#[tokio::test]
async fn json_bodies_with_a_key_twice_are_refused_naming_it() {
    let app = TestApp::spawn().await;
    let response = app
        .json(Method::POST, "/tokens")
        .header("content-type", "application/json")
        .body(r#"{"name":"ci","role":"read","role":"admin"}"#)
        .send()
        .await
        .unwrap();
    let (status, text) = status_text(response).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("duplicate field `role`"), "{text}");
    let tokens: Vec<Value> = app.get_json("/tokens").await;
    assert!(tokens.is_empty(), "{tokens:?}");
    // Forms were refused already (by the field's decoder); still are.
    let response = app
        .json(Method::POST, "/apps")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=a&name=b")
        .send()
        .await
        .unwrap();
    let (status, text) = status_text(response).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("duplicate field `name`"), "{text}");
}
