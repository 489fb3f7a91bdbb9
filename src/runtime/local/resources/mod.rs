//! Resources on this host: each resource of an app is a server of its own (Debian's postgres
//! (with postgis for postgis resources), redis-server, memcached and mariadbd binaries, the
//! latter for both mysql and mariadb), in `<data>/resources/<app>/<name>/`, listening on
//! 127.0.0.1 on a port allocated when it is created (kept in that directory, so the variables
//! of linked processes never change). Servers are detached from rack: they keep running across
//! a restart or a kill -9 of rack, and the next `apply` adopts a running one (it only starts
//! one that is down). Each has its own generated password, so one app's credentials reach
//! nothing of another app's (memcached has no credentials: see memcached.rs). On a restored
//! rack, a resource's export from the backup is loaded into it when it is created, before it
//! counts as created (see [`Resources::ensure`]).

mod mariadb;
mod memcached;
mod postgres;
mod redis;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::postgres::RunAs;
use crate::resource::{Kind, ResourceSpec};
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// Where rack-wide resources live, in place of an app's name: `<data>/resources/@rack/<name>`
/// (no app is named so: app names are DNS labels).
const RACK: &str = crate::runtime::RACK_OWNER;

/// The servers of resources on this host.
#[derive(Debug)]
pub struct Resources {
    /// The data directory (where a restore leaves the resources' exports).
    data_dir: PathBuf,
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
            data_dir: data_dir.to_path_buf(),
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
    /// each), and every rack-wide one linked to the app that a service names (started again if
    /// it went down, after a reboot of the host say), writing `system/local/resource/<name>`
    /// lines to `log`.
    ///
    /// # Errors
    /// When one cannot run here or does not come up.
    pub async fn ensure_all(&self, release: &ReleaseSpec, log: &LogSink) -> Result<(), RuntimeError> {
        for spec in release.resources.values() {
            self.ensure(&release.app, spec, log).await?;
        }
        let named = |name: &String| release.manifest.services.values().any(|s| s.resources.contains(name));
        for (name, spec) in &release.rack_linked {
            if !release.resources.contains_key(name) && named(name) {
                self.ensure(RACK, spec, log).await?;
            }
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
        let server = Server::of(spec.definition.kind);
        let dir = self.dir(app, &spec.name);
        let state = blocking({
            let dir = dir.clone();
            move || Ok(server.state(&dir))
        })
        .await
        .map_err(failed)?;
        let kind = spec.definition.kind;
        let pending = crate::backup::pending_import(&self.data_dir, app, &spec.name, kind);
        if state != State::Missing {
            if let Some(file) = &pending {
                // The resource counts as created only once its export was loaded: this one
                // was, and rack stopped before it removed the file.
                forget(file);
            }
            if state == State::Running {
                return Ok(());
            }
            log.line(&stream, "starting").await;
            let (spec, dir) = (spec.clone(), dir.clone());
            blocking(move || server.start(&dir, &spec)).await.map_err(failed)?;
            log.line(&stream, "ready").await;
            return Ok(());
        }
        log.line(&stream, "creating").await;
        // A redis server loads its RDB as it starts; SQL is loaded once the server runs.
        let seed = pending.clone().filter(|_| kind == Kind::Redis);
        blocking({
            let (spec, dir) = (spec.clone(), dir.clone());
            move || server.create(&dir, &spec, seed.as_deref())
        })
        .await
        .map_err(failed)?;
        if let Some(file) = &pending
            && kind != Kind::Redis
            && let Err(e) = load_export(&dir, spec, file).await
        {
            // Not marked created: the next attempt starts again from an empty server, so
            // nothing is ever loaded twice.
            let _ = blocking(move || {
                server.stop(&dir);
                Ok(())
            })
            .await;
            return Err(failed(format!(
                "loading its data from the backup ({}): {e}",
                file.display()
            )));
        }
        blocking({
            let dir = dir.clone();
            move || mark_created(&dir, kind)
        })
        .await
        .map_err(failed)?;
        if let Some(file) = &pending {
            forget(file);
            log.line(&stream, "restored from the backup").await;
        }
        log.line(&stream, "ready").await;
        Ok(())
    }

    /// Makes sure rack-wide resource `spec` runs in `<data>/resources/@rack/<name>`, stopped
    /// first when `restart` (its options changed: the server starts on a new configuration).
    ///
    /// # Errors
    /// When it cannot run here or does not come up.
    pub async fn ensure_rack(&self, spec: &ResourceSpec, restart: bool) -> Result<(), RuntimeError> {
        if restart {
            let lock = self.lock(RACK, &spec.name);
            let _held = lock.lock().await;
            let dir = self.dir(RACK, &spec.name);
            let server = Server::of(spec.definition.kind);
            blocking(move || {
                server.stop(&dir);
                Ok(())
            })
            .await
            .map_err(RuntimeError::Failed)?;
        }
        // Its progress has no deployment log to go to.
        let (log, _) = LogSink::lossy();
        self.ensure(RACK, spec, &log).await
    }

    /// Where rack reaches resource `name` of `app`: its port on 127.0.0.1, if it runs.
    pub async fn endpoint(&self, app: &str, name: &str) -> Result<std::net::SocketAddr, RuntimeError> {
        let dir = self.dir(app, name);
        let Some(server) = stored_kind(&dir).map(Server::of) else {
            return Err(RuntimeError::Failed(format!(
                "app {app} has no resource {name} on this host"
            )));
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

    /// Replaces the data of redis resource `spec` of `app` with the RDB file `rdb` (see
    /// `redis::restore`: the old data comes back on any failure).
    ///
    /// # Errors
    /// When it is not a redis resource created here, or the RDB cannot be loaded.
    pub async fn restore_redis(&self, app: &str, spec: &ResourceSpec, rdb: &Path) -> Result<(), RuntimeError> {
        let lock = self.lock(app, &spec.name);
        let _held = lock.lock().await;
        let dir = self.dir(app, &spec.name);
        let (app, spec, rdb) = (app.to_owned(), spec.clone(), rdb.to_owned());
        blocking(move || {
            if stored_kind(&dir) != Some(Kind::Redis) {
                return Err(format!("app {app} has no redis resource {} on this host", spec.name));
            }
            let port = read_port(&dir).ok_or("its port file is missing")?;
            redis::restore(&dir, &spec, port, &rdb).map_err(|e| format!("{e:#}"))
        })
        .await
        .map_err(RuntimeError::Failed)
    }

    /// Stops resource `name` of `app` and removes its data (and an export a restore left for it).
    pub async fn delete(&self, app: &str, name: &str) -> Result<(), RuntimeError> {
        let lock = self.lock(app, name);
        let _held = lock.lock().await;
        let dir = self.dir(app, name);
        let pending: Vec<PathBuf> = Kind::ALL
            .into_iter()
            .filter_map(|kind| crate::backup::pending_import(&self.data_dir, app, name, kind))
            .collect();
        blocking(move || {
            remove(&dir);
            pending.iter().for_each(|file| forget(file));
            Ok(())
        })
        .await
        .map_err(RuntimeError::Failed)
    }

    /// Stops every resource of `app` and removes their data (the app is being deleted).
    pub async fn delete_app(&self, app: &str) {
        let dir = self.root.join(app);
        let pending = self.data_dir.join(crate::backup::PENDING_IMPORTS).join(app);
        let _ = blocking(move || {
            let _ = std::fs::remove_dir_all(&pending);
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
/// Returns the linked resources' ports (a container reaches them through its forwarder).
///
/// # Errors
/// When a linked resource was never created on this host.
pub fn link(
    data_dir: &Path,
    release: &ReleaseSpec,
    service: &crate::manifest::Service,
    env: &mut crate::env::Env,
) -> Result<Vec<u16>, RuntimeError> {
    let mut ports = Vec::new();
    for name in &service.resources {
        // The app's own resource of that name wins over a rack-wide one linked to it.
        let (owner, spec) = match (release.resources.get(name), release.rack_linked.get(name)) {
            (Some(spec), _) => (release.app.as_str(), spec),
            (None, Some(spec)) => (RACK, spec),
            (None, None) => continue,
        };
        let dir = data_dir.join("resources").join(owner).join(name);
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
        ports.push(port);
    }
    Ok(ports)
}

/// Loads the export `file` (SQL) into the resource just created in `dir`, with the tools
/// `PUT /apps/{app}/resources/{name}/data` uses.
async fn load_export(dir: &Path, spec: &ResourceSpec, file: &Path) -> Result<(), String> {
    let port = read_port(dir).ok_or("its port file is missing")?;
    let data = tokio::fs::File::open(file).await.map_err(|e| e.to_string())?;
    let endpoint = crate::runtime::ResourceEndpoint {
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        guard: None,
    };
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(data));
    crate::resource_data::import(spec.definition.kind, &spec.credentials, endpoint, body)
        .await
        .map_err(|e| e.to_string())
}

/// Removes an export a restore left, once loaded.
fn forget(file: &Path) {
    if let Err(e) = std::fs::remove_file(file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, "removing {}", file.display());
    }
}

/// Marks the resource in `dir` created (writes its kind): until then, a directory is a creation
/// that did not finish, which the next attempt starts again.
fn mark_created(dir: &Path, kind: Kind) -> Result<(), String> {
    std::fs::write(dir.join(KIND_FILE), kind.as_str()).map_err(|e| format!("writing its kind: {e}"))
}

/// Stops the server of the resource in `dir` (whatever its kind) and removes the directory.
fn remove(dir: &Path) {
    if let Some(kind) = stored_kind(dir) {
        Server::of(kind).stop(dir);
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

/// The kind of the resource created in `dir`, if its creation finished.
fn stored_kind(dir: &Path) -> Option<Kind> {
    std::fs::read_to_string(dir.join(KIND_FILE)).ok()?.trim().parse().ok()
}

/// The system user a server runs as: `user` (made by Debian's `package`) when rack is root,
/// never root itself (an app's password must not be a way to write files as root); rack's own
/// user otherwise.
fn system_user(user: &str, package: &str) -> anyhow::Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let found = nix::unistd::User::from_name(user)?.with_context(|| {
        format!(
            "rack runs as root and runs {package} as the `{user}` system user, which does not exist: \
             install {package} (`apt-get install -y {package}`; scripts/install-deps does)"
        )
    })?;
    Ok(Some(RunAs {
        uid: found.uid,
        gid: found.gid,
    }))
}

/// A server command with a clean environment, in its own process group (a signal to rack's
/// group must not reach it), as `run_as` when given.
fn server_command(program: impl AsRef<std::ffi::OsStr>, run_as: Option<&RunAs>) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .process_group(0);
    if let Some(user) = run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd
}

/// Whether process `pid` runs one of `programs` (a stale pid file may name another process).
fn runs(pid: i32, programs: &[&str]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let cmdline = String::from_utf8_lossy(&cmdline);
        programs.iter().any(|program| cmdline.contains(program))
    })
}

/// The pid in the first line of `file`, if that process runs one of `programs`.
fn pid_from(file: &Path, programs: &[&str]) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    (pid > 0 && runs(pid, programs)).then_some(pid)
}

/// Stops process `pid` (SIGTERM: servers write what they have, then exit), SIGKILL after a
/// grace period.
fn terminate(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while nix::sys::signal::kill(pid, None).is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

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
    /// postgres and postgis (a postgres whose app database has the postgis extension).
    Postgres,
    Redis,
    Memcached,
    /// mysql and mariadb: Debian serves both with MariaDB.
    Mariadb,
}

impl Server {
    fn of(kind: Kind) -> Self {
        match kind {
            Kind::Postgres | Kind::Postgis => Self::Postgres,
            Kind::Redis => Self::Redis,
            Kind::Memcached => Self::Memcached,
            Kind::Mysql | Kind::Mariadb => Self::Mariadb,
        }
    }

    fn state(self, dir: &Path) -> State {
        if stored_kind(dir).is_none() {
            return State::Missing;
        }
        let running = match self {
            Self::Postgres => postgres::running(dir),
            Self::Redis => redis::running(dir),
            Self::Memcached => memcached::running(dir),
            Self::Mariadb => mariadb::running(dir),
        };
        if running { State::Running } else { State::Stopped }
    }

    /// Stops the server of `dir`, if it runs.
    fn stop(self, dir: &Path) {
        match self {
            Self::Postgres => postgres::stop(dir),
            Self::Redis => redis::stop(dir),
            Self::Memcached => memcached::stop(dir),
            Self::Mariadb => mariadb::stop(dir),
        }
    }

    /// Creates the resource in `dir` (anything a failed creation left there goes first, its
    /// server stopped) on a new port, and starts it; a redis server from the RDB `seed`. The
    /// caller marks it created ([`mark_created`]).
    fn create(self, dir: &Path, spec: &ResourceSpec, seed: Option<&Path>) -> Result<(), String> {
        self.stop(dir);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let port = super::supervisor::free_port().ok_or("no free port on 127.0.0.1")?;
        std::fs::write(dir.join(PORT_FILE), port.to_string()).map_err(|e| format!("writing its port: {e}"))?;
        let created = match self {
            Self::Postgres => postgres::create(dir, spec, port),
            Self::Redis => redis::create(dir, spec, port, seed),
            Self::Memcached => memcached::create(dir, spec, port),
            Self::Mariadb => mariadb::create(dir, spec, port),
        };
        if let Err(e) = created {
            // A server started before the step that failed must not run on, orphaned: the
            // next attempt starts afresh in an emptied directory.
            self.stop(dir);
            return Err(format!("{e:#}"));
        }
        Ok(())
    }

    /// Starts the (created) resource in `dir` on its port.
    fn start(self, dir: &Path, spec: &ResourceSpec) -> Result<(), String> {
        let port = read_port(dir).ok_or("its port file is missing")?;
        match self {
            Self::Postgres => postgres::start(dir, spec, port),
            Self::Redis => redis::start(dir, spec, port),
            Self::Memcached => memcached::start(dir, spec, port),
            Self::Mariadb => mariadb::start(dir, spec, port),
        }
        .map_err(|e| format!("{e:#}"))
    }
}
