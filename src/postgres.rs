//! The embedded Postgres cluster: finds the system's Postgres binaries, initialises a cluster
//! in rack's data directory and runs it on a private unix socket, tied to this process's life.
//! `rack server` uses it when no `DATABASE_URL` is given; the test harness uses the same code.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::postgres::PgConnectOptions;

/// Port number of the private cluster. It only names the socket file (`.s.PGSQL.5432`) in a
/// directory that belongs to this cluster, so it never clashes with another server.
const PORT: u16 = 5432;

/// Linux caps a unix socket path at 107 bytes; the socket file name takes 16 of them.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// The watchdog that runs postgres. It stops postgres (fast shutdown) when its standard input
/// reaches end of file: when rack closes the pipe on a clean stop, and also when rack dies
/// without a chance to clean up (the kernel closes the pipe), so a cluster never outlives rack.
/// `RACK_PG_REMOVE`, when set, names a directory to delete once postgres has exited.
const WATCHDOG: &str = r#"
exec 3<&0
"$@" 3<&- </dev/null &
pg=$!
(cat >/dev/null; kill -INT "$pg" 2>/dev/null) <&3 &
wait "$pg"
status=$?
if [ -n "$RACK_PG_REMOVE" ]; then rm -rf "$RACK_PG_REMOVE"; fi
exit "$status"
"#;

/// How a cluster is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A server's cluster: every commit reaches the disk.
    Durable,
    /// A throwaway cluster (tests): no fsync, and its directory is deleted when it stops.
    Ephemeral,
}

/// The user that owns and runs the cluster. Postgres refuses to run as root, so when rack runs
/// as root the cluster belongs to the `postgres` system user that Debian's package creates.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) uid: nix::unistd::Uid,
    pub(crate) gid: nix::unistd::Gid,
}

/// A running private Postgres cluster.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    durability: Durability,
    socket_dir: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Cluster {
    /// Initialises the cluster under `root` if it does not exist yet, starts it and waits until
    /// it accepts connections. A second start on the same `root` reuses the cluster and its data.
    ///
    /// # Errors
    /// When the Postgres binaries are missing (the message says how to install them), when
    /// `initdb` fails, or when the server does not come up within 60 seconds.
    pub fn start(root: &Path, durability: Durability) -> anyhow::Result<Self> {
        let bin = find_bin_dir()?;
        let run_as = run_as()?;
        let pgdata = root.join("data");
        let socket_dir = socket_dir_for(root);
        let log_path = root.join("postgres.log");

        create_private_dir(root, run_as.as_ref())?;
        create_private_dir(&socket_dir, run_as.as_ref())?;
        if !pgdata.join("PG_VERSION").exists() {
            initdb(&bin, &pgdata, run_as.as_ref(), durability)
                .with_context(|| format!("initialising the Postgres cluster in {}", pgdata.display()))?;
        }

        wait_for_previous_postmaster(&pgdata)?;

        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let log_start = log.metadata()?.len();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("rack-postgres")
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&pgdata)
            .arg("-k")
            .arg(&socket_dir)
            .arg("-p")
            .arg(PORT.to_string())
            .args(["-c", "listen_addresses=", "-c", "unix_socket_permissions=0700"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir("/")
            // Its own process group: a Ctrl-C in rack's terminal must not reach postgres
            // directly, or it would stop while rack is still draining requests.
            .process_group(0);
        if durability == Durability::Ephemeral {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .env("RACK_PG_REMOVE", root);
        }
        if let Some(user) = &run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let mut child = cmd.spawn().context("starting postgres")?;
        let stdin = child.stdin.take();
        let mut cluster = Self {
            root: root.to_path_buf(),
            durability,
            socket_dir,
            child,
            stdin,
        };
        cluster.wait_ready(&pgdata, &log_path, log_start)?;
        Ok(cluster)
    }

    /// Waits until the server's socket accepts connections, or reports why it did not.
    fn wait_ready(&mut self, pgdata: &Path, log_path: &Path, log_start: u64) -> anyhow::Result<()> {
        let socket = self.socket_dir.join(format!(".s.PGSQL.{PORT}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "postgres exited ({status}) while starting; its log says:\n{}",
                    read_tail(log_path, log_start)
                );
            }
            // As pg_ctl does: the 8th line of postmaster.pid says "ready" once the server
            // accepts sessions (the socket exists earlier, during crash recovery).
            let ready = std::fs::read_to_string(pgdata.join("postmaster.pid"))
                .is_ok_and(|pid| pid.lines().nth(7).is_some_and(|status| status.trim() == "ready"));
            if ready && socket.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not start within 60 s; its log says:\n{}",
                    read_tail(log_path, log_start)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server has exited (crashed, or was stopped behind rack's back).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts the server again on the same directory (after it died).
    ///
    /// # Errors
    /// As [`Cluster::start`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        *self = Self::start(&self.root, self.durability)?;
        Ok(())
    }

    /// Connection options for `database` on this cluster, as the `postgres` superuser.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(PORT)
            .username("postgres")
            .database(database)
    }

    /// A `postgres://` URL for `database` on this cluster (over the unix socket).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@localhost:{PORT}/{database}?host={}",
            self.socket_dir.display()
        )
    }

    /// The directory that holds the cluster.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stops the server (fast shutdown: open sessions are ended, committed data is kept) and
    /// waits for it to exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        // Closing the pipe is the stop signal (see WATCHDOG).
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("postgres did not stop within 60 s and was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.stdin.is_some()
            && let Err(error) = self.stop_inner()
        {
            tracing::warn!(error = %error, "stopping the embedded postgres");
        }
    }
}

