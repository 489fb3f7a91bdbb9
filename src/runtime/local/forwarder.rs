//! How a container reaches its app's resources. Resource servers listen on 127.0.0.1 of the
//! host (see `resources`), and the variables linked into processes name `127.0.0.1:<port>`;
//! a container has a network namespace of its own (user-mode networking, with the host's
//! loopback out of reach: it holds rack's API, its Postgres and every other app's ports). So
//! for each container that links resources, a forwarder listens on `127.0.0.1:<port>` of each
//! linked resource *inside the container's namespace* and relays every connection to the same
//! port of the host's loopback. The variables are the same in both modes, and a container
//! reaches exactly its linked resources and nothing else of the host.
//!
//! An app's sandboxed processes share a network namespace of their own (see `app_network`),
//! served the same way: its forwarders listen in the namespace of the app network's holder
//! process, and exit with it.
//!
//! A socket belongs to the namespace it was made in: the forwarder makes its listeners from a
//! thread that has joined the container's namespace (`setns`, by `/proc/<pid>/ns/net`), and
//! connects to the resources from its other threads, still in the host's. That needs root
//! (rack runs rootful containers then); a rack that is not root refuses to deploy a container
//! that links resources, saying so (see `instance::Launch`).
//!
//! The forwarder is a process of its own (`rack resource-forwarder`, hidden), detached from rack
//! as the containers and resource servers are: a restart or a kill -9 of rack breaks no
//! connection of an app, and a container's worker keeps reaching its database while rack is
//! down. It watches its container's first process (a pidfd) and exits with it. It makes its
//! listeners, drops root (it runs on as `nobody`: it relays traffic from the app), prints
//! `ready`, and only then does rack start the container (created and initialised first, so
//! its namespace exists): the app's command finds its resources from its first instruction.
//! When rack adopts a running container after a restart, it starts a forwarder again if the
//! container's namespace lacks one of its listeners (the ports are in the container's
//! `rack.forward` label).

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

/// The hidden subcommand of rack that runs a forwarder.
pub const SUBCOMMAND: &str = "resource-forwarder";

/// How long a forwarder may take to make its listeners (generous: a loaded host may take
/// seconds to start a process).
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The most connections one forwarder relays at once (a container opening connections without
/// end must not take all of the host's file descriptors); more wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;

/// Starts forwarders.
#[derive(Debug, Clone)]
pub struct Forwarders {
    /// The rack binary (`/proc/self/exe`, or the tests' `rack`).
    pub program: PathBuf,
}

impl Forwarders {
    /// Starts a forwarder of `ports` into the network namespace of process `pid` (a created
    /// container's first process); returns once it listens there.
    ///
    /// # Errors
    /// Why it could not (the forwarder's own message).
    pub async fn start(&self, pid: u32, ports: &[u16]) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        if pid == 0 {
            return Err("the container has no process to forward into".to_owned());
        }
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg(SUBCOMMAND)
            .arg("--pid")
            .arg(pid.to_string())
            .args(ports.iter().map(u16::to_string))
            .env_clear()
            .env("LC_ALL", "C")
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // A group of its own: a signal to rack's group (a terminal's Ctrl-C) must not reach it.
        command.as_std_mut().process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting the resource forwarder: {e}"))?;
        let stdout = child.stdout.take().ok_or("the forwarder has no output")?;
        let mut said = String::new();
        let read = tokio::time::timeout(READY_WITHIN, tokio::io::BufReader::new(stdout).read_line(&mut said)).await;
        if said.trim() == "ready" {
            // It lives on without rack; reaped here while rack runs.
            tokio::spawn(async move { child.wait().await });
            return Ok(());
        }
        let _ = child.start_kill();
        let output = child.wait_with_output().await.ok();
        let stderr = output
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        Err(match read {
            Err(_) => format!(
                "the resource forwarder was not ready within {}s",
                READY_WITHIN.as_secs()
            ),
            Ok(_) if stderr.is_empty() => "the resource forwarder exited".to_owned(),
            Ok(_) => format!("the resource forwarder: {stderr}"),
        })
    }

    /// Makes sure forwarders of `ports` serve the namespace of process `pid` (a container
    /// adopted after a restart, an app's network): starts one for the ports without a listener.
    ///
    /// # Errors
    /// As [`Forwarders::start`].
    pub async fn ensure(&self, pid: u32, ports: &[u16]) -> Result<(), String> {
        let missing: Vec<u16> = ports.iter().copied().filter(|port| !listening(pid, *port)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.start(pid, &missing).await
    }
}

/// Whether something listens on `127.0.0.1:<port>` in the network namespace of `pid` (procfs
/// shows each process's namespace).
fn listening(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    // `sl local_address rem_address st ...`; state 0A is LISTEN.
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(local.as_str()) && fields.nth(1) == Some("0A")
    })
}

