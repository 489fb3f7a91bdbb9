//! convox.yml: parses the app manifest into typed services and validates it, following Convox's
//! grammar (https://docs.convox.com/configuration/convox-yml). Unknown keys are kept in `extra`,
//! so a manifest written for Convox features rack lacks still loads.

use serde_yaml_ng::Value;

mod analysis;
mod checks;
mod cron;
mod model;
mod parser;
mod resources;
pub use cron::check_schedule;
pub use resources::{MAX_RESOURCE_NAME, check_option, options_of};

pub use model::*;

use checks::{check_shape, is_dns_label, syntax_error};
use parser::Doc;

/// Parses and validates a convox.yml. An empty file is a valid manifest with no services.
///
/// # Errors
/// On YAML syntax errors, and on values Convox's grammar or rack's checks refuse; the error
/// names the key and, when it can be found, the line.
pub fn parse(text: &str) -> Result<Manifest, ParseManifestError> {
    parse_linking(text, &[])
}

/// [`parse`], where a service's `resources:` may also name one of `rack_linked` (the rack-wide
/// resources linked to the app: `rack resources link`).
///
/// # Errors
/// As [`parse`].
pub fn parse_linking(text: &str, rack_linked: &[String]) -> Result<Manifest, ParseManifestError> {
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
            "resources" => manifest.resources = doc.resources(&["resources"], value)?,
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
    // A service links resources by name: each must be declared (in any order of the keys).
    for (name, service) in &manifest.services {
        let known = |r: &&String| manifest.resources.contains_key(*r) || rack_linked.contains(r);
        if let Some(missing) = service.resources.iter().find(|r| !known(r)) {
            let known = match manifest.resources.keys().cloned().collect::<Vec<_>>().join(", ") {
                names if names.is_empty() => "this manifest declares no resources".to_owned(),
                names => format!("this manifest's resources are {names}"),
            };
            return doc.fail(
                &["services", name, "resources"],
                format!(
                    "no resource {missing:?}: declare it under resources: ({known}), or link a rack-wide \
                     resource of that name to the app (`rack rack resources link {missing} -a APP`)"
                ),
            );
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

#[cfg(test)]
mod tests;
