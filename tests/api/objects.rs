//! Object uploads: streamed, digest-checked, size-capped, with keys that cannot escape.

use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{PASSWORD, TestApp, files_under, object_files, status_text, wait_for};

fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn upload_and_download_round_trip_with_digest() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256(&data);
    let header = format!("sha-256=:{}:", base64::engine::general_purpose::STANDARD.encode(digest));
    let response = app
        .convox(Method::POST, "/apps/myapp/objects/src/app.tgz")
        .header("content-digest", header)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-checksum-sha256"], hex(&digest).as_str());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "Url": "object://myapp/src/app.tgz" }));

    let head = app
        .convox(Method::HEAD, "/apps/myapp/objects/src/app.tgz")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "3000000");

    let download = app
        .convox(Method::GET, "/apps/myapp/objects/src/app.tgz")
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), data.as_slice());

    let list: Vec<String> = app.get_json("/apps/myapp/objects?prefix=src/").await;
    assert_eq!(list, ["src/app.tgz"]);

    let deleted = app
        .convox(Method::DELETE, "/apps/myapp/objects/src/app.tgz")
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(deleted).await, (200, "ok\n".to_owned()));
    let gone = app
        .convox(Method::GET, "/apps/myapp/objects/src/app.tgz")
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_text(gone).await,
        (404, "object not found: src/app.tgz\n".to_owned())
    );
    assert_eq!(app.head_status("/apps/myapp/objects/src/app.tgz").await, 404);
}

#[tokio::test]
async fn an_upload_without_a_key_gets_a_tmp_key() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let response = app
        .convox(Method::POST, "/apps/myapp/objects")
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let url = body["Url"].as_str().unwrap();
    let key = url.strip_prefix("object://myapp/tmp/").expect("a tmp key");
    assert_eq!(key.len(), 30);
    // The convox SDK sends an empty key as a trailing slash.
    let response = app
        .convox(Method::POST, "/apps/myapp/objects/")
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn digest_mismatch_is_422_and_keeps_nothing() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let response = app
        .convox(Method::POST, "/apps/myapp/objects/a.tgz")
        .header("x-checksum-sha256", hex(&sha256(b"something else")))
        .body("the real body")
        .send()
        .await
        .unwrap();
    let (status, text) = status_text(response).await;
    assert_eq!(status, 422);
    assert!(text.starts_with("the upload's SHA-256 is"), "{text}");
    assert_eq!(app.head_status("/apps/myapp/objects/a.tgz").await, 404);
    assert_no_files(&app, "myapp").await;

    let malformed = app
        .convox(Method::POST, "/apps/myapp/objects/a.tgz")
        .header("x-checksum-sha256", "xyz")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
}

#[tokio::test]
async fn uploads_over_the_cap_are_413_and_keep_nothing() {
    let app = TestApp::spawn_with(|config| config.max_upload_bytes = 1000).await;
    app.create_app("myapp").await;
    // Announced too large: refused before reading.
    let (status, text) = status_text(app.upload("myapp", "big", vec![1; 1001]).await).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("limit of 1000 bytes"), "{text}");
    // Streamed with no length: refused once the cap is crossed.
    let chunks = futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![7u8; 300])));
    let response = app
        .convox(Method::POST, "/apps/myapp/objects/big")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(app.head_status("/apps/myapp/objects/big").await, 404);
    assert_no_files(&app, "myapp").await;
    assert_eq!(app.upload("myapp", "small", vec![1; 1000]).await.status(), 200);
}

/// Sends `head` (a raw request head) and `body`, returns the status line's code and the body.
async fn raw(app: &TestApp, head: &str, body: &[u8], close_early: bool) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("convox:{PASSWORD}"));
    let request = format!("{head}\r\nHost: rack\r\nAuthorization: Basic {auth}\r\nAccept: */*\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    if close_early {
        drop(stream);
        return None;
    }
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let text = answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((status, text))
}

