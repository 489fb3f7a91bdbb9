//! The local runtime's sandbox. Build commands and app processes run untrusted code, so they
//! run through bubblewrap: as an unprivileged user (when rack is root), in pid, mount, ipc and
//! uts namespaces of their own, seeing the system's programs read-only and, of rack's data,
//! only their own build directory. rack's environment, password file, objects and Postgres
//! data are never in their reach. App processes also join their app's network namespace (see
//! `app_network`), and their instance's cgroups (see `cgroups`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::process::Command;

/// The user sandboxed commands run as when rack runs as root (`scripts/install-deps` makes it).
pub const DEFAULT_USER: &str = "rack-sandbox";

/// Top-level directories that hold the system's programs and libraries; each is bound
/// read-only, or re-created as the same symlink (merged-/usr systems link most of them).
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc"];

/// An unprivileged account.
#[derive(Debug, Clone)]
struct Account {
    name: String,
    uid: u32,
    gid: u32,
}

/// How sandboxed commands are started.
#[derive(Debug, Clone)]
pub struct Sandbox {
    bwrap: PathBuf,
    /// Who they run as; `None` when rack is not root (they run as rack's own user).
    account: Option<Account>,
    /// `--ro-bind` / `--symlink` arguments that show the system's directories.
    system: Vec<String>,
    /// The network namespace sandboxes join (an app's); `None`: the host's.
    network: Option<PathBuf>,
    /// In a network of their own: the resolver configuration to show, and where (see
    /// `user_network::resolver_for_sandboxes`).
    resolver: Option<(PathBuf, PathBuf)>,
    /// Largest size of the private `/tmp` (a tmpfs, so memory), in bytes; 0: the kernel's
    /// default (half the RAM).
    tmp_bytes: u64,
}

/// Whether a sandboxed command dies with rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tie {
    /// Killed at once when rack goes (a build: nothing of it is worth keeping).
    DiesWithRack,
    /// Left to its own watchdog, which stops it gracefully (an app process).
    Watchdog,
}

impl Sandbox {
    /// Finds bubblewrap and, when rack is root, the unprivileged `user`; then checks that a
    /// sandbox can really be made here.
    ///
    /// # Errors
    /// When bubblewrap is missing, the user does not exist or is root, or the kernel refuses
    /// the namespaces; each message says what to install or change.
    pub fn open(user: &str, tmp_bytes: u64) -> anyhow::Result<Self> {
        let bwrap = find_on_path("bwrap").context(
            "bubblewrap (bwrap) is needed to isolate builds and app processes of the local runtime: \
             install it with `apt-get install -y bubblewrap` (scripts/install-deps does)",
        )?;
        let account = if nix::unistd::geteuid().is_root() {
            let found = nix::unistd::User::from_name(user)
                .with_context(|| format!("looking up the sandbox user {user}"))?
                .with_context(|| {
                    format!(
                        "the sandbox user {user} does not exist: builds and app processes run as it. \
                         Create it with `useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {user}` \
                         (scripts/install-deps does), or name another unprivileged user with RACK_SANDBOX_USER"
                    )
                })?;
            if found.uid.is_root() {
                bail!("RACK_SANDBOX_USER {user} is root: name an unprivileged user");
            }
            Some(Account {
                name: user.to_owned(),
                uid: found.uid.as_raw(),
                gid: found.gid.as_raw(),
            })
        } else {
            None
        };
        let sandbox = Self {
            bwrap,
            account,
            system: system_binds(Path::new("/")),
            network: None,
            resolver: None,
            tmp_bytes,
        };
        sandbox.probe()?;
        Ok(sandbox)
    }

    /// Whether sandboxed commands run as another user than rack's (rack is root).
    pub fn switches_user(&self) -> bool {
        self.account.is_some()
    }

