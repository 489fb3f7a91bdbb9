//! The test harness: `TestApp::spawn()` starts a server on port 0 with a fresh database cloned
//! from a migrated template, plus one helper per endpoint.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use rack::config::{Config, Database};
use rack::postgres::{Cluster, Durability};
use reqwest::{Method, RequestBuilder, Response};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "test-password";
const TEMPLATE: &str = "rack_template";

/// Tracing output only when TEST_LOG is set, initialised once.
static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("TEST_LOG").is_some() {
        rack::telemetry::init(rack::config::LogFormat::Compact, "info,rack=debug");
    }
});

/// The process's private cluster. It is never dropped: the cluster stops (and its directory
/// goes) when the test process exits and closes the watchdog's pipe.
static CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("rack-test-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cluster = Cluster::start(&root, Durability::Ephemeral).expect("starting the test cluster");
        // The template is made on a runtime of its own: a pool must not outlive the runtime of
        // the test that happened to come first.
        let admin = cluster.connect_options("postgres");
        let template = cluster.connect_options(TEMPLATE);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async {
                    let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
                    rack::store::ensure_database(&mut conn, TEMPLATE).await?;
                    conn.close().await?;
                    let mut conn = sqlx::PgConnection::connect_with(&template).await?;
                    rack::store::MIGRATOR.run(&mut conn).await?;
                    conn.close().await?;
                    anyhow::Ok(())
                })
        })
        .join()
        .expect("the template thread")
        .expect("migrating the template database");
        cluster
    })
}

/// A fresh, migrated database; returns its URL.
pub async fn fresh_database() -> String {
    let cluster = cluster();
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect_with(&cluster.connect_options("postgres"))
        .await
        .expect("connecting to the test cluster");
    rack::store::create_database_from(&mut conn, &name, TEMPLATE)
        .await
        .expect("cloning the template database");
    conn.close().await.expect("closing");
    cluster.url(&name)
}

/// A running server.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,

    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: Option<tempfile::TempDir>,
}

impl TestApp {
    /// A server on a fresh database.
    pub async fn spawn() -> Self {
        let data = tempfile::tempdir().expect("a temp dir");
        let config = Config::for_tests(
            data.path().to_path_buf(),
            Database::Url(fresh_database().await),
            PASSWORD,
        );
        let mut app = Self::start(config).await;
        app._data = Some(data);
        app
    }

    /// A server with the given configuration (its data directory is the caller's).
    pub async fn start(config: Config) -> Self {
        LazyLock::force(&TRACING);
        Self::start_built(rack::Application::build(config).await.expect("building the server")).await
    }

    /// Serves an application built by the test.
    pub async fn start_built(app: rack::Application) -> Self {
        LazyLock::force(&TRACING);
        let addr = app.local_addr();
        let stop = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a client");
        Self {
            addr,
            client,
            stop,
            server,
            _data: None,
        }
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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

/// The status and text body of a response.
pub async fn status_text(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    (status, response.text().await.expect("a text body"))
}
