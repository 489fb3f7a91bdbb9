//! convox.yml: parses the app manifest into typed services and validates it, following Convox's
//! grammar (https://docs.convox.com/configuration/convox-yml). Unknown keys are kept in `extra`,
//! so a manifest written for Convox features rack lacks still loads.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde_yaml_ng::Value;

mod cron;
pub use cron::check_schedule;

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
    /// Seconds to wait after start before the first check; default 5.
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

/// Rolling-deploy bounds, as percentages of the desired count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Healthy processes kept during a deploy; default 50.
    pub minimum: u32,
    /// Processes allowed to run at once during a deploy; default 200.
    pub maximum: u32,
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            minimum: 50,
            maximum: 200,
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
    key: String,
    message: String,
    line: Option<usize>,
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

/// Parses and validates a convox.yml. An empty file is a valid manifest with no services.
///
/// # Errors
/// On YAML syntax errors, and on values Convox's grammar or rack's checks refuse; the error
/// names the key and, when it can be found, the line.
pub fn parse(text: &str) -> Result<Manifest, ParseManifestError> {
    check_shape(text)?;
    // Parsing into an untyped tree first lets every later error carry its key path.
    let mut root: Value = serde_yaml_ng::from_str(text).map_err(syntax_error)?;
    // `<<: *anchor` merge keys are a common way to share settings between services.
    root.apply_merge().map_err(syntax_error)?;
    let doc = Doc { text };
    doc.no_nul(&mut Vec::new(), &root)?;
    let mut manifest = Manifest::default();
    for (key, value) in doc.map(&[], &root)? {
        match key {
            "services" => {
                for (name, service) in doc.map(&["services"], value)? {
                    if !is_dns_label(name) {
                        let why = "invalid service name: use lowercase letters, digits and '-', starting with a letter";
                        return doc.fail(&["services", name], format!("{why} (at most 63)"));
                    }
                    manifest
                        .services
                        .insert(name.to_owned(), doc.service(&["services", name], service)?);
                }
            }
            "environment" => manifest.environment = doc.environment(&["environment"], value)?,
            "timers" => {
                for (name, timer) in doc.map(&["timers"], value)? {
                    if !is_dns_label(name) || name.len() > MAX_TIMER_NAME {
                        let why = "invalid timer name: use lowercase letters, digits and '-', starting with a letter";
                        return doc.fail(&["timers", name], format!("{why} (at most {MAX_TIMER_NAME})"));
                    }
                    manifest
                        .timers
                        .insert(name.to_owned(), doc.timer(&["timers", name], timer)?);
                }
            }
            "balancers" => {
                for (name, balancer) in doc.map(&["balancers"], value)? {
                    if !is_dns_label(name) || name.len() > MAX_BALANCER_NAME {
                        let why =
                            "invalid balancer name: use lowercase letters, digits and '-', starting with a letter";
                        return doc.fail(&["balancers", name], format!("{why} (at most {MAX_BALANCER_NAME})"));
                    }
                    manifest
                        .balancers
                        .insert(name.to_owned(), doc.balancer(&["balancers", name], balancer)?);
                }
            }
            _ => {
                manifest.extra.insert(key.to_owned(), value.clone());
            }
        }
    }
    // `timers:` and `balancers:` may come before `services:`: what they name is checked once all
    // services are known.
    let timers = manifest.timers.iter().map(|(name, t)| ("timers", name, &t.service));
    let balancers = manifest
        .balancers
        .iter()
        .map(|(name, b)| ("balancers", name, &b.service));
    for (kind, name, service) in timers.chain(balancers) {
        if !manifest.services.contains_key(service) {
            let known = match manifest.service_names().collect::<Vec<_>>().join(", ") {
                names if names.is_empty() => "this manifest has no services".to_owned(),
                names => format!("this manifest's services are {names}"),
            };
            return doc.fail(&[kind, name, "service"], format!("no service {service:?}: {known}"));
        }
    }
    Ok(manifest)
}

/// Largest convox.yml, in bytes (real ones are a few KiB).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// Deepest bracket nesting a convox.yml may have. The YAML parser's time grows with the
/// square of the flow nesting depth (`[[[[...`), so a tiny file could keep a core busy for
/// minutes: the depth is checked on the text, before parsing.
pub const MAX_NESTING: usize = 100;

