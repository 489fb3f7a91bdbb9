//! The test harness: `TestApp::spawn()` starts a server on port 0 with a fresh database cloned
//! from a migrated template (in the process's cluster, a copy of `seed`'s), plus one helper per
//! endpoint.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use rack::config::{Config, Database};
use rack::postgres::{Cluster, Durability};
use reqwest::{Method, RequestBuilder, Response};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::seed;

pub const PASSWORD: &str = "test-password";

/// Tracing output only when TEST_LOG is set, initialised once.
static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("TEST_LOG").is_some() {
        rack::telemetry::init(rack::config::LogFormat::Compact, "info,rack=debug");
    }
});

/// The process's private cluster. It is never dropped: the cluster stops (and its directory
/// goes) when the test process exits and closes the watchdog's pipe.
static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// How many of the seed's ready databases were handed out: the first fresh databases a
/// process asks for are these, with no clone to wait for.
static READY_TAKEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn cluster() -> &'static Cluster {
    // reqwest needs a crypto provider installed before any client is built; every test
    // comes here (or through `reachable_tempdir`) before it builds one.
    rack::tls::install_provider();
    CLUSTER.get_or_init(|| {
        let started = std::time::Instant::now();
        let seed = seed::seed_cluster().expect("making the seed of the test clusters");
        let seeded = started.elapsed();
        let root = std::env::temp_dir().join(format!("rack-test-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir(&root).expect("creating the test cluster's directory");
        seed::copy_tree(&seed.join("data"), &root.join("data")).expect("copying the seed cluster");
        let copied = started.elapsed();
        let cluster = Cluster::start(&root, Durability::Ephemeral).expect("starting the test cluster");
        // Shown with --nocapture: what the first tests of a run waited for.
        eprintln!(
            "test cluster started in {:?} (finding or making its seed {} {seeded:?}, copying it {:?})",
            started.elapsed(),
            seed.display(),
            copied - seeded
        );
        cluster
    })
}

/// A temp directory that other users may pass through (mode 0711), as the embedded cluster's
/// `postgres` user and the sandbox user must when the tests run as root.
pub fn reachable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    rack::tls::install_provider();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    dir
}

/// A fresh, migrated database; returns its URL.
pub async fn fresh_database() -> String {
    let cluster = cluster();
    let ready = READY_TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if ready < seed::READY_DATABASES {
        return cluster.url(&seed::ready_database(ready));
    }
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect_with(&cluster.connect_options("postgres"))
        .await
        .expect("connecting to the test cluster");
    rack::store::create_database_from(&mut conn, &name, seed::TEMPLATE)
        .await
        .expect("cloning the template database");
    conn.close().await.expect("closing");
    cluster.url(&name)
}

/// Migrated databases given back by the tests done with them, for the next to reuse: cloning one
/// costs a few hundred milliseconds on a loaded machine, more than a driver test itself.
static SPARE_DATABASES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// A migrated database this test has to itself, and with no apps (so no jobs to claim), until
/// the guard drops: a spare one emptied, or a fresh clone when none is spare. As many are made
/// as tests run at once, not one per test.
pub async fn reused_database() -> ReusedDatabase {
    let spare = SPARE_DATABASES.lock().unwrap().pop();
    let Some(url) = spare else {
        return ReusedDatabase(fresh_database().await);
    };
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .expect("connecting to a spare database");
    // The previous holder's server is gone with its test, but its connections may linger: end
    // them, so nothing of it writes here any more. Everything a test makes hangs off its app.
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity
          where datname = current_database() and pid <> pg_backend_pid()",
    )
    .execute(&mut conn)
    .await
    .expect("ending the previous holder's connections");
    sqlx::query("delete from apps")
        .execute(&mut conn)
        .await
        .expect("emptying a spare database");
    conn.close().await.expect("closing");
    ReusedDatabase(url)
}

/// A database of `reused_database`; its URL. It becomes spare again when dropped.
pub struct ReusedDatabase(String);

