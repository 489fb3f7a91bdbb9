//! The manifest's model: the typed services, timers, balancers and resources a convox.yml
//! parses into, and the error that says why one was refused.

use std::collections::BTreeMap;
use std::fmt;

use serde_yaml_ng::Value;

/// A parsed and validated convox.yml.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Manifest {
    /// Services by name; names are lowercase DNS labels.
    pub services: BTreeMap<String, Service>,
    /// App-wide variables, `KEY` (required) or `KEY=default`.
    pub environment: Vec<String>,
    /// Scheduled commands by name (convox `timers:`).
    pub timers: BTreeMap<String, Timer>,
    /// Extra load balancers by name (convox `balancers:`).
    pub balancers: BTreeMap<String, Balancer>,
    /// Databases and caches by name (convox `resources:`); names are lowercase DNS labels.
    pub resources: BTreeMap<String, crate::resource::Definition>,
    /// Top-level keys rack does not interpret.
    pub extra: BTreeMap<String, Value>,
}

/// One service of the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// How to build the image; `None` only when `image` is given.
    pub build: Option<Build>,
    /// A prebuilt image to run instead of building.
    pub image: Option<String>,
    /// The command to run; `None` means the image's own.
    pub command: Option<Command>,
    /// The port the service listens on, if it takes traffic.
    pub port: Option<u16>,
    /// `http` (the default) or `https`: how the router talks to `port`.
    pub port_scheme: String,
    /// The health check.
    pub health: Health,
    /// How many processes to run and their size.
    pub scale: Scale,
    /// Service variables, `KEY` or `KEY=default`, added to the app-wide ones.
    pub environment: Vec<String>,
    /// Rolling-deploy bounds.
    pub deployment: Deployment,
    /// rack's release phase: a command run once, as a one-off process of this service's new
    /// release, before a deployment changes what runs; a non-zero exit stops the deployment.
    pub release: Option<Command>,
    /// The resources its processes link to (their `<NAME>_URL`... variables), by name.
    pub resources: Vec<String>,
    /// Service keys rack does not interpret (`domain`, `internal`, `volumes`...).
    pub extra: BTreeMap<String, Value>,
}

/// What an empty service means: build the app root, no port, default checks and scale.
impl Default for Service {
    fn default() -> Self {
        Self {
            build: Some(Build::default()),
            image: None,
            command: None,
            port: None,
            port_scheme: "http".to_owned(),
            health: Health::default(),
            scale: Scale::default(),
            environment: Vec::new(),
            deployment: Deployment::default(),
            release: None,
            resources: Vec::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// Where and how a service's image is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// Build context, relative to the app source; default `.`.
    pub path: String,
    /// Dockerfile, relative to `path`; default `Dockerfile`.
    pub manifest: String,
    /// rack extension for the local runtime: a shell command run in `path` at build time.
    pub command: Option<String>,
}

impl Default for Build {
    fn default() -> Self {
        Self {
            path: ".".to_owned(),
            manifest: "Dockerfile".to_owned(),
            command: None,
        }
    }
}

/// A service command: Convox accepts a shell string or an argv list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run through `sh -c`.
    Shell(String),
    /// Run directly, without a shell.
    Exec(Vec<String>),
}

impl Command {
    /// What is run: `["/bin/sh", "-c", text]` or the list itself.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Self::Shell(text) => vec!["/bin/sh".to_owned(), "-c".to_owned(), text.clone()],
            Self::Exec(argv) => argv.clone(),
        }
    }

    /// The command as people write it.
    pub fn display(&self) -> String {
        match self {
            Self::Shell(text) => text.clone(),
            Self::Exec(argv) => argv.join(" "),
        }
    }
}

/// A service's HTTP health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Path requested; default `/`.
    pub path: String,
    /// Seconds after start during which failed checks are forgiven (a slow starter is checked
    /// at once and then with a short backoff, but not failed before this); default 5.
    pub grace: u32,
    /// Seconds between checks; default 5.
    pub interval: u32,
    /// Seconds before a check fails; default 4.
    pub timeout: u32,
    /// No health check at all (a running process counts as healthy).
    pub disabled: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            path: "/".to_owned(),
            grace: 5,
            interval: 5,
            timeout: 4,
            disabled: false,
        }
    }
}

