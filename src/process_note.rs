//! A process event that only the runtime knows of (a process started or exited), on its way to
//! the rack's feed. Defined here, below both, because the runtime makes it and the store
//! writes it, and neither may depend on the other.

/// A process event for the feed.
#[derive(Debug, Clone)]
pub struct ProcessNote {
    pub app: String,
    pub process: String,
    /// `process.started` or `process.exited`.
    pub kind: &'static str,
    pub message: String,
    pub data: serde_json::Value,
}
