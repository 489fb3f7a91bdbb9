//! convox.yml `resources:` (databases and caches) and the `resources:` list of a service.
//! Nothing here is ever ignored: an unknown key, type or option, or a value rack cannot honour,
//! refuses the manifest naming the key and its line.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::checks::is_dns_label;
use super::parser::{Doc, Parsed};
use crate::resource::{Definition, Kind};

/// Longest resource name: runtimes name their objects after it with a prefix and suffixes
/// (Kubernetes: a StatefulSet, its pod and its volume claim), which must stay DNS labels.
pub const MAX_RESOURCE_NAME: usize = 40;

/// Largest `storage`, in GB, and the range of `memory`, in MB (a rack extension).
const MAX_STORAGE_GB: u32 = 65_536;
const MEMORY_MB: std::ops::RangeInclusive<u32> = 16..=65_536;

/// The options a kind takes, as Convox documents them for its containerized resources
/// (`version`, `storage` in GB), plus rack's `memory` (MB: the server's memory budget).
pub fn options_of(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Postgres | Kind::Postgis | Kind::Mysql | Kind::Mariadb => &["memory", "storage", "version"],
        Kind::Redis | Kind::Memcached => &["memory", "version"],
    }
}

impl Doc<'_> {
    /// The manifest's `resources:` map.
    pub(super) fn resources(&self, path: &[&str], value: &Value) -> Parsed<BTreeMap<String, Definition>> {
        let mut resources = BTreeMap::new();
        for (name, definition) in self.map(path, value)? {
            if !is_dns_label(name) || name.len() > MAX_RESOURCE_NAME {
                let why = "invalid resource name: use lowercase letters, digits and '-', starting with a letter";
                return self.fail(
                    &[path, &[name]].concat(),
                    format!("{why} (at most {MAX_RESOURCE_NAME})"),
                );
            }
            let definition = self.resource(&[path, &[name]].concat(), definition)?;
            resources.insert(name.to_owned(), definition);
        }
        Ok(resources)
    }

    fn resource(&self, path: &[&str], value: &Value) -> Parsed<Definition> {
        if !value.is_mapping() {
            return self.expected(path, "a map of type, options and image", value);
        }
        let (mut kind, mut options, mut image) = (None, None, None);
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                "type" => {
                    let text = self.string(path, value)?;
                    match text.trim().parse::<Kind>() {
                        Ok(parsed) => kind = Some(parsed),
                        Err(why) => return self.fail(path, why.to_string()),
                    }
                }
                "options" => options = Some((path.clone(), value)),
                "image" => {
                    let text = self.string(path, value)?;
                    if text.chars().any(char::is_whitespace) {
                        return self.fail(
                            path,
                            format!("invalid image {text:?}: an image reference has no spaces"),
                        );
                    }
                    image = Some(text);
                }
                _ => return self.fail(path, "unknown key: a resource takes type, options and image"),
            }
        }
        let Some(kind) = kind else {
            let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            return self.fail(path, format!("missing type: add one of {}", kinds.join(", ")));
        };
        let options = match options {
            Some((path, value)) => self.resource_options(&path, kind, value)?,
            None => BTreeMap::new(),
        };
        Ok(Definition { kind, options, image })
    }

    fn resource_options(&self, path: &[&str], kind: Kind, value: &Value) -> Parsed<BTreeMap<String, String>> {
        let mut options = BTreeMap::new();
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            if !options_of(kind).contains(&key) {
                return self.fail(
                    path,
                    format!(
                        "unknown option of a {kind} resource: it takes {}",
                        options_of(kind).join(", ")
                    ),
                );
            }
            let text = match value {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.trim().to_owned(),
                other => return self.expected(path, "a number or a string", other),
            };
            if let Err(why) = check_option(key, &text) {
                return self.fail(path, why);
            }
            options.insert(key.to_owned(), text);
        }
        Ok(options)
    }

    /// A service's `resources:`: the names of declared resources (checked once all are known).
    pub(super) fn resource_links(&self, path: &[&str], value: &Value) -> Parsed<Vec<String>> {
        let Value::Sequence(items) = value else {
            return self.expected(path, "a list of resource names", value);
        };
        let mut names: Vec<String> = Vec::with_capacity(items.len());
        for item in items {
            let name = self.string(path, item)?;
            if names.contains(&name) {
                return self.fail(path, format!("resource {name:?} is listed twice"));
            }
            names.push(name);
        }
        Ok(names)
    }
}

/// Checks the value of option `key` (one of [`options_of`] a kind): what a manifest's
/// `options:` and `rack resources create|update` refuse.
///
/// # Errors
/// The reason, saying what to use.
pub fn check_option(key: &str, text: &str) -> Result<(), String> {
    match key {
        "version" => check_version(text),
        "storage" => check_number(text, 1..=MAX_STORAGE_GB, "GB"),
        "memory" => check_number(text, MEMORY_MB, "MB"),
        _ => Ok(()),
    }
}

/// A version as images tag them: digits and dots, with postgis's `-` between the versions of
/// postgres and postgis (`10-3.2`).
fn check_version(text: &str) -> Result<(), String> {
    let ok = text.len() <= 32
        && text.starts_with(|c: char| c.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid version {text:?}: use a version such as 16 or 7.0"))
    }
}

fn check_number(text: &str, range: std::ops::RangeInclusive<u32>, unit: &str) -> Result<(), String> {
    match text.parse::<u32>() {
        Ok(n) if range.contains(&n) => Ok(()),
        _ => Err(format!(
            "invalid value {text:?}: use a whole number of {unit} from {} to {}",
            range.start(),
            range.end()
        )),
    }
}