    /// This sandbox, running as `uid` (and the group of the same number) instead of the
    /// sandbox user (an app's own, see `app_accounts`); unchanged when rack is not root.
    pub fn as_uid(&self, uid: u32) -> Self {
        let mut sandbox = self.clone();
        if sandbox.account.is_some() {
            sandbox.account = Some(Account {
                name: format!("uid {uid}"),
                uid,
                gid: uid,
            });
        }
        sandbox
    }

    /// Who sandboxed commands run as, for logs and messages.
    pub fn user(&self) -> String {
        match &self.account {
            Some(account) => account.name.clone(),
            None => nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name),
        }
    }

    /// A command that runs `argv` in a sandbox whose only writable view of the host is
    /// `workspace` (bound at the same path), starting in `cwd`, with an empty environment
    /// (the caller adds what the command may see).
    pub fn command(&self, workspace: &Path, cwd: &Path, argv: &[String], tie: Tie) -> Command {
        self.command_in(workspace, cwd, argv, tie, &[], false)
    }

    /// [`Sandbox::command`] whose processes all belong to the cgroups whose `cgroup.procs`
    /// files are `procs` (see `cgroups`).
    pub fn limited_command(
        &self,
        workspace: &Path,
        cwd: &Path,
        argv: &[String],
        tie: Tie,
        procs: &[PathBuf],
    ) -> Command {
        self.command_in(workspace, cwd, argv, tie, procs, false)
    }

    /// [`Sandbox::command`] on a terminal: the sandbox's first process gets a session of its
    /// own whose controlling terminal is its standard input (`setsid --ctty`).
    pub fn terminal_command(&self, workspace: &Path, cwd: &Path, argv: &[String], tie: Tie) -> Command {
        self.command_in(workspace, cwd, argv, tie, &[], true)
    }

    /// This sandbox, showing the file `resolver.0` at `resolver.1` when it is in a network of its
    /// own (see [`Sandbox::in_network`]).
    pub fn with_resolver(&self, resolver: Option<(PathBuf, PathBuf)>) -> Self {
        let mut sandbox = self.clone();
        sandbox.resolver = resolver;
        sandbox
    }

    /// This sandbox, joining the network namespace at `namespace` (an app's, see `app_network`)
    /// instead of staying in the host's. Only root may join one: without a sandbox user (rack
    /// is not root), this is the sandbox unchanged.
    pub fn in_network(&self, namespace: PathBuf) -> Self {
        let mut sandbox = self.clone();
        sandbox.network = Some(namespace);
        sandbox
    }

    /// [`Sandbox::command`] in the cgroups `procs`, on a terminal when `terminal`. What needs
    /// root (joining cgroups, the app's network namespace) is done by a root chain that then
    /// becomes the sandbox user (`setpriv`) and starts the sandbox, so not one instruction of
    /// the app runs outside its limits or its network. Without a sandbox user (rack is not
    /// root) the sandbox starts directly, as rack's user.
    pub fn command_in(
        &self,
        workspace: &Path,
        cwd: &Path,
        argv: &[String],
        tie: Tie,
        procs: &[PathBuf],
        terminal: bool,
    ) -> Command {
        let sandbox = self.arguments(workspace, cwd, argv, tie);
        let account = self.account.as_ref();
        let chain = account.filter(|_| !procs.is_empty() || self.network.is_some());
        let mut line: Vec<std::ffi::OsString> = Vec::new();
        if terminal {
            line.extend(["setsid".into(), "--ctty".into()]);
        }
        if let Some(account) = chain {
            if !procs.is_empty() {
                line.extend(["/bin/sh".into(), "-c".into(), JOIN_CGROUPS.into(), "rack-join".into()]);
                line.extend(procs.iter().map(Into::into));
                line.push("--".into());
            }
            if let Some(namespace) = &self.network {
                let mut net = std::ffi::OsString::from("--net=");
                net.push(namespace);
                line.extend(["/usr/bin/nsenter".into(), net, "--".into()]);
            }
            line.extend([
                "/usr/bin/setpriv".into(),
                format!("--reuid={}", account.uid).into(),
                format!("--regid={}", account.gid).into(),
                "--clear-groups".into(),
                "--".into(),
            ]);
        }
        line.push(self.bwrap.clone().into());
        line.extend(sandbox);
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..]).env_clear().current_dir("/");
        if chain.is_none()
            && let Some(account) = account
        {
            // Also drops rack's supplementary groups (std does when root changes uid).
            cmd.uid(account.uid).gid(account.gid);
        }
        cmd
    }

    /// The uid and gid a command of [`Sandbox::command_in`] with `procs` switches to itself
    /// (when no root chain does it first), for whoever starts it in rack's place (a keeper).
    pub fn direct_ids(&self, procs: &[PathBuf]) -> Option<(u32, u32)> {
        let account = self.account.as_ref()?;
        (procs.is_empty() && self.network.is_none()).then_some((account.uid, account.gid))
    }

    fn arguments(&self, workspace: &Path, cwd: &Path, argv: &[String], tie: Tie) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = [
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "rack",
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.extend(self.system.iter().map(Into::into));
        args.extend(["--proc", "/proc", "--dev", "/dev"].map(Into::into));
        if self.tmp_bytes > 0 {
            args.extend(["--size".into(), self.tmp_bytes.to_string().into()]);
        }
        args.extend(["--tmpfs", "/tmp", "--bind"].map(Into::into));
        args.extend([workspace.into(), workspace.into(), "--chdir".into(), cwd.into()]);
        if self.network.is_some()
            && let Some((file, shown)) = &self.resolver
        {
            args.extend(["--ro-bind".into(), file.into(), shown.into()]);
        }
        if tie == Tie::DiesWithRack {
            args.push("--die-with-parent".into());
        }
        args.push("--".into());
        args.extend(argv.iter().map(Into::into));
        args
    }

    /// Gives `dir` and everything under it to the sandbox user, so that sandboxed commands
    /// can write there, and closes `dir` to every other user (mode 0700: another app's uid
    /// cannot look in). Nothing to do when rack is not root: they run as rack's user.
    ///
    /// # Errors
    /// When a file cannot be given away.
    pub async fn hand_over(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(account) = self.account.clone() else {
            return Ok(());
        };
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            chown_tree(&dir, account.uid, account.gid)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// [`Sandbox::hand_over`] unless `dir` is already the sandbox user's (a build made before
    /// apps had uids of their own is given to its app's uid on its first start).
    ///
    /// # Errors
    /// When a file cannot be given away.
    pub async fn adopt(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        match &self.account {
            Some(account) if std::fs::metadata(dir)?.uid() != account.uid => self.hand_over(dir).await,
            _ => Ok(()),
        }
    }

    /// Runs `true` in a sandbox, so a machine that cannot make one fails at startup with the
    /// reason rather than at the first build.
    fn probe(&self) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().context("making a directory for the sandbox check")?;
        let mut cmd = std::process::Command::new(&self.bwrap);
        cmd.args(self.arguments(dir.path(), dir.path(), &["/bin/true".to_owned()], Tie::DiesWithRack))
            .env_clear()
            .current_dir("/")
            .stdin(std::process::Stdio::null());
        if let Some(account) = &self.account {
            std::os::unix::fs::chown(dir.path(), Some(account.uid), Some(account.gid))?;
            cmd.uid(account.uid).gid(account.gid);
        }
        let out = cmd.output().context("running bubblewrap")?;
        if !out.status.success() {
            bail!(
                "bubblewrap cannot make a sandbox on this machine ({}): {}. It needs user namespaces \
                 (sysctl kernel.unprivileged_userns_clone=1 where that setting exists), a data \
                 directory the sandbox user may enter, and bubblewrap 0.7 or later for \
                 RACK_SANDBOX_TMP_BYTES (0 leaves /tmp unbounded)",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Writes the shell's pid into each file before `--` (cgroups' `cgroup.procs`), then runs what
/// follows it.
const JOIN_CGROUPS: &str = r#"while [ "$1" != "--" ]; do echo $$ > "$1"; shift; done; shift; exec "$@""#;

/// The binds that show `root`'s system directories inside a sandbox.
fn system_binds(root: &Path) -> Vec<String> {
    let mut args = Vec::new();
    for name in SYSTEM_DIRS {
        let path = root.join(name);
        let target = format!("/{name}");
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if let Ok(link) = std::fs::read_link(&path) {
                    args.extend(["--symlink".to_owned(), link.to_string_lossy().into_owned(), target]);
                }
            }
            Ok(meta) if meta.is_dir() => {
                args.extend(["--ro-bind".to_owned(), path.to_string_lossy().into_owned(), target]);
            }
            _ => {}
        }
    }
    args
}

