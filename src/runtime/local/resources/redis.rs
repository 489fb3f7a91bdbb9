//! A redis resource: Debian's redis-server, daemonized (detached from rack, it outlives it),
//! on 127.0.0.1 with the resource's password, appending every write to its AOF. As root it
//! runs as the `redis` user of Debian's package, never as root: the app's password must not
//! be a way to write files as root. A resource restored from a backup starts from the backup's
//! RDB file (see [`create`]); an import replaces its data with an RDB file (see [`restore`]).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::postgres::{RunAs, create_private_dir, read_tail};
use crate::resource::ResourceSpec;

const SERVER: &str = "redis-server";

/// The user redis runs as: `redis` when rack is root, else rack's own.
fn run_as() -> anyhow::Result<Option<RunAs>> {
    super::system_user("redis", "redis-server")
}

/// Creates the resource's directories and starts its server; with `seed` (an RDB file: a
/// backup's export), with that data.
pub(super) fn create(dir: &Path, spec: &ResourceSpec, port: u16, seed: Option<&Path>) -> anyhow::Result<()> {
    let run_as = run_as()?;
    create_private_dir(dir, run_as.as_ref())?;
    create_private_dir(&dir.join("data"), run_as.as_ref())?;
    let Some(seed) = seed else {
        return start(dir, spec, port);
    };
    // With its AOF on, redis ignores an RDB file as it starts: it starts without, loads the
    // RDB, then turns the AOF on (which writes the loaded data to it) before it counts as
    // created; its configuration then says AOF again, for every later start.
    place_rdb(dir, seed, run_as.as_ref())?;
    start_with(dir, spec, port, false)?;
    enable_aof(port, &spec.credentials.password)?;
    write_config(dir, spec, port, true)?;
    Ok(())
}

/// Copies the RDB file `rdb` into the data directory of `dir`, as the file redis loads when it
/// starts with its AOF off.
fn place_rdb(dir: &Path, rdb: &Path, run_as: Option<&RunAs>) -> anyhow::Result<()> {
    let dump = dir.join("data").join("dump.rdb");
    std::fs::copy(rdb, &dump).with_context(|| format!("copying {} into the resource", rdb.display()))?;
    std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o600))?;
    if let Some(user) = run_as {
        std::os::unix::fs::chown(&dump, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    Ok(())
}

/// Where an import keeps the resource's data until the imported data is safe in the AOF.
const ASIDE: &str = "data.before-import";

/// Puts back the data an import that did not finish moved aside (rack died half-way): the
/// import never happened.
fn put_back(dir: &Path) -> anyhow::Result<()> {
    let aside = dir.join(ASIDE);
    if aside.exists() {
        let data = dir.join("data");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::rename(&aside, &data).context("putting back the data an unfinished import moved aside")?;
    }
    Ok(())
}

/// Replaces the data of the resource in `dir` (its server on `port`) with the RDB file `rdb`:
/// the server stops, its data moves aside, it starts with its AOF off so that it loads the RDB,
/// then its AOF is turned on (written from that dataset), and it restarts as usual (from the
/// AOF), holding as many keys as it loaded. On any failure the old data is put back and the
/// server started on it.
pub(super) fn restore(dir: &Path, spec: &ResourceSpec, port: u16, rdb: &Path) -> anyhow::Result<()> {
    let data = dir.join("data");
    let aside = dir.join(ASIDE);
    stop(dir);
    put_back(dir)?;
    std::fs::rename(&data, &aside).context("moving the data aside")?;
    match load(dir, spec, port, rdb) {
        Ok(()) => {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                tracing::warn!(error = %e, "removing {}", aside.display());
            }
            Ok(())
        }
        Err(e) => {
            stop(dir);
            let back = put_back(dir).and_then(|()| start_with(dir, spec, port, true));
            match back {
                Ok(()) => Err(e.context("the import failed and the data is as it was")),
                Err(back) => Err(e.context(format!(
                    "the import failed, and so did restoring the old data: {back:#}"
                ))),
            }
        }
    }
}

/// The steps of [`restore`] once the old data is aside.
fn load(dir: &Path, spec: &ResourceSpec, port: u16, rdb: &Path) -> anyhow::Result<()> {
    let run_as = run_as()?;
    create_private_dir(&dir.join("data"), run_as.as_ref())?;
    place_rdb(dir, rdb, run_as.as_ref())?;
    start_with(dir, spec, port, false).context("loading the RDB file")?;
    let password = &spec.credentials.password;
    let keys = request(port, password, "DBSIZE")?;
    enable_aof(port, password)?;
    // Restarted as it always runs (from the AOF), it must hold what it loaded.
    stop(dir);
    start_with(dir, spec, port, true)?;
    let reloaded = request(port, password, "DBSIZE")?;
    if reloaded != keys {
        bail!("redis holds {reloaded} keys after a restart, and loaded {keys} from the RDB file");
    }
    Ok(())
}

/// Writes the server's configuration (with the password: readable by its user only) and
/// starts it; returns once it answers, with its data loaded (the data an unfinished import
/// moved aside put back first).
pub(super) fn start(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    put_back(dir)?;
    start_with(dir, spec, port, true)
}

