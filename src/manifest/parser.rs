//! The manifest's parser: walks the untyped YAML tree key by key, so that every error carries
//! the dotted path of its key (and, through `checks::line_of`, its line).

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::checks::{describe, is_cidr, line_of, port_number};
use super::cron::check_schedule;
use super::*;

/// The manifest text, kept to find the line of a key for error messages.
pub(super) struct Doc<'a> {
    pub(super) text: &'a str,
}

pub(super) type Parsed<T> = Result<T, ParseManifestError>;

impl Doc<'_> {
    pub(super) fn fail<T>(&self, path: &[&str], message: impl Into<String>) -> Parsed<T> {
        let (key, message, line) = (path.join("."), message.into(), line_of(self.text, path));
        Err(ParseManifestError { key, message, line })
    }

    pub(super) fn expected<T>(&self, path: &[&str], what: &str, got: &Value) -> Parsed<T> {
        self.fail(path, format!("expected {what}, got {}", describe(got)))
    }

    /// The entries of a map with string keys; null counts as an empty map.
    pub(super) fn map<'v>(&self, path: &[&str], value: &'v Value) -> Parsed<Vec<(&'v str, &'v Value)>> {
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
    pub(super) fn no_nul<'v>(&self, path: &mut Vec<&'v str>, value: &'v Value) -> Parsed<()> {
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

    pub(super) fn string(&self, path: &[&str], value: &Value) -> Parsed<String> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            other => self.expected(path, "a non-empty string", other),
        }
    }

    pub(super) fn uint(&self, path: &[&str], value: &Value) -> Parsed<u32> {
        let n = match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        n.and_then(|n| u32::try_from(n).ok())
            .map_or_else(|| self.expected(path, "a whole number", value), Ok)
    }

    pub(super) fn positive(&self, path: &[&str], value: &Value) -> Parsed<u32> {
        match self.uint(path, value)? {
            0 => self.fail(path, "must be at least 1"),
            n => Ok(n),
        }
    }

    pub(super) fn service(&self, path: &[&str], value: &Value) -> Parsed<Service> {
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
                "resources" => service.resources = self.resource_links(path, value)?,
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

    pub(super) fn build(&self, path: &[&str], value: &Value) -> Parsed<Build> {
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

    pub(super) fn command(&self, path: &[&str], value: &Value) -> Parsed<Command> {
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

    pub(super) fn port(&self, path: &[&str], value: &Value) -> Parsed<(Option<u16>, String)> {
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

    pub(super) fn health(&self, path: &[&str], value: &Value) -> Parsed<Health> {
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

    pub(super) fn scale(&self, path: &[&str], value: &Value) -> Parsed<Scale> {
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

    pub(super) fn count(&self, path: &[&str], value: &Value) -> Parsed<(u32, u32)> {
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

    pub(super) fn deployment(&self, path: &[&str], value: &Value) -> Parsed<Deployment> {
        let mut deployment = Deployment::default();
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                "minimum" => deployment.minimum = self.uint(path, value)?,
                "maximum" => deployment.maximum = self.uint(path, value)?,
                "analysis" => deployment.analysis = self.analysis(path, value)?,
                _ => {}
            }
        }
        let Deployment { minimum, maximum, .. } = deployment;
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

    pub(super) fn timer(&self, path: &[&str], value: &Value) -> Parsed<Timer> {
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
    pub(super) fn schedule(&self, path: &[&str], value: &Value) -> Parsed<String> {
        let Value::String(text) = value else {
            return self.expected(path, "a cron expression such as \"0 3 * * *\" or \"@daily\"", value);
        };
        let schedule = text.split_whitespace().collect::<Vec<_>>().join(" ");
        match check_schedule(&schedule) {
            Ok(()) => Ok(schedule),
            Err(why) => self.fail(path, format!("{:?}: {why}", text.trim())),
        }
    }

    pub(super) fn concurrency(&self, path: &[&str], value: &Value) -> Parsed<Concurrency> {
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

    pub(super) fn balancer(&self, path: &[&str], value: &Value) -> Parsed<Balancer> {
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

    pub(super) fn balancer_ports(&self, path: &[&str], value: &Value) -> Parsed<Vec<BalancerPort>> {
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
    pub(super) fn balancer_target(&self, path: &[&str], value: &Value) -> Parsed<(u16, String)> {
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

    pub(super) fn target_port(&self, path: &[&str], value: &Value) -> Parsed<u16> {
        port_number(value).map_or_else(|| self.expected(path, "a port from 1 to 65535", value), Ok)
    }

    pub(super) fn whitelist(&self, path: &[&str], value: &Value) -> Parsed<Vec<String>> {
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

    pub(super) fn environment(&self, path: &[&str], value: &Value) -> Parsed<Vec<String>> {
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
