//! The names of the streams in an app's log, built in one place so that what writes a line
//! and what filters or renders it agree: `build`, `service/<service>/<process>` (a process's
//! own output) and `system/<source>/<object>` (what rack or a runtime says about an object).

use std::fmt::Display;

/// Build output.
pub const BUILD: &str = "build";

/// rack's own notes in an app's log (lines dropped while the log could not keep up).
pub const RACK_LOG: &str = "system/rack/log";

/// What the timer scheduler says of the timers it starts.
pub const RACK_TIMER: &str = "system/rack/timer";

/// What rack says of one-off processes (`run`).
pub const RACK_RUN: &str = "system/rack/run";

/// What `source` (a runtime's name, or `rack`) says about `object` (a service, a process, an
/// instance, `app`): `system/<source>/<object>`.
pub fn system(source: &str, object: impl Display) -> String {
    format!("system/{source}/{object}")
}

/// The stream of a deployment's state lines, and of what concerns the whole app, for
/// `runtime`: `system/<runtime>/atom/app`.
pub fn atom(runtime: &str) -> String {
    system(runtime, "atom/app")
}

/// What `runtime` says of resource `name` (creating, ready): `system/<runtime>/resource/<name>`.
pub fn resource(runtime: &str, name: &str) -> String {
    system(runtime, format_args!("resource/{name}"))
}

/// A process's own output: `service/<service>/<process>`.
pub fn service(service: &str, process: impl Display) -> String {
    format!("service/{service}/{process}")
}

/// What every stream of one service's processes starts with: `service/<service>/`.
pub fn service_prefix(service: &str) -> String {
    format!("service/{service}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_the_shape_readers_expect() {
        assert_eq!(atom("local"), "system/local/atom/app");
        assert_eq!(system("k8s", "web-1"), "system/k8s/web-1");
        assert_eq!(service("web", "web-1"), "service/web/web-1");
        assert!(service("web", "web-1").starts_with(&service_prefix("web")));
        assert_eq!(system("rack", "log"), RACK_LOG);
        assert_eq!(system("rack", "timer"), RACK_TIMER);
        assert_eq!(system("rack", "run"), RACK_RUN);
        assert_eq!(resource("k8s", "db"), "system/k8s/resource/db");
    }
}