impl ReusedDatabase {
    pub fn url(&self) -> &str {
        &self.0
    }
}

impl Drop for ReusedDatabase {
    fn drop(&mut self) {
        SPARE_DATABASES.lock().unwrap().push(std::mem::take(&mut self.0));
    }
}

/// A fresh database with no tables at all (not migrated); returns its URL.
pub async fn empty_database() -> String {
    let cluster = cluster();
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect_with(&cluster.connect_options("postgres"))
        .await
        .expect("connecting to the test cluster");
    rack::store::create_database_from(&mut conn, &name, seed::PRISTINE)
        .await
        .expect("creating an empty database");
    conn.close().await.expect("closing");
    cluster.url(&name)
}

/// Sends `request` and decodes its JSON body (any status: the caller asserts on the body).
pub async fn send_json(request: RequestBuilder) -> serde_json::Value {
    let response = request.send().await.expect("sending the request");
    response.json().await.expect("a JSON body")
}

/// A running server.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub state: rack::AppState,
    /// A client of this server: over https (pinning its certificate) when it serves TLS.
    pub client: reqwest::Client,
    /// The fingerprint of the server's certificate, when it serves TLS.
    pub fingerprint: Option<String>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: Option<tempfile::TempDir>,
}

impl TestApp {
    /// A server on a fresh database.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// A server on a fresh database, with the test's changes to the configuration.
    pub async fn spawn_with(change: impl FnOnce(&mut Config)) -> Self {
        let url = fresh_database().await;
        Self::spawn_on(&url, change).await
    }

    /// Another server (a replica) on the database at `url`, with a data directory of its own.
    pub async fn spawn_on(url: &str, change: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().expect("a temp dir");
        let mut config = Config::for_tests(data.path().to_path_buf(), Database::Url(url.to_owned()), PASSWORD);
        change(&mut config);
        let mut app = Self::start(config).await;
        app._data = Some(data);
        app
    }

    /// The URL of this server's database (to start replicas on it).
    pub fn database_url(&self) -> String {
        match &self.state.config.database {
            Database::Url(url) => url.clone(),
            Database::Embedded => panic!("an embedded database is private to its server"),
        }
    }

    /// A server with the given configuration (its data directory is the caller's).
    pub async fn start(mut config: Config) -> Self {
        LazyLock::force(&TRACING);
        // The server runs in this test binary: its helpers (the resource forwarder) are `rack`'s.
        config.program = std::path::PathBuf::from(env!("CARGO_BIN_EXE_rack"));
        Self::start_built(rack::Application::build(config).await.expect("building the server")).await
    }

