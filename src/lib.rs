//! rack: the API server and CLI of a small PaaS. This crate builds the whole server
//! ([`Application::build`]: database, migrations, router, listener) so that `rack server` and
//! the integration tests run the same thing.

pub mod api;
#[cfg(test)]
mod architecture;
pub mod archive;
pub mod auth;
pub mod backup;
pub mod build_archive;
pub mod certificate;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod disk;
pub mod env;
pub mod error;
pub mod events;
pub mod ids;
pub mod jobs;
pub mod manifest;
pub mod metrics;
pub mod names;
pub mod objects;
pub mod postgres;
pub mod process_note;
pub mod rack_log;
pub mod rack_params;
pub mod resource;
pub mod resource_data;
pub mod runtime;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod stream_names;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod webhooks;

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::auth::{Password, PasswordSource};
use crate::config::{Config, Database};

/// What every handler and worker shares.
#[derive(Debug)]
pub struct Rack {
    pub pool: PgPool,
    pub config: Config,
    pub password: Password,
    pub objects: objects::Objects,
    /// Seals and opens the secrets kept in the database (registries' passwords).
    pub keyring: Arc<secrets::Keyring>,
    pub runtime: Arc<dyn runtime::Runtime>,
    pub bus: events::EventBus,
    /// This server's identity as a job holder.
    pub replica: uuid::Uuid,
    /// Cancelled when the server starts shutting down: streams and workers watch it.
    pub shutdown: CancellationToken,
    /// Failed authentications, per client address and user name.
    pub throttle: throttle::Throttle,
    /// Open streams per credential.
    pub streams: api::limits::StreamSlots,
    /// What `GET /metrics` shows.
    pub metrics: metrics::Metrics,
}

/// The state handed to handlers: a cheap handle on the one [`Rack`].
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<Rack>);

impl Deref for AppState {
    type Target = Rack;

    fn deref(&self) -> &Rack {
        &self.0
    }
}

/// A built server: bound to its address, not serving yet.
#[derive(Debug)]
pub struct Application {
    listener: tokio::net::TcpListener,
    state: AppState,
    password_source: PasswordSource,
    /// The listener's TLS, when it serves HTTPS.
    tls: Option<tls::Tls>,
    /// The embedded cluster, stopped after the server has stopped.
    postgres: Option<Arc<std::sync::Mutex<postgres::Cluster>>>,
}

