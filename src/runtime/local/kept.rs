//! rack's side of the keepers (see `keeper`): the process driver starts each service instance
//! under one, in `<data>/keepers/<app>/<process id>/`, and follows it through its files. The
//! app's output is copied from the keeper's segments into the app's log, each batch of lines
//! with the place the copy has reached (the keeper's pid and start time, a segment, an offset),
//! stored in the same transaction (`LogSink::copied`, the `log_cursors` table): a rack that
//! stops, or is killed at any instant, and starts again goes on from the last place stored, so
//! no line is lost and none is copied twice.
//!
//! On the first apply of an app after rack starts, the supervisor asks for the survivors: each
//! keeper directory whose keeper still runs (its pid and start time, against pid reuse) is an
//! instance to adopt ([`Kept::attach`], from the stored place) or remove ([`discard`]). A
//! keeper started by another rack that still runs (replicas sharing a data directory) is left
//! alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use super::driver::{Found, Running, Start};
use super::keeper::{Described, Proc, State, exit_file, parse_exit, segment, state_file};
use crate::runtime::LogSink;

/// How long a keeper may take to start its command (generous: a loaded host).
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How often the output is looked for while there is none.
const POLL: Duration = Duration::from_millis(100);

/// How long a flush under way is waited for when rack lets go of an instance.
const LAST_FLUSH: Duration = Duration::from_secs(5);

/// The most lines copied (and stored) at once.
const MAX_LINES: usize = 500;

/// The most output read at once.
const CHUNK: u64 = 1 << 20;

/// Where keepers are, and the program that runs them.
#[derive(Debug, Clone)]
pub struct Keepers {
    /// `<data>/keepers`.
    pub dir: PathBuf,
    /// The rack binary.
    pub program: PathBuf,
}

/// How a command is started (built for the sandbox; the keeper runs it).
pub struct Command<'a> {
    pub command: &'a tokio::process::Command,
    /// The uid and gid the keeper switches to for it (see `Sandbox::direct_ids`).
    pub ids: Option<(u32, u32)>,
    pub forward: &'a [u16],
}

impl Keepers {
    /// The directory of the keeper of process `id` of `app`.
    pub fn dir_of(&self, app: &str, id: &str) -> PathBuf {
        self.dir.join(app).join(id)
    }

    /// Starts `command` of `start` under a keeper; returns its directory and the command's pid
    /// once the keeper has started it.
    ///
    /// # Errors
    /// When the keeper cannot start it (the keeper's message).
    pub async fn start(&self, start: &Start, command: &Command<'_>) -> std::io::Result<(PathBuf, State)> {
        let dir = self.dir_of(&start.app, &start.id);
        // A previous run of the same instance (restarted after a crash) left its files.
        let _ = std::fs::remove_dir_all(&dir);
        make_private_dir(&dir)?;
        let described = Described {
            owner: Proc::this(),
            app: start.app.clone(),
            process: start.id.clone(),
            service: start.service.clone(),
            release: start.release.clone(),
            build: start.build.clone(),
            port: start.port,
            forward: command.forward.to_vec(),
        };
        let inner = command.command.as_std();
        let mut keeper = tokio::process::Command::new(&self.program);
        keeper
            .arg(super::keeper::SUBCOMMAND)
            .arg("--dir")
            .arg(&dir)
            .arg("--describe")
            .arg(serde_json::to_string(&described).map_err(std::io::Error::other)?);
        if let Some((uid, gid)) = command.ids {
            keeper
                .arg("--uid")
                .arg(uid.to_string())
                .arg("--gid")
                .arg(gid.to_string());
        }
        keeper
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args())
            .env_clear()
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join("keeper.err"))?);
        for (key, value) in inner.get_envs() {
            if let Some(value) = value {
                keeper.env(key, value);
            }
        }
        let mut child = keeper.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the keeper has no output"))?;
        let mut said = String::new();
        let _ = tokio::time::timeout(READY_WITHIN, tokio::io::BufReader::new(stdout).read_line(&mut said)).await;
        // It lives on without rack; reaped here while rack runs.
        tokio::spawn(async move { child.wait().await });
        let state = std::fs::read(state_file(&dir))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<State>(&bytes).ok());
        match state {
            Some(state) if said.starts_with("ready ") => Ok((dir, state)),
            _ => {
                let why = std::fs::read_to_string(dir.join("keeper.err")).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                Err(std::io::Error::other(format!(
                    "its keeper did not start it: {}",
                    if why.trim().is_empty() {
                        "no reason given"
                    } else {
                        why.trim()
                    }
                )))
            }
        }
    }

    /// The keepers of `app` left by an earlier run of rack (those of another rack still running
    /// are not).
    pub fn survivors(&self, app: &str) -> Vec<Found> {
        let me = std::process::id();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(self.dir.join(app)).into_iter().flatten().flatten() {
            let dir = entry.path();
            let Some(state) = read_state(&dir) else {
                // A keeper that never started its command.
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            if state.owner.is_some_and(|owner| owner.pid != me && owner.alive()) {
                continue;
            }
            found.push(Found {
                handle: dir.to_string_lossy().into_owned(),
                process: state.process,
                service: state.service,
                release: state.release,
                build: state.build,
                port: state.port,
                started: state.started,
                running: state.keeper.alive(),
                forward: state.forward,
                copied_until: None,
            });
        }
        found
    }
}

