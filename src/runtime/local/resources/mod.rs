//! Resources on this host: each resource of an app is a server of its own (Debian's postgres
//! and redis-server binaries), in `<data>/resources/<app>/<name>/`, listening on 127.0.0.1 on
//! a port allocated when it is created (kept in that directory, so the variables of linked
//! processes never change). Servers are detached from rack: they keep running across a
//! restart or a kill -9 of rack, and the next `apply` adopts a running one (it only starts one
//! that is down). Each has its own generated password, so one app's credentials reach nothing
//! of another app's.

mod postgres;
mod redis;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::resource::{Kind, ResourceSpec};
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// The servers of resources on this host.
#[derive(Debug)]
pub struct Resources {
    /// `<data>/resources`.
    root: PathBuf,
    /// One lock per resource: an apply and a one-off (the release phase) may ensure the same
    /// resource at once.
    locks: Mutex<HashMap<(String, String), ResourceLock>>,
}

type ResourceLock = Arc<tokio::sync::Mutex<()>>;

impl Resources {
    /// Resources under `<data_dir>/resources`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("resources"),
            locks: Mutex::default(),
        }
    }

    fn dir(&self, app: &str, name: &str) -> PathBuf {
        self.root.join(app).join(name)
    }

    fn lock(&self, app: &str, name: &str) -> ResourceLock {
        let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry((app.to_owned(), name.to_owned())).or_default().clone()
    }

    /// Makes sure every resource `release` declares runs (creating, starting or adopting
    /// each), writing `system/local/resource/<name>` lines to `log`.
    ///
    /// # Errors
    /// When one cannot run here or does not come up.
    pub async fn ensure_all(&self, release: &ReleaseSpec, log: &LogSink) -> Result<(), RuntimeError> {
        for spec in release.resources.values() {
            self.ensure(&release.app, spec, log).await?;
        }
        Ok(())
    }

    async fn ensure(&self, app: &str, spec: &ResourceSpec, log: &LogSink) -> Result<(), RuntimeError> {
        let lock = self.lock(app, &spec.name);
        let _held = lock.lock().await;
        let stream = crate::stream_names::resource("local", &spec.name);
        let failed = |why: String| RuntimeError::Failed(format!("resource {}: {why}", spec.name));
        if spec.definition.image.is_some() {
            return Err(failed(format!(
                "the local runtime runs resources from this host's {} binaries, not images: remove \
                 `image:` (Kubernetes racks honour it)",
                spec.definition.kind
            )));
        }
        let server = Server::of(spec.definition.kind).ok_or_else(|| {
            failed(format!(
                "the local runtime does not run {} resources yet (it runs postgres and redis)",
                spec.definition.kind
            ))
        })?;
        let dir = self.dir(app, &spec.name);
        let state = blocking({
            let dir = dir.clone();
            move || Ok(server.state(&dir))
        })
        .await
        .map_err(failed)?;
        match state {
            State::Running => return Ok(()),
            State::Missing => log.line(&stream, "creating").await,
            State::Stopped => log.line(&stream, "starting").await,
        }
        let spec = spec.clone();
        blocking(move || match state {
            State::Missing => server.create(&dir, &spec),
            _ => server.start(&dir, &spec),
        })
        .await
        .map_err(failed)?;
        log.line(&stream, "ready").await;
        Ok(())
    }

    /// Where rack reaches resource `name` of `app`: its port on 127.0.0.1, if it runs.
    pub async fn endpoint(&self, app: &str, name: &str) -> Result<std::net::SocketAddr, RuntimeError> {
        let dir = self.dir(app, name);
        let kind = std::fs::read_to_string(dir.join(KIND_FILE)).unwrap_or_default();
        let server = match kind.trim() {
            "postgres" => Server::Postgres,
            "redis" => Server::Redis,
            _ => {
                return Err(RuntimeError::Failed(format!(
                    "app {app} has no resource {name} on this host"
                )));
            }
        };
        let running = blocking({
            let dir = dir.clone();
            move || Ok(server.state(&dir) == State::Running)
        })
        .await
        .map_err(RuntimeError::Failed)?;
        match read_port(&dir) {
            Some(port) if running => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            _ => Err(RuntimeError::Failed(format!(
                "resource {name} of {app} is not running: deploy the app to start it"
            ))),
        }
    }

    /// Stops resource `name` of `app` and removes its data.
    pub async fn delete(&self, app: &str, name: &str) -> Result<(), RuntimeError> {
        let lock = self.lock(app, name);
        let _held = lock.lock().await;
        let dir = self.dir(app, name);
        blocking(move || {
            remove(&dir);
            Ok(())
        })
        .await
        .map_err(RuntimeError::Failed)
    }

    /// Stops every resource of `app` and removes their data (the app is being deleted).
    pub async fn delete_app(&self, app: &str) {
        let dir = self.root.join(app);
        let _ = blocking(move || {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                remove(&entry.path());
            }
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        })
        .await;
    }
}

