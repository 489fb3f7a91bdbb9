//! HTTPS on the API, over real sockets and real TLS: the self-signed certificate of the data
//! directory, clients that pin its fingerprint (and one that pins another), the `rack` CLI
//! pinning and trusting on first use, a certificate replaced on disk while the server runs,
//! and the listener's limits (a slow handshake, a slow request, the unauthenticated cap) with
//! TLS on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{PASSWORD, TestApp, fresh_database, wait_for};
use rack::config::Tls;
use rack::tls::{Trust, Verifier};

/// A server with TLS on, its certificate self-signed in its data directory.
async fn https_app(change: impl FnOnce(&mut rack::config::Config)) -> TestApp {
    TestApp::spawn_with(|config| {
        config.tls = Tls::SelfSigned;
        change(config);
    })
    .await
}

/// The fingerprint of the certificate in `app`'s data directory.
fn file_fingerprint(app: &TestApp) -> String {
    let files = rack::tls::self_signed_files(&app.state.config.data_dir);
    rack::tls::Tls::from_files(files).unwrap().fingerprint()
}

/// A client that accepts only the certificate `pinned`, and its verifier (which says why it
/// refused one).
fn pinned_client(pinned: &str) -> (reqwest::Client, Arc<Verifier>) {
    let verifier = Arc::new(Verifier::new(Trust::Pinned(
        rack::tls::parse_fingerprint(pinned).unwrap(),
    )));
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(verifier.client_config())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    (client, verifier)
}

fn https(app: &TestApp, path: &str) -> String {
    format!("https://{}{path}", app.addr)
}

/// Accepts any certificate and records the fingerprint of the one it saw.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<String>>);

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(rack::tls::fingerprint(end_entity.as_ref()));
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection to `addr` that accepts whatever certificate it is shown; with the
/// fingerprint of that certificate.
async fn tls_connect(
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String)> {
    let recorder = Arc::new(Recorder::default());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let seen = recorder.0.lock().unwrap().clone().expect("a certificate was shown");
    Ok((stream, seen))
}

/// Reads what the server sends until it closes the connection (at most 10 s).
async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_pinned_client_is_served_over_https_and_another_pin_is_refused() {
    let app = https_app(|_| {}).await;
    let fingerprint = file_fingerprint(&app);
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");

    let (client, _) = pinned_client(&fingerprint);
    let created = client
        .post(https(&app, "/apps"))
        .basic_auth("convox", Some(PASSWORD))
        .form(&[("name", "secure")])
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let apps: Vec<serde_json::Value> = client
        .get(https(&app, "/apps"))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(apps[0]["name"], "secure");

    // A client pinning another certificate does not get past the handshake.
    let other = rack::tls::format_fingerprint(&[7; 32]);
    let (client, verifier) = pinned_client(&other);
    let error = client
        .get(https(&app, "/apps"))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    let refusal = verifier.refusal().expect("the verifier says why");
    assert!(refusal.contains(&fingerprint) && refusal.contains(&other), "{refusal}");

    // The harness's own client pins the certificate too.
    assert_eq!(app.convox(Method::GET, "/system").send().await.unwrap().status(), 200);
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/system", app.addr))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test]
async fn the_certificate_is_kept_across_restarts() {
    let app = https_app(|_| {}).await;
    let first = file_fingerprint(&app);
    let app = app.restart().await;
    assert_eq!(file_fingerprint(&app), first);
    let (_, seen) = tls_connect(app.addr).await.unwrap();
    assert_eq!(seen, first);
    let key = rack::tls::self_signed_files(&app.state.config.data_dir).key;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// `rack server` with `RACK_TLS=on` prints the fingerprint of the certificate it serves, and
/// the URL to connect with says https.
#[tokio::test]
async fn rack_server_prints_its_certificate_fingerprint() {
    use tokio::io::AsyncBufReadExt;
    let database = fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .arg("server")
        .env("RACK_BIND", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &database)
        .env("RACK_PASSWORD", PASSWORD)
        .env("RACK_DATA", data.path())
        .env("RACK_TLS", "on")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        // Printed beside the connect lines, on stdout (the logs go to stderr).
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let printed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(fingerprint) = line.strip_prefix("rack: certificate fingerprint ") {
                return fingerprint.to_owned();
            }
        }
        panic!("rack server exited without printing its fingerprint");
    })
    .await
    .expect("the fingerprint is printed within 60 s");
    let files = rack::tls::self_signed_files(data.path());
    assert_eq!(printed, rack::tls::Tls::from_files(files).unwrap().fingerprint());
    let (client, _) = pinned_client(&printed);
    let answer = wait_for(60, "the server to answer over https", || async {
        let response = client
            .get(format!("https://127.0.0.1:{port}/system"))
            .basic_auth("convox", Some(PASSWORD))
            .send()
            .await
            .ok()?;
        Some(response.status())
    })
    .await;
    assert_eq!(answer, 200);
    server.kill().await.unwrap();
}

