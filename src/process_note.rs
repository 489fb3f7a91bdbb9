//! An event that only the runtime knows of (a process started or exited, a rollout's traffic
//! analysis), on its way to the rack's feed. Defined here, below both, because the runtime makes it and the store
//! writes it, and neither may depend on the other.

/// A runtime's event for the feed.
#[derive(Debug, Clone)]
pub struct ProcessNote {
    pub app: String,
    /// The process it is about (`process.*`).
    pub process: Option<String>,
    /// The release it is about (`deployment.analysis`: the new one).
    pub release: Option<String>,
    /// `process.started`, `process.exited` or `deployment.analysis`.
    pub kind: &'static str,
    pub message: String,
    pub data: serde_json::Value,
}
