//! Every route needs the rack password through HTTP basic auth, with any user name.

use std::time::Duration;

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
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 401);
    // The password also works as a bearer token.
    let bearer = app
        .client
        .get(app.url("/apps"))
        .bearer_auth(PASSWORD)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
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

async fn create_token(app: &TestApp, name: &str, role: &str) -> (String, String) {
    let response = app
        .json(Method::POST, "/tokens")
        .form(&[("name", name), ("role", role)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.unwrap();
    let secret = body["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("rack_") && secret.len() > 40, "{secret}");
    (body["id"].as_str().unwrap().to_owned(), secret)
}

#[tokio::test]
async fn tokens_are_scoped_to_read_deploy_or_admin() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let (_, read) = create_token(&app, "dashboard", "read").await;
    let (deploy_id, deploy) = create_token(&app, "ci", "deploy").await;
    let (_, admin) = create_token(&app, "ops", "admin").await;
    let with = |token: &str, method: Method, path: &str| app.client.request(method, app.url(path)).bearer_auth(token);

    // Read: GETs only (also as the basic auth password, as the convox CLI would send it).
    assert_eq!(with(&read, Method::GET, "/apps").send().await.unwrap().status(), 200);
    let basic = app
        .client
        .get(app.url("/apps/myapp"))
        .basic_auth("convox", Some(&read))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let (status, text) = status_text(with(&read, Method::POST, "/apps/myapp/releases").send().await.unwrap()).await;
    assert_eq!(status, 403);
    assert_eq!(
        text,
        "this credential has the read role; POST /apps/{app}/releases needs deploy\n"
    );

    // Deploy: uploads, builds, releases, promotes; not apps or tokens.
    let upload = with(&deploy, Method::POST, "/apps/myapp/objects/src.tgz")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let release = with(&deploy, Method::POST, "/apps/myapp/releases")
        .form(&[("env", "A=1")])
        .send()
        .await
        .unwrap();
    assert_eq!(release.status(), 201);
    let create = with(&deploy, Method::POST, "/apps")
        .form(&[("name", "other")])
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 403);
    assert_eq!(
        with(&deploy, Method::DELETE, "/apps/myapp")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        with(&deploy, Method::GET, "/tokens").send().await.unwrap().status(),
        403
    );

    // Admin: everything.
    assert_eq!(
        with(&admin, Method::POST, "/apps")
            .form(&[("name", "other")])
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let listed: Vec<serde_json::Value> = with(&admin, Method::GET, "/tokens")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    assert!(
        listed.iter().all(|t| t.get("token").is_none()),
        "secrets are never listed: {listed:?}"
    );
    assert!(listed.iter().any(|t| t["last_used"].is_string()));

    // Revoked: 401.
    assert_eq!(
        with(&admin, Method::DELETE, &format!("/tokens/{deploy_id}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(with(&deploy, Method::GET, "/apps").send().await.unwrap().status(), 401);
    assert_eq!(
        with("rack_made-up", Method::GET, "/apps")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let bad = app
        .json(Method::POST, "/tokens")
        .form(&[("name", "x"), ("role", "root")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn websocket_handshakes_need_credentials_too() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let request = format!("ws://{}/apps/myapp/logs", app.addr)
        .into_client_request()
        .unwrap();
    let refused = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let (_, read) = create_token(&app, "dashboard", "read").await;
    let mut request = format!("ws://{}/apps/myapp/logs", app.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {read}").parse().unwrap());
    request.headers_mut().insert("follow", "false".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
}

#[tokio::test]
async fn a_scoped_token_reads_its_one_object_until_it_expires() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    assert_eq!(app.upload("myapp", "src/a.tgz", b"source".to_vec()).await.status(), 200);
    assert_eq!(app.upload("myapp", "src/b.tgz", b"other".to_vec()).await.status(), 200);
    let path = "/apps/myapp/objects/src/a.tgz";
    let token = rack::auth::issue_scoped(&app.state.pool, "build:myapp:B1", path, Duration::from_secs(2))
        .await
        .unwrap();
    let send = |method: Method, path: &str| app.client.request(method, app.url(path)).bearer_auth(&token).send();

    let response = send(Method::GET, path).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"source");
    assert_eq!(send(Method::HEAD, path).await.unwrap().status(), 200);
    for (method, other) in [
        (Method::GET, "/apps/myapp/objects/src/b.tgz"),
        (Method::GET, "/apps/myapp"),
        (Method::GET, "/tokens"),
        (Method::POST, path),
        (Method::DELETE, path),
    ] {
        let (status, text) = status_text(send(method.clone(), other).await.unwrap()).await;
        assert_eq!(status, 403, "{method} {other}");
        assert_eq!(text, format!("this credential only allows GET {path}\n"));
    }
    // rack's own tokens are not the API's to list.
    let tokens: Vec<serde_json::Value> = app.get_json("/tokens").await;
    assert!(tokens.is_empty(), "{tokens:?}");

    crate::helpers::wait_for(10, "the token to expire", || async {
        (send(Method::GET, path).await.unwrap().status() == 401).then_some(())
    })
    .await;
}

/// Generated from the route table: every route needs a credential (401 without one), and each
/// role gets exactly what the route's policy allows (403 below it). A route added without a
/// policy cannot be written, and one whose policy changes shows up here.
#[tokio::test]
async fn every_route_checks_credentials_and_roles_as_its_policy_says() {
    let app = TestApp::spawn().await;
    let mut tokens = Vec::new();
    for role in rack::auth::Role::ALL {
        let (_, secret) = create_token(&app, role.as_str(), role.as_str()).await;
        tokens.push((role, secret));
    }
    // A bound, not a latency target: past the checks some routes do real work (`/system/usage`
    // lists podman's images, which waits for podman's storage lock while other tests build; it
    // took over 10 s in a loaded run).
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let routes = rack::api::route_table();
    assert!(routes.len() > 30, "{} routes", routes.len());
    for route in routes {
        // Placeholders for the path's parameters; the answer past the checks does not matter.
        let path = route
            .path
            .replace("{app}", "nosuchapp")
            .replace("{id}", "RNOSUCHRELE")
            .replace("{service}", "web")
            .replace("{*key}", "some/key");
        let url = app.url(&path);
        let what = format!("{} {}", route.method, route.path);
        let anonymous = client.request(route.method.clone(), &url).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{what} without a credential");
        for (role, secret) in &tokens {
            let response = client
                .request(route.method.clone(), &url)
                .bearer_auth(secret)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            if *role < route.policy.role {
                assert_eq!(status, 403, "{what} with a {} token", role.as_str());
            } else {
                assert!(
                    status != 401 && status != 403,
                    "{what} with a {} token: {status}",
                    role.as_str()
                );
            }
        }
    }
}
