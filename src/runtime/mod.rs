//! The runtime: what builds sources and runs releases. One object-safe trait, with `local`
//! (processes on this host) as the embedded default and `kube` (a Kubernetes cluster).

pub mod fake;
pub mod kube;
pub mod local;
pub mod source;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// A build to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub app: String,
    pub id: crate::ids::BuildId,
    /// The release the build makes when it succeeds (known up front: image builds get it as
    /// their `RELEASE` argument).
    pub release: crate::ids::ReleaseId,
    pub description: String,
    /// The environment of the app's latest release (image builds get the variables their
    /// Dockerfile declares as `ARG`s).
    pub env: crate::env::Env,
    /// Key of the source tarball in the app's objects.
    pub source_key: String,
    /// Where its bytes are in the object store.
    pub source_location: String,
    /// Path of the manifest inside the source.
    pub manifest_path: String,
    pub git_sha: String,
}

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The manifest text, as found in the source.
    pub manifest: String,
    /// Images pushed, by service (runtimes that build images).
    pub images: std::collections::BTreeMap<String, String>,
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
    /// A process started or exited: a line, and an event of the rack's feed.
    Process(String, String, crate::process_note::ProcessNote),
    /// Write everything sent before, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Lines a sink queues before its writer must catch up.
const LOG_QUEUE: usize = 1024;

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

    /// Writes one line.
    pub async fn line(&self, stream: &str, message: impl Into<String>) {
        self.send(LogItem::Line(stream.to_owned(), message.into())).await;
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
            process: note.process.to_owned(),
            kind,
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

/// A release to run.
#[derive(Debug, Clone)]
pub struct ReleaseSpec {
    pub app: String,
    pub id: crate::ids::ReleaseId,
    pub build_id: crate::ids::BuildId,
    /// The images its build made, by service (for the services that run them).
    pub images: std::collections::BTreeMap<String, String>,
    pub env: crate::env::Env,
    pub manifest: crate::manifest::Manifest,
    /// The resources the manifest declares, with their credentials, by name.
    pub resources: std::collections::BTreeMap<String, crate::resource::ResourceSpec>,
}

impl ReleaseSpec {
    /// The environment of one service's processes: the manifest's defaults (app-wide, then the
    /// service's), overridden by the release's variables.
    ///
    /// # Errors
    /// When the manifest requires a variable the release does not set.
    pub fn service_env(&self, name: &str, service: &crate::manifest::Service) -> Result<crate::env::Env, RuntimeError> {
        let mut env = crate::env::Env::new();
        for entry in self.manifest.environment.iter().chain(&service.environment) {
            match entry.split_once('=') {
                Some((key, default)) => {
                    env.insert(key.to_owned(), default.to_owned());
                }
                None if !self.env.contains_key(entry) => {
                    return Err(RuntimeError::Failed(format!(
                        "service {name} needs the environment variable {entry}: set it with `env set {entry}=...`"
                    )));
                }
                None => {}
            }
        }
        env.extend(self.env.clone());
        Ok(env)
    }
}

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

/// A failure of the runtime, with its cause kept.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// What was asked did not run; the message says why (and what to change, when it can).
    #[error("{0}")]
    Failed(String),
    /// Too many of something are running already (one-offs of an app): try again later.
    #[error("{0}")]
    Busy(String),
    /// The Kubernetes API refused or failed.
    #[error("{what}: {}", kube::describe(.source))]
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

/// The stream name of build output.
pub const BUILD_STREAM: &str = crate::stream_names::BUILD;

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

/// Where clients from outside reach a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// Every host name (or address) that reaches it, the main one first.
    pub hosts: Vec<String>,
    /// The port clients connect to.
    pub port: u16,
}

/// An extra load balancer of an app (convox.yml `balancers:`), as convox shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerInfo {
    pub name: String,
    /// The service it sends traffic to.
    pub service: String,
    /// Its address once the cluster has given it one (empty until then).
    pub endpoint: String,
    pub ports: Vec<BalancerPortInfo>,
}

/// One port of a balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerPortInfo {
    pub protocol: String,
    /// The port the balancer listens on.
    pub source: u16,
    /// The service's port.
    pub target: u16,
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