    /// Serves an application built by the test.
    pub async fn start_built(app: rack::Application) -> Self {
        LazyLock::force(&TRACING);
        rack::tls::install_provider();
        let addr = app.local_addr();
        let state = app.state().clone();
        let fingerprint = app.tls_fingerprint();
        let stop = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone()));
        let client = client_builder(fingerprint.as_deref())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a client");
        Self {
            addr,
            state,
            client,
            fingerprint,
            stop,
            server,
            _data: None,
        }
    }

    /// Stops the server and starts it again with the same configuration and data directory.
    pub async fn restart(mut self) -> Self {
        let data = self._data.take();
        let config = self.state.config.clone();
        self.stop().await;
        let mut app = Self::start(config).await;
        app._data = data;
        app
    }

    /// Stops the server and waits until it has stopped (and its embedded cluster with it).
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.server)
            .await
            .expect("the server stops within 60 s")
            .expect("the server task")
            .expect("the server stops cleanly");
    }

    /// A client of this server without the harness client's time limit (for long streams).
    pub fn untimed_client(&self) -> reqwest::Client {
        client_builder(self.fingerprint.as_deref()).build().expect("a client")
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.fingerprint.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// A request with the rack password and no Accept header (as curl sends it).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth("convox", Some(PASSWORD))
    }

    /// A request as the convox CLI sends it: `Accept: */*`, form bodies.
    pub fn convox(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path)
            .header("accept", "*/*")
            .header("version", "dev")
    }

    /// A request that asks for JSON.
    pub fn json(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path).header("accept", "application/json")
    }

    /// `GET path` as a JSON client, decoded.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let response = self.json(Method::GET, path).send().await.expect("GET");
        response.json().await.expect("a JSON body")
    }

    /// `GET path` (no Accept header, as curl sends it): the text body, whatever the status.
    pub async fn get_text(&self, path: &str) -> String {
        let response = self.request(Method::GET, path).send().await.expect("GET");
        response.text().await.expect("a text body")
    }

    /// `GET path` asking for `text/plain` (a log as lines): the text body.
    pub async fn get_plain(&self, path: &str) -> String {
        let request = self.request(Method::GET, path).header("accept", "text/plain");
        request.send().await.expect("GET").text().await.expect("a text body")
    }

    /// [`TestApp::get_text`], or `None` when the request fails (for a check that polls).
    pub async fn try_get_text(&self, path: &str) -> Option<String> {
        self.request(Method::GET, path).send().await.ok()?.text().await.ok()
    }

    /// Waits (up to `secs`) until the rack's feed has an event of `kind` that mentions `needle`.
    pub async fn wait_for_feed(&self, kind: &str, needle: &str, secs: u64) {
        let path = format!("/events?after=0&follow=false&kind={kind}");
        wait_for(secs, &format!("{needle:?} in the feed's {kind} events"), || async {
            self.try_get_text(&path).await?.contains(needle).then_some(())
        })
        .await;
    }

    /// The status of `method path` (with the rack password, no body).
    pub async fn status_of(&self, method: Method, path: &str) -> u16 {
        let response = self.request(method, path).send().await.expect("a request");
        response.status().as_u16()
    }

    /// The status of `HEAD path`.
    pub async fn head_status(&self, path: &str) -> u16 {
        self.convox(Method::HEAD, path)
            .send()
            .await
            .expect("HEAD")
            .status()
            .as_u16()
    }

    pub async fn create_app(&self, name: &str) -> Response {
        self.convox(Method::POST, "/apps")
            .form(&[("name", name)])
            .send()
            .await
            .expect("POST /apps")
    }

    pub async fn get_app(&self, name: &str) -> Response {
        self.convox(Method::GET, &format!("/apps/{name}"))
            .send()
            .await
            .expect("GET /apps/{name}")
    }

    pub async fn update_app(&self, name: &str, form: &[(&str, &str)]) -> Response {
        self.convox(Method::PUT, &format!("/apps/{name}"))
            .form(form)
            .send()
            .await
            .expect("PUT /apps/{name}")
    }

    pub async fn delete_app(&self, name: &str) -> Response {
        self.convox(Method::DELETE, &format!("/apps/{name}"))
            .send()
            .await
            .expect("DELETE /apps/{name}")
    }

    pub async fn list_apps(&self) -> Vec<serde_json::Value> {
        let response = self.convox(Method::GET, "/apps").send().await.expect("GET /apps");
        assert_eq!(response.status(), 200);
        response.json().await.expect("a JSON list")
    }
}

/// A client builder that, given a server's certificate fingerprint, pins it.
fn client_builder(fingerprint: Option<&str>) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    let Some(fingerprint) = fingerprint else {
        return builder;
    };
    let pinned = rack::tls::parse_fingerprint(fingerprint).expect("a fingerprint");
    let verifier = std::sync::Arc::new(rack::tls::Verifier::new(rack::tls::Trust::Pinned(pinned)));
    builder.tls_backend_preconfigured(verifier.client_config())
}

/// The status and text body of a response.
pub async fn status_text(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    (status, response.text().await.expect("a text body"))
}

/// The text body of a plain `GET url` (an app's router, say), or `None` when it fails (for a
/// check that polls).
pub async fn try_fetch_text(url: impl reqwest::IntoUrl) -> Option<String> {
    reqwest::get(url).await.ok()?.text().await.ok()
}

