//! The hostile-input corpus: requests, archives, manifests and websocket frames written to
//! break the server. Each gets a clear 4xx (or a failed build with a reason, or a clean close),
//! the server stays healthy (a later request succeeds), and nothing partial is stored: the
//! object store, the tables and the host's files are checked after each group.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{PASSWORD, TestApp, object_files, source_tarball, status_text, wait_for};

/// One hostile request and the status it must get.
struct Case {
    what: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
}

fn case(what: &'static str, method: Method, path: &str, status: u16) -> Case {
    Case {
        what,
        method,
        path: path.to_owned(),
        headers: Vec::new(),
        content_type: None,
        body: Vec::new(),
        status,
    }
}

impl Case {
    fn form(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = Some("application/x-www-form-urlencoded");
        self.body = body.into();
        self
    }

    fn json(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = Some("application/json");
        self.body = body.into();
        self
    }

    fn raw(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Sends `case` on its own connection, as bytes (so paths stay unnormalised and headers may be
/// anything); returns the status and the body's text.
async fn send_raw(app: &TestApp, case: &Case) -> (u16, String) {
    let mut head = format!("{} {} HTTP/1.1\r\nhost: {}\r\n", case.method, case.path, app.addr).into_bytes();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("convox:{PASSWORD}"));
    head.extend_from_slice(format!("authorization: Basic {auth}\r\nconnection: close\r\n").as_bytes());
    if let Some(content_type) = case.content_type {
        head.extend_from_slice(format!("content-type: {content_type}\r\n").as_bytes());
    }
    for (name, value) in &case.headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(format!("content-length: {}\r\n\r\n", case.body.len()).as_bytes());
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    socket.write_all(&head).await.unwrap();
    // A server may answer (413) before it has read the whole body, and close.
    let _ = socket.write_all(&case.body).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{}: no answer within 30 s", case.what))
        .ok();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{}: not an HTTP answer: {answer:?}", case.what));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The rows a hostile request could have left behind.
async fn stored(app: &TestApp) -> Value {
    let counts: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from apps), (select count(*) from objects), (select count(*) from builds),
                (select count(*) from releases), (select count(*) from deployments), (select count(*) from tokens)",
    )
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    serde_json::json!({
        "apps": counts.0,
        "objects": counts.1,
        "builds": counts.2,
        "releases": counts.3,
        "deployments": counts.4,
        "tokens": counts.5,
    })
}

async fn assert_healthy(app: &TestApp) {
    let response = app.convox(Method::GET, "/system").send().await.unwrap();
    assert_eq!(response.status(), 200, "the server is not healthy after the corpus");
}

#[tokio::test]
async fn hostile_requests_get_a_clear_4xx_and_store_nothing() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("target").await.status(), 201);
    let before = stored(&app).await;
    let upload = |what, key: &str| case(what, Method::POST, &format!("/apps/target/objects/{key}"), 400).raw("x");
    let four_mib = 4 * 1024 * 1024;
    let cases = vec![
        // Object keys that try to leave the app's directory, plain and encoded.
        upload("key: raw ..", "../../../escape"),
        upload("key: encoded ..", "..%2F..%2Fescape"),
        upload("key: encoded dots", "%2e%2e/escape"),
        upload("key: inner ..", "a/%2E%2E/b"),
        upload("key: absolute", "%2Fetc%2Fpasswd"),
        upload("key: backslash", "..%5C..%5Cescape"),
        upload("key: NUL", "a%00b"),
        upload("key: newline", "a%0Ab"),
        upload("key: empty segment", "a//b"),
        upload("key: invalid UTF-8", "a%FFb"),
        upload("key: too long", &"k".repeat(1025)),
        // App names.
        case("app: traversal", Method::POST, "/apps", 400).form("name=..%2Fevil"),
        case("app: NUL", Method::POST, "/apps", 400).form("name=evil%00"),
        case("app: newline", Method::POST, "/apps", 400).form("name=evil%0Aname"),
        case("app: unicode", Method::POST, "/apps", 400).form("name=%C3%A9vil"),
        case("app: invalid UTF-8 form", Method::POST, "/apps", 400).form(b"name=ev\xffil".to_vec()),
        case("app: invalid UTF-8 JSON", Method::POST, "/apps", 400).json(b"{\"name\":\"ev\xffil\"}".to_vec()),
        case("app: too long", Method::POST, "/apps", 400).form(format!("name={}", "a".repeat(64))),
        case("app: reserved", Method::POST, "/apps", 400).form("name=rack"),
        case(
            "app: encoded traversal in path",
            Method::GET,
            "/apps/..%2F..%2Fetc/builds",
            404,
        ),
        case("app: raw traversal in path", Method::GET, "/apps/../../etc/passwd", 404),
        case("app: invalid UTF-8 in path", Method::GET, "/apps/%FF/builds", 400),
        // Environments.
        case("env: NUL in a value", Method::POST, "/apps/target/releases", 400).json(r#"{"env":"A=x\u0000y"}"#),
        case("env: NUL in a name", Method::POST, "/apps/target/releases", 400).json(r#"{"env":"A\u0000B=1"}"#),
        case("env: space in a name", Method::POST, "/apps/target/releases", 400).form("env=A+B%3D1"),
        case("env: digit first", Method::POST, "/apps/target/releases", 400).form("env=1A%3Dx"),
        case(
            "env: newline in a name",
            Method::POST,
            "/apps/target/services/web/processes",
            400,
        )
        .header("command", "true")
        .header("environment", "A%0AB=1"),
        case(
            "env: NUL in a run value",
            Method::POST,
            "/apps/target/services/web/processes",
            400,
        )
        .header("command", "true")
        .header("environment", "A=%00"),
        case("parameters: NUL", Method::PUT, "/apps/target", 400).json(r#"{"parameters":{"a":"x\u0000"}}"#),
        case("parameters: newline in a name", Method::PUT, "/apps/target", 400).json(r#"{"parameters":{"a\nb":"x"}}"#),
        // Bodies: huge, deep, of the wrong shape.
        case("JSON: over 4 MiB", Method::POST, "/apps", 413).json(format!(r#"{{"name":"{}"}}"#, "a".repeat(four_mib))),
        case("form: over 4 MiB", Method::POST, "/apps", 413).form(format!("name={}", "a".repeat(four_mib))),
        case("JSON: nested 100 000 deep", Method::POST, "/apps", 400).json(format!(
            r#"{{"name":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        )),
        case("JSON: an array", Method::PUT, "/apps/target", 400).json("[null,null]"),
        case("JSON: null field", Method::PUT, "/apps/target", 400).json(r#"{"lock":null}"#),
        case("JSON: truncated", Method::POST, "/apps", 400).json(r#"{"name":"abc"#),
        case("form: unknown field", Method::POST, "/apps", 400).form("name=ok&admin=true"),
        case("body: not a form", Method::POST, "/apps", 415)
            .header("content-type", "text/yaml")
            .raw("name: x"),
        // Headers.
        case("header: invalid UTF-8", Method::GET, "/apps/target/logs", 400)
            .header("since", b"\xff\xfe".to_vec())
            .header("follow", "false"),
        case("header: huge duration", Method::GET, "/apps/target/logs", 200)
            .header("since", format!("{}h", "9".repeat(400)))
            .header("follow", "false"),
        // A Postgres interval holds microseconds: a finer duration is not a server error.
        case(
            "header: a duration finer than 1 µs",
            Method::GET,
            "/apps/target/logs",
            200,
        )
        .header("since", ".67302167ms")
        .header("follow", "false"),
        // A period of 10^18 seconds is one period, answered at once (it once held a worker).
        case(
            "query: a huge metrics period",
            Method::GET,
            "/apps/target/metrics?period=1045191905853492864",
            200,
        ),
        case("header: an empty flag", Method::GET, "/apps/target/logs", 400)
            .header("prefix", "")
            .header("follow", "false"),
        case("header: bad Last-Event-ID", Method::GET, "/apps/target/logs", 400)
            .header("last-event-id", "1; drop table events")
            .header("follow", "false"),
        case("header: head over 64 KiB", Method::GET, "/system", 431).header("x-filler", "f".repeat(70 * 1024)),
        case("digest: malformed", Method::POST, "/apps/target/objects/a", 400)
            .header("x-checksum-sha256", "zz")
            .raw("x"),
        case("digest: mismatch", Method::POST, "/apps/target/objects/a", 422)
            .header("x-checksum-sha256", "0".repeat(64))
            .raw("x"),
        // Ids that are not ids.
        case("id: SQL", Method::GET, "/apps/target/builds/B'%20OR%20'1'='1", 404),
        case(
            "id: huge",
            Method::GET,
            &format!("/apps/target/releases/R{}", "A".repeat(10_000)),
            404,
        ),
        case("id: not a uuid", Method::DELETE, "/tokens/..%2F..", 404),
    ];
    let mut wrong = Vec::new();
    for case in &cases {
        let (status, body) = send_raw(&app, case).await;
        if status != case.status || (status >= 400 && status != 431 && body.trim().is_empty()) {
            wrong.push(format!("{}: {status} (not {}) {body:.200}", case.what, case.status));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_healthy(&app).await;
    assert_eq!(stored(&app).await, before, "a hostile request left something behind");
    assert!(
        object_files(&app, "target").is_empty(),
        "{:?}",
        object_files(&app, "target")
    );
    let escaped = app.state.config.data_dir.join("objects").join("escape");
    assert!(!escaped.exists());
}

fn tarball(add: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    add(&mut builder);
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// An entry of `kind` named `name` exactly as given (the tar crate's own helpers refuse the
/// names this corpus needs).
fn entry(builder: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: Option<&str>, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        header.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(kind);
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
    }
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

fn file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    entry(builder, tar::EntryType::Regular, name, None, data);
}

#[tokio::test]
async fn hostile_archives_fail_their_build_and_leave_nothing() {
    let app = TestApp::spawn_with(|config| {
        config.source_limits.max_bytes = 1024 * 1024;
        config.source_limits.max_entries = 100;
    })
    .await;
    app.create_app("myapp").await;
    // Targets outside the build directory that an escape would write to.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "original").unwrap();
    let victim_path = victim.to_str().unwrap().to_owned();
    let outside_path = outside.path().to_str().unwrap().to_owned();
    let absolute = format!("{outside_path}/absolute");
    let valid = source_tarball(&[("convox.yml", "services:\n  web:\n    command: true\n")]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("absolute path", tarball(|b| file(b, &absolute, b"x"))),
        ("dot-dot", tarball(|b| file(b, "../evil", b"x"))),
        ("inner dot-dot", tarball(|b| file(b, "a/../../evil", b"x"))),
        (
            "symlink escape",
            tarball(|b| {
                entry(b, tar::EntryType::Symlink, "link", Some(&outside_path), b"");
                file(b, "link/pwned", b"x");
            }),
        ),
        (
            "relative symlink escape",
            tarball(|b| {
                entry(b, tar::EntryType::Symlink, "up", Some("../../../../../../.."), b"");
                file(b, "up/pwned", b"x");
            }),
        ),
        (
            "hardlink escape",
            tarball(|b| {
                entry(b, tar::EntryType::Link, "hard", Some(&victim_path), b"");
                file(b, "hard", b"overwritten");
            }),
        ),
        (
            "device file",
            tarball(|b| entry(b, tar::EntryType::Char, "null", None, b"")),
        ),
        ("fifo", tarball(|b| entry(b, tar::EntryType::Fifo, "pipe", None, b""))),
        ("truncated gzip", valid[..valid.len() / 2].to_vec()),
        ("not gzip", b"PK\x03\x04 this is a zip, not a tarball".to_vec()),
        (
            "gzip bomb",
            // 16 MiB of zeros in about 16 KiB: a ratio of 1000, over the 1 MiB limit.
            tarball(|b| file(b, "zeros", &vec![0u8; 16 * 1024 * 1024])),
        ),
        (
            "too many entries",
            tarball(|b| {
                for i in 0..500 {
                    file(b, &format!("f{i}"), b"");
                }
            }),
        ),
    ];
    for (what, archive) in cases {
        let key = format!("hostile/{}", what.replace(' ', "-"));
        assert_eq!(app.upload("myapp", &key, archive).await.status(), 200, "{what}");
        let id = app.create_build("myapp", &key).await["id"].as_str().unwrap().to_owned();
        let build = app.wait_build("myapp", &id).await;
        assert_eq!(build["status"], "failed", "{what}");
        let reason = build["reason"].as_str().unwrap();
        assert!(reason.starts_with("invalid source archive"), "{what}: {reason}");
        // What it unpacked before it was refused goes at once.
        let dir = app.build_dir("myapp", &id);
        wait_for(10, "the failed build's directory to go", || async {
            (!dir.exists()).then_some(())
        })
        .await;
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    let escaped: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(escaped, vec![std::ffi::OsString::from("victim")]);
    let data = &app.state.config.data_dir;
    for name in ["evil", "builds/evil", "builds/myapp/evil"] {
        assert!(!data.join(name).exists(), "{name}");
    }
    assert!(!data.parent().unwrap().join("evil").exists());
    let releases: Vec<Value> = app.get_json("/apps/myapp/releases").await;
    assert!(releases.is_empty(), "a refused archive made a release: {releases:?}");
    assert_healthy(&app).await;
}

#[tokio::test]
async fn hostile_manifests_fail_fast_and_never_stall_the_api() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    // 100 000 levels of nesting in 300 bytes of gzip, built twice at once.
    let deep = format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let first = app.build_source("myapp", &[("convox.yml", &deep)]).await;
    let second = app.build_source("myapp", &[("convox.yml", &deep)]).await;
    for _ in 0..20 {
        let asked = std::time::Instant::now();
        assert_eq!(app.convox(Method::GET, "/system").send().await.unwrap().status(), 200);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "GET /system took {:?}",
            asked.elapsed()
        );
    }
    for id in [first, second] {
        let build = app.wait_build("myapp", &id).await;
        let reason = build["reason"].as_str().unwrap();
        assert!(reason.contains("nested more than 100 levels"), "{reason}");
    }
    // A billion laughs: nine levels of aliases, each ten of the one before.
    let mut laughs =
        String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (name, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
    {
        laughs.push_str(&format!(
            "{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    laughs.push_str("services:\n  web:\n    command: true\n");
    let cases = [
        (laughs.as_str(), "convox.yml: repetition limit exceeded"),
        (
            "services:\n  we\0b:\n    build:\n      command: true\n",
            "NUL characters are not allowed",
        ),
        (
            "services:\n  web:\n    scale:\n      count: 4294967295\n",
            "more than the 1000 processes",
        ),
        ("services: !!binary aGVsbG8=\n", "convox.yml: "),
        ("\u{feff}services:\n  web:\n    command: [\n", "convox.yml: "),
    ];
    for (manifest, expected) in cases {
        let id = app.build_source("myapp", &[("convox.yml", manifest)]).await;
        let started = std::time::Instant::now();
        let build = app.wait_build("myapp", &id).await;
        assert_eq!(build["status"], "failed", "{manifest:.60}");
        let reason = build["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{reason}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
    let releases: Vec<Value> = app.get_json("/apps/myapp/releases").await;
    assert!(releases.is_empty(), "a refused manifest made a release: {releases:?}");
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_websocket_frame_over_the_limit_closes_only_its_connection() {
    let app = TestApp::spawn().await;
    app.create_app("myapp").await;
    let mut request = format!("ws://{}/apps/myapp/logs", app.addr)
        .into_client_request()
        .unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("convox:{PASSWORD}"));
    request
        .headers_mut()
        .insert("authorization", format!("Basic {auth}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    // A log stream's client sends control frames only: 2 MiB of text is over its 64 KiB.
    let _ = socket.send(Message::Text("x".repeat(2 * 1024 * 1024).into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open after an oversized frame");
    assert_healthy(&app).await;
    let (status, _) = status_text(
        app.convox(Method::GET, "/apps/myapp/logs")
            .header("follow", "false")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
}
