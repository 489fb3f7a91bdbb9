//! How a runtime fails, with its cause kept (a Kubernetes error, an I/O error, a capability's
//! error).

/// A failure of the runtime, with its cause kept.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// What was asked did not run; the message says why (and what to change, when it can).
    #[error("{0}")]
    Failed(String),
    /// The new release served its traffic worse than its analysis allows: the figures.
    #[error("{0}")]
    AnalysisFailed(String),
    /// The app has no process with this id.
    #[error("no process {0}")]
    NoProcess(String),
    /// Too many of something are running already (one-offs of an app): try again later.
    #[error("{0}")]
    Busy(String),
    /// The Kubernetes API refused or failed.
    #[error("{what}: {}", super::kube::describe(.source))]
    Kube {
        what: String,
        #[source]
        source: ::kube::Error,
    },
    /// An operation on this host failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Something rack handed the runtime (its log, its port book, its token issuer) failed.
    #[error("{what}: {source}")]
    Capability {
        what: String,
        #[source]
        source: BoxError,
    },
}

impl RuntimeError {
    /// A Kubernetes failure while doing `what`.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(::kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Kube { what, source }
    }

    /// A local failure while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// A failure of a capability while doing `what`.
    pub fn capability(what: impl Into<String>) -> impl FnOnce(BoxError) -> Self {
        let what = what.into();
        move |source| Self::Capability { what, source }
    }
}

/// Any error, boxed (what capabilities return).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
