//! A user-mode network: a network namespace of its own with slirp4netns serving it, the kind
//! podman gives containers. Image builds get one each (buildah 1.28 run as root knows only its
//! bridge, which NATs to anything the host reaches, or the host's network; but it can join a
//! namespace by path: `--network ns:PATH`, see `Podman::build_command`), and each app's
//! sandboxed processes share one (see `app_network`). It is a holder process in a new network
//! namespace, and slirp4netns serving it without the host's loopback
//! (`--disable-host-loopback`: the API and the apps' ports on 127.0.0.1 are out of reach). Both
//! die with their owner, and with rack.

use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// How long making the namespace and starting slirp4netns may take.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A user-mode network namespace, alive while this lives.
#[derive(Debug)]
pub struct UserNetwork {
    holder: Child,
    _slirp: Child,
}

impl UserNetwork {
    /// Makes the namespace and starts slirp4netns in it.
    ///
    /// # Errors
    /// Why it could not be made (slirp4netns missing, or not ready in time).
    pub async fn start() -> Result<Self, String> {
        let mut holder = Command::new("setpriv");
        holder
            .args(["--pdeathsig", "KILL", "--", "unshare", "--net", "--", "/bin/sh", "-c"])
            // Printed from inside the new namespace: only then is it safe to configure.
            .arg("ip link set lo up 2>/dev/null; echo ready; exec sleep infinity")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
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
        let slirp = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "slirp4netns", "--configure", "--mtu=65520"])
            .arg("--disable-host-loopback")
            .arg(pid.to_string())
            .arg("tap0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "starting slirp4netns for a user-mode network: {e} (apt-get install -y slirp4netns; \
                     scripts/install-deps does)"
                )
            })?;
        let network = Self { holder, _slirp: slirp };
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
                return Err("slirp4netns did not configure a user-mode network in time".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process that holds the namespace (podman joins `/proc/<pid>/ns/net`).
    pub fn holder(&self) -> Option<u32> {
        self.holder.id()
    }

    /// Whether the holder has exited (the namespace is then gone, or going). Until this says so,
    /// the holder is an unreaped child of rack, so its pid names it and nothing else.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.holder.try_wait(), Ok(None))
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
