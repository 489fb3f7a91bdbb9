//! A postgres resource: a cluster of its own (the Postgres binaries rack already runs for its
//! embedded database), started with `pg_ctl` so that it is detached from rack and outlives it.
//! The app's role is not a superuser (a superuser could run programs as the cluster's system
//! user, which owns the other resources' files): rack administers the cluster as `postgres`,
//! over a unix socket in a directory only that user may enter; the app connects over TCP on
//! 127.0.0.1 with its password (scram-sha-256), to its own database only. A postgis resource
//! is the same cluster with the postgis extension created in the app's database.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::postgres::{RunAs, create_private_dir, find_bin_dir, read_tail, run_as, socket_dir_for};
use crate::resource::{Kind, ResourceSpec};

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

/// A command of the cluster's binaries, run as the cluster's user with a clean environment.
fn command(bin: &Path, name: &str, run_as: Option<&RunAs>) -> Command {
    let mut cmd = Command::new(bin.join(name));
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        // Its own process group: a signal to rack's group must not reach the server.
        .process_group(0);
    if let Some(user) = run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd
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

/// Initialises the cluster in `dir`, starts it on `port` and creates the app's role and
/// database with `spec`'s credentials.
pub(super) fn create(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let bin = find_bin_dir()?;
    let run_as = run_as()?;
    create_private_dir(dir, run_as.as_ref())?;
    let mut initdb = command(&bin, "initdb", run_as.as_ref());
    initdb.arg("-D").arg(data_dir(dir)).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    run(initdb, "initdb")?;
    let credentials = &spec.credentials;
    // Only rack, as `postgres`, over the private socket; the app's role, with its password,
    // over TCP to its database. Nothing else gets in.
    let hba = format!(
        "local all postgres trust\nhost {} {} 127.0.0.1/32 scram-sha-256\n",
        credentials.database, credentials.user
    );
    std::fs::write(data_dir(dir).join("pg_hba.conf"), hba).context("writing pg_hba.conf")?;
    start(dir, spec, port)?;
    let sql = format!(
        "create role \"{user}\" login password '{password}';\n\
         create database \"{database}\" owner \"{user}\";\n\
         revoke all on database postgres from public;\n\
         revoke all on database template1 from public;\n",
        user = credentials.user,
        password = credentials.password,
        database = credentials.database,
    );
    let mut psql = admin(&bin, dir, port, "postgres", "psql");
    psql.args(["-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = psql.spawn().context("running psql")?;
    // The password goes through the pipe, never on a command line.
    child
        .stdin
        .take()
        .context("psql's input")?
        .write_all(sql.as_bytes())
        .context("writing to psql")?;
    let out = child.wait_with_output().context("running psql")?;
    if !out.status.success() {
        bail!(
            "creating the app's role and database failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if spec.definition.kind == Kind::Postgis {
        create_postgis(&bin, dir, port, &credentials.database)?;
    }
    // initdb skipped its fsyncs (it is much faster); the whole cluster reaches the disk now.
    nix::unistd::sync();
    Ok(())
}

/// Creates the postgis extension in the app's `database` (as the cluster's superuser: postgis
/// is not a trusted extension), or says which package the host lacks.
fn create_postgis(bin: &Path, dir: &Path, port: u16, database: &str) -> anyhow::Result<()> {
    let query = "select exists (select 1 from pg_available_extensions where name = 'postgis'), \
                 current_setting('server_version_num')::int / 10000";
    let mut psql = admin(bin, dir, port, database, "psql");
    psql.args(["-qtA", "-F", " ", "-c", query]);
    let out = psql.output().context("running psql")?;
    let answer = String::from_utf8_lossy(&out.stdout);
    let (available, major) = answer.trim().split_once(' ').unwrap_or(("", ""));
    if !out.status.success() {
        bail!(
            "looking for the postgis extension failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if available != "t" {
        bail!(
            "postgis is not installed for this host's Postgres {major}: install it with \
             `apt-get install -y postgresql-{major}-postgis-3` (scripts/install-deps does), then deploy again"
        );
    }
    let mut create = admin(bin, dir, port, database, "psql");
    create.args([
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "create extension if not exists postgis",
    ]);
    run(create, "creating the postgis extension")
}

/// A client command (`psql`, `pg_dump`) connected as rack's administrator over the socket.
fn admin(bin: &Path, dir: &Path, port: u16, database: &str, name: &str) -> Command {
    let mut cmd = command(bin, name, None);
    cmd.arg("-h")
        .arg(socket_dir_for(dir))
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", database]);
    cmd
}

/// Starts the cluster in `dir` on `port` (after a crash, postgres recovers first) and waits
/// until it accepts sessions.
pub(super) fn start(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let bin = find_bin_dir()?;
    let run_as = run_as()?;
    let socket_dir = socket_dir_for(dir);
    create_private_dir(&socket_dir, run_as.as_ref())?;
    let memory = super::memory_mb(spec);
    // A quarter of the budget for shared buffers; few connections (each costs memory).
    let options = [
        format!("-p {port}"),
        format!("-k {}", shell_words::quote(&socket_dir.to_string_lossy())),
        "-c listen_addresses=127.0.0.1".to_owned(),
        "-c unix_socket_permissions=0700".to_owned(),
        format!("-c shared_buffers={}kB", (memory * 1024 / 4).max(128)),
        "-c max_connections=40".to_owned(),
        "-c work_mem=2MB".to_owned(),
        "-c maintenance_work_mem=16MB".to_owned(),
        "-c huge_pages=off".to_owned(),
    ]
    .join(" ");
    let log = dir.join("postgres.log");
    let log_start = std::fs::metadata(&log).map_or(0, |m| m.len());
    let mut pg_ctl = command(&bin, "pg_ctl", run_as.as_ref());
    pg_ctl
        .arg("start")
        .arg("-D")
        .arg(data_dir(dir))
        .args(["-w", "-t", "120", "-s", "-l"])
        .arg(&log)
        .arg("-o")
        .arg(options);
    if let Err(e) = run(pg_ctl, "pg_ctl start") {
        bail!("{e}; its log says:\n{}", read_tail(&log, log_start));
    }
    Ok(())
}

/// Whether the cluster in `dir` runs and accepts sessions.
pub(super) fn running(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(data_dir(dir).join("postmaster.pid")) else {
        return false;
    };
    let mut lines = text.lines();
    let Some(pid) = lines.next().and_then(|pid| pid.trim().parse::<i32>().ok()) else {
        return false;
    };
    // A stale file whose pid now belongs to something else is not our server.
    let is_postgres = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("postgres"));
    is_postgres && text.lines().nth(7).is_some_and(|status| status.trim() == "ready")
}

/// Stops the cluster in `dir` (fast shutdown), if it runs.
pub(super) fn stop(dir: &Path) {
    if !data_dir(dir).join("postmaster.pid").exists() {
        return;
    }
    let (Ok(bin), Ok(run_as)) = (find_bin_dir(), run_as()) else {
        return;
    };
    let mut pg_ctl = command(&bin, "pg_ctl", run_as.as_ref());
    pg_ctl
        .arg("stop")
        .arg("-D")
        .arg(data_dir(dir))
        .args(["-m", "fast", "-w", "-t", "60", "-s"]);
    if let Err(e) = run(pg_ctl, "pg_ctl stop") {
        tracing::warn!(error = %e, "stopping the postgres resource in {}", dir.display());
    }
}
