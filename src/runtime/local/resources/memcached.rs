//! A memcached resource: Debian's memcached on 127.0.0.1, its memory capped by the resource's
//! `memory` option, detached from rack (it outlives it) and adopted again after a restart. As
//! root it runs as the `memcache` user of Debian's package. Memcached has no users nor
//! passwords (Convox gives linked services none either): like any server on 127.0.0.1, it is
//! reachable by every process of this host, so it is for caching, not for secrets. It keeps
//! nothing on disk: a restart of the server (not of rack) empties it, as a cache may be.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::postgres::{RunAs, create_private_dir, read_tail};
use crate::resource::ResourceSpec;

const SERVER: &str = "memcached";

/// Writes its own pid to the file named by `$0`, then becomes the server: memcached writes a
/// pid file only when it daemonizes itself, which would send its errors to /dev/null.
const WITH_PID_FILE: &str = r#"echo $$ >"$0"; exec "$@""#;

fn run_as() -> anyhow::Result<Option<RunAs>> {
    super::system_user("memcache", "memcached")
}

/// Creates the resource's directory and starts its server.
pub(super) fn create(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    create_private_dir(dir, run_as()?.as_ref())?;
    start(dir, spec, port)
}

/// Starts the server on `port`, detached (`setsid -f`: its parent exits at once, so it is
/// nobody's child in rack), and returns once it answers.
pub(super) fn start(dir: &Path, spec: &ResourceSpec, port: u16) -> anyhow::Result<()> {
    let run_as = run_as()?;
    let log = dir.join("memcached.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .context("opening memcached.log")?;
    let log_start = log_file.metadata().map_or(0, |m| m.len());
    let memory = super::memory_mb(spec);
    let mut cmd = super::server_command("setsid", run_as.as_ref());
    cmd.args(["-f", "sh", "-c", WITH_PID_FILE])
        .arg(dir.join("memcached.pid"))
        .arg(SERVER)
        // TCP on 127.0.0.1 only (no UDP: it amplifies), the budget as its cache size, one
        // worker thread (an idle cache stays small).
        .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
        .args(["-m", &memory.to_string(), "-t", "1", "-c", "512"])
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let status = cmd.status().with_context(|| {
        format!("running {SERVER}: install it with `apt-get install -y memcached` (scripts/install-deps does)")
    })?;
    if !status.success() {
        bail!("starting {SERVER} failed ({status})");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer = version(port);
        if answer.is_ok() && running(dir) {
            return Ok(());
        }
        // Once its pid is known, a server that died says why in its log. Gone means no such
        // process: until `sh` has exec'd memcached, the pid is a shell's (on a busy machine
        // that takes a while), which is not a death.
        let died = written_pid(dir).is_some_and(|pid| nix::sys::signal::kill(pid, None).is_err());
        if died || Instant::now() > deadline {
            bail!(
                "memcached did not answer ({}); its log says:\n{}",
                answer.err().map_or_else(|| "it exited".to_owned(), |e| e.to_string()),
                read_tail(&log, log_start)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks the server on `port` for its version: an error until it answers.
fn version(port: u16) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&stream).write_all(b"version\r\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.starts_with("VERSION ") {
        Ok(())
    } else {
        bail!("it answered {:?}", line.trim())
    }
}

/// The pid in the pid file, whatever runs under it (the shell before it exec'd the server).
fn written_pid(dir: &Path) -> Option<nix::unistd::Pid> {
    let text = std::fs::read_to_string(dir.join("memcached.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0).then(|| nix::unistd::Pid::from_raw(pid))
}

fn pid(dir: &Path) -> Option<i32> {
    super::pid_from(&dir.join("memcached.pid"), &[SERVER])
}

/// Whether the server of `dir` runs.
pub(super) fn running(dir: &Path) -> bool {
    pid(dir).is_some()
}

/// Stops the server of `dir`, if it runs.
pub(super) fn stop(dir: &Path) {
    if let Some(pid) = pid(dir) {
        super::terminate(pid);
    }
}