impl Application {
    /// Prepares the data directory, starts the embedded Postgres (or connects to
    /// `DATABASE_URL`), runs the migrations and binds the listener.
    ///
    /// # Errors
    /// Anything that keeps the server from starting, with a message that says what to fix.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::assemble(config, None).await
    }

    /// Like [`Application::build`], with `runtime` in place of the one the configuration
    /// names (tests drive the workers with [`runtime::fake::FakeRuntime`]).
    ///
    /// # Errors
    /// Anything that keeps the server from starting, with a message that says what to fix.
    pub async fn build_with(config: Config, runtime: Arc<dyn runtime::Runtime>) -> anyhow::Result<Self> {
        Self::assemble(config, Some(runtime)).await
    }

    async fn assemble(config: Config, runtime: Option<Arc<dyn runtime::Runtime>>) -> anyhow::Result<Self> {
        tls::install_provider();
        // A restore checks the whole archive, and that the data directory is empty, before it
        // writes anything.
        let restore = match &config.backup.restore {
            Some(file) => {
                backup::restore::check_empty_data_dir(&config.data_dir)?;
                let verified =
                    backup::restore::verify(file).with_context(|| format!("refusing to restore {}", file.display()))?;
                Some(verified)
            }
            None => None,
        };
        create_data_dir(&config.data_dir)?;
        if let Some(verified) = &restore {
            backup::restore::write_kept_files(&config.data_dir, verified)?;
        }
        let (password, password_source) = auth::resolve_password(config.password.as_deref(), &config.data_dir)?;
        let tls = load_tls(&config)?;

        let (options, postgres) = match &config.database {
            Database::Url(url) => {
                let options: PgConnectOptions = url.parse().context("DATABASE_URL is not a valid postgres:// URL")?;
                (options, None)
            }
            Database::Embedded => {
                let root = config.data_dir.join("postgres");
                let cluster =
                    tokio::task::spawn_blocking(move || postgres::Cluster::start(&root, postgres::Durability::Durable))
                        .await??;
                let mut conn =
                    <sqlx::PgConnection as sqlx::Connection>::connect_with(&cluster.connect_options("postgres"))
                        .await?;
                store::ensure_database(&mut conn, "rack").await?;
                sqlx::Connection::close(conn).await?;
                (cluster.connect_options("rack"), Some(cluster))
            }
        };
        // One of the connections is the event bus's LISTEN, in a pool of its own (`store::single`).
        let pool = store::connect(options, config.db_connections - 1)
            .await
            .context("connecting to Postgres")?;
        let objects = objects::Objects::open(&config.objects).context("opening the object store (RACK_OBJECTS)")?;
        if let Some(verified) = restore {
            backup::restore::load(&config, &pool, &objects, verified)
                .await
                .context("restoring the backup")?;
        }
        // rack's own log (`rack logs`) is kept even when the program embedding the server
        // installed no subscriber of its own.
        rack_log::install_if_none();
        store::migrate(&pool).await.context("running database migrations")?;
        store::rack_system::record_start(&pool, env!("CARGO_PKG_VERSION"))
            .await
            .context("recording this version of rack")?;

        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding {} (RACK_BIND)", config.bind))?;
        let shutdown = CancellationToken::new();
        let bus = events::EventBus::start(&pool, shutdown.clone(), config.stream_window)
            .await
            .context("listening for events")?;
        let keyring = Arc::new(secrets::Keyring::new(config.secrets_key.as_deref(), &config.data_dir)?);
        if matches!(config.database, Database::Url(_)) && !keyring.from_setting() {
            tracing::warn!(
                "RACK_SECRETS_KEY is not set: registry passwords are sealed with secrets.key of this data \
                 directory, which other replicas on this DATABASE_URL do not have"
            );
        }
        let registries: Arc<dyn runtime::Registries> = Arc::new(jobs::capabilities::StoredRegistries {
            pool: pool.clone(),
            keyring: keyring.clone(),
        });
        let runtime = match runtime {
            Some(runtime) => runtime,
            None => default_runtime(&config, &pool, &objects, &shutdown, registries).await?,
        };
        let throttle = throttle::Throttle::new(config.auth_failures, std::time::Duration::from_secs(60));
        let streams = api::limits::StreamSlots::new(config.max_streams_per_credential);
        let state = AppState(Arc::new(Rack {
            pool,
            config,
            password: Password::new(&password),
            objects,
            keyring,
            runtime,
            bus,
            replica: uuid::Uuid::now_v7(),
            shutdown,
            throttle,
            streams,
            metrics: metrics::Metrics::new(),
        }));
        let scheme = if tls.is_some() { "https" } else { "http" };
        if password_source == PasswordSource::Generated {
            // Printed once, on the start that generated it, for the operator at the terminal,
            // on stdout: never with the logs (stderr), which are collected, shipped and kept.
            let addr = listener.local_addr()?;
            println!(
                "rack: generated a password and saved it in {}\nrack: connect with RACK_URL={scheme}://:{password}@{addr}",
                state.config.data_dir.join("password").display()
            );
        }
        if let Some(tls) = &tls {
            // Not a secret: clients pin it (RACK_FINGERPRINT) or check the one they saved.
            println!("rack: certificate fingerprint {}", tls.fingerprint());
        }
        Ok(Self {
            listener,
            state,
            password_source,
            tls,
            postgres: postgres.map(|c| Arc::new(std::sync::Mutex::new(c))),
        })
    }

    /// The address the server listens on (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The shared state (for tests and workers).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The SHA-256 fingerprint of the certificate the server presents, when it serves HTTPS.
    pub fn tls_fingerprint(&self) -> Option<String> {
        self.tls.as_ref().map(tls::Tls::fingerprint)
    }

    /// Where the password came from on this start.
    pub fn password_source(&self) -> PasswordSource {
        self.password_source
    }

    /// Serves until `stop` is cancelled, then drains: in-flight requests finish, streams and
    /// workers see `shutdown`, and the embedded Postgres stops last.
    ///
    /// # Errors
    /// When serving fails or Postgres does not stop cleanly.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            postgres,
            tls,
            ..
        } = self;
        let shutdown = state.shutdown.clone();
        let router = api::router(state.clone());
        let mut workers = jobs::builds::spawn_workers(&state, state.config.build_workers);
        workers.extend(jobs::deploys::spawn_workers(&state, 2));
        workers.push(tokio::spawn(jobs::deploys::reconcile_all(state.clone())));
        workers.push(tokio::spawn(jobs::prune_audit(state.clone())));
        workers.push(tokio::spawn(jobs::metrics::record(state.clone())));
        workers.push(tokio::spawn(jobs::replicas::heartbeat(state.clone())));
        if state.config.shared_rack_log {
            workers.push(tokio::spawn(jobs::rack_log::persist(state.clone())));
        }
        workers.push(tokio::spawn(disk::maintain(state.clone())));
        workers.push(tokio::spawn(backup::schedule::run(state.clone())));
        workers.push(tokio::spawn(jobs::webhooks::deliver(state.clone())));
        if !state.runtime.capabilities().runs_timers {
            workers.push(tokio::spawn(jobs::timers::schedule(state.clone())));
        }
        if let Some(cluster) = &postgres {
            workers.push(tokio::spawn(keep_postgres_running(cluster.clone(), shutdown.clone())));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(addr = %listener.local_addr()?, "rack listening on {scheme}://{}", listener.local_addr()?);
        let stopping = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                shutdown.cancel();
            })
        };
        serve::serve(listener, router, state.config.listener, tls, shutdown.clone()).await?;
        stopping.abort();
        shutdown.cancel();
        for worker in workers {
            let _ = worker.await;
        }
        state.runtime.let_go().await;
        state.pool.close().await;
        drop(state);
        if let Some(cluster) = postgres {
            tokio::task::spawn_blocking(move || match Arc::try_unwrap(cluster) {
                Ok(cluster) => cluster
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .stop(),
                // A task still holds it: dropping the last handle stops the server too.
                Err(_) => Ok(()),
            })
            .await??;
        }
        tracing::info!("rack stopped");
        Ok(())
    }
}