#[tokio::test]
async fn keys_that_could_escape_are_400() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    for path in [
        "../../../etc/x",
        "a/../../b",
        "a/%2E%2E/b",
        "a%5Cb",
        "a%00b",
        "a//b",
        "./a",
    ] {
        let head = format!("POST /apps/myapp/objects/{path} HTTP/1.1\r\nContent-Length: 1\r\nConnection: close");
        let (status, text) = raw(&app, &head, b"\r\nx", false).await.expect("an answer");
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("invalid object key"), "{path}: {text}");
    }
    assert_no_files(&app, "myapp").await;
}

#[tokio::test]
async fn an_interrupted_upload_leaves_no_object() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let head = "POST /apps/myapp/objects/partial HTTP/1.1\r\nContent-Length: 10000000";
    raw(&app, head, &[b"\r\n".as_slice(), &vec![1u8; 100_000]].concat(), true).await;
    wait_for(10, "the partial upload to be discarded", || async {
        let files = files_under(&app.state.config.data_dir.join("objects"));
        files.is_empty().then_some(())
    })
    .await;
    assert_eq!(app.head_status("/apps/myapp/objects/partial").await, 404);
}

#[tokio::test]
async fn objects_of_unknown_apps_are_404() {
    let app = TestApp::spawn().await;
    let (status, text) = status_text(app.upload("nope", "a", b"x".to_vec()).await).await;
    assert_eq!((status, text.as_str()), (404, "app not found: nope\n"));
}

async fn assert_no_files(app: &TestApp, name: &str) {
    let files = object_files(app, name);
    assert!(files.is_empty(), "left behind: {files:?}");
}

/// GETs `key` and checks that the bytes match the length and digest sent with them; returns
/// the length.
async fn consistent_download(app: &TestApp, key: &str) -> usize {
    let response = app
        .convox(Method::GET, &format!("/apps/myapp/objects/{key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{key}");
    let length: usize = response.headers()["content-length"].to_str().unwrap().parse().unwrap();
    let digest = response.headers()["x-checksum-sha256"].to_str().unwrap().to_owned();
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), length, "{key}: Content-Length does not match the bytes");
    assert_eq!(
        hex(&sha256(&bytes)),
        digest,
        "{key}: the digest does not match the bytes"
    );
    length
}

#[tokio::test]
async fn concurrent_uploads_to_one_key_never_mix_metadata_and_bytes() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let small = vec![1u8; 2 * 1024 * 1024];
    let large = vec![2u8; 2 * 1024 * 1024 + 1];
    for round in 0..15 {
        let key = format!("race/{round}");
        let (a, b) = tokio::join!(
            app.upload("myapp", &key, small.clone()),
            app.upload("myapp", &key, large.clone())
        );
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
        let length = consistent_download(&app, &key).await;
        assert!(length == small.len() || length == large.len());
    }
    // One blob per key: every replaced one was deleted, and no temp file is left.
    assert_eq!(object_files(&app, "myapp").len(), 15);
}

#[tokio::test]
async fn any_valid_key_can_be_stored_and_nothing_is_left_over() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let long = "s".repeat(300);
    // A file and a directory of the same name, long segments, odd characters: all just keys.
    let keys = ["cx", "cx/y", "cd/z", "cd", "k:", long.as_str(), "a b/ü?x"];
    for key in keys {
        let path = format!("/apps/myapp/objects/{}", key.replace(' ', "%20").replace('?', "%3F"));
        let response = app
            .convox(Method::POST, &path)
            .body(key.as_bytes().to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{key}: {:?}", response.text().await);
    }
    for key in keys {
        let path = format!("/apps/myapp/objects/{}", key.replace(' ', "%20").replace('?', "%3F"));
        let body = app
            .convox(Method::GET, &path)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body.as_ref(), key.as_bytes(), "{key}");
    }
    let files = object_files(&app, "myapp");
    assert_eq!(files.len(), keys.len(), "{files:?}");
    assert!(
        files.iter().all(|f| !f.to_string_lossy().contains('#')),
        "a temp file is left: {files:?}"
    );
    for key in keys {
        let path = format!("/apps/myapp/objects/{}", key.replace(' ', "%20").replace('?', "%3F"));
        assert_eq!(app.convox(Method::DELETE, &path).send().await.unwrap().status(), 200);
    }
    assert_no_files(&app, "myapp").await;
}
