//! The keeper of a service's process (`rack app-keeper`, hidden), as podman's conmon is of a
//! container: rack starts each instance of a process service under a keeper of its own, which
//! outlives rack, so a restart or an upgrade of rack leaves the apps running (see `kept` for
//! rack's side). The keeper:
//!
//! - takes a session of its own (a signal to rack's group, rack's exit, do not reach it);
//! - starts the sandboxed command in a process group of its own, holding its standard input
//!   (the command's watchdog stops the app if the keeper is ever killed, see
//!   `driver::WATCHDOG`) and its output;
//! - appends the output, line by line, to numbered segment files in its directory
//!   (`out.<n>`, a new one past [`SEGMENT_BYTES`]), from which rack (this one or the next)
//!   copies it into the app's log, storing its place with the lines it copied (see `kept`);
//! - writes `state.json` (its pid and start time, against pid reuse, the command's pid, and what
//!   rack needs to adopt the instance) and, when the command has ended, `exit`, then exits;
//! - stops the command (SIGTERM to its group, then SIGKILL) when its directory is removed:
//!   nothing would ever adopt it (a rack's data directory deleted, as tests do).
//!
//! Only whole lines reach a segment, each in one write, so a reader that consumes up to the
//! last newline never sees half a line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// The hidden subcommand of rack that runs a keeper.
pub const SUBCOMMAND: &str = "app-keeper";

/// Size past which output goes on in a new segment (rack deletes the ones it has copied).
pub const SEGMENT_BYTES: u64 = 4 << 20;

/// Segments a keeper leaves at most while rack does not copy them (rack down for long): the
/// oldest go first.
const MAX_SEGMENTS: u64 = 16;

/// How often the keeper looks for its directory.
const DIR_CHECK: Duration = Duration::from_secs(1);

/// How long the command gets after SIGTERM when the keeper's directory is gone.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// A live process, named so that a later one with the same number is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    /// Its start time (clock ticks after boot, `/proc/<pid>/stat`).
    pub start: u64,
}

impl Proc {
    /// Process `pid` as it is now (`None`: there is none).
    pub fn of(pid: u32) -> Option<Self> {
        let (start, _) = stat(pid)?;
        Some(Self { pid, start })
    }

    /// This process.
    pub fn this() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// Whether it still runs (a zombie has ended).
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(start, state)| start == self.start && state != 'Z' && state != 'X')
    }
}

/// The start time and state of process `pid`.
fn stat(pid: u32) -> Option<(u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces, so read after the last `)`.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // starttime is field 22 of the line, the 20th after comm.
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// What a keeper's `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub keeper: Proc,
    /// The command's pid (its process group's id).
    pub child: u32,
    /// The rack that started it (a live other rack sharing the data directory keeps its own).
    pub owner: Option<Proc>,
    pub app: String,
    pub process: String,
    pub service: String,
    pub release: String,
    pub build: String,
    pub port: Option<u16>,
    pub started: chrono::DateTime<chrono::Utc>,
    pub forward: Vec<u16>,
}

impl State {
    /// The state of a keeper whose files are gone: never alive.
    pub fn lost(found: &super::driver::Found) -> Self {
        Self {
            keeper: Proc { pid: 0, start: 0 },
            child: 0,
            owner: None,
            app: String::new(),
            process: found.process.clone(),
            service: found.service.clone(),
            release: found.release.clone(),
            build: found.build.clone(),
            port: found.port,
            started: found.started,
            forward: found.forward.clone(),
        }
    }
}

/// What rack tells a keeper about the instance (the keeper adds the pids), as JSON in
/// `--describe`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Described {
    pub owner: Option<Proc>,
    pub app: String,
    pub process: String,
    pub service: String,
    pub release: String,
    pub build: String,
    pub port: Option<u16>,
    pub forward: Vec<u16>,
}

/// The segment file `n` of the keeper in `dir`.
pub fn segment(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("out.{n}"))
}

/// The state file of the keeper in `dir`.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// The file with how the command ended.
pub fn exit_file(dir: &Path) -> PathBuf {
    dir.join("exit")
}

/// Writes `text` to `path` at once (a reader sees the old file or the new one).
pub fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// How an exit reads in the `exit` file (`code N`, `signal N`), and back.
pub fn exit_text(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "code 1".to_owned(),
    }
}

/// The exit an `exit` file says.
pub fn parse_exit(text: &str) -> Option<super::exit::Exit> {
    let (kind, number) = text.trim().split_once(' ')?;
    let number: i32 = number.parse().ok()?;
    match kind {
        "code" => Some(super::exit::Exit::Code(number)),
        "signal" => Some(super::exit::Exit::Signal(number)),
        _ => None,
    }
}