/// Most processes of one service (the same cap as `scale` through the API).
pub const MAX_SCALE_COUNT: u32 = 1000;

/// Longest timer name. Its CronJob is `timer-<name>`, and Kubernetes keeps CronJob names to 52
/// characters so that the names of the Jobs it starts (11 characters more) stay DNS labels.
const MAX_TIMER_NAME: usize = 52 - "timer-".len();

/// Longest balancer name: its Kubernetes Service, `balancer-<name>`, must be a DNS label.
const MAX_BALANCER_NAME: usize = 63 - "balancer-".len();

/// Refuses texts that are too large, too deeply nested or hold NUL characters, cheaply and
/// before the YAML parser sees them. Brackets count wherever they are (quoted or not): an
/// over-count can only refuse a pathological manifest, never let a deep one through.
fn check_shape(text: &str) -> Result<(), ParseManifestError> {
    let refuse = |message: String, line: Option<usize>| {
        Err(ParseManifestError {
            key: String::new(),
            message,
            line,
        })
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return refuse(
            format!("the file is {} bytes; the most is {MAX_MANIFEST_BYTES}", text.len()),
            None,
        );
    }
    let (mut depth, mut line) = (0usize, 1usize);
    for c in text.chars() {
        match c {
            '\n' => line += 1,
            '\0' => return refuse("NUL characters are not allowed".to_owned(), Some(line)),
            '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return refuse(format!("nested more than {MAX_NESTING} levels deep"), Some(line));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn syntax_error(err: serde_yaml_ng::Error) -> ParseManifestError {
    let mut message = err.to_string();
    // The parser appends its own position; ours goes at the end in the common format.
    if let Some(at) = message.find(" at line ") {
        message.truncate(at);
    }
    let line = err.location().map(|l| l.line());
    ParseManifestError {
        key: String::new(),
        message,
        line,
    }
}

/// The manifest text, kept to find the line of a key for error messages.
struct Doc<'a> {
    text: &'a str,
}

type Parsed<T> = Result<T, ParseManifestError>;

impl Doc<'_> {
    fn fail<T>(&self, path: &[&str], message: impl Into<String>) -> Parsed<T> {
        let (key, message, line) = (path.join("."), message.into(), line_of(self.text, path));
        Err(ParseManifestError { key, message, line })
    }

    fn expected<T>(&self, path: &[&str], what: &str, got: &Value) -> Parsed<T> {
        self.fail(path, format!("expected {what}, got {}", describe(got)))
    }

    /// The entries of a map with string keys; null counts as an empty map.
    fn map<'v>(&self, path: &[&str], value: &'v Value) -> Parsed<Vec<(&'v str, &'v Value)>> {
        match value {
            Value::Null => Ok(Vec::new()),
            Value::Mapping(map) => map
                .iter()
                .map(|(k, v)| match k {
                    Value::String(k) => Ok((k.as_str(), v)),
                    other => self.expected(path, "string keys", other),
                })
                .collect(),
            other => self.expected(path, "a map", other),
        }
    }

    /// Refuses NUL in any key or string (an escaped `"\\0"`): no process environment, argument
    /// or database row can hold one.
    fn no_nul<'v>(&self, path: &mut Vec<&'v str>, value: &'v Value) -> Parsed<()> {
        let nul = |s: &str| s.contains('\0');
        match value {
            Value::String(s) if nul(s) => self.fail(path, "NUL characters are not allowed"),
            Value::Sequence(items) => items.iter().try_for_each(|item| self.no_nul(path, item)),
            Value::Mapping(map) => {
                for (key, item) in map {
                    let key = match key {
                        Value::String(k) if nul(k) => return self.fail(path, "NUL characters are not allowed in keys"),
                        Value::String(k) => k.as_str(),
                        _ => "?",
                    };
                    path.push(key);
                    let checked = self.no_nul(path, item);
                    path.pop();
                    checked?;
                }
                Ok(())
            }
            Value::Tagged(tagged) => self.no_nul(path, &tagged.value),
            _ => Ok(()),
        }
    }

    fn string(&self, path: &[&str], value: &Value) -> Parsed<String> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            other => self.expected(path, "a non-empty string", other),
        }
    }

    fn uint(&self, path: &[&str], value: &Value) -> Parsed<u32> {
        let n = match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        n.and_then(|n| u32::try_from(n).ok())
            .map_or_else(|| self.expected(path, "a whole number", value), Ok)
    }

    fn positive(&self, path: &[&str], value: &Value) -> Parsed<u32> {
        match self.uint(path, value)? {
            0 => self.fail(path, "must be at least 1"),
            n => Ok(n),
        }
    }

    fn service(&self, path: &[&str], value: &Value) -> Parsed<Service> {
        let mut service = Service {
            build: None,
            ..Service::default()
        };
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                // `key: ~` reads as "the default", as it does for Convox.
                _ if value.is_null() => {}
                "build" => service.build = Some(self.build(path, value)?),
                "image" => service.image = Some(self.string(path, value)?),
                "command" => service.command = Some(self.command(path, value)?),
                "port" => (service.port, service.port_scheme) = self.port(path, value)?,
                "health" => service.health = self.health(path, value)?,
                "scale" => service.scale = self.scale(path, value)?,
                "environment" => service.environment = self.environment(path, value)?,
                "deployment" => service.deployment = self.deployment(path, value)?,
                "release" => service.release = Some(self.command(path, value)?),
                _ => {
                    service.extra.insert(key.to_owned(), value.clone());
                }
            }
        }
        match (&service.build, &service.image) {
            (Some(_), Some(_)) => return self.fail(path, "set either build or image, not both"),
            // Convox builds the app root when a service names neither.
            (None, None) => service.build = Some(Build::default()),
            _ => {}
        }
        Ok(service)
    }

    fn build(&self, path: &[&str], value: &Value) -> Parsed<Build> {
        let mut build = Build::default();
        match value {
            Value::String(_) => build.path = self.string(path, value)?,
            Value::Mapping(_) => {
                for (key, value) in self.map(path, value)? {
                    let path = &[path, &[key]].concat();
                    match key {
                        "path" => build.path = self.string(path, value)?,
                        "manifest" => build.manifest = self.string(path, value)?,
                        "command" => build.command = Some(self.string(path, value)?),
                        // Other Convox options (args...) are for image builders rack does not run.
                        _ => {}
                    }
                }
            }
            other => return self.expected(path, "a path or a map of path, manifest and command", other),
        }
        // Both are resolved inside the unpacked source; a way out of it would read the host.
        for (key, value) in [("path", &build.path), ("manifest", &build.manifest)] {
            if value.starts_with('/') || value.split('/').any(|c| c == "..") {
                let message = format!("{value:?} must be a relative path inside the app source, without '..'");
                return self.fail(&[path, &[key]].concat(), message);
            }
        }
        Ok(build)
    }

    fn command(&self, path: &[&str], value: &Value) -> Parsed<Command> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Ok(Command::Shell(s.clone())),
            Value::Sequence(items) if !items.is_empty() => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    // `[sleep, 10]` is a natural way to write an argv; YAML makes 10 a number.
                    Value::Number(n) => Ok(n.to_string()),
                    other => self.expected(path, "strings in the list", other),
                })
                .collect::<Parsed<_>>()
                .map(Command::Exec),
            other => self.expected(path, "a command string or a non-empty list", other),
        }
    }

    fn port(&self, path: &[&str], value: &Value) -> Parsed<(Option<u16>, String)> {
        let text = match value {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.trim().to_owned(),
            other => return self.expected(path, "a port such as 3000 or \"https:3000\"", other),
        };
        let (scheme, number) = match text.split_once(':') {
            Some((scheme @ ("http" | "https"), number)) => (scheme, number),
            Some(_) => ("", ""),
            None => ("http", text.as_str()),
        };
        match number.parse::<u16>() {
            Ok(port) if port > 0 => Ok((Some(port), scheme.to_owned())),
            _ => self.fail(
                path,
                format!("invalid port {text:?}: use 1-65535, optionally prefixed with http: or https:"),
            ),
        }
    }

    fn health(&self, path: &[&str], value: &Value) -> Parsed<Health> {
        let mut health = Health::default();
        match value {
            Value::String(_) => health.path = self.string(path, value)?,
            Value::Mapping(_) => {
                for (key, value) in self.map(path, value)? {
                    let path = &[path, &[key]].concat();
                    match (key, value) {
                        ("path", _) => health.path = self.string(path, value)?,
                        ("grace", _) => health.grace = self.uint(path, value)?,
                        // A grace of 0 means "check at once"; a zero interval or timeout cannot be honoured.
                        ("interval", _) => health.interval = self.positive(path, value)?,
                        ("timeout", _) => health.timeout = self.positive(path, value)?,
                        ("disable", Value::Bool(disabled)) => health.disabled = *disabled,
                        ("disable", other) => return self.expected(path, "true or false", other),
                        _ => {}
                    }
                }
            }
            other => return self.expected(path, "a path or a map", other),
        }
        if !health.path.starts_with('/') {
            return self.fail(
                &[path, &["path"]].concat(),
                format!("{:?} must start with '/'", health.path),
            );
        }
        Ok(health)
    }

    fn scale(&self, path: &[&str], value: &Value) -> Parsed<Scale> {
        let mut scale = Scale::default();
        let Value::Mapping(_) = value else {
            // `scale: 2` and `scale: 1-3` are shorthands for `count`.
            (scale.count_min, scale.count_max) = self.count(path, value)?;
            return Ok(scale);
        };
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                "count" => (scale.count_min, scale.count_max) = self.count(path, value)?,
                "cpu" => scale.cpu = Some(self.positive(path, value)?),
                "memory" => scale.memory = Some(self.positive(path, value)?),
                // `targets` and `limit` drive Convox's autoscaler, which rack does not have.
                _ => {}
            }
        }
        Ok(scale)
    }

    fn count(&self, path: &[&str], value: &Value) -> Parsed<(u32, u32)> {
        let range = match value {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).map(|n| (n, n)),
            Value::String(s) => {
                let (min, max) = s.split_once('-').unwrap_or((s, s));
                min.trim().parse().ok().zip(max.trim().parse().ok())
            }
            _ => None,
        };
        match range {
            None => self.expected(path, "a count such as 2 or a range \"min-max\"", value),
            Some((min, max)) if min > max => self.fail(path, format!("minimum {min} is above maximum {max}")),
            Some((_, max)) if max > MAX_SCALE_COUNT => self.fail(
                path,
                format!("{max} is more than the {MAX_SCALE_COUNT} processes a service may have"),
            ),
            Some(range) => Ok(range),
        }
    }

    fn deployment(&self, path: &[&str], value: &Value) -> Parsed<Deployment> {
        let mut deployment = Deployment::default();
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                "minimum" => deployment.minimum = self.uint(path, value)?,
                "maximum" => deployment.maximum = self.uint(path, value)?,
                _ => {}
            }
        }
        let Deployment { minimum, maximum } = deployment;
        if minimum > 100 {
            return self.fail(&[path, &["minimum"]].concat(), "must be a percentage from 0 to 100");
        }
        if maximum < 100 {
            return self.fail(&[path, &["maximum"]].concat(), "must be a percentage of at least 100");
        }
        // Kubernetes refuses maxSurge = maxUnavailable = 0 too: no process could ever be replaced.
        if minimum == 100 && maximum == 100 {
            return self.fail(path, "minimum 100 with maximum 100 leaves no room for a new process");
        }
        Ok(deployment)
    }

    fn timer(&self, path: &[&str], value: &Value) -> Parsed<Timer> {
        if !value.is_mapping() {
            return self.expected(path, "a map of schedule, command and service", value);
        }
        let (mut schedule, mut command, mut service) = (None, None, None);
        let (mut concurrency, mut extra) = (Concurrency::default(), BTreeMap::new());
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                // `key: ~` reads as "not given", as it does for services.
                _ if value.is_null() => {}
                "schedule" => schedule = Some(self.schedule(path, value)?),
                "command" => command = Some(self.command(path, value)?),
                "service" => service = Some(self.string(path, value)?),
                "concurrency" => concurrency = self.concurrency(path, value)?,
                _ => {
                    extra.insert(key.to_owned(), value.clone());
                }
            }
        }
        let Some(schedule) = schedule else {
            return self.fail(
                path,
                "missing schedule: add a cron expression such as \"0 3 * * *\" or \"@daily\"",
            );
        };
        let Some(command) = command else {
            return self.fail(path, "missing command: add the command to run");
        };
        let Some(service) = service else {
            return self.fail(path, "missing service: name the service the command runs in");
        };
        Ok(Timer {
            schedule,
            command,
            service,
            concurrency,
            extra,
        })
    }

    /// A cron schedule as Kubernetes CronJobs take it, checked here so that a mistake is found
    /// when the manifest is read rather than when the CronJob is refused at deploy time.
    fn schedule(&self, path: &[&str], value: &Value) -> Parsed<String> {
        let Value::String(text) = value else {
            return self.expected(path, "a cron expression such as \"0 3 * * *\" or \"@daily\"", value);
        };
        let schedule = text.split_whitespace().collect::<Vec<_>>().join(" ");
        match check_schedule(&schedule) {
            Ok(()) => Ok(schedule),
            Err(why) => self.fail(path, format!("{:?}: {why}", text.trim())),
        }
    }

    fn concurrency(&self, path: &[&str], value: &Value) -> Parsed<Concurrency> {
        let policy = match value {
            Value::String(s) => s.trim().to_ascii_lowercase(),
            _ => String::new(),
        };
        match policy.as_str() {
            "allow" => Ok(Concurrency::Allow),
            "forbid" => Ok(Concurrency::Forbid),
            "replace" => Ok(Concurrency::Replace),
            _ => self.expected(path, "Allow, Forbid or Replace", value),
        }
    }

    fn balancer(&self, path: &[&str], value: &Value) -> Parsed<Balancer> {
        if !value.is_mapping() {
            return self.expected(path, "a map of service, ports and whitelist", value);
        }
        let (mut service, mut ports, mut whitelist, mut extra) = (None, None, Vec::new(), BTreeMap::new());
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                _ if value.is_null() => {}
                "service" => service = Some(self.string(path, value)?),
                "ports" => ports = Some(self.balancer_ports(path, value)?),
                "whitelist" => whitelist = self.whitelist(path, value)?,
                _ => {
                    extra.insert(key.to_owned(), value.clone());
                }
            }
        }
        let Some(service) = service else {
            return self.fail(path, "missing service: name the service the balancer sends traffic to");
        };
        let Some(ports) = ports else {
            return self.fail(
                path,
                "missing ports: map each balancer port to a service port, such as 5000: 3000",
            );
        };
        Ok(Balancer {
            service,
            ports,
            whitelist,
            extra,
        })
    }

    fn balancer_ports(&self, path: &[&str], value: &Value) -> Parsed<Vec<BalancerPort>> {
        let Value::Mapping(map) = value else {
            return self.expected(
                path,
                "a map of balancer port to service port, such as 5000: 3000",
                value,
            );
        };
        let mut ports: Vec<BalancerPort> = Vec::with_capacity(map.len());
        for (key, value) in map {
            // Port keys are usually YAML numbers, which `map` would refuse as keys.
            let text = match key {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                other => return self.expected(path, "port numbers as keys", other),
            };
            let path = &[path, &[text.as_str()]].concat();
            let Some(source) = port_number(key) else {
                return self.fail(path, format!("invalid port {text:?}: use 1-65535"));
            };
            if ports.iter().any(|port| port.source == source) {
                return self.fail(path, format!("port {source} is given twice"));
            }
            let (target, protocol) = match value {
                Value::Mapping(_) => self.balancer_target(path, value)?,
                _ => (self.target_port(path, value)?, "TCP".to_owned()),
            };
            ports.push(BalancerPort {
                source,
                target,
                protocol,
            });
        }
        if ports.is_empty() {
            return self.fail(path, "add at least one port, such as 5000: 3000");
        }
        ports.sort_by_key(|port| port.source);
        Ok(ports)
    }

    /// The long form of a balancer port's value: `{ port: 3000, protocol: udp }`.
    fn balancer_target(&self, path: &[&str], value: &Value) -> Parsed<(u16, String)> {
        let (mut target, mut protocol) = (None, "TCP".to_owned());
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match (key, value) {
                ("port", _) => target = Some(self.target_port(path, value)?),
                ("protocol", Value::String(s)) if s.trim().eq_ignore_ascii_case("tcp") => protocol = "TCP".to_owned(),
                ("protocol", Value::String(s)) if s.trim().eq_ignore_ascii_case("udp") => protocol = "UDP".to_owned(),
                ("protocol", other) => return self.expected(path, "tcp or udp", other),
                // Refused rather than kept: a misspelt `protocol` would quietly mean TCP.
                _ => return self.fail(path, "unknown key: a port takes port and protocol"),
            }
        }
        match target {
            Some(target) => Ok((target, protocol)),
            None => self.fail(path, "missing port: add the service port to send traffic to"),
        }
    }

    fn target_port(&self, path: &[&str], value: &Value) -> Parsed<u16> {
        port_number(value).map_or_else(|| self.expected(path, "a port from 1 to 65535", value), Ok)
    }

    fn whitelist(&self, path: &[&str], value: &Value) -> Parsed<Vec<String>> {
        let what = "a list of networks such as 10.0.0.0/16";
        let entries: Vec<&str> = match value {
            // Older Convox manifests give the whitelist as one comma-separated string.
            Value::String(s) => s.split(',').collect(),
            Value::Sequence(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.as_str()),
                    other => self.expected(path, what, other),
                })
                .collect::<Parsed<_>>()?,
            other => return self.expected(path, what, other),
        };
        let check = |entry: &str| {
            let entry = entry.trim();
            if is_cidr(entry) {
                return Ok(entry.to_owned());
            }
            self.fail(
                path,
                format!("invalid network {entry:?}: use an address with an optional prefix length, such as 10.0.0.0/16 or 2001:db8::/32"),
            )
        };
        entries.into_iter().map(check).collect()
    }

    fn environment(&self, path: &[&str], value: &Value) -> Parsed<Vec<String>> {
        let items = match value {
            Value::Null => return Ok(Vec::new()),
            Value::Sequence(items) => items,
            other => return self.expected(path, "a list of \"KEY\" or \"KEY=default\"", other),
        };
        let check = |item: &Value| {
            let Value::String(entry) = item else {
                return self.expected(path, "\"KEY\" or \"KEY=default\"", item);
            };
            let name = entry.split_once('=').map_or(entry.as_str(), |(name, _)| name);
            let mut chars = name.chars();
            if chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Ok(entry.clone());
            }
            self.fail(
                path,
                format!("invalid variable {entry:?}: use letters, digits and '_', not starting with a digit"),
            )
        };
        items.iter().map(check).collect()
    }
}

