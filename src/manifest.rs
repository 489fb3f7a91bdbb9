//! convox.yml: parses the app manifest into typed services and validates it, following Convox's
//! grammar (https://docs.convox.com/configuration/convox-yml). Unknown keys are kept in `extra`,
//! so a manifest written for Convox features rack lacks still loads.

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
    /// Top-level keys rack does not interpret (`resources`, `timers`, `balancers`...).
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
            _ => {
                manifest.extra.insert(key.to_owned(), value.clone());
            }
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
mod tests {
    use super::*;

    const FULL: &str = r#"
environment:
  - COMPANY=Convox
  - SECRET
resources:
  db:
    type: postgres
services:
  web:
    build:
      path: api
      manifest: Dockerfile.prod
      command: npm ci
    command: bin/web --port 3000
    port: https:3000
    domain: example.org
    health:
      path: /check
      grace: 10
      interval: 7
      timeout: 8
    scale:
      count: 2-4
      cpu: 256
      memory: 512
    environment:
      - PORT_NAME=web
    deployment:
      minimum: 25
      maximum: 150
  worker:
    image: redis:7
    command: [redis-server, --port, 6379]
    scale: 3
"#;

    /// Parses `yaml` (indented by four spaces) as the body of service `web`.
    fn web(yaml: &str) -> Result<Service, ParseManifestError> {
        parse(&format!("services:\n  web:\n    {yaml}\n")).map(|mut m| m.services.remove("web").unwrap())
    }

    #[test]
    fn full_manifest_parses_with_all_fields() {
        let m = parse(FULL).unwrap();
        assert_eq!(m.environment, ["COMPANY=Convox", "SECRET"]);
        assert_eq!(m.service_names().collect::<Vec<_>>(), ["web", "worker"]);
        let web = &m.services["web"];
        let build = web.build.as_ref().unwrap();
        assert_eq!(
            (&*build.path, &*build.manifest, build.command.as_deref()),
            ("api", "Dockerfile.prod", Some("npm ci"))
        );
        assert_eq!(web.command, Some(Command::Shell("bin/web --port 3000".into())));
        assert_eq!((web.port, &*web.port_scheme), (Some(3000), "https"));
        let health = &web.health;
        assert_eq!(
            (&*health.path, health.grace, health.interval, health.timeout),
            ("/check", 10, 7, 8)
        );
        assert_eq!(
            web.scale,
            Scale {
                count_min: 2,
                count_max: 4,
                cpu: Some(256),
                memory: Some(512)
            }
        );
        assert_eq!(web.environment, ["PORT_NAME=web"]);
        assert_eq!((web.deployment.minimum, web.deployment.maximum), (25, 150));
        let worker = &m.services["worker"];
        assert_eq!((&worker.build, worker.image.as_deref()), (&None, Some("redis:7")));
        let argv = ["redis-server", "--port", "6379"].map(String::from).to_vec();
        assert_eq!(worker.command, Some(Command::Exec(argv)));
        assert_eq!((worker.scale.count_min, worker.scale.count_max), (3, 3));
    }

    #[test]
    fn defaults_apply_to_a_bare_service_and_an_empty_file() {
        assert_eq!(parse("").unwrap(), Manifest::default());
        assert!(parse("# nothing yet\nservices:\n").unwrap().services.is_empty());
        assert_eq!(web("").unwrap(), Service::default());
        let defaults = Service::default();
        assert_eq!(
            defaults.build,
            Some(Build {
                path: ".".into(),
                manifest: "Dockerfile".into(),
                command: None
            })
        );
        assert_eq!(
            (defaults.port, &*defaults.port_scheme, defaults.health.timeout),
            (None, "http", 4)
        );
        assert_eq!(
            (
                defaults.scale.count_min,
                defaults.deployment.minimum,
                defaults.deployment.maximum
            ),
            (1, 50, 200)
        );
    }

    #[test]
    fn short_forms_of_build_health_scale_and_port_are_accepted() {
        let service = web("build: ./web\n    health: /up\n    scale: 1-3").unwrap();
        assert_eq!(
            service.build.map(|b| (b.path, b.manifest)),
            Some(("./web".into(), "Dockerfile".into()))
        );
        assert_eq!(service.health.path, "/up");
        assert_eq!((service.scale.count_min, service.scale.count_max), (1, 3));
        assert!(web("health:\n      disable: true").unwrap().health.disabled);
        for (port, scheme) in [
            ("3000", "http"),
            ("\"3000\"", "http"),
            ("http:3000", "http"),
            ("https:3000", "https"),
        ] {
            let service = web(&format!("port: {port}")).unwrap();
            assert_eq!((service.port, &*service.port_scheme), (Some(3000), scheme));
        }
    }

    #[test]
    fn bad_port_names_key_and_line() {
        let err = parse("services:\n  web:\n    image: nginx\n    port: abc\n").unwrap_err();
        let expected = "convox.yml: services.web.port: invalid port \"abc\": use 1-65535, optionally prefixed with \
                        http: or https: (line 4)";
        assert_eq!(err.to_string(), expected);
        for port in ["0", "65536", "ftp:21", "-1", "[80]"] {
            let err = web(&format!("port: {port}")).unwrap_err();
            assert_eq!((err.key(), err.line()), ("services.web.port", Some(3)), "{port}");
        }
    }