/// How long a postmaster left by a previous rack (killed with -9, its watchdog now stopping
/// it) gets to finish its shutdown before it is told to quit at once.
const PREVIOUS_POSTMASTER_GRACE: Duration = Duration::from_secs(30);

/// Waits until no postmaster of an earlier rack runs on `pgdata`. When rack is killed, the
/// watchdog stops its postmaster, which takes a moment: a supervisor restarting rack at once
/// would otherwise find the cluster locked ("Is another postmaster running?"). One that does
/// not stop within the grace period gets SIGQUIT (immediate shutdown; crash recovery follows).
///
/// # Errors
/// When a postmaster is still there after SIGQUIT.
fn wait_for_previous_postmaster(pgdata: &Path) -> anyhow::Result<()> {
    let Some(pid) = previous_postmaster(pgdata) else {
        return Ok(());
    };
    tracing::info!(pid, "waiting for the postmaster of a previous rack (pid {pid}) to stop");
    let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let wait = |limit: Duration| {
        let deadline = Instant::now() + limit;
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        !alive()
    };
    if wait(PREVIOUS_POSTMASTER_GRACE) {
        return Ok(());
    }
    tracing::warn!(pid, "the previous postmaster (pid {pid}) did not stop; sending SIGQUIT");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGQUIT);
    if wait(Duration::from_secs(10)) {
        return Ok(());
    }
    bail!(
        "a postmaster (pid {pid}) still runs on {} and does not stop: stop it, then start rack again",
        pgdata.display()
    )
}

/// The pid in `pgdata`'s `postmaster.pid`, if that process is alive and is a postgres.
fn previous_postmaster(pgdata: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 || pid == i32::try_from(std::process::id()).unwrap_or(0) {
        return None;
    }
    // A stale file whose pid now belongs to something else is postgres's own business.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains("postgres").then_some(pid)
}

/// The directory of `postgres`, `initdb` and friends: `pg_config --bindir` when it exists,
/// otherwise the newest `/usr/lib/postgresql/*/bin` (Debian's layout), otherwise `PATH`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    if let Some(dir) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
    {
        return Ok(dir);
    }
    bail!(
        "the Postgres server binaries (initdb, postgres) were not found. Install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu), or set DATABASE_URL to use an \
         existing Postgres server"
    )
}

pub(crate) fn run_as() -> anyhow::Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")?.context(
        "rack runs as root and Postgres refuses to: create a `postgres` system user \
         (Debian's postgresql package does), run rack as another user, or set DATABASE_URL",
    )?;
    Ok(Some(RunAs {
        uid: user.uid,
        gid: user.gid,
    }))
}

/// The socket directory sits inside the cluster's root unless that path is too long for a
/// unix socket; then it moves to the temp directory under a name derived from the root.
pub(crate) fn socket_dir_for(root: &Path) -> PathBuf {
    let inside = root.join("run");
    if inside.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
        return inside;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join(format!("rack-pg-{name}"))
}

/// Creates `dir` (mode 0700) owned by the cluster's user. Its parent must let that user in.
pub(crate) fn create_private_dir(dir: &Path, owner: Option<&RunAs>) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(user) = owner {
        std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("giving {} to the postgres user", dir.display()))?;
        // The postgres user must be able to walk down to the cluster's directory.
        let mut parent = dir.parent();
        while let Some(p) = parent {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(p)?;
            let search_bit = if meta.uid() == user.uid.as_raw() {
                0o100
            } else if meta.gid() == user.gid.as_raw() {
                0o010
            } else {
                0o001
            };
            if meta.mode() & search_bit == 0 {
                bail!(
                    "the postgres user cannot reach {}: it may not enter {} (mode {:o}). \
                     Choose another data directory (RACK_DATA), or `chmod o+x` that directory",
                    dir.display(),
                    p.display(),
                    meta.mode() & 0o777
                );
            }
            parent = p.parent();
        }
    }
    Ok(())
}

fn initdb(bin: &Path, pgdata: &Path, run_as: Option<&RunAs>, durability: Durability) -> anyhow::Result<()> {
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D")
        .arg(pgdata)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
        .current_dir("/")
        .stdin(Stdio::null());
    if durability == Durability::Ephemeral {
        cmd.arg("--no-sync");
    }
    if let Some(user) = run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let out = cmd.output().context("running initdb")?;
    if !out.status.success() {
        bail!(
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The part of the log written since `from`, at most its last 4 KiB.
pub(crate) fn read_tail(path: &Path, from: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(from.max(len.saturating_sub(4096))))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(text)
    };
    read().unwrap_or_else(|e| format!("(could not read {}: {e})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_roots_move_the_socket_to_the_temp_dir() {
        let short = Path::new("/var/lib/rack/postgres");
        assert_eq!(socket_dir_for(short), short.join("run"));
        let long = PathBuf::from(format!("/{}", "x".repeat(120)));
        let dir = socket_dir_for(&long);
        assert!(dir.starts_with(std::env::temp_dir()));
        assert!(dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN);
    }
}
