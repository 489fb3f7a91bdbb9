//! What a runtime needs of the rest of rack, handed to it as small traits (built in
//! `jobs/capabilities.rs`): the app's log, router ports, one-request source credentials.

use std::time::Duration;

use super::{BoxError, LogSink};

/// Where an app's own output and the runtime's events about its processes go (the app's log).
#[async_trait::async_trait]
pub trait AppLogs: Send + Sync + std::fmt::Debug {
    /// A sink for `app`'s log. It never blocks its writer: when the log cannot keep up (the
    /// database is away), lines are dropped and counted, and the count is written once it can.
    fn sink(&self, app: &str) -> LogSink;

    /// Where the copy of `process`'s output stopped, as stored with the lines it copied
    /// ([`LogSink::copied`]); `None` when nothing was copied (or it cannot be read).
    async fn copied_until(&self, _app: &str, _process: &str) -> Option<String> {
        None
    }

    /// Returns once what the sinks queued so far is stored (rack is stopping: its database
    /// closes next, and a process event still queued, `process.exited` of an instance that
    /// ended while rack stopped, would be lost). The caller bounds the wait.
    async fn settle(&self) {}
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

/// A private registry's credentials (`convox registries add`), opened for one use: handed to
/// one podman call as an auth file, or put in an app's imagePullSecret. Never logged: its
/// `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    /// The registry's host (and port), as added: `registry.example.com`, `127.0.0.1:5000`.
    pub server: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("server", &self.server)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `credentials` as docker's `config.json` (what podman's `--authfile` and a Secret of type
/// `kubernetes.io/dockerconfigjson` hold): `{"auths": {server: {"auth": base64(user:pass)}}}`.
pub fn docker_config_json(credentials: &[RegistryCredential]) -> String {
    use base64::Engine;
    let auths: serde_json::Map<String, serde_json::Value> = credentials
        .iter()
        .map(|c| {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
            (c.server.clone(), serde_json::json!({ "auth": auth }))
        })
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

/// The private registries' credentials, read when an image is built or pulled (so a registry
/// added or removed counts from the next build or deployment on).
#[async_trait::async_trait]
pub trait Registries: Send + Sync + std::fmt::Debug {
    /// Every registry's credentials.
    async fn credentials(&self) -> Result<Vec<RegistryCredential>, BoxError>;
}

/// No private registries (tests, and programs that embed a runtime without a store).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRegistries;

#[async_trait::async_trait]
impl Registries for NoRegistries {
    async fn credentials(&self) -> Result<Vec<RegistryCredential>, BoxError> {
        Ok(Vec::new())
    }
}