/// The runtime the configuration names: Kubernetes (`RACK_RUNTIME=kube`) or this host's
/// sandboxed processes.
async fn default_runtime(
    config: &Config,
    pool: &PgPool,
    objects: &objects::Objects,
    shutdown: &CancellationToken,
    registries: Arc<dyn runtime::Registries>,
) -> anyhow::Result<Arc<dyn runtime::Runtime>> {
    let runtime: Arc<dyn runtime::Runtime> = match &config.kube {
        Some(kube) => Arc::new(
            runtime::kube::KubeRuntime::connect(runtime::kube::KubeSettings {
                rack: config.rack_name.clone(),
                config: kube.clone(),
                objects: objects.clone(),
                tokens: Arc::new(jobs::capabilities::StoredTokens(pool.clone())),
                scratch: config.data_dir.join("builds"),
                data_dir: config.data_dir.clone(),
                limits: config.source_limits,
                build_timeout: config.build_timeout,
                registries,
            })
            .await
            .context("starting the Kubernetes runtime (RACK_RUNTIME=kube)")?,
        ),
        None => {
            let (user, tmp_bytes) = (config.sandbox_user.clone(), config.sandbox_tmp_bytes);
            let sandbox = tokio::task::spawn_blocking(move || runtime::local::sandbox::Sandbox::open(&user, tmp_bytes))
                .await?
                .context("preparing the sandbox of the local runtime (RACK_SANDBOX_USER)")?;
            tracing::info!(
                sandbox.user = %sandbox.user(),
                "builds and app processes run sandboxed as {}",
                sandbox.user()
            );
            let podman = runtime::local::podman::Podman::detect(&config.data_dir, &config.rack_name)
                .context("writing the podman configuration")?
                .map(|podman| podman.with_registries(registries));
            match &podman {
                Some(_) => tracing::info!("Dockerfile builds and containers run with podman"),
                None => tracing::warn!(
                    "podman is not installed: services built from a Dockerfile or naming an image cannot run here"
                ),
            }
            Arc::new(runtime::local::LocalRuntime::new(runtime::local::LocalSettings {
                objects: objects.clone(),
                builds_dir: config.data_dir.join("builds"),
                limits: config.source_limits,
                build_dir_max_bytes: config.build_dir_max_bytes,
                sandbox,
                accounts: runtime::local::app_accounts::AppAccounts {
                    uids: Arc::new(jobs::capabilities::StoredUids(pool.clone())),
                    base: config.app_uids.0,
                    count: config.app_uids.1,
                },
                podman,
                logs: Arc::new(jobs::capabilities::PersistedLogs::new(pool.clone())),
                ports: Arc::new(jobs::capabilities::StoredPorts(pool.clone())),
                shutdown: shutdown.clone(),
                program: config.program.clone(),
            }))
        }
    };
    Ok(runtime)
}