/// Waits until `check` returns `Some`, polling every 20 ms, for at most `secs` seconds.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestApp {
    /// Uploads `body` as `key` of `app`.
    pub async fn upload(&self, app: &str, key: &str, body: Vec<u8>) -> Response {
        self.convox(Method::POST, &format!("/apps/{app}/objects/{key}"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("POST object")
    }

    /// Queues a build of the uploaded `key`; returns the build JSON.
    pub async fn create_build(&self, app: &str, key: &str) -> serde_json::Value {
        let response = self
            .convox(Method::POST, &format!("/apps/{app}/builds"))
            .form(&[
                ("url", format!("object://{app}/{key}")),
                ("description", "test build".to_owned()),
            ])
            .send()
            .await
            .expect("POST build");
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        response.json().await.expect("build JSON")
    }

    pub async fn get_build(&self, app: &str, id: &str) -> serde_json::Value {
        let response = self
            .json(Method::GET, &format!("/apps/{app}/builds/{id}"))
            .send()
            .await
            .expect("GET build");
        assert_eq!(response.status(), 200);
        response.json().await.expect("build JSON")
    }

    /// Waits (up to 60 s) until the build has ended; returns it.
    pub async fn wait_build(&self, app: &str, id: &str) -> serde_json::Value {
        // Image builds take turns on podman's image store: with the whole suite's builds
        // beside it on a loaded 2-core machine, one may wait well over a minute.
        wait_for(180, "the build to end", || async {
            let build = self.get_build(app, id).await;
            matches!(build["status"].as_str(), Some("complete" | "failed")).then_some(build)
        })
        .await
    }

    /// Packs `files` (path, content, executable) with a convox.yml into a source tarball,
    /// uploads it and queues a build of it; returns the build id.
    pub async fn build_source(&self, app: &str, files: &[(&str, &str)]) -> String {
        let tarball = source_tarball(files);
        let key = format!("src/{}.tgz", uuid::Uuid::new_v4().simple());
        assert_eq!(self.upload(app, &key, tarball).await.status(), 200);
        self.create_build(app, &key).await["id"]
            .as_str()
            .expect("an id")
            .to_owned()
    }

    /// Builds `files` as the next release of `app` (the build must complete); the release id.
    pub async fn build_release(&self, app: &str, files: &[(&str, &str)]) -> String {
        self.build_complete(app, files).await.1
    }

    /// Builds `files` as the next release of `app` (the build must complete); the build's id
    /// and the release's.
    pub async fn build_complete(&self, app: &str, files: &[(&str, &str)]) -> (String, String) {
        let id = self.build_source(app, files).await;
        let build = self.wait_build(app, &id).await;
        assert_eq!(build["status"], "complete", "{build}");
        (id, build["release"].as_str().expect("a release").to_owned())
    }

    /// Promotes `release` of `app` without following the rollout; the promote must be accepted.
    pub async fn promote(&self, app: &str, release: &str) {
        let path = format!("/apps/{app}/releases/{release}/promote");
        let response = self.json(Method::POST, &path).send().await.expect("POST promote");
        let (status, text) = status_text(response).await;
        assert!((200..300).contains(&status), "{status} {text}");
    }

    /// Builds `files` and promotes the release, following the rollout to its end (which must
    /// be `OK`); the release id and the rollout log.
    pub async fn deploy_files(&self, app: &str, files: &[(&str, &str)]) -> (String, String) {
        let release = self.build_release(app, files).await;
        let log = crate::deploys::promote_follow(self, app, &release).await;
        assert!(log.ends_with("OK\n"), "{log}");
        (release, log)
    }

    /// Scales `service` of `app` to `count` and follows the deployment that applies it to its
    /// end; the deployment's log.
    pub async fn scale_follow(&self, app: &str, service: &str, count: u32) -> String {
        let scale = self
            .json(Method::PUT, &format!("/apps/{app}/services/{service}"))
            .form(&[("count", count.to_string())])
            .send()
            .await
            .expect("PUT service");
        assert_eq!(scale.status(), 202);
        let location = scale.headers()["location"].to_str().expect("a location").to_owned();
        self.request(Method::GET, &format!("{location}/events"))
            .send()
            .await
            .expect("GET deployment events")
            .text()
            .await
            .expect("the deployment's log")
    }

    /// The app's whole log so far (not following); empty when it cannot be read right now.
    pub async fn app_log(&self, app: &str) -> String {
        self.read_app_log(app, false).await
    }

    /// The app's log so far, each line after its stream's name when `prefixed`.
    pub async fn read_app_log(&self, app: &str, prefixed: bool) -> String {
        let response = self
            .request(Method::GET, &format!("/apps/{app}/logs"))
            .header("follow", "false")
            .header("since", "0")
            .header("prefix", prefixed.to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match response {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits (up to `secs`) until the app's log (each line after its stream's name) holds
    /// `needle`; returns that log.
    pub async fn wait_for_log_line(&self, app: &str, needle: &str, secs: u64) -> String {
        wait_for(secs, &format!("{needle:?} in the log of {app}"), || async {
            let log = self.read_app_log(app, true).await;
            log.contains(needle).then_some(log)
        })
        .await
    }

    /// The build directory of build `id` of `app`: its sandbox's only view of the host.
    pub fn build_dir(&self, app: &str, id: &str) -> std::path::PathBuf {
        self.state.config.data_dir.join("builds").join(app).join(id)
    }

    /// The whole build log as chunked text.
    pub async fn build_log(&self, app: &str, id: &str) -> String {
        let response = self
            .request(Method::GET, &format!("/apps/{app}/builds/{id}/logs"))
            .send()
            .await
            .expect("GET logs");
        assert_eq!(response.status(), 200);
        tokio::time::timeout(Duration::from_secs(60), response.text())
            .await
            .expect("the log ends")
            .expect("text")
    }
}

/// A gzip tarball of `files` (path, content).
pub fn source_tarball(files: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temp dir");
    for (path, content) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }
    let mut out = Vec::new();
    rack::archive::pack_tgz(dir.path(), &mut out).expect("packing");
    out
}

/// The host pids of processes that have `arg` as one of their arguments.
pub fn processes_with_arg(arg: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // A zombie has exited; only its parent has not collected it yet.
            let zombie = stat.rsplit(')').next()?.split_whitespace().next() == Some("Z");
            (!zombie && cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())).then_some(pid)
        })
        .collect()
}

