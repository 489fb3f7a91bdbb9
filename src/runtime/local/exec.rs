//! A command run inside a running instance (`exec`), wired to an [`ExecSession`]: plain pipes
//! (standard output and error merged as they come), or a terminal.

use std::io;

use futures_util::StreamExt;
use tokio::process::Command;
use tokio_util::io::ReaderStream;

use super::pty::Pty;
use crate::runtime::{ExecRequest, ExecSession};

/// Starts `command` (already put on a terminal by its maker when `request.tty` is set: see
/// `Sandbox::terminal_command`) and connects it.
///
/// # Errors
/// When it cannot be started.
pub fn spawn(mut command: Command, request: &ExecRequest) -> io::Result<ExecSession> {
    command.kill_on_drop(true);
    match request.tty {
        Some((rows, cols)) => {
            let pty = Pty::open(rows, cols)?;
            let (stdin, stdout, stderr) = pty.stdio()?;
            command.stdin(stdin).stdout(stdout).stderr(stderr);
            let mut child = command.spawn()?;
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
                .stdin(if request.stdin {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = command.spawn()?;
            let stdout = child.stdout.take().map(chunks);
            let stderr = child.stderr.take().map(chunks);
            let output = futures_util::stream::select(
                futures_util::stream::iter(stdout).flatten(),
                futures_util::stream::iter(stderr).flatten(),
            )
            .boxed();
            let stdin = child
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
