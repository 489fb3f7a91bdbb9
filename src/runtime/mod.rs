//! The runtime: what builds sources and (later) runs releases. One object-safe trait, with
//! `local` (processes on this host) as the embedded default.

pub mod local;
mod process;

use std::time::Duration;

use tokio::sync::mpsc;

/// A build to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub app: String,
    pub id: String,
    /// Key of the source tarball in the app's objects.
    pub source_key: String,
    /// Path of the manifest inside the source.
    pub manifest_path: String,
    pub git_sha: String,
}

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The manifest text, as found in the source.
    pub manifest: String,
}

/// Why a build failed; the message becomes the build's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildFailure {
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    #[error("timed out after {}", humanize(*.0))]
    TimedOut(Duration),
    #[error("interrupted: the rack replica running the build stopped before it finished")]
    Interrupted,
}

fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Where a build writes its output: one `(stream, line)` at a time.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<(String, String)>,
}

impl LogSink {
    /// A sink and the receiving end that persists the lines.
    pub fn new() -> (Self, mpsc::Receiver<(String, String)>) {
        let (tx, rx) = mpsc::channel(1024);
        (Self { tx }, rx)
    }

    /// Writes one line (waits when the writer is behind, so output cannot pile up in memory).
    pub async fn line(&self, stream: &str, message: impl Into<String>) {
        // A closed receiver means the build is being torn down; its output has nowhere to go.
        let _ = self.tx.send((stream.to_owned(), message.into())).await;
    }
}

/// A runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// Builds `job`'s source, writing its output to `log`. Dropping the future stops the build
    /// (and every process it started).
    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure>;
}