/// Writes the server's configuration: its AOF on or not.
fn write_config(dir: &Path, spec: &ResourceSpec, port: u16, appendonly: bool) -> anyhow::Result<std::path::PathBuf> {
    let run_as = run_as()?;
    let memory = super::memory_mb(spec);
    let config = format!(
        "bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize yes\n\
         pidfile {dir}/redis.pid\nlogfile {dir}/redis.log\ndir {dir}/data\n\
         requirepass {password}\nmaxmemory {memory}mb\nmaxmemory-policy noeviction\n\
         appendonly {appendonly}\nappendfsync everysec\nsave 3600 1 300 100 60 10000\n",
        dir = dir.display(),
        password = spec.credentials.password,
        appendonly = if appendonly { "yes" } else { "no" },
    );
    let path = dir.join("redis.conf");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .context("writing redis.conf")?;
    file.write_all(config.as_bytes()).context("writing redis.conf")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(user) = &run_as {
        std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    Ok(path)
}

/// Starts the server with its configuration written anew.
fn start_with(dir: &Path, spec: &ResourceSpec, port: u16, appendonly: bool) -> anyhow::Result<()> {
    let run_as = run_as()?;
    let path = write_config(dir, spec, port, appendonly)?;
    let log = dir.join("redis.log");
    let log_start = std::fs::metadata(&log).map_or(0, |m| m.len());
    let mut cmd = Command::new(SERVER);
    cmd.arg(&path)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(user) = &run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let out = cmd.output().with_context(|| {
        format!("running {SERVER}: install it with `apt-get install -y redis-server` (scripts/install-deps does)")
    })?;
    if !out.status.success() {
        bail!(
            "{SERVER} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            read_tail(&log, log_start)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    // The daemon writes its pid file before it loads its data: a server gone for a second
    // exited (data it cannot load), and waiting on would only delay the error.
    let mut gone_since: Option<Instant> = None;
    loop {
        match ping(port, &spec.credentials.password) {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() > deadline => {
                bail!(
                    "redis did not answer within 120 s ({why}); its log says:\n{}",
                    read_tail(&log, log_start)
                )
            }
            Err(why) => {
                if running(dir) {
                    gone_since = None;
                } else if gone_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1) {
                    bail!("redis exited ({why}); its log says:\n{}", read_tail(&log, log_start))
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Authenticates and pings the server on `port`: an error until it answers PONG (it says
/// LOADING while it reads its AOF).
fn ping(port: u16, password: &str) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&stream).write_all(format!("AUTH {password}\r\nPING\r\n").as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let (mut auth, mut pong) = (String::new(), String::new());
    reader.read_line(&mut auth)?;
    reader.read_line(&mut pong)?;
    if auth.trim() == "+OK" && pong.trim() == "+PONG" {
        Ok(())
    } else {
        bail!("it answered {:?}", pong.trim())
    }
}

/// Sends `command` (inline) to the server on `port` after authenticating; its reply (a bulk
/// string's content, or a status line).
fn request(port: u16, password: &str, command: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    (&stream).write_all(format!("AUTH {password}\r\n{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let (mut auth, mut reply) = (String::new(), String::new());
    reader.read_line(&mut auth)?;
    if auth.trim() != "+OK" {
        bail!("redis refused rack's password: {}", auth.trim());
    }
    reader.read_line(&mut reply)?;
    let reply = reply.trim_end();
    if let Some(len) = reply.strip_prefix('$') {
        let len: usize = len.parse().context("a bulk reply's length")?;
        let mut body = vec![0; len + 2];
        reader.read_exact(&mut body)?;
        body.truncate(len);
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    if reply.starts_with('-') {
        bail!("redis answered {command:?} with {reply}");
    }
    Ok(reply.to_owned())
}

/// Turns the AOF of the server on `port` on and waits until it holds the data loaded (its
/// rewrite has finished).
fn enable_aof(port: u16, password: &str) -> anyhow::Result<()> {
    request(port, password, "CONFIG SET appendonly yes")?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let info = request(port, password, "INFO persistence")?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        let done = field("aof_enabled") == "1"
            && field("aof_rewrite_in_progress") == "0"
            && field("aof_rewrite_scheduled") == "0";
        if done {
            if field("aof_last_bgrewrite_status") != "ok" {
                bail!("redis could not write its AOF from the data it loaded (see redis.log)");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis did not finish writing its AOF from the data it loaded within an hour");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid of the server of `dir`, if it runs.
fn pid(dir: &Path) -> Option<i32> {
    super::pid_from(&dir.join("redis.pid"), &[SERVER])
}

/// Whether the server of `dir` runs.
pub(super) fn running(dir: &Path) -> bool {
    pid(dir).is_some()
}

/// Stops the server of `dir` (SIGTERM: it writes what it has, then exits), if it runs.
pub(super) fn stop(dir: &Path) {
    if let Some(pid) = pid(dir) {
        super::terminate(pid);
    }
}
