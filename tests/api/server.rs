//! The server as a whole: the embedded default's Postgres, the generated password, restarts.

use reqwest::Method;

use crate::helpers::{TestApp, status_text};
use rack::auth::PasswordSource;
use rack::config::{Config, Database};

#[tokio::test]
async fn embedded_default_keeps_apps_and_password_across_restarts() {
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(data.path().to_path_buf(), Database::Embedded, "unused");
    config.password = None;

    let first = rack::Application::build(config.clone()).await.unwrap();
    assert_eq!(first.password_source(), PasswordSource::Generated);
    let app = TestApp::start_built(first).await;
    let password = std::fs::read_to_string(data.path().join("password"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(password.len(), 32);
    let response = app
        .client
        .post(app.url("/apps"))
        .basic_auth("", Some(&password))
        .form(&[("name", "keeper")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    app.stop().await;

    let second = rack::Application::build(config).await.unwrap();
    assert_eq!(second.password_source(), PasswordSource::Stored);
    let app = TestApp::start_built(second).await;
    let response = app
        .client
        .get(app.url("/apps/keeper"))
        .basic_auth("", Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stale = app
        .client
        .get(app.url("/apps"))
        .basic_auth("", Some("unused"))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn in_flight_requests_finish_during_shutdown() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let requests: Vec<_> = (0..10).map(|_| app.convox(Method::GET, "/apps/myapp").send()).collect();
    let answers = futures_util::future::join_all(requests).await;
    app.stop().await;
    for answer in answers {
        assert_eq!(status_text(answer.unwrap()).await.0, 200);
    }
}