/// A number of seconds for `sleep` that names one test run's process: other runs on the same host
/// (their leftovers included) pick another, so `processes_with_arg` finds only this run's.
pub fn unique_sleep_marker() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let seed = nanos ^ std::process::id().rotate_left(16) ^ NEXT.fetch_add(7919, Ordering::Relaxed);
    // Over a day and never a round figure a manifest would use by itself.
    (100_000 + seed % 800_000).to_string()
}

/// Every file under `dir` (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found
}

/// The files holding `name`'s objects (blobs, and objects stored before blobs existed).
pub fn object_files(app: &TestApp, name: &str) -> Vec<std::path::PathBuf> {
    let root = app.state.config.data_dir.join("objects");
    let mut files = files_under(&root.join(name));
    files.extend(files_under(&root.join("_blobs").join(name)));
    files
}

/// Reads a websocket's text frames until what arrived satisfies `done` (60 s at most, else
/// the test fails naming `what` and showing the text); pings and pongs are skipped, any other
/// frame fails the test.
pub async fn text_until<S>(socket: &mut S, what: &str, done: impl Fn(&str) -> bool) -> String
where
    S: futures_util::Stream<
            Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>,
        > + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&text) {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("{what} within 60 s; got:\n{text}"))
            .expect("the socket stays open")
            .unwrap();
        match frame {
            Message::Text(t) => text.push_str(&t),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    text
}
