//! A user-mode network: a network namespace of its own with slirp4netns serving it, the kind
//! podman gives containers. Image builds get one each (buildah 1.28 run as root knows only its
//! bridge, which NATs to anything the host reaches, or the host's network; but it can join a
//! namespace by path: `--network ns:PATH`, see `Podman::build_command`), and each app's
//! sandboxed processes share one (see `app_network`). It is a holder process in a new network
//! namespace, and slirp4netns serving it without the host's loopback
//! (`--disable-host-loopback`: the API and the apps' ports on 127.0.0.1 are out of reach). Both
//! die with their owner, and with rack; an app's outlives rack, as its processes do (see
//! [`UserNetwork::start_kept`]).

use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// How long making the namespace and starting slirp4netns may take.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A user-mode network namespace, alive while this lives (a build's), or until its record file
/// is removed (an app's, kept across restarts of rack: see [`UserNetwork::start_kept`]).
#[derive(Debug)]
pub struct UserNetwork {
    holder: Option<Child>,
    _slirp: Option<Child>,
    pid: u32,
    /// The holder of a kept network, by pid and start time.
    kept: Option<super::keeper::Proc>,
}

/// The holder of a kept network: it lives while its record file (`$1`) is there, waiting a
/// while for rack to write it first (not once the records' directory is gone: a data directory
/// removed right after the record was written and removed again, as a test's is).
const KEPT_HOLDER: &str = r#"ip link set lo up 2>/dev/null; echo ready
i=0
until [ -e "$1" ]; do sleep 1; i=$((i+1)); [ "$i" -lt 120 ] && [ -d "${1%/*}" ] || exit 0; done
while [ -e "$1" ]; do sleep 2; done"#;

impl UserNetwork {
    /// Makes the namespace and starts slirp4netns in it; both die with rack.
    ///
    /// # Errors
    /// Why it could not be made (slirp4netns missing, or not ready in time).
    pub async fn start() -> Result<Self, String> {
        Self::start_with(None).await
    }

    /// [`UserNetwork::start`] for a network that outlives rack (an app's, whose processes do):
    /// the holder lives in a process group of its own until the file `record` is removed (it
    /// waits for rack to write it), and slirp4netns exits with the holder (its exit fd is a
    /// pipe only the holder writes to).
    ///
    /// # Errors
    /// As [`UserNetwork::start`].
    pub async fn start_kept(record: &std::path::Path) -> Result<Self, String> {
        Self::start_with(Some(record)).await
    }

    /// The kept network whose holder is `holder`, if it still runs.
    pub fn adopt(holder: super::keeper::Proc) -> Option<Self> {
        (holder.alive() && !same_namespace(holder.pid)).then_some(Self {
            holder: None,
            _slirp: None,
            pid: holder.pid,
            kept: Some(holder),
        })
    }