/// Process count range and size of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scale {
    /// Fewest processes; default 1.
    pub count_min: u32,
    /// Most processes; default 1.
    pub count_max: u32,
    /// CPU request, in Convox units (millicores).
    pub cpu: Option<u32>,
    /// Memory request in MB.
    pub memory: Option<u32>,
}

impl Default for Scale {
    fn default() -> Self {
        Self {
            count_min: 1,
            count_max: 1,
            cpu: None,
            memory: None,
        }
    }
}

/// Rolling-deploy bounds, as percentages of the desired count, and how a rollout is judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// Healthy processes kept during a deploy; default 50.
    pub minimum: u32,
    /// Processes allowed to run at once during a deploy; default 200.
    pub maximum: u32,
    /// rack's traffic analysis of a rollout (`analysis: false`: none); on by default.
    pub analysis: Option<Analysis>,
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            minimum: 50,
            maximum: 200,
            analysis: Some(Analysis::default()),
        }
    }
}

/// How a rollout is judged by the traffic its new release serves (`deployment.analysis`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Analysis {
    /// Seconds the new release is watched at most; default 30.
    pub window: u32,
    /// Requests below which no verdict is given (the analysis is skipped); default 20.
    pub min_requests: u32,
    /// Percent of 5xx responses and failed connections above which the release fails; default 5.
    pub max_error_rate: f64,
    /// The new release's p95 latency over the old one's above which it fails; default 2.
    pub max_latency_ratio: f64,
}

/// The longest analysis window: the router keeps this many seconds of figures.
pub const MAX_ANALYSIS_WINDOW: u32 = 120;

impl Default for Analysis {
    fn default() -> Self {
        Self {
            window: 30,
            min_requests: 20,
            max_error_rate: 5.0,
            max_latency_ratio: 2.0,
        }
    }
}

/// A command run on a schedule as a one-off process of a service (convox `timers:`).
#[derive(Debug, Clone, PartialEq)]
pub struct Timer {
    /// When to run: a 5-field cron expression (minute, hour, day of month, month, day of week)
    /// or a macro such as `@daily`, trimmed and with its fields separated by single spaces.
    pub schedule: String,
    /// What to run.
    pub command: Command,
    /// The service whose image and environment the command runs with.
    pub service: String,
    /// What to do when a run is due while the previous one is still going.
    pub concurrency: Concurrency,
    /// Timer keys rack does not interpret (`annotations`, `parallelCount`...).
    pub extra: BTreeMap<String, Value>,
}

/// What a timer does when a run is due while the previous one is still going (the Kubernetes
/// CronJob's `concurrencyPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// Start the new run alongside the old one (the default).
    #[default]
    Allow,
    /// Skip the new run.
    Forbid,
    /// Stop the old run and start the new one.
    Replace,
}

impl Concurrency {
    /// The Kubernetes `concurrencyPolicy` spelling: `Allow`, `Forbid` or `Replace`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allow => "Allow",
            Self::Forbid => "Forbid",
            Self::Replace => "Replace",
        }
    }
}

/// A load balancer of its own in front of some ports of a service (convox `balancers:`), for
/// traffic the HTTP router does not carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancer {
    /// The service the traffic goes to.
    pub service: String,
    /// The ports, sorted by source port; never empty.
    pub ports: Vec<BalancerPort>,
    /// Client networks allowed in, as written: CIDRs, or bare addresses meaning /32 or /128.
    /// Empty lets everyone in.
    pub whitelist: Vec<String>,
    /// Balancer keys rack does not interpret.
    pub extra: BTreeMap<String, Value>,
}

/// One port of a balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerPort {
    /// The port the balancer listens on.
    pub source: u16,
    /// The service's port the traffic is sent to.
    pub target: u16,
    /// `TCP` (the default) or `UDP`.
    pub protocol: String,
}

impl Manifest {
    /// Service names, in order.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }
}

/// Why a convox.yml was refused: the key at fault, what is wrong, and the line when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseManifestError {
    pub(super) key: String,
    pub(super) message: String,
    pub(super) line: Option<usize>,
}

impl ParseManifestError {
    /// Dotted path of the key at fault (`services.web.port`); empty for YAML syntax errors.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// 1-based line of the fault, when it could be found.
    pub fn line(&self) -> Option<usize> {
        self.line
    }
}

impl fmt::Display for ParseManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("convox.yml: ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}
