//! Where a job writes its output: a [`LogSink`] of `(stream, line)` items (and process events
//! for the feed), blocking for job logs, lossy for an app's output, and its receiving end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// Where a job writes its output: one `(stream, line)` at a time.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<LogItem>,
    /// Set for a sink that never blocks: lines it could not queue, counted.
    dropped: Option<Arc<AtomicU64>>,
}

/// The receiving end of a [`LogSink`].
#[derive(Debug)]
pub struct LogReceiver {
    pub rx: mpsc::Receiver<LogItem>,
    /// Lines the sink dropped (a lossy sink), for the writer to report once it can.
    pub dropped: Option<Arc<AtomicU64>>,
}

/// What goes through a [`LogSink`].
#[derive(Debug)]
pub enum LogItem {
    Line(String, String),
    /// A process started or exited, or an analysis ended: a line, and an event of the rack's feed.
    Process(String, String, crate::process_note::ProcessNote),
    /// Write everything sent before, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Lines copied from a kept process's output, stored in one transaction with where the
    /// copy stopped (see `local::kept`).
    Copied(Copied),
}

/// Lines of one stream copied from `process`'s output, up to `position` (`None`: the copy is
/// over, its position forgotten).
#[derive(Debug)]
pub struct Copied {
    pub stream: String,
    pub lines: Vec<String>,
    pub process: String,
    pub position: Option<String>,
}

/// Lines a sink queues before its writer must catch up.
const LOG_QUEUE: usize = 1024;

/// A handle on a sink that does not keep it open (its writer ends once the sink's last clone
/// is dropped), for rack's shutdown to flush what is still queued (`AppLogs::settle`).
#[derive(Debug, Clone)]
pub struct WeakLogSink(mpsc::WeakSender<LogItem>);

impl WeakLogSink {
    /// Waits until every line and event sent before is stored, when the sink is still open:
    /// unlike [`LogSink::flush`], it waits for room in a full queue. Whether it was open.
    pub async fn flush(&self) -> bool {
        let Some(tx) = self.0.upgrade() else {
            return false;
        };
        let (ack, done) = tokio::sync::oneshot::channel();
        if tx.send(LogItem::Flush(ack)).await.is_ok() {
            drop(tx);
            let _ = done.await;
        }
        true
    }
}

impl LogSink {
    /// A sink that makes its writer wait when the log is behind (a build's or deployment's
    /// log: no line may be lost, and output cannot pile up in memory).
    pub fn new() -> (Self, LogReceiver) {
        let (tx, rx) = mpsc::channel(LOG_QUEUE);
        (Self { tx, dropped: None }, LogReceiver { rx, dropped: None })
    }

    /// A sink that never makes its writer wait (an app's output: an app must never block on
    /// its log): when the log is behind, lines are dropped and counted.
    pub fn lossy() -> (Self, LogReceiver) {
        let (tx, rx) = mpsc::channel(LOG_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        (
            Self {
                tx,
                dropped: Some(dropped.clone()),
            },
            LogReceiver {
                rx,
                dropped: Some(dropped),
            },
        )
    }

    /// A handle that flushes this sink without keeping it open.
    pub fn downgrade(&self) -> WeakLogSink {
        WeakLogSink(self.tx.downgrade())
    }

    /// Writes one line.
    pub async fn line(&self, stream: &str, message: impl Into<String>) {
        self.send(LogItem::Line(stream.to_owned(), message.into())).await;
    }

    /// Writes `copied`'s lines and its position together (all or nothing: a lossy sink that is
    /// full drops them all, and counts them).
    pub async fn copied(&self, copied: Copied) {
        let count = copied.lines.len() as u64;
        match &self.dropped {
            None => {
                let _ = self.tx.send(LogItem::Copied(copied)).await;
            }
            Some(dropped) => {
                if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(LogItem::Copied(copied)) {
                    dropped.fetch_add(count, Ordering::Relaxed);
                }
            }
        }
    }

    /// Writes the line that says process `process` of `app` started (`exit: None`) or exited,
    /// which is also a `process.started` / `process.exited` event of the feed.
    pub async fn process(&self, stream: &str, message: String, note: ProcessEvent<'_>) {
        let (kind, data) = match note.exit {
            None => (
                "process.started",
                serde_json::json!({ "service": note.service, "pid": note.pid }),
            ),
            Some(code) => (
                "process.exited",
                serde_json::json!({ "service": note.service, "exit_code": code }),
            ),
        };
        let note = crate::process_note::ProcessNote {
            app: note.app.to_owned(),
            process: Some(note.process.to_owned()),
            release: None,
            kind,
            message: message.clone(),
            data,
        };
        self.send(LogItem::Process(stream.to_owned(), message, note)).await;
    }

    /// Writes the line of a rollout's traffic analysis of `release`, which is also a
    /// `deployment.analysis` event of the feed (of the deployment whose log this is) with `data`.
    pub async fn analysis(&self, stream: &str, message: String, app: &str, release: &str, data: serde_json::Value) {
        let note = crate::process_note::ProcessNote {
            app: app.to_owned(),
            process: None,
            release: Some(release.to_owned()),
            kind: "deployment.analysis",
            message: message.clone(),
            data,
        };
        self.send(LogItem::Process(stream.to_owned(), message, note)).await;
    }

    async fn send(&self, item: LogItem) {
        match &self.dropped {
            // A closed receiver means the job is being torn down; its output has nowhere to go.
            None => {
                let _ = self.tx.send(item).await;
            }
            Some(dropped) => {
                if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(item) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Waits until every line sent before is stored, so that a state change recorded next
    /// comes after them in the log (a lossy sink that is full does not wait).
    pub async fn flush(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        let sent = match &self.dropped {
            None => self.tx.send(LogItem::Flush(ack)).await.is_ok(),
            Some(_) => self.tx.try_send(LogItem::Flush(ack)).is_ok(),
        };
        if sent {
            let _ = done.await;
        }
    }
}

/// What [`LogSink::process`] says of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEvent<'a> {
    pub app: &'a str,
    pub service: &'a str,
    pub process: &'a str,
    pub pid: u32,
    /// `None`: it started; else its exit code (`-1`: killed by a signal or stopped by rack).
    pub exit: Option<i32>,
}
