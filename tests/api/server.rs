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

/// A supervisor restarting rack at once after `kill -9` finds the old embedded postmaster still
/// shutting down; rack waits for it instead of failing on its lock file.
#[tokio::test]
async fn a_restart_right_after_kill_9_reuses_the_embedded_cluster() {
    let data = crate::helpers::reachable_tempdir();
    let mut rack = crate::replicas::Replica::start_embedded(data.path()).await;
    let created = rack
        .request(Method::POST, "/apps")
        .form(&[("name", "survivor")])
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    for _ in 0..3 {
        rack.kill_9().await;
        rack = crate::replicas::Replica::start_embedded(data.path()).await;
        let app = rack.request(Method::GET, "/apps/survivor").send().await.unwrap();
        assert_eq!(app.status(), 200);
    }
}

/// Reads what the server sends until it closes the connection (at most 10 s).
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn slow_idle_and_oversized_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(|config| {
        config.listener.header_timeout = std::time::Duration::from_secs(1);
        config.listener.max_header_bytes = 4096;
    })
    .await;
    // A slow-loris client: one byte of its request head at a time.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = std::time::Instant::now();
    let sender = async {
        for byte in b"GET /system HTTP/1.1\r\nHost: rack\r\n" {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), sender).await;
    let answer = read_until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("did not arrive within 1s"), "{answer:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    // A connection that never says anything is closed, silently.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(read_until_closed(&mut idle).await, "");

    // A keep-alive connection is closed once idle, after answering in full.
    let mut kept = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    kept.write_all(b"GET /system HTTP/1.1\r\nHost: rack\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut kept).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");

    let huge = format!(
        "GET /system HTTP/1.1\r\nHost: rack\r\nX-Big: {}\r\n\r\n",
        "x".repeat(8192)
    );
    let mut big = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    big.write_all(huge.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // The server still serves.
    assert_eq!(app.convox(Method::GET, "/system").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn connections_that_never_authenticate_cannot_shut_out_a_client() {
    use tokio::io::AsyncReadExt;
    let app = TestApp::spawn_with(|config| config.listener.max_unauthenticated = 20).await;
    // Someone on the same address (an app process on 127.0.0.1) holds every slot, in order.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    // The admin's client is served at once, on a connection of its own...
    let response = app.convox(Method::GET, "/system").send().await.unwrap();
    assert_eq!(response.status(), 200);
    // ...which took the place of the oldest held one: that one is closed, unanswered, so the
    // address still holds at most 20 that never authenticated.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), held[0].read(&mut byte))
        .await
        .expect("the oldest connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The newest held connections stay open.
    let still = tokio::time::timeout(std::time::Duration::from_millis(200), held[19].read(&mut byte)).await;
    assert!(still.is_err(), "the newest held connection was closed too: {still:?}");
}

#[tokio::test]
async fn too_many_headers_get_431_not_a_reset() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn().await;
    // 5 000 headers of 1 KiB: far over the count a parser keeps room for and over
    // RACK_MAX_HEADER_BYTES (64 KiB), so the server answers long before it has read them all,
    // while the client is still sending.
    let value = reqwest::header::HeaderValue::from_str(&"v".repeat(1024)).unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for i in 0..5000 {
        headers.insert(
            reqwest::header::HeaderName::try_from(format!("x-h{i}")).unwrap(),
            value.clone(),
        );
    }
    for _ in 0..3 {
        let response = app
            .convox(Method::GET, "/system")
            .headers(headers.clone())
            .send()
            .await
            .expect("an answer, not a reset");
        assert_eq!(response.status(), 431);
    }
    let mut head = String::from("POST /apps HTTP/1.1\r\nHost: rack\r\n");
    for i in 0..5000 {
        head.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(1024)));
    }
    head.push_str("\r\n");
    let mut raw = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // The server answers before it has read all of it, but reads the rest before it closes:
    // closing with unread data would reset the connection under a client still sending (its
    // write fails, and the answer is lost with it).
    raw.write_all(head.as_bytes())
        .await
        .expect("the whole request is read, not reset");
    let answer = read_until_closed(&mut raw).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // The server still serves.
    assert_eq!(app.convox(Method::GET, "/system").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_generated_password_is_printed_on_stdout_never_with_the_logs() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let data = crate::helpers::reachable_tempdir();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .arg("server")
        .env("RACK_BIND", "127.0.0.1:0")
        .env("RACK_DATA", data.path())
        .env_remove("RACK_PASSWORD")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("rack: connect with RACK_URL=") {
                return url.to_owned();
            }
        }
        panic!("stdout ended without the connect line");
    })
    .await
    .expect("the connect line within 60 s");
    let password = std::fs::read_to_string(data.path().join("password"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(url.contains(&password), "{url}");
    let address = url.rsplit('@').next().unwrap().to_owned();
    let client = reqwest::Client::new();
    crate::helpers::wait_for(60, "the server to answer", || async {
        let response = client
            .get(format!("http://{address}/system"))
            .basic_auth("", Some(&password))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    child.kill().await.unwrap();
    let logs = tokio::time::timeout(std::time::Duration::from_secs(30), logs)
        .await
        .expect("stderr closes once the server is gone")
        .unwrap();
    assert!(!logs.is_empty(), "the server logs to stderr");
    assert!(!logs.contains(&password), "the password is in the logs: {logs}");
}