    async fn start_with(record: Option<&std::path::Path>) -> Result<Self, String> {
        let mut holder = match record {
            None => {
                let mut holder = Command::new("setpriv");
                holder
                    .args(["--pdeathsig", "KILL", "--", "unshare", "--net", "--", "/bin/sh", "-c"])
                    // Printed from inside the new namespace: only then is it safe to configure.
                    .arg("ip link set lo up 2>/dev/null; echo ready; exec sleep infinity")
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true);
                holder
            }
            Some(record) => {
                let mut holder = Command::new("unshare");
                holder
                    .args(["--net", "--", "/bin/sh", "-c", KEPT_HOLDER, "rack-network"])
                    .arg(record)
                    // A signal to rack's group (a terminal's Ctrl-C) must not reach it.
                    .process_group(0);
                holder
            }
        };
        // A kept network's slirp4netns reads the holder's end of this pipe (its exit fd).
        let exit_pipe = match record {
            Some(_) => {
                let (read, write) =
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("making a pipe: {e}"))?;
                holder.stderr(write);
                Some(read)
            }
            None => None,
        };
        holder
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut holder = holder
            .spawn()
            .map_err(|e| format!("making a user-mode network namespace: {e}"))?;
        let stdout = holder.stdout.take().ok_or("the namespace holder has no output")?;
        let mut ready = String::new();
        tokio::time::timeout(READY_WITHIN, tokio::io::BufReader::new(stdout).read_line(&mut ready))
            .await
            .map_err(|_| "a user-mode network namespace was not made in time".to_owned())?
            .map_err(|e| format!("making a user-mode network namespace: {e}"))?;
        let pid = holder.id().ok_or("the namespace holder exited")?;
        if ready.trim() != "ready" || same_namespace(pid) {
            return Err("a user-mode network namespace could not be made".to_owned());
        }
        let mut slirp = match &exit_pipe {
            None => {
                let mut slirp = Command::new("setpriv");
                slirp
                    .args(["--pdeathsig", "KILL", "--", "slirp4netns"])
                    .kill_on_drop(true);
                slirp
            }
            Some(_) => {
                let mut slirp = Command::new("slirp4netns");
                slirp.arg("--exit-fd=0").process_group(0);
                slirp
            }
        };
        slirp
            .args(["--configure", "--mtu=65520"])
            .arg("--disable-host-loopback")
            .arg(pid.to_string())
            .arg("tap0")
            .stdin(exit_pipe.map_or_else(std::process::Stdio::null, std::process::Stdio::from))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let slirp = slirp.spawn().map_err(|e| {
            format!(
                "starting slirp4netns for a user-mode network: {e} (apt-get install -y slirp4netns; \
                 scripts/install-deps does)"
            )
        })?;
        let kept = match record {
            Some(_) => Some(super::keeper::Proc::of(pid).ok_or("the namespace holder exited")?),
            None => None,
        };
        let network = Self {
            holder: Some(holder),
            _slirp: Some(slirp),
            pid,
            kept,
        };
        // Configured once the namespace has its default route (read through procfs, which shows
        // the holder's namespace), within a bounded time.
        let route = format!("/proc/{pid}/net/route");
        let started = tokio::time::Instant::now();
        loop {
            let routes = tokio::fs::read_to_string(&route).await.unwrap_or_default();
            if routes.lines().skip(1).any(|line| line.starts_with("tap0")) {
                return Ok(network);
            }
            if started.elapsed() > READY_WITHIN {
                network.end();
                return Err("slirp4netns did not configure a user-mode network in time".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process that holds the namespace (podman joins `/proc/<pid>/ns/net`).
    pub fn holder(&self) -> Option<u32> {
        Some(self.pid)
    }

    /// The holder of a kept network (what its record holds).
    pub fn kept_holder(&self) -> Option<super::keeper::Proc> {
        self.kept
    }

    /// Whether the holder has exited (the namespace is then gone, or going). Until this says so,
    /// the holder is an unreaped child of rack (or, adopted, the process of its start time), so
    /// its pid names it and nothing else.
    pub fn has_exited(&mut self) -> bool {
        if let Some(holder) = &mut self.holder
            && !matches!(holder.try_wait(), Ok(None))
        {
            return true;
        }
        self.kept.is_some_and(|holder| !holder.alive())
    }

    /// Ends a kept network now (its slirp4netns and forwarders exit with the holder); a build's
    /// ends when dropped.
    pub fn end(&self) {
        if let Some(holder) = self.kept
            && holder.alive()
            && let Ok(pid) = i32::try_from(holder.pid)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// slirp4netns' DNS forwarder, seen from inside a user-mode network.
const SLIRP_DNS: &str = "10.0.2.3";

/// What a sandbox in a user-mode network must see as its resolver configuration, when the
/// host's names only loopback resolvers (systemd-resolved's 127.0.0.53, a local dnsmasq): those
/// are out of reach there, so it gets slirp4netns' forwarder instead, which asks the host's.
/// Returns the file to show (written in `dir`) and where to show it (the host's
/// `/etc/resolv.conf`, followed to the file its links lead to, as bubblewrap binds files onto
/// paths, not onto links). `None` when the host's resolvers are reachable as they are.
pub fn resolver_for_sandboxes(dir: &std::path::Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let host = std::path::Path::new("/etc/resolv.conf");
    let text = std::fs::read_to_string(host).unwrap_or_default();
    if !loopback_only(&text) {
        return None;
    }
    let shown = std::fs::canonicalize(host).unwrap_or_else(|_| host.to_path_buf());
    let file = dir.join("resolv.conf");
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&file, format!("nameserver {SLIRP_DNS}\n")))
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            // Read by bubblewrap as the sandbox user.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
        });
    match written {
        Ok(()) => Some((file, shown)),
        Err(e) => {
            tracing::warn!("app processes may not resolve names: writing {}: {e}", file.display());
            None
        }
    }
}

/// Whether the resolver configuration `text` names only loopback servers (or none: the C
/// library then asks 127.0.0.1).
fn loopback_only(text: &str) -> bool {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .map(|rest| {
            rest.trim()
                .split('%')
                .next()
                .unwrap_or_default()
                .parse::<std::net::IpAddr>()
        })
        .all(|address| address.is_ok_and(|a| a.is_loopback()))
}

/// Whether `pid` is still in this process's network namespace (it must never be configured).
fn same_namespace(pid: u32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"));
    let ours = std::fs::read_link("/proc/self/ns/net");
    match (theirs, ours) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_resolvers_are_replaced() {
        assert!(loopback_only("nameserver 127.0.0.53\noptions edns0\n"));
        assert!(loopback_only("nameserver 127.0.0.1\nnameserver ::1\n"));
        assert!(loopback_only("# nothing\n"));
        assert!(!loopback_only("nameserver 10.255.255.53\n"));
        assert!(!loopback_only("nameserver 127.0.0.53\nnameserver 192.0.2.1\n"));
        assert!(!loopback_only("nameserver fe80::1%eth0\n"));
    }

    #[tokio::test]
    async fn a_build_network_is_a_namespace_of_its_own_without_the_hosts_loopback() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a network namespace needs root");
            return;
        }
        // A listener on the host's loopback that the build must not reach.
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = host.local_addr().unwrap().port();
        let network = UserNetwork::start().await.unwrap();
        let pid = network.holder().unwrap();
        assert!(!same_namespace(pid));
        // From inside: tap0 is there, and neither 127.0.0.1 nor slirp's host alias reach the
        // host's listener.
        for address in ["127.0.0.1", "10.0.2.2"] {
            let out = tokio::process::Command::new("nsenter")
                .args([
                    "--net",
                    &format!("--target={pid}"),
                    "--",
                    "timeout",
                    "5",
                    "/bin/bash",
                    "-c",
                ])
                .arg(format!(
                    "exec 3<>/dev/tcp/{address}/{port} && echo reached || echo refused"
                ))
                .output()
                .await
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(!said.contains("reached"), "{address}: {said}");
        }
        drop(network);
    }
}
