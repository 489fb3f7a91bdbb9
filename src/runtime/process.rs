//! Processes as a runtime reports them: their status and kind, what `ps` shows, their output,
//! one-off processes to start, and commands run inside them (`exec`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::LogSink;

/// Which process output to read.
#[derive(Debug, Clone)]
pub struct ProcessLogs {
    pub app: String,
    /// One service's, or all.
    pub service: Option<String>,
    /// Only output younger than this.
    pub since: Option<Duration>,
    /// Go on with new output (and new processes) until the reader leaves.
    pub follow: bool,
}

/// One line of process output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub at: DateTime<Utc>,
    /// `service/<service>/<process>`.
    pub stream: String,
    pub message: String,
}

/// Process output, as it comes.
pub type LineStream = futures_util::stream::BoxStream<'static, LogLine>;

/// Where a process is, as `ps` shows it (and convox's CLI waits for `running`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessStatus {
    /// Started, not yet past its health check.
    Starting,
    Running,
    /// It was running and fails its health check (it is about to be restarted).
    Unhealthy,
    /// It exited and is waiting to be restarted.
    Crashed,
    /// rack is stopping it.
    Stopping,
    /// Not started yet (a pod being scheduled).
    Pending,
    /// A one-off process that ended, and how.
    Complete,
    Failed,
}

/// What kind of process it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    /// An instance of a service, counted in its scale and routed to.
    Service,
    /// A one-off process (`run`, a release phase): neither counted nor routed to.
    Run,
}

/// A one-off process to start next to an app's services.
#[derive(Debug, Clone)]
pub struct OneOff {
    /// The service whose release, image and environment it runs with.
    pub service: String,
    /// What it runs.
    pub command: Vec<String>,
    /// Variables added to the release's environment.
    pub env: crate::env::Env,
    /// Where its output goes (`None`: the app's log).
    pub log: Option<LogSink>,
    /// It is stopped once it has run this long.
    pub timeout: Duration,
}

/// A command to run inside a running process (`exec`).
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub command: Vec<String>,
    /// A terminal of `(rows, columns)`, or plain pipes.
    pub tty: Option<(u16, u16)>,
    /// Whether the command gets a standard input.
    pub stdin: bool,
}

/// A command running inside a process: its output (standard output and error as they come,
/// or the terminal's), its input, and its exit code once it ends. Dropping it kills it.
pub struct ExecSession {
    pub output: futures_util::stream::BoxStream<'static, bytes::Bytes>,
    pub stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    pub exit: futures_util::future::BoxFuture<'static, i32>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecSession")
    }
}

/// A running process, as convox shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    pub id: String,
    pub app: String,
    pub command: String,
    pub cpu: f64,
    pub memory: f64,
    pub host: String,
    pub image: String,
    pub instance: String,
    /// The service.
    pub name: String,
    pub ports: Vec<String>,
    pub release: String,
    pub started: DateTime<Utc>,
    pub status: ProcessStatus,
    /// The operating system's process id (0 while restarting).
    pub pid: u32,
    #[serde(rename = "type")]
    pub kind: ProcessKind,
}
