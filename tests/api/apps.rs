//! App CRUD through the HTTP API, with convox's JSON shapes and error texts.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, status_text};

#[tokio::test]
async fn create_app_returns_the_convox_shape() {
    let app = TestApp::spawn().await;
    let response = app.create_app("myapp").await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["location"], "/apps/myapp");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["name"], "myapp");
    assert_eq!(body["status"], "running");
    assert_eq!(body["generation"], "3");
    assert_eq!(body["locked"], false);
    assert_eq!(body["release"], "");
    assert_eq!(body["parameters"], serde_json::json!({}));
}

#[tokio::test]
async fn list_apps_is_sorted_by_name() {
    let app = TestApp::spawn().await;
    assert!(app.list_apps().await.is_empty());
    for name in ["web", "api", "worker"] {
        assert_eq!(app.create_app(name).await.status(), 201);
    }
    let names: Vec<Value> = app.list_apps().await.into_iter().map(|a| a["name"].clone()).collect();
    assert_eq!(names, ["api", "web", "worker"]);
}

#[tokio::test]
async fn show_app_and_unknown_app_is_404_with_the_convox_text() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let body: Value = app.get_app("myapp").await.json().await.unwrap();
    assert_eq!(body["name"], "myapp");

    assert_eq!(
        status_text(app.get_app("nope").await).await,
        (404, "app not found: nope\n".to_owned())
    );
    // A name that could never exist is just as unknown.
    assert_eq!(status_text(app.get_app("Bad_Name").await).await.0, 404);
    assert_eq!(
        status_text(app.delete_app("nope").await).await,
        (404, "app not found: nope\n".to_owned())
    );
    assert_eq!(
        status_text(app.update_app("nope", &[("lock", "true")]).await).await.0,
        404
    );
}

#[tokio::test]
async fn create_app_with_taken_name_is_409() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("myapp").await.status(), 201);
    let (status, text) = status_text(app.create_app("myapp").await).await;
    assert_eq!((status, text.as_str()), (409, "app already exists: myapp\n"));
    assert_eq!(app.list_apps().await.len(), 1);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_exactly_one_app() {
    let app = TestApp::spawn().await;
    let attempts = (0..20).map(|_| app.create_app("race"));
    let statuses: Vec<u16> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 19, "{statuses:?}");
}

#[tokio::test]
async fn bad_names_are_400_and_create_nothing() {
    let app = TestApp::spawn().await;
    let long = "a".repeat(64);
    for name in [
        "",
        "1app",
        "-app",
        "app-",
        "MyApp",
        "my_app",
        "a.b",
        "a b",
        long.as_str(),
    ] {
        let (status, text) = status_text(app.create_app(name).await).await;
        assert_eq!(status, 400, "{name:?}: {text}");
        assert!(text.starts_with("invalid app name"), "{name:?}: {text}");
    }
    for name in ["rack", "system"] {
        let (status, text) = status_text(app.create_app(name).await).await;
        assert_eq!(
            (status, text.trim()),
            (
                400,
                format!("invalid app name \"{name}\": the name is reserved").as_str()
            )
        );
    }
    assert!(app.list_apps().await.is_empty());
}

#[tokio::test]
async fn lock_protects_an_app_from_deletion() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    assert_eq!(
        status_text(app.update_app("myapp", &[("lock", "true")]).await).await,
        (200, "ok\n".to_owned())
    );
    let (status, text) = status_text(app.delete_app("myapp").await).await;
    assert_eq!((status, text.as_str()), (409, "app is locked: myapp\n"));
    assert_eq!(app.get_app("myapp").await.status(), 200);

    app.update_app("myapp", &[("lock", "false")]).await;
    assert_eq!(
        status_text(app.delete_app("myapp").await).await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(app.get_app("myapp").await.status(), 404);
    assert!(app.list_apps().await.is_empty());
}

#[tokio::test]
async fn parameters_merge_and_empty_values_remove() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    // As convox packs them: one form field holding an urlencoded map.
    assert_eq!(
        app.update_app("myapp", &[("parameters", "Timeout=30&Region=eu")])
            .await
            .status(),
        200
    );
    assert_eq!(
        app.update_app("myapp", &[("parameters", "Timeout=60&Region=")])
            .await
            .status(),
        200
    );
    let body: Value = app.get_app("myapp").await.json().await.unwrap();
    assert_eq!(body["parameters"], serde_json::json!({ "Timeout": "60" }));

    let (status, text) = status_text(app.update_app("myapp", &[("parameters", "bad key=1")]).await).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.starts_with("invalid parameter name"), "{text}");
}

#[tokio::test]
async fn update_answers_the_app_to_json_clients() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let response = app
        .json(Method::PUT, "/apps/myapp")
        .json(&serde_json::json!({ "lock": true, "parameters": { "Key": "v" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["locked"], true);
    assert_eq!(body["parameters"]["Key"], "v");
}
