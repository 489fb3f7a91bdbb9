//! What a runtime needs of the rest of rack, handed to it as small traits (built in
//! `jobs/capabilities.rs`): the app's log, router ports, one-request source credentials.

use std::time::Duration;

use super::{BoxError, LogSink};

/// Where an app's own output and the runtime's events about its processes go (the app's log).
pub trait AppLogs: Send + Sync + std::fmt::Debug {
    /// A sink for `app`'s log. It never blocks its writer: when the log cannot keep up (the
    /// database is away), lines are dropped and counted, and the count is written once it can.
    fn sink(&self, app: &str) -> LogSink;
}

/// Router ports, kept across restarts so an app keeps its address.
#[async_trait::async_trait]
pub trait PortBook: Send + Sync + std::fmt::Debug {
    /// The port recorded for `app`'s `service`.
    async fn get(&self, app: &str, service: &str) -> Result<Option<u16>, BoxError>;
    /// Records the port of `app`'s `service`.
    async fn set(&self, app: &str, service: &str, port: u16) -> Result<(), BoxError>;
}

/// Short-lived credentials that allow exactly one request (a build pod fetching its source).
#[async_trait::async_trait]
pub trait SourceTokens: Send + Sync + std::fmt::Debug {
    /// A secret that allows `GET path` (and HEAD) until `ttl` has passed; `name` identifies it.
    async fn issue(&self, name: &str, path: &str, ttl: Duration) -> Result<String, BoxError>;
    /// Revokes the token `name`.
    async fn revoke(&self, name: &str) -> Result<(), BoxError>;
}

/// The uid offset of each app's sandboxed processes, kept so an app's files stay its own
/// across restarts (see `local::app_accounts`).
#[async_trait::async_trait]
pub trait AppUids: Send + Sync + std::fmt::Debug {
    /// `app`'s offset, allocated on first use (distinct for every app).
    async fn offset(&self, app: &str) -> Result<u32, BoxError>;
}
