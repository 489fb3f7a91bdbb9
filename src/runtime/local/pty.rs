//! Terminals for `exec` with a TTY: a pseudo-terminal pair of the asked size, the child on its
//! slave end (made its controlling terminal by `setsid --ctty`), rack on its master end as an
//! async reader and writer.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

/// A pseudo-terminal whose slave end is still to be handed to a child.
#[derive(Debug)]
pub struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

impl Pty {
    /// A terminal of `rows` by `cols`.
    ///
    /// # Errors
    /// When the system has no pseudo-terminal to give.
    pub fn open(rows: u16, cols: u16) -> io::Result<Self> {
        let size = nix::pty::Winsize {
            ws_row: rows.max(1),
            ws_col: cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pair = nix::pty::openpty(Some(&size), None).map_err(io::Error::from)?;
        Ok(Self {
            master: pair.master,
            slave: pair.slave,
        })
    }

    /// Standard input, output and error for the child: the slave end.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn stdio(&self) -> io::Result<(Stdio, Stdio, Stdio)> {
        Ok((
            Stdio::from(self.slave.try_clone()?),
            Stdio::from(self.slave.try_clone()?),
            Stdio::from(self.slave.try_clone()?),
        ))
    }

    /// rack's end, once the child has its copies of the slave (this one is closed, so the
    /// master sees the end when the child's side is gone): a reader and a writer, each on its
    /// own descriptor so that a pending read never holds up a write.
    ///
    /// # Errors
    /// When the master cannot be duplicated.
    pub fn into_master(self) -> io::Result<(Reader, tokio::fs::File)> {
        drop(self.slave);
        let reader = tokio::fs::File::from_std(std::fs::File::from(self.master.try_clone()?));
        let writer = tokio::fs::File::from_std(std::fs::File::from(self.master));
        Ok((Reader(reader), writer))
    }
}

/// The output side of a terminal's master.
#[derive(Debug)]
pub struct Reader(tokio::fs::File);

impl AsyncRead for Reader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.0).poll_read(cx, buf)) {
            // EIO: the child's side is closed (it exited): the end of its output.
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_child_on_a_terminal_sees_a_tty_of_the_asked_size() {
        let pty = Pty::open(30, 100).unwrap();
        let (stdin, stdout, stderr) = pty.stdio().unwrap();
        let mut child = tokio::process::Command::new("setsid")
            .args([
                "--ctty",
                "sh",
                "-c",
                "stty size; test -t 0 && echo tty; read line; echo got $line",
            ])
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let (mut reader, mut writer) = pty.into_master().unwrap();
        writer.write_all(b"hello\n").await.unwrap();
        writer.flush().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), reader.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(child.wait().await.unwrap().success());
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("30 100"), "{out:?}");
        assert!(out.contains("tty"), "{out:?}");
        assert!(out.contains("got hello"), "{out:?}");
    }
}