/// `chown -R` without following symlinks.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Where `program` is: the first directory of `PATH` that has it, else the system's own
/// directories (rack may run with a short `PATH`, as a service).
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/bin".into()])
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sandbox_in_a_network_joins_it_as_the_sandbox_user_and_sees_its_resolver() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: joining a network namespace needs root");
            return;
        }
        let sandbox = match Sandbox::open(DEFAULT_USER, 0) {
            Ok(sandbox) => sandbox,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let network = super::super::user_network::UserNetwork::start().await.unwrap();
        let holder = network.holder().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let resolver = dir.path().join("resolv.conf");
        std::fs::write(&resolver, "nameserver 10.0.2.3\n").unwrap();
        sandbox.hand_over(dir.path()).await.unwrap();
        let inside = sandbox
            .with_resolver(Some((resolver, "/etc/resolv.conf".into())))
            .in_network(format!("/proc/{holder}/ns/net").into());
        let script = "readlink /proc/self/ns/net; id -u; cat /etc/resolv.conf".to_owned();
        let out = inside
            .command_in(
                dir.path(),
                dir.path(),
                &["/bin/sh".to_owned(), "-c".to_owned(), script],
                Tie::DiesWithRack,
                &[],
                false,
            )
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = said.lines();
        let theirs = std::fs::read_link(format!("/proc/{holder}/ns/net")).unwrap();
        assert_eq!(
            lines.next(),
            theirs.to_str(),
            "{said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(lines.next(), Some("0"), "{said}");
        assert_eq!(lines.next(), Some("nameserver 10.0.2.3"), "{said}");
        // Outside a network, the host's resolver configuration as it is.
        let out = sandbox
            .with_resolver(Some((dir.path().join("resolv.conf"), "/etc/resolv.conf".into())))
            .command(
                dir.path(),
                dir.path(),
                &["/bin/cat".to_owned(), "/etc/resolv.conf".to_owned()],
                Tie::DiesWithRack,
            )
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        assert_eq!(out.stdout, std::fs::read("/etc/resolv.conf").unwrap());
    }

    #[tokio::test]
    async fn a_sandboxs_tmp_is_a_tmpfs_of_bounded_size() {
        let sandbox = match Sandbox::open(DEFAULT_USER, 1 << 20) {
            Ok(sandbox) => sandbox,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        sandbox.hand_over(dir.path()).await.unwrap();
        let script = "head -c 1000000 /dev/zero > /tmp/fits && echo fits; \
                      head -c 2000000 /dev/zero > /tmp/more 2>/dev/null || echo full"
            .to_owned();
        let out = sandbox
            .command(
                dir.path(),
                dir.path(),
                &["/bin/sh".to_owned(), "-c".to_owned(), script],
                Tie::DiesWithRack,
            )
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said, "fits\nfull\n", "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn system_dirs_are_bound_read_only_or_linked() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("usr")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).unwrap();
        let args = system_binds(root.path());
        let usr = root.path().join("usr").to_string_lossy().into_owned();
        assert_eq!(
            args,
            ["--ro-bind", usr.as_str(), "/usr", "--symlink", "usr/bin", "/bin"]
        );
    }
}
