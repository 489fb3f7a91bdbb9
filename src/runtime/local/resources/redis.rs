//! A redis resource: Debian's redis-server, daemonized (detached from rack, it outlives it),
//! on 127.0.0.1 with the resource's password, appending every write to its AOF. As root it
//! runs as the `redis` user of Debian's package, never as root: the app's password must not
//! be a way to write files as root.

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

/// Creates the resource's directories and starts its server.
pub(super) fn create(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let run_as = run_as()?;
    create_private_dir(dir, run_as.as_ref())?;
    create_private_dir(&dir.join("data"), run_as.as_ref())?;
    start(dir, spec, port)
}

/// Writes the server's configuration (with the password: readable by its user only) and
/// starts it; returns once it answers, with its data loaded. The data an import that did not
/// finish moved aside (rack died half-way) is put back first: the import never happened.
pub(super) fn start(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let aside = dir.join(ASIDE);
    if aside.exists() {
        let data = dir.join("data");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::rename(&aside, &data).context("putting back the data an unfinished import moved aside")?;
    }
    launch(dir, spec, port, true)
}

/// Where an import keeps the resource's data until the imported data is safe in the AOF.
const ASIDE: &str = "data.before-import";

/// Starts the server of `dir` with its AOF on (`appendonly`) or off (then it loads
/// `data/dump.rdb`); returns once it answers, with its data loaded.
fn launch(dir: &Path, spec: &ResourceSpec, port: u16, appendonly: bool) -> anyhow::Result<()> {
    let run_as = run_as()?;
    let memory = super::memory_mb(spec);
    let appendonly = if appendonly { "yes" } else { "no" };
    let config = format!(
        "bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize yes\n\
         pidfile {dir}/redis.pid\nlogfile {dir}/redis.log\ndir {dir}/data\n\
         requirepass {password}\nmaxmemory {memory}mb\nmaxmemory-policy noeviction\n\
         appendonly {appendonly}\nappendfsync everysec\nsave 3600 1 300 100 60 10000\n",
        dir = dir.display(),
        password = spec.credentials.password,
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

/// Replaces the data of the resource in `dir` (its server on `port`) with the RDB file `rdb`:
/// the server stops, its data moves aside, it starts with its AOF off so that it loads the RDB,
/// then `CONFIG SET appendonly yes` writes the AOF from that dataset, and it restarts as usual
/// (from the AOF), holding as many keys as it loaded. On any failure the old data is put back
/// and the server started on it.
pub(super) fn restore(dir: &Path, spec: &ResourceSpec, port: u16, rdb: &Path) -> anyhow::Result<()> {
    let data = dir.join("data");
    let aside = dir.join(ASIDE);
    stop(dir);
    if aside.exists() {
        // An earlier import that died half-way: its moved-aside data is the resource's.
        let _ = std::fs::remove_dir_all(&data);
        std::fs::rename(&aside, &data).context("putting back the data an unfinished import moved aside")?;
    }
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
            let _ = std::fs::remove_dir_all(&data);
            let back = std::fs::rename(&aside, &data)
                .context("putting the old data back")
                .and_then(|()| launch(dir, spec, port, true));
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
    let data = dir.join("data");
    create_private_dir(&data, run_as.as_ref())?;
    let dump = data.join("dump.rdb");
    std::fs::copy(rdb, &dump).context("copying the RDB file")?;
    std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o600))?;
    if let Some(user) = &run_as {
        std::os::unix::fs::chown(&dump, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    launch(dir, spec, port, false).context("loading the RDB file")?;
    let password = &spec.credentials.password;
    let keys = command(port, password, &["DBSIZE"])?;
    command(port, password, &["CONFIG", "SET", "appendonly", "yes"])?;
    // The AOF is rewritten from the dataset in the background.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = command(port, password, &["INFO", "persistence"])?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        if field("aof_rewrite_in_progress") == "0"
            && field("aof_rewrite_scheduled") == "0"
            && field("aof_rewrites").parse::<u64>().is_ok_and(|n| n > 0)
        {
            if field("aof_last_bgrewrite_status") != "ok" {
                bail!("redis could not write its AOF from the imported data");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("redis did not write its AOF from the imported data within 600 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Restarted as it always runs (from the AOF), it must hold what it loaded.
    stop(dir);
    launch(dir, spec, port, true)?;
    let reloaded = command(port, password, &["DBSIZE"])?;
    if reloaded != keys {
        bail!("redis holds {reloaded} keys after a restart, and loaded {keys} from the RDB file");
    }
    Ok(())
}

/// Runs one command (`args`, as a RESP array) on the server on `port` after authenticating;
/// its reply as text (a status, an integer or a bulk string), or its error.
fn command(port: u16, password: &str, args: &[&str]) -> anyhow::Result<String> {
    use std::io::Read;
    let stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = Vec::new();
    for words in [&["AUTH", password][..], args] {
        request.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
        for word in words {
            request.extend_from_slice(format!("${}\r\n{word}\r\n", word.len()).as_bytes());
        }
    }
    (&stream).write_all(&request)?;
    let mut reader = BufReader::new(&stream);
    let mut auth = String::new();
    reader.read_line(&mut auth)?;
    if auth.trim() != "+OK" {
        bail!("redis refused its password");
    }
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end();
    let what = args.first().copied().unwrap_or_default();
    match line.split_at_checked(1) {
        Some(("+" | ":", rest)) => Ok(rest.to_owned()),
        Some(("$", len)) => {
            let len: usize = len
                .parse()
                .with_context(|| format!("redis answered {what} with {line:?}"))?;
            let mut bulk = vec![0; len + 2];
            reader.read_exact(&mut bulk)?;
            bulk.truncate(len);
            Ok(String::from_utf8_lossy(&bulk).into_owned())
        }
        Some(("-", error)) => bail!("redis refused {what}: {error}"),
        _ => bail!("redis answered {what} with {line:?}"),
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