/// The keeper itself (`rack app-keeper --dir DIR --describe JSON [--uid U --gid G] -- ARGV`),
/// with the command's environment as its own.
///
/// # Errors
/// When the command cannot be started (said on standard error, which rack reads).
pub async fn serve(dir: &Path, describe: &str, ids: Option<(u32, u32)>, argv: &[String]) -> anyhow::Result<()> {
    // Fails only for a group leader, which rack does not make it.
    let _ = nix::unistd::setsid();
    let described: Described = serde_json::from_str(describe).context("reading --describe")?;
    let (program, args) = argv.split_first().context("no command to keep")?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir("/")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    if let Some((uid, gid)) = ids {
        command.uid(uid).gid(gid);
    }
    let mut child = command.spawn().with_context(|| format!("starting {program}"))?;
    let pid = child.id().context("the command exited at once")?;
    let state = State {
        keeper: Proc::this().context("reading this process's start time")?,
        child: pid,
        owner: described.owner,
        app: described.app,
        process: described.process,
        service: described.service,
        release: described.release,
        build: described.build,
        port: described.port,
        started: chrono::Utc::now(),
        forward: described.forward,
    };
    write_atomically(&state_file(dir), &serde_json::to_vec(&state)?).context("writing the keeper's state")?;
    // Held for as long as the command should live (its watchdog stops it when this closes).
    let _watchdog = child.stdin.take();
    let mut out = Segments::open(dir)?;
    let stdout = child.stdout.take().map(super::process::lines);
    let stderr = child.stderr.take().map(super::process::lines);
    let mut lines = futures_util::stream::select(
        futures_util::stream::iter(stdout).flatten(),
        futures_util::stream::iter(stderr).flatten(),
    );
    // Tells rack the command runs; nothing is written there again (rack may be gone).
    let mut said = std::io::stdout();
    let _ = writeln!(said, "ready {pid}").and_then(|()| said.flush());
    let mut terms = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut check = tokio::time::interval(DIR_CHECK);
    let mut orphaned: Option<tokio::time::Instant> = None;
    let group = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
    let signal = |signal| {
        let _ = nix::sys::signal::killpg(group, signal);
    };
    let mut status = None;
    loop {
        tokio::select! {
            line = lines.next() => match line {
                Some(line) => out.write_line(&line),
                // Both pipes closed: nothing in the sandbox holds them any more.
                None => break,
            },
            exit = child.wait(), if status.is_none() => status = Some(exit),
            _ = terms.recv() => signal(nix::sys::signal::Signal::SIGTERM),
            _ = check.tick() => {
                if !state_file(dir).exists() {
                    match orphaned {
                        None => {
                            signal(nix::sys::signal::Signal::SIGTERM);
                            orphaned = Some(tokio::time::Instant::now());
                        }
                        Some(since) if since.elapsed() > ORPHAN_GRACE => signal(nix::sys::signal::Signal::SIGKILL),
                        Some(_) => {}
                    }
                }
            }
        }
    }
    let status = match status {
        Some(status) => status,
        None => child.wait().await,
    };
    // What the sandbox left behind in the group.
    signal(nix::sys::signal::Signal::SIGKILL);
    let text = match &status {
        Ok(status) => exit_text(status),
        Err(_) => "code 1".to_owned(),
    };
    if dir.exists() {
        write_atomically(&exit_file(dir), text.as_bytes()).context("writing the exit status")?;
    }
    Ok(())
}

/// The segment files a keeper appends to.
struct Segments {
    dir: PathBuf,
    n: u64,
    file: Option<std::fs::File>,
    size: u64,
}

impl Segments {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        let mut segments = Self {
            dir: dir.to_path_buf(),
            n: 0,
            file: None,
            size: 0,
        };
        segments.file = Some(segments.create()?);
        Ok(segments)
    }

    fn create(&self) -> anyhow::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment(&self.dir, self.n))
            .with_context(|| format!("opening {}", segment(&self.dir, self.n).display()))
    }

    /// Appends `line` (one write), going on in a new segment past the size.
    fn write_line(&mut self, line: &str) {
        if self.size >= SEGMENT_BYTES {
            self.n += 1;
            self.size = 0;
            self.file = self.create().ok();
            if self.n >= MAX_SEGMENTS {
                let _ = std::fs::remove_file(segment(&self.dir, self.n - MAX_SEGMENTS));
            }
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Some(file) = &mut self.file
            && file.write_all(&bytes).is_ok()
        {
            self.size += bytes.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_is_not() {
        let me = Proc::this().unwrap();
        assert!(me.alive());
        assert!(
            !Proc {
                start: me.start + 1,
                ..me
            }
            .alive()
        );
    }

    #[test]
    fn exits_round_trip() {
        use std::os::unix::process::ExitStatusExt;
        let text = exit_text(&std::process::ExitStatus::from_raw(3 << 8));
        assert_eq!(parse_exit(&text), Some(super::super::exit::Exit::Code(3)));
        let text = exit_text(&std::process::ExitStatus::from_raw(9));
        assert_eq!(parse_exit(&text), Some(super::super::exit::Exit::Signal(9)));
    }
}