/// A lowercase DNS label (RFC 1123), as service names become hostnames and Kubernetes names.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A port from 1 to 65535, written as a YAML number or a string of digits.
fn port_number(value: &Value) -> Option<u16> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => Some(s.trim()).filter(|s| is_digits(s)).and_then(|s| s.parse().ok()),
        _ => None,
    };
    n.and_then(|n| u16::try_from(n).ok()).filter(|&port| port > 0)
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// An IPv4 or IPv6 address with an optional prefix length (a bare address is one host).
fn is_cidr(text: &str) -> bool {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let Ok(address) = address.parse::<IpAddr>() else {
        return false;
    };
    let most = if address.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|prefix| is_digits(prefix) && prefix.parse::<u8>().is_ok_and(|n| n <= most))
}

/// A short description of a value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a map".to_owned(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// The 1-based line of the key at `path`, found by indentation in block-style YAML. The parsed
/// tree keeps no positions, so this is a hint: in flow style it finds nothing rather than guess.
fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let mut lines = text.lines().enumerate();
    let mut parent: Option<(usize, usize)> = None; // (line index, indent) of the last segment found
    'segments: for segment in path {
        let mut child_indent = None;
        for (index, line) in lines.by_ref() {
            let body = line.trim_start();
            if body.is_empty() || body.starts_with('#') || body.starts_with("---") {
                continue;
            }
            let indent = line.len() - body.len();
            if parent.is_some_and(|(_, parent_indent)| indent <= parent_indent) {
                return None; // left the parent's block without finding the key
            }
            let key = body
                .split_once(':')
                .map(|(key, _)| key.trim().trim_matches(['"', '\'']));
            if indent == *child_indent.get_or_insert(indent) && key == Some(*segment) {
                parent = Some((index, indent));
                continue 'segments;
            }
        }
        return None;
    }
    parent.map(|(index, _)| index + 1)
}

#[cfg(test)]
mod tests;
