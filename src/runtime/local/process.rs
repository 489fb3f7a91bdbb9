//! Child processes of the local runtime: started in their own process group, their output
//! read line by line, and the whole group killed when the owner lets go of them.

use std::process::Stdio;

use futures_util::StreamExt;
use tokio::process::{Child, Command};

use super::LogSink;

/// Longest output line kept whole; longer ones are cut into pieces of this size.
const MAX_LINE: usize = 64 * 1024;

/// Kills the process group of a child when dropped, so that a cancelled or timed-out build also
/// stops whatever its command started in the background.
#[derive(Debug)]
pub struct GroupGuard {
    pgid: Option<nix::unistd::Pid>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (already gone) is the normal case after a clean exit.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Starts `command` in a process group of its own with stdout and stderr piped (stdin is the
/// caller's choice).
pub fn spawn_group(mut command: Command) -> std::io::Result<(Child, GroupGuard)> {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn()?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(nix::unistd::Pid::from_raw);
    Ok((child, GroupGuard { pgid }))
}

/// Copies the child's stdout and stderr to `log` as `stream` lines until both close; returns
/// the last line (where commands say why they failed).
pub async fn pipe_output(child: &mut Child, stream: &str, log: &LogSink) -> Option<String> {
    pipe_streams(child.stdout.take(), child.stderr.take(), stream, log).await
}

/// Copies `stdout` and `stderr` to `log` as `stream` lines until both close; returns the last.
pub async fn pipe_streams(
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    stream: &str,
    log: &LogSink,
) -> Option<String> {
    let stdout = stdout.map(lines);
    let stderr = stderr.map(lines);
    let mut merged = futures_util::stream::select(
        futures_util::stream::iter(stdout).flatten(),
        futures_util::stream::iter(stderr).flatten(),
    );
    let mut last = None;
    while let Some(line) = merged.next().await {
        log.line(stream, line.clone()).await;
        last = Some(line);
    }
    last
}

/// The lines of `reader`; a line longer than `MAX_LINE` comes out in pieces, so a command that
/// writes without newlines cannot make rack buffer without bound, and reading never stops early
/// (a child blocked on a full pipe would hang its build).
pub(super) fn lines<R: tokio::io::AsyncRead + Send + Unpin + 'static>(
    reader: R,
) -> futures_util::stream::BoxStream<'static, String> {
    use tokio::io::AsyncReadExt;
    let state = (reader, Vec::<u8>::new(), false);
    futures_util::stream::unfold(state, |(mut reader, mut pending, mut eof)| async move {
        loop {
            if let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                return Some((text(&line[..end]), (reader, pending, eof)));
            }
            if pending.len() >= MAX_LINE {
                let piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
                return Some((text(&piece), (reader, pending, eof)));
            }
            if eof {
                if pending.is_empty() {
                    return None;
                }
                let rest = std::mem::take(&mut pending);
                return Some((text(&rest), (reader, pending, eof)));
            }
            let mut chunk = [0u8; 8192];
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .boxed()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end_matches('\r').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_come_in_pieces_and_nothing_is_lost() {
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        let got: Vec<String> = lines(std::io::Cursor::new(input)).collect().await;
        assert_eq!(got.len(), 4);
        assert_eq!(got[..2], ["one", "two"]);
        assert_eq!(got[2].len(), MAX_LINE);
        assert_eq!(got[3], "x".repeat(10));
    }
}
