//! Browsers and other sites' pages: a write (or a websocket handshake) that a browser says
//! comes from another origin is refused before its credential counts, and a browser is never
//! challenged for basic auth (so it never caches a credential to attach to such requests).

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, status_text};

async fn releases(app: &TestApp, name: &str) -> usize {
    let list: Vec<Value> = app.get_json(&format!("/apps/{name}/releases")).await;
    list.len()
}

#[tokio::test]
async fn writes_from_other_origins_are_refused() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("attacker").await.status(), 201);
    let own = format!("http://{}", app.addr);
    // The request of a form another site's page submits, with the credential the browser cached.
    for (header, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let response = app
            .convox(Method::POST, "/apps/attacker/releases")
            .header(header, value)
            .form(&[("env", "PWNED=1")])
            .send()
            .await
            .unwrap();
        let (status, text) = status_text(response).await;
        assert_eq!(status, 403, "{header}: {value}: {text}");
        assert!(text.contains("another"), "{text}");
        let response = app
            .json(Method::POST, "/tokens")
            .header(header, value)
            .form(&[("name", "stolen"), ("role", "admin")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{header}: {value}");
    }
    assert_eq!(releases(&app, "attacker").await, 0, "nothing was created");
    let tokens: Vec<Value> = app.get_json("/tokens").await;
    assert!(tokens.is_empty(), "{tokens:?}");

    // The rack's own page, and clients that send neither header, still write.
    for headers in [
        vec![("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        vec![("sec-fetch-site", "none")],
        vec![],
    ] {
        let mut request = app
            .convox(Method::POST, "/apps/attacker/releases")
            .form(&[("env", "A=1")]);
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let (status, text) = status_text(request.send().await.unwrap()).await;
        assert_eq!(status, 201, "{headers:?}: {text}");
    }
    assert_eq!(releases(&app, "attacker").await, 3);
    // Reading from another origin is not refused here (the browser keeps the answer from the
    // page that asked, as it has no CORS header).
    let read = app
        .convox(Method::GET, "/apps")
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
}

#[tokio::test]
async fn websocket_handshakes_from_other_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("myapp").await.status(), 201);
    let handshake = |origin: &str| {
        let mut request = format!("ws://{}/apps/myapp/logs", app.addr)
            .into_client_request()
            .unwrap();
        let headers = request.headers_mut();
        headers.insert("authorization", format!("Basic {}", base64_password()).parse().unwrap());
        headers.insert("follow", "false".parse().unwrap());
        headers.insert("origin", origin.parse().unwrap());
        request
    };
    let refused = tokio_tungstenite::connect_async(handshake("http://evil.example"))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    let own = format!("http://{}", app.addr);
    assert!(tokio_tungstenite::connect_async(handshake(&own)).await.is_ok());
    // The convox CLI sends RACK_URL's `scheme://host`: `https://` behind a TLS proxy.
    let proxied = format!("https://{}", app.addr);
    assert!(tokio_tungstenite::connect_async(handshake(&proxied)).await.is_ok());
    let other_port = format!("http://127.0.0.1:{}", app.addr.port() + 1);
    assert!(tokio_tungstenite::connect_async(handshake(&other_port)).await.is_err());
}

fn base64_password() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("convox:{}", crate::helpers::PASSWORD))
}

#[tokio::test]
async fn browsers_are_never_challenged_for_basic_auth() {
    let app = TestApp::spawn().await;
    for headers in [
        vec![("accept", "text/html,application/xhtml+xml,*/*;q=0.8")],
        vec![("sec-fetch-mode", "navigate"), ("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-mode", "cors")],
    ] {
        let mut request = app.client.get(app.url("/apps"));
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{headers:?}");
        assert!(!response.headers().contains_key("www-authenticate"), "{headers:?}");
    }
    // A wrong password from a browser's form is not challenged either.
    let response = app
        .client
        .post(app.url("/apps"))
        .basic_auth("", Some("wrong"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(!response.headers().contains_key("www-authenticate"));
    // curl and scripts without those headers still get the challenge (curl --anyauth needs it).
    let curl = app
        .client
        .get(app.url("/apps"))
        .header("accept", "*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(curl.headers()["www-authenticate"], "Basic realm=\"rack\"");
}

/// Serves `page` (HTML) to every request on a listener of another origin (127.0.0.2); returns
/// its URL.
async fn serve_page(page: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

/// The attack of issue 22 in a real Chromium: the user signed in to the rack with basic auth
/// (the browser caches the credential, if the rack ever lets it), then visits another site
/// whose page submits a form to the rack by itself. Nothing is created.
#[tokio::test]
async fn another_sites_form_creates_nothing_in_a_real_browser() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("attacker").await.status(), 201);
    let driver = crate::dashboard::chromedriver().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = crate::dashboard::browser(&driver, profile.path()).await;

    // The user opens the rack with the password in the URL, as one does with curl: a browser
    // that is challenged uses it and keeps it for the rack's origin.
    browser
        .goto(&format!("http://convox:{}@{}/apps", crate::helpers::PASSWORD, app.addr))
        .await
        .unwrap();
    let target = app.url("/apps/attacker/releases");
    let page = format!(
        "<!doctype html><html><body>\
         <form id=f method=POST action=\"{target}\"><input name=env value=\"PWNED=1\"></form>\
         <script>document.getElementById('f').submit()</script></body></html>"
    );
    let attacker = serve_page(page).await;
    browser.goto(&attacker).await.unwrap();
    // The form navigates the tab to the rack: wait until its answer is the page shown.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let shown = loop {
        let url = browser.current_url().await.unwrap();
        if url.as_str() == target {
            let text: Value = browser
                .execute(
                    "return document.readyState === 'complete' ? document.body.innerText : null",
                    vec![],
                )
                .await
                .unwrap();
            if let Some(text) = text.as_str() {
                break text.to_owned();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the form was not submitted within 60 s (at {url})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(releases(&app, "attacker").await, 0, "the browser showed: {shown}");
    assert!(shown.contains("refused") || shown.contains("authentication"), "{shown}");
    browser.close().await.unwrap();
    drop(driver);
}
