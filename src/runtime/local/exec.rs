//! A command run inside a running instance (`exec`), wired to an [`ExecSession`]: plain pipes
//! (standard output and error merged as they come), or a terminal. The command is killed whole
//! when its session is dropped before it ended (its websocket closed): see [`Whole`].

use std::io;

use futures_util::StreamExt;
use tokio::process::Command;
use tokio_util::io::ReaderStream;

use super::pty::Pty;
use crate::runtime::{ExecRequest, ExecSession};

/// Starts `command` (already put on a terminal by its maker when `request.tty` is set, which
/// then starts with `setsid --ctty`: see `Sandbox::terminal_command`) and connects it.
///
/// # Errors
/// When it cannot be started.
pub fn spawn(mut command: Command, request: &ExecRequest) -> io::Result<ExecSession> {
    command.kill_on_drop(true);
    match request.tty {
        Some((rows, cols)) => {
            let pty = Pty::open(rows, cols)?;
            let (stdin, stdout, stderr) = pty.stdio()?;
            // `setsid` gives the child a session, so a group, of its own (named by its pid, as
            // `Whole` expects); a group made here would make `setsid` fork, and leave.
            command.stdin(stdin).stdout(stdout).stderr(stderr);
            let mut child = Whole::of(command.spawn()?);
            drop(command);
            let (reader, writer) = pty.into_master()?;
            let output = chunks(reader);
            let stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> = request
                .stdin
                .then(|| Box::new(writer) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
            Ok(ExecSession {
                output,
                stdin,
                exit: Box::pin(async move { code(child.wait().await) }),
            })
        }
        None => {
            command
                .process_group(0)
                .stdin(if request.stdin {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = Whole::of(command.spawn()?);
            let stdout = child.child.stdout.take().map(chunks);
            let stderr = child.child.stderr.take().map(chunks);
            let output = futures_util::stream::select(
                futures_util::stream::iter(stdout).flatten(),
                futures_util::stream::iter(stderr).flatten(),
            )
            .boxed();
            let stdin = child
                .child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
            Ok(ExecSession {
                output,
                stdin,
                exit: Box::pin(async move { code(child.wait().await) }),
            })
        }
    }
}

/// An exec'd command and its process group, killed whole when dropped before it was waited
/// for to its end.
///
/// Why a group, and why that suffices. In the process sandbox an exec is a chain (a shell
/// joining the instance's cgroups, `nsenter` into its network, `setpriv`, bubblewrap) that
/// execs from one program to the next in rack's child, which then forks the sandbox's first
/// process: bubblewrap's init, pid 1 of a pid namespace of its own. Killing rack's child alone
/// is not enough: bubblewrap ties its init to its parent (`--die-with-parent`) only once the
/// sandbox is set up, and before that the init even waits for its parent, so a child killed
/// during the setup left the init (and, once set up, the command it starts) running forever
/// under the host's init. That is what an exec ended right after it started (a test
/// that saw the command appear, then closed the websocket) hit. Every process of the chain and
/// the sandbox's init belong to the child's group from their start, none of them leaves it
/// (bubblewrap makes a session only with `--new-session`, never passed), and whatever the
/// command starts, whichever group it puts itself in, lives in the init's pid namespace, which
/// the kernel empties when its init dies (an init ignores no SIGKILL sent from an ancestor
/// namespace, as rack's is). So one SIGKILL to the group ends the exec and everything it
/// started, in whatever state it is. The child is killed first and the group next while the
/// child is not yet reaped: its pid, the group's id, cannot name another group until then.
struct Whole {
    child: tokio::process::Child,
    /// The group, until the child has been waited for.
    group: Option<nix::unistd::Pid>,
}

impl Whole {
    fn of(child: tokio::process::Child) -> Self {
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw);
        Self { child, group }
    }

    /// Waits for the child's end, then ends what is left of its group. Once the child has ended
    /// the sandbox normally has too (bubblewrap's init, tied to its parent once set up, dies
    /// with it); the group is killed all the same, in case. The child is reaped by then, but
    /// pids are handed out in turn up to `pid_max`: its own is not another group's an instant
    /// later.
    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        let status = self.child.wait().await;
        if let Some(group) = self.group.take() {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        status
    }
}

impl Drop for Whole {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            let _ = self.child.start_kill();
            // ESRCH: the group is gone already (or, on a terminal, `setsid` had not run yet:
            // then the child had started nothing).
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// What `reader` gives, chunk by chunk, until it ends or fails.
fn chunks<R: tokio::io::AsyncRead + Send + 'static>(
    reader: R,
) -> futures_util::stream::BoxStream<'static, bytes::Bytes> {
    ReaderStream::new(reader)
        .take_while(|chunk| std::future::ready(chunk.is_ok()))
        .filter_map(|chunk| std::future::ready(chunk.ok()))
        .boxed()
}

/// An exit status as a shell reports it (128 + the signal for a killed process).
pub fn code(status: io::Result<std::process::ExitStatus>) -> i32 {
    super::exit::Exit::of(status).code()
}