/// The state of the keeper in `dir`.
fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(state_file(dir)).ok()?).ok()
}

/// Makes `dir` (and its parents), closed to all but rack.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Signals the process group of the command of the keeper `state`, while its keeper runs (the
/// group's id is then surely still the command's).
fn signal(state: &State, signal: nix::sys::signal::Signal) {
    if state.keeper.alive()
        && let Ok(pid) = i32::try_from(state.child)
        && pid > 0
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Waits until the keeper `state` has exited, at most `within`; whether it has.
async fn ended(state: &State, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while state.keeper.alive() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Stops the command of the keeper found in `found` (SIGTERM, `grace`, SIGKILL) and removes
/// its files.
pub async fn discard(found: &Found, grace: Duration, cgroup: Option<super::cgroups::Instance>) {
    let dir = PathBuf::from(&found.handle);
    if let Some(state) = read_state(&dir) {
        signal(&state, nix::sys::signal::Signal::SIGTERM);
        if !ended(&state, grace).await {
            signal(&state, nix::sys::signal::Signal::SIGKILL);
            ended(&state, Duration::from_secs(10)).await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(cgroup) = cgroup {
        cgroup.remove();
    }
}

/// An instance under a keeper.
pub struct Kept {
    dir: PathBuf,
    state: State,
    tail: Option<tokio::task::JoinHandle<()>>,
    detaching: CancellationToken,
    cgroup: Option<super::cgroups::Instance>,
    network: Option<Arc<super::app_network::AppNetwork>>,
}

impl Kept {
    /// Follows the keeper in `dir` (just started, or adopted), copying its output to `log` as
    /// `stream` lines from `from` (where the last copy stopped, as stored with its lines; its
    /// start without).
    pub fn attach(
        dir: PathBuf,
        state: State,
        from: Option<String>,
        stream: String,
        log: LogSink,
        cgroup: Option<super::cgroups::Instance>,
        network: Option<Arc<super::app_network::AppNetwork>>,
    ) -> Self {
        let detaching = CancellationToken::new();
        let place = from
            .and_then(|from| Place::parse(&from, state.keeper))
            .unwrap_or_default();
        let copy = Copy {
            dir: dir.clone(),
            keeper: state.keeper,
            process: state.process.clone(),
            stream,
            log,
            detaching: detaching.clone(),
        };
        let tail = tokio::spawn(copy.run(place));
        Self {
            dir,
            state,
            tail: Some(tail),
            detaching,
            cgroup,
            network,
        }
    }

    /// The state in `dir`, of a survivor to adopt.
    pub fn state_of(found: &Found) -> Option<(PathBuf, State)> {
        let dir = PathBuf::from(&found.handle);
        read_state(&dir).map(|state| (dir, state))
    }

    /// Waits until the output is all copied (the keeper has exited), at most `within`.
    async fn tail_done(&mut self, within: Duration) -> bool {
        let Some(tail) = &mut self.tail else { return true };
        if tokio::time::timeout(within, tail).await.is_err() {
            return false;
        }
        self.tail = None;
        true
    }

    /// Forgets the instance's files and cgroup (it has ended).
    fn remove(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
    }
}

#[async_trait::async_trait]
impl Running for Kept {
    fn pid(&self) -> u32 {
        self.state.child
    }

    fn network(&self) -> Option<Arc<super::app_network::AppNetwork>> {
        self.network.clone()
    }

    async fn wait(&mut self) -> super::exit::Exit {
        self.tail_done(Duration::MAX).await;
        let said = std::fs::read_to_string(exit_file(&self.dir)).unwrap_or_default();
        let exit = parse_exit(&said)
            .unwrap_or_else(|| super::exit::Exit::Lost("its keeper was killed before it ended".to_owned()));
        self.remove();
        exit
    }

    fn terminate(&self) {
        signal(&self.state, nix::sys::signal::Signal::SIGTERM);
    }

    fn kill(&self) {
        signal(&self.state, nix::sys::signal::Signal::SIGKILL);
    }

    async fn stop(&mut self, grace: Duration) {
        self.terminate();
        if !self.tail_done(grace).await {
            self.kill();
            self.tail_done(Duration::from_secs(10)).await;
        }
        self.remove();
    }

    /// Leaves it running under its keeper, for the next start of rack to adopt.
    async fn detach(&mut self) {
        self.detaching.cancel();
        self.tail_done(LAST_FLUSH + Duration::from_secs(1)).await;
    }
}

/// Where a copy of a keeper's output is: a segment and an offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Place {
    segment: u64,
    offset: u64,
}

impl Place {
    /// The place `text` records, if it is of the keeper `keeper` (a restarted instance's new
    /// keeper starts from the beginning of its own output).
    fn parse(text: &str, keeper: Proc) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let (pid, start) = fields.next()?.split_once('.')?;
        if pid.parse::<u32>().ok()? != keeper.pid || start.parse::<u64>().ok()? != keeper.start {
            return None;
        }
        Some(Self {
            segment: fields.next()?.parse().ok()?,
            offset: fields.next()?.parse().ok()?,
        })
    }

    /// How it is stored (naming the keeper).
    fn text(self, keeper: Proc) -> String {
        format!("{}.{} {} {}", keeper.pid, keeper.start, self.segment, self.offset)
    }
}

/// A copy of a keeper's output into the app's log.
struct Copy {
    dir: PathBuf,
    keeper: Proc,
    process: String,
    stream: String,
    log: LogSink,
    detaching: CancellationToken,
}

impl Copy {
    /// Copies from `place` until the keeper has exited and all is copied (then forgets the
    /// place), or until `detaching`.
    async fn run(self, mut place: Place) {
        loop {
            // Looked at before reading: what it wrote before it ended is then read below.
            let gone = !self.keeper.alive();
            let (lines, used) = read_lines(&segment(&self.dir, place.segment), place.offset);
            if !lines.is_empty() {
                place.offset += used;
                if !self.store(lines, Some(place)).await {
                    return;
                }
                continue;
            }
            if let Some(next) = next_segment(&self.dir, place.segment) {
                // The keeper writes a segment to its end before it starts the next; the old one
                // goes once the new place is stored.
                let done = place.segment;
                place = Place {
                    segment: next,
                    offset: 0,
                };
                if !self.store(Vec::new(), Some(place)).await {
                    return;
                }
                let _ = std::fs::remove_file(segment(&self.dir, done));
                continue;
            }
            if gone {
                self.store(Vec::new(), None).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.detaching.cancelled() => return,
            }
        }
    }

    /// Sends `lines` with `place` (stored together in one transaction), and waits until they
    /// are stored; false when rack lets go meanwhile (a flush under way is still waited for a
    /// while, so that the next start goes on right after it).
    async fn store(&self, lines: Vec<String>, place: Option<Place>) -> bool {
        let copied = crate::runtime::Copied {
            stream: self.stream.clone(),
            lines,
            process: self.process.clone(),
            position: place.map(|place| place.text(self.keeper)),
        };
        self.log.copied(copied).await;
        let flush = self.log.flush();
        tokio::pin!(flush);
        tokio::select! {
            () = &mut flush => !self.detaching.is_cancelled(),
            () = self.detaching.cancelled() => {
                let _ = tokio::time::timeout(LAST_FLUSH, &mut flush).await;
                false
            }
        }
    }
}

/// The whole lines of `file` from `offset`, and how many bytes they take.
fn read_lines(file: &Path, offset: u64) -> (Vec<String>, u64) {
    use std::io::{Read, Seek};
    let Ok(mut file) = std::fs::File::open(file) else {
        return (Vec::new(), 0);
    };
    let mut bytes = Vec::new();
    if file.seek(std::io::SeekFrom::Start(offset)).is_err() || file.take(CHUNK).read_to_end(&mut bytes).is_err() {
        return (Vec::new(), 0);
    }
    // At most MAX_LINES whole lines: the rest is read next time.
    let mut lines = Vec::new();
    let mut used = 0;
    while lines.len() < MAX_LINES
        && let Some(end) = bytes[used..].iter().position(|b| *b == b'\n')
    {
        lines.push(String::from_utf8_lossy(&bytes[used..used + end]).into_owned());
        used += end + 1;
    }
    (lines, used as u64)
}

/// The first segment after `n` in `dir` (segments the keeper dropped are skipped).
fn next_segment(dir: &Path, n: u64) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.strip_prefix("out.")?.parse::<u64>().ok())
        .filter(|m| *m > n)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_lines_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.0");
        std::fs::write(&file, "one\ntwo\nhal").unwrap();
        let (lines, used) = read_lines(&file, 0);
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(used, 8);
        let (lines, used) = read_lines(&file, 8);
        assert!(lines.is_empty() && used == 0);
        std::fs::write(dir.path().join("out.3"), "").unwrap();
        assert_eq!(next_segment(dir.path(), 0), Some(3));
        assert_eq!(next_segment(dir.path(), 3), None);
        std::fs::write(&file, "x\n".repeat(MAX_LINES + 1)).unwrap();
        let (lines, used) = read_lines(&file, 0);
        assert_eq!((lines.len(), used), (MAX_LINES, 2 * MAX_LINES as u64));
    }

    #[test]
    fn a_place_is_only_the_keepers_it_names() {
        let keeper = Proc { pid: 42, start: 7 };
        let place = Place {
            segment: 2,
            offset: 100,
        };
        assert_eq!(Place::parse(&place.text(keeper), keeper), Some(place));
        let restarted = Proc { pid: 42, start: 8 };
        assert_eq!(Place::parse(&place.text(keeper), restarted), None);
        assert_eq!(Place::parse("garbage", keeper), None);
    }
}
