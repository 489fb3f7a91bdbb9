//! Every route needs the rack password through HTTP basic auth, with any user name.

use reqwest::Method;

use crate::helpers::{PASSWORD, TestApp, status_text};

#[tokio::test]
async fn missing_credentials_are_401_with_a_challenge() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/apps"),
        (Method::POST, "/apps"),
        (Method::GET, "/system"),
        (Method::GET, "/nowhere"),
    ] {
        let response = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path}");
        assert_eq!(response.headers()["www-authenticate"], "Basic realm=\"rack\"");
        assert!(response.headers().contains_key("request-id"));
    }
}

#[tokio::test]
async fn wrong_password_is_401_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .post(app.url("/apps"))
        .basic_auth("convox", Some("wrong"))
        .form(&[("name", "myapp")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(response).await,
        (401, "invalid authentication\n".to_owned())
    );
    let garbage = app
        .client
        .get(app.url("/apps"))
        .header("authorization", "Basic ###")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 401);
    let bearer = app
        .client
        .get(app.url("/apps"))
        .bearer_auth(PASSWORD)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 401);
    assert!(app.list_apps().await.is_empty());
}

#[tokio::test]
async fn any_user_name_is_accepted_with_the_password() {
    let app = TestApp::spawn().await;
    for user in ["convox", "", "someone"] {
        let response = app
            .client
            .get(app.url("/auth"))
            .basic_auth(user, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(status_text(response).await, (200, "ok\n".to_owned()), "user {user:?}");
    }
}