/// The ports of a container's `rack.forward` label (`5432,6379`).
pub fn parse_ports(label: &str) -> Vec<u16> {
    label.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

/// The `rack.forward` label of `ports`.
pub fn ports_label(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The forwarder itself (`rack resource-forwarder --pid PID PORT...`): listens on each port of
/// 127.0.0.1 in the namespace of process `pid`, relays to the same port of the host's
/// loopback, and exits when that process does.
///
/// # Errors
/// When it cannot listen there (reported on standard error before `ready`).
pub async fn serve(pid: u32, ports: &[u16]) -> anyhow::Result<()> {
    anyhow::ensure!(!ports.is_empty(), "no port to forward");
    // First: from now on `pid` names this process, never a later one with the same number.
    let exited = ProcessExit::open(pid)?;
    let listeners = listen_in(pid, ports)?;
    anyhow::ensure!(!exited.has_exited(), "process {pid} has exited");
    drop_root()?;
    let mut out = std::io::stdout();
    // rack may be gone already: the container is then never started, and this exits with it.
    let _ = writeln!(out, "ready").and_then(|()| out.flush());
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    for (listener, port) in listeners.into_iter().zip(ports.iter().copied()) {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(relay(listener, port, permits.clone()));
    }
    exited.wait().await
}

/// Accepts connections on `listener` (in the container's namespace) and relays each to
/// `127.0.0.1:<port>` of the host.
async fn relay(listener: tokio::net::TcpListener, port: u16, permits: Arc<tokio::sync::Semaphore>) {
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut inside, _)) = listener.accept().await else {
            // Out of descriptors for a moment: not a reason to stop serving.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            // Refused (the resource is down): the app sees its connection closed.
            let Ok(mut host) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
                return;
            };
            let _ = inside.set_nodelay(true);
            let _ = host.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
        });
    }
}

/// Listeners on `127.0.0.1:<port>` for each of `ports`, made in the network namespace of `pid`
/// by a thread that joins it (the process's other threads stay in the host's).
fn listen_in(pid: u32, ports: &[u16]) -> anyhow::Result<Vec<TcpListener>> {
    let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("opening the network namespace of process {pid}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("joining the container's network namespace (rack must be root)")?;
                ports
                    .iter()
                    .map(|port| {
                        TcpListener::bind((Ipv4Addr::LOCALHOST, *port))
                            .with_context(|| format!("listening on 127.0.0.1:{port} in the container"))
                    })
                    .collect()
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the namespace thread panicked")))
    })
}

/// Runs on as `nobody`, when root: the forwarder relays what an app sends, and needs no
/// privilege once it listens.
fn drop_root() -> anyhow::Result<()> {
    use nix::unistd::{Gid, Uid, User, setgid, setgroups, setuid};
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let (uid, gid) = match User::from_name("nobody").ok().flatten() {
        Some(user) => (user.uid, user.gid),
        None => (Uid::from_raw(65534), Gid::from_raw(65534)),
    };
    setgroups(&[]).context("dropping groups")?;
    setgid(gid).context("becoming nobody")?;
    setuid(uid).context("becoming nobody")?;
    Ok(())
}

/// The end of a process, through a pidfd (which keeps naming that process, whatever later
/// takes its number).
struct ProcessExit(OwnedFd);

impl ProcessExit {
    fn open(pid: u32) -> anyhow::Result<Self> {
        let number = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw);
        let pid = number.with_context(|| format!("{pid} is not a process id"))?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map(Self)
            .with_context(|| format!("watching process {pid:?} (pidfd_open)"))
    }

    /// Whether it has exited (its pidfd is readable then), waiting up to `timeout` (`None`:
    /// for as long as it takes).
    fn exited_within(&self, timeout: Option<&rustix::event::Timespec>) -> bool {
        loop {
            let mut fds = [rustix::event::PollFd::new(&self.0, rustix::event::PollFlags::IN)];
            match rustix::event::poll(&mut fds, timeout) {
                Err(rustix::io::Errno::INTR) => {}
                Ok(ready) => return ready > 0,
                Err(_) => return true,
            }
        }
    }

    fn has_exited(&self) -> bool {
        self.exited_within(Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }))
    }

    /// Returns once it has exited.
    async fn wait(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || self.exited_within(None))
            .await
            .context("watching the container")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        assert_eq!(ports_label(&[5432, 6379]), "5432,6379");
        assert_eq!(parse_ports("5432,6379"), vec![5432, 6379]);
        assert_eq!(parse_ports(""), Vec::<u16>::new());
    }

    #[tokio::test]
    async fn a_namespace_reaches_the_hosts_port_through_the_forwarder_until_its_process_exits() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: joining a network namespace needs root");
            return;
        }
        // The host's server: says hello to each connection.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in server.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.write_all(b"hello from the host\n");
            }
        });
        // A process in a network namespace of its own (with its loopback up).
        let mut holder = tokio::process::Command::new("unshare")
            .args([
                "--net",
                "--",
                "/bin/sh",
                "-c",
                "ip link set lo up; echo ready; exec sleep 60",
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut ready = String::new();
        tokio::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut ready)
            .await
            .unwrap();
        let pid = holder.id().unwrap();
        let connect = || {
            tokio::process::Command::new("nsenter")
                .args([
                    "--net",
                    &format!("--target={pid}"),
                    "--",
                    "timeout",
                    "5",
                    "/bin/bash",
                    "-c",
                ])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port} && cat <&3"))
                .output()
        };
        let before = connect().await.unwrap();
        assert!(!before.status.success(), "nothing listens in the namespace yet");

        let exited = ProcessExit::open(pid).unwrap();
        let listeners = listen_in(pid, &[port]).unwrap();
        assert!(listening(pid, port));
        let listener = listeners.into_iter().next().unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(relay(listener, port, Arc::new(tokio::sync::Semaphore::new(4))));
        let through = connect().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&through.stdout), "hello from the host\n");

        assert!(!exited.has_exited());
        holder.kill().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), exited.wait())
            .await
            .expect("the exit is seen")
            .unwrap();
    }

    #[test]
    fn a_listener_shows_in_procfs() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening(std::process::id(), port));
        // A port bound but not listening does not count. It stays bound through the check: a
        // port merely freed could be taken at once by another test of this process (seen in a
        // full run), and the table is the whole network namespace's.
        let bound = tokio::net::TcpSocket::new_v4().unwrap();
        bound.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let idle = bound.local_addr().unwrap().port();
        assert!(!listening(std::process::id(), idle));
    }
}