/// The outcome of one run of the CLI.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the `rack` CLI against `app` over https, with `home` as its home and configuration
/// directory, and `env` on top.
async fn rack_cli(app: &TestApp, home: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"));
    command
        .args(args)
        .env("RACK_URL", format!("https://convox:{PASSWORD}@{}", app.addr))
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("RACK_FINGERPRINT")
        .env_remove("RACK_DATA")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the CLI finishes within 60 s")
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Replaces the certificate files in `app`'s data directory with a new pair, each file
/// written aside and renamed over the old one; returns the new fingerprint.
fn replace_certificate(app: &TestApp) -> String {
    let files = rack::tls::self_signed_files(&app.state.config.data_dir);
    let other = tempfile::tempdir().unwrap();
    let (new, _) = rack::tls::ensure_self_signed(other.path(), app.addr).unwrap();
    for (from, to) in [(&new.key, &files.key), (&new.cert, &files.cert)] {
        let aside = to.with_extension("swap");
        std::fs::copy(from, &aside).unwrap();
        std::fs::rename(&aside, to).unwrap();
    }
    rack::tls::Tls::from_files(new).unwrap().fingerprint()
}

/// Waits until a new connection to `app` is shown the certificate `fingerprint`.
async fn wait_for_certificate(app: &TestApp, fingerprint: &str) {
    wait_for(15, "new connections to get the new certificate", || async {
        let (_, seen) = tls_connect(app.addr).await.ok()?;
        (seen == fingerprint).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_cli_pins_the_fingerprint_or_trusts_on_first_use_and_refuses_a_changed_certificate() {
    let app = https_app(|_| {}).await;
    assert_eq!(app.state.config.tls, Tls::SelfSigned);
    let fingerprint = file_fingerprint(&app);
    let home = tempfile::tempdir().unwrap();
    let known = home.path().join("config/rack/known_racks");

    // Pinned: RACK_FINGERPRINT, in the server's spelling or as plain hex.
    let run = rack_cli(
        &app,
        home.path(),
        &[("RACK_FINGERPRINT", &fingerprint)],
        &["apps", "create", "pinned"],
    )
    .await;
    assert_eq!((run.code, run.stderr.as_str()), (0, "Creating pinned... OK\n"));
    let hex = fingerprint
        .trim_start_matches("SHA256:")
        .replace(':', "")
        .to_lowercase();
    let run = rack_cli(&app, home.path(), &[("RACK_FINGERPRINT", &hex)], &["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("pinned"), "{}", run.stdout);
    assert!(!known.exists(), "a pinned fingerprint saves nothing");

    // Pinned to another certificate: refused, naming both.
    let other = rack::tls::format_fingerprint(&[9; 32]);
    let run = rack_cli(&app, home.path(), &[("RACK_FINGERPRINT", &other)], &["apps"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.starts_with("ERROR: "), "{}", run.stderr);
    assert!(
        run.stderr.contains(&fingerprint) && run.stderr.contains(&other),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());

    // Trust on first use: the first connection saves the fingerprint and says so.
    let run = rack_cli(&app, home.path(), &[], &["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("pinned"), "{}", run.stdout);
    assert!(run.stderr.contains("first connection"), "{}", run.stderr);
    assert!(run.stderr.contains(&fingerprint), "{}", run.stderr);
    let saved = std::fs::read_to_string(&known).unwrap();
    assert_eq!(saved, format!("127.0.0.1:{} {fingerprint}\n", app.addr.port()));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&known).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let run = rack_cli(&app, home.path(), &[], &["apps"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "the second time is silent");

    // The certificate changes under the CLI: refused, naming both fingerprints and the fix.
    let new = replace_certificate(&app);
    wait_for_certificate(&app, &new).await;
    let run = rack_cli(&app, home.path(), &[], &["apps"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("has changed"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&fingerprint) && run.stderr.contains(&new),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&known.display().to_string()), "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(&known).unwrap(),
        saved,
        "nothing is overwritten"
    );
    // Pinning the new one is the way through.
    let run = rack_cli(&app, home.path(), &[("RACK_FINGERPRINT", &new)], &["apps"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let app = https_app(|_| {}).await;
    let first = file_fingerprint(&app);
    // A connection opened before the change keeps working.
    let (client, _) = pinned_client(&first);
    let response = client
        .get(https(&app, "/system"))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let second = replace_certificate(&app);
    wait_for_certificate(&app, &second).await;
    let (client, _) = pinned_client(&second);
    let response = client
        .get(https(&app, "/system"))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn slow_handshakes_and_slow_requests_over_tls_are_cut_off() {
    let app = https_app(|config| config.listener.header_timeout = Duration::from_secs(1)).await;

    // A client that opens a connection and never starts its handshake.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(read_until_closed(&mut silent).await, "");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A client that starts its handshake and stalls halfway through its ClientHello.
    let started = Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    let _ = read_until_closed(&mut stalled).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // After the handshake, a slow-loris request gets its 408, through TLS.
    let (mut slow, _) = tls_connect(app.addr).await.unwrap();
    let sender = async {
        for byte in b"GET /system HTTP/1.1\r\nHost: rack\r\n" {
            if slow.write_all(&[*byte]).await.is_err() || slow.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), sender).await;
    let answer = read_until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    // The server still serves.
    let (client, _) = pinned_client(&file_fingerprint(&app));
    let response = client
        .get(https(&app, "/system"))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unauthenticated_tls_connections_make_room_for_a_client() {
    let app = https_app(|config| config.listener.max_unauthenticated = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_connect(app.addr).await.unwrap().0);
    }
    // A client that authenticates is served at once: the oldest held connection made room.
    let (client, _) = pinned_client(&file_fingerprint(&app));
    let response = client
        .get(https(&app, "/system"))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut held[0]))
        .await
        .expect("the oldest connection is closed");
    assert!(answer.is_empty(), "{answer:?}");
}

/// `rack run` attaches through the exec websocket: over https, `wss` with the same pinning.
#[tokio::test]
async fn rack_run_attaches_over_wss() {
    let app = https_app(|_| {}).await;
    crate::run::running_app(&app, "myapp").await;
    let fingerprint = app.fingerprint.clone().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(["run", "-a", "myapp", "web", "cat"])
        .env("RACK_URL", format!("https://convox:{PASSWORD}@{}", app.addr))
        .env("RACK_FINGERPRINT", &fingerprint)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"select 1\n").await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI finishes")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        (out.status.code(), stdout.as_ref()),
        (Some(0), "select 1\n"),
        "{stderr}"
    );
}
