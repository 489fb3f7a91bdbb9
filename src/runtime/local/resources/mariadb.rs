//! A mysql or mariadb resource: Debian serves both with MariaDB (`mariadbd`). A data directory
//! per resource, initialised by `mariadb-install-db`; the server listens on 127.0.0.1 on the
//! resource's port (no name resolution), detached from rack (`setsid -f`: it outlives rack and
//! is adopted again). Its unix socket is private: it sits in a directory only the server's
//! user may enter, and rack administers the server over it as its own system user (unix_socket
//! authentication: no admin password exists). The app's user has a password, connects over TCP
//! from 127.0.0.1 only, and has rights on its own database only. Small memory settings (a
//! quarter of `memory` as InnoDB's buffer pool, no performance schema) keep an idle one small.
//! As root it runs as the `mysql` user of Debian's package.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::postgres::{RunAs, create_private_dir, read_tail, socket_dir_for};
use crate::resource::ResourceSpec;

/// The names Debian gives the server (the second is a compatibility link).
const SERVERS: &[&str] = &["mariadbd", "mysqld"];

const INSTALL: &str = "apt-get install -y mariadb-server mariadb-client";

fn run_as() -> anyhow::Result<Option<RunAs>> {
    super::system_user("mysql", "mariadb-server")
}

/// The first of `names` found in the system's program directories.
fn find(names: &[&str]) -> anyhow::Result<PathBuf> {
    let dirs = [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ];
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| Path::new(dir).join(name)))
        .find(|path| path.is_file())
        .with_context(|| {
            format!(
                "{} was not found: install it with `{INSTALL}` (scripts/install-deps does)",
                names[0]
            )
        })
}

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

fn socket(dir: &Path) -> PathBuf {
    socket_dir_for(dir).join("mysqld.sock")
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("mariadbd.pid")
}

/// The account rack administers the server as: its own system user's name (root as root),
/// authenticated by the kernel over the private socket.
fn admin_user() -> anyhow::Result<String> {
    let uid = nix::unistd::geteuid();
    Ok(nix::unistd::User::from_uid(uid)?
        .with_context(|| format!("rack's user (uid {uid}) has no name"))?
        .name)
}

/// Writes the server's configuration (the whole of it: `--defaults-file` reads nothing else,
/// not the distro's /etc/mysql).
fn write_config(dir: &Path, spec: &ResourceSpec, port: u16, run_as: Option<&RunAs>) -> anyhow::Result<PathBuf> {
    let memory = super::memory_mb(spec);
    let config = format!(
        "# Written by rack each time it starts this server: changes here are lost.\n\
         [mysqld]\n\
         datadir = {data}\n\
         port = {port}\n\
         bind-address = 127.0.0.1\n\
         socket = {socket}\n\
         pid-file = {pid}\n\
         skip-name-resolve\n\
         host_cache_size = 0\n\
         local-infile = 0\n\
         character-set-server = utf8mb4\n\
         max_connections = 40\n\
         performance_schema = OFF\n\
         innodb_buffer_pool_size = {pool}M\n\
         innodb_log_file_size = 32M\n\
         innodb_log_buffer_size = 2M\n\
         innodb_read_io_threads = 1\n\
         innodb_write_io_threads = 1\n\
         key_buffer_size = 1M\n\
         aria_pagecache_buffer_size = 2M\n\
         table_open_cache = 200\n\
         table_definition_cache = 400\n",
        data = data_dir(dir).display(),
        socket = socket(dir).display(),
        pid = pid_file(dir).display(),
        pool = (memory / 4).max(8),
    );
    let path = dir.join("my.cnf");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .context("writing my.cnf")?;
    file.write_all(config.as_bytes()).context("writing my.cnf")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(user) = run_as {
        std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    Ok(path)
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `text` as an SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// `name` as an SQL identifier.
fn identifier(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Initialises the data directory in `dir`, starts the server on `port`, and creates the
/// app's user and database with `spec`'s credentials.
pub(super) fn create(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let run_as = run_as()?;
    create_private_dir(dir, run_as.as_ref())?;
    let config = write_config(dir, spec, port, run_as.as_ref())?;
    let mut install = super::server_command(find(&["mariadb-install-db", "mysql_install_db"])?, run_as.as_ref());
    install
        .arg(format!("--defaults-file={}", config.display()))
        .arg(format!("--datadir={}", data_dir(dir).display()))
        .arg(format!("--auth-root-socket-user={}", admin_user()?))
        .args(["--skip-test-db", "--skip-name-resolve"]);
    run(install, "mariadb-install-db")?;
    start(dir, spec, port)?;
    let credentials = &spec.credentials;
    let account = format!("{}@'127.0.0.1'", literal(&credentials.user));
    let sql = format!(
        "CREATE DATABASE {database} CHARACTER SET utf8mb4;\n\
         CREATE USER {account} IDENTIFIED BY {password};\n\
         GRANT ALL PRIVILEGES ON {database}.* TO {account};\n",
        database = identifier(&credentials.database),
        password = literal(&credentials.password),
    );
    let mut client = admin(dir)?;
    client
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = client.spawn().context("running the mariadb client")?;
    // The password goes through the pipe, never on a command line.
    child
        .stdin
        .take()
        .context("the client's input")?
        .write_all(sql.as_bytes())
        .context("writing to the mariadb client")?;
    let out = child.wait_with_output().context("running the mariadb client")?;
    if !out.status.success() {
        bail!(
            "creating the app's user and database failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    nix::unistd::sync();
    Ok(())
}

/// The `mariadb` client, connected as rack's administrator over the private socket.
fn admin(dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = super::server_command(find(&["mariadb", "mysql"])?, None);
    cmd.arg("--no-defaults")
        .arg("--protocol=socket")
        .arg(format!("--socket={}", socket(dir).display()))
        .args(["-u", &admin_user()?, "--batch", "--skip-column-names"]);
    Ok(cmd)
}

/// Starts the server of `dir` on `port` (after a crash, InnoDB recovers first) and waits
/// until it accepts sessions.
pub(super) fn start(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let run_as = run_as()?;
    let config = write_config(dir, spec, port, run_as.as_ref())?;
    create_private_dir(&socket_dir_for(dir), run_as.as_ref())?;
    let log = dir.join("mariadb.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .context("opening mariadb.log")?;
    let log_start = log_file.metadata().map_or(0, |m| m.len());
    let mut cmd = super::server_command("setsid", run_as.as_ref());
    cmd.arg("-f")
        .arg(find(SERVERS)?)
        .arg(format!("--defaults-file={}", config.display()))
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let status = cmd.status().context("running setsid")?;
    if !status.success() {
        bail!("starting mariadbd failed ({status})");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut ping = admin(dir)?;
        ping.args(["-e", "SELECT 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if ping.status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
        let said = read_tail(&log, log_start);
        if said.contains("[ERROR] Aborting") || Instant::now() > deadline {
            bail!("mariadbd did not start; its log says:\n{said}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pid(dir: &Path) -> Option<i32> {
    super::pid_from(&pid_file(dir), SERVERS)
}

/// Whether the server of `dir` runs.
pub(super) fn running(dir: &Path) -> bool {
    pid(dir).is_some()
}

/// Stops the server of `dir` (SIGTERM: a clean shutdown), if it runs.
pub(super) fn stop(dir: &Path) {
    if let Some(pid) = pid(dir) {
        super::terminate(pid);
    }
}