/// The listener's TLS: the given certificate, or the data directory's self-signed one
/// (generated on the first start that needs it).
fn load_tls(config: &Config) -> anyhow::Result<Option<tls::Tls>> {
    let files = match &config.tls {
        config::Tls::Off => return Ok(None),
        config::Tls::Files(files) => files.clone(),
        config::Tls::SelfSigned => {
            let (files, generated) = tls::ensure_self_signed(&config.data_dir, config.bind)
                .context("generating the self-signed certificate")?;
            if generated {
                println!("rack: generated a self-signed certificate in {}", files.cert.display());
            }
            files
        }
    };
    tls::Tls::from_files(files)
        .map(Some)
        .context("loading the certificate (RACK_TLS_CERT, RACK_TLS_KEY)")
}

/// Restarts the embedded Postgres when it dies under the server (requests get 503 meanwhile,
/// and the pool reconnects once it is back).
async fn keep_postgres_running(cluster: Arc<std::sync::Mutex<postgres::Cluster>>, shutdown: CancellationToken) {
    let lock = |c: &std::sync::Mutex<postgres::Cluster>| {
        // A poisoned lock only means a panic elsewhere; the cluster handle itself is fine.
        c.lock().unwrap_or_else(std::sync::PoisonError::into_inner).has_exited()
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
        if !lock(&cluster) || shutdown.is_cancelled() {
            continue;
        }
        tracing::error!("the embedded Postgres stopped unexpectedly; restarting it");
        let restarting = cluster.clone();
        let restarted = tokio::task::spawn_blocking(move || {
            restarting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .restart()
        })
        .await;
        match restarted {
            Ok(Ok(())) => tracing::info!("the embedded Postgres is running again"),
            Ok(Err(e)) => tracing::error!(
                error = format!("{e:#}"),
                "restarting the embedded Postgres; trying again"
            ),
            Err(e) => tracing::error!(error = %e, "restarting the embedded Postgres"),
        }
    }
}

/// The data directory holds the password, so only its owner may list it; others may pass
/// through it (mode 0711) because the embedded cluster's user has to reach its own directory.
fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .with_context(|| format!("creating the data directory {} (RACK_DATA)", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).with_context(|| {
        // Typically a volume mounted there that belongs to root (a Kubernetes emptyDir, a
        // bind mount): say whose it is and what to do, not just that chmod failed.
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(dir).map(|m| m.uid()).unwrap_or(u32::MAX);
        format!(
            "setting the mode of the data directory {} (owned by uid {owner}, rack runs as uid {}): \
             make it rack's (chown), or set RACK_DATA to a directory inside it that rack creates itself",
            dir.display(),
            nix::unistd::geteuid()
        )
    })
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail at startup");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