    #[test]
    fn bad_service_names_are_refused() {
        for name in ["Web", "1web", "web_1", "web-", &"a".repeat(64)] {
            let err = parse(&format!("services:\n  {name}:\n    image: x\n")).unwrap_err();
            assert!(err.to_string().contains("invalid service name"), "{name}: {err}");
            assert_eq!(err.line(), Some(2));
        }
    }

    #[test]
    fn bad_scale_deployment_health_and_environment_are_refused() {
        let cases = [
            (
                "scale:\n      count: 3-1",
                "services.web.scale.count",
                "minimum 3 is above maximum 1",
            ),
            ("scale:\n      count: lots", "services.web.scale.count", "got \"lots\""),
            ("scale:\n      memory: 0", "services.web.scale.memory", "at least 1"),
            (
                "deployment:\n      minimum: 120",
                "services.web.deployment.minimum",
                "0 to 100",
            ),
            (
                "deployment:\n      maximum: 90",
                "services.web.deployment.maximum",
                "at least 100",
            ),
            (
                "health:\n      interval: 0",
                "services.web.health.interval",
                "at least 1",
            ),
            ("health: check", "services.web.health.path", "must start with '/'"),
            ("build: ../up", "services.web.build.path", "relative path"),
            ("image: x\n    build: .", "services.web", "either build or image"),
            (
                "environment:\n      - 9LIVES",
                "services.web.environment",
                "invalid variable",
            ),
        ];
        for (yaml, key, message) in cases {
            let err = web(yaml).unwrap_err();
            assert_eq!(err.key(), key, "{yaml}");
            assert!(err.to_string().contains(message), "{yaml}: {err}");
        }
    }

    #[test]
    fn yaml_syntax_error_reports_a_line() {
        let err = parse("services:\n  web:\n    port: 3000\n  - oops\n").unwrap_err();
        assert_eq!((err.key(), err.line()), ("", Some(4)));
        assert!(
            err.to_string().starts_with("convox.yml: did not find expected key"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_kept() {
        let m = parse(FULL).unwrap();
        assert!(m.extra.contains_key("resources"));
        assert_eq!(m.services["web"].extra.get("domain"), Some(&Value::from("example.org")));
        let merged = parse("x-base: &base\n  port: 80\nservices:\n  web:\n    <<: *base\n").unwrap();
        assert_eq!(merged.services["web"].port, Some(80));
        assert!(merged.extra.contains_key("x-base"));
    }

    #[test]
    fn hostile_shapes_are_refused_before_parsing() {
        // 100 000 levels in 200 KB: the parser alone would take minutes.
        let deep = format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let err = parse(&deep).unwrap_err();
        assert!(err.to_string().contains("nested more than 100 levels"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Legitimate brackets are fine.
        assert!(parse("services:\n  web:\n    command: [sh, -c, \"echo [ok] {1}\"]\n").is_ok());

        let big = format!("# {}\n", "x".repeat(MAX_MANIFEST_BYTES));
        assert!(parse(&big).unwrap_err().to_string().contains("bytes; the most is"));

        let raw = parse("services:\n  web\0:\n    port: 80\n").unwrap_err();
        assert_eq!(raw.line(), Some(2));
        assert!(raw.to_string().contains("NUL"), "{raw}");
        let escaped = parse("environment:\n  - \"A=x\\0y\"\n").unwrap_err();
        assert_eq!(escaped.key(), "environment");
        let in_key = parse("services:\n  \"w\\0\":\n    port: 80\n").unwrap_err();
        assert!(in_key.to_string().contains("NUL"), "{in_key}");
    }

    #[test]
    fn alias_bombs_stay_small() {
        // Nine levels of nine aliases: 387 million strings if expanded.
        let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let prev = level - 1;
            let refs = vec![format!("*a{prev}"); 9].join(", ");
            yaml.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        let started = std::time::Instant::now();
        assert!(parse(&yaml).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_service_may_have_a_release_command() {
        assert_eq!(
            web("release: bin/migrate --all").unwrap().release,
            Some(Command::Shell("bin/migrate --all".into()))
        );
        assert_eq!(
            web("release: [bin/migrate]").unwrap().release,
            Some(Command::Exec(vec!["bin/migrate".into()]))
        );
        assert_eq!(web("port: 80").unwrap().release, None);
        assert_eq!(web("release: 3").unwrap_err().key(), "services.web.release");
    }

    #[test]
    fn scale_counts_are_capped() {
        let err = web("scale:\n      count: 4294967295").unwrap_err();
        assert_eq!(err.key(), "services.web.scale.count");
        assert!(
            web("scale: 1001")
                .unwrap_err()
                .to_string()
                .contains("more than the 1000")
        );
        assert!(web("scale: 2-1001").is_err());
        assert_eq!(web("scale: 1000").unwrap().scale.count_min, 1000);
    }
}