/// Adds to `env` the variables of the resources `service` links (`<NAME>_URL`...: 127.0.0.1
/// and each resource's port under `data_dir`), except those the release's environment sets:
/// a variable set with `env set` wins (it may point the service at an external database).
///
/// # Errors
/// When a linked resource was never created on this host.
pub fn link(
    data_dir: &Path,
    release: &ReleaseSpec,
    service: &crate::manifest::Service,
    env: &mut crate::env::Env,
) -> Result<(), RuntimeError> {
    for name in &service.resources {
        let Some(spec) = release.resources.get(name) else {
            continue;
        };
        let dir = data_dir.join("resources").join(&release.app).join(name);
        let port = read_port(&dir).ok_or_else(|| {
            RuntimeError::Failed(format!(
                "resource {name} of {} has not been created on this host: deploy the release first",
                release.app
            ))
        })?;
        let vars = crate::resource::link_vars(name, spec.definition.kind, &spec.credentials, "127.0.0.1", port);
        for (key, value) in vars {
            if !release.env.contains_key(&key) {
                env.insert(key, value);
            }
        }
    }
    Ok(())
}

/// Stops the server of the resource in `dir` (whatever its kind) and removes the directory.
fn remove(dir: &Path) {
    match std::fs::read_to_string(dir.join(KIND_FILE)).unwrap_or_default().trim() {
        "postgres" => postgres::stop(dir),
        "redis" => redis::stop(dir),
        _ => {}
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, "removing {}", dir.display());
    }
}

/// Runs blocking work (processes, files) off the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("the work stopped: {e}"))?
}

/// The file naming the kind of a resource's server; written last when it is created, so a
/// directory without it holds a creation that did not finish.
const KIND_FILE: &str = "kind";
/// The file holding a resource's port.
const PORT_FILE: &str = "port";

fn read_port(dir: &Path) -> Option<u16> {
    std::fs::read_to_string(dir.join(PORT_FILE)).ok()?.trim().parse().ok()
}

/// The memory budget of a resource's server, in MB: its `memory` option, or a small default.
fn memory_mb(spec: &ResourceSpec) -> u32 {
    spec.definition
        .options
        .get("memory")
        .and_then(|m| m.parse().ok())
        .unwrap_or(DEFAULT_MEMORY_MB)
}

/// What an idle resource server is given unless its `memory` option says otherwise.
const DEFAULT_MEMORY_MB: u32 = 64;

/// What a resource's directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Nothing yet: it is created.
    Missing,
    /// Created, its server down (stopped, or killed): it is started.
    Stopped,
    /// Its server runs: adopted as it is.
    Running,
}

/// The servers the local runtime runs.
#[derive(Debug, Clone, Copy)]
enum Server {
    Postgres,
    Redis,
}

impl Server {
    fn of(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Postgres => Some(Self::Postgres),
            Kind::Redis => Some(Self::Redis),
            _ => None,
        }
    }

    fn state(self, dir: &Path) -> State {
        let kind = std::fs::read_to_string(dir.join(KIND_FILE)).unwrap_or_default();
        if kind.trim().is_empty() {
            return State::Missing;
        }
        let running = match self {
            Self::Postgres => postgres::running(dir),
            Self::Redis => redis::running(dir),
        };
        if running { State::Running } else { State::Stopped }
    }

    /// Creates the resource in `dir` (anything a failed creation left there goes first) on a
    /// new port, and starts it.
    fn create(self, dir: &Path, spec: &ResourceSpec) -> Result<(), String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let port = super::supervisor::free_port().ok_or("no free port on 127.0.0.1")?;
        std::fs::write(dir.join(PORT_FILE), port.to_string()).map_err(|e| format!("writing its port: {e}"))?;
        let (kind, created) = match self {
            Self::Postgres => ("postgres", postgres::create(dir, spec, port)),
            Self::Redis => ("redis", redis::create(dir, spec, port)),
        };
        created.map_err(|e| format!("{e:#}"))?;
        std::fs::write(dir.join(KIND_FILE), kind).map_err(|e| format!("writing its kind: {e}"))
    }

    /// Starts the (created) resource in `dir` on its port.
    fn start(self, dir: &Path, spec: &ResourceSpec) -> Result<(), String> {
        let port = read_port(dir).ok_or("its port file is missing")?;
        match self {
            Self::Postgres => postgres::start(dir, spec, port),
            Self::Redis => redis::start(dir, spec, port),
        }
        .map_err(|e| format!("{e:#}"))
    }
}