/// A runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// The name in event streams: `system/<name>/...`.
    fn name(&self) -> &'static str;

    /// Prepares a new app (the Kubernetes runtime makes its namespace).
    ///
    /// # Errors
    /// A message for the client when the app cannot be hosted.
    async fn create_app(&self, _app: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Whether a build whose server died can be picked up again by another one (its work goes
    /// on outside rack); if not, such a build fails as interrupted.
    fn resumes_builds(&self) -> bool {
        false
    }

    /// Process output that the runtime keeps outside rack's event log (the Kubernetes
    /// runtime: pod logs); `None` when processes write to the event log.
    fn process_logs(&self, _request: ProcessLogs) -> Option<LineStream> {
        None
    }

    /// Stops what a cancelled or timed-out build left running outside rack (dropping the build
    /// future stops what runs inside it).
    async fn cancel_build(&self, _app: &str, _id: &str) {}

    /// Whether the runtime runs convox.yml `timers` itself (Kubernetes: as CronJobs); if not,
    /// rack's scheduler (`jobs::timers`) starts them as one-off processes.
    fn runs_timers(&self) -> bool {
        false
    }

    /// Whether apps' processes must be started again when rack starts (they die with it).
    fn restores_on_start(&self) -> bool {
        false
    }

    /// Builds `job`'s source, writing its output to `log`. Dropping the future stops the build
    /// (and every process it started).
    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure>;

    /// Rolls `release` out for its app (replacing whatever runs), writing progress to `log`;
    /// returns once every service is healthy. `None` for the release stops the app's
    /// processes. Dropping the future leaves what was started registered, so that a later
    /// `apply` (the rollback) can replace it.
    async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError>;

    /// The app's processes.
    async fn processes(&self, app: &str) -> Vec<ProcessInfo>;

    /// Restarts one instance of a service (it is stopped and started again), or stops a
    /// one-off process for good. Returns false if there is no such process.
    async fn restart_process(&self, app: &str, id: &str) -> bool;

    /// Starts a one-off process of `release`'s service.
    ///
    /// # Errors
    /// When the service cannot run here or the process cannot be started.
    async fn run(&self, release: &ReleaseSpec, one_off: OneOff) -> Result<ProcessInfo, RuntimeError>;

    /// Waits until the one-off process `id` of `app` ends; its exit code.
    ///
    /// # Errors
    /// When there is no such process, or it cannot be followed.
    async fn wait_process(&self, app: &str, id: &str) -> Result<i32, RuntimeError>;

    /// Runs a command inside the running process `id` of `app`.
    ///
    /// # Errors
    /// When there is no such process, or the command cannot be started.
    async fn exec(&self, app: &str, id: &str, request: ExecRequest) -> Result<ExecSession, RuntimeError>;

    /// Frees what the (ended) builds `ids` of `app` hold on this host (their unpacked sources).
    async fn prune_builds(&self, app: &str, ids: &[crate::ids::BuildId]);

    /// Stops everything of an app (it is being deleted).
    async fn delete_app(&self, app: &str);

    /// The address of the app's router (its first service with a port), if it has one.
    fn router_addr(&self, app: &str) -> Option<SocketAddr>;

    /// Where the app's traffic arrives (convox's app `router`): empty when nowhere.
    fn app_router(&self, app: &str) -> String {
        self.router_addr(app).map(|a| a.to_string()).unwrap_or_default()
    }

    /// Where service `name` of `app`'s release (with environment `env`) is reached, if it
    /// takes traffic.
    fn service_route(
        &self,
        app: &str,
        name: &str,
        service: &crate::manifest::Service,
        env: &crate::env::Env,
    ) -> Option<ServiceRoute> {
        let _ = (name, env);
        service.port.and(self.router_addr(app)).map(|router| ServiceRoute {
            hosts: vec![router.to_string()],
            port: router.port(),
        })
    }

    /// The app's balancers as they run (none where the runtime has no load balancers).
    ///
    /// # Errors
    /// When they cannot be read.
    async fn balancers(&self, app: &str) -> Result<Vec<BalancerInfo>, RuntimeError> {
        let _ = app;
        Ok(Vec::new())
    }
}
